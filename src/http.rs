//! HTTP routes (protocol.md §3): sessions, peer sessions, the offer/answer mailbox, health and
//! readiness.
//!
//! Bodies are parsed by hand from bytes so that malformed JSON gets a JSON error (400) rather
//! than axum's plain-text rejection. Register and join failures are `200 success:false` because
//! the clients rely on it; an engine that cannot answer gives 503 at once.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{admit, Refusal};
use crate::code::{self, CodeHash};
use crate::config::Config;
use crate::engine::{Engine, EngineError, SessionRecord};
use crate::health::Health;
use crate::protocol::{unix_now, valid_id, SdpPayload};
use crate::shutdown::{Phase, Shutdown};

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct App<E> {
    pub engine: E,
    pub config: Arc<Config>,
    pub shutdown: Shutdown,
    pub health: Health,
    /// One permit per open WebSocket: the connection limit, and what the drain waits for.
    pub sockets: Arc<tokio::sync::Semaphore>,
    /// Per-client WebSocket limits (sockets and upgrade rate), checked before `sockets`.
    pub per_address: Arc<crate::addr_limits::SocketLimits>,
}

/// An error answered as `{"error": message}` with a status.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

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

pub async fn register<E: Engine>(
    State(app): State<App<E>>,
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
    let id = req.session_id;
    let record = SessionRecord {
        id: id.clone(),
        created_at: unix_now(),
        code: CodeHash::new(&code),
    };
    if !app.engine.register(record).await? {
        return Ok(Json(json!({
            "success": false,
            "session_url": "",
            "message": "Session already exists",
            "transports": [],
        }))
        .into_response());
    }
    let base = base_url(&app.config, &headers);
    let (_, transports, ws) = transports(&base, &id, "offerer", None);
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
        Some(s) if s.id == id => json!({ "exists": true, "created_at": s.created_at }),
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

pub async fn join<E: Engine>(
    State(app): State<App<E>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    check_id("session id", &id)?;
    let req: JoinRequest = parse(&body)?;
    let session = match admit(&app.engine, &id, req.passphrase.as_deref()).await {
        Ok(s) => s,
        Err(Refusal::Unavailable(e)) => return Err(e.into()),
        Err(refusal) => {
            return Ok(Json(json!({
                "success": false,
                "message": refusal.message(),
                "webrtc_offer": null,
                "transports": [],
            }))
            .into_response())
        }
    };
    let base = base_url(&app.config, &headers);
    let id = session.id;
    let (meta, transports, ws) = transports(&base, &id, "answerer", req.label.as_deref());
    Ok(Json(json!({
        "success": true,
        "message": null,
        "webrtc_offer": meta,
        "session_url": format!("{base}/sessions/{id}"),
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

pub async fn attach<E: Engine>(State(app): State<App<E>>, body: Bytes) -> ApiResult {
    let req: AttachRequest = parse(&body)?;
    check_id("host_session_id", &req.host_session_id)?;
    let session = match admit(&app.engine, &req.host_session_id, req.passphrase.as_deref()).await {
        Ok(s) => s,
        Err(Refusal::Unavailable(e)) => return Err(e.into()),
        Err(Refusal::NotFound) => {
            return Err(ApiError(StatusCode::NOT_FOUND, "Session not found".into()))
        }
        Err(refusal) => return Err(ApiError(StatusCode::UNAUTHORIZED, refusal.message())),
    };
    let Some(pid) = app.engine.attach(&session.id).await? else {
        return Err(ApiError(StatusCode::NOT_FOUND, "Session not found".into()));
    };
    Ok(Json(json!({ "peer_session_id": pid, "host_session_id": session.id })).into_response())
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

/// Resolves the mailbox's room, or the route's "missing" status.
async fn room<E: Engine>(app: &App<E>, id: &str, path: &MatchedPath) -> Result<String, ApiError> {
    check_id("session id", id)?;
    match app.engine.resolve(id).await? {
        Some(s) => Ok(s.id),
        None => Err(ApiError(missing_status(path), "Session not found".into())),
    }
}

/// Stores an offer or an answer. Both peers must be members of the session's room: the
/// mailbox is not open to anyone who knows a session id.
pub async fn post_sdp<E: Engine>(
    State(app): State<App<E>>,
    path: MatchedPath,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
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
    let room = room(&app, &id, &path).await?;
    for peer in [&payload.from_peer, &payload.to_peer] {
        if !app.engine.is_member(&room, peer).await? {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("peer {peer} has not joined this session"),
            ));
        }
    }
    let stored = serde_json::to_string(&payload).expect("payload serializes");
    if path.as_str().ends_with("/offer") {
        app.engine
            .push_offer(&room, &payload.to_peer, stored)
            .await?;
    } else {
        app.engine
            .put_answer(&room, &payload.handshake_id, stored)
            .await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
pub struct OfferQuery {
    peer_id: Option<String>,
}

/// Takes the oldest offer queued for `peer_id`, which must be a member of the room.
pub async fn get_offer<E: Engine>(
    State(app): State<App<E>>,
    path: MatchedPath,
    Path(id): Path<String>,
    Query(q): Query<OfferQuery>,
) -> ApiResult {
    let peer = q.peer_id.unwrap_or_default();
    check_id("peer_id", &peer)?;
    let room = room(&app, &id, &path).await?;
    if !app.engine.is_member(&room, &peer).await? {
        return Err(ApiError(
            missing_status(&path),
            format!("peer {peer} has not joined this session"),
        ));
    }
    stored_or_missing(app.engine.pop_offer(&room, &peer).await?, &path)
}

#[derive(Deserialize)]
pub struct AnswerQuery {
    handshake_id: Option<String>,
}

/// Takes the answer of a handshake; exactly one reader gets it.
pub async fn get_answer<E: Engine>(
    State(app): State<App<E>>,
    path: MatchedPath,
    Path(id): Path<String>,
    Query(q): Query<AnswerQuery>,
) -> ApiResult {
    let handshake = q.handshake_id.unwrap_or_default();
    check_id("handshake_id", &handshake)?;
    let room = room(&app, &id, &path).await?;
    stored_or_missing(app.engine.take_answer(&room, &handshake).await?, &path)
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
