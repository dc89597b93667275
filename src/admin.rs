//! The Admin API, HTTP side: off unless a bearer token is configured (`--admin-token` or
//! `--admin-token-file`); then `/admin/...` answers to `Authorization: Bearer <token>` only.
//!
//! - `GET /admin/sessions/{id}`: the session and its room across every instance;
//! - `POST /admin/sessions/{id}/close`: ends it for good, every member's socket closed;
//! - `GET /admin/instances`: the live instances and the age of their heartbeats.
//!
//! Off, no route exists: every `/admin/...` path gets the 404 of any unknown path. The token is
//! compared as a SHA-256 digest in constant time (neither its bytes nor its length leak), never
//! logged, and wrong ones are limited per client address ([`FAILURE_BURST`], then one per
//! [`FAILURE_REFILL`]): a guesser is refused (429) without a comparison, while the operator
//! elsewhere is not affected. What the engines read and do is in [`crate::engine::admin`].

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::addr_limits::Rate;
use crate::client::{client_ip, limit_key};
use crate::config::Config;
use crate::engine::admin::CloseOutcome;
use crate::engine::Engine;
use crate::http::{check_id, too_many, ApiError, ApiResult, App};

/// Shortest token accepted, in bytes.
pub const MIN_TOKEN_LEN: usize = 32;
/// Wrong tokens one address may present at once...
pub const FAILURE_BURST: u32 = 10;
/// ...and one more per this long.
pub const FAILURE_REFILL: Duration = Duration::from_secs(6);

/// The configured token (as its digest) and the wrong-token limiter.
pub struct Admin {
    digest: [u8; 32],
    failures: Rate,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admin(..)")
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Admin {
    /// A token of at least [`MIN_TOKEN_LEN`] bytes (surrounding whitespace, e.g. a file's
    /// trailing newline, is ignored).
    pub fn new(token: &[u8]) -> Result<Admin, String> {
        let token = token.trim_ascii();
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the admin token must have at least {MIN_TOKEN_LEN} bytes (got {})",
                token.len()
            ));
        }
        Ok(Admin {
            digest: digest(token),
            failures: Rate::new(FAILURE_BURST, 1.0 / FAILURE_REFILL.as_secs_f64()),
        })
    }

    /// The Admin API as configured: `None` (off) when no token is given.
    pub fn from_config(config: &Config) -> Result<Option<Admin>, String> {
        match (&config.admin_token, &config.admin_token_file) {
            (Some(_), Some(_)) => {
                Err("set either --admin-token or --admin-token-file, not both".into())
            }
            (Some(t), None) => Admin::new(t.as_bytes()).map(Some),
            (None, Some(path)) => {
                let bytes = std::fs::read(path).map_err(|e| {
                    format!("cannot read the admin token file {}: {e}", path.display())
                })?;
                Admin::new(&bytes).map(Some)
            }
            (None, None) => Ok(None),
        }
    }

    /// Whether `presented` is the token: digests compared in constant time.
    fn matches(&self, presented: &str) -> bool {
        bool::from(digest(presented.trim().as_bytes()).ct_eq(&self.digest))
    }

    /// Admits a request from `client` with the token in `headers`, or says why not.
    fn authorize(&self, headers: &HeaderMap, client: IpAddr) -> Result<(), Refused> {
        let key = limit_key(client);
        let now = Instant::now();
        if let Err(wait) = self.failures.check(key, now) {
            tracing::debug!(%client, "admin request refused: too many wrong tokens");
            return Err(Refused::Locked(wait));
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            });
        match presented {
            Some(token) if self.matches(token) => Ok(()),
            Some(_) => {
                let _ = self.failures.take(key, now);
                tracing::warn!(%client, "admin request refused: wrong token");
                Err(Refused::Wrong)
            }
            None => Err(Refused::Missing),
        }
    }
}

/// Why an admin request was not admitted.
#[derive(Debug)]
enum Refused {
    /// The Admin API is off: as an unknown path.
    Off,
    Missing,
    Wrong,
    /// Too many wrong tokens from this address: no comparison until this long has passed.
    Locked(Duration),
}

impl IntoResponse for Refused {
    /// 401 with `WWW-Authenticate: Bearer` and the usual JSON error; 429 when locked.
    fn into_response(self) -> Response {
        crate::metrics::refused(match self {
            Refused::Off => "admin_off",
            Refused::Locked(_) => "admin_locked",
            Refused::Missing | Refused::Wrong => "admin_token",
        });
        let message = match self {
            Refused::Off => return StatusCode::NOT_FOUND.into_response(),
            Refused::Locked(wait) => {
                let body = json!({ "error": "too many wrong admin tokens; try again later" });
                return too_many(wait, body);
            }
            Refused::Missing => "admin token required",
            Refused::Wrong => "invalid admin token",
        };
        (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Bearer realm=\"beach-road admin\"",
            )],
            Json(json!({ "error": message })),
        )
            .into_response()
    }
}

/// The Admin API's routes when `on`, else none (its paths are then unknown paths).
pub fn routes<E: Engine>(on: bool) -> Router<App<E>> {
    if !on {
        return Router::new();
    }
    Router::new()
        .route("/admin/sessions/{id}", get(session::<E>))
        .route("/admin/sessions/{id}/close", post(close::<E>))
        .route("/admin/instances", get(instances::<E>))
}

/// The request's client, if it holds the token.
fn admit<E: Engine>(
    app: &App<E>,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<IpAddr, Refused> {
    let client = client_ip(headers, peer, &app.config.trusted_proxies);
    // Routes exist only with a token configured.
    let admin = app.admin.as_deref().ok_or(Refused::Off)?;
    admin.authorize(headers, client)?;
    Ok(client)
}

fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "session not found".into())
}

/// `GET /admin/sessions/{id}`
async fn session<E: Engine>(
    State(app): State<App<E>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    if let Err(refused) = admit(&app, &headers, peer) {
        return Ok(refused.into_response());
    }
    check_id("session id", &id)?;
    let view = app.engine.admin_session(&id).await?.ok_or_else(not_found)?;
    Ok(Json(view).into_response())
}

/// `POST /admin/sessions/{id}/close`
async fn close<E: Engine>(
    State(app): State<App<E>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let client = match admit(&app, &headers, peer) {
        Ok(client) => client,
        Err(refused) => return Ok(refused.into_response()),
    };
    check_id("session id", &id)?;
    let (peers, already) = match app.engine.admin_close(&id).await? {
        CloseOutcome::NotFound => return Err(not_found()),
        CloseOutcome::Closed { peers } => (peers, false),
        CloseOutcome::AlreadyClosed { peers } => (peers, true),
    };
    tracing::info!(session = %id, peers, already, %client, "admin: session closed");
    Ok(Json(json!({
        "session_id": id,
        "closed": true,
        "already_closed": already,
        "peers": peers,
    }))
    .into_response())
}

/// `GET /admin/instances`
async fn instances<E: Engine>(
    State(app): State<App<E>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> ApiResult {
    if let Err(refused) = admit(&app, &headers, peer) {
        return Ok(refused.into_response());
    }
    let instances = app.engine.admin_instances().await?;
    Ok(Json(json!({ "instances": instances })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    const TOKEN: &str = "an-admin-token-of-at-least-32-bytes!";

    #[test]
    fn short_tokens_are_refused() {
        assert!(Admin::new(b"short").is_err());
        assert!(Admin::new(format!("{}\n", "x".repeat(32)).as_bytes()).is_ok());
    }

    #[test]
    fn the_right_token_passes_and_a_guesser_is_limited_alone() {
        let admin = Admin::new(TOKEN.as_bytes()).unwrap();
        let guesser: IpAddr = "1.1.1.1".parse().unwrap();
        let operator: IpAddr = "2.2.2.2".parse().unwrap();
        assert!(admin.authorize(&bearer(TOKEN), guesser).is_ok());
        let missing = admin.authorize(&HeaderMap::new(), guesser).unwrap_err();
        let missing = missing.into_response();
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        assert!(missing.headers().contains_key(header::WWW_AUTHENTICATE));
        for _ in 0..FAILURE_BURST {
            let wrong = admin.authorize(&bearer("nope"), guesser).unwrap_err();
            assert!(matches!(wrong, Refused::Wrong), "{wrong:?}");
        }
        let locked = admin.authorize(&bearer(TOKEN), guesser).unwrap_err();
        assert_eq!(
            locked.into_response().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert!(admin.authorize(&bearer(TOKEN), operator).is_ok());
    }
}
