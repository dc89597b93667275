//! This instance's own sockets: peer id → bounded outbound queue.
//!
//! `LocalPeers` is plain data with `&mut self` methods, kept inside the [`crate::router`]'s
//! lock. Each queue is a `VecDeque` behind its own `std::sync::Mutex` (held only to push or
//! pop one frame, never across an `.await`) and a `Notify` that wakes the socket task: no
//! allocation until frames arrive, so an idle socket costs a few bytes here, and delivery never
//! waits on a socket. Relayed frames may fill only part of
//! a peer's queue and are refused beyond it (the sender is told; see [`LocalPeers::deliver`]),
//! so another client cannot get a peer cut off. A control frame that does not fit disconnects
//! the peer instead of buffering without limit: its socket task is woken at once, even in the
//! middle of a write that cannot complete, drops the backlog and ends (so the room hears
//! `peer_left` now, not after the write timeout).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use foldhash::{HashMap, HashMapExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::protocol::Frame;

mod flow;
pub use flow::{
    Held, Hold, Outstanding, RemoteSender, Space, HOLD_WAIT, MAX_OUTSTANDING, SPACE_WAIT,
};

/// Why the server ended a socket's queue; the socket's task turns it into a close frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer did not read fast enough: its queue hit a bound.
    SlowConsumer,
    /// This instance was written off by the others (it was frozen or cut off from Redis).
    Fenced,
    /// The server is shutting down.
    GoingAway,
    /// The session was closed through the Admin API: it is gone, reconnecting will not help.
    SessionClosed,
}

impl CloseReason {
    /// WebSocket close code and reason sent to the client.
    pub fn close_frame(self) -> (u16, &'static str) {
        match self {
            CloseReason::SlowConsumer => (1008, "send queue full"),
            CloseReason::Fenced => (1012, "instance restarted"),
            CloseReason::GoingAway => (1001, "server shutting down"),
            CloseReason::SessionClosed => (1000, "session closed by the operator"),
        }
    }

    /// The reason's label in `beach_road_disconnects_total`.
    pub fn metric(self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Fenced => "fenced",
            CloseReason::GoingAway => "shutdown",
            CloseReason::SessionClosed => "admin_close",
        }
    }
}

/// The share of a peer's queue (numerator, denominator) that relayed frames may fill; the rest
/// is kept for the server's own control frames.
pub const RELAY_SHARE: (usize, usize) = (3, 4);
/// Relays from other instances may fill the relay share and then one more queue's bytes, in
/// up to this many queues' frames, while their senders are held (see `flow.rs`): the slack
/// must hold what a sender had under way before its hold took effect, which grows with its
/// rate. One pair at 120-160 k/s across two instances overflowed one and four queues' frames
/// (256, 1,024 at the defaults) with the bytes far from full; sixteen lost none.
pub(crate) const SLACK_QUEUES: usize = 16;

/// What a frame is, for [`LocalPeers::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Sent on behalf of another client (`signal`, transport negotiation, `debug`).
    Relay,
    /// The server's own room events (`peer_joined`, `peer_left`).
    Control,
}

/// The outcome of [`LocalPeers::deliver`].
#[derive(Clone, Debug)]
pub enum Queued {
    Yes,
    /// No such socket on this instance.
    Absent,
    /// A relayed frame found the queue's relay share full; nothing was queued. The sender may
    /// wait for room (see [`Space`]).
    Full(Space),
    /// A frame from another instance was queued past the relay share: its sender is to hold
    /// (it was not held for this queue yet).
    Hold(Held),
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// Bounds of one peer's outbound queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub messages: usize,
    pub bytes: usize,
}

/// The frames waiting for a socket, and their bytes.
#[derive(Debug, Default)]
struct Frames {
    queue: VecDeque<Frame>,
    bytes: usize,
    /// Senders elsewhere held for this queue, released once it is back within `release_at`.
    held: Vec<Held>,
    release_at: usize,
    /// Until when this socket's own reading is held by a recipient elsewhere.
    hold_until: Option<Instant>,
}

impl Frames {
    /// `frame` fits below `messages` frames and `bytes` bytes.
    fn fits(&self, frame: &Frame, messages: usize, bytes: usize) -> bool {
        self.queue.len() < messages && self.bytes + frame.len() <= bytes
    }

    fn push(&mut self, frame: &Frame) {
        self.queue.push_back(frame.clone());
        self.bytes += frame.len();
    }
}

/// Capacity an emptied queue keeps at most: a burst's buffer is given back.
const KEEP_CAPACITY: usize = 16;

/// State shared by a peer's queue and its socket task.
#[derive(Debug, Default)]
pub struct PeerShared {
    frames: Mutex<Frames>,
    /// Wakes the socket task when a frame is queued (or the queue closed).
    ready: Notify,
    /// The socket task dropped its end.
    gone: AtomicBool,
    closed: OnceLock<CloseReason>,
    /// Wakes the socket task when `closed` is set.
    closing: Notify,
    /// Wakes senders waiting for room in the queue (see [`Space`]), once `waiting` says any do.
    space: Notify,
    waiting: AtomicBool,
    /// A frame waited `SPACE_WAIT` in vain: the socket is not keeping up, and further frames
    /// are refused at once (their senders not slowed down) until its queue is empty again.
    stalled: AtomicBool,
    /// `hold_until` is set (a fast path for the socket task's check before each read).
    held: AtomicBool,
    /// Wakes the socket task when its hold is released.
    released: Notify,
    /// This socket's relays waiting in the outbox for another instance (see [`Outstanding`]).
    outstanding: AtomicUsize,
    /// Wakes the socket task when they fall below [`MAX_OUTSTANDING`].
    drained: Notify,
}

impl PeerShared {
    /// Why the queue was closed by the server, if it was.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.closed.get().copied()
    }

    /// Closes the queue (the first reason wins) and wakes the socket task.
    fn close(&self, reason: CloseReason) {
        if self.closed.set(reason).is_ok() {
            self.closing.notify_waiters();
            self.space.notify_waiters();
            self.ready.notify_one();
        }
    }

    fn frames(&self) -> std::sync::MutexGuard<'_, Frames> {
        // Plain data: a panic under the lock leaves nothing half-done worth refusing.
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The receiving end a socket task owns.
pub struct PeerQueue {
    shared: Arc<PeerShared>,
}

impl Drop for PeerQueue {
    fn drop(&mut self) {
        self.shared.gone.store(true, Ordering::Release);
    }
}

impl PeerQueue {
    /// Next frame to write, or `None` once the server closed the queue (see `close_reason`).
    /// Frames still queued then are dropped: the socket is ending, and a slow consumer's
    /// backlog is exactly what must not be written.
    pub async fn recv(&mut self) -> Option<Frame> {
        loop {
            if self.shared.close_reason().is_some() {
                return None;
            }
            if let Some(frame) = self.try_recv() {
                return Some(frame);
            }
            // A frame queued since `try_recv` left a permit: no wake-up is lost.
            self.shared.ready.notified().await;
        }
    }

    /// The next frame if one is queued already (the socket task batches its writes).
    pub fn try_recv(&mut self) -> Option<Frame> {
        let shared = &self.shared;
        if shared.close_reason().is_some() {
            return None;
        }
        let frame = {
            let mut frames = shared.frames();
            let frame = frames.queue.pop_front()?;
            frames.bytes -= frame.len();
            if frames.queue.is_empty() {
                // Caught up: senders may wait for it again.
                shared.stalled.store(false, Ordering::Relaxed);
                if frames.queue.capacity() > KEEP_CAPACITY {
                    frames.queue.shrink_to(KEEP_CAPACITY);
                }
            }
            frame
        };
        if shared.waiting.load(Ordering::Relaxed) && shared.waiting.swap(false, Ordering::AcqRel) {
            shared.space.notify_waiters();
        }
        Some(frame)
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.close_reason()
    }

    /// Resolves once the server closes the queue; the socket task races its writes against
    /// it, so a write blocked on a full socket does not delay the disconnect.
    pub async fn closed(&self) -> CloseReason {
        self.closing().closed().await
    }

    /// A handle on the queue's closing, to race a write that borrows the queue against it.
    pub fn closing(&self) -> Closing {
        Closing(self.shared.clone())
    }

    /// A handle on this socket's hold (see [`Hold`]).
    pub fn hold(&self) -> Hold {
        Hold(self.shared.clone())
    }

    /// The senders elsewhere held for this queue, once it is back within its relay share (the
    /// socket task releases them after each write), or all of them with `all` (it ends).
    pub fn released(&mut self, all: bool) -> Vec<Held> {
        let mut frames = self.shared.frames();
        if frames.held.is_empty() || (!all && frames.queue.len() > frames.release_at) {
            return Vec::new();
        }
        std::mem::take(&mut frames.held)
    }
}

/// See [`PeerQueue::closing`].
pub struct Closing(Arc<PeerShared>);

impl Closing {
    pub async fn closed(&self) -> CloseReason {
        loop {
            let notified = self.0.closing.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.0.close_reason() {
                return reason;
            }
            notified.await;
        }
    }
}

struct Slot {
    shared: Arc<PeerShared>,
}

/// The local socket registry. Owned by exactly one task (see module docs).
pub struct LocalPeers {
    slots: HashMap<String, Slot>,
    limits: QueueLimits,
}

impl LocalPeers {
    pub fn new(limits: QueueLimits) -> Self {
        Self {
            slots: HashMap::new(),
            limits,
        }
    }

    /// Registers a socket; a stale registration under the same id is closed.
    pub fn register(&mut self, peer: &str) -> PeerQueue {
        let shared = Arc::new(PeerShared::default());
        let slot = Slot {
            shared: shared.clone(),
        };
        if let Some(old) = self.slots.insert(peer.to_owned(), slot) {
            old.shared.close(CloseReason::GoingAway);
        }
        PeerQueue { shared }
    }

    pub fn remove(&mut self, peer: &str) {
        self.slots.remove(peer);
    }

    pub fn contains(&self, peer: &str) -> bool {
        self.slots.contains_key(peer)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Queues `frame` for `peer` without waiting. A relayed frame (another client's signal)
    /// may fill only [`RELAY_SHARE`] of the queue: past that it is refused and its sender told,
    /// so a flooding sender can never get its victim disconnected. A control frame
    /// (`peer_joined`, `peer_left`) that does not fit means the peer really is not reading:
    /// it is disconnected (the room must not go on with a member whose view is wrong).
    pub fn deliver(&mut self, peer: &str, frame: &Frame, class: Class) -> Queued {
        let Some(shared) = self.live(peer) else {
            return Queued::Absent;
        };
        // Control frames have a quarter queue above whatever relayed frames may fill,
        // including the slack of frames from other instances (see `deliver_remote`).
        let (max_messages, max_bytes) = match class {
            Class::Relay => self.relay_share(),
            Class::Control => {
                let (messages, bytes) = self.slack();
                (
                    messages + (self.limits.messages / 4).max(1),
                    bytes + self.limits.bytes / 4,
                )
            }
        };
        let queued = {
            let mut frames = shared.frames();
            let fits = frames.fits(frame, max_messages, max_bytes);
            if fits {
                frames.push(frame);
            }
            (!fits).then_some(frames.bytes)
        };
        let Some(queued) = queued else {
            shared.ready.notify_one();
            return Queued::Yes;
        };
        if class == Class::Relay {
            return Queued::Full(Space(shared));
        }
        tracing::warn!(peer, queued, "peer cannot keep up; disconnecting it");
        self.close(peer, CloseReason::SlowConsumer);
        Queued::Yes
    }

    /// `peer`'s queue, unless its socket task is gone (its registration then goes: the task's
    /// own cleanup follows).
    fn live(&mut self, peer: &str) -> Option<Arc<PeerShared>> {
        let slot = self.slots.get(peer)?;
        if slot.shared.gone.load(Ordering::Acquire) {
            self.slots.remove(peer);
            return None;
        }
        Some(slot.shared.clone())
    }

    /// How many frames and bytes relayed frames may fill.
    fn relay_share(&self) -> (usize, usize) {
        (
            (self.limits.messages.max(1) * RELAY_SHARE.0 / RELAY_SHARE.1).max(1),
            self.limits.bytes * RELAY_SHARE.0 / RELAY_SHARE.1,
        )
    }

    /// How many frames and bytes relayed frames from other instances may fill.
    fn slack(&self) -> (usize, usize) {
        let (messages, bytes) = self.relay_share();
        (
            messages + SLACK_QUEUES * self.limits.messages.max(1),
            bytes + self.limits.bytes,
        )
    }

    /// Closes one peer's queue: its socket task writes a close frame and ends.
    pub fn close(&mut self, peer: &str, reason: CloseReason) {
        if let Some(slot) = self.slots.remove(peer) {
            slot.shared.close(reason);
        }
    }

    /// Closes every local socket (shutdown, or this instance was fenced).
    pub fn close_all(&mut self, reason: CloseReason) -> Vec<String> {
        let ids: Vec<String> = self.slots.keys().cloned().collect();
        for id in &ids {
            self.close(id, reason);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &str) -> Frame {
        Frame::from(s)
    }

    #[tokio::test]
    async fn delivers_in_order() {
        let mut peers = LocalPeers::new(QueueLimits {
            messages: 4,
            bytes: 1024,
        });
        let mut q = peers.register("a");
        assert_eq!(Queued::Yes, peers.deliver("a", &frame("1"), Class::Control));
        assert_eq!(Queued::Yes, peers.deliver("a", &frame("2"), Class::Control));
        assert_eq!(
            Queued::Absent,
            peers.deliver("b", &frame("x"), Class::Control)
        );
        assert_eq!(&*q.recv().await.unwrap(), "1");
        assert_eq!(&*q.recv().await.unwrap(), "2");
    }

    #[tokio::test]
    async fn full_queue_by_count_disconnects() {
        let mut peers = LocalPeers::new(QueueLimits {
            messages: 2,
            bytes: 1024,
        });
        let mut q = peers.register("a");
        // Server events may fill the relay share (1), the slack for relays from elsewhere (16
        // queues) and a quarter queue (1) above them.
        for _ in 0..1 + SLACK_QUEUES * 2 + 1 {
            peers.deliver("a", &frame("x"), Class::Control);
        }
        assert!(peers.contains("a"));
        peers.deliver("a", &frame("x"), Class::Control);
        assert!(!peers.contains("a"));
        // The backlog is dropped: the socket ends at once.
        assert!(q.recv().await.is_none());
        assert_eq!(q.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(q.closed().await, CloseReason::SlowConsumer);
    }

    #[tokio::test]
    async fn close_wakes_a_waiting_socket_task() {
        let mut peers = LocalPeers::new(QueueLimits {
            messages: 1,
            bytes: 1024,
        });
        let q = peers.register("a");
        let waiter = tokio::spawn(async move { q.closed().await });
        tokio::task::yield_now().await;
        for n in 0..SLACK_QUEUES + 3 {
            peers.deliver("a", &frame(&n.to_string()), Class::Control);
        }
        let reason = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(reason, CloseReason::SlowConsumer);
    }

    #[tokio::test]
    async fn full_queue_by_bytes_disconnects() {
        let mut peers = LocalPeers::new(QueueLimits {
            messages: 100,
            bytes: 10,
        });
        let mut q = peers.register("a");
        // Twice the byte bound for server events (7 + 10 + 2): three of these fit, the fourth
        // does not.
        for _ in 0..3 {
            assert_eq!(
                Queued::Yes,
                peers.deliver("a", &frame("123456"), Class::Control)
            );
        }
        peers.deliver("a", &frame("123456"), Class::Control);
        assert!(!peers.contains("a"));
        assert!(q.recv().await.is_none());
    }

    #[tokio::test]
    async fn relayed_frames_never_disconnect_the_receiver() {
        let mut peers = LocalPeers::new(QueueLimits {
            messages: 8,
            bytes: 1024,
        });
        let mut q = peers.register("a");
        let results: Vec<Queued> = (0..20)
            .map(|_| peers.deliver("a", &frame("x"), Class::Relay))
            .collect();
        assert_eq!(results.iter().filter(|r| **r == Queued::Yes).count(), 6);
        assert!(results[6..].iter().all(|r| matches!(r, Queued::Full(_))));
        assert!(peers.contains("a"), "the receiver stays");
        // Control frames still fit in the reserved quarter.
        assert_eq!(Queued::Yes, peers.deliver("a", &frame("j"), Class::Control));
        assert_eq!(&*q.recv().await.unwrap(), "x");
    }

    #[tokio::test]
    async fn draining_frees_byte_budget() {
        let mut peers = LocalPeers::new(QueueLimits {
            messages: 100,
            bytes: 10,
        });
        let mut q = peers.register("a");
        for _ in 0..20 {
            assert_eq!(
                Queued::Yes,
                peers.deliver("a", &frame("123456"), Class::Control)
            );
            q.recv().await.unwrap();
        }
        assert!(peers.contains("a"));
    }
}
