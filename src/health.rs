//! Liveness: proof that the runtime still schedules tasks and the router answers.
//!
//! A watchdog task ticks every [`TICK`] and records how late each tick fired (scheduling lag).
//! `/health` fails when the lag exceeds `max_lag`; it reads the router's socket count (a
//! synchronous call under a lock never held across an `.await`), and never touches Redis, so a slow store cannot make a live instance look
//! dead (that is `/ready`'s job). Under systemd with `WatchdogSec`, `WATCHDOG=1` is sent from
//! that same task, so a frozen runtime stops the notifications and systemd restarts it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::Engine;

/// Interval of the watchdog's lag measurement.
pub const TICK: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    started: Instant,
    max_lag: Duration,
    engine: &'static str,
    /// Latest scheduling lag in microseconds.
    lag_us: AtomicU64,
    /// Log lines dropped because the log writer could not keep up.
    dropped_logs: Box<dyn Fn() -> u64 + Send + Sync>,
}

#[derive(Serialize)]
pub struct Report {
    pub ok: bool,
    pub status: &'static str,
    pub engine: &'static str,
    pub lag_ms: f64,
    pub local_peers: usize,
    pub uptime_s: u64,
    pub dropped_log_lines: u64,
}

impl Health {
    pub fn new(
        engine: &'static str,
        max_lag: Duration,
        dropped_logs: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                started: Instant::now(),
                max_lag,
                engine,
                lag_us: AtomicU64::new(0),
                dropped_logs: Box::new(dropped_logs),
            }),
        }
    }

    pub fn lag(&self) -> Duration {
        Duration::from_micros(self.inner.lag_us.load(Ordering::Relaxed))
    }

    /// Log lines dropped so far.
    pub fn dropped_logs(&self) -> u64 {
        (self.inner.dropped_logs)()
    }

    pub async fn report<E: Engine>(&self, engine: &E) -> Report {
        let local_peers = engine.local_peers();
        let lag = self.lag();
        let (ok, status) = if lag > self.inner.max_lag {
            (false, "runtime lagging")
        } else {
            (true, "ok")
        };
        Report {
            ok,
            status,
            engine: self.inner.engine,
            lag_ms: lag.as_secs_f64() * 1000.0,
            local_peers,
            uptime_s: self.inner.started.elapsed().as_secs(),
            dropped_log_lines: (self.inner.dropped_logs)(),
        }
    }

    /// Measures scheduling lag for ever and feeds systemd's watchdog from inside the runtime.
    /// Spawned once by the server, which aborts it on exit.
    pub async fn watchdog(self) {
        // systemd asks for a notification at least every WATCHDOG_USEC; send at half that.
        let mut usec = 0u64;
        let systemd = sd_notify::watchdog_enabled(false, &mut usec);
        let notify_every = Duration::from_micros(usec / 2).max(TICK);
        let mut last_notify = Instant::now();
        loop {
            let before = Instant::now();
            tokio::time::sleep(TICK).await;
            let lag = before.elapsed().saturating_sub(TICK);
            self.inner
                .lag_us
                .store(lag.as_micros() as u64, Ordering::Relaxed);
            if lag > self.inner.max_lag {
                tracing::warn!(lag_ms = lag.as_millis() as u64, "runtime scheduling lag");
            }
            if systemd && last_notify.elapsed() >= notify_every {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                last_notify = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::memory::MemoryEngine;

    #[tokio::test]
    async fn health_fails_when_the_runtime_lags() {
        let engine = MemoryEngine::start(Default::default());
        let health = Health::new("memory", Duration::from_millis(500), || 0);
        assert!(health.report(&engine).await.ok);
        health.inner.lag_us.store(2_000_000, Ordering::Relaxed);
        let report = health.report(&engine).await;
        assert!(!report.ok);
        assert_eq!(report.status, "runtime lagging");
    }
}
