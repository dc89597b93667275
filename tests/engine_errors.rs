//! What clients are told when the engine fails, and what only the log is told (issue 8, item
//! 9): a real `beach-road` on its own `redis-server`.
//!
//! Every engine failure is 503 (or a `join_error`/`error` frame) with the fixed message of its
//! kind; the cause (Redis's own error text, timeouts, internal states) goes to the log only.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::{bounded_for, uuid, RedisServer, Server, ServerBuilder, Ws};

const LIMIT: Duration = Duration::from_secs(40);
const FULL: &str = "session store full; try again later";
const UNAVAILABLE: &str = "session store unavailable; try again later";
/// Words of Redis errors and internal states that must never reach a client.
const CAUSES: &[&str] = &[
    "OOM",
    "maxmemory",
    "refused",
    "timed out",
    "written off",
    "Redis",
];

async fn start(redis: &RedisServer) -> Server {
    let server = ServerBuilder::new()
        .redis_url(&redis.url())
        .args([
            "--heartbeat-interval",
            "250ms",
            "--instance-timeout",
            "1500ms",
        ])
        .start()
        .await;
    let api = server.api();
    for _ in 0..250 {
        if api.get("/ready").await.ok().map(|r| r.status) == Some(200) {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not ready within 5 s:\n{}", server.log());
}

#[track_caller]
fn assert_no_cause(what: &str, text: &str) {
    for word in CAUSES {
        assert!(!text.contains(word), "{what} leaks {word:?}: {text}");
    }
}

async fn config_set(redis: &RedisServer, key: &str, value: &str) {
    let mut c = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut c)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_is_reported_as_full_and_its_cause_only_logged() {
    let redis = RedisServer::start();
    let server = start(&redis).await;
    bounded_for(LIMIT, async {
        let api = server.api();
        let s = api.new_session(None).await;
        // Redis at its memory limit (noeviction): every new write is refused with OOM.
        config_set(&redis, "maxmemory-policy", "noeviction").await;
        config_set(&redis, "maxmemory", "1").await;

        let r = api
            .post("/sessions", &json!({ "session_id": uuid() }))
            .await;
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.body, json!({ "error": FULL }));
        let mut host = Ws::connect(&server.ws_url(&s.host)).await;
        host.send_json(Ws::join_msg(None)).await;
        let refused = host.recv_type("join_error").await;
        assert_eq!(refused["reason"], FULL, "{refused}");
        assert!(
            server
                .wait_for_log(
                    "command not allowed when used memory",
                    Duration::from_secs(2)
                )
                .await,
            "the cause is not in the log:\n{}",
            server.log()
        );
        config_set(&redis, "maxmemory", "0").await;
        let r = api
            .post("/sessions", &json!({ "session_id": uuid() }))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_reported_without_its_cause() {
    let mut redis = RedisServer::start();
    let server = start(&redis).await;
    bounded_for(LIMIT, async {
        let api = server.api();
        let s = api.new_session(None).await;
        let mut host = Ws::connect(&server.ws_url(&s.host)).await;
        host.join(None).await;
        redis.kill();

        let r = api
            .post("/sessions", &json!({ "session_id": uuid() }))
            .await;
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.body, json!({ "error": UNAVAILABLE }));
        let r = api
            .post(
                &format!("/sessions/{}/join", s.id),
                &json!({ "passphrase": s.code }),
            )
            .await;
        assert_eq!(r.status, 503, "{}", r.body);
        assert_no_cause("HTTP join", &r.body.to_string());
        // A relay to somebody unknown needs a Redis lookup: an `error` frame, fixed text.
        host.send_json(json!({ "type": "signal", "to_peer": "nobody", "signal": {} }))
            .await;
        let err: Value = host.recv_type("error").await;
        assert_no_cause("relay error", &err.to_string());
        let mut late = Ws::connect(&server.ws_url(&s.host)).await;
        late.send_json(Ws::join_msg(None)).await;
        let refused = late.recv_type("join_error").await;
        assert_no_cause("join_error", &refused.to_string());
        let ready = api.get("/ready").await.unwrap();
        assert_eq!(ready.status, 503);
        assert_no_cause("/ready", &ready.body.to_string());
        assert!(
            server
                .wait_for_log("store_unavailable", Duration::from_secs(2))
                .await,
            "the cause is not in the log:\n{}",
            server.log()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_logs_no_warning() {
    let redis = RedisServer::start();
    let mut server = start(&redis).await;
    bounded_for(LIMIT, async {
        let (status, health) = server.health().await.expect("/health answers");
        assert_eq!(status, 200, "{health}");
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(15)).await;
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
        let log = server.log();
        assert!(log.contains("stopped"), "{log}");
        let drain = &log[log.find("draining").expect("drain logged")..];
        assert!(!drain.contains("WARN"), "a clean shutdown warned:\n{drain}");
    })
    .await;
}
