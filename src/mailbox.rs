//! The offer/answer mailbox (protocol.md §3.3): each request acts for the peer bound to the
//! token in its URL, never for the ids in its body or query (`docs/protocol.md`).

use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;

use crate::engine::{Engine, Grant};
use crate::http::{check_id, parse, ApiError, ApiResult, App};
use crate::protocol::SdpPayload;

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
    crate::http::record_session(&room, Some(&peer));
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
        crate::metrics::refused("too_large");
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
        crate::metrics::refused("mailbox_full");
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
