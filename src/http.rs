//! HTTP plumbing shared by the routes (the app state, errors, body parsing, public URLs) and the
//! health and readiness routes; sessions are in [`crate::sessions`], the mailbox in
//! [`crate::mailbox`].
//!
//! Bodies are parsed by hand from bytes so that malformed JSON gets a JSON error (400) rather
//! than axum's plain-text rejection. Register and join failures are `200 success:false` because
//! the clients rely on it; an engine that cannot answer gives 503 at once.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::code::Secret;
use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::health::Health;
use crate::protocol::valid_id;
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
    /// Per-client WebSocket limits (sockets and upgrade rate), checked before `sockets`.
    pub per_address: Arc<crate::addr_limits::SocketLimits>,
    /// The Admin API's token and limiter; `None`: the Admin API is off.
    pub admin: Option<Arc<crate::admin::Admin>>,
}

/// An error answered as `{"error": message}` with a status.
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }

    pub fn forbidden(msg: impl Into<String>) -> Self {
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

/// Where an engine failure becomes a response: the cause is logged here, the client gets 503
/// and the fixed message of its kind.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        tracing::warn!(
            kind = e.kind(),
            cause = e.cause(),
            "request refused: engine error"
        );
        crate::metrics::refused(e.kind());
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.client_message().into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub type ApiResult = Result<Response, ApiError>;

pub fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

pub fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
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
pub fn ws_base(base: &str) -> String {
    if let Some(rest) = base.strip_prefix("https") {
        format!("wss{rest}")
    } else if let Some(rest) = base.strip_prefix("http") {
        format!("ws{rest}")
    } else {
        base.to_owned()
    }
}

/// The transport list and URLs of a session, as register and join answer them.
pub fn transports(base: &str, id: &str, role: &str, label: Option<&str>) -> (Value, Value, String) {
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
        Ok(Err(e)) => {
            // Polled every few seconds by the balancer: debug, not warn.
            tracing::debug!(kind = e.kind(), cause = e.cause(), "not ready");
            e.client_message()
        }
        Err(_) => "session store did not answer in time",
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "ready": false, "reason": reason })),
    )
        .into_response()
}

/// Runs every request inside a `request` span naming its route pattern (never the path itself:
/// it may hold a token); handlers record `session` and `peer` once they know them.
pub async fn request_span(
    route: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use tracing::Instrument;
    let route = route.as_ref().map_or("unmatched", |r| r.as_str());
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        route,
        session = tracing::field::Empty,
        peer = tracing::field::Empty
    );
    next.run(req).instrument(span).await
}

/// Records the request's session (and acting peer) on its span (see [`request_span`]).
pub fn record_session(session: &str, peer: Option<&str>) {
    let span = tracing::Span::current();
    span.record("session", session);
    if let Some(peer) = peer {
        span.record("peer", peer);
    }
}

/// `GET /metrics`: every series of [`crate::metrics`], for scrapers on `--metrics-allow`
/// addresses that reach this instance directly; anyone else gets the 404 of an unknown path.
pub async fn metrics<E: Engine>(
    State(app): State<App<E>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
) -> Response {
    let ip = crate::client::canonical(peer.ip());
    let direct = !crate::client::trusted(ip, &app.config.trusted_proxies);
    if !direct || !app.config.metrics_allow.iter().any(|net| net.contains(&ip)) {
        crate::metrics::refused("metrics_not_allowed");
        return StatusCode::NOT_FOUND.into_response();
    }
    let (peers_joined, rooms_local) = app.engine.router().occupancy();
    let (pubsub_self_ping_age, heartbeat_age) = app.engine.liveness_ages();
    let scrape = crate::metrics::Scrape {
        websockets_open: app.engine.local_peers(),
        peers_joined,
        rooms_local,
        relay_sockets: app.engine.router().relays().count(),
        lag: app.health.lag(),
        draining: app.shutdown.phase() != Phase::Serving,
        log_lines_dropped: app.health.dropped_logs(),
        pubsub_self_ping_age,
        heartbeat_age,
    };
    match crate::metrics::render(scrape) {
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no metrics recorder").into_response(),
    }
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
