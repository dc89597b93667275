//! Session routes (protocol.md §3): register, status, HTTP join and attach. Each success hands
//! out the caller's capability in the URLs of its answer (`docs/protocol.md`); rate limits
//! answer 429 with `Retry-After`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{admit, Refusal};
use crate::client::client_ip;
use crate::code;
use crate::engine::{Access, Engine, Grant, SessionRecord};
use crate::http::{base_url, check_id, parse, too_many, transports, ApiError, ApiResult, App};
use crate::protocol::{new_id, new_token, unix_now};

const MINUTE: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
struct RegisterRequest {
    session_id: String,
    #[serde(default)]
    passphrase: Option<String>,
}

/// Longest client-chosen join code accepted.
const MAX_CODE_LEN: usize = 128;

fn register_failure(message: &str) -> Value {
    json!({ "success": false, "session_url": "", "message": message, "transports": [] })
}

/// `POST /sessions`. The host's URLs carry its token (see `docs/protocol.md`): whoever holds
/// them is the host; everybody else is told only the session id.
pub async fn register<E: Engine>(
    state: State<App<E>>,
    peer: ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let relay = state.config.relay.mode == crate::relay::RelayMode::All;
    register_session(state, peer, headers, body, relay).await
}

/// `POST /relay/sessions`: registers a relay session (`crate::relay`), unless the relay is off.
pub async fn register_relay<E: Engine>(
    state: State<App<E>>,
    peer: ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    if !state.config.relay.enabled() {
        return Err(ApiError(StatusCode::NOT_FOUND, "the relay is off".into()));
    }
    register_session(state, peer, headers, body, true).await
}

async fn register_session<E: Engine>(
    State(app): State<App<E>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
    relay: bool,
) -> ApiResult {
    let req: RegisterRequest = parse(&body)?;
    check_id("session_id", &req.session_id)?;
    let code = match req.passphrase.as_deref().map(str::trim) {
        Some(p) if !p.is_empty() => p.to_owned(),
        _ => code::generate(),
    };
    if code.len() > MAX_CODE_LEN {
        return Err(ApiError::bad_request("passphrase too long"));
    }
    // This address's share first, so a flooder that is refused spends nobody else's.
    let client = client_ip(&headers, peer, &app.config.trusted_proxies);
    let limits = [
        (
            format!("reg@{}", crate::client::limit_key(client)),
            app.config.registrations_per_minute,
            "Too many sessions registered from this address; try again later",
        ),
        (
            "reg".to_owned(),
            app.config.registrations_per_minute_total,
            "The server takes no more sessions right now; try again later",
        ),
    ];
    for (key, max, message) in limits {
        if let Some(wait) = app.engine.rate(&key, max, MINUTE).await? {
            tracing::info!(%client, key, "registration refused: rate limit");
            crate::metrics::refused(if key == "reg" {
                "registration_budget"
            } else {
                "registration_rate"
            });
            return Ok(too_many(wait, register_failure(message)));
        }
    }
    let id = req.session_id;
    crate::http::record_session(&id, None);
    let record = SessionRecord {
        id: id.clone(),
        created_at: unix_now(),
        code: app.secret.digest(&id, &code),
        relay,
    };
    // A relay host's token is its only credential for its relay sockets: 128 random bits.
    let host = if relay { new_token() } else { new_id() };
    if !app.engine.register(record, &host).await? {
        return Ok(Json(register_failure("Session already exists")).into_response());
    }
    if relay {
        // The host's first relay socket follows at once: it is fresh.
        app.engine.relay_mark(&id).await?;
    }
    tracing::info!(session = %id, %client, relay, "session registered");
    crate::metrics::registered();
    let base = base_url(&app.config, &headers);
    let (transports, ws) = if relay {
        relay_transports(&base, &host)
    } else {
        let (_, transports, ws) = transports(&base, &host, "offerer", None);
        (transports, ws)
    };
    Ok(Json(json!({
        "success": true,
        "session_url": format!("{base}/sessions/{id}"),
        "message": null,
        "session_id": id,
        "join_code": code,
        "transports": transports,
        "websocket_url": ws,
    }))
    .into_response())
}

pub async fn session_status<E: Engine>(
    State(app): State<App<E>>,
    Path(id): Path<String>,
) -> ApiResult {
    check_id("session id", &id)?;
    let body = match app.engine.resolve(&id).await? {
        Some(a) if a.session.id == id => {
            json!({ "exists": true, "created_at": a.session.created_at })
        }
        _ => json!({ "exists": false, "created_at": null }),
    };
    Ok(Json(body).into_response())
}

#[derive(Deserialize)]
struct JoinRequest {
    #[serde(default)]
    passphrase: Option<String>,
    #[serde(default)]
    label: Option<String>,
}

fn join_failure(message: &str) -> Value {
    json!({ "success": false, "message": message, "webrtc_offer": null, "transports": [] })
}

/// The token a successful join or attach acts through: the one in the URL, or for the public
/// session id (the code was checked) a fresh joiner token. `None`: the session's quota of
/// tokens is spent.
async fn token_for<E: Engine>(
    app: &App<E>,
    id: &str,
    access: &Access,
) -> Result<Option<String>, ApiError> {
    match access.grant {
        Grant::Public => Ok(app
            .engine
            .mint_token(&access.session.id, Grant::Joiner)
            .await?),
        // (A relay token admits nothing here: `access::admit` refused it.)
        Grant::Host | Grant::Joiner | Grant::Relay => Ok(Some(id.to_owned())),
    }
}

const TOKENS_SPENT: &str = "This session has been joined too often; ask the host to share anew";

/// `POST /sessions/{id}/join`: checks the code; the answer's URLs carry the joiner's own token.
pub async fn join<E: Engine>(
    State(app): State<App<E>>,
    Path(id): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    check_id("session id", &id)?;
    let req: JoinRequest = parse(&body)?;
    let client = client_ip(&headers, peer, &app.config.trusted_proxies);
    let access = match admit(
        &app.engine,
        &app.secret,
        &id,
        req.passphrase.as_deref(),
        client,
    )
    .await
    {
        Ok(a) => {
            crate::http::record_session(&a.session.id, None);
            a
        }
        Err(Refusal::Unavailable(e)) => return Err(e.into()),
        Err(refusal @ Refusal::TooManyAttempts(wait)) => {
            return Ok(too_many(wait, join_failure(&refusal.message())))
        }
        Err(refusal) => return Ok(Json(join_failure(&refusal.message())).into_response()),
    };
    let base = base_url(&app.config, &headers);
    if access.session.relay {
        return relay_join(&app, &access, &base).await;
    }
    let Some(token) = token_for(&app, &id, &access).await? else {
        crate::metrics::refused("tokens_spent");
        return Ok(Json(join_failure(TOKENS_SPENT)).into_response());
    };
    let session = access.session.id;
    let (meta, transports, ws) = transports(&base, &token, "answerer", req.label.as_deref());
    Ok(Json(json!({
        "success": true,
        "message": null,
        "webrtc_offer": meta,
        "session_url": format!("{base}/sessions/{session}"),
        "transports": transports,
        "websocket_url": ws,
    }))
    .into_response())
}

/// The `web_socket` transport of a relay session: the relay socket for `token`. The answer
/// lists nothing else and no `webrtc_offer` (with one left in, generation 1 waits for WebRTC
/// forever).
fn relay_transports(base: &str, token: &str) -> (Value, String) {
    let ws = format!("{}/relay/{token}", crate::http::ws_base(base));
    (json!([{ "kind": "web_socket", "url": ws }]), ws)
}

/// A successful join of a relay session: a single-use relay token for the joiner's one socket.
async fn relay_join<E: Engine>(app: &App<E>, access: &Access, base: &str) -> ApiResult {
    if !app.config.relay.enabled() {
        return Ok(Json(join_failure(RELAY_OFF)).into_response());
    }
    let session = &access.session.id;
    let Some(token) = app.engine.mint_token(session, Grant::Relay).await? else {
        crate::metrics::refused("tokens_spent");
        return Ok(Json(join_failure(TOKENS_SPENT)).into_response());
    };
    let (transports, ws) = relay_transports(base, &token);
    Ok(Json(json!({
        "success": true,
        "message": null,
        "webrtc_offer": null,
        "session_url": format!("{base}/sessions/{session}"),
        "transports": transports,
        "websocket_url": ws,
    }))
    .into_response())
}

const RELAY_OFF: &str = "This session is relayed, and this server has the relay off";

/// What a client that cannot use the relay (attach: generation 2, the browser; signaling
/// joins) is told about a relay session.
pub const RELAY_ONLY: &str =
    "This session is relayed over WebSocket; join it with a beach CLI that has the WebSocket transport";

#[derive(Deserialize)]
struct AttachRequest {
    host_session_id: String,
    #[serde(default)]
    passphrase: Option<String>,
}

/// `POST /peer-sessions/attach` (generation 2): the peer-session id is the caller's token
/// (generation 2 takes `host_session_id` from its signaling URL, so the host attaches with its
/// own token and a joiner with the one its join gave it; a bare session id plus the code
/// mints a joiner token).
pub async fn attach<E: Engine>(
    State(app): State<App<E>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let req: AttachRequest = parse(&body)?;
    check_id("host_session_id", &req.host_session_id)?;
    let client = client_ip(&headers, peer, &app.config.trusted_proxies);
    let id = &req.host_session_id;
    let access = match admit(
        &app.engine,
        &app.secret,
        id,
        req.passphrase.as_deref(),
        client,
    )
    .await
    {
        Ok(a) => {
            crate::http::record_session(&a.session.id, None);
            a
        }
        Err(Refusal::Unavailable(e)) => return Err(e.into()),
        Err(Refusal::NotFound) => {
            return Err(ApiError(StatusCode::NOT_FOUND, "Session not found".into()))
        }
        Err(refusal @ Refusal::TooManyAttempts(wait)) => {
            return Ok(too_many(wait, json!({ "error": refusal.message() })))
        }
        Err(refusal) => return Err(ApiError(StatusCode::UNAUTHORIZED, refusal.message())),
    };
    if access.session.relay {
        crate::metrics::refused("relay_only");
        return Err(ApiError(StatusCode::FORBIDDEN, RELAY_ONLY.into()));
    }
    let Some(token) = token_for(&app, id, &access).await? else {
        crate::metrics::refused("tokens_spent");
        return Err(ApiError(StatusCode::TOO_MANY_REQUESTS, TOKENS_SPENT.into()));
    };
    Ok(
        Json(json!({ "peer_session_id": token, "host_session_id": access.session.id }))
            .into_response(),
    )
}
