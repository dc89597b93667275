//! The Redis engine against a real `redis-server` started by each test (see `common/redis.rs`).
//! Short intervals (heartbeat 200 ms, instance timeout 1 s); every test is bounded in time.

#[path = "common/redis.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use beach_road::code::CodeHash;
use beach_road::engine::redis::{RedisEngine, RedisSettings};
use beach_road::engine::{Engine, EngineConfig, NewPeer, SessionRecord};
use beach_road::peers::{CloseReason, PeerQueue};
use beach_road::protocol::{new_id, Role};
use redis_server::RedisServer;
use serde_json::Value;

const TEST_LIMIT: Duration = Duration::from_secs(30);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test exceeded its time limit")
}

fn config() -> EngineConfig {
    EngineConfig {
        call_timeout: Duration::from_secs(1),
        ..EngineConfig::default()
    }
}

fn settings(url: &str, prefix: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_owned(),
        key_prefix: prefix.to_owned(),
        heartbeat_interval: Duration::from_millis(200),
        instance_timeout: Duration::from_secs(1),
    }
}

async fn engine(r: &RedisServer) -> RedisEngine {
    engine_with(r, "t", config()).await
}

async fn engine_with(r: &RedisServer, prefix: &str, config: EngineConfig) -> RedisEngine {
    let e = RedisEngine::start(config, settings(&r.url(), prefix))
        .await
        .expect("valid URL");
    wait_until(Duration::from_secs(5), || async { e.ready().await.is_ok() }).await;
    e
}

async fn wait_until<F, Fut>(limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn record(id: &str) -> SessionRecord {
    SessionRecord {
        id: id.to_owned(),
        created_at: 0,
        code: CodeHash::new("123456"),
    }
}

fn new_peer(id: &str) -> NewPeer {
    let mut metadata = BTreeMap::new();
    metadata.insert("label".to_owned(), "a|b \"quoted\"".to_owned());
    NewPeer {
        id: id.to_owned(),
        supported_transports: vec![Value::from("webrtc")],
        preferred_transport: None,
        metadata: Some(metadata),
    }
}

/// Connects and joins a fresh peer; returns its id and queue.
async fn join(e: &RedisEngine, room: &str) -> (String, PeerQueue) {
    let id = new_id();
    let q = e.connect(&id).await.unwrap();
    e.join(room, new_peer(&id)).await.unwrap();
    (id, q)
}

async fn next(q: &mut PeerQueue, within: Duration) -> Value {
    let frame = tokio::time::timeout(within, q.recv())
        .await
        .expect("no frame in time")
        .expect("queue closed");
    serde_json::from_str(&frame).unwrap()
}

async fn nothing(q: &mut PeerQueue, within: Duration) {
    if let Ok(Some(f)) = tokio::time::timeout(within, q.recv()).await {
        panic!("unexpected frame {f}");
    }
}

#[tokio::test]
async fn register_exactly_one_wins_and_aliases_resolve() {
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        let id = new_id();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let e = if i % 2 == 0 { a.clone() } else { b.clone() };
                let rec = record(&id);
                tokio::spawn(async move { e.register(rec).await.unwrap() })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            wins += t.await.unwrap() as usize;
        }
        assert_eq!(wins, 1);

        let s = a.resolve(&id).await.unwrap().expect("registered");
        assert!(
            s.created_at > 1_700_000_000,
            "created_at comes from Redis TIME"
        );
        assert!(a.resolve(&new_id()).await.unwrap().is_none());

        let pid = a.attach(&id).await.unwrap().expect("host exists");
        assert_eq!(b.attach(&id).await.unwrap(), Some(pid.clone()), "reused");
        assert_eq!(b.resolve(&pid).await.unwrap().unwrap().id, id);
        assert!(
            !a.register(record(&pid)).await.unwrap(),
            "alias ids are taken"
        );
        assert!(a.attach(&new_id()).await.unwrap().is_none());

        assert_eq!(a.code_failures(&id).await.unwrap(), 0);
        assert_eq!(a.code_failure(&id).await.unwrap(), 1);
        assert_eq!(b.code_failure(&id).await.unwrap(), 2);
        assert_eq!(a.code_failures(&id).await.unwrap(), 2);
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn concurrent_first_joins_on_two_instances_yield_one_server() {
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        for _ in 0..20 {
            let room = new_id();
            let (pa, pb) = (new_id(), new_id());
            let _qa = a.connect(&pa).await.unwrap();
            let _qb = b.connect(&pb).await.unwrap();
            let (ja, jb) = tokio::join!(a.join(&room, new_peer(&pa)), b.join(&room, new_peer(&pb)));
            let (ja, jb) = (ja.unwrap(), jb.unwrap());
            let servers = [ja.me.role, jb.me.role]
                .iter()
                .filter(|r| **r == Role::Server)
                .count();
            assert_eq!(servers, 1);
            let server = if ja.me.role == Role::Server { &pa } else { &pb };
            assert_eq!(a.server_peer(&room).await.unwrap().as_ref(), Some(server));

            // A repeated join is idempotent.
            let again = a.join(&room, new_peer(&pa)).await.unwrap();
            assert!(!again.fresh);
            assert_eq!(again.me, ja.me);
            assert_eq!(again.peers.len(), 2);
            // Join order is kept.
            assert_eq!(again.peers[0].role, Role::Server);
            assert_eq!(
                again.me.metadata.as_ref().unwrap()["label"],
                "a|b \"quoted\""
            );
        }
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn offers_are_fifo_capped_delivered_once_and_dropped_on_leave() {
    bounded(async {
        let r = RedisServer::start();
        let e = engine_with(
            &r,
            "t",
            EngineConfig {
                max_queued_offers: 3,
                ..config()
            },
        )
        .await;
        let room = new_id();
        for i in 0..5 {
            e.push_offer(&room, "p", format!("o{i}")).await.unwrap();
        }
        for i in 2..5 {
            assert_eq!(
                e.pop_offer(&room, "p").await.unwrap(),
                Some(format!("o{i}"))
            );
        }
        assert_eq!(e.pop_offer(&room, "p").await.unwrap(), None);

        // Concurrent readers: each offer goes to exactly one of them.
        for i in 0..3 {
            e.push_offer(&room, "p", format!("c{i}")).await.unwrap();
        }
        let readers: Vec<_> = (0..10)
            .map(|_| {
                let e = e.clone();
                let room = room.clone();
                tokio::spawn(async move { e.pop_offer(&room, "p").await.unwrap() })
            })
            .collect();
        let mut got: Vec<String> = Vec::new();
        for t in readers {
            got.extend(t.await.unwrap());
        }
        got.sort();
        assert_eq!(got, ["c0", "c1", "c2"]);

        // Offers to a peer are deleted when it leaves.
        let (p, _q) = join(&e, &room).await;
        e.push_offer(&room, &p, "x".into()).await.unwrap();
        e.leave(&room, &p).await.unwrap();
        assert_eq!(e.pop_offer(&room, &p).await.unwrap(), None);
        e.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn answer_goes_to_exactly_one_reader() {
    bounded(async {
        let r = RedisServer::start();
        let e = engine(&r).await;
        let room = new_id();
        e.put_answer(&room, "h", "first".into()).await.unwrap();
        e.put_answer(&room, "h", "second".into()).await.unwrap();
        let readers: Vec<_> = (0..10)
            .map(|_| {
                let e = e.clone();
                let room = room.clone();
                tokio::spawn(async move { e.take_answer(&room, "h").await.unwrap() })
            })
            .collect();
        let mut got = Vec::new();
        for t in readers {
            got.extend(t.await.unwrap());
        }
        assert_eq!(got, ["second"]);

        // An emptied script cache is harmless: EVALSHA reloads on NOSCRIPT.
        let mut c = r.client().get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut c)
            .await
            .unwrap();
        e.put_answer(&room, "h2", "again".into()).await.unwrap();
        assert_eq!(
            e.take_answer(&room, "h2").await.unwrap().as_deref(),
            Some("again")
        );
        e.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn frames_cross_instances_and_membership_is_checked() {
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        let room = new_id();
        let (pa, mut qa) = join(&a, &room).await;
        let (pb, mut qb) = join(&b, &room).await;
        let j = next(&mut qa, Duration::from_secs(2)).await;
        assert_eq!(j["type"], "peer_joined");
        assert_eq!(j["peer"]["id"], pb.as_str());
        assert_eq!(j["peer"]["role"], "client");

        for i in 0..50 {
            assert!(b
                .send(&room, &pa, format!("{{\"n\":{i}}}").into())
                .await
                .unwrap());
        }
        for i in 0..50 {
            assert_eq!(next(&mut qa, Duration::from_secs(2)).await["n"], i);
        }
        assert!(a.send(&room, &pb, "{\"x\":1}".into()).await.unwrap());
        assert_eq!(next(&mut qb, Duration::from_secs(2)).await["x"], 1);
        assert!(!a.send(&room, &new_id(), "{}".into()).await.unwrap());
        assert!(!a.send(&new_id(), &pb, "{}".into()).await.unwrap());
        assert_eq!(a.local_peers().await.unwrap(), 1);

        b.leave(&room, &pb).await.unwrap();
        let l = next(&mut qa, Duration::from_secs(2)).await;
        assert_eq!(l["type"], "peer_left");
        assert_eq!(l["peer_id"], pb.as_str());
        assert!(!a.send(&room, &pb, "{}".into()).await.unwrap());
        assert!(!a.is_member(&room, &pb).await.unwrap());
        // A second leave is a no-op.
        b.leave(&room, &pb).await.unwrap();
        nothing(&mut qa, Duration::from_millis(300)).await;
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn peers_of_a_dead_instance_are_reaped() {
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        let room = new_id();
        let (pa, mut qa) = join(&a, &room).await;
        let (pb, _qb) = join(&b, &room).await;
        assert_eq!(
            next(&mut qa, Duration::from_secs(2)).await["type"],
            "peer_joined"
        );
        b.simulate_crash().await;
        let l = next(&mut qa, Duration::from_secs(5)).await;
        assert_eq!(l["type"], "peer_left");
        assert_eq!(l["peer_id"], pb.as_str());
        assert!(!a.is_member(&room, &pb).await.unwrap());
        assert!(a.is_member(&room, &pa).await.unwrap());
        // The dead instance's bookkeeping is gone.
        let mut c = r.client().get_multiplexed_async_connection().await.unwrap();
        wait_until(Duration::from_secs(3), || {
            let mut c = c.clone();
            async move {
                let dead: usize = redis::cmd("ZCARD")
                    .arg("t:{instances}:dead")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                dead == 0
            }
        })
        .await;
        let _: () = redis::cmd("PING").query_async(&mut c).await.unwrap();
        a.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_cut_off_instance_fences_itself_and_serves_fresh_peers() {
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        let room = new_id();
        let (_pa, mut qa) = join(&a, &room).await;
        let (pb, mut qb) = join(&b, &room).await;
        assert_eq!(
            next(&mut qa, Duration::from_secs(2)).await["type"],
            "peer_joined"
        );
        let old_id = b.instance_id();

        b.pause_heartbeat(true);
        // b notices locally (no heartbeat for > 1 s) and closes its sockets as fenced.
        let closed = tokio::time::timeout(Duration::from_secs(3), qb.recv())
            .await
            .unwrap();
        assert!(closed.is_none());
        assert_eq!(qb.close_reason(), Some(CloseReason::Fenced));
        assert_ne!(b.instance_id(), old_id);
        // a's peer is told once, by whoever reaps b's old id.
        let l = next(&mut qa, Duration::from_secs(5)).await;
        assert_eq!(l["type"], "peer_left");
        assert_eq!(l["peer_id"], pb.as_str());
        assert!(b.ready().await.is_err(), "not ready while unregistered");

        b.pause_heartbeat(false);
        wait_until(Duration::from_secs(3), || async { b.ready().await.is_ok() }).await;
        // The stale socket's leave is a harmless no-op.
        b.leave(&room, &pb).await.unwrap();
        b.disconnect(&pb).await;
        nothing(&mut qa, Duration::from_millis(300)).await;
        // Fresh peers join through b again.
        let (pc, mut qc) = join(&b, &room).await;
        let j = next(&mut qa, Duration::from_secs(2)).await;
        assert_eq!(j["type"], "peer_joined");
        assert_eq!(j["peer"]["id"], pc.as_str());
        assert!(a.send(&room, &pc, "{\"hi\":1}".into()).await.unwrap());
        assert_eq!(next(&mut qc, Duration::from_secs(2)).await["hi"], 1);
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn an_instance_written_off_by_others_fences_itself() {
    bounded(async {
        let r = RedisServer::start();
        let b = engine(&r).await;
        let room = new_id();
        let (_pb, mut qb) = join(&b, &room).await;
        let old_id = b.instance_id();
        let mut c = r.client().get_multiplexed_async_connection().await.unwrap();
        let _: i64 = redis::cmd("ZREM")
            .arg("t:{instances}:alive")
            .arg(&old_id)
            .query_async(&mut c)
            .await
            .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(2), qb.recv())
            .await
            .unwrap();
        assert!(closed.is_none());
        assert_eq!(qb.close_reason(), Some(CloseReason::Fenced));
        wait_until(Duration::from_secs(3), || async { b.ready().await.is_ok() }).await;
        assert_ne!(b.instance_id(), old_id);
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn survives_a_redis_restart() {
    bounded(async {
        let mut r = RedisServer::start();
        let e = engine(&r).await;
        assert!(e.register(record(&new_id())).await.unwrap());

        r.kill();
        let t = tokio::time::Instant::now();
        wait_until(Duration::from_secs(2), || async {
            e.ready().await.is_err()
        })
        .await;
        let down = t.elapsed();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        r.restart();
        let t = tokio::time::Instant::now();
        wait_until(Duration::from_secs(2), || async { e.ready().await.is_ok() }).await;
        eprintln!(
            "not ready after {down:?}, ready again {:?} after restart",
            t.elapsed()
        );

        // Scripts reload after the empty restart, and the instance registered anew.
        let id = new_id();
        assert!(e.register(record(&id)).await.unwrap());
        let room = new_id();
        let (_p, _q) = join(&e, &room).await;
        assert_eq!(e.local_peers().await.unwrap(), 1);
        e.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn starts_without_redis_and_recovers() {
    bounded(async {
        let mut r = RedisServer::start();
        r.kill();
        let t = tokio::time::Instant::now();
        let e = RedisEngine::start(config(), settings(&r.url(), "t"))
            .await
            .expect("valid URL");
        assert!(t.elapsed() < Duration::from_secs(3), "start does not hang");
        let t = tokio::time::Instant::now();
        assert!(e.ready().await.is_err());
        assert!(
            t.elapsed() < Duration::from_millis(700),
            "ready answers fast"
        );
        r.restart();
        wait_until(Duration::from_secs(3), || async { e.ready().await.is_ok() }).await;
        let room = new_id();
        let (_p, _q) = join(&e, &room).await;
        e.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn prefixes_isolate_deployments() {
    bounded(async {
        let r = RedisServer::start();
        let a = engine_with(&r, "one", config()).await;
        let b = engine_with(&r, "two", config()).await;
        let id = new_id();
        assert!(a.register(record(&id)).await.unwrap());
        assert!(b.register(record(&id)).await.unwrap());
        let (_, _qa) = join(&a, &id).await;
        let pb = new_id();
        let _qb = b.connect(&pb).await.unwrap();
        assert_eq!(
            b.join(&id, new_peer(&pb)).await.unwrap().me.role,
            Role::Server
        );
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn shutdown_deregisters_the_instance() {
    bounded(async {
        let r = RedisServer::start();
        let e = engine(&r).await;
        let id = e.instance_id();
        e.shutdown().await;
        let mut c = r.client().get_multiplexed_async_connection().await.unwrap();
        let alive: Option<f64> = redis::cmd("ZSCORE")
            .arg("t:{instances}:alive")
            .arg(&id)
            .query_async(&mut c)
            .await
            .unwrap();
        let dead: Option<f64> = redis::cmd("ZSCORE")
            .arg("t:{instances}:dead")
            .arg(&id)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!((alive, dead), (None, None));
    })
    .await
}
