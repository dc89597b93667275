//! One WebSocket connection (protocol.md §4): join, relay, keep-alive, leave.
//!
//! Each socket is served by exactly one task, the one axum runs for the upgrade, so the
//! connection's state is owned, never shared, and ends with it. The task reads client frames,
//! writes frames queued for it by the engine (bounded; see [`crate::peers`]), pings, and on any
//! ending (close, TCP reset, silence, slow consumer, drain) leaves the room so the others get
//! `peer_left` — unless it never joined, in which case nobody hears of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};

use crate::access::admit;
use crate::engine::{Engine, NewPeer};
use crate::http::App;
use crate::peers::{CloseReason, PeerQueue};
use crate::protocol::{common_transports, new_id, valid_id, ClientMessage, Frame, ServerMessage};
use crate::shutdown::Phase;

/// Bounds on what a client may attach to its PeerInfo.
const MAX_TRANSPORTS: usize = 16;
const MAX_METADATA_KEYS: usize = 32;
const MAX_METADATA_LEN: usize = 1024;
/// `error` replies per socket per window; further bad frames are dropped silently, so a client
/// that streams garbage (e.g. the generation-2 fallback socket) gets no error storm back.
const ERROR_BURST: u32 = 5;
const ERROR_WINDOW: Duration = Duration::from_secs(10);

type Sink = SplitSink<WebSocket, Message>;
type Stream = SplitStream<WebSocket>;

/// `GET /ws/{id}`: any well-formed id is upgraded; an unknown session is reported after `join`.
pub async fn upgrade<E: Engine>(
    State(app): State<App<E>>,
    Path(id): Path<String>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !valid_id(&id) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "error": "invalid session id" })),
        )
            .into_response();
    }
    // Per client before the global cap, so one address cannot take every socket.
    let client = crate::client::client_ip(&headers, addr, &app.config.trusted_proxies);
    let address_slot = match app.per_address.admit(client) {
        Ok(slot) => slot,
        Err(refused) => return refused.into_response(),
    };
    let Ok(permit) = app.sockets.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": "too many connections" })),
        )
            .into_response();
    };
    let remote = remote_addr(&headers, addr);
    let max = app.config.max_message_bytes;
    // Small eager read buffer: the 128 KiB default costs ~130 KiB per idle socket
    // (shared/notes/crates.md §3).
    ws.read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * max + 4096)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            Connection::new(app, id, remote).run(socket).await;
            drop(permit);
            drop(address_slot);
        })
}

/// The client address shown to the room: the last `X-Forwarded-For` hop (the one the load
/// balancer appended), else the TCP peer.
fn remote_addr(headers: &HeaderMap, addr: SocketAddr) -> String {
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .map(str::to_owned)
        .unwrap_or_else(|| addr.to_string())
}

/// How a connection ends: the close frame to send, if any.
struct End {
    close: Option<(u16, &'static str)>,
    /// Drain: leave at once, close after a random delay within the jitter window.
    jitter: bool,
}

impl End {
    fn silent() -> Self {
        End {
            close: None,
            jitter: false,
        }
    }

    fn close(code: u16, reason: &'static str) -> Self {
        End {
            close: Some((code, reason)),
            jitter: false,
        }
    }

    /// The server closed the socket's queue (slow consumer, fenced, replaced).
    fn closed_by(reason: CloseReason) -> Self {
        let (code, why) = reason.close_frame();
        End::close(code, why)
    }
}

struct Connection<E> {
    app: App<E>,
    /// The id in the URL: a session or peer-session id.
    path_id: String,
    /// Server-assigned (protocol.md §4): the client's own id is informational only.
    peer_id: String,
    remote: String,
    /// The host session id once joined.
    room: Option<String>,
    last_seen: Instant,
    errors_sent: u32,
    errors_since: Instant,
}

impl<E: Engine> Connection<E> {
    fn new(app: App<E>, path_id: String, remote: String) -> Self {
        let now = Instant::now();
        Self {
            app,
            path_id,
            peer_id: new_id(),
            remote,
            room: None,
            last_seen: now,
            errors_sent: 0,
            errors_since: now,
        }
    }

    async fn run(mut self, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let end = match self.app.engine.connect(&self.peer_id).await {
            Ok(mut queue) => {
                let end = self.serve(&mut sink, &mut stream, &mut queue).await;
                if let Some(room) = self.room.take() {
                    if let Err(e) = self.app.engine.leave(&room, &self.peer_id).await {
                        tracing::warn!(peer = %self.peer_id, error = %e, "leave failed");
                    }
                }
                self.app.engine.disconnect(&self.peer_id).await;
                end
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot register socket");
                End::close(1013, "try again later")
            }
        };
        if end.jitter {
            let window = self.app.config.drain_jitter;
            let delay = rand::rng().random_range(Duration::ZERO..=window);
            tokio::time::sleep(delay).await;
        }
        if let Some((code, reason)) = end.close {
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }));
            let _ = tokio::time::timeout(self.app.config.write_timeout, sink.send(frame)).await;
        }
    }

    async fn serve(&mut self, sink: &mut Sink, stream: &mut Stream, queue: &mut PeerQueue) -> End {
        let config = self.app.config.clone();
        let mut ping = tokio::time::interval(config.ping_interval.min(config.idle_timeout));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let shutdown = self.app.shutdown.clone();
        let closing = shutdown.reached(Phase::Closing);
        tokio::pin!(closing);
        loop {
            tokio::select! {
                _ = &mut closing => {
                    return End { jitter: true, ..End::closed_by(CloseReason::GoingAway) };
                }
                frame = queue.recv() => match frame {
                    Some(frame) => {
                        let msg = Message::Text(frame.as_ref().into());
                        tokio::select! {
                            ok = self.write(sink, msg) => if !ok {
                                return End::silent();
                            },
                            // Closed by the server while this write waits on a full socket (a
                            // slow consumer): end now and leave the room, instead of after the
                            // write timeout. The close frame follows the bytes in flight.
                            reason = queue.closed() => return End::closed_by(reason),
                        }
                    }
                    None => {
                        let reason = queue.close_reason().unwrap_or(CloseReason::GoingAway);
                        return End::closed_by(reason);
                    }
                },
                msg = stream.next() => {
                    let msg = match msg {
                        Some(Ok(msg)) => msg,
                        // An abrupt disconnect is ordinary for these clients: debug, not error.
                        Some(Err(e)) => {
                            tracing::debug!(peer = %self.peer_id, error = %e, "socket error");
                            if e.to_string().contains("too long") {
                                return End::close(1009, "message too big");
                            }
                            return End::silent();
                        }
                        None => return End::silent(),
                    };
                    self.last_seen = Instant::now();
                    let ok = match msg {
                        Message::Text(text) => self.handle(sink, text.as_bytes()).await,
                        Message::Binary(bytes) => self.handle(sink, &bytes).await,
                        Message::Close(_) => return End::silent(),
                        Message::Ping(_) | Message::Pong(_) => true,
                    };
                    if !ok {
                        return End::silent();
                    }
                }
                _ = ping.tick() => {
                    if self.last_seen.elapsed() >= config.idle_timeout {
                        tracing::debug!(peer = %self.peer_id, "idle timeout");
                        return End::close(1001, "idle timeout");
                    }
                    if !self.write(sink, Message::Ping(Default::default())).await {
                        return End::silent();
                    }
                }
            }
        }
    }

    /// Writes one frame within the write timeout; false means the socket is done for.
    async fn write(&self, sink: &mut Sink, msg: Message) -> bool {
        matches!(
            tokio::time::timeout(self.app.config.write_timeout, sink.send(msg)).await,
            Ok(Ok(()))
        )
    }

    async fn reply(&self, sink: &mut Sink, msg: &ServerMessage) -> bool {
        self.write(sink, Message::Text(msg.to_frame().as_ref().into()))
            .await
    }

    /// Replies `error`, within the socket's error budget.
    async fn error(&mut self, sink: &mut Sink, message: String) -> bool {
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

    /// Handles one client frame. Returns false when the socket can no longer be written.
    async fn handle(&mut self, sink: &mut Sink, bytes: &[u8]) -> bool {
        let msg = match serde_json::from_slice::<ClientMessage>(bytes) {
            Ok(msg) => msg,
            Err(e) => return self.error(sink, format!("invalid message: {e}")).await,
        };
        match msg {
            ClientMessage::Ping => self.reply(sink, &ServerMessage::Pong).await,
            ClientMessage::Join {
                passphrase,
                supported_transports,
                preferred_transport,
                label,
                mcp,
                metadata,
                ..
            } => {
                let peer = NewPeer {
                    id: self.peer_id.clone(),
                    supported_transports: supported_transports
                        .into_iter()
                        .take(MAX_TRANSPORTS)
                        .collect(),
                    preferred_transport,
                    metadata: Some(self.metadata(metadata, label, mcp)),
                };
                self.join(sink, passphrase.as_deref(), peer).await
            }
            ClientMessage::Signal { to_peer, signal } => {
                let msg = ServerMessage::Signal {
                    from_peer: self.peer_id.clone(),
                    signal,
                };
                self.relay(sink, &to_peer, msg).await
            }
            ClientMessage::NegotiateTransport {
                to_peer,
                proposed_transport,
            } => {
                let msg = ServerMessage::TransportProposal {
                    from_peer: self.peer_id.clone(),
                    proposed_transport,
                };
                self.relay(sink, &to_peer, msg).await
            }
            ClientMessage::AcceptTransport { to_peer, transport } => {
                let msg = ServerMessage::TransportAccepted {
                    from_peer: self.peer_id.clone(),
                    transport,
                };
                self.relay(sink, &to_peer, msg).await
            }
            ClientMessage::Debug { request } => self.debug(sink, request).await,
        }
    }

    /// PeerInfo metadata: the client's keys (bounded), then the server's, which win.
    fn metadata(
        &self,
        client: Option<BTreeMap<String, String>>,
        label: Option<String>,
        mcp: Option<bool>,
    ) -> BTreeMap<String, String> {
        let mut meta: BTreeMap<String, String> = client
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, v)| k.len() <= 64 && v.len() <= MAX_METADATA_LEN)
            .take(MAX_METADATA_KEYS)
            .collect();
        if let Some(label) = label.filter(|l| !l.is_empty() && l.len() <= MAX_METADATA_LEN) {
            meta.insert("label".into(), label);
        }
        if mcp == Some(true) {
            meta.insert("mcp".into(), "true".into());
        }
        meta.insert("remote_addr".into(), self.remote.clone());
        meta
    }

    async fn join(&mut self, sink: &mut Sink, passphrase: Option<&str>, peer: NewPeer) -> bool {
        let room = match &self.room {
            // A repeated join changes nothing (never demotes): the same answer again.
            Some(room) => room.clone(),
            None => match admit(&self.app.engine, &self.path_id, passphrase).await {
                Ok(session) => session.id,
                Err(refusal) => {
                    let reason = refusal.message();
                    return self.reply(sink, &ServerMessage::JoinError { reason }).await;
                }
            },
        };
        match self.app.engine.join(&room, peer).await {
            Ok(joined) => {
                self.room = Some(room.clone());
                let msg = ServerMessage::JoinSuccess {
                    session_id: room,
                    peer_id: self.peer_id.clone(),
                    available_transports: common_transports(&joined.peers),
                    peers: joined.peers,
                };
                self.reply(sink, &msg).await
            }
            Err(e) => {
                let reason = e.to_string();
                self.reply(sink, &ServerMessage::JoinError { reason }).await
            }
        }
    }

    /// Forwards a message to another member of this socket's room.
    async fn relay(&mut self, sink: &mut Sink, to: &str, msg: ServerMessage) -> bool {
        let Some(room) = self.room.clone() else {
            return self.error(sink, "join the session first".into()).await;
        };
        if !valid_id(to) {
            return self.error(sink, "invalid to_peer".into()).await;
        }
        let frame: Frame = msg.to_frame();
        match self.app.engine.send(&room, to, frame).await {
            Ok(true) => true,
            Ok(false) => {
                self.error(sink, format!("peer {to} is not in this session"))
                    .await
            }
            Err(e) => self.error(sink, e.to_string()).await,
        }
    }

    /// `debug` goes to the room's server peer, wrapped as a custom-transport signal.
    async fn debug(&mut self, sink: &mut Sink, request: Value) -> bool {
        let Some(room) = self.room.clone() else {
            return self.error(sink, "join the session first".into()).await;
        };
        if !request.get("type").is_some_and(Value::is_string) {
            return self.error(sink, "debug request needs a type".into()).await;
        }
        let server = match self.app.engine.server_peer(&room).await {
            Ok(Some(server)) => server,
            Ok(None) => {
                return self
                    .error(sink, "no server peer in this session".into())
                    .await
            }
            Err(e) => return self.error(sink, e.to_string()).await,
        };
        let msg = ServerMessage::Signal {
            from_peer: self.peer_id.clone(),
            signal: json!({
                "transport": "custom",
                "transport_name": "debug",
                "signal_type": "debug_request",
                "payload": { "from_peer": self.peer_id, "request": request },
            }),
        };
        self.relay(sink, &server, msg).await
    }
}
