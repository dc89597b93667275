//! The hub: the one task that owns this instance's sockets ([`LocalPeers`]), their room
//! memberships and what it knows of their rooms ([`view::RoomView`]: what each local member was
//! told, the remote members' owners, who has left), and consumes the pub/sub push channel.
//!
//! Engine calls reach it over a bounded mpsc with oneshot replies; Redis pushes arrive on a
//! bounded channel filled with `try_send` (the `ConnectionManager`'s sender must never block;
//! past the bound pushes are dropped and counted, see `build_manager`). The hub
//! never awaits anything but its two inputs and never touches Redis, so a slow client or a slow
//! Redis cannot stall routing: delivery is `LocalPeers::deliver`, which never waits.
//!
//! After any gap in the subscription (a resubscription, after a reconnect or by the watchdog,
//! also on a replaced manager; or dropped pushes) room events may have been lost: the hub marks
//! its rooms for repair and wakes the repair task (`super::repair`), which re-reads them and
//! hands the reads back; the hub then tells each local member what it missed.

mod bus;
mod events;
mod view;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot, watch, Notify};

pub(crate) use self::bus::{parse_members, Blob, Bus, Member};
use self::events::InFlight;
pub(crate) use self::view::Known;
use self::view::{Event, RoomView};
use super::Instance;
use crate::engine::EngineConfig;
use crate::peers::{Class, CloseReason, LocalPeers, PeerQueue, Queued};
use crate::protocol::Frame;

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
    /// A local member whose socket is gone (its leave is under way).
    Absent,
    Remote(String),
    /// Not known here; a lookup's result is learned only into the view of this epoch.
    Unknown {
        epoch: u64,
    },
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
    /// The rooms with a local member: the refresher keeps their keys alive.
    Rooms {
        reply: oneshot::Sender<Vec<String>>,
    },
    /// A join script succeeded with `owner` as the peer's owner; `members` is its snapshot.
    /// Replies `Err(())` when this instance was fenced meanwhile (the caller undoes the join).
    /// With `frame`, tells the other local members and returns the remote ones.
    Joined {
        room: String,
        peer: String,
        owner: String,
        members: Vec<Known>,
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
    /// `peer` left: delivers `frame` to the local `recipients`, returns the remote ones by owner.
    Left {
        room: String,
        peer: String,
        recipients: Vec<Known>,
        frame: Frame,
        reply: oneshot::Sender<Groups>,
    },
    Route {
        room: String,
        to: String,
        frame: Frame,
        reply: oneshot::Sender<Route>,
    },
    /// A lookup made after `Route` answered `Unknown { epoch }`.
    Learn {
        room: String,
        epoch: u64,
        known: Known,
    },
    /// Nobody listened on the cached owner's channel: drop the route.
    Forget {
        room: String,
        peer: String,
    },
    /// Redis lists `to` as a member of `room` owned by this instance, but the hub has not
    /// recorded the membership yet (its join is in flight): deliver if it is a local socket.
    DeliverJoining {
        room: String,
        to: String,
        frame: Frame,
        reply: oneshot::Sender<Queued>,
    },
    /// The rooms marked for repair (with their view's epoch); clears the marks.
    TakeRepairs {
        reply: oneshot::Sender<Vec<(String, u64)>>,
    },
    /// A repair read of `room`, made for the view of `epoch` (see `RoomView::repair`).
    Repair {
        room: String,
        epoch: u64,
        counter: Option<u64>,
        members: Vec<Member>,
    },
    /// Test hook: the hub serves nothing for this long, as if starved.
    Stall(std::time::Duration),
    /// A leave whose Redis part failed; the liveness task retries it.
    RetryLeave {
        peer: String,
        m: Membership,
    },
    TakeRetries {
        reply: oneshot::Sender<Vec<(String, Membership)>>,
    },
}

pub(crate) struct Hub {
    /// The instance identity; a new id means fenced (see `follow_identity`).
    instance: watch::Receiver<Instance>,
    peers: LocalPeers,
    joined: HashMap<String, Membership>,
    rooms: HashMap<String, RoomView>,
    /// Local sockets sent room events before their joins were recorded.
    inflight: HashMap<String, InFlight>,
    epochs: u64,
    /// Rooms to re-read, and the repair task's wake-up.
    pending: HashSet<String>,
    wake: Arc<Notify>,
    /// The engine's count of pushes dropped at the bound, and its value as last seen here: a
    /// change means lost pushes.
    dropped_pushes: Arc<AtomicU64>,
    dropped: u64,
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
        instance: watch::Receiver<Instance>,
        gen: Arc<AtomicU64>,
        dropped_pushes: Arc<AtomicU64>,
        last_tick: Arc<AtomicU64>,
        origin: Instant,
    ) -> Self {
        let id = instance.borrow().id.clone();
        Self {
            instance,
            peers: LocalPeers::new(config.queue),
            joined: HashMap::new(),
            rooms: HashMap::new(),
            inflight: HashMap::new(),
            epochs: 0,
            pending: HashSet::new(),
            wake: Arc::new(Notify::new()),
            dropped: dropped_pushes.load(Ordering::Relaxed),
            dropped_pushes,
            id,
            retries: Vec::new(),
            gen,
            last_tick,
            origin,
        }
    }

    /// The liveness task replaced the instance id (fenced, or its registration refused): close
    /// every socket, forget every membership, and continue as the new id. A `watch` rather than
    /// a command, so this can never be lost to a full queue or a timeout.
    fn follow_identity(&mut self) {
        let id = self.instance.borrow_and_update().id.clone();
        if id == self.id {
            return;
        }
        let closed = self.peers.close_all(CloseReason::Fenced).len();
        self.joined.clear();
        self.rooms.clear();
        self.inflight.clear();
        self.pending.clear();
        self.retries.clear();
        tracing::warn!(old = %self.id, new = %id, closed, "hub fenced: sockets closed");
        self.id = id;
        self.last_tick.store(0, Ordering::Release);
    }

    /// Notified whenever rooms are marked for repair (see `super::repair`).
    pub(crate) fn repair_wake(&self) -> Arc<Notify> {
        self.wake.clone()
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
                // Before commands and pushes: nothing is accepted under an id once replaced.
                Ok(()) = self.instance.changed() => self.follow_identity(),
                Some(cmd) = cmds.recv() => match cmd {
                    Cmd::Stall(d) => tokio::time::sleep(d).await,
                    cmd => self.command(cmd),
                },
                Some((gen, push)) = pushes.recv() => {
                    if gen == self.gen.load(Ordering::Acquire) {
                        self.push(push);
                    }
                    let dropped = self.dropped_pushes.load(Ordering::Relaxed);
                    if dropped != self.dropped {
                        self.dropped = dropped;
                        self.want_repair_all();
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
                self.inflight.remove(&peer);
                let _ = reply.send(self.joined.get(&peer).cloned());
            }
            Cmd::Count { reply } => {
                let _ = reply.send(self.peers.len());
            }
            Cmd::Rooms { reply } => {
                let _ = reply.send(self.rooms.keys().cloned().collect());
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
                let _ = reply.send(Ok(self.joined(&room, &peer, owner, members, frame)));
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
            Cmd::Left {
                room,
                peer,
                recipients,
                frame,
                reply,
            } => {
                if let Some(view) = self.rooms.get_mut(&room) {
                    view.depart(&peer);
                }
                let groups = self.fanout(&room, recipients, &Event::Left(peer), &frame);
                let _ = reply.send(groups);
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
                        Queued::Yes => Route::Delivered,
                        Queued::Absent => Route::Absent,
                    }
                } else {
                    match self.rooms.get(&room) {
                        Some(view) => match view.route(&to) {
                            Some(owner) => Route::Remote(owner.to_owned()),
                            None => Route::Unknown { epoch: view.epoch },
                        },
                        None => Route::Unknown { epoch: 0 },
                    }
                };
                let _ = reply.send(route);
            }
            Cmd::Learn { room, epoch, known } => {
                if let Some(view) = self.rooms.get_mut(&room).filter(|v| v.epoch == epoch) {
                    view.learn(&self.id, &known);
                }
            }
            Cmd::Forget { room, peer } => {
                if let Some(view) = self.rooms.get_mut(&room) {
                    view.forget_route(&peer);
                }
            }
            Cmd::DeliverJoining {
                room,
                to,
                frame,
                reply,
            } => {
                let _ = reply.send(self.deliver_member(&room, &to, &frame, Class::Relay));
            }
            Cmd::TakeRepairs { reply } => {
                let rooms = &self.rooms;
                let due = self
                    .pending
                    .drain()
                    .filter_map(|r| rooms.get(&r).map(|v| (r, v.epoch)))
                    .collect();
                let _ = reply.send(due);
            }
            Cmd::Repair {
                room,
                epoch,
                counter,
                members,
            } => self.repair(&room, epoch, counter, &members),
            Cmd::Stall(_) => {}
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
            PushKind::Disconnection => {
                // Broadcasts may be missed until the subscription is back: routes are suspect.
                for view in self.rooms.values_mut() {
                    view.clear_routes();
                }
            }
            PushKind::Subscribe => {
                // Subscribed (again): whatever was published in the gap is lost, so the rooms
                // are re-read now, after the subscription took effect.
                for view in self.rooms.values_mut() {
                    view.clear_routes();
                }
                self.want_repair_all();
            }
            _ => {}
        }
    }
}
