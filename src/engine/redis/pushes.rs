//! What arrives on this instance's channel, handled where it arrives: the `ConnectionManager`
//! calls [`Pushes::handle`] for every push, and each is dispatched to the router at once
//! (synchronous, never waiting: delivery is into bounded queues), so there is no push queue to
//! fall behind, no task hop and nothing to drop.
//!
//! After any gap in the subscription (a resubscription after a reconnect or by the watchdog,
//! also on a replaced manager) room events may have been lost: the router marks its rooms for
//! repair and wakes the repair task (`super::repair`). A relayed frame a local member cannot
//! take is reported back to its sender's instance (`Bus::Refused`) by the reporter task, so
//! every undeliverable message is told to its sender, wherever it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, watch};

use super::bus::{decode, encode, encode_raw, Body, Bus};
use super::Inner;
use crate::peers::CloseReason;
use crate::protocol::ServerMessage;
use crate::relay::Piece;
use crate::router::{Event, Known, Router};

/// Refusal reports waiting for the reporter at most; beyond it they are dropped and counted
/// (a flood of refusals is a flood of frames at a full queue: the flooder's own messages).
const REPORTS: usize = 1024;

/// A refusal to publish: the sender's instance, and the bus message.
type Report = (String, Vec<u8>);

pub(crate) struct Pushes {
    router: Arc<Router>,
    /// Generation of the current `ConnectionManager`; pushes of older ones are ignored.
    gen: Arc<AtomicU64>,
    /// Milliseconds since `origin` when our own tick last arrived (0 = never).
    last_tick: Arc<AtomicU64>,
    origin: Instant,
    reports: mpsc::Sender<Report>,
    lost_reports: AtomicU64,
}

impl Pushes {
    pub(crate) fn new(
        router: Arc<Router>,
        gen: Arc<AtomicU64>,
        last_tick: Arc<AtomicU64>,
        origin: Instant,
    ) -> (Arc<Pushes>, mpsc::Receiver<Report>) {
        let (reports, rx) = mpsc::channel(REPORTS);
        let pushes = Pushes {
            router,
            gen,
            last_tick,
            origin,
            reports,
            lost_reports: AtomicU64::new(0),
        };
        (Arc::new(pushes), rx)
    }

    /// One push of the manager of generation `gen`.
    pub(crate) fn handle(&self, gen: u64, push: PushInfo) {
        if gen != self.gen.load(Ordering::Acquire) {
            return;
        }
        match push.kind {
            PushKind::Message => {
                let Some(Value::BulkString(payload)) = push.data.into_iter().nth(1) else {
                    return;
                };
                match decode(payload) {
                    Some((bus, body)) => self.bus(bus, body),
                    None => {
                        crate::metrics::push_dropped("unparsable");
                        tracing::warn!("unparsable bus message ignored");
                    }
                }
            }
            // Broadcasts may be missed until the subscription is back: routes are suspect.
            PushKind::Disconnection => {
                crate::metrics::pubsub_disconnected();
                self.router.clear_routes();
            }
            PushKind::Subscribe => {
                // Subscribed (again): whatever was published in the gap is lost, so the rooms
                // are re-read now, after the subscription took effect.
                crate::metrics::pubsub_resubscribed();
                self.router.clear_routes();
                self.router.want_repair_all();
            }
            _ => {}
        }
    }

    fn bus(&self, bus: Bus, body: Body) {
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
            Bus::Deliver {
                room,
                to,
                joined,
                joined_seq,
                left,
                from,
            } => {
                let Some(frame) = frame else { return };
                let ev = match (left, joined) {
                    (Some(left), _) => Some(Event::Left(left)),
                    (None, Some((id, owner))) => Some(Event::Joined(Known {
                        id,
                        owner,
                        seq: joined_seq.unwrap_or(0),
                    })),
                    (None, None) => None,
                };
                let relayed = ev.is_none();
                let refused = self.router.deliver_remote(&room, &to, &frame, ev);
                if let (true, Some((sender, owner))) = (relayed, from) {
                    for (peer, full) in refused {
                        crate::metrics::relay_error(if full {
                            "recipient_full"
                        } else {
                            "not_member"
                        });
                        self.report(&owner, &room, &sender, &peer, full);
                    }
                }
            }
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
                // The sender's own queue: if it is full too, the sender is not reading.
                self.router.deliver_member(&room, &to, &frame);
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
            // Through the reporter, like refusals: this handler never waits.
            let _ = self.reports.try_send((from.owner, encode_raw(&bus, &[])));
        }
    }

    fn report(&self, owner: &str, room: &str, sender: &str, peer: &str, full: bool) {
        let bus = Bus::Refused {
            room: room.to_owned(),
            to: sender.to_owned(),
            peer: peer.to_owned(),
            full,
        };
        if self
            .reports
            .try_send((owner.to_owned(), encode(&bus, None)))
            .is_err()
            && {
                crate::metrics::push_dropped("report_backlog_full");
                true
            }
            && self
                .lost_reports
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(1000)
        {
            tracing::warn!("refusal reports backlog full: dropping reports");
        }
    }
}

/// What a sender is told of a relayed frame that was not delivered.
pub(crate) fn refusal(peer: &str, full: bool) -> String {
    if full {
        format!("peer {peer} is not keeping up; message dropped")
    } else {
        format!("peer {peer} is not in this session")
    }
}

/// Publishes the refusal reports to the senders' instances (each bounded by the call timeout).
pub(crate) async fn reporter(
    inner: Arc<Inner>,
    mut reports: mpsc::Receiver<Report>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (owner, payload) = tokio::select! {
            _ = stop.changed() => return,
            r = reports.recv() => match r {
                Some(r) => r,
                None => return,
            },
        };
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(inner.keys.channel(&owner)).arg(payload);
        if let Err(e) = inner.query::<i64>(&cmd).await {
            tracing::debug!(%owner, error = %e, "refusal report not published");
        }
    }
}
