//! Fencing that cannot be lost (issue 8): the Redis engine against a real `redis-server` per
//! test, with short intervals (heartbeat 200 ms, instance timeout 1 s, call timeout 1 s).
//!
//! - A fence always reaches the router: the stale sockets are closed as fenced, and the
//!   instance serves again under its new id (once, a fence sent as a command to a busy task
//!   could be lost, and every later join was refused as "fenced during the join").
//! - A written-off id (in the dead set) is never registered again: the instance takes a fresh
//!   one. Before, a retried registration put it back in the live set while reapers removed the
//!   peers it went on to accept.
//! - Engine errors are typed: a fenced instance refuses joins with [`EngineError::Fenced`].

#[path = "common/redis.rs"]
mod redis_server;

use std::future::Future;
use std::time::Duration;

use beach_road::engine::redis::{RedisEngine, RedisSettings};
use beach_road::engine::{Engine, EngineConfig, EngineError, Entry, JoinResult, NewPeer};
use beach_road::peers::{CloseReason, PeerQueue};
use beach_road::protocol::{new_id, Role};
use redis_server::RedisServer;
use serde_json::Value;

const TEST_LIMIT: Duration = Duration::from_secs(40);

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

fn settings(url: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_owned(),
        key_prefix: "t".to_owned(),
        heartbeat_interval: Duration::from_millis(200),
        instance_timeout: Duration::from_secs(1),
    }
}

async fn engine(r: &RedisServer) -> RedisEngine {
    redis_server::ready_engine(config(), settings(&r.url())).await
}

/// Polls `f` every 20 ms; false if it did not hold within `limit`.
async fn wait_until<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn new_peer(id: &str) -> NewPeer {
    NewPeer {
        id: id.to_owned(),
        role: Role::Client,
        supported_transports: vec![Value::from("webrtc")],
        preferred_transport: None,
        metadata: None,
    }
}

async fn join(e: &RedisEngine, room: &str) -> (String, PeerQueue) {
    let id = new_id();
    let q = e.connect(&id);
    match e
        .join(room, new_peer(&id), 32, Entry::Admitted)
        .await
        .unwrap()
    {
        JoinResult::Joined(_) => (id, q),
        refused => panic!("refused: {refused:?}"),
    }
}

async fn next_type(q: &mut PeerQueue, within: Duration) -> String {
    let frame = tokio::time::timeout(within, q.recv())
        .await
        .expect("no frame in time")
        .expect("queue closed");
    let v: Value = serde_json::from_str(&frame).unwrap();
    v["type"].as_str().unwrap_or_default().to_owned()
}

async fn zscore(r: &RedisServer, key: &str, member: &str) -> Option<f64> {
    let mut c = r.client().get_multiplexed_async_connection().await.unwrap();
    redis::cmd("ZSCORE")
        .arg(key)
        .arg(member)
        .query_async(&mut c)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_closes_stale_sockets_and_the_instance_serves_again() {
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        let room = new_id();
        let (_pa, mut qa) = join(&a, &room).await;
        let (_pb, mut qb) = join(&b, &room).await;
        assert_eq!(
            next_type(&mut qa, Duration::from_secs(2)).await,
            "peer_joined"
        );
        let old = b.instance_id();

        // b is cut off: it fences itself.
        b.pause_heartbeat(true);
        assert!(
            wait_until(Duration::from_secs(3), || async { b.instance_id() != old }).await,
            "b did not fence itself"
        );
        b.pause_heartbeat(false);

        // The router follows the new id: the stale socket is closed as fenced, and the
        // instance is ready and takes joins under its new id.
        let closed = tokio::time::timeout(Duration::from_secs(8), qb.recv()).await;
        assert!(
            matches!(closed, Ok(None)),
            "stale socket not closed: {closed:?}"
        );
        assert_eq!(qb.close_reason(), Some(CloseReason::Fenced));
        assert!(
            wait_until(Duration::from_secs(5), || async { b.ready().await.is_ok() }).await,
            "b never ready again after the fence"
        );
        assert_eq!(
            next_type(&mut qa, Duration::from_secs(3)).await,
            "peer_left"
        );
        let (_pc, _qc) = join(&b, &room).await;
        assert_eq!(
            next_type(&mut qa, Duration::from_secs(2)).await,
            "peer_joined"
        );
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_off_id_is_never_registered_again() {
    bounded(async {
        // The instance starts while Redis is down, so its first registration is pending...
        let mut r = RedisServer::start();
        r.kill();
        let e = RedisEngine::start(config(), settings(&r.url()))
            .await
            .expect("valid URL");
        e.pause_heartbeat(true);
        let id = e.instance_id();
        r.restart();
        // ...while its id is written off, as when a registration's reply is lost and the
        // retry comes after the others wrote the silent id off.
        let mut c = r.client().get_multiplexed_async_connection().await.unwrap();
        let _: i64 = redis::cmd("ZADD")
            .arg("t:{instances}:dead")
            .arg(0)
            .arg(&id)
            .query_async(&mut c)
            .await
            .unwrap();
        e.pause_heartbeat(false);

        assert!(
            wait_until(Duration::from_secs(5), || async { e.ready().await.is_ok() }).await,
            "never ready"
        );
        assert_ne!(
            e.instance_id(),
            id,
            "the written-off id was registered again"
        );
        assert_eq!(zscore(&r, "t:{instances}:alive", &id).await, None);
        // Joins work under the fresh id, and the old one is reaped (by this very instance).
        let room = new_id();
        let (_p, _q) = join(&e, &room).await;
        assert!(
            wait_until(Duration::from_secs(3), || async {
                zscore(&r, "t:{instances}:dead", &id).await.is_none()
            })
            .await,
            "the old id was never reaped"
        );
        e.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_instance_refuses_joins_as_fenced() {
    bounded(async {
        let r = RedisServer::start();
        let e = engine(&r).await;
        let old = e.instance_id();
        e.pause_heartbeat(true);
        assert!(
            wait_until(Duration::from_secs(3), || async { e.instance_id() != old }).await,
            "not fenced"
        );
        let id = new_id();
        let _q = e.connect(&id);
        let refused = e.join(&new_id(), new_peer(&id), 32, Entry::Admitted).await;
        match refused {
            Err(err @ EngineError::Fenced(_)) => {
                assert_eq!(err.client_message(), "server not ready; try again shortly");
                assert!(!err.client_message().contains("written off"));
            }
            other => panic!("expected Fenced, got {other:?}"),
        }
        assert!(matches!(e.ready().await, Err(EngineError::Fenced(_))));
        e.pause_heartbeat(false);
        e.shutdown().await;
    })
    .await
}
