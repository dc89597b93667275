//! Conformance: every route and message of `../shared/protocol.md` with its success and failure
//! shapes, the full flows of both client generations and of the browser client, and every bug
//! of protocol.md §7 that must not come back. Each test runs twice, against the in-process
//! engine (`memory::`) and against Redis (`redis::`, with its own redis-server).
//!
//! Every server → client message any test receives is also checked against the types of
//! protocol.md §4.2 (see `common::Ws::next`).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};

use common::{
    assert_keys, find_peer, flows, hex_bytes, is_six_digits, sdp, sealed_sdp, uuid, Ctx, Scope, Ws,
};

/// Long enough for a stray message to show up on loopback, short enough to keep tests quick.
const QUIET: Duration = Duration::from_millis(400);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[track_caller]
fn assert_recent(ts: &Value) {
    let ts = ts
        .as_u64()
        .unwrap_or_else(|| panic!("not an integer timestamp: {ts}"));
    let now = unix_now();
    assert!(
        ts + 120 >= now && ts <= now + 120,
        "timestamp {ts} far from now {now}"
    );
}

/// Asserts the PeerInfo shape of protocol.md §4.2.
#[track_caller]
fn assert_peer_info(p: &Value) {
    let obj = p.as_object().unwrap_or_else(|| panic!("PeerInfo: {p}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    let without_meta = [
        "id",
        "joined_at",
        "preferred_transport",
        "role",
        "supported_transports",
    ];
    let mut with_meta = without_meta.to_vec();
    with_meta.push("metadata");
    with_meta.sort();
    assert!(
        keys == without_meta || keys == with_meta,
        "PeerInfo keys {keys:?}: {p}"
    );
    assert!(p["id"].is_string());
    assert!(p["role"] == "server" || p["role"] == "client", "role: {p}");
    assert_recent(&p["joined_at"]);
    assert!(p["supported_transports"].is_array());
    if let Some(meta) = obj.get("metadata") {
        for (k, v) in meta.as_object().expect("metadata is an object") {
            assert!(v.is_string(), "metadata {k} is not a string: {p}");
        }
    }
}

/// The socket still answers: `ping` → `pong`.
async fn assert_usable(ws: &mut Ws) {
    ws.send_json(json!({"type": "ping"})).await;
    ws.recv_type("pong").await;
}

/// Expected transports of a register (`offerer`) or join (`answerer`) answer.
fn expected_transports(ctx: &Ctx, id: &str, role: &str) -> (Value, Value) {
    let meta = json!({
        "signaling_url": format!("{}/sessions/{id}/webrtc", ctx.base()),
        "role": role,
        "poll_interval_ms": 250,
    });
    let list = json!([
        { "kind": "web_rtc", "metadata": meta },
        { "kind": "web_socket", "url": ctx.ws_url(id) },
    ]);
    (meta, list)
}

conformance! {

// ---------------------------------------------------------------------------------------------
// POST /sessions
// ---------------------------------------------------------------------------------------------

async fn register_generates_a_six_digit_code(ctx: &Ctx) {
    let api = ctx.api();
    let mut codes = BTreeSet::new();
    for _ in 0..8 {
        let id = uuid();
        let body = api.register(&id, None).await;
        let (_, transports) = expected_transports(ctx, &id, "offerer");
        let code = body["join_code"].as_str().expect("join_code").to_owned();
        assert!(is_six_digits(&code), "join_code {code:?}");
        let expected = json!({
            "success": true,
            "session_url": format!("{}/sessions/{id}", ctx.base()),
            "message": null,
            "session_id": id,
            "join_code": code,
            "transports": transports,
            "websocket_url": ctx.ws_url(&id),
        });
        assert_eq!(body, expected);
        codes.insert(code);
    }
    assert!(codes.len() > 1, "codes are not random: {codes:?}");
    // A blank passphrase is no passphrase: a code is generated.
    let body = api.register(&uuid(), Some("   ")).await;
    assert!(is_six_digits(body["join_code"].as_str().unwrap()), "{body}");
}

async fn register_echoes_the_passphrase(ctx: &Ctx) {
    let id = uuid();
    let body = ctx.api().register(&id, Some("SMOKEP")).await;
    assert_eq!(body["success"], true);
    assert_eq!(body["join_code"], "SMOKEP");
    assert_eq!(body["session_id"], id);
}

async fn register_existing_session_fails_with_exact_body(ctx: &Ctx) {
    let api = ctx.api();
    let id = uuid();
    assert_eq!(api.register(&id, None).await["success"], true);
    let again = api.register(&id, Some("OTHER1")).await;
    assert_eq!(
        again,
        json!({"success": false, "session_url": "", "message": "Session already exists",
               "transports": []})
    );
    // The original registration is untouched: its code still works, the second one does not.
    let wrong = api.join_http(&id, Some("OTHER1")).await;
    assert_eq!(wrong["message"], "Invalid passphrase");
}

async fn concurrent_registrations_exactly_one_wins(ctx: &Ctx) {
    let api = ctx.api();
    let id = uuid();
    let tries = (0..12).map(|i| {
        let api = api.clone();
        let id = id.clone();
        async move { api.register(&id, Some(&format!("CODE{i:02}"))).await }
    });
    let results = join_all(tries).await;
    let winners: Vec<&Value> = results.iter().filter(|b| b["success"] == true).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for b in &results {
        if b["success"] == false {
            assert_eq!(b["message"], "Session already exists");
        }
    }
    // The winner's code is the one in force.
    let code = winners[0]["join_code"].as_str().unwrap();
    assert_eq!(api.join_http(&id, Some(code)).await["success"], true);
}

async fn register_rejects_bad_ids_and_bodies(ctx: &Ctx) {
    let api = ctx.api();
    for bad in [
        json!({"session_id": "a:b"}),
        json!({"session_id": ""}),
        json!({"session_id": "x".repeat(65)}),
        json!({"session_id": "a b"}),
        json!({"session_id": "{tag}"}),
        json!({"passphrase": "x"}),
        json!({"session_id": 5}),
    ] {
        let r = api.post("/sessions", &bad).await;
        assert_eq!(r.status, 400, "{bad} → {r:?}");
        assert!(r.body["error"].is_string(), "JSON error body for {bad}: {r:?}");
    }
    let r = api.post_raw("/sessions", "{not json").await;
    assert_eq!(r.status, 400);
    assert!(r.body["error"].is_string(), "{r:?}");
    // Nothing was stored under the would-be aliasing id.
    assert_eq!(api.get_ok("/sessions/a").await.body["exists"], false);
}

// ---------------------------------------------------------------------------------------------
// GET /sessions/{id}
// ---------------------------------------------------------------------------------------------

async fn session_status_known_and_unknown(ctx: &Ctx) {
    let api = ctx.api();
    let s = ctx.session().await;
    let r = api.status(&s.id).await;
    r.assert_status(200);
    assert_keys(&r.body, &["exists", "created_at"]);
    assert_eq!(r.body["exists"], true);
    assert_recent(&r.body["created_at"]);

    let r = api.status(&uuid()).await;
    r.assert_status(200);
    assert_eq!(r.body, json!({"exists": false, "created_at": null}));

    assert_eq!(api.status("a:b").await.status, 400);
}

// ---------------------------------------------------------------------------------------------
// POST /sessions/{id}/join
// ---------------------------------------------------------------------------------------------

async fn http_join_success_shape(ctx: &Ctx) {
    let s = ctx.session().await;
    let body = ctx.api().join_http(&s.id, Some(&s.code)).await;
    let (meta, transports) = expected_transports(ctx, &s.id, "answerer");
    assert_eq!(
        body,
        json!({
            "success": true,
            "message": null,
            "webrtc_offer": meta,
            "session_url": format!("{}/sessions/{}", ctx.base(), s.id),
            "transports": transports,
            "websocket_url": ctx.ws_url(&s.id),
        })
    );
    // Extra fields (label, mcp, viewer_token) are accepted; the label shows in the metadata.
    let r = ctx
        .api()
        .post(
            &format!("/sessions/{}/join", s.id),
            &json!({"passphrase": s.code, "label": "probe-joiner", "mcp": true,
                    "viewer_token": "tok"}),
        )
        .await;
    r.assert_status(200);
    assert_eq!(r.body["success"], true);
    assert_eq!(r.body["webrtc_offer"]["role"], "answerer");
}

async fn http_join_failures(ctx: &Ctx) {
    let api = ctx.api();
    let s = ctx.session().await;
    let failure = |message: &str| {
        json!({"success": false, "message": message, "webrtc_offer": null, "transports": []})
    };
    assert_eq!(
        api.join_http(&uuid(), Some("123456")).await,
        failure("Session not found")
    );
    assert_eq!(api.join_http(&s.id, None).await, failure("Passphrase required"));
    assert_eq!(api.join_http(&s.id, Some("")).await, failure("Passphrase required"));
    let wrong = if s.code == "000000" { "000001" } else { "000000" };
    let body = api.join_http(&s.id, Some(wrong)).await;
    assert_eq!(body, failure("Invalid passphrase"));
    // Generation 1 recognises authentication errors by these words.
    let msg = body["message"].as_str().unwrap().to_lowercase();
    assert!(msg.contains("invalid") || msg.contains("code"));

    let r = api.post_raw(&format!("/sessions/{}/join", s.id), "nope").await;
    assert_eq!(r.status, 400);
    assert!(r.body["error"].is_string());
    assert_eq!(
        api.post("/sessions/a:b/join", &json!({"passphrase": "x"})).await.status,
        400
    );
}

async fn wrong_code_guesses_are_limited(ctx: &Ctx) {
    let api = ctx.api();
    let s = ctx.session_with(Some("RIGHT1")).await;
    for i in 0..10 {
        let body = api.join_http(&s.id, Some(&format!("WRONG{i}"))).await;
        assert_eq!(body["success"], false);
    }
    // Now even the right code is refused, with a message gen 1 shows as an auth error.
    let body = api.join_http(&s.id, Some("RIGHT1")).await;
    assert_eq!(body["success"], false, "{body}");
    let msg = body["message"].as_str().unwrap().to_lowercase();
    assert!(msg.contains("invalid") || msg.contains("code"), "{msg}");
    assert_eq!(body["webrtc_offer"], Value::Null);
    // ... on every way in: WebSocket join and attach.
    let mut ws = ctx.ws(&s.id).await;
    let reason = ws.join_refused(Some("RIGHT1")).await.to_lowercase();
    assert!(reason.contains("invalid") || reason.contains("code"), "{reason}");
    assert_eq!(api.attach(&s.id, Some("RIGHT1"), "offerer").await.status, 401);
    // Other sessions are not affected.
    let other = ctx.session().await;
    assert_eq!(api.join_http(&other.id, Some(&other.code)).await["success"], true);
}

async fn websocket_wrong_codes_count_too(ctx: &Ctx) {
    let s = ctx.session_with(Some("RIGHT2")).await;
    let mut ws = ctx.ws(&s.id).await;
    for i in 0..10 {
        assert_eq!(ws.join_refused(Some(&format!("BAD{i}"))).await, "Invalid passphrase");
    }
    let body = ctx.api().join_http(&s.id, Some("RIGHT2")).await;
    assert_eq!(body["success"], false, "{body}");
}

// ---------------------------------------------------------------------------------------------
// POST /peer-sessions/attach
// ---------------------------------------------------------------------------------------------

async fn attach_success_and_reuse(ctx: &Ctx) {
    let api = ctx.api();
    let s = ctx.session_with(Some("SMOKEP")).await;
    let a = api.attach(&s.id, Some("SMOKEP"), "offerer").await;
    a.assert_status(200);
    assert_keys(&a.body, &["peer_session_id", "host_session_id"]);
    assert_eq!(a.body["host_session_id"], s.id);
    let pid = a.body["peer_session_id"].as_str().unwrap().to_owned();
    assert!(common::uuid().len() == pid.len() && pid != s.id, "{pid}");
    let b = api.attach(&s.id, Some("SMOKEP"), "answerer").await;
    b.assert_status(200);
    assert_eq!(b.body["peer_session_id"], pid.as_str(), "one peer session per host");
    // Without role/peer_id too.
    let c = api
        .post(
            "/peer-sessions/attach",
            &json!({"host_session_id": s.id, "passphrase": "SMOKEP"}),
        )
        .await;
    c.assert_status(200);
    assert_eq!(c.body["peer_session_id"], pid.as_str());
    // A different session gets a different peer session.
    let t = ctx.session_with(Some("SMOKEP")).await;
    assert_ne!(api.peer_session(&t.id, "SMOKEP").await, pid);
}

async fn attach_failures(ctx: &Ctx) {
    let api = ctx.api();
    let s = ctx.session_with(Some("SMOKEP")).await;
    assert_eq!(api.attach(&uuid(), Some("SMOKEP"), "offerer").await.status, 404);
    assert_eq!(api.attach(&s.id, None, "offerer").await.status, 401);
    assert_eq!(api.attach(&s.id, Some(""), "offerer").await.status, 401);
    assert_eq!(api.attach(&s.id, Some("WRONG"), "offerer").await.status, 401);
    assert_eq!(api.attach("a:b", Some("SMOKEP"), "offerer").await.status, 400);
    let r = api.post_raw("/peer-sessions/attach", "[").await;
    assert_eq!(r.status, 400);
    assert!(r.body["error"].is_string());
}

// ---------------------------------------------------------------------------------------------
// The mailbox
// ---------------------------------------------------------------------------------------------

async fn mailbox_unknown_session(ctx: &Ctx) {
    let api = ctx.api();
    let (a, b, h) = (uuid(), uuid(), uuid());
    for scope in [Scope::Sessions, Scope::PeerSessions] {
        let id = uuid();
        for kind in ["offer", "answer"] {
            let r = api.post_sdp(scope, &id, kind, &sdp(kind, &h, &a, &b)).await;
            assert_eq!(r.status, scope.missing(), "POST {kind} {scope:?}: {r:?}");
        }
        assert_eq!(api.get_offer(scope, &id, &a).await.status, scope.missing());
        assert_eq!(api.get_answer(scope, &id, &h).await.status, scope.missing());
    }
}

async fn mailbox_empty(ctx: &Ctx) {
    let mut room = ctx.room().await;
    let pid = ctx.api().peer_session(&room.session.id, &room.session.code).await;
    let api = ctx.api();
    for (scope, id) in [(Scope::Sessions, &room.session.id), (Scope::PeerSessions, &pid)] {
        let r = api.get_offer(scope, id, &room.joiner.id()).await;
        assert_eq!(r.status, scope.missing(), "{scope:?}: {r:?}");
        let r = api.get_answer(scope, id, &uuid()).await;
        assert_eq!(r.status, scope.missing(), "{scope:?}: {r:?}");
    }
    room.host.expect_silence(Duration::from_millis(50)).await;
}

async fn mailbox_blank_and_bad_ids(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner, id) = (room.host.id(), room.joiner.id(), room.session.id.clone());
    for scope in [Scope::Sessions, Scope::PeerSessions] {
        let p = scope.prefix();
        for field in ["handshake_id", "from_peer", "to_peer"] {
            for bad in ["", "  ", "a:b"] {
                let mut payload = sdp("offer", &uuid(), &host, &joiner);
                payload[field] = json!(bad);
                let r = api.post_sdp(scope, &id, "offer", &payload).await;
                assert_eq!(r.status, 400, "{field}={bad:?} on {p}: {r:?}");
            }
        }
        // A required field missing or of the wrong type.
        let mut payload = sdp("offer", &uuid(), &host, &joiner);
        payload.as_object_mut().unwrap().remove("sdp");
        assert_eq!(api.post_sdp(scope, &id, "offer", &payload).await.status, 400);
        let r = api.post_raw(&format!("/{p}/{id}/webrtc/answer"), "{").await;
        assert_eq!(r.status, 400);
        assert!(r.body["error"].is_string());
        for path in [
            format!("/{p}/{id}/webrtc/offer"),
            format!("/{p}/{id}/webrtc/offer?peer_id="),
            format!("/{p}/{id}/webrtc/offer?peer_id=a%3Ab"),
            format!("/{p}/{id}/webrtc/answer"),
            format!("/{p}/{id}/webrtc/answer?handshake_id="),
        ] {
            assert_eq!(api.get_ok(&path).await.status, 400, "GET {path}");
        }
        let r = api.post_sdp(scope, "a:b", "offer", &sdp("offer", &uuid(), &host, &joiner)).await;
        assert_eq!(r.status, 400);
    }
}

async fn mailbox_refuses_non_members(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner, id) = (room.host.id(), room.joiner.id(), room.session.id.clone());
    let stranger = uuid();
    // A peer of another room is a stranger here too.
    let mut other = ctx.room().await;
    for from_to in [(&stranger, &joiner), (&host, &stranger), (&other.host.id(), &joiner)] {
        for kind in ["offer", "answer"] {
            let r = api
                .post_sdp(Scope::Sessions, &id, kind, &sdp(kind, &uuid(), from_to.0, from_to.1))
                .await;
            assert_eq!(r.status, 403, "{kind} {from_to:?}: {r:?}");
            assert!(r.body["error"].is_string());
        }
    }
    // Polling for a non-member is refused (nothing is ever delivered to it).
    api.post_sdp(Scope::Sessions, &id, "offer", &sdp("offer", &uuid(), &host, &joiner))
        .await
        .assert_status(204);
    for peer in [&stranger, &other.joiner.id()] {
        let r = api.get_offer(Scope::Sessions, &id, peer).await;
        assert_eq!(r.status, 404, "{r:?}");
    }
    let pid = api.peer_session(&id, &room.session.code).await;
    assert_eq!(api.get_offer(Scope::PeerSessions, &pid, &stranger).await.status, 409);
    // The member still gets its offer.
    api.get_offer(Scope::Sessions, &id, &joiner).await.assert_status(200);
    other.host.expect_silence(Duration::from_millis(50)).await;
}

async fn mailbox_offers_fifo_once_and_removed(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner, id) = (room.host.id(), room.joiner.id(), room.session.id.clone());
    let offers: Vec<Value> = (0..3).map(|_| sdp("offer", &uuid(), &host, &joiner)).collect();
    for o in &offers {
        api.post_sdp(Scope::Sessions, &id, "offer", o).await.assert_status(204);
    }
    // Nothing for the host: offers queue per recipient.
    assert_eq!(api.get_offer(Scope::Sessions, &id, &host).await.status, 404);
    for o in &offers {
        let r = api.get_offer(Scope::Sessions, &id, &joiner).await;
        r.assert_status(200);
        assert_eq!(&r.body, o);
    }
    assert_eq!(api.get_offer(Scope::Sessions, &id, &joiner).await.status, 404);
}

async fn mailbox_concurrent_offer_readers_get_each_offer_once(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner, id) = (room.host.id(), room.joiner.id(), room.session.id.clone());
    let offer = sdp("offer", &uuid(), &host, &joiner);
    api.post_sdp(Scope::Sessions, &id, "offer", &offer).await.assert_status(204);
    let readers = (0..8).map(|_| {
        let api = api.clone();
        let (id, joiner) = (id.clone(), joiner.clone());
        async move { api.get_offer(Scope::Sessions, &id, &joiner).await }
    });
    let results = join_all(readers).await;
    let got: Vec<_> = results.iter().filter(|r| r.status == 200).collect();
    assert_eq!(got.len(), 1, "{results:?}");
    assert_eq!(got[0].body, offer);
    assert!(results.iter().all(|r| r.status == 200 || r.status == 404));
}

async fn mailbox_answer_taken_by_exactly_one_reader(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner, id) = (room.host.id(), room.joiner.id(), room.session.id.clone());
    let pid = api.peer_session(&id, &room.session.code).await;
    for (scope, sid) in [(Scope::Sessions, &id), (Scope::PeerSessions, &pid)] {
        let h = uuid();
        let answer = sdp("answer", &h, &joiner, &host);
        api.post_sdp(scope, sid, "answer", &answer).await.assert_status(204);
        let readers = (0..8).map(|_| {
            let api = api.clone();
            let (sid, h) = (sid.clone(), h.clone());
            async move { api.get_answer(scope, &sid, &h).await }
        });
        let results = join_all(readers).await;
        let got: Vec<_> = results.iter().filter(|r| r.status == 200).collect();
        assert_eq!(got.len(), 1, "{scope:?}: {results:?}");
        assert_eq!(got[0].body, answer);
        assert!(results
            .iter()
            .all(|r| r.status == 200 || r.status == scope.missing()));
        assert_eq!(api.get_answer(scope, sid, &h).await.status, scope.missing());
    }
}

async fn mailbox_answer_slot_keeps_the_latest(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner, id) = (room.host.id(), room.joiner.id(), room.session.id.clone());
    let h = uuid();
    let first = sdp("answer", &h, &joiner, &host);
    let mut second = first.clone();
    second["sdp"] = json!("v=0 second");
    api.post_sdp(Scope::Sessions, &id, "answer", &first).await.assert_status(204);
    api.post_sdp(Scope::Sessions, &id, "answer", &second).await.assert_status(204);
    assert_eq!(api.get_answer(Scope::Sessions, &id, &h).await.body, second);
    assert_eq!(api.get_answer(Scope::Sessions, &id, &h).await.status, 404);
}

async fn mailbox_keeps_sealed_and_extra_fields_verbatim(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner, id) = (room.host.id(), room.joiner.id(), room.session.id.clone());
    let pid = api.peer_session(&id, &room.session.code).await;
    for (scope, sid) in [(Scope::Sessions, &id), (Scope::PeerSessions, &pid)] {
        let h = uuid();
        let mut offer = sealed_sdp("offer", &h, &host, &joiner);
        offer["extra"] = json!({"nested": [1, 2.5, null, true, "x"], "unicode": "é✓"});
        offer["number"] = json!(42);
        let answer = sealed_sdp("answer", &h, &joiner, &host);
        api.post_sdp(scope, sid, "offer", &offer).await.assert_status(204);
        let got = api.get_offer(scope, sid, &joiner).await;
        got.assert_status(200);
        assert_eq!(got.body, offer);
        api.post_sdp(scope, sid, "answer", &answer).await.assert_status(204);
        let got = api.get_answer(scope, sid, &h).await;
        got.assert_status(200);
        assert_eq!(got.body, answer);
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket: join
// ---------------------------------------------------------------------------------------------

async fn ws_join_success_shape(ctx: &Ctx) {
    let s = ctx.session().await;
    let mut host = ctx.ws(&s.id).await;
    let mut msg = Ws::join_msg(Some(&s.code));
    msg["supported_transports"] = json!(["webrtc", "direct", {"custom": "pipe"}]);
    let host_ok = host.join_with(msg).await;
    assert_keys(
        &host_ok,
        &["type", "session_id", "peer_id", "peers", "available_transports"],
    );
    assert_eq!(host_ok["session_id"], s.id);
    let host_id = host.id();
    assert_ne!(host_id, "", "server-assigned id");
    let peers = host_ok["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "peers include the receiver itself");
    assert_peer_info(&peers[0]);
    assert_eq!(peers[0]["id"], host_id.as_str());
    assert_eq!(peers[0]["role"], "server");
    assert_eq!(peers[0]["preferred_transport"], "webrtc");
    assert_eq!(
        host_ok["available_transports"],
        json!(["webrtc", "direct", {"custom": "pipe"}])
    );
    let host_joined_at = peers[0]["joined_at"].clone();

    // The joiner names no preferred transport: null on the wire.
    let mut joiner = ctx.ws(&s.id).await;
    let mut msg = Ws::join_msg(Some(&s.code));
    msg["supported_transports"] = json!([{"custom": "pipe"}, "webrtc"]);
    msg.as_object_mut().unwrap().remove("preferred_transport");
    let ok = joiner.join_with(msg).await;
    assert_ne!(joiner.id(), host_id);
    assert_eq!(ok["peers"].as_array().unwrap().len(), 2);
    for p in ok["peers"].as_array().unwrap() {
        assert_peer_info(p);
    }
    let me = find_peer(&ok, &joiner.id());
    assert_eq!(me["role"], "client");
    assert_eq!(me["preferred_transport"], Value::Null);
    assert!(me.as_object().unwrap().contains_key("preferred_transport"));
    let h = find_peer(&ok, &host_id);
    assert_eq!(h["role"], "server");
    // joined_at is when each peer joined, not "now" for everyone.
    assert_eq!(h["joined_at"], host_joined_at);
    // The intersection, in the first peer's order.
    assert_eq!(ok["available_transports"], json!(["webrtc", {"custom": "pipe"}]));

    let joined = host.recv_type("peer_joined").await;
    assert_keys(&joined, &["type", "peer"]);
    assert_peer_info(&joined["peer"]);
    assert_eq!(&joined["peer"], me);
}

async fn ws_join_metadata(ctx: &Ctx) {
    let s = ctx.session().await;
    let mut host = ctx.ws(&s.id).await;
    let ok = host.join(Some(&s.code)).await;
    let meta = &ok["peers"][0]["metadata"];
    let addr = meta["remote_addr"].as_str().expect("remote_addr");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert!(meta.get("label").is_none() && meta.get("mcp").is_none(), "{meta}");

    let mut joiner = ctx.ws(&s.id).await;
    let mut msg = Ws::join_msg(Some(&s.code));
    msg["label"] = json!("probe-joiner");
    msg["mcp"] = json!(true);
    msg["viewer_token"] = json!("ignored");
    msg["unknown_field"] = json!({"ignored": true});
    msg["metadata"] = json!({"role": "answerer", "peer_session_id": "p1", "peer_id": "c1",
                             "host_session_id": s.id, "remote_addr": "forged"});
    let ok = joiner.join_with(msg).await;
    let meta = find_peer(&ok, &joiner.id())["metadata"].clone();
    assert_eq!(meta["label"], "probe-joiner");
    assert_eq!(meta["mcp"], "true");
    assert_eq!(meta["role"], "answerer");
    assert_eq!(meta["peer_session_id"], "p1");
    assert_eq!(meta["peer_id"], "c1");
    assert_eq!(meta["host_session_id"], s.id);
    let addr = meta["remote_addr"].as_str().unwrap();
    assert!(addr.starts_with("127.0.0.1:"), "the server's remote_addr wins: {addr}");
    let joined = host.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["metadata"], meta);
}

async fn ws_join_errors(ctx: &Ctx) {
    let s = ctx.session_with(Some("SMOKEP")).await;
    let mut host = ctx.ws(&s.id).await;
    host.join(Some("SMOKEP")).await;

    let mut ws = ctx.ws(&uuid()).await;
    assert_eq!(ws.join_refused(Some("SMOKEP")).await, "Session not found");
    assert_usable(&mut ws).await;

    let mut ws = ctx.ws(&s.id).await;
    assert_eq!(ws.join_refused(None).await, "Passphrase required");
    assert_eq!(ws.join_refused(Some("")).await, "Passphrase required");
    assert_eq!(ws.join_refused(Some("WRONG")).await, "Invalid passphrase");
    // After a refusal the same socket may still join with the right code.
    let ok = ws.join(Some("SMOKEP")).await;
    assert_eq!(find_peer(&ok, &ws.id())["role"], "client");
    // Refused joiners were never announced; only the successful one is.
    let joined = host.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["id"], ws.id());
    host.expect_silence(QUIET).await;

    // A join without the required fields is a malformed message, not a join.
    let mut ws = ctx.ws(&s.id).await;
    ws.send_json(json!({"type": "join", "passphrase": "SMOKEP"})).await;
    ws.recv_type("error").await;
    assert_usable(&mut ws).await;
    host.expect_silence(QUIET).await;
}

async fn ws_malformed_id_is_refused(ctx: &Ctx) {
    for bad in ["a:b", "%7Btag%7D", &"x".repeat(65)] {
        let err = Ws::try_connect(&ctx.ws_url(bad)).await.err();
        assert!(err.is_some(), "upgrade of /ws/{bad} accepted");
        let err = err.unwrap();
        assert!(err.contains("HTTP 4"), "/ws/{bad}: {err}");
    }
}

async fn ws_join_through_peer_session(ctx: &Ctx) {
    let s = ctx.session_with(Some("SMOKEP")).await;
    let pid = ctx.api().peer_session(&s.id, "SMOKEP").await;
    let mut host = ctx.ws(&pid).await;
    let ok = host.join(Some("SMOKEP")).await;
    assert_eq!(ok["session_id"], s.id, "session_id is the host session");
    assert_eq!(ok["peers"][0]["role"], "server");
    // A joiner on the host session id is in the same room.
    let mut joiner = ctx.ws(&s.id).await;
    let ok = joiner.join(Some("SMOKEP")).await;
    assert_eq!(ok["peers"].as_array().unwrap().len(), 2);
    assert_eq!(host.recv_type("peer_joined").await["peer"]["id"], joiner.id());
}

async fn roles_first_server_then_clients_and_no_demotion(ctx: &Ctx) {
    let s = ctx.session().await;
    let mut host = ctx.ws(&s.id).await;
    let first = host.join(Some(&s.code)).await;
    assert_eq!(first["peers"][0]["role"], "server");
    let mut clients: Vec<Ws> = Vec::new();
    for _ in 0..3 {
        let mut c = ctx.ws(&s.id).await;
        let ok = c.join(Some(&s.code)).await;
        assert_eq!(find_peer(&ok, &c.id())["role"], "client");
        assert_eq!(find_peer(&ok, &host.id())["role"], "server");
        host.recv_type("peer_joined").await;
        for earlier in clients.iter_mut() {
            earlier.recv_type("peer_joined").await;
        }
        clients.push(c);
    }
    // A second join on the same socket: still server, same id, nobody told again.
    let again = host.join(Some(&s.code)).await;
    assert_eq!(find_peer(&again, &host.id())["role"], "server");
    assert_eq!(again["peers"].as_array().unwrap().len(), 4);
    let mut c0 = clients.remove(0);
    let again = c0.join(Some(&s.code)).await;
    assert_eq!(find_peer(&again, &c0.id())["role"], "client");
    assert_eq!(again["peers"].as_array().unwrap().len(), 4);
    host.expect_silence(QUIET).await;
    for c in clients.iter_mut() {
        c.expect_silence(Duration::from_millis(50)).await;
    }
}

async fn concurrent_first_joins_exactly_one_server(ctx: &Ctx) {
    for _round in 0..3 {
        let s = ctx.session().await;
        let mut sockets = Vec::new();
        for _ in 0..6 {
            sockets.push(ctx.ws(&s.id).await);
        }
        let joins = sockets.iter_mut().map(|ws| ws.join(Some(&s.code)));
        let results = join_all(joins).await;
        let servers: Vec<String> = results
            .iter()
            .zip(&sockets)
            .filter(|(ok, ws)| find_peer(ok, &ws.id())["role"] == "server")
            .map(|(_, ws)| ws.id())
            .collect();
        assert_eq!(servers.len(), 1, "{results:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket: relaying
// ---------------------------------------------------------------------------------------------

async fn relay_signal_negotiate_accept(ctx: &Ctx) {
    let mut room = ctx.room().await;
    let (host_id, joiner_id) = (room.host.id(), room.joiner.id());
    let ice = json!({"transport": "webrtc", "signal": {"signal_type": "ice_candidate",
        "candidate": "candidate:1 1 udp 2130706431 10.77.0.1 51026 typ host",
        "sdp_mid": "", "sdp_mline_index": 0, "handshake_id": uuid()}});
    room.host
        .send_json(json!({"type": "signal", "to_peer": joiner_id, "signal": ice,
                          "from_peer": "forged"}))
        .await;
    let got = room.joiner.recv_type("signal").await;
    assert_eq!(got, json!({"type": "signal", "from_peer": host_id, "signal": ice}));

    room.joiner
        .send_json(json!({"type": "signal", "to_peer": host_id, "signal": [1, "two", null]}))
        .await;
    let got = room.host.recv_type("signal").await;
    assert_eq!(got, json!({"type": "signal", "from_peer": joiner_id, "signal": [1, "two", null]}));

    room.joiner
        .send_json(json!({"type": "negotiate_transport", "to_peer": host_id,
                          "proposed_transport": {"custom": "pipe"}}))
        .await;
    let got = room.host.recv_type("transport_proposal").await;
    assert_eq!(
        got,
        json!({"type": "transport_proposal", "from_peer": joiner_id,
               "proposed_transport": {"custom": "pipe"}})
    );

    room.host
        .send_json(json!({"type": "accept_transport", "to_peer": joiner_id,
                          "transport": "webrtc"}))
        .await;
    let got = room.joiner.recv_type("transport_accepted").await;
    assert_eq!(
        got,
        json!({"type": "transport_accepted", "from_peer": host_id, "transport": "webrtc"})
    );
    // Nothing echoes back to the sender.
    room.host.expect_silence(QUIET).await;
    room.joiner.expect_silence(Duration::from_millis(50)).await;
}

async fn relay_keeps_order(ctx: &Ctx) {
    let mut room = ctx.room().await;
    let joiner_id = room.joiner.id();
    for i in 0..50 {
        room.host
            .send_json(json!({"type": "signal", "to_peer": joiner_id, "signal": {"n": i}}))
            .await;
    }
    for i in 0..50 {
        assert_eq!(room.joiner.recv_type("signal").await["signal"]["n"], i);
    }
}

async fn relay_before_join_is_refused(ctx: &Ctx) {
    let mut room = ctx.room().await;
    let mut stranger = ctx.ws(&room.session.id).await;
    for msg in [
        json!({"type": "signal", "to_peer": room.host.id(), "signal": {}}),
        json!({"type": "negotiate_transport", "to_peer": room.host.id(),
               "proposed_transport": "webrtc"}),
        json!({"type": "accept_transport", "to_peer": room.host.id(), "transport": "webrtc"}),
        json!({"type": "debug", "request": {"type": "get_stats"}}),
    ] {
        stranger.send_json(msg.clone()).await;
        let e = stranger.recv_type("error").await;
        assert_keys(&e, &["type", "message"]);
    }
    assert_usable(&mut stranger).await;
    room.host.expect_silence(QUIET).await;
    room.joiner.expect_silence(Duration::from_millis(50)).await;
}

async fn relay_to_unknown_or_foreign_peer_is_refused(ctx: &Ctx) {
    let mut room = ctx.room().await;
    let mut other = ctx.room().await;
    for to in [uuid(), other.joiner.id(), other.host.id(), "a:b".into()] {
        room.host
            .send_json(json!({"type": "signal", "to_peer": to, "signal": {"x": 1}}))
            .await;
        room.host.recv_type("error").await;
    }
    // The socket stays usable and relays within its room.
    room.host
        .send_json(json!({"type": "signal", "to_peer": room.joiner.id(), "signal": {"x": 2}}))
        .await;
    assert_eq!(room.joiner.recv_type("signal").await["signal"]["x"], 2);
    other.host.expect_silence(QUIET).await;
    other.joiner.expect_silence(Duration::from_millis(50)).await;
}

async fn ping_pong_before_and_after_join(ctx: &Ctx) {
    let s = ctx.session().await;
    let mut ws = ctx.ws(&s.id).await;
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.recv_json().await, json!({"type": "pong"}));
    ws.join(Some(&s.code)).await;
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.recv_json().await, json!({"type": "pong"}));
    // Unknown socket ids get pongs too (the upgrade does not need a session).
    let mut ws = ctx.ws(&uuid()).await;
    assert_usable(&mut ws).await;
}

async fn debug_forwarded_to_the_server_peer(ctx: &Ctx) {
    let mut room = ctx.room().await;
    let joiner_id = room.joiner.id();
    let request = json!({"type": "get_grid_view", "extra": 1});
    room.joiner
        .send_json(json!({"type": "debug", "request": request}))
        .await;
    let got = room.host.recv_type("signal").await;
    assert_eq!(
        got,
        json!({"type": "signal", "from_peer": joiner_id, "signal": {
            "transport": "custom", "transport_name": "debug", "signal_type": "debug_request",
            "payload": {"from_peer": joiner_id, "request": request}}})
    );
    room.joiner.expect_silence(QUIET).await;
    // The server peer may debug itself too.
    room.host
        .send_json(json!({"type": "debug", "request": {"type": "get_stats"}}))
        .await;
    let got = room.host.recv_type("signal").await;
    assert_eq!(got["signal"]["payload"]["request"]["type"], "get_stats");
}

async fn debug_without_server_peer_is_an_error(ctx: &Ctx) {
    let room = ctx.room().await;
    let mut joiner = room.joiner;
    room.host.close_abruptly().await;
    assert!(joiner.recv_type("peer_left").await["peer_id"].is_string());
    joiner
        .send_json(json!({"type": "debug", "request": {"type": "clear_history"}}))
        .await;
    joiner.recv_type("error").await;
    assert_usable(&mut joiner).await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket: bad input
// ---------------------------------------------------------------------------------------------

async fn malformed_frames_get_an_error_and_the_socket_stays(ctx: &Ctx) {
    let mut room = ctx.room().await;
    for bad in [
        "{not json",
        "[]",
        r#"{"type":"no_such_type"}"#,
        r#"{"type":"signal","to_peer":5}"#,
    ] {
        room.joiner.send_text(bad).await;
        let e = room.joiner.recv_type("error").await;
        assert!(e["message"].is_string(), "{e}");
    }
    assert_usable(&mut room.joiner).await;
    // Still relays.
    room.joiner
        .send_json(json!({"type": "signal", "to_peer": room.host.id(), "signal": 1}))
        .await;
    room.host.recv_type("signal").await;
    room.host.expect_silence(QUIET).await;
}

async fn error_replies_are_bounded(ctx: &Ctx) {
    let mut room = ctx.room().await;
    let mut garbage = ctx.ws(&room.session.id).await;
    for i in 0..60u8 {
        garbage.send_binary(vec![1, 0, 0, 0, i, 0xff, 0x41, 0x78]).await;
    }
    let mut errors = 0;
    while let Ok(Some(v)) = garbage.next(QUIET).await {
        assert_eq!(v["type"], "error");
        errors += 1;
    }
    assert!((1..=20).contains(&errors), "{errors} error replies to 60 bad frames");
    assert_usable(&mut garbage).await;
    room.host.expect_silence(Duration::from_millis(50)).await;
}

async fn json_in_binary_frames_works(ctx: &Ctx) {
    let s = ctx.session().await;
    let mut host = ctx.ws(&s.id).await;
    let join = Ws::join_msg(Some(&s.code));
    host.send_binary(join.to_string().into_bytes()).await;
    let ok = host.recv_type("join_success").await;
    let host_id = ok["peer_id"].as_str().unwrap().to_owned();
    host.send_binary(br#"{"type":"ping"}"#.to_vec()).await;
    host.recv_type("pong").await;
    let mut joiner = ctx.ws(&s.id).await;
    joiner.join(Some(&s.code)).await;
    host.recv_type("peer_joined").await;
    let msg = json!({"type": "signal", "to_peer": joiner.id(), "signal": {"b": true}});
    host.send_binary(msg.to_string().into_bytes()).await;
    let got = joiner.recv_type("signal").await;
    assert_eq!(got["from_peer"], host_id.as_str());
}

async fn oversized_frame_closes_with_1009(ctx: &Ctx) {
    let mut room = ctx.room().await;
    let mut big = ctx.ws(&room.session.id).await;
    big.join(Some(&room.session.code)).await;
    let big_id = big.id();
    room.host.recv_type("peer_joined").await;
    room.joiner.recv_type("peer_joined").await;
    let payload = "x".repeat(70 * 1024);
    let msg = json!({"type": "signal", "to_peer": room.host.id(), "signal": payload});
    let _ = big.try_send(tokio_tungstenite::tungstenite::Message::text(msg.to_string())).await;
    let (before, closed) = big.expect_close().await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(closed.code(), Some(1009), "{closed:?}");
    // The others see it leave and nothing else; they keep working.
    let left = room.host.recv_type("peer_left").await;
    assert_eq!(left["peer_id"], big_id.as_str());
    assert_eq!(room.joiner.recv_type("peer_left").await["peer_id"], big_id.as_str());
    room.host
        .send_json(json!({"type": "signal", "to_peer": room.joiner.id(), "signal": "ok"}))
        .await;
    room.joiner.recv_type("signal").await;
    // Just under the limit is fine.
    let mut fine = ctx.ws(&room.session.id).await;
    fine.send_json(json!({"type": "ping", "pad": "y".repeat(60 * 1024)})).await;
    fine.recv_type("pong").await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket: leaving
// ---------------------------------------------------------------------------------------------

async fn peer_left_on_close_fin_and_reset(ctx: &Ctx) {
    let s = ctx.session().await;
    let mut host = ctx.ws(&s.id).await;
    host.join(Some(&s.code)).await;
    for how in ["fin", "rst", "close"] {
        let mut j = ctx.ws(&s.id).await;
        j.join(Some(&s.code)).await;
        let id = j.id();
        host.recv_type("peer_joined").await;
        match how {
            "fin" => j.close_abruptly().await,
            "rst" => j.reset().await,
            _ => j.close().await,
        }
        let left = host.recv_type("peer_left").await;
        assert_eq!(left, json!({"type": "peer_left", "peer_id": id}), "{how}");
    }
    host.expect_silence(QUIET).await;
    // A peer that left is no longer a relay target.
    let gone = {
        let mut j = ctx.ws(&s.id).await;
        j.join(Some(&s.code)).await;
        host.recv_type("peer_joined").await;
        let id = j.id();
        j.close_abruptly().await;
        host.recv_type("peer_left").await;
        id
    };
    host.send_json(json!({"type": "signal", "to_peer": gone, "signal": 1}))
        .await;
    host.recv_type("error").await;
}

async fn no_peer_left_for_sockets_that_never_joined(ctx: &Ctx) {
    let mut room = ctx.room().await;
    // Silent, pinging, refused, and garbage-sending sockets.
    let silent = ctx.ws(&room.session.id).await;
    let mut pinging = ctx.ws(&room.session.id).await;
    assert_usable(&mut pinging).await;
    let mut refused = ctx.ws(&room.session.id).await;
    refused.join_refused(Some("nope!")).await;
    let mut garbage = ctx.ws(&room.session.id).await;
    garbage
        .send_binary(hex_bytes("01000000000000000000000003417828"))
        .await;
    silent.close_abruptly().await;
    pinging.reset().await;
    refused.close().await;
    garbage.close_abruptly().await;
    room.host.expect_silence(QUIET).await;
    room.joiner.expect_silence(Duration::from_millis(50)).await;
}

async fn ice_relayed_before_the_offer_is_fetched(ctx: &Ctx) {
    let mut room = ctx.room().await;
    let api = ctx.api();
    let (host_id, joiner_id, id) = (room.host.id(), room.joiner.id(), room.session.id.clone());
    let h = uuid();
    api.post_sdp(Scope::Sessions, &id, "offer", &sdp("offer", &h, &host_id, &joiner_id))
        .await
        .assert_status(204);
    for n in 0..3 {
        room.host
            .send_json(json!({"type": "signal", "to_peer": joiner_id,
                              "signal": {"transport": "webrtc", "signal": {
                                  "signal_type": "ice_candidate", "candidate": format!("c{n}"),
                                  "handshake_id": h}}}))
            .await;
    }
    for n in 0..3 {
        let got = room.joiner.recv_type("signal").await;
        assert_eq!(got["signal"]["signal"]["candidate"], format!("c{n}"));
    }
    // The offer is still there afterwards.
    let offer = api.get_offer(Scope::Sessions, &id, &joiner_id).await;
    offer.assert_status(200);
    assert_eq!(offer.body["handshake_id"], h.as_str());
}

// ---------------------------------------------------------------------------------------------
// Full flows
// ---------------------------------------------------------------------------------------------

// The flows live in `common::flows`; `cluster.rs` runs them with host and joiner on two
// instances. Here both sides talk to the same server.

async fn generation1_flow(ctx: &Ctx) {
    flows::generation1_flow(&ctx.server, &ctx.server).await;
}

async fn generation2_flow(ctx: &Ctx) {
    flows::generation2_flow(&ctx.server, &ctx.server).await;
}

async fn browser_flow(ctx: &Ctx) {
    flows::browser_flow(&ctx.server, &ctx.server).await;
}

}

/// The harness itself: a server whose stdout nobody reads still starts, and signals reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_unread_stdout_and_signals() {
    common::bounded(async {
        let mut server = common::Server::builder()
            .stdout(common::Stdout::UnreadPipe)
            .start()
            .await;
        assert!(server.pid() > 0);
        server.signal(libc::SIGSTOP);
        server.signal(libc::SIGCONT);
        server
            .wait_healthy(common::START_TIMEOUT)
            .await
            .expect("healthy after SIGCONT");
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(10)).await;
        assert!(status.is_some(), "no exit within 10 s of SIGTERM");
    })
    .await;
}
