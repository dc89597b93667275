//! The router: this instance's sockets, their room memberships and what it knows of their rooms,
//! and the one local delivery path of both engines.
//!
//! Everything here is plain data behind one private `std::sync::Mutex`, reached only through
//! the synchronous methods of [`Router`] (the model is mini-redis's `db.rs`): no method awaits,
//! so no guard can live across an `.await`, and a socket task delivers a frame to another local
//! socket by a direct call — no task hop, no reply channel, no timer. Delivery never waits on a
//! socket: it is `LocalPeers::deliver` into a bounded queue.
//!
//! The engines keep only what is theirs: storage and atomic steps (the in-process state, Redis
//! and its scripts) and, for Redis, pub/sub. They tell the router what their storage decided
//! (a join with its member snapshot, a departure with its survivors, a repair read after a gap
//! in the subscription) and the router fans room events out to the local members it concerns,
//! returning the remote ones grouped by owning instance for the engine to publish.
//!
//! What each local member was told, the remote members' owners (the route cache) and who left
//! are in [`view::RoomView`]; room events and repairs in [`events`].

mod events;
mod view;

// foldhash (seeded per process): every relay looks its recipient up here two or three
// times, and SipHash of a 36-byte id was ~1.5 % of a burst's CPU.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use self::events::InFlight;
pub use self::events::Remote;
use self::view::RoomView;
pub use self::view::{Event, Known, Member};
use crate::peers::{
    Class, CloseReason, LocalPeers, PeerQueue, QueueLimits, Queued, RemoteSender, Space,
};
use crate::protocol::Frame;

/// A local socket's membership: the room and the instance id it joined under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub room: String,
    pub owner: String,
}

/// Remote recipients grouped by owning instance.
pub type Groups = Vec<(String, Vec<String>)>;

/// Where a relayed frame went, or must go.
#[derive(Debug)]
pub enum Route {
    Delivered,
    /// A local member whose queue has no room for relayed frames (also after waiting for it).
    Full(Space),
    /// A local member whose socket is gone (its leave is under way).
    Absent,
    /// A remote member, on this instance.
    Remote(String),
    /// Not known here; a lookup's result is learned only into the view of this epoch.
    Unknown {
        epoch: u64,
    },
}

/// The router's state; only [`Router`]'s methods touch it, each to completion under the lock.
struct Table {
    /// The instance id local members join under; a new one means fenced (see `follow`).
    id: String,
    peers: LocalPeers,
    joined: HashMap<String, Membership>,
    rooms: HashMap<String, RoomView>,
    /// Local sockets sent room events before their joins were recorded.
    inflight: HashMap<String, InFlight>,
    epochs: u64,
    /// Rooms to re-read (see `super::engine::redis::repair`).
    pending: HashSet<String>,
    /// Set when `pending` grew: the repair task is to be woken once the lock is released.
    wake: bool,
}

pub struct Router {
    table: Mutex<Table>,
    /// This instance's relay sockets (see [`crate::relay`]).
    relays: Arc<crate::relay::locals::Locals>,
    /// Wakes the repair task when rooms are marked for repair.
    repairs: Arc<Notify>,
}

impl Router {
    /// A router whose local members join under instance id `id`.
    pub fn new(id: &str, limits: QueueLimits) -> Self {
        Self {
            table: Mutex::new(Table {
                id: id.to_owned(),
                peers: LocalPeers::new(limits),
                joined: HashMap::new(),
                rooms: HashMap::new(),
                inflight: HashMap::new(),
                epochs: 0,
                pending: HashSet::new(),
                wake: false,
            }),
            repairs: Arc::new(Notify::new()),
            relays: Arc::default(),
        }
    }

    /// This instance's relay sockets.
    pub fn relays(&self) -> &Arc<crate::relay::locals::Locals> {
        &self.relays
    }

    /// Whether `owner` is the instance id local members join under.
    pub fn is_local(&self, owner: &str) -> bool {
        self.with(|t| t.id == owner)
    }

    /// Runs `f` on the table. A panic elsewhere under the lock leaves plain data behind, so a
    /// poisoned lock is used as it is rather than taking the instance down.
    fn with<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        let mut table: MutexGuard<'_, Table> = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut table);
        let wake = std::mem::take(&mut table.wake);
        drop(table);
        if wake {
            self.repairs.notify_one();
        }
        r
    }

    /// Notified whenever rooms are marked for repair.
    pub fn repair_wake(&self) -> Arc<Notify> {
        self.repairs.clone()
    }

    /// The instance id local members join under.
    pub fn id(&self) -> String {
        self.with(|t| t.id.clone())
    }

    /// This instance continues under a new id (it was fenced, or its registration refused):
    /// every socket is closed and every membership forgotten, at once and atomically, so
    /// nothing is delivered or recorded under the old id after this returns.
    pub fn follow(&self, id: &str) {
        let closed = self.with(|t| {
            if t.id == id {
                return None;
            }
            let closed = t.peers.close_all(CloseReason::Fenced).len();
            t.joined.clear();
            t.rooms.clear();
            t.inflight.clear();
            t.pending.clear();
            Some((std::mem::replace(&mut t.id, id.to_owned()), closed))
        });
        if let Some((old, closed)) = closed {
            tracing::warn!(%old, new = %id, closed, "router fenced: sockets closed");
        }
    }

    /// Registers a socket and returns the queue its task writes from.
    pub fn connect(&self, peer: &str) -> PeerQueue {
        self.with(|t| t.peers.register(peer))
    }

    /// Forgets a socket; returns its membership if it never left (the caller leaves for it).
    pub fn disconnect(&self, peer: &str) -> Option<Membership> {
        self.with(|t| {
            t.peers.remove(peer);
            t.inflight.remove(peer);
            let m = t.joined.remove(peer);
            if let Some(m) = &m {
                t.forget_local(&m.room, peer);
            }
            m
        })
    }

    /// Sockets on this instance.
    pub fn count(&self) -> usize {
        self.with(|t| t.peers.len())
    }

    /// Joined members and rooms with a local member, for `/metrics`.
    pub fn occupancy(&self) -> (usize, usize) {
        self.with(|t| (t.joined.len(), t.rooms.len()))
    }

    /// The rooms with a local member.
    pub fn rooms(&self) -> Vec<String> {
        self.with(|t| t.rooms.keys().cloned().collect())
    }

    /// The storage admitted `peer` into `room` with `owner` as its owner; `members` is the
    /// snapshot it was sent. With `frame` (a fresh join), tells the other local members and
    /// returns the remote ones. `None` when this instance was fenced meanwhile (the caller
    /// undoes the join).
    pub fn joined(
        &self,
        room: &str,
        peer: &str,
        owner: &str,
        members: Vec<Known>,
        frame: Option<Frame>,
    ) -> Option<Groups> {
        self.with(|t| {
            if owner != t.id {
                return None;
            }
            Some(t.joined(room, peer, owner.to_owned(), members, frame))
        })
    }

    /// Ends a local membership; `None` when there is none in `room` (never joined, already
    /// left, or joined before this instance was fenced).
    pub fn leaving(&self, room: &str, peer: &str) -> Option<Membership> {
        self.with(|t| {
            let m = match t.joined.get(peer) {
                Some(m) if m.room == room => t.joined.remove(peer),
                _ => None,
            };
            if m.is_some() {
                t.forget_local(room, peer);
            }
            m
        })
    }

    /// `peer` left `room`: delivers `frame` (its `peer_left`) to the local `recipients` that
    /// were told of it, and returns the remote ones by owner.
    pub fn left(&self, room: &str, peer: &str, recipients: Vec<Known>, frame: &Frame) -> Groups {
        self.with(|t| {
            if let Some(view) = t.rooms.get_mut(room) {
                view.depart(peer);
            }
            t.fanout(room, recipients, &Event::Left(peer.to_owned()), frame)
        })
    }

    /// Delivers a relayed frame to local member `to`, or says where it is to go.
    pub fn route(&self, room: &str, to: &str, frame: &Frame) -> Route {
        self.with(|t| {
            if t.joined.get(to).is_some_and(|m| m.room == room) {
                return match t.peers.deliver(to, frame, Class::Relay) {
                    Queued::Full(space) => Route::Full(space),
                    Queued::Yes | Queued::Hold(_) => Route::Delivered,
                    Queued::Absent => Route::Absent,
                };
            }
            match t.rooms.get(room) {
                Some(view) => match view.route(to) {
                    Some(owner) => Route::Remote(owner.to_owned()),
                    None => Route::Unknown { epoch: view.epoch },
                },
                None => Route::Unknown { epoch: 0 },
            }
        })
    }

    /// Like [`route`](Self::route), but a local recipient whose queue is full is waited for,
    /// up to `SPACE_WAIT` per frame: a burst at a peer that drains at network speed loses
    /// nothing, and its sender is slowed down to that speed. A frame that finds no room in
    /// time is refused (the sender is told), and so is every frame after it until that peer
    /// has caught up (see [`crate::peers::Space`]).
    pub async fn relay(&self, room: &str, to: &str, frame: &Frame) -> Route {
        // Read the clock only when there is a wait: nearly every frame finds room.
        let mut deadline = None;
        loop {
            match self.route(room, to, frame) {
                Route::Full(space) => {
                    let until = *deadline.get_or_insert_with(|| {
                        tokio::time::Instant::now() + crate::peers::SPACE_WAIT
                    });
                    if !space.wait(until).await {
                        return self.route(room, to, frame);
                    }
                }
                route => return route,
            }
        }
    }

    /// Learns a lookup made after `route` answered `Unknown { epoch }`.
    pub fn learn(&self, room: &str, epoch: u64, known: &Known) {
        self.with(|t| {
            let id = t.id.clone();
            if let Some(view) = t.rooms.get_mut(room).filter(|v| v.epoch == epoch) {
                view.learn(&id, known);
            }
        })
    }

    /// Nobody listened on the cached owner's channel: the route goes.
    pub fn forget(&self, room: &str, peer: &str) {
        self.with(|t| {
            if let Some(view) = t.rooms.get_mut(room) {
                view.forget_route(peer);
            }
        })
    }

    /// Delivers to local member `to` of `room`, also one whose join the storage has recorded
    /// but the router not yet (in flight): it is a local socket without another membership.
    pub fn deliver_member(&self, room: &str, to: &str, frame: &Frame) -> Queued {
        self.with(|t| t.deliver_member(room, to, frame, Class::Relay))
    }

    /// Counts a relay of local socket `peer` on its way to another instance (see
    /// [`crate::peers::MAX_OUTSTANDING`]).
    pub fn outstanding(&self, peer: &str) -> Option<crate::peers::Outstanding> {
        self.with(|t| t.peers.outstanding(peer))
    }

    /// Tells local member `sender` of `room` that a relay of its was not delivered elsewhere
    /// (an `error` frame), as a server event: refusals come back in packs, far faster than
    /// the relay share would take them, and each must be told. A sender that reads its socket
    /// drains them (a write takes a batch, a read one frame); one that does not read at all is
    /// cut as a slow consumer.
    pub fn tell_sender(&self, room: &str, sender: &str, frame: &Frame) {
        self.with(|t| t.deliver_member(room, sender, frame, Class::Control));
    }

    /// Frames from another instance for local members `to` of `room`: a room event (`ev`) is
    /// told to whoever has not been told it; a relayed frame (`ev` is `None`) from `from` is
    /// delivered (see [`LocalPeers::deliver_remote`](crate::peers::LocalPeers::deliver_remote)).
    pub fn deliver_remote(
        &self,
        room: &str,
        to: &[&str],
        frame: &Frame,
        ev: Option<Event>,
        from: Option<RemoteSender<'_>>,
    ) -> Remote {
        self.with(|t| t.deliver_remote(room, to, frame, ev, from))
    }

    /// A recipient elsewhere is past its relay share: local `peer` holds its reading until
    /// released, at most [`HOLD_WAIT`](crate::peers::HOLD_WAIT).
    pub fn hold(&self, peer: &str) {
        let until = tokio::time::Instant::now() + crate::peers::HOLD_WAIT;
        self.with(|t| t.peers.hold(peer, until))
    }

    /// Local `peer`'s hold is released.
    pub fn release(&self, peer: &str) {
        self.with(|t| t.peers.release(peer))
    }

    /// The subscription may have missed broadcasts (it is down, or was): routes are suspect.
    pub fn clear_routes(&self) {
        self.with(|t| {
            for view in t.rooms.values_mut() {
                view.clear_routes();
            }
        })
    }

    /// Marks every room for repair (after a gap in the subscription).
    pub fn want_repair_all(&self) {
        self.with(Table::want_repair_all)
    }

    /// The rooms marked for repair, with their views' epochs; clears the marks.
    pub fn take_repairs(&self) -> Vec<(String, u64)> {
        self.with(|t| {
            let rooms = &t.rooms;
            t.pending
                .drain()
                .filter_map(|r| rooms.get(&r).map(|v| (r, v.epoch)))
                .collect()
        })
    }

    /// A repair read of `room` (`None`: the room is gone) made for the view of `epoch`: each
    /// local member is told what it missed.
    pub fn repair(&self, room: &str, epoch: u64, counter: Option<u64>, members: &[Member]) {
        self.with(|t| t.repair(room, epoch, counter, members))
    }

    /// The session `room` was closed: closes the local sockets that are its members, by the
    /// router's record or because the storage named them in `named` (a join still in flight is
    /// not recorded here yet; peer ids are never reused, so a named local socket is that
    /// member). Each socket then leaves as usual. Returns how many were closed.
    pub fn close_room(&self, room: &str, named: &[String], reason: CloseReason) -> usize {
        self.with(|t| {
            let mut ids: Vec<String> = t
                .joined
                .iter()
                .filter(|(id, m)| m.room == room && t.peers.contains(id))
                .map(|(id, _)| id.clone())
                .collect();
            for id in named {
                let elsewhere = t.joined.get(id).is_some_and(|m| m.room != room);
                if !elsewhere && t.peers.contains(id) && !ids.contains(id) {
                    ids.push(id.clone());
                }
            }
            for id in &ids {
                t.peers.close(id, reason);
            }
            ids.len()
        })
    }

    /// Closes every local socket (shutdown).
    pub fn close_all(&self, reason: CloseReason) {
        self.with(|t| {
            t.peers.close_all(reason);
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn router() -> Arc<Router> {
        let limits = QueueLimits {
            messages: 8,
            bytes: 1 << 20,
        };
        Arc::new(Router::new("me", limits))
    }

    fn member(r: &Router, room: &str, peer: &str) -> PeerQueue {
        let q = r.connect(peer);
        let me = Known {
            id: peer.to_owned(),
            owner: "me".to_owned(),
            seq: 0,
        };
        r.joined(room, peer, "me", vec![me], None)
            .expect("not fenced");
        q
    }

    /// A queue of 8 (6 for relays) and a sender far faster than the reader: the sender is
    /// slowed to the reader's pace, nothing is refused, everything arrives in order. One thread:
    /// the reader runs whenever the sender waits, so a loaded machine cannot stretch a wait past
    /// its bound (with two workers the reader's thread could be descheduled for 100 ms).
    #[tokio::test]
    async fn a_burst_to_a_draining_peer_loses_nothing() {
        let r = router();
        let mut q = member(&r, "room", "p");
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < 2000 {
                let f = q.recv().await.expect("open");
                seen.push(f.parse::<u32>().unwrap());
                tokio::task::yield_now().await;
            }
            seen
        });
        for i in 0..2000u32 {
            let route = r.relay("room", "p", &Frame::from(i.to_string())).await;
            assert!(matches!(route, Route::Delivered), "{i}: {route:?}");
        }
        let seen = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("reader done")
            .unwrap();
        assert!(seen.iter().copied().eq(0..2000), "out of order");
    }

    /// A peer that reads nothing costs its senders one wait, not one per frame.
    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_refused_at_once_after_one_wait() {
        let r = router();
        let _q = member(&r, "room", "p");
        let start = Instant::now();
        let mut full = 0;
        for i in 0..50 {
            if let Route::Full(_) = r.relay("room", "p", &Frame::from(i.to_string())).await {
                full += 1;
            }
        }
        assert_eq!(full, 44, "6 relay slots of 8");
        // One SPACE_WAIT, not 44 of them.
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    /// A reader that takes a frame now and then (every 150 ms) cannot hold its sender to that
    /// pace: one frame waits out `SPACE_WAIT`, the rest are refused at once until it catches up
    /// (once, each frame waited again after every frame the reader took: 20 × 100 ms here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drip_reader_does_not_set_its_senders_pace() {
        let r = router();
        let mut q = member(&r, "room", "p");
        for i in 0..6 {
            assert!(matches!(
                r.route("room", "p", &Frame::from(i.to_string())),
                Route::Delivered
            ));
        }
        let dripper = tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let _ = q.try_recv();
            }
        });
        let start = Instant::now();
        for i in 0..20 {
            r.relay("room", "p", &Frame::from(i.to_string())).await;
        }
        // Paced by the drip this would take about 20 × 100 ms.
        assert!(
            start.elapsed() < Duration::from_millis(600),
            "{:?}",
            start.elapsed()
        );
        dripper.abort();
    }

    #[test]
    fn a_fence_closes_every_socket_and_refuses_joins_under_the_old_id() {
        let r = router();
        let q = member(&r, "room", "p");
        r.follow("new");
        assert_eq!(q.close_reason(), Some(CloseReason::Fenced));
        assert_eq!(r.count(), 0);
        assert!(r.rooms().is_empty());
        let _q2 = r.connect("x");
        assert!(r.joined("room", "x", "me", Vec::new(), None).is_none());
        assert!(r.joined("room", "x", "new", Vec::new(), None).is_some());
    }
}
