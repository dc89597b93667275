//! Conformance: every route and message of `docs/protocol.md` with its success and failure
//! shapes, as `docs/protocol.md` changes them (capability tokens, roles from the id a socket
//! joined through, the mailbox acting for the token's peer, limits on codes, registrations and
//! rooms), the full flows of both client generations and of the browser client, and every bug
//! of protocol.md §7 that must not come back. Each test runs twice, against the in-process
//! engine (`memory::`) and against Redis (`redis::`, with its own redis-server).
//!
//! Every server → client message any test receives is also checked against the types of
//! protocol.md §4.2 (see `common::Ws::next`).

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};

use common::{
    assert_keys, find_peer, flows, hex_bytes, is_six_digits, sdp, sealed_sdp, url_id, uuid, Ctx,
    Resp, Scope, Ws,
};

/// Long enough for a stray message to show up on loopback, short enough to keep tests quick.
const QUIET: Duration = Duration::from_millis(400);

/// The refusal of a locked-out code check (HTTP `message`, WebSocket `join_error` reason).
const LOCKED: &str = "Too many invalid codes; try again later";

/// Wrong codes one address may send per session within the window (`--max-code-failures`).
const PER_ADDRESS: usize = 5;
/// Wrong codes a session takes from all addresses within the window.
const PER_SESSION: usize = 50;
/// The code-failure window, in seconds (10 min): the longest `Retry-After` of a lockout.
const CODE_WINDOW_SECS: u64 = 600;
/// Members one room holds at most.
const MAX_ROOM_PEERS: usize = 32;

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

/// Expected transports of a register (`offerer`) or join (`answerer`) answer whose URLs carry
/// `id` (the host's or the joiner's token).
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

/// A capability token: a random UUID, distinct from the public session id.
#[track_caller]
fn assert_token(token: &str, session: &str) {
    assert!(uuid::Uuid::parse_str(token).is_ok(), "not a UUID: {token}");
    assert_ne!(token, session, "a token is not the session id");
}

/// A mailbox refusal: 403 with a JSON `error`.
#[track_caller]
fn assert_forbidden(r: &Resp, what: &str) {
    assert_eq!(r.status, 403, "{what}: {r:?}");
    assert!(
        r.body["error"].is_string(),
        "{what}: JSON error body: {r:?}"
    );
}

/// The failure body of `POST /sessions/{id}/join`.
fn join_failure(message: &str) -> Value {
    json!({"success": false, "message": message, "webrtc_offer": null, "transports": []})
}

/// An HTTP answer with its `Retry-After` (whole seconds), which `common::Resp` does not keep.
#[derive(Debug)]
struct Raw {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

impl Raw {
    /// A rate-limit refusal: 429 with `Retry-After` between 1 and `max` seconds.
    #[track_caller]
    fn assert_too_many(&self, max: u64) -> &Self {
        assert_eq!(self.status, 429, "{self:?}");
        let wait = self
            .retry_after
            .unwrap_or_else(|| panic!("429 without Retry-After: {self:?}"));
        assert!((1..=max).contains(&wait), "Retry-After {wait} s: {self:?}");
        self
    }
}

/// An HTTP client whose connections come from `from` (any 127.0.0.0/8 address reaches the
/// server on 127.0.0.1 and is another client address to it).
fn client_from(from: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from)
        .timeout(common::WAIT)
        .no_proxy()
        .build()
        .expect("http client")
}

/// `POST path` with a JSON body through `client`.
async fn post_raw(client: &reqwest::Client, ctx: &Ctx, path: &str, body: &Value) -> Raw {
    let resp = client
        .post(format!("{}{path}", ctx.base()))
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().expect("Retry-After in seconds"));
    let bytes = resp.bytes().await.expect("read the response body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Raw {
        status,
        retry_after,
        body,
    }
}

/// `127.0.0.n`
fn loopback(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// HTTP join with `code` from `client`.
async fn join_from(client: &reqwest::Client, ctx: &Ctx, id: &str, code: &str) -> Raw {
    post_raw(
        client,
        ctx,
        &format!("/sessions/{id}/join"),
        &json!({ "passphrase": code }),
    )
    .await
}

/// Waits for one `peer_joined` on each socket; returns the announced peers.
async fn all_hear_joined(sockets: &mut [Ws]) -> Vec<Value> {
    let mut peers = Vec::new();
    for ws in sockets.iter_mut() {
        peers.push(ws.recv_type("peer_joined").await["peer"].clone());
    }
    peers
}

/// Waits for one `peer_left` of `id` on each socket.
async fn all_hear_left(sockets: &mut [Ws], id: &str) {
    for ws in sockets.iter_mut() {
        assert_eq!(ws.recv_type("peer_left").await["peer_id"], id);
    }
}

/// The role of peer `id` in a `join_success`.
#[track_caller]
fn role_of(join_success: &Value, id: &str) -> String {
    find_peer(join_success, id)["role"]
        .as_str()
        .expect("role")
        .to_owned()
}

conformance! {

// ---------------------------------------------------------------------------------------------
// POST /sessions
// ---------------------------------------------------------------------------------------------

async fn register_generates_a_six_digit_code(ctx: &Ctx) {
    let api = ctx.api();
    let mut codes = BTreeSet::new();
    let mut hosts = BTreeSet::new();
    for _ in 0..8 {
        let id = uuid();
        let body = api.register(&id, None).await;
        let code = body["join_code"].as_str().expect("join_code").to_owned();
        assert!(is_six_digits(&code), "join_code {code:?}");
        // The host's URLs carry its token; session_url and session_id the public id.
        let host = url_id(body["websocket_url"].as_str().expect("websocket_url"));
        assert_token(&host, &id);
        let (_, transports) = expected_transports(ctx, &host, "offerer");
        let expected = json!({
            "success": true,
            "session_url": format!("{}/sessions/{id}", ctx.base()),
            "message": null,
            "session_id": id,
            "join_code": code,
            "transports": transports,
            "websocket_url": ctx.ws_url(&host),
        });
        assert_eq!(body, expected);
        // The token is no session id anybody could look up.
        assert_eq!(
            api.status(&host).await.body,
            json!({"exists": false, "created_at": null})
        );
        codes.insert(code);
        hosts.insert(host);
    }
    assert!(codes.len() > 1, "codes are not random: {codes:?}");
    assert_eq!(hosts.len(), 8, "host tokens are not unique: {hosts:?}");
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
    let api = ctx.api();
    let s = ctx.session().await;
    let body = api.join_http(&s.id, Some(&s.code)).await;
    // The joiner's URLs carry its own token; session_url the public id.
    let token = url_id(body["websocket_url"].as_str().expect("websocket_url"));
    assert_token(&token, &s.id);
    assert_ne!(token, s.host);
    let (meta, transports) = expected_transports(ctx, &token, "answerer");
    assert_eq!(
        body,
        json!({
            "success": true,
            "message": null,
            "webrtc_offer": meta,
            "session_url": format!("{}/sessions/{}", ctx.base(), s.id),
            "transports": transports,
            "websocket_url": ctx.ws_url(&token),
        })
    );
    // Extra fields (label, mcp, viewer_token) are accepted; the label shows in webrtc_offer.
    let r = api
        .post(
            &format!("/sessions/{}/join", s.id),
            &json!({"passphrase": s.code, "label": "probe-joiner", "mcp": true,
                    "viewer_token": "tok"}),
        )
        .await;
    r.assert_status(200);
    assert_eq!(r.body["success"], true);
    assert_eq!(r.body["webrtc_offer"]["role"], "answerer");
    assert_eq!(r.body["webrtc_offer"]["label"], "probe-joiner");
    // Every join mints a token of its own.
    let second = url_id(r.body["webrtc_offer"]["signaling_url"].as_str().unwrap());
    assert_token(&second, &s.id);
    let third = api.join_token(&s.id, &s.code).await;
    let all: BTreeSet<&String> = [&s.host, &token, &second, &third].into_iter().collect();
    assert_eq!(all.len(), 4, "tokens are not unique: {all:?}");
}

async fn http_join_failures(ctx: &Ctx) {
    let api = ctx.api();
    let s = ctx.session().await;
    assert_eq!(
        api.join_http(&uuid(), Some("123456")).await,
        join_failure("Session not found")
    );
    assert_eq!(api.join_http(&s.id, None).await, join_failure("Passphrase required"));
    assert_eq!(api.join_http(&s.id, Some("")).await, join_failure("Passphrase required"));
    let wrong = if s.code == "000000" { "000001" } else { "000000" };
    let body = api.join_http(&s.id, Some(wrong)).await;
    assert_eq!(body, join_failure("Invalid passphrase"));
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

async fn wrong_code_guesses_are_limited_per_address(ctx: &Ctx) {
    let api = ctx.api();
    let here = client_from(loopback(1));
    let s = ctx.session_with(Some("RIGHT1")).await;
    // Admitted before the guessing starts.
    let admitted = api.join_token(&s.id, "RIGHT1").await;
    let mut invalid = 0;
    let locked = loop {
        let r = join_from(&here, ctx, &s.id, &format!("WRONG{invalid}")).await;
        if r.status == 429 {
            break r;
        }
        assert_eq!((r.status, &r.body), (200, &join_failure("Invalid passphrase")));
        invalid += 1;
        assert!(invalid <= PER_ADDRESS, "no lockout after {invalid} wrong codes");
    };
    assert_eq!(invalid, PER_ADDRESS, "wrong codes answered before the lockout");
    locked.assert_too_many(CODE_WINDOW_SECS);
    assert_eq!(locked.body, join_failure(LOCKED));
    // Now even the right code is refused, with a message gen 1 shows as an auth error.
    let r = join_from(&here, ctx, &s.id, "RIGHT1").await;
    r.assert_too_many(CODE_WINDOW_SECS);
    assert_eq!(r.body, join_failure(LOCKED));
    let msg = LOCKED.to_lowercase();
    assert!(msg.contains("invalid") || msg.contains("code"), "{msg}");
    // ... on every way in: WebSocket join and attach.
    let mut ws = ctx.ws(&s.id).await;
    assert_eq!(ws.join_refused(Some("RIGHT1")).await, LOCKED);
    assert_usable(&mut ws).await;
    let r = post_raw(
        &here,
        ctx,
        "/peer-sessions/attach",
        &json!({"host_session_id": s.id, "passphrase": "RIGHT1"}),
    )
    .await;
    r.assert_too_many(CODE_WINDOW_SECS);
    assert_eq!(r.body, json!({ "error": LOCKED }));
    // Token holders are never locked out: the host, and a joiner admitted before.
    let mut host = ctx.ws(&s.host).await;
    let ok = host.join(Some("RIGHT1")).await;
    assert_eq!(role_of(&ok, &host.id()), "server");
    let mut joiner = ctx.ws(&admitted).await;
    let ok = joiner.join(Some("RIGHT1")).await;
    assert_eq!(role_of(&ok, &joiner.id()), "client");
    assert_eq!(api.peer_session(&admitted, "RIGHT1").await, admitted);
    // Another address is not locked out (the session took 5 of its 50)...
    let there = client_from(loopback(2));
    let r = join_from(&there, ctx, &s.id, "RIGHT1").await;
    assert_eq!((r.status, &r.body["success"]), (200, &json!(true)), "{r:?}");
    // ... nor is this address on other sessions.
    let other = ctx.session().await;
    let r = join_from(&here, ctx, &other.id, &other.code).await;
    assert_eq!((r.status, &r.body["success"]), (200, &json!(true)), "{r:?}");
}

async fn wrong_code_guesses_are_limited_per_session(ctx: &Ctx) {
    let s = ctx.session_with(Some("RIGHT3")).await;
    let admitted = ctx.api().join_token(&s.id, "RIGHT3").await;
    // Eleven addresses guess at once, one more than the session's budget of 50 holds.
    let mut guesses = Vec::new();
    for n in 10..21u8 {
        let client = client_from(loopback(n));
        for i in 0..=PER_ADDRESS {
            let (client, id) = (client.clone(), s.id.clone());
            guesses.push(async move {
                (n, join_from(&client, ctx, &id, &format!("BAD{n}x{i}")).await)
            });
        }
    }
    let results = join_all(guesses).await;
    let mut invalid = std::collections::BTreeMap::<u8, usize>::new();
    for (n, r) in &results {
        if r.status == 429 {
            r.assert_too_many(CODE_WINDOW_SECS);
            assert_eq!(r.body, join_failure(LOCKED));
        } else {
            assert_eq!((r.status, &r.body), (200, &join_failure("Invalid passphrase")));
            *invalid.entry(*n).or_default() += 1;
        }
    }
    assert!(
        invalid.values().all(|&k| k <= PER_ADDRESS),
        "an address got more than {PER_ADDRESS} answers: {invalid:?}"
    );
    assert_eq!(
        invalid.values().sum::<usize>(),
        PER_SESSION,
        "wrong codes answered: {invalid:?}"
    );
    // Past the session's budget the code is checked for nobody, from anywhere...
    let fresh = client_from(loopback(30));
    let r = join_from(&fresh, ctx, &s.id, "RIGHT3").await;
    r.assert_too_many(CODE_WINDOW_SECS);
    assert_eq!(r.body, join_failure(LOCKED));
    let mut ws = ctx.ws(&s.id).await;
    assert_eq!(ws.join_refused(Some("RIGHT3")).await, LOCKED);
    // ... but token holders still get in.
    let mut host = ctx.ws(&s.host).await;
    let ok = host.join(None).await;
    assert_eq!(role_of(&ok, &host.id()), "server");
    let mut joiner = ctx.ws(&admitted).await;
    let ok = joiner.join(None).await;
    assert_eq!(role_of(&ok, &joiner.id()), "client");
}

async fn websocket_wrong_codes_count_too(ctx: &Ctx) {
    let api = ctx.api();
    let s = ctx.session_with(Some("RIGHT2")).await;
    let mut ws = ctx.ws(&s.id).await;
    let mut invalid = 0;
    loop {
        let reason = ws.join_refused(Some(&format!("BAD{invalid}"))).await;
        if reason == LOCKED {
            break;
        }
        assert_eq!(reason, "Invalid passphrase");
        invalid += 1;
        assert!(invalid <= PER_ADDRESS, "no lockout after {invalid} wrong codes");
    }
    assert_eq!(invalid, PER_ADDRESS, "wrong codes answered before the lockout");
    // The right code is refused too: on this socket, a fresh one, and over HTTP.
    assert_eq!(ws.join_refused(Some("RIGHT2")).await, LOCKED);
    assert_usable(&mut ws).await;
    let mut fresh = ctx.ws(&s.id).await;
    assert_eq!(fresh.join_refused(Some("RIGHT2")).await, LOCKED);
    let here = client_from(loopback(1));
    let r = join_from(&here, ctx, &s.id, "RIGHT2").await;
    r.assert_too_many(CODE_WINDOW_SECS);
    assert_eq!(r.body, join_failure(LOCKED));

    // WebSocket, HTTP join and attach share one count.
    let t = ctx.session_with(Some("RIGHT4")).await;
    let mut ws = ctx.ws(&t.id).await;
    for i in 0..2 {
        assert_eq!(ws.join_refused(Some(&format!("WS{i}"))).await, "Invalid passphrase");
    }
    for i in 0..2 {
        let body = api.join_http(&t.id, Some(&format!("HTTP{i}"))).await;
        assert_eq!(body, join_failure("Invalid passphrase"));
    }
    assert_eq!(api.attach(&t.id, Some("ATTACH"), "answerer").await.status, 401);
    assert_eq!(ws.join_refused(Some("RIGHT4")).await, LOCKED);
    join_from(&here, ctx, &t.id, "RIGHT4")
        .await
        .assert_too_many(CODE_WINDOW_SECS);
    assert_eq!(api.attach(&t.id, Some("RIGHT4"), "answerer").await.status, 429);
}

// ---------------------------------------------------------------------------------------------
// POST /peer-sessions/attach
// ---------------------------------------------------------------------------------------------

async fn attach_returns_the_callers_token(ctx: &Ctx) {
    let api = ctx.api();
    let s = ctx.session_with(Some("SMOKEP")).await;
    // The host attaches with its token (the id of its signaling URL): that is its peer
    // session, with or without the code.
    for passphrase in [Some("SMOKEP"), None] {
        let a = api.attach(&s.host, passphrase, "offerer").await;
        a.assert_status(200);
        assert_keys(&a.body, &["peer_session_id", "host_session_id"]);
        assert_eq!(
            a.body,
            json!({"peer_session_id": s.host, "host_session_id": s.id}),
            "passphrase {passphrase:?}"
        );
    }
    // The session id and the code mint a joiner token, a fresh one every time: there is no
    // shared peer session.
    let a = api.attach(&s.id, Some("SMOKEP"), "answerer").await;
    a.assert_status(200);
    assert_keys(&a.body, &["peer_session_id", "host_session_id"]);
    assert_eq!(a.body["host_session_id"], s.id);
    let minted = a.body["peer_session_id"].as_str().unwrap().to_owned();
    assert_token(&minted, &s.id);
    assert_ne!(minted, s.host);
    // Without role/peer_id too.
    let b = api
        .post(
            "/peer-sessions/attach",
            &json!({"host_session_id": s.id, "passphrase": "SMOKEP"}),
        )
        .await;
    b.assert_status(200);
    assert_eq!(b.body["host_session_id"], s.id);
    let again = b.body["peer_session_id"].as_str().unwrap().to_owned();
    assert_token(&again, &s.id);
    assert_ne!(again, minted, "each attach with the code mints its own token");
    // A joiner token attaches as itself, without the code: minted by attach or by HTTP join.
    let joined = api.join_token(&s.id, "SMOKEP").await;
    for token in [&minted, &joined] {
        let r = api.attach(token, None, "answerer").await;
        r.assert_status(200);
        assert_eq!(
            r.body,
            json!({"peer_session_id": token, "host_session_id": s.id})
        );
    }
    // A minted token is a joiner's: its socket joins the host's room as client, no code.
    let mut host = ctx.ws(&s.host).await;
    host.join(None).await;
    let mut joiner = ctx.ws(&minted).await;
    let ok = joiner.join(None).await;
    assert_eq!(ok["session_id"], s.id);
    assert_eq!(role_of(&ok, &joiner.id()), "client");
    assert_eq!(role_of(&ok, &host.id()), "server");
    assert_eq!(host.recv_type("peer_joined").await["peer"]["id"], joiner.id());
    // Another session: its own host_session_id and tokens.
    let t = ctx.session_with(Some("SMOKEP")).await;
    let c = api.attach(&t.id, Some("SMOKEP"), "offerer").await;
    c.assert_status(200);
    assert_eq!(c.body["host_session_id"], t.id);
    let theirs = c.body["peer_session_id"].as_str().unwrap();
    assert!(
        ![&s.host, &minted, &again, &joined, &t.host].contains(&&theirs.to_owned()),
        "{theirs}"
    );
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
    let api = ctx.api();
    let (host_token, joiner_token) = (&room.session.host, &room.joiner_token);
    for scope in [Scope::Sessions, Scope::PeerSessions] {
        let r = api.get_offer(scope, joiner_token, &room.joiner.id()).await;
        assert_eq!(r.status, scope.missing(), "{scope:?}: {r:?}");
        let r = api.get_answer(scope, host_token, &uuid()).await;
        assert_eq!(r.status, scope.missing(), "{scope:?}: {r:?}");
    }
    room.host.expect_silence(Duration::from_millis(50)).await;
}

async fn mailbox_blank_and_bad_ids(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner) = (room.host.id(), room.joiner.id());
    let (ht, jt) = (room.session.host.clone(), room.joiner_token.clone());
    for scope in [Scope::Sessions, Scope::PeerSessions] {
        let p = scope.prefix();
        for field in ["handshake_id", "from_peer", "to_peer"] {
            for bad in ["", "  ", "a:b"] {
                let mut payload = sdp("offer", &uuid(), &host, &joiner);
                payload[field] = json!(bad);
                let r = api.post_sdp(scope, &ht, "offer", &payload).await;
                assert_eq!(r.status, 400, "{field}={bad:?} on {p}: {r:?}");
            }
        }
        // A required field missing or of the wrong type.
        let mut payload = sdp("offer", &uuid(), &host, &joiner);
        payload.as_object_mut().unwrap().remove("sdp");
        assert_eq!(api.post_sdp(scope, &ht, "offer", &payload).await.status, 400);
        let r = api.post_raw(&format!("/{p}/{jt}/webrtc/answer"), "{").await;
        assert_eq!(r.status, 400);
        assert!(r.body["error"].is_string());
        for path in [
            format!("/{p}/{jt}/webrtc/offer"),
            format!("/{p}/{jt}/webrtc/offer?peer_id="),
            format!("/{p}/{jt}/webrtc/offer?peer_id=a%3Ab"),
            format!("/{p}/{ht}/webrtc/answer"),
            format!("/{p}/{ht}/webrtc/answer?handshake_id="),
        ] {
            assert_eq!(api.get_ok(&path).await.status, 400, "GET {path}");
        }
        let r = api.post_sdp(scope, "a:b", "offer", &sdp("offer", &uuid(), &host, &joiner)).await;
        assert_eq!(r.status, 400);
    }
}

async fn mailbox_refuses_non_members(ctx: &Ctx) {
    let room = ctx.room().await;
    let mut other = ctx.room().await;
    let api = ctx.api();
    let (host, joiner) = (room.host.id(), room.joiner.id());
    let (ht, jt) = (&room.session.host, &room.joiner_token);
    let stranger = uuid();
    // Offers go to members only; a peer of another room is a stranger here too.
    for to in [&stranger, &other.joiner.id(), &other.host.id()] {
        let r = api
            .post_sdp(Scope::Sessions, ht, "offer", &sdp("offer", &uuid(), &host, to))
            .await;
        assert_forbidden(&r, &format!("offer to {to}"));
    }
    // So do answers.
    for to in [&stranger, &other.host.id()] {
        let r = api
            .post_sdp(Scope::Sessions, jt, "answer", &sdp("answer", &uuid(), &joiner, to))
            .await;
        assert_forbidden(&r, &format!("answer to {to}"));
    }
    // The other room's tokens do not reach into this room.
    let r = api
        .post_sdp(
            Scope::Sessions,
            &other.session.host,
            "offer",
            &sdp("offer", &uuid(), &other.host.id(), &joiner),
        )
        .await;
    assert_forbidden(&r, "offer from another room");
    let r = api
        .post_sdp(
            Scope::Sessions,
            &other.joiner_token,
            "answer",
            &sdp("answer", &uuid(), &other.joiner.id(), &host),
        )
        .await;
    assert_forbidden(&r, "answer from another room");
    // Nothing was queued by the refusals; the members' own offers still go through.
    assert_eq!(api.get_offer(Scope::Sessions, jt, &joiner).await.status, 404);
    let r = api
        .get_offer(Scope::Sessions, &other.joiner_token, &other.joiner.id())
        .await;
    assert_eq!(r.status, 404, "{r:?}");
    let offer = sdp("offer", &uuid(), &host, &joiner);
    api.post_sdp(Scope::Sessions, ht, "offer", &offer).await.assert_status(204);
    assert_eq!(api.get_offer(Scope::Sessions, jt, &joiner).await.body, offer);
    other.host.expect_silence(Duration::from_millis(50)).await;
}

async fn mailbox_refuses_the_public_id_and_the_wrong_token(ctx: &Ctx) {
    let mut room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner) = (room.host.id(), room.joiner.id());
    let (id, ht, jt) = (&room.session.id, &room.session.host, &room.joiner_token);
    // A second joiner, and a token whose socket has not joined yet.
    let (second, second_token) = ctx.joiner(&room.session).await;
    room.host.recv_type("peer_joined").await;
    room.joiner.recv_type("peer_joined").await;
    let unjoined = api.join_token(id, &room.session.code).await;
    let h = uuid();
    let offer = sdp("offer", &h, &host, &joiner);
    let answer = sdp("answer", &h, &joiner, &host);
    for scope in [Scope::Sessions, Scope::PeerSessions] {
        // Offers go out with the host's token only...
        for sid in [id, jt, &second_token, &unjoined] {
            let r = api.post_sdp(scope, sid, "offer", &offer).await;
            assert_forbidden(&r, &format!("{scope:?} offer posted through {sid}"));
        }
        // ... and only from the host's own peer.
        for from in [&joiner, &second.id(), &uuid()] {
            let r = api
                .post_sdp(scope, ht, "offer", &sdp("offer", &h, from, &joiner))
                .await;
            assert_forbidden(&r, &format!("{scope:?} offer from {from}"));
        }
        // Answers go out with a joiner's token only, from its own peer.
        for sid in [id, ht, &unjoined] {
            let r = api.post_sdp(scope, sid, "answer", &answer).await;
            assert_forbidden(&r, &format!("{scope:?} answer posted through {sid}"));
        }
        let r = api.post_sdp(scope, &second_token, "answer", &answer).await;
        assert_forbidden(&r, &format!("{scope:?} answer forged by the second joiner"));
        let r = api
            .post_sdp(scope, jt, "answer", &sdp("answer", &h, &host, &host))
            .await;
        assert_forbidden(&r, &format!("{scope:?} answer from the host's peer"));
        // Offers are taken with the recipient's own token only.
        for sid in [id, ht, &second_token, &unjoined] {
            let r = api.get_offer(scope, sid, &joiner).await;
            assert_forbidden(&r, &format!("{scope:?} offer taken through {sid}"));
        }
        for peer in [&host, &second.id(), &uuid()] {
            let r = api.get_offer(scope, jt, peer).await;
            assert_forbidden(&r, &format!("{scope:?} offers of {peer}"));
        }
        // Answers are taken with the host's token only.
        for sid in [id, jt, &second_token, &unjoined] {
            let r = api.get_answer(scope, sid, &h).await;
            assert_forbidden(&r, &format!("{scope:?} answer taken through {sid}"));
        }
    }
    // The refusals stored nothing; the right tokens work.
    assert_eq!(api.get_offer(Scope::Sessions, jt, &joiner).await.status, 404);
    assert_eq!(api.get_answer(Scope::Sessions, ht, &h).await.status, 404);
    api.post_sdp(Scope::Sessions, ht, "offer", &offer).await.assert_status(204);
    let r = api.get_offer(Scope::Sessions, &second_token, &second.id()).await;
    assert_eq!(r.status, 404, "offers queue per recipient: {r:?}");
    assert_eq!(api.get_offer(Scope::Sessions, jt, &joiner).await.body, offer);
    api.post_sdp(Scope::Sessions, jt, "answer", &answer).await.assert_status(204);
    assert_eq!(api.get_answer(Scope::Sessions, ht, &h).await.body, answer);
}

async fn mailbox_refuses_a_peer_that_left(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (mut host, joiner) = (room.host, room.joiner);
    let (host_id, joiner_id) = (host.id(), joiner.id());
    let (ht, jt) = (room.session.host.clone(), room.joiner_token.clone());
    let scope = Scope::Sessions;
    api.post_sdp(scope, &ht, "offer", &sdp("offer", &uuid(), &host_id, &joiner_id))
        .await
        .assert_status(204);
    // The joiner leaves: its token acts for nobody, and nothing more is posted to it.
    joiner.close_abruptly().await;
    assert_eq!(host.recv_type("peer_left").await["peer_id"], joiner_id);
    let h = uuid();
    assert_forbidden(&api.get_offer(scope, &jt, &joiner_id).await, "offer of a peer that left");
    let r = api
        .post_sdp(scope, &jt, "answer", &sdp("answer", &h, &joiner_id, &host_id))
        .await;
    assert_forbidden(&r, "answer from a peer that left");
    let r = api
        .post_sdp(scope, &ht, "offer", &sdp("offer", &h, &host_id, &joiner_id))
        .await;
    assert_forbidden(&r, "offer to a peer that left");
    // It comes back through its token: the token acts for the new peer only, whose queue is
    // empty (the old peer's offer went with it).
    let mut back = ctx.ws(&jt).await;
    back.join(None).await;
    let back_id = back.id();
    assert_eq!(host.recv_type("peer_joined").await["peer"]["id"], back_id);
    assert_forbidden(&api.get_offer(scope, &jt, &joiner_id).await, "offers of the old peer");
    assert_eq!(api.get_offer(scope, &jt, &back_id).await.status, 404);
    let offer = sdp("offer", &h, &host_id, &back_id);
    api.post_sdp(scope, &ht, "offer", &offer).await.assert_status(204);
    assert_eq!(api.get_offer(scope, &jt, &back_id).await.body, offer);
    // The host leaves: its token acts for nobody until it comes back.
    let answer = sdp("answer", &h, &back_id, &host_id);
    api.post_sdp(scope, &jt, "answer", &answer).await.assert_status(204);
    host.close_abruptly().await;
    assert_eq!(back.recv_type("peer_left").await["peer_id"], host_id);
    assert_forbidden(&api.get_answer(scope, &ht, &h).await, "answer for a host that left");
    let r = api
        .post_sdp(scope, &ht, "offer", &sdp("offer", &uuid(), &host_id, &back_id))
        .await;
    assert_forbidden(&r, "offer from a host that left");
    let mut host = ctx.ws(&ht).await;
    host.join(None).await;
    let new_host = host.id();
    assert_eq!(back.recv_type("peer_joined").await["peer"]["id"], new_host);
    let r = api
        .post_sdp(scope, &ht, "offer", &sdp("offer", &uuid(), &host_id, &back_id))
        .await;
    assert_forbidden(&r, "offer from the old host peer");
    // Answers were addressed to the old host's peer: the new one has none.
    assert_eq!(api.get_answer(scope, &ht, &h).await.status, 404);
    let answer = sdp("answer", &h, &back_id, &new_host);
    api.post_sdp(scope, &jt, "answer", &answer).await.assert_status(204);
    assert_eq!(api.get_answer(scope, &ht, &h).await.body, answer);
}

async fn mailbox_offers_fifo_once_and_removed(ctx: &Ctx) {
    let mut room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner) = (room.host.id(), room.joiner.id());
    let (ht, jt) = (&room.session.host, &room.joiner_token);
    let (second, second_token) = ctx.joiner(&room.session).await;
    room.host.recv_type("peer_joined").await;
    let offers: Vec<Value> = (0..3).map(|_| sdp("offer", &uuid(), &host, &joiner)).collect();
    for o in &offers {
        api.post_sdp(Scope::Sessions, ht, "offer", o).await.assert_status(204);
    }
    let theirs = sdp("offer", &uuid(), &host, &second.id());
    api.post_sdp(Scope::Sessions, ht, "offer", &theirs).await.assert_status(204);
    // Offers queue per recipient.
    let r = api.get_offer(Scope::Sessions, &second_token, &second.id()).await;
    r.assert_status(200);
    assert_eq!(r.body, theirs);
    assert_eq!(
        api.get_offer(Scope::Sessions, &second_token, &second.id()).await.status,
        404
    );
    for o in &offers {
        let r = api.get_offer(Scope::Sessions, jt, &joiner).await;
        r.assert_status(200);
        assert_eq!(&r.body, o);
    }
    assert_eq!(api.get_offer(Scope::Sessions, jt, &joiner).await.status, 404);
}

async fn mailbox_concurrent_offer_readers_get_each_offer_once(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner) = (room.host.id(), room.joiner.id());
    let jt = room.joiner_token.clone();
    let offer = sdp("offer", &uuid(), &host, &joiner);
    api.post_sdp(Scope::Sessions, &room.session.host, "offer", &offer)
        .await
        .assert_status(204);
    let readers = (0..8).map(|_| {
        let api = api.clone();
        let (jt, joiner) = (jt.clone(), joiner.clone());
        async move { api.get_offer(Scope::Sessions, &jt, &joiner).await }
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
    let (host, joiner) = (room.host.id(), room.joiner.id());
    let (ht, jt) = (&room.session.host, &room.joiner_token);
    for scope in [Scope::Sessions, Scope::PeerSessions] {
        let h = uuid();
        let answer = sdp("answer", &h, &joiner, &host);
        api.post_sdp(scope, jt, "answer", &answer).await.assert_status(204);
        let readers = (0..8).map(|_| {
            let api = api.clone();
            let (ht, h) = (ht.clone(), h.clone());
            async move { api.get_answer(scope, &ht, &h).await }
        });
        let results = join_all(readers).await;
        let got: Vec<_> = results.iter().filter(|r| r.status == 200).collect();
        assert_eq!(got.len(), 1, "{scope:?}: {results:?}");
        assert_eq!(got[0].body, answer);
        assert!(results
            .iter()
            .all(|r| r.status == 200 || r.status == scope.missing()));
        assert_eq!(api.get_answer(scope, ht, &h).await.status, scope.missing());
    }
}

async fn mailbox_answer_slot_keeps_the_latest(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner) = (room.host.id(), room.joiner.id());
    let (ht, jt) = (&room.session.host, &room.joiner_token);
    let h = uuid();
    let first = sdp("answer", &h, &joiner, &host);
    let mut second = first.clone();
    second["sdp"] = json!("v=0 second");
    api.post_sdp(Scope::Sessions, jt, "answer", &first).await.assert_status(204);
    api.post_sdp(Scope::Sessions, jt, "answer", &second).await.assert_status(204);
    assert_eq!(api.get_answer(Scope::Sessions, ht, &h).await.body, second);
    assert_eq!(api.get_answer(Scope::Sessions, ht, &h).await.status, 404);
}

async fn mailbox_answer_quota_counts_waiting_answers(ctx: &Ctx) {
    // At most 8 answers from one sender may wait for one recipient (`max_queued_answers`,
    // "too many answers waiting for that peer"); answers the recipient took wait no more.
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner) = (room.host.id(), room.joiner.id());
    let (ht, jt) = (&room.session.host, &room.joiner_token);
    let scope = Scope::Sessions;
    let waiting: Vec<String> = (0..8).map(|_| uuid()).collect();
    for h in &waiting {
        let r = api.post_sdp(scope, jt, "answer", &sdp("answer", h, &joiner, &host)).await;
        r.assert_status(204);
    }
    let ninth = sdp("answer", &uuid(), &joiner, &host);
    let r = api.post_sdp(scope, jt, "answer", &ninth).await;
    assert_eq!(r.status, 429, "a ninth waiting answer: {r:?}");
    assert!(r.body["error"].is_string(), "{r:?}");
    // A new version of a waiting answer replaces it and is no new one.
    let mut newer = sdp("answer", &waiting[0], &joiner, &host);
    newer["sdp"] = json!("v=0 newer");
    api.post_sdp(scope, jt, "answer", &newer).await.assert_status(204);
    assert_eq!(api.get_answer(scope, ht, &waiting[0]).await.body, newer);
    for h in &waiting[1..] {
        api.get_answer(scope, ht, h).await.assert_status(200);
    }
    // None waits now: the joiner may answer again.
    let r = api.post_sdp(scope, jt, "answer", &ninth).await;
    assert_eq!(r.status, 204, "after the host took every answer: {r:?}");
    let h = ninth["handshake_id"].as_str().unwrap();
    assert_eq!(api.get_answer(scope, ht, h).await.body, ninth);
}

async fn mailbox_keeps_sealed_and_extra_fields_verbatim(ctx: &Ctx) {
    let room = ctx.room().await;
    let api = ctx.api();
    let (host, joiner) = (room.host.id(), room.joiner.id());
    let (ht, jt) = (&room.session.host, &room.joiner_token);
    for scope in [Scope::Sessions, Scope::PeerSessions] {
        let h = uuid();
        let mut offer = sealed_sdp("offer", &h, &host, &joiner);
        offer["extra"] = json!({"nested": [1, 2.5, null, true, "x"], "unicode": "é✓"});
        offer["number"] = json!(42);
        let answer = sealed_sdp("answer", &h, &joiner, &host);
        api.post_sdp(scope, ht, "offer", &offer).await.assert_status(204);
        let got = api.get_offer(scope, jt, &joiner).await;
        got.assert_status(200);
        assert_eq!(got.body, offer);
        api.post_sdp(scope, jt, "answer", &answer).await.assert_status(204);
        let got = api.get_answer(scope, ht, &h).await;
        got.assert_status(200);
        assert_eq!(got.body, answer);
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket: join
// ---------------------------------------------------------------------------------------------

async fn ws_join_success_shape(ctx: &Ctx) {
    let s = ctx.session().await;
    // The host joins through its token (the register response's websocket_url).
    let mut host = ctx.ws(&s.host).await;
    let mut msg = Ws::join_msg(Some(&s.code));
    msg["supported_transports"] = json!(["webrtc", "direct", {"custom": "pipe"}]);
    let host_ok = host.join_with(msg).await;
    assert_keys(
        &host_ok,
        &["type", "session_id", "peer_id", "peers", "available_transports"],
    );
    assert_eq!(host_ok["session_id"], s.id, "the public id, not the token");
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

    // The joiner joins through the token of its HTTP join and names no preferred transport:
    // null on the wire.
    let token = ctx.api().join_token(&s.id, &s.code).await;
    let mut joiner = ctx.ws(&token).await;
    let mut msg = Ws::join_msg(Some(&s.code));
    msg["supported_transports"] = json!([{"custom": "pipe"}, "webrtc"]);
    msg.as_object_mut().unwrap().remove("preferred_transport");
    let ok = joiner.join_with(msg).await;
    assert_eq!(ok["session_id"], s.id, "the public id, not the token");
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

    // Through the public id with the code: the same room, as client.
    let mut public = ctx.ws(&s.id).await;
    let ok = public.join(Some(&s.code)).await;
    assert_eq!(ok["session_id"], s.id);
    assert_eq!(ok["peers"].as_array().unwrap().len(), 3);
    assert_eq!(role_of(&ok, &public.id()), "client");
    assert_eq!(host.recv_type("peer_joined").await["peer"]["id"], public.id());
    assert_eq!(joiner.recv_type("peer_joined").await["peer"]["id"], public.id());
}

async fn ws_join_metadata(ctx: &Ctx) {
    let s = ctx.session().await;
    // Generation 2 copies its peer session (here: the host token) into its metadata: dropped.
    let mut host = ctx.ws(&s.host).await;
    let mut msg = Ws::join_msg(Some(&s.code));
    msg["metadata"] = json!({"peer_session_id": s.host, "role": "offerer"});
    let ok = host.join_with(msg).await;
    let meta = &ok["peers"][0]["metadata"];
    assert_eq!(meta, &json!({"role": "offerer", "remote_addr": "127.0.0.1"}));

    let token = ctx.api().join_token(&s.id, &s.code).await;
    let mut joiner = ctx.ws(&token).await;
    let mut msg = Ws::join_msg(Some(&s.code));
    msg["label"] = json!("probe-joiner");
    msg["mcp"] = json!(true);
    msg["viewer_token"] = json!("ignored");
    msg["unknown_field"] = json!({"ignored": true});
    msg["metadata"] = json!({"role": "answerer", "peer_session_id": token, "peer_id": "c1",
                             "host_session_id": s.id, "remote_addr": "forged", "note": "p1"});
    let ok = joiner.join_with(msg).await;
    let meta = find_peer(&ok, &joiner.id())["metadata"].clone();
    // The client's keys, but not its token; the server's remote_addr (no port) wins.
    assert_eq!(
        meta,
        json!({"label": "probe-joiner", "mcp": "true", "role": "answerer", "peer_id": "c1",
               "host_session_id": s.id, "note": "p1", "remote_addr": "127.0.0.1"})
    );
    let joined = host.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["metadata"], meta);
    // No member ever reads another's token.
    let (ok, joined) = (ok.to_string(), joined.to_string());
    assert!(!ok.contains(&s.host) && !ok.contains(&token), "{ok}");
    assert!(!joined.contains(&token), "{joined}");
}

async fn ws_join_errors(ctx: &Ctx) {
    let s = ctx.session_with(Some("SMOKEP")).await;
    let mut host = ctx.ws(&s.host).await;
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

async fn ws_join_through_tokens_needs_no_code(ctx: &Ctx) {
    let api = ctx.api();
    let s = ctx.session_with(Some("SMOKEP")).await;
    // Generation 2: the host attaches with its token and joins on that peer session.
    let pid = api.peer_session(&s.host, "SMOKEP").await;
    assert_eq!(pid, s.host);
    let mut host = ctx.ws(&pid).await;
    let ok = host.join(None).await;
    assert_eq!(ok["session_id"], s.id, "session_id is the host session");
    assert_eq!(ok["peers"][0]["role"], "server");
    // A joiner attaches with the session id and the code, and joins on its own token.
    let jpid = api.peer_session(&s.id, "SMOKEP").await;
    assert_token(&jpid, &s.id);
    assert_ne!(jpid, s.host);
    let mut joiner = ctx.ws(&jpid).await;
    let ok = joiner.join(None).await;
    assert_eq!(ok["session_id"], s.id);
    assert_eq!(ok["peers"].as_array().unwrap().len(), 2);
    assert_eq!(role_of(&ok, &joiner.id()), "client");
    assert_eq!(role_of(&ok, &host.id()), "server");
    assert_eq!(host.recv_type("peer_joined").await["peer"]["id"], joiner.id());
    // Through the public id the code is still needed; it leads to the same room.
    let mut public = ctx.ws(&s.id).await;
    assert_eq!(public.join_refused(None).await, "Passphrase required");
    let ok = public.join(Some("SMOKEP")).await;
    assert_eq!(ok["peers"].as_array().unwrap().len(), 3);
    assert_eq!(role_of(&ok, &public.id()), "client");
    assert_eq!(host.recv_type("peer_joined").await["peer"]["id"], public.id());
    assert_eq!(joiner.recv_type("peer_joined").await["peer"]["id"], public.id());
    // A token admits with its own role whatever code comes with it (the code is checked first
    // as if the id were the public one, and finds no session there).
    let mut again = ctx.ws(&s.host).await;
    let ok = again.join(Some("WRONG1")).await;
    assert_eq!(role_of(&ok, &again.id()), "server");
    let mut joiner_again = ctx.ws(&jpid).await;
    let ok = joiner_again.join(Some("SMOKEP")).await;
    assert_eq!(role_of(&ok, &joiner_again.id()), "client");
}

async fn roles_server_only_through_the_host_token(ctx: &Ctx) {
    let s = ctx.session().await;
    let api = ctx.api();
    // A joiner first in the empty room is a client: "first in the room" grants nothing.
    let early_token = api.join_token(&s.id, &s.code).await;
    let mut early = ctx.ws(&early_token).await;
    let ok = early.join(Some(&s.code)).await;
    assert_eq!(ok["peers"].as_array().unwrap().len(), 1);
    assert_eq!(role_of(&ok, &early.id()), "client");
    let mut members = vec![early];
    let mut public = ctx.ws(&s.id).await;
    let ok = public.join(Some(&s.code)).await;
    assert_eq!(role_of(&ok, &public.id()), "client");
    all_hear_joined(&mut members).await;
    members.push(public);
    // The host's token: server, whoever is in the room already.
    let mut host = ctx.ws(&s.host).await;
    let ok = host.join(Some(&s.code)).await;
    assert_eq!(role_of(&ok, &host.id()), "server");
    for m in &members {
        assert_eq!(role_of(&ok, &m.id()), "client");
    }
    for p in all_hear_joined(&mut members).await {
        assert_eq!((&p["id"], &p["role"]), (&json!(host.id()), &json!("server")));
    }
    for _ in 0..2 {
        let mut c = ctx.ws(&s.id).await;
        let ok = c.join(Some(&s.code)).await;
        assert_eq!(role_of(&ok, &c.id()), "client");
        assert_eq!(role_of(&ok, &host.id()), "server");
        host.recv_type("peer_joined").await;
        all_hear_joined(&mut members).await;
        members.push(c);
    }
    // A second join on the same socket: same role, same id, nobody told again.
    let again = host.join(Some(&s.code)).await;
    assert_eq!(role_of(&again, &host.id()), "server");
    assert_eq!(again["peers"].as_array().unwrap().len(), 5);
    let again = members[0].join(Some(&s.code)).await;
    assert_eq!(role_of(&again, &members[0].id()), "client");
    assert_eq!(again["peers"].as_array().unwrap().len(), 5);
    host.expect_silence(QUIET).await;
    for m in members.iter_mut() {
        m.expect_silence(Duration::from_millis(50)).await;
    }
    // The host leaves. Joiners who stay, come back through their token or come anew never
    // become server, though the room has none.
    let gone = host.id();
    host.close_abruptly().await;
    all_hear_left(&mut members, &gone).await;
    let early = members.remove(0);
    let early_id = early.id();
    early.close_abruptly().await;
    all_hear_left(&mut members, &early_id).await;
    for id in [early_token.as_str(), s.id.as_str()] {
        let mut c = ctx.ws(id).await;
        let ok = c.join(Some(&s.code)).await;
        assert_eq!(role_of(&ok, &c.id()), "client", "through {id}");
        assert!(
            ok["peers"].as_array().unwrap().iter().all(|p| p["role"] == "client"),
            "{ok}"
        );
        all_hear_joined(&mut members).await;
        members.push(c);
    }
    // The host comes back: server again, whoever stayed; nobody is demoted or promoted.
    let mut host = ctx.ws(&s.host).await;
    let ok = host.join(Some(&s.code)).await;
    let servers: Vec<&Value> = ok["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "server")
        .map(|p| &p["id"])
        .collect();
    assert_eq!(servers, [&json!(host.id())], "{ok}");
    assert_eq!(ok["peers"].as_array().unwrap().len(), members.len() + 1);
    for p in all_hear_joined(&mut members).await {
        assert_eq!((&p["id"], &p["role"]), (&json!(host.id()), &json!("server")));
    }
}

async fn concurrent_joins_get_the_role_of_their_id(ctx: &Ctx) {
    for _round in 0..3 {
        let s = ctx.session().await;
        let api = ctx.api();
        // Four sockets on the public id, three on joiner tokens, two on the host token.
        let mut ids = vec![s.id.clone(); 4];
        for _ in 0..3 {
            ids.push(api.join_token(&s.id, &s.code).await);
        }
        ids.extend([s.host.clone(), s.host.clone()]);
        let mut sockets = Vec::new();
        for id in &ids {
            sockets.push(ctx.ws(id).await);
        }
        let joins = sockets.iter_mut().map(|ws| ws.join(Some(&s.code)));
        let results = join_all(joins).await;
        let mut hosts = BTreeSet::new();
        for ((ok, ws), id) in results.iter().zip(&sockets).zip(&ids) {
            let expected = if *id == s.host { "server" } else { "client" };
            assert_eq!(role_of(ok, &ws.id()), expected, "through {id}: {ok}");
            if *id == s.host {
                hosts.insert(ws.id());
            }
        }
        // Everyone is in the room with that role.
        let mut last = ctx.ws(&s.id).await;
        let ok = last.join(Some(&s.code)).await;
        assert_eq!(ok["peers"].as_array().unwrap().len(), ids.len() + 1);
        let servers: BTreeSet<String> = ok["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["role"] == "server")
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(servers, hosts, "{ok}");
    }
}

async fn a_full_room_refuses_joins(ctx: &Ctx) {
    let s = ctx.session().await;
    let mut host = ctx.ws(&s.host).await;
    host.join(None).await;
    let mut members = Vec::new();
    for _ in 1..MAX_ROOM_PEERS {
        let mut c = ctx.ws(&s.id).await;
        c.join(Some(&s.code)).await;
        host.recv_type("peer_joined").await;
        members.push(c);
    }
    // Through the public id and through a joiner token alike.
    let token = ctx.api().join_token(&s.id, &s.code).await;
    let mut late = ctx.ws(&s.id).await;
    assert_eq!(late.join_refused(Some(&s.code)).await, "Session is full");
    let mut late_token = ctx.ws(&token).await;
    assert_eq!(late_token.join_refused(None).await, "Session is full");
    assert_usable(&mut late).await;
    host.expect_silence(QUIET).await;
    // A member leaves: there is room again.
    let gone = members.pop().unwrap();
    let gone_id = gone.id();
    gone.close_abruptly().await;
    assert_eq!(host.recv_type("peer_left").await["peer_id"], gone_id);
    let ok = late_token.join(None).await;
    assert_eq!(ok["peers"].as_array().unwrap().len(), MAX_ROOM_PEERS);
    assert_eq!(role_of(&ok, &late_token.id()), "client");
    assert_eq!(host.recv_type("peer_joined").await["peer"]["id"], late_token.id());
    assert_eq!(late.join_refused(Some(&s.code)).await, "Session is full");
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
    // The server peer is the latest host join: a reconnecting host gets the requests, the
    // socket it replaces none.
    let mut again = ctx.ws(&room.session.host).await;
    again.join(None).await;
    room.host.recv_type("peer_joined").await;
    room.joiner.recv_type("peer_joined").await;
    room.joiner
        .send_json(json!({"type": "debug", "request": {"type": "get_stats"}}))
        .await;
    let got = again.recv_type("signal").await;
    assert_eq!(got["signal"]["payload"]["from_peer"], joiner_id);
    assert_eq!(got["signal"]["payload"]["request"]["type"], "get_stats");
    room.host.expect_silence(QUIET).await;
}

async fn debug_from_the_server_peer_reaches_itself(ctx: &Ctx) {
    // docs/protocol.md §4.1: `debug` goes to the room's server peer, an `error` only when
    // there is none; docs/protocol.md changes nothing about it.
    let (_s, mut host) = ctx.hosted().await;
    let host_id = host.id();
    host.send_json(json!({"type": "debug", "request": {"type": "get_stats"}}))
        .await;
    let got = host.recv_json().await;
    assert_eq!(got["type"], "signal", "the server peer debugging itself: {got}");
    assert_eq!(got["from_peer"], host_id);
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
    let mut host = ctx.ws(&s.host).await;
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
    let mut host = ctx.ws(&s.host).await;
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
    let (host_id, joiner_id) = (room.host.id(), room.joiner.id());
    let (ht, jt) = (room.session.host.clone(), room.joiner_token.clone());
    let h = uuid();
    api.post_sdp(Scope::Sessions, &ht, "offer", &sdp("offer", &h, &host_id, &joiner_id))
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
    let offer = api.get_offer(Scope::Sessions, &jt, &joiner_id).await;
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
