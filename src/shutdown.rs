//! Graceful drain, in one small type.
//!
//! `Serving` → (SIGTERM/SIGINT) → `Draining`: `/ready` fails at once so the load balancer stops
//! sending new clients, while existing sockets keep working → (after the drain delay) →
//! `Closing`: every socket leaves its room (peers elsewhere get `peer_left` at once) and closes
//! with "going away" after a random delay within the jitter window, so clients do not all
//! reconnect in the same instant.

use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    Draining,
    Closing,
}

/// The sending side, held by the server's main task.
pub struct Drain {
    tx: watch::Sender<Phase>,
}

/// A cheap handle every connection and route holds.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
}

pub fn channel() -> (Drain, Shutdown) {
    let (tx, rx) = watch::channel(Phase::Serving);
    (Drain { tx }, Shutdown { rx })
}

impl Drain {
    pub fn set(&self, phase: Phase) {
        self.tx.send_if_modified(|p| {
            let advance = phase > *p;
            if advance {
                *p = phase;
            }
            advance
        });
    }
}

impl Shutdown {
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }

    /// Resolves once the phase reaches `phase` (or the drain handle is gone).
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|p| *p >= phase).await;
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_advance() {
        let (drain, shutdown) = channel();
        assert_eq!(shutdown.phase(), Phase::Serving);
        drain.set(Phase::Closing);
        drain.set(Phase::Draining);
        assert_eq!(shutdown.phase(), Phase::Closing);
        shutdown.reached(Phase::Draining).await;
    }
}
