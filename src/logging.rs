//! Logging that can never stall the runtime.
//!
//! The original froze when stdout's reader stopped reading: every worker blocked in `write`.
//! Here lines go through `tracing-appender`'s non-blocking writer: a dedicated thread writes,
//! the runtime only enqueues, and when the bounded buffer is full lines are dropped (lossy mode)
//! and counted, and the count is shown by `/health`.

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Log lines buffered at most before new ones are dropped.
const BUFFERED_LINES: usize = 16 * 1024;

/// Counter of dropped log lines.
#[derive(Clone)]
pub struct Dropped(ErrorCounter);

impl Dropped {
    pub fn count(&self) -> u64 {
        self.0.dropped_lines() as u64
    }
}

/// Installs the global subscriber (level from `RUST_LOG`, default `info`). Keep the guard alive
/// for the life of the process: dropping it flushes and stops the writer thread.
pub fn init() -> (Dropped, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .finish(std::io::stdout());
    let dropped = Dropped(writer.error_counter());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .init();
    (dropped, guard)
}
