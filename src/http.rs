//! HTTP routes (protocol.md §3): sessions, peer sessions, the offer/answer mailbox, health and
//! readiness.
//!
//! Bodies are parsed by hand from bytes so that malformed JSON gets a JSON error (400) rather
//! than axum's plain-text rejection. Register and join failures are `200 success:false` because
//! the clients rely on it; an engine that cannot answer gives 503 at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{admit, Refusal};
use crate::client::client_ip;
use crate::code::{self, Secret};
use crate::config::Config;
use crate::engine::{Engine, EngineError, Grant, SessionRecord};
use crate::health::Health;
use crate::protocol::{new_id, unix_now, valid_id, SdpPayload};
use crate::shutdown::{Phase, Shutdown};

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct App<E> {
    pub engine: E,
    pub config: Arc<Config>,
    pub shutdown: Shutdown,
    pub health: Health,
    /// Keys the stored digests of join codes; never leaves the process.
    pub secret: Secret,
    /// One permit per open WebSocket: the connection limit, and what the drain waits for.
    pub sockets: Arc<tokio::sync::Semaphore>,
}

/// An error answered as `{"error": message}` with a status.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }

    fn forbidden(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::FORBIDDEN, msg.into())
    }
}

/// `429 Too Many Requests` with `Retry-After` (whole seconds, at least 1) and `body`.
pub fn too_many(wait: Duration, body: Value) -> Response {
    let secs = wait.as_millis().div_ceil(1000).max(1).to_string();
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, secs)],
        Json(body),
    )
        .into_response()
}

const MINUTE: Duration = Duration::from_secs(60);

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid {what}: use 1-64 letters, digits, '-' or '_'"
        )))
    }
}

/// The public base URL: configured, or derived from the request (never anybody's production
/// host by default). Host values are checked so a forged header cannot inject into URLs.
pub fn base_url(config: &Config, headers: &HeaderMap) -> String {
    if let Some(url) = &config.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let host = header("host")
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
        })
        .unwrap_or("localhost");
    let proto = match header("x-forwarded-proto").map(|p| p.split(',').next().unwrap_or("").trim())
    {
        Some("https") => "https",
        _ => "http",
    };
    format!("{proto}://{host}")
}

/// `base` with `http`→`ws`, `https`→`wss`.
fn ws_base(base: &str) -> String {
    if let Some(rest) = base.strip_prefix("https") {
        format!("wss{rest}")
    } else if let Some(rest) = base.strip_prefix("http") {
        format!("ws{rest}")
    } else {
        base.to_owned()
    }
}

/// The transport list and URLs of a session, as register and join answer them.
fn transports(base: &str, id: &str, role: &str, label: Option<&str>) -> (Value, Value, String) {
    let mut meta = json!({
        "signaling_url": format!("{base}/sessions/{id}/webrtc"),
        "role": role,
        "poll_interval_ms": 250,
    });
    if let Some(label) = label {
        meta["label"] = json!(label);
    }
    let ws = format!("{}/ws/{id}", ws_base(base));
    let list = json!([
        { "kind": "web_rtc", "metadata": meta.clone() },
        { "kind": "web_socket", "url": ws.clone() },
    ]);
    (meta, list, ws)
}

pub async fn health<E: Engine>(State(app): State<App<E>>) -> Response {
    let report = app.health.report(&app.engine).await;
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

pub async fn ready<E: Engine>(State(app): State<App<E>>) -> Response {
    if app.shutdown.phase() != Phase::Serving {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "draining" })),
        )
            .into_response();
    }
    let deadline = app
        .config
        .redis_timeout
        .min(std::time::Duration::from_millis(500));
    let reason = match tokio::time::timeout(deadline, app.engine.ready()).await {
        Ok(Ok(())) => return Json(json!({ "ready": true })).into_response(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "session store did not answer in time".to_owned(),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "ready": false, "reason": reason })),
    )
        .into_response()
}

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
    State(app): State<App<E>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
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
            format!("reg@{client}"),
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
            return Ok(too_many(wait, register_failure(message)));
        }
    }
    let id = req.session_id;
    let record = SessionRecord {
        id: id.clone(),
        created_at: unix_now(),
        code: app.secret.digest(&id, &code),
    };
    let host = new_id();
    if !app.engine.register(record, &host).await? {
        return Ok(Json(register_failure("Session already exists")).into_response());
    }
    tracing::info!(session = %id, %client, "session registered");
    let base = base_url(&app.config, &headers);
    let (_, transports, ws) = transports(&base, &host, "offerer", None);
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
    access: &crate::engine::Access,
) -> Result<Option<String>, ApiError> {
    match access.grant {
        Grant::Public => Ok(app.engine.mint_token(&access.session.id).await?),
        Grant::Host | Grant::Joiner => Ok(Some(id.to_owned())),
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
        Ok(a) => a,
        Err(Refusal::Unavailable(e)) => return Err(e.into()),
        Err(refusal @ Refusal::TooManyAttempts(wait)) => {
            return Ok(too_many(wait, join_failure(&refusal.message())))
        }
        Err(refusal) => return Ok(Json(join_failure(&refusal.message())).into_response()),
    };
    let Some(token) = token_for(&app, &id, &access).await? else {
        return Ok(Json(join_failure(TOKENS_SPENT)).into_response());
    };
    let base = base_url(&app.config, &headers);
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
        Ok(a) => a,
        Err(Refusal::Unavailable(e)) => return Err(e.into()),
        Err(Refusal::NotFound) => {
            return Err(ApiError(StatusCode::NOT_FOUND, "Session not found".into()))
        }
        Err(refusal @ Refusal::TooManyAttempts(wait)) => {
            return Ok(too_many(wait, json!({ "error": refusal.message() })))
        }
        Err(refusal) => return Err(ApiError(StatusCode::UNAUTHORIZED, refusal.message())),
    };
    let Some(token) = token_for(&app, id, &access).await? else {
        return Err(ApiError(StatusCode::TOO_MANY_REQUESTS, TOKENS_SPENT.into()));
    };
    Ok(
        Json(json!({ "peer_session_id": token, "host_session_id": access.session.id }))
            .into_response(),
    )
}

/// The status of "unknown session" and "nothing yet": `/sessions` says 404, `/peer-sessions`
/// says 409 (the clients poll on either).
fn missing_status(path: &MatchedPath) -> StatusCode {
    if path.as_str().starts_with("/peer-sessions") {
        StatusCode::CONFLICT
    } else {
        StatusCode::NOT_FOUND
    }
}

/// The peer a mailbox request acts as, and its room: the peer bound to the token in the URL,
/// which must grant `need` (offers go out with the host's token and answers with a joiner's)
/// and still be a member. Ids in the body or query are never proof of anything: every member
/// can read them.
async fn acting_peer<E: Engine>(
    app: &App<E>,
    id: &str,
    path: &MatchedPath,
    need: Grant,
) -> Result<(String, String), ApiError> {
    check_id("session id", id)?;
    let Some(access) = app.engine.resolve(id).await? else {
        return Err(ApiError(missing_status(path), "Session not found".into()));
    };
    if access.grant != need {
        return Err(ApiError::forbidden(match need {
            Grant::Host => "only the host's signaling URL (from its register response) may do this",
            _ => "only a joiner's signaling URL (from its join response) may do this",
        }));
    }
    let room = access.session.id;
    let Some(peer) = access.peer else {
        return Err(ApiError::forbidden(
            "join the session over the WebSocket of this URL first",
        ));
    };
    if !app.engine.is_member(&room, &peer).await? {
        return Err(ApiError::forbidden(format!(
            "peer {peer} has left this session"
        )));
    }
    Ok((room, peer))
}

/// Stores an offer (host → joiner) or an answer (joiner → host). The sender is the peer of the
/// URL's token; `from_peer` must name it and `to_peer` a member.
pub async fn post_sdp<E: Engine>(
    State(app): State<App<E>>,
    path: MatchedPath,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    if body.len() > app.config.max_sdp_bytes {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("SDP payload over {} bytes", app.config.max_sdp_bytes),
        ));
    }
    let payload: SdpPayload = parse(&body)?;
    for (what, v) in [
        ("handshake_id", &payload.handshake_id),
        ("from_peer", &payload.from_peer),
        ("to_peer", &payload.to_peer),
    ] {
        if v.trim().is_empty() {
            return Err(ApiError::bad_request(format!("{what} must not be blank")));
        }
        check_id(what, v)?;
    }
    let offer = path.as_str().ends_with("/offer");
    let need = if offer { Grant::Host } else { Grant::Joiner };
    let (room, me) = acting_peer(&app, &id, &path, need).await?;
    if payload.from_peer != me {
        return Err(ApiError::forbidden("from_peer must be your own peer id"));
    }
    if !app.engine.is_member(&room, &payload.to_peer).await? {
        return Err(ApiError::forbidden(format!(
            "peer {} has not joined this session",
            payload.to_peer
        )));
    }
    let stored = serde_json::to_string(&payload).expect("payload serializes");
    if offer {
        app.engine
            .push_offer(&room, &payload.to_peer, stored)
            .await?;
    } else if !app
        .engine
        .put_answer(&room, &me, &payload.to_peer, &payload.handshake_id, stored)
        .await?
    {
        return Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            "too many answers waiting for that peer".into(),
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
pub struct OfferQuery {
    peer_id: Option<String>,
}

/// Takes the oldest offer queued for the joiner of the URL's token (`peer_id` must be it).
pub async fn get_offer<E: Engine>(
    State(app): State<App<E>>,
    path: MatchedPath,
    Path(id): Path<String>,
    Query(q): Query<OfferQuery>,
) -> ApiResult {
    let asked = q.peer_id.unwrap_or_default();
    check_id("peer_id", &asked)?;
    let (room, me) = acting_peer(&app, &id, &path, Grant::Joiner).await?;
    if asked != me {
        return Err(ApiError::forbidden("peer_id must be your own peer id"));
    }
    stored_or_missing(app.engine.pop_offer(&room, &me).await?, &path)
}

#[derive(Deserialize)]
pub struct AnswerQuery {
    handshake_id: Option<String>,
}

/// Takes an answer addressed to the host of the URL's token; exactly one reader gets it.
pub async fn get_answer<E: Engine>(
    State(app): State<App<E>>,
    path: MatchedPath,
    Path(id): Path<String>,
    Query(q): Query<AnswerQuery>,
) -> ApiResult {
    let handshake = q.handshake_id.unwrap_or_default();
    check_id("handshake_id", &handshake)?;
    let (room, me) = acting_peer(&app, &id, &path, Grant::Host).await?;
    stored_or_missing(app.engine.take_answer(&room, &me, &handshake).await?, &path)
}

fn stored_or_missing(stored: Option<String>, path: &MatchedPath) -> ApiResult {
    Ok(match stored {
        Some(json) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response(),
        None => missing_status(path).into_response(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_prefers_configuration() {
        let mut config = Config::defaults();
        config.public_url = Some("https://road.example.com/".into());
        assert_eq!(
            base_url(&config, &HeaderMap::new()),
            "https://road.example.com"
        );
    }

    #[test]
    fn base_url_from_headers_is_sanitized() {
        let mut config = Config::defaults();
        config.public_url = None;
        let mut h = HeaderMap::new();
        h.insert("host", "127.0.0.1:8080".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(base_url(&config, &h), "https://127.0.0.1:8080");
        h.insert("host", "evil.com/x?".parse().unwrap());
        assert_eq!(base_url(&config, &h), "https://localhost");
    }

    #[test]
    fn ws_base_maps_schemes() {
        assert_eq!(ws_base("http://a:1"), "ws://a:1");
        assert_eq!(ws_base("https://a"), "wss://a");
    }
}
