//! `GET /relay/{token}`: a relay socket's admission, and what both sides share (the room, the end).
//!
//! The token decides the side: a relay session's host token is a host socket ([`super::host`]:
//! held before its 101 until a joiner waits), a relay joiner token (single use) a joiner socket
//! ([`super::joiner`]: answered at once, then waiting for a host socket). Everything a token
//! cannot do is refused before the 101. Once paired, both sides run [`super::pipe`].

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::SinkExt;
use serde_json::json;
use tracing::Instrument;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::Message;

use super::{Endpoint, Side, MAX_MESSAGE};
use crate::engine::{Engine, EngineError, Entry, Grant, JoinResult, NewPeer, SessionRecord};
use crate::http::App;
use crate::protocol::{new_id, unix_now, valid_id, Role};
use crate::ws::{admit_socket, Handshake, Socket};

pub(super) fn refuse(status: StatusCode, event: &'static str, why: &str) -> Response {
    crate::metrics::relay_event(event);
    // A held host upgrade that times out is routine (the CLI opens another): not an info line
    // per session every `--relay-hold`.
    if event == "host_timeout" {
        tracing::debug!(event, status = status.as_u16(), why, "relay socket refused");
    } else {
        tracing::info!(event, status = status.as_u16(), why, "relay socket refused");
    }
    (status, axum::Json(json!({ "error": why }))).into_response()
}

pub(super) fn unavailable(e: EngineError) -> Response {
    tracing::warn!(error = %e, "relay socket refused: engine error");
    crate::metrics::refused(e.kind());
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({ "error": e.client_message() })),
    )
        .into_response()
}

/// How long `session` may still relay (`None`: its time is over).
pub(super) fn time_left(session: &SessionRecord, max: Duration) -> Option<Duration> {
    let ends = session.created_at.saturating_add(max.as_secs());
    let now = unix_now();
    (now < ends).then(|| Duration::from_secs(ends - now))
}

pub(super) fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * MAX_MESSAGE)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// `GET /relay/{token}`.
pub async fn upgrade<E: Engine>(
    State(app): State<App<E>>,
    Path(token): Path<String>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Handshake,
) -> Response {
    if !app.config.relay.enabled() {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !valid_id(&token) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "token_refused",
            "invalid relay token",
        );
    }
    let admitted = match admit_socket(&app, &headers, addr) {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let access = match app.engine.resolve(&token).await {
        Ok(a) => a,
        Err(e) => return unavailable(e),
    };
    let (session, side) = match access {
        Some(a) if a.grant == Grant::Host && a.session.relay => (a.session, Side::Host),
        Some(a) if a.grant == Grant::Relay => match app.engine.take_relay_token(&token).await {
            Ok(Some(session)) => (session, Side::Joiner),
            Ok(None) => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "token_refused",
                    "relay token used already",
                )
            }
            Err(e) => return unavailable(e),
        },
        _ => {
            tracing::info!(client = %admitted.client, "not a relay token");
            return refuse(StatusCode::FORBIDDEN, "token_refused", "not a relay token");
        }
    };
    crate::http::record_session(&session.id, None);
    let Some(left) = time_left(&session, app.config.relay.max_duration) else {
        return refuse(
            StatusCode::FORBIDDEN,
            "limit_duration",
            "this session's relay time is over",
        );
    };
    let router = app.engine.router();
    let me = Endpoint {
        owner: router.id(),
        socket: new_id(),
    };
    let span =
        tracing::info_span!("relay", socket = %me.socket, session = %session.id, side = ?side);
    match side {
        Side::Host => {
            super::host::hold(app, session, ws, admitted, me, left)
                .instrument(span)
                .await
        }
        Side::Joiner => ws.accept(socket_config(), move |socket, _| {
            async move {
                super::joiner::run(&app, &session, socket, &me, left).await;
                drop(admitted);
            }
            .instrument(span)
        }),
    }
}

/// Joins the relay socket to its room (a member like any other: presence, reaping, admin
/// close, fencing); `None` when the room is full, closed or the store refused.
pub(super) async fn enter<E: Engine>(
    app: &App<E>,
    session: &SessionRecord,
    me: &Endpoint,
    role: Role,
) -> Option<crate::peers::PeerQueue> {
    let queue = app.engine.connect(&me.socket);
    let pairs = app.config.relay.max_pairs;
    // Host sockets of the room's pairs, plus a few on their way (as for signaling hosts).
    let max = match role {
        Role::Server => 2 * pairs + crate::ws::HOST_SLOTS,
        Role::Client => 2 * pairs,
    };
    let peer = NewPeer {
        id: me.socket.clone(),
        role,
        supported_transports: vec![json!({ "custom": "relay" })],
        preferred_transport: None,
        metadata: None,
    };
    match app
        .engine
        .join(&session.id, peer, max, Entry::Admitted)
        .await
    {
        Ok(JoinResult::Joined(_)) => {
            crate::metrics::joined(role.as_str());
            Some(queue)
        }
        Ok(JoinResult::Full) => {
            crate::metrics::refused("room_full");
            None
        }
        // Refused, Token and RelayOnly come only with a code.
        Ok(JoinResult::Closed | JoinResult::Refused(_) | JoinResult::Token(_))
        | Ok(JoinResult::RelayOnly) => None,
        Err(e) => {
            tracing::warn!(error = %e, "relay socket could not join its room");
            None
        }
    }
}

/// Runs `fut` while the socket's room events are read and dropped (a relay socket heeds only
/// its partner's departure, in the pipe), so a busy room cannot fill its queue; `None` when
/// the server closed the queue (drain, fencing, admin close).
pub(super) async fn drained<F: std::future::Future>(
    queue: &mut crate::peers::PeerQueue,
    fut: F,
) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return Some(out),
            frame = queue.recv() => frame?,
        };
    }
}

/// Leaves the room and closes the socket (with `close`, if any).
pub(super) async fn finish<E: Engine>(
    app: &App<E>,
    session: &SessionRecord,
    me: &Endpoint,
    mut socket: Socket,
    close: Option<(u16, &'static str)>,
) {
    if let Err(e) = app.engine.leave(&session.id, &me.socket).await {
        tracing::warn!(error = %e, "relay socket leave failed");
    }
    app.engine.disconnect(&me.socket).await;
    if let Some((code, reason)) = close {
        let frame = Message::Close(Some(CloseFrame {
            code: code.into(),
            reason: reason.into(),
        }));
        let _ = tokio::time::timeout(app.config.write_timeout, socket.send(frame)).await;
    }
}
