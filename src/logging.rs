//! Logging that can never stall the runtime.
//!
//! The original froze when stdout's reader stopped reading: every worker blocked in `write`.
//! Here lines go through `tracing-appender`'s non-blocking writer: a dedicated thread writes,
//! the runtime only enqueues, and when the bounded buffer is full lines are dropped (lossy mode)
//! and counted, and the count is shown by `/health`.
//!
//! # No secrets in logs, whatever `RUST_LOG` says
//!
//! Join codes, SDPs, ICE candidates and sealed payloads pass through libraries that log what they
//! carry. [`CAPS`] caps those targets at a level that shows no payload, and it is applied as a
//! second filter on top of `RUST_LOG` (an event must pass both), so no directive can lift it: not
//! `trace`, and not `tungstenite::protocol=trace` either (with `EnvFilter` alone the more specific
//! directive would win over an added `tungstenite=info`). What each crate logs (the versions in
//! `Cargo.lock`):
//!
//! | target | logs | cap |
//! |---|---|---|
//! | `tungstenite` | trace: every frame (payload in hex) and every message (text); debug: close frames with their reason | info |
//! | `tokio_tungstenite` | trace: poll bookkeeping (file:line); debug: I/O errors. No payload | none |
//! | `axum::rejection` | trace: the rejection's body text, which quotes serde errors (they can quote values) | debug |
//! | `hyper`, `hyper_util`, `h2` | nothing in this build (hyper's tracing needs `--cfg hyper_unstable_tracing`, h2 is not linked); headers and frames when enabled | info |
//! | `redis` | nothing in this build (only its cluster, sentinel and Entra ID code logs) | info |
//! | `rustls` | trace: whole TLS handshake messages (the Redis connection's), session tickets included | debug |
//!
//! beach-road's own events never carry a code, an SDP, a candidate or a payload
//! (`tests/logs.rs` checks a whole flow at `RUST_LOG=trace`).

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;

use crate::config::LogFormat;

/// The most verbose level each payload-logging target may log at (see the module doc).
pub const CAPS: &[(&str, LevelFilter)] = &[
    ("tungstenite", LevelFilter::INFO),
    ("axum::rejection", LevelFilter::DEBUG),
    ("hyper", LevelFilter::INFO),
    ("hyper_util", LevelFilter::INFO),
    ("h2", LevelFilter::INFO),
    ("redis", LevelFilter::INFO),
    ("rustls", LevelFilter::DEBUG),
];

/// The second filter: [`CAPS`], everything else as verbose as `filter` allows. Nothing in it is
/// more verbose than `filter`, so the level hint stays `filter`'s and `log` callers (tungstenite)
/// still skip disabled records before building them.
fn caps(filter: &EnvFilter) -> Targets {
    let most = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    Targets::new()
        .with_default(most)
        .with_targets(CAPS.iter().map(|&(target, cap)| (target, cap.min(most))))
}

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

/// Installs the global subscriber (level from `RUST_LOG`, default `info`; lines in `format`).
/// Keep the guard alive for the life of the process: dropping it flushes and stops the writer
/// thread. JSON lines carry the event's fields at the top level and the current span's fields
/// (a connection's `peer` and `session`) under `span`.
pub fn init(format: LogFormat) -> (Dropped, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .finish(std::io::stdout());
    let dropped = Dropped(writer.error_counter());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let caps = caps(&filter);
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false);
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(lines)
        .with(filter)
        .with(caps)
        .init();
    (dropped, guard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn caps_hold_against_more_specific_directives() {
        let filter = EnvFilter::new("trace,tungstenite::protocol=trace,axum::rejection=trace");
        let caps = caps(&filter);
        assert!(!caps.would_enable("tungstenite::protocol", &Level::TRACE));
        assert!(!caps.would_enable("tungstenite", &Level::DEBUG));
        assert!(caps.would_enable("tungstenite", &Level::INFO));
        assert!(!caps.would_enable("axum::rejection", &Level::TRACE));
        assert!(caps.would_enable("tokio_tungstenite", &Level::TRACE));
        assert!(caps.would_enable("beach_road::ws", &Level::TRACE));
    }

    #[test]
    fn caps_follow_a_quieter_filter() {
        let caps = caps(&EnvFilter::new("warn"));
        assert!(!caps.would_enable("beach_road::ws", &Level::INFO));
        assert!(!caps.would_enable("tungstenite", &Level::INFO));
    }
}
