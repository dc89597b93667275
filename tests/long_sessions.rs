//! Issue 8, item 1: a session with a connected member never expires; it expires `session_ttl`
//! after its last member left (or after registration when nobody joined).
//!
//! Servers run with `--session-ttl 2s` and the test waits past it with the members connected
//! and silent: the session, its tokens, its membership and its mailbox must all still work,
//! and the room must still hear `peer_left`. Before the fix, only a WebSocket join refreshed
//! the Redis keys: after the ttl a new join got "Session not found" and a leave found no
//! member record, so nobody was told. Both engines ([`ttl_conformance!`]), and two instances
//! on one Redis for the cross-instance paths.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;

use common::pair::Pair;
use common::{bounded, sdp, uuid, Api, Ctx, RedisServer, Scope, Session, Ws};

const TTL: Duration = Duration::from_secs(2);
/// Longer than the ttl, so every key written at the join would have expired without a refresh.
const IDLE: Duration = Duration::from_millis(3500);

fn ttl_args() -> [String; 2] {
    ["--session-ttl".to_owned(), format!("{}ms", TTL.as_millis())]
}

/// Like `conformance!`, with `--session-ttl 2s`: `memory::name` and `redis::name`.
macro_rules! ttl_conformance {
    ($(async fn $name:ident($ctx:ident: &Ctx) $body:block)*) => {
        $(async fn $name($ctx: &Ctx) $body)*

        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let b = $crate::common::ServerBuilder::new().args(super::ttl_args());
                    let ctx = $crate::common::Ctx::start_with($crate::common::Engine::Memory, b)
                        .await;
                    $crate::common::bounded(super::$name(&ctx)).await;
                }
            )*
        }

        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let b = $crate::common::ServerBuilder::new().args(super::ttl_args());
                    let ctx = $crate::common::Ctx::start_with($crate::common::Engine::Redis, b)
                        .await;
                    $crate::common::bounded(super::$name(&ctx)).await;
                }
            )*
        }
    };
}

async fn exists(api: &Api, id: &str) -> bool {
    let r = api.status(id).await;
    r.assert_status(200);
    r.body["exists"] == true
}

/// Polls `GET /sessions/{id}` until it says the session is gone; returns how long that took.
async fn wait_expired(api: &Api, id: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !exists(api, id).await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("session {id} still exists {limit:?} after its last member left");
}

/// Called right after the last member closed: the session is gone after about the ttl, not
/// before (the countdown starts at the leave, not at the latest refresh).
async fn assert_expires_after_last_leave(api: &Api, id: &str) {
    let gone = wait_expired(api, id, TTL + Duration::from_secs(1)).await;
    eprintln!("session expired {gone:?} after its last member left (ttl {TTL:?})");
    assert!(
        gone >= TTL * 19 / 20,
        "expired {gone:?} after the last leave, before the ttl of {TTL:?}"
    );
}

/// Relays a signal each way between two joined sockets.
async fn relay_both_ways(a: &mut Ws, b: &mut Ws) {
    let (a_id, b_id) = (a.id(), b.id());
    a.send_json(json!({"type": "signal", "to_peer": b_id, "signal": {"n": 1}}))
        .await;
    let got = b.recv_type("signal").await;
    assert_eq!(
        got,
        json!({"type": "signal", "from_peer": a_id, "signal": {"n": 1}})
    );
    b.send_json(json!({"type": "signal", "to_peer": a_id, "signal": {"n": 2}}))
        .await;
    let got = a.recv_type("signal").await;
    assert_eq!(
        got,
        json!({"type": "signal", "from_peer": b_id, "signal": {"n": 2}})
    );
}

/// The host's offer reaches the joiner through its token, the joiner's answer the host
/// (`host_api` and `joiner_api` may be different instances).
async fn mailbox_round_trip(
    host_api: &Api,
    joiner_api: &Api,
    session: &Session,
    host: &Ws,
    joiner: &Ws,
    joiner_token: &str,
) {
    let (h, j) = (host.id(), joiner.id());
    let handshake = uuid();
    let offer = sdp("offer", &handshake, &h, &j);
    host_api
        .post_sdp(Scope::Sessions, &session.host, "offer", &offer)
        .await
        .assert_status(204);
    let got = joiner_api
        .get_offer(Scope::Sessions, joiner_token, &j)
        .await;
    got.assert_status(200);
    assert_eq!(got.body, offer);
    let answer = sdp("answer", &handshake, &j, &h);
    joiner_api
        .post_sdp(Scope::Sessions, joiner_token, "answer", &answer)
        .await
        .assert_status(204);
    let got = host_api
        .get_answer(Scope::Sessions, &session.host, &handshake)
        .await;
    got.assert_status(200);
    assert_eq!(got.body, answer);
}

/// Every key of the session (`{S}`) and its tokens is gone from Redis (bounded wait: the
/// tokens are refreshed right after the session's own keys).
async fn assert_no_keys_left(redis: &RedisServer, session: &Session, tokens: &[&str]) {
    let mut c = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut left: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("*{}*", session.id))
            .query_async(&mut c)
            .await
            .unwrap();
        for t in tokens {
            let k: Vec<String> = ::redis::cmd("KEYS")
                .arg(format!("*{t}*"))
                .query_async(&mut c)
                .await
                .unwrap();
            left.extend(k);
        }
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "keys outlive the session: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

ttl_conformance! {
    async fn a_session_with_members_outlives_its_ttl(ctx: &Ctx) {
        let api = ctx.api();
        let (session, mut host) = ctx.hosted().await;
        let (mut joiner, joiner_token) = ctx.joiner(&session).await;
        host.recv_type("peer_joined").await;
        // Registered at the same time and never joined: it must expire as before.
        let lonely = ctx.session().await;

        tokio::time::sleep(IDLE).await;

        assert!(!exists(&api, &lonely.id).await, "a session nobody joined outlived its ttl");
        assert!(exists(&api, &session.id).await, "a session with members expired");
        // New joins: HTTP join with the code, then the socket of its token; the join order
        // (`{S}:seq`) survived too.
        let second_token = api.join_token(&session.id, &session.code).await;
        let mut second = ctx.ws(&second_token).await;
        let ok = second.join(Some(&session.code)).await;
        let order: Vec<&str> = ok["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap())
            .collect();
        assert_eq!(order, [host.id(), joiner.id(), second.id()], "{ok}");
        assert_eq!(host.recv_type("peer_joined").await["peer"]["id"], second.id());
        assert_eq!(joiner.recv_type("peer_joined").await["peer"]["id"], second.id());
        // The tokens handed out before the ttl still act: mailbox both ways, and relays.
        mailbox_round_trip(&api, &api, &session, &host, &joiner, &joiner_token).await;
        relay_both_ways(&mut host, &mut joiner).await;
        relay_both_ways(&mut joiner, &mut second).await;
        // Leaves are still told.
        let joiner_id = joiner.id();
        joiner.close_abruptly().await;
        assert_eq!(host.recv_type("peer_left").await["peer_id"], joiner_id);
        assert_eq!(second.recv_type("peer_left").await["peer_id"], joiner_id);
        let second_id = second.id();
        second.close_abruptly().await;
        assert_eq!(host.recv_type("peer_left").await["peer_id"], second_id);
        host.close_abruptly().await;

        assert_expires_after_last_leave(&api, &session.id).await;
        if let Some(redis) = &ctx.redis {
            assert_no_keys_left(redis, &session, &[&session.host, &joiner_token, &second_token])
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_instance_session_outlives_its_ttl() {
    bounded(async {
        let pair = Pair::start(&ttl_args()).await;
        let (a, b) = (pair.servers[0].api(), pair.servers[1].api());
        // The host on A, a joiner on B.
        let session = a.new_session(None).await;
        let mut host = Ws::connect(&pair.servers[0].ws_url(&session.host)).await;
        host.join(Some(&session.code)).await;
        let (mut joiner, joiner_token) = pair.joiner(1, &session).await;
        host.recv_type("peer_joined").await;

        tokio::time::sleep(IDLE).await;

        assert!(
            exists(&b, &session.id).await,
            "a session with members expired"
        );
        // A new joiner on each instance; everyone hears of them.
        let (mut on_a, _) = pair.joiner(0, &session).await;
        for ws in [&mut host, &mut joiner] {
            assert_eq!(ws.recv_type("peer_joined").await["peer"]["id"], on_a.id());
        }
        let (mut on_b, _) = pair.joiner(1, &session).await;
        for ws in [&mut host, &mut joiner, &mut on_a] {
            assert_eq!(ws.recv_type("peer_joined").await["peer"]["id"], on_b.id());
        }
        // Relays across instances (the fresh joiners are found through Redis), and the
        // mailbox with the host on A and the joiner on B.
        relay_both_ways(&mut host, &mut on_b).await;
        relay_both_ways(&mut on_a, &mut joiner).await;
        mailbox_round_trip(&a, &b, &session, &host, &joiner, &joiner_token).await;
        // The joiner on B leaves: the host on A is told.
        let joiner_id = joiner.id();
        joiner.close_abruptly().await;
        for ws in [&mut host, &mut on_a, &mut on_b] {
            assert_eq!(ws.recv_type("peer_left").await["peer_id"], joiner_id);
        }
        on_a.close_abruptly().await;
        on_b.close_abruptly().await;
        host.close_abruptly().await;
        assert_expires_after_last_leave(&b, &session.id).await;
    })
    .await
}
