//! A WebSocket join with its code: the engine checks the code in the join's own atomic step
//! (`lua/code_join.lua`), one Redis round trip where the check and the join took two, and when
//! the id is a token's (the CLIs join through tokens and send the code too) it looks the token
//! up in that same round trip. The outcomes on both engines, and the Redis calls a real server
//! makes for the joins the CLIs make.

mod common;

use beach_road::engine::{
    CodeCheck, Engine, EngineConfig, Entry, Grant, JoinResult, NewPeer, SessionRecord,
};
use beach_road::protocol::{new_id, Role};

use common::metrics::Scrape;
use common::redis::RedisServer;
use common::{bounded, Ctx, Engine as Kind};

const RIGHT: &str = "the-right-digest";
const WRONG: &str = "a-wrong-digest";
/// Wrong codes one address may send per session within the window.
const PER_ADDRESS: u32 = 3;

fn config() -> EngineConfig {
    EngineConfig {
        max_code_failures: PER_ADDRESS,
        ..EngineConfig::default()
    }
}

fn peer(id: &str) -> NewPeer {
    NewPeer {
        id: id.to_owned(),
        role: Role::Client,
        supported_transports: Vec::new(),
        preferred_transport: None,
        metadata: None,
    }
}

/// Registers a session with code digest [`RIGHT`]; returns its id and host token.
async fn session<E: Engine>(e: &E, relay: bool) -> (String, String) {
    let (id, host) = (new_id(), new_id());
    let record = SessionRecord {
        id: id.clone(),
        created_at: 1,
        code: RIGHT.into(),
        relay,
    };
    assert!(e.register(record, &host).await.unwrap());
    (id, host)
}

/// Joins fresh peer `who` into `id` with `digest` from client address `client`.
async fn code_join<E: Engine>(
    e: &E,
    id: &str,
    who: &str,
    client: &str,
    digest: &str,
) -> JoinResult {
    let _queue = e.connect(who);
    let entry = Entry::Code { client, digest };
    e.join(id, peer(who), 32, entry).await.unwrap()
}

async fn outcomes<E: Engine>(e: E) {
    let (id, host) = session(&e, false).await;
    let r = code_join(&e, &new_id(), "nobody", "10.0.0.1", RIGHT).await;
    assert!(
        matches!(r, JoinResult::Refused(CodeCheck::NotFound)),
        "{r:?}"
    );
    // A token's id: nothing joined, what the token grants (looked up in the same step).
    match code_join(&e, &host, "via-token", "10.0.0.1", RIGHT).await {
        JoinResult::Token(access) => {
            assert_eq!(access.grant, Grant::Host);
            assert_eq!(access.session.id, id);
        }
        r => panic!("not the host token's access: {r:?}"),
    }
    assert!(!e.is_member(&id, "via-token").await.unwrap());
    // Wrong codes are refused and counted, until the address is locked out (the right code too).
    for n in 0..PER_ADDRESS {
        let r = code_join(&e, &id, &format!("guess{n}"), "10.0.0.1", WRONG).await;
        assert!(matches!(r, JoinResult::Refused(CodeCheck::Wrong)), "{r:?}");
    }
    let r = code_join(&e, &id, "locked", "10.0.0.1", RIGHT).await;
    assert!(
        matches!(r, JoinResult::Refused(CodeCheck::Locked(_))),
        "{r:?}"
    );
    for who in ["guess0", "locked"] {
        assert!(!e.is_member(&id, who).await.unwrap(), "{who} joined");
    }
    // Another address with the right code joins, as a client.
    match code_join(&e, &id, "rightful", "10.0.0.2", RIGHT).await {
        JoinResult::Joined(j) => {
            assert!(j.fresh);
            assert_eq!(j.me.role, Role::Client);
            assert_eq!(j.peers.len(), 1);
        }
        r => panic!("the right code was refused: {r:?}"),
    }
    assert!(e.is_member(&id, "rightful").await.unwrap());
    // A relay session has no signaling room: the right code joins nothing.
    let (relay, _) = session(&e, true).await;
    let r = code_join(&e, &relay, "relayed", "10.0.0.2", RIGHT).await;
    assert!(matches!(r, JoinResult::RelayOnly), "{r:?}");
    assert!(!e.is_member(&relay, "relayed").await.unwrap());
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_engine_checks_the_code_in_the_join() {
    let e = beach_road::engine::memory::MemoryEngine::start(config());
    bounded(outcomes(e)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_engine_checks_the_code_in_the_join_and_keeps_no_intent_of_a_refusal() {
    let redis = RedisServer::start();
    let settings = common::redis::engine_settings(&redis.url());
    bounded(async {
        let e = common::redis::ready_engine(config(), settings).await;
        let intents = format!("t:{{inst:{}}}:peers", e.router().id());
        outcomes(e).await;
        // Every refused join undid its intent; only the member's is left.
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let left: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&intents)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(
            left.len() <= 1 && left.iter().all(|i| i.ends_with("|rightful")),
            "intents left: {left:?}"
        );
    })
    .await;
}

/// Redis calls of one kind made by the server between two scrapes.
fn calls(before: &Scrape, after: &Scrape, command: &str) -> f64 {
    let series = "beach_road_redis_command_duration_seconds_count";
    after.get(series, &[("command", command)]) - before.get(series, &[("command", command)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_with_the_code_costs_the_round_trips_it_needs() {
    bounded(async {
        let ctx = Ctx::start(Kind::Redis).await;
        // The scripts loaded first (a first call meets NOSCRIPT and runs again).
        let warm = ctx.session().await;
        let mut warm_host = ctx.ws(&warm.host).await;
        warm_host.join(Some(&warm.code)).await;
        let mut warm_joiner = ctx.ws(&warm.id).await;
        warm_joiner.join(Some(&warm.code)).await;
        let session = ctx.session().await;
        // The host as the CLIs join: its token's socket, with the code.
        let before = Scrape::of(&ctx.server).await;
        let mut host = ctx.ws(&session.host).await;
        host.join(Some(&session.code)).await;
        let after = Scrape::of(&ctx.server).await;
        // One round trip finds the id is a token's, the next its session, then the join, the
        // renewal of the tokens (the room's first member) and the token's binding.
        for (command, n) in [
            ("code_join", 1.0),
            ("HMGET", 1.0),
            ("join", 1.0),
            ("expire_tokens", 1.0),
            ("token_bind", 1.0),
            ("code_check", 0.0),
            ("SMEMBERS", 0.0),
        ] {
            assert_eq!(calls(&before, &after, command), n, "host: {command}");
        }
        // A joiner through the public id with the code: one round trip.
        let before = after;
        let mut joiner = ctx.ws(&session.id).await;
        joiner.join(Some(&session.code)).await;
        let after = Scrape::of(&ctx.server).await;
        for (command, n) in [
            ("code_join", 1.0),
            ("HMGET", 0.0),
            ("join", 0.0),
            ("code_check", 0.0),
        ] {
            assert_eq!(calls(&before, &after, command), n, "joiner: {command}");
        }
        host.recv_type("peer_joined").await;
    })
    .await;
}
