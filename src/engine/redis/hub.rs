//! The hub: the one task that owns this instance's sockets ([`LocalPeers`]), their room
//! memberships and the peer→owner cache, and consumes the pub/sub push channel.
//!
//! Engine calls reach it over a bounded mpsc with oneshot replies; Redis pushes arrive on a
//! bounded channel filled with `try_send` (the `ConnectionManager`'s sender must never block;
//! past the bound pushes are dropped and counted, see `build_manager`). The hub
//! never awaits anything but its two inputs and never touches Redis, so a slow client or a slow
//! Redis cannot stall routing: delivery is `LocalPeers::deliver`, which never waits.

mod bus;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot, watch};

pub(crate) use self::bus::{parse_members, Blob, Bus, Member};
use crate::engine::EngineConfig;
use crate::peers::{Class, CloseReason, LocalPeers, PeerQueue, Queued};
use crate::protocol::Frame;

/// Remote owners remembered per room at most; beyond it sends fall back to a Redis lookup.
const MAX_CACHED_PER_ROOM: usize = 1024;

/// A local socket's membership: the room and the instance id it joined under.
#[derive(Clone, Debug)]
pub(crate) struct Membership {
    pub room: String,
    pub owner: String,
}

/// Remote recipients grouped by owning instance.
pub(crate) type Groups = Vec<(String, Vec<String>)>;

pub(crate) enum Route {
    Delivered,
    /// A local member whose queue has no room for relayed frames.
    Full,
    Remote(String),
    Unknown,
}

pub(crate) enum Cmd {
    Connect {
        peer: String,
        reply: oneshot::Sender<PeerQueue>,
    },
    /// Forgets the socket; replies with its membership if it never left.
    Disconnect {
        peer: String,
        reply: oneshot::Sender<Option<Membership>>,
    },
    Count {
        reply: oneshot::Sender<usize>,
    },
    /// A join script succeeded with `owner` as the peer's owner. Replies `Err(())` when this
    /// instance was fenced meanwhile (the caller undoes the join). With `frame`, tells the
    /// other local members and returns the remote ones.
    Joined {
        room: String,
        peer: String,
        owner: String,
        members: Vec<(String, String)>,
        frame: Option<Frame>,
        reply: oneshot::Sender<Result<Groups, ()>>,
    },
    /// Ends a local membership; `None` when there is none in `room` (never joined, already
    /// left, or joined before this instance was fenced).
    Leaving {
        room: String,
        peer: String,
        reply: oneshot::Sender<Option<Membership>>,
    },
    /// Delivers `frame` to the local `recipients` and returns the remote ones by owner.
    Fanout {
        room: String,
        recipients: Vec<(String, String)>,
        frame: Frame,
        left: Option<String>,
        reply: oneshot::Sender<Groups>,
    },
    Route {
        room: String,
        to: String,
        frame: Frame,
        reply: oneshot::Sender<Route>,
    },
    Learn {
        room: String,
        peer: String,
        owner: String,
    },
    /// Redis lists `to` as a member of `room` owned by this instance, but the hub has not
    /// recorded the membership yet (its join is in flight): deliver if it is a local socket.
    DeliverJoining {
        room: String,
        to: String,
        frame: Frame,
        reply: oneshot::Sender<Queued>,
    },
    /// This instance was written off: close every socket, forget every membership, and
    /// continue as `new_id`.
    Fence {
        new_id: String,
        reply: oneshot::Sender<usize>,
    },
    /// A leave whose Redis part failed; the liveness task retries it.
    RetryLeave {
        peer: String,
        m: Membership,
    },
    TakeRetries {
        reply: oneshot::Sender<Vec<(String, Membership)>>,
    },
}

#[derive(Default)]
struct RoomCache {
    local: HashSet<String>,
    /// Remote member → owner. Trusted only while `local` is non-empty: that is exactly when
    /// this instance receives the room's peer_joined/peer_left broadcasts.
    remote: HashMap<String, String>,
}

pub(crate) struct Hub {
    peers: LocalPeers,
    joined: HashMap<String, Membership>,
    rooms: HashMap<String, RoomCache>,
    id: String,
    retries: Vec<(String, Membership)>,
    /// Generation of the current `ConnectionManager`; pushes of older ones are ignored.
    gen: Arc<AtomicU64>,
    /// Milliseconds since `origin` when our own tick last arrived (0 = never).
    last_tick: Arc<AtomicU64>,
    origin: Instant,
}

impl Hub {
    pub(crate) fn new(
        config: &EngineConfig,
        id: String,
        gen: Arc<AtomicU64>,
        last_tick: Arc<AtomicU64>,
        origin: Instant,
    ) -> Self {
        Self {
            peers: LocalPeers::new(config.queue),
            joined: HashMap::new(),
            rooms: HashMap::new(),
            id,
            retries: Vec::new(),
            gen,
            last_tick,
            origin,
        }
    }

    pub(crate) async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut pushes: mpsc::Receiver<(u64, PushInfo)>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                Some(cmd) = cmds.recv() => self.command(cmd),
                Some((gen, push)) = pushes.recv() => {
                    if gen == self.gen.load(Ordering::Acquire) {
                        self.push(push);
                    }
                }
                else => break,
            }
        }
        self.peers.close_all(CloseReason::GoingAway);
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Connect { peer, reply } => {
                let _ = reply.send(self.peers.register(&peer));
            }
            Cmd::Disconnect { peer, reply } => {
                self.peers.remove(&peer);
                let _ = reply.send(self.joined.get(&peer).cloned());
            }
            Cmd::Count { reply } => {
                let _ = reply.send(self.peers.len());
            }
            Cmd::Joined {
                room,
                peer,
                owner,
                members,
                frame,
                reply,
            } => {
                if owner != self.id {
                    let _ = reply.send(Err(()));
                    return;
                }
                self.joined.insert(
                    peer.clone(),
                    Membership {
                        room: room.clone(),
                        owner,
                    },
                );
                self.rooms
                    .entry(room.clone())
                    .or_default()
                    .local
                    .insert(peer.clone());
                let others: Vec<(String, String)> =
                    members.into_iter().filter(|(id, _)| *id != peer).collect();
                let groups = match frame {
                    Some(frame) => self.fanout(&room, others, &frame),
                    None => {
                        self.learn_all(&room, &others);
                        Vec::new()
                    }
                };
                let _ = reply.send(Ok(groups));
            }
            Cmd::Leaving { room, peer, reply } => {
                let m = match self.joined.get(&peer) {
                    Some(m) if m.room == room => self.joined.remove(&peer),
                    _ => None,
                };
                if m.is_some() {
                    self.forget_local(&room, &peer);
                }
                let _ = reply.send(m);
            }
            Cmd::Fanout {
                room,
                recipients,
                frame,
                left,
                reply,
            } => {
                if let Some(left) = left {
                    self.forget_remote(&room, &left);
                }
                let _ = reply.send(self.fanout(&room, recipients, &frame));
            }
            Cmd::Route {
                room,
                to,
                frame,
                reply,
            } => {
                let route = if self.joined.get(&to).is_some_and(|m| m.room == room) {
                    match self.peers.deliver(&to, &frame, Class::Relay) {
                        Queued::Full => Route::Full,
                        Queued::Yes | Queued::Absent => Route::Delivered,
                    }
                } else if let Some(owner) = self.rooms.get(&room).and_then(|r| r.remote.get(&to)) {
                    Route::Remote(owner.clone())
                } else {
                    Route::Unknown
                };
                let _ = reply.send(route);
            }
            Cmd::Learn { room, peer, owner } => self.learn_all(&room, &[(peer, owner)]),
            Cmd::DeliverJoining {
                room,
                to,
                frame,
                reply,
            } => {
                let _ = reply.send(self.deliver_member(&room, &to, &frame, Class::Relay));
            }
            Cmd::Fence { new_id, reply } => {
                let closed = self.peers.close_all(CloseReason::Fenced);
                self.joined.clear();
                self.rooms.clear();
                self.retries.clear();
                self.id = new_id;
                self.last_tick.store(0, Ordering::Release);
                let _ = reply.send(closed.len());
            }
            Cmd::RetryLeave { peer, m } => {
                if m.owner == self.id {
                    self.retries.push((peer, m));
                }
            }
            Cmd::TakeRetries { reply } => {
                let _ = reply.send(std::mem::take(&mut self.retries));
            }
        }
    }

    /// Delivers to the recipients owned by this instance, caches the others' owners and
    /// returns them grouped by owner.
    fn fanout(&mut self, room: &str, recipients: Vec<(String, String)>, frame: &Frame) -> Groups {
        self.learn_all(room, &recipients);
        let mut groups: HashMap<String, Vec<String>> = HashMap::new();
        for (peer, owner) in recipients {
            if owner == self.id {
                self.deliver_member(room, &peer, frame, Class::Control);
            } else {
                groups.entry(owner).or_default().push(peer);
            }
        }
        groups.into_iter().collect()
    }

    /// Delivers to a local socket that Redis lists as a member of `room` owned by this
    /// instance. That is a recorded membership, or a join in flight: its script has run, but
    /// its `Joined` has not reached the hub yet, and a broadcast or signal computed from the
    /// script's member list (e.g. a concurrent joiner's `peer_joined`) can overtake it. Such a
    /// frame is queued behind nothing: the socket writes `join_success` before its queue.
    fn deliver_member(&mut self, room: &str, peer: &str, frame: &Frame, class: Class) -> Queued {
        let ok = match self.joined.get(peer) {
            Some(m) => m.room == room,
            None => self.peers.contains(peer),
        };
        if ok {
            self.peers.deliver(peer, frame, class)
        } else {
            Queued::Absent
        }
    }

    fn learn_all(&mut self, room: &str, members: &[(String, String)]) {
        let id = &self.id;
        if let Some(cache) = self.rooms.get_mut(room) {
            for (peer, owner) in members {
                if owner != id
                    && (cache.remote.len() < MAX_CACHED_PER_ROOM || cache.remote.contains_key(peer))
                {
                    cache.remote.insert(peer.clone(), owner.clone());
                }
            }
        }
    }

    fn forget_remote(&mut self, room: &str, peer: &str) {
        if let Some(cache) = self.rooms.get_mut(room) {
            cache.remote.remove(peer);
        }
    }

    fn forget_local(&mut self, room: &str, peer: &str) {
        if let Some(cache) = self.rooms.get_mut(room) {
            cache.local.remove(peer);
            if cache.local.is_empty() {
                // No more broadcasts for this room reach us: the cache would go stale.
                self.rooms.remove(room);
            }
        }
    }

    fn push(&mut self, push: PushInfo) {
        match push.kind {
            PushKind::Message => {
                let Some(Value::BulkString(payload)) = push.data.get(1) else {
                    return;
                };
                match serde_json::from_slice::<Bus>(payload) {
                    Ok(bus) => self.bus(bus),
                    Err(e) => tracing::warn!(error = %e, "unparsable bus message ignored"),
                }
            }
            PushKind::Disconnection | PushKind::Subscribe => {
                // Broadcasts may have been missed during the gap: owner caches are suspect.
                for cache in self.rooms.values_mut() {
                    cache.remote.clear();
                }
            }
            _ => {}
        }
    }

    fn bus(&mut self, bus: Bus) {
        match bus {
            Bus::Tick { id } => {
                if id == self.id {
                    let ms = self.origin.elapsed().as_millis() as u64;
                    self.last_tick.store(ms.max(1), Ordering::Release);
                }
            }
            Bus::Deliver {
                room,
                to,
                frame,
                joined,
                left,
            } => {
                // Room events are control frames; anything else was relayed for a client.
                let class = if joined.is_some() || left.is_some() {
                    Class::Control
                } else {
                    Class::Relay
                };
                if let Some(left) = left {
                    self.forget_remote(&room, &left);
                }
                if let Some(j) = joined {
                    self.learn_all(&room, &[j]);
                }
                let frame = Frame::from(frame);
                for peer in to {
                    // A relayed frame refused here (full queue) cannot be reported to its
                    // sender on the other instance yet: see docs/security.md.
                    self.deliver_member(&room, &peer, &frame, class);
                }
            }
        }
    }
}
