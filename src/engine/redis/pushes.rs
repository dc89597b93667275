//! What arrives on this instance's channel, handled where it arrives: the connection calls
//! [`Pushes::handle`] for every push, and each is dispatched to the router at once
//! (synchronous, never waiting: delivery is into bounded queues), so there is no push queue to
//! fall behind, no task hop and nothing to drop.
//!
//! After any gap in the subscription (a resubscription after a reconnect or by the watchdog,
//! also on a replaced manager) room events may have been lost: the router marks its rooms for
//! repair and wakes the repair task (`super::repair`). A relayed frame a local member cannot
//! take is reported back to its sender's instance (`Bus::Refused`) through the outbox, so
//! every undeliverable message is told to its sender, wherever it is; so are the holds and
//! releases of senders elsewhere (`crate::peers::Hold`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use redis::{PushInfo, PushKind, Value};

use super::bus::{decode, encode, encode_raw, unpack, Body, Bus, Deliver};
use super::keys::Keys;
use super::outbox::Outbox;
use crate::peers::{CloseReason, Held, RemoteSender};
use crate::protocol::ServerMessage;
use crate::relay::Piece;
use crate::router::{Event, Known, Router};

pub(crate) struct Pushes {
    router: Arc<Router>,
    /// Generation of the current connection; pushes of older ones are ignored.
    gen: Arc<AtomicU64>,
    /// Milliseconds since `origin` when our own tick last arrived (0 = never).
    last_tick: Arc<AtomicU64>,
    origin: Instant,
    keys: Keys,
    outbox: Arc<Outbox>,
    lost_reports: AtomicU64,
    /// Redis ended our shard subscription (its slot moved to another node): the liveness task
    /// subscribes again at once, where the slot is now.
    pub(crate) unsubscribed: tokio::sync::Notify,
}

impl Pushes {
    pub(crate) fn new(
        router: Arc<Router>,
        gen: Arc<AtomicU64>,
        last_tick: Arc<AtomicU64>,
        origin: Instant,
        keys: Keys,
        outbox: Arc<Outbox>,
    ) -> Arc<Pushes> {
        Arc::new(Pushes {
            router,
            gen,
            last_tick,
            origin,
            keys,
            outbox,
            lost_reports: AtomicU64::new(0),
            unsubscribed: tokio::sync::Notify::new(),
        })
    }

    /// One push of the manager of generation `gen`.
    pub(crate) fn handle(&self, gen: u64, push: PushInfo) {
        if gen != self.gen.load(Ordering::Acquire) {
            return;
        }
        match push.kind {
            // A plain channel's message, or a shard channel's (in a cluster).
            PushKind::Message | PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                    (data.next(), data.next())
                else {
                    return;
                };
                let payload = Bytes::from(payload);
                if !self.keys.is_bus(&channel) {
                    return self.message(payload);
                }
                match unpack(payload) {
                    Some(messages) => messages.into_iter().for_each(|m| self.message(m)),
                    None => unparsable(),
                }
            }
            // Broadcasts may be missed until the subscription is back: routes are suspect.
            PushKind::Disconnection => {
                crate::metrics::pubsub_disconnected();
                self.router.clear_routes();
            }
            PushKind::Subscribe | PushKind::SSubscribe => {
                // Subscribed (again): whatever was published in the gap is lost, so the rooms
                // are re-read now, after the subscription took effect.
                crate::metrics::pubsub_resubscribed();
                self.router.clear_routes();
                self.router.want_repair_all();
            }
            // Our current channel, unasked (its slot moved): deaf until subscribed again where
            // the slot went. (We unsubscribe only ids we left, and at shutdown.)
            PushKind::SUnsubscribe => {
                let ours = self.keys.bus(&self.router.id());
                if push.data.first() == Some(&Value::BulkString(ours.into_bytes())) {
                    tracing::info!(
                        "Redis ended our shard subscription (slot moved): subscribing again"
                    );
                    crate::metrics::pubsub_disconnected();
                    self.router.clear_routes();
                    self.unsubscribed.notify_one();
                }
            }
            _ => {}
        }
    }

    fn message(&self, payload: Bytes) {
        match decode(&payload) {
            Some((bus, body)) => self.bus(bus, body),
            None => unparsable(),
        }
    }

    fn bus(&self, bus: Bus<'_>, body: Body) {
        let frame = match body {
            Body::Frame(f) => Some(f),
            Body::None => None,
            Body::Raw(raw) => {
                if let Bus::Relay { to, p, from, n } = bus {
                    self.relay(&to, &p, from.as_deref(), n, raw);
                }
                return;
            }
        };
        match bus {
            Bus::Relay { .. } => {}
            Bus::Tick { id } => {
                if id == self.router.id() {
                    let ms = self.origin.elapsed().as_millis() as u64;
                    self.last_tick.store(ms.max(1), Ordering::Release);
                }
            }
            Bus::Deliver(Deliver {
                room,
                to,
                joined,
                joined_seq,
                left,
                from,
            }) => {
                let Some(frame) = frame else { return };
                let ev = match (left, joined) {
                    (Some(left), _) => Some(Event::Left(left.to_owned())),
                    (None, Some((id, owner))) => Some(Event::Joined(Known {
                        id: id.to_owned(),
                        owner: owner.to_owned(),
                        seq: joined_seq.unwrap_or(0),
                    })),
                    (None, None) => None,
                };
                let from = from
                    .filter(|_| ev.is_none())
                    .map(|(sender, owner)| RemoteSender { sender, owner });
                let out = self.router.deliver_remote(room, &to, &frame, ev, from);
                if let Some(from) = from {
                    for (peer, full) in out.refused {
                        crate::metrics::relay_error(if full {
                            "recipient_full"
                        } else {
                            "not_member"
                        });
                        self.report(from.owner, room, from.sender, &peer, full);
                    }
                }
                for held in out.holds {
                    self.tell(&held.owner, Bus::Hold { to: held.sender });
                }
            }
            Bus::Hold { to } => {
                crate::metrics::sender_held();
                self.router.hold(&to);
            }
            Bus::Release { to } => self.router.release(&to),
            Bus::Close { room, peers } => {
                let closed = self
                    .router
                    .close_room(&room, &peers, CloseReason::SessionClosed);
                tracing::info!(session = %room, closed, "session closed by the operator");
            }
            Bus::Refused {
                room,
                to,
                peer,
                full,
            } => {
                let message = refusal(&peer, full);
                let frame = ServerMessage::error(message).to_frame();
                self.router.tell_sender(&room, &to, &frame);
            }
        }
    }

    /// A relay piece for a local relay socket. An offer nobody here takes (the held socket went)
    /// is declined, so the joiner pairs again; any other piece for a gone socket is dropped: its
    /// partner learns of the end from the room (`peer_left`).
    fn relay(&self, to: &str, p: &str, from: Option<&str>, n: Option<u32>, raw: Bytes) {
        let Some(piece) = super::relay::piece(p, from, n, raw) else {
            crate::metrics::push_dropped("unparsable");
            return;
        };
        let answer = match &piece {
            Piece::Offer { from } => Some((from.clone(), "declined")),
            _ => None,
        };
        if self.router.relays().deliver(to, piece) {
            return;
        }
        if let Some((from, p)) = answer {
            let bus = Bus::Relay {
                to: from.socket.clone(),
                p: p.to_owned(),
                from: None,
                n: None,
            };
            // Through the outbox, like refusals: this handler never waits.
            self.post(&from.owner, encode_raw(&bus, &[]));
        }
    }

    fn report(&self, owner: &str, room: &str, sender: &str, peer: &str, full: bool) {
        let bus = Bus::Refused {
            room: room.to_owned(),
            to: sender.to_owned(),
            peer: peer.to_owned(),
            full,
        };
        self.tell(owner, bus);
    }

    /// Releases senders elsewhere held for a local socket (see [`crate::peers::Hold`]).
    pub(crate) fn release(&self, held: Vec<Held>) {
        for held in held {
            self.tell(&held.owner, Bus::Release { to: held.sender });
        }
    }

    /// Publishes `bus` to instance `owner` through the outbox: this handler never waits.
    /// A lost hold or release costs at most [`crate::peers::HOLD_WAIT`] of a sender's time.
    fn tell(&self, owner: &str, bus: Bus<'_>) {
        self.post(owner, encode(&bus, None));
    }

    /// Queues a report; a full outbox drops it (counted): a flood of refusals is a flood of
    /// frames at a full queue, the flooder's own messages.
    fn post(&self, owner: &str, payload: Vec<u8>) {
        if !self.outbox.post(owner.to_owned(), payload)
            && {
                crate::metrics::push_dropped("report_backlog_full");
                true
            }
            && self
                .lost_reports
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(1000)
        {
            tracing::warn!("outbox full: dropping refusal reports");
        }
    }
}

fn unparsable() {
    crate::metrics::push_dropped("unparsable");
    tracing::warn!("unparsable bus message ignored");
}

/// What a sender is told of a relayed frame that was not delivered.
pub(crate) fn refusal(peer: &str, full: bool) -> String {
    if full {
        format!("peer {peer} is not keeping up; message dropped")
    } else {
        format!("peer {peer} is not in this session")
    }
}
