//! One WebSocket connection (protocol.md §4): join, relay, keep-alive, leave.
//!
//! Each socket is served by exactly one task, the one axum runs for the upgrade, so the
//! connection's state is owned, never shared, and ends with it. The task reads client frames,
//! writes frames queued for it by the engine (bounded; see [`crate::peers`]), pings, and on any
//! ending (close, TCP reset, silence, slow consumer, drain) leaves the room so the others get
//! `peer_left` — unless it never joined, in which case nobody hears of it. This module is the
//! connection's life (upgrade, pacing, the loop, the ending); what its frames do is in
//! [`messages`].

mod budget;
mod end;
mod messages;
mod upgrade;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::json;
use tracing::Instrument;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::Message;

use crate::client::client_ip;
use crate::engine::Engine;
use crate::http::App;
use crate::peers::{CloseReason, PeerQueue};
use crate::protocol::{new_id, valid_id, Frame, ServerMessage};
use crate::shutdown::Phase;

/// Bounds on what a client may attach to its PeerInfo.
const MAX_TRANSPORTS: usize = 16;
const MAX_METADATA_KEYS: usize = 32;
const MAX_METADATA_LEN: usize = 1024;
/// Members a room may have beyond `--max-room-peers` when they join through the host token (a
/// host reconnecting while its old sockets linger).
pub const HOST_SLOTS: usize = 4;
/// A member's PeerInfo, serialized, at most: a room's member list (`join_success`) is then at
/// most `max_room_peers` times this, whatever its members sent.
pub const MAX_PEER_INFO_BYTES: usize = 4096;
/// `error` replies to bad frames per socket per window; further bad frames are dropped
/// silently, so a client that streams garbage (e.g. the generation-2 fallback socket) gets no
/// error storm back. A relay that was not delivered is always reported (see `report`).
const ERROR_BURST: u32 = 5;
const ERROR_WINDOW: Duration = Duration::from_secs(10);
/// tungstenite's own write buffer: every frame goes straight through it, so it holds one
/// frame (a piece of at most `upgrade::FRAGMENT` bytes) at a time; this is only its bound.
const MAX_WRITE_BUFFER: usize = 64 * 1024;
/// Frames written in one go at most (then flushed): every frame ready in the queue is taken,
/// so a burst costs one write per batch instead of one per frame.
const MAX_BATCH: usize = 64;

use self::budget::Budget;
use self::end::End;
use self::upgrade::{text_frames, Cork};
pub(crate) use self::upgrade::{Handshake, Socket};

/// A socket's keep-alive ticks, the first one `period` from now. Not `interval`'s immediate
/// first tick awaited: that is a timer, which fires on the time driver's next millisecond, so
/// every socket read its first frame (its join) ~1 ms late (join p50 at one at a time: 1.54 ms
/// in-process, 0.45 ms for matchbox).
pub(crate) fn ping_interval(period: Duration) -> tokio::time::Interval {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping
}

/// `GET /ws/{id}`: any well-formed id is upgraded; an unknown session is reported after `join`.
pub async fn upgrade<E: Engine>(
    State(app): State<App<E>>,
    Path(id): Path<String>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Handshake,
) -> Response {
    if !valid_id(&id) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "error": "invalid session id" })),
        )
            .into_response();
    }
    let admitted = match admit_socket(&app, &headers, addr) {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let client = admitted.client;
    let max = app.config.max_message_bytes;
    // Small eager read buffer: the 128 KiB default costs ~130 KiB per idle socket, 1 KiB still
    // half a KiB more than 512 B (measured: docs/performance.md); an ICE candidate fits, larger
    // frames and bursts are read in gulps below it (`upgrade::BurstIo`).
    let config = WebSocketConfig::default()
        .read_buffer_size(512)
        // Every frame straight through to `BurstIo`, which collects the batch until the flush.
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    ws.accept(config, move |socket, cork| {
        // Boxed before the task's future takes them: a future keeps room for what it captured
        // beside what it moved it into, so inline each would be held two or three times over
        // by every socket for its whole life (~1.6 KiB, `-Zprint-type-sizes`).
        let connection = Box::new(Connection::new(app, id, client, cork));
        let socket = Box::new(socket);
        // Every event of the connection carries its peer id, and its session once joined
        // (never the URL's id: it may be a token).
        let span = tracing::info_span!(
            "ws",
            peer = %connection.peer_id,
            session = tracing::field::Empty
        );
        async move {
            connection.run(socket).instrument(span).await;
            drop(admitted);
        }
    })
}

/// A WebSocket's places: its address's share and one of the instance's sockets, released
/// together when dropped.
pub(crate) struct Admitted {
    pub client: IpAddr,
    _slot: crate::addr_limits::Slot,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Takes a WebSocket's places, or the refusal to answer: per client before the global cap, so
/// one address cannot take every socket. (The refusal is answered at once, never moved about:
/// its size does not matter.)
#[allow(clippy::result_large_err)]
pub(crate) fn admit_socket<E: Engine>(
    app: &App<E>,
    headers: &HeaderMap,
    addr: SocketAddr,
) -> Result<Admitted, Response> {
    let client = client_ip(headers, addr, &app.config.trusted_proxies);
    let slot = app
        .per_address
        .admit(crate::client::limit_key(client))
        .map_err(IntoResponse::into_response)?;
    let Ok(permit) = app.sockets.clone().try_acquire_owned() else {
        crate::metrics::refused("sockets_full");
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": "too many connections" })),
        )
            .into_response());
    };
    Ok(Admitted {
        client,
        _slot: slot,
        _permit: permit,
    })
}

struct Connection<E: Engine> {
    app: App<E>,
    /// The id in the URL: the public session id or a token.
    path_id: String,
    /// Server-assigned (protocol.md §4): the client's own id is informational only.
    peer_id: String,
    client: IpAddr,
    /// The host session id once joined.
    room: Option<String>,
    last_seen: Instant,
    errors_sent: u32,
    errors_since: Instant,
    budget: Budget,
    /// Batches collect under the socket until their flush.
    cork: Cork,
}

impl<E: Engine> Connection<E> {
    fn new(app: App<E>, path_id: String, client: IpAddr, cork: Cork) -> Self {
        let now = Instant::now();
        let budget = Budget::new(&app.config, now);
        Self {
            app,
            path_id,
            peer_id: new_id(),
            client,
            room: None,
            last_seen: now,
            errors_sent: 0,
            errors_since: now,
            budget,
            cork,
        }
    }

    async fn run(mut self: Box<Self>, mut socket: Box<Socket>) {
        // Not split in halves: one task reads it (in `serve`'s select) and writes it (in the
        // branches, once the read is dropped), so a split's shared lock and one-item slot
        // bought nothing but memory (0.43 KiB per idle peer). Boxed: the task stays small.
        let socket = socket.as_mut();
        let mut queue = self.app.engine.connect(&self.peer_id);
        let end = self.serve(socket, &mut queue).await;
        // Senders elsewhere held for this socket need not wait out their hold.
        self.app.engine.release(queue.released(true));
        if let Some(why) = end.metric {
            crate::metrics::disconnected(why);
        }
        // Boxed like the join, so idle sockets do not carry the leave's state.
        Box::pin(self.leave()).await;
        if end.jitter {
            let window = self.app.config.drain_jitter;
            let delay = rand::rng().random_range(Duration::ZERO..=window);
            tokio::time::sleep(delay).await;
        }
        if end.echo {
            let _ = tokio::time::timeout(self.app.config.write_timeout, socket.flush()).await;
        }
        // A batch cut short (the queue closed under it) left the cork in.
        self.cork.set(false);
        if let Some((code, reason)) = end.close {
            let frame = Message::Close(Some(CloseFrame {
                code: code.into(),
                reason: reason.into(),
            }));
            let _ = tokio::time::timeout(self.app.config.write_timeout, socket.send(frame)).await;
        }
    }

    async fn leave(&mut self) {
        if let Some(room) = self.room.take() {
            // Counted before the room is told, so a scrape after `peer_left` includes it.
            crate::metrics::left();
            if let Err(e) = self.app.engine.leave(&room, &self.peer_id).await {
                tracing::warn!(peer = %self.peer_id, error = %e, "leave failed");
            }
            tracing::info!(session = %room, peer = %self.peer_id, "peer left");
        }
        self.app.engine.disconnect(&self.peer_id).await;
    }

    async fn serve(&mut self, socket: &mut Socket, queue: &mut PeerQueue) -> End {
        let config = self.app.config.clone();
        let mut ping = ping_interval(config.ping_interval.min(config.idle_timeout));
        let shutdown = self.app.shutdown.clone();
        let closing = shutdown.reached(Phase::Closing);
        tokio::pin!(closing);
        // A socket that never joins holds a slot for nothing: it gets `join_timeout`.
        let join_deadline = tokio::time::sleep(config.join_timeout);
        tokio::pin!(join_deadline);
        let hold = queue.hold();
        loop {
            let held = hold.until();
            tokio::select! {
                _ = &mut closing => {
                    return End { jitter: true, ..End::closed_by(CloseReason::GoingAway) };
                }
                _ = &mut join_deadline, if self.room.is_none() => {
                    tracing::debug!(peer = %self.peer_id, "no join within the join timeout");
                    return End::close(1008, "join timeout", "join_timeout");
                }
                frame = queue.recv() => match frame {
                    Some(frame) => {
                        let closing = queue.closing();
                        tokio::select! {
                            ok = Box::pin(self.write_batch(socket, frame, queue)) => if !ok {
                                return End::silent();
                            },
                            // Closed by the server while this write waits on a full socket (a
                            // slow consumer): end now and leave the room, instead of after the
                            // write timeout. The close frame follows the bytes in flight.
                            reason = closing.closed() => return End::closed_by(reason),
                        }
                    }
                    None => {
                        let reason = queue.close_reason().unwrap_or(CloseReason::GoingAway);
                        return End::closed_by(reason);
                    }
                },
                // Held by a recipient elsewhere: no frame is read until it is lifted.
                _ = hold.lifted(held), if held.is_some() => {}
                // As many relays of this socket as it may have waiting for other instances.
                () = hold.drained(), if hold.at_cap() => {}
                msg = socket.next(), if held.is_none() && !hold.at_cap() => {
                    let msg = match msg {
                        Some(Ok(msg)) => msg,
                        // An abrupt disconnect is ordinary for these clients: debug, not error.
                        Some(Err(e)) => {
                            tracing::debug!(peer = %self.peer_id, error = %e, "socket error");
                            return End::on_error(e);
                        }
                        None => return End::silent(),
                    };
                    // The one clock read of a frame (see `budget`).
                    let now = Instant::now();
                    self.last_seen = now;
                    let ok = match msg {
                        Message::Text(text) => {
                            self.budget.pace(now, text.len()).await;
                            Box::pin(self.handle(socket, text.as_str())).await
                        }
                        Message::Binary(bytes) => {
                            self.budget.pace(now, bytes.len()).await;
                            match std::str::from_utf8(&bytes) {
                                Ok(text) => Box::pin(self.handle(socket, text)).await,
                                Err(_) => self.error(socket, "invalid message: not UTF-8".into()).await,
                            }
                        }
                        Message::Close(_) => return End::echo(),
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => true,
                    };
                    if !ok {
                        return End::silent();
                    }
                }
                _ = ping.tick() => {
                    if self.last_seen.elapsed() >= config.idle_timeout {
                        tracing::debug!(peer = %self.peer_id, "idle timeout");
                        return End::close(1001, "idle timeout", "idle_timeout");
                    }
                    if !Box::pin(self.write(socket, Message::Ping(Default::default()))).await {
                        return End::silent();
                    }
                }
            }
        }
    }

    /// Writes `first` and every frame queued behind it (up to [`MAX_BATCH`]), then flushes once,
    /// all within the write timeout; false means the socket is done for.
    async fn write_batch(&self, sink: &mut Socket, first: Frame, queue: &mut PeerQueue) -> bool {
        self.cork.set(true);
        let batch = async {
            let mut next = Some(first);
            for _ in 0..MAX_BATCH {
                let Some(frame) = next.take().or_else(|| queue.try_recv()) else {
                    break;
                };
                for piece in text_frames(frame) {
                    sink.feed(piece).await?;
                }
            }
            sink.flush().await
        };
        let done = tokio::time::timeout(self.app.config.write_timeout, batch).await;
        self.cork.set(false);
        // Back within its relay share: senders elsewhere held for it may go on.
        self.app.engine.release(queue.released(false));
        matches!(done, Ok(Ok(())))
    }

    /// Writes one frame within the write timeout; false means the socket is done for.
    async fn write(&self, sink: &mut Socket, msg: Message) -> bool {
        matches!(
            tokio::time::timeout(self.app.config.write_timeout, sink.send(msg)).await,
            Ok(Ok(()))
        )
    }

    async fn reply(&self, sink: &mut Socket, msg: &ServerMessage) -> bool {
        self.cork.set(true);
        let send = async {
            for piece in text_frames(msg.to_frame()) {
                sink.feed(piece).await?;
            }
            sink.flush().await
        };
        let done = tokio::time::timeout(self.app.config.write_timeout, send).await;
        self.cork.set(false);
        matches!(done, Ok(Ok(())))
    }

    /// Replies `error`, within the socket's error budget.
    async fn error(&mut self, sink: &mut Socket, message: String) -> bool {
        if self.errors_since.elapsed() >= ERROR_WINDOW {
            self.errors_sent = 0;
            self.errors_since = Instant::now();
        }
        if self.errors_sent >= ERROR_BURST {
            return true;
        }
        self.errors_sent += 1;
        self.reply(sink, &ServerMessage::error(message)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of the future `f` returns, without calling it.
    fn future_size<A, F: std::future::Future>(_: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every socket's task holds this future for its whole life: a few bytes more can move
    /// every idle socket into the next allocation size class (64b73f8 grew it by 56 bytes, and
    /// each idle peer cost 0.27 KiB more). Growing it on purpose: raise the bound after
    /// measuring the bench's idle figure (`scripts/bench`, "idle: KiB RSS per joined peer").
    /// (An unoptimized build's size, which this test sees; 1,408 bytes at ff72ea2, 1,328 once
    /// the socket was no longer split in halves.)
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_socket_task_stays_as_small_as_measured() {
        type Memory = crate::engine::memory::MemoryEngine;
        type Redis = crate::engine::redis::RedisEngine;
        let memory = future_size(|(c, s): (Box<Connection<Memory>>, Box<Socket>)| c.run(s));
        let redis = future_size(|(c, s): (Box<Connection<Redis>>, Box<Socket>)| c.run(s));
        for size in [memory, redis] {
            assert!(size <= 1344, "a socket's task is {size} bytes");
        }
    }

    /// The first keep-alive tick is a period away: a socket waits on no timer before it reads.
    /// (`interval`'s "immediate" first tick fires only on the time driver's next millisecond.)
    #[tokio::test]
    async fn the_first_ping_is_a_period_away() {
        let mut ping = ping_interval(Duration::from_secs(3600));
        let early = tokio::time::timeout(Duration::from_millis(50), ping.tick()).await;
        assert!(early.is_err(), "ticked at once");
    }
}
