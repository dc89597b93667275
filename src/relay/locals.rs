//! This instance's relay sockets: socket id → inbox. Plain data behind a private
//! `std::sync::Mutex`, reached only through synchronous methods (as in [`crate::router`]); an
//! entry goes with its [`Inbox`] guard, so no exit path can leave one behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{mpsc, Notify};

use super::{Endpoint, Piece, WINDOW};

/// Room in an inbox: a full window of frames, and the few control pieces beside them (acks
/// come at most one per `ACK_EVERY` frames written).
const INBOX: usize = WINDOW as usize + 16;
/// Entries for the janitor at most; beyond, they go stale by age instead.
const GONE: usize = 1024;

#[derive(Default)]
struct Table {
    inboxes: HashMap<String, mpsc::Sender<Piece>>,
    /// Waiting-list entries of held upgrades dropped mid-hold (their client went: hyper drops
    /// the request), for [`super::janitor`] to take off.
    gone: Vec<(String, Endpoint)>,
}

#[derive(Default)]
pub struct Locals {
    table: Mutex<Table>,
    janitor: Notify,
}

/// A relay socket's inbox; it leaves the registry when dropped.
pub struct Inbox {
    pub rx: mpsc::Receiver<Piece>,
    socket: String,
    locals: Arc<Locals>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.locals.with(|t| t.inboxes.remove(&self.socket));
    }
}

impl Locals {
    fn with<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        let mut t: MutexGuard<'_, Table> =
            self.table.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut t)
    }

    /// Registers relay socket `socket` and returns its inbox.
    pub fn open(self: &Arc<Self>, socket: &str) -> Inbox {
        let (tx, rx) = mpsc::channel(INBOX);
        self.with(|t| t.inboxes.insert(socket.to_owned(), tx));
        Inbox {
            rx,
            socket: socket.to_owned(),
            locals: self.clone(),
        }
    }

    /// Queues `piece` for local relay socket `socket`: `false` when it is not here, or its inbox
    /// is full (only a sender ignoring its credit can fill it: the pair is then ended).
    pub fn deliver(&self, socket: &str, piece: Piece) -> bool {
        let Some(tx) = self.with(|t| t.inboxes.get(socket).cloned()) else {
            return false;
        };
        match tx.try_send(piece) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(socket, "relay inbox full: ending the pair");
                crate::metrics::relay_event("overrun");
                // Closing the inbox ends its socket's task, which tells its partner.
                self.with(|t| t.inboxes.remove(socket));
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Has the janitor take `me` off `room`'s waiting lists.
    pub fn forget_later(&self, room: &str, me: &Endpoint) {
        self.with(|t| {
            if t.gone.len() < GONE {
                t.gone.push((room.to_owned(), me.clone()));
            }
        });
        self.janitor.notify_one();
    }

    /// What the janitor is to do, once there is something.
    pub async fn gone(&self) -> Vec<(String, Endpoint)> {
        loop {
            let gone = self.with(|t| std::mem::take(&mut t.gone));
            if !gone.is_empty() {
                return gone;
            }
            self.janitor.notified().await;
        }
    }

    /// Relay sockets on this instance (held, waiting or paired), for `/metrics`.
    pub fn count(&self) -> usize {
        self.with(|t| t.inboxes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inbox_takes_its_entry_with_it() {
        let locals = Arc::new(Locals::default());
        let inbox = locals.open("a");
        assert!(locals.deliver("a", Piece::End));
        assert!(!locals.deliver("b", Piece::End));
        assert_eq!(locals.count(), 1);
        drop(inbox);
        assert_eq!(locals.count(), 0);
        assert!(!locals.deliver("a", Piece::End));
    }

    #[test]
    fn a_flooded_inbox_is_closed_not_grown() {
        let locals = Arc::new(Locals::default());
        let mut inbox = locals.open("a");
        for _ in 0..INBOX {
            assert!(locals.deliver("a", Piece::Ack(1)));
        }
        assert!(
            !locals.deliver("a", Piece::Ack(1)),
            "refused beyond the window"
        );
        assert!(!locals.deliver("a", Piece::Ack(1)), "and gone");
        let mut n = 0;
        while inbox.rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, INBOX);
    }
}
