//! Waiting instead of refusing: a sender whose relay finds the recipient's queue full waits for
//! room ([`Space`], same instance), or is held by the recipient's instance ([`Hold`], across
//! instances, where pub/sub has no backpressure of its own). Either way a recipient that drains
//! slows its senders to its pace and loses nothing, and one that does not is refused to them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{LocalPeers, PeerShared, Queued};
use crate::protocol::Frame;

/// A full queue's promise to tell when its socket takes a frame. A sender whose frame found
/// the recipient's queue full waits on it a little, at most [`SPACE_WAIT`] per frame (a
/// recipient draining at network speed frees room within microseconds), before giving up and
/// telling the sender: the sender is slowed down, never the recipient cut off. Once a frame
/// has waited in vain, the socket counts as not keeping up, and further frames are refused at
/// once until it has emptied its queue: a reader that takes a frame now and then cannot hold
/// its senders (the host, and through it the whole room) to its own pace.
#[derive(Clone, Debug)]
pub struct Space(pub(super) Arc<PeerShared>);

/// How long a sender waits in all for a full recipient to make room for one frame: far beyond
/// what a socket writing at network speed needs (one batched write), with room for a loaded
/// machine's scheduling delays (20 ms was seen to refuse a draining reader under CI load).
pub const SPACE_WAIT: Duration = Duration::from_millis(100);

impl Space {
    /// Waits until the socket takes a frame, at most until `deadline`; false if it took none
    /// (or its queue is closed, or it has not caught up since a frame last waited in vain).
    pub async fn wait(&self, deadline: tokio::time::Instant) -> bool {
        if self.0.stalled.load(Ordering::Relaxed) {
            return false;
        }
        let notified = self.0.space.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.0.waiting.store(true, Ordering::Release);
        if self.0.close_reason().is_some() {
            return false;
        }
        let took = tokio::time::timeout_at(deadline, notified).await.is_ok();
        if !took {
            self.0.stalled.store(true, Ordering::Relaxed);
        }
        took
    }
}

/// A sender on another instance (peer id, its instance), told to hold its reading while the
/// recipient's queue is past its relay share (see [`LocalPeers::deliver_remote`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub sender: String,
    pub owner: String,
}

impl Held {
    #[cfg(test)]
    fn as_sender(&self) -> RemoteSender<'_> {
        RemoteSender {
            sender: &self.sender,
            owner: &self.owner,
        }
    }
}

/// The sender of a frame from another instance, borrowed from the message that carried it: a
/// [`Held`] is made of it only when it is held (not twice two `String`s per relayed frame).
#[derive(Clone, Copy, Debug)]
pub struct RemoteSender<'a> {
    pub sender: &'a str,
    pub owner: &'a str,
}

impl RemoteSender<'_> {
    fn is(self, held: &Held) -> bool {
        held.sender == self.sender && held.owner == self.owner
    }

    fn held(self) -> Held {
        Held {
            sender: self.sender.to_owned(),
            owner: self.owner.to_owned(),
        }
    }
}

/// Relays one socket may have waiting in the outbox for other instances: reading its next frame
/// waits below this, so one flooding socket cannot take the whole outbox (16 MiB) from every
/// other socket of its instance.
pub const MAX_OUTSTANDING: usize = 64;

/// One relay of a local socket on its way to another instance, counted against
/// [`MAX_OUTSTANDING`] until it is dropped (when the outbox is done with it, whatever the
/// outcome).
pub struct Outstanding(Arc<PeerShared>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        if self.0.outstanding.fetch_sub(1, Ordering::AcqRel) == MAX_OUTSTANDING {
            self.0.drained.notify_one();
        }
    }
}

/// Senders held for one recipient at most; more go on unheld (their frames use the slack, and
/// are refused beyond it).
const MAX_HELD: usize = 16;

/// How long a sender stays held without being released: longer than a socket task stalls in a
/// write while its kernel buffer drains (it is woken once a third of the buffer is free: with
/// 4 MiB buffered, ~650 ms at 2 MB/s), so a recipient reading some MB/s catches up in time and
/// its senders lose nothing. One that does not is not keeping up: the frames its senders send
/// after this overflow the slack and are refused (as a local sender's are after
/// [`SPACE_WAIT`]). A stuck recipient thus costs each of its senders this once, not per frame.
pub const HOLD_WAIT: Duration = Duration::from_secs(1);

/// A socket's reading held by a recipient on another instance whose queue is past its relay
/// share (see [`LocalPeers::deliver_remote`]): the socket task reads no frame from its client
/// until it is released or [`HOLD_WAIT`] has passed, so a burst across instances is slowed to
/// the recipient's pace instead of refused. It goes on writing: two peers holding each other
/// still drain.
pub struct Hold(pub(super) Arc<PeerShared>);

impl Hold {
    /// Until when reading is held, if it is.
    pub fn until(&self) -> Option<Instant> {
        if !self.0.held.load(Ordering::Acquire) {
            return None;
        }
        let mut frames = self.0.frames();
        match frames.hold_until {
            Some(until) if until > Instant::now() => Some(until),
            _ => {
                frames.hold_until = None;
                self.0.held.store(false, Ordering::Release);
                None
            }
        }
    }

    /// Whether this socket has [`MAX_OUTSTANDING`] relays waiting for other instances: then it
    /// reads nothing either, until [`drained`](Self::drained).
    pub fn at_cap(&self) -> bool {
        self.0.outstanding.load(Ordering::Acquire) >= MAX_OUTSTANDING
    }

    /// Resolves once this socket's outstanding relays fell below the cap (at once if that
    /// happened since the last check: `notify_one` keeps a permit).
    pub async fn drained(&self) {
        self.0.drained.notified().await;
    }

    /// Resolves when the hold is released or `until` (from [`Hold::until`]) has passed; at once
    /// when there is no hold. Taking the `Option` spares the socket loop, which builds this
    /// future on every turn, a clock read for a placeholder instant.
    pub async fn lifted(&self, until: Option<Instant>) {
        let Some(until) = until else { return };
        // `notify_one` leaves a permit: a release since `until()` is not missed.
        let _ = tokio::time::timeout_at(until, self.0.released.notified()).await;
    }
}

impl LocalPeers {
    /// Counts a relay of local socket `peer` on its way to another instance (`None` when the
    /// socket is gone).
    pub fn outstanding(&mut self, peer: &str) -> Option<Outstanding> {
        let shared = self.live(peer)?;
        shared.outstanding.fetch_add(1, Ordering::AcqRel);
        Some(Outstanding(shared))
    }

    /// Queues a relayed frame from `from` on another instance for `peer`. Pub/sub has no
    /// backpressure, so a frame past the relay share is still queued, up to the slack (the
    /// frames in flight until the sender holds: `SLACK_QUEUES`), and the sender is to be held
    /// ([`Queued::Hold`], once per sender until released). Beyond that slack, or while the
    /// queue is stalled, it is refused like a local one.
    pub fn deliver_remote(
        &mut self,
        peer: &str,
        frame: &Frame,
        from: Option<RemoteSender<'_>>,
    ) -> Queued {
        let Some(shared) = self.live(peer) else {
            return Queued::Absent;
        };
        let (share_messages, share_bytes) = self.relay_share();
        let mut frames = shared.frames();
        let outcome = if frames.fits(frame, share_messages, share_bytes) {
            Queued::Yes
        } else if !shared.stalled.load(Ordering::Relaxed) && {
            let (messages, bytes) = self.slack();
            frames.fits(frame, messages, bytes)
        } {
            // Once per sender until released: a recipient that makes its senders wait must
            // catch up (back within its share) before it can make them wait again, so one that
            // takes a frame now and then costs each sender one hold, not one per frame.
            match from {
                Some(from)
                    if frames.held.len() < MAX_HELD && !frames.held.iter().any(|h| from.is(h)) =>
                {
                    let held = from.held();
                    frames.held.push(held.clone());
                    frames.release_at = share_messages;
                    Queued::Hold(held)
                }
                _ => Queued::Yes,
            }
        } else {
            shared.stalled.store(true, Ordering::Relaxed);
            return Queued::Full(Space(shared.clone()));
        };
        frames.push(frame);
        drop(frames);
        shared.ready.notify_one();
        outcome
    }

    /// Holds local `peer`'s reading for a recipient elsewhere (see [`Hold`]).
    pub fn hold(&mut self, peer: &str, until: Instant) {
        if let Some(slot) = self.slots.get(peer) {
            slot.shared.frames().hold_until = Some(until);
            slot.shared.held.store(true, Ordering::Release);
        }
    }

    /// Releases local `peer`'s hold.
    pub fn release(&mut self, peer: &str) {
        if let Some(slot) = self.slots.get(peer) {
            slot.shared.frames().hold_until = None;
            slot.shared.held.store(false, Ordering::Release);
            slot.shared.released.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::{Class, QueueLimits, SLACK_QUEUES};

    fn held(sender: &str) -> Held {
        Held {
            sender: sender.into(),
            owner: "elsewhere".into(),
        }
    }

    /// Frames from elsewhere past the relay share (6 of 8) are queued up to the slack (16
    /// queues' frames), each sender is to hold once, and all are released once the queue is back
    /// within its share; past the slack they are refused and the queue counts as stalled.
    #[tokio::test]
    async fn frames_from_elsewhere_use_the_slack_and_hold_their_senders_once() {
        let mut peers = LocalPeers::new(QueueLimits {
            messages: 8,
            bytes: 1 << 20,
        });
        let mut q = peers.register("r");
        let (a, b) = (held("a"), held("b"));
        let f = Frame::from("x");
        let mut holds = Vec::new();
        // The relay share (6), then the slack (16 queues of 8).
        let fill = 6 + SLACK_QUEUES * 8;
        for i in 0..fill {
            let from = if i % 2 == 0 { &a } else { &b };
            match peers.deliver_remote("r", &f, Some(from.as_sender())) {
                Queued::Yes => {}
                Queued::Hold(h) => holds.push(h),
                other => panic!("frame {i}: {other:?}"),
            }
        }
        assert_eq!(holds, vec![a.clone(), b.clone()], "each sender held once");
        assert!(matches!(
            peers.deliver_remote("r", &f, Some(a.as_sender())),
            Queued::Full(_)
        ));
        // Stalled: a local relay is refused at once too, and waits for nothing.
        let Queued::Full(space) = peers.deliver("r", &f, Class::Relay) else {
            panic!("a local relay fits in a stalled, full queue");
        };
        assert!(!space.wait(Instant::now() + SPACE_WAIT).await);
        // Nobody is released until the queue is back within its share (6).
        for _ in 0..fill - 7 {
            q.try_recv().unwrap();
            assert!(q.released(false).is_empty());
        }
        q.try_recv().unwrap();
        assert_eq!(q.released(false), vec![a, b]);
        assert!(q.released(true).is_empty(), "released once");
    }

    /// A socket's relays on their way elsewhere are counted until the outbox drops them; at
    /// the cap its reading waits, and the first one done wakes it.
    #[tokio::test]
    async fn outstanding_relays_cap_reading_until_one_is_done() {
        let mut peers = LocalPeers::new(QueueLimits {
            messages: 8,
            bytes: 1024,
        });
        let q = peers.register("s");
        let hold = q.hold();
        let mut out: Vec<Outstanding> = (0..MAX_OUTSTANDING - 1)
            .map(|_| peers.outstanding("s").unwrap())
            .collect();
        assert!(!hold.at_cap());
        out.push(peers.outstanding("s").unwrap());
        assert!(hold.at_cap());
        out.pop();
        assert!(!hold.at_cap());
        tokio::time::timeout(Duration::from_secs(1), hold.drained())
            .await
            .expect("the relay that left the cap woke the socket");
        assert!(peers.outstanding("gone").is_none());
    }

    /// A held socket's hold ends when released, or when it runs out.
    #[tokio::test]
    async fn a_hold_lifts_when_released_or_timed_out() {
        let mut peers = LocalPeers::new(QueueLimits {
            messages: 8,
            bytes: 1024,
        });
        let q = peers.register("s");
        let hold = q.hold();
        assert_eq!(hold.until(), None);
        let until = Instant::now() + Duration::from_secs(30);
        peers.hold("s", until);
        assert_eq!(hold.until(), Some(until));
        peers.release("s");
        tokio::time::timeout(Duration::from_secs(1), hold.lifted(Some(until)))
            .await
            .expect("a release wakes the held socket");
        assert_eq!(hold.until(), None);
        let soon = Instant::now() + Duration::from_millis(20);
        peers.hold("s", soon);
        hold.lifted(Some(soon)).await;
        assert_eq!(hold.until(), None, "ran out");
    }
}
