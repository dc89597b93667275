//! Reaping at the scale of one instance (issue 8, item 7): a dead instance that owned 10,000
//! joined peers, against a real `redis-server`.
//!
//! The dead instance's state is written directly, as it leaves it behind: 10,000 member records
//! in 1,000 rooms (10 each) and its `{inst:D}:peers` set, with a heartbeat a minute old. Every
//! room also has one survivor, joined through instance A, so each room's survivor must be told
//! `peer_left` 10 times. A reaps nothing (test hook), so the reaper is instance B and every
//! `peer_left` takes the cross-instance path: leave script on B, B's hub, PUBLISH, A's hub.
//! Timed from the moment D is stale until A delivered all 10,000 and D is fully reaped.
//!
//! Before the fix the reaper ran one leave script (and its fan-out) at a time, 1,000 peers per
//! tick at most.

#[path = "common/redis.rs"]
mod redis_server;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beach_road::engine::redis::{RedisEngine, RedisSettings};
use beach_road::engine::{Engine, EngineConfig, Entry, JoinResult, NewPeer};
use beach_road::protocol::{new_id, Role};
use futures::StreamExt;
use redis_server::RedisServer;
use serde_json::Value;

const ROOMS: usize = 1_000;
const DEAD_PER_ROOM: usize = 10;
/// Every survivor told, from the moment the dead instance is stale (heartbeat interval 200 ms;
/// debug build, 2 shared cores).
const BOUND: Duration = Duration::from_secs(5);

fn settings(url: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_owned(),
        key_prefix: "t".to_owned(),
        heartbeat_interval: Duration::from_millis(200),
        instance_timeout: Duration::from_secs(1),
    }
}

/// The server's default call timeout (`--redis-timeout`): each pipeline must fit in it.
fn config() -> EngineConfig {
    EngineConfig {
        call_timeout: Duration::from_secs(1),
        ..EngineConfig::default()
    }
}

async fn engine(r: &RedisServer) -> RedisEngine {
    redis_server::ready_engine(config(), settings(&r.url())).await
}

async fn bounded<F: Future>(limit: Duration, f: F) -> F::Output {
    tokio::time::timeout(limit, f)
        .await
        .expect("test exceeded its time limit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_peers_of_a_dead_instance_are_reaped_within_seconds() {
    let r = RedisServer::start();
    bounded(Duration::from_secs(120), async {
        let (a, b) = (engine(&r).await, engine(&r).await);
        a.pause_reaper(true);
        let mut c = r.client().get_multiplexed_async_connection().await.unwrap();

        let rooms: Vec<String> = (0..ROOMS).map(|_| new_id()).collect();
        // What the dead instance D leaves behind: its members, joined before the survivors (so
        // the survivors were told of them: their join snapshots list them), and below its
        // heartbeat, a minute old.
        let dead = new_id();
        let blob = r#"{"supported_transports":["webrtc"],"preferred_transport":null}"#;
        let mut pipe = redis::pipe();
        for room in &rooms {
            for j in 0..DEAD_PER_ROOM {
                let peer = new_id();
                let rec = format!("{}|client|0|{dead}|{blob}", 100 + j);
                pipe.cmd("HSET")
                    .arg(format!("t:{{{room}}}:peers"))
                    .arg(&peer)
                    .arg(rec)
                    .ignore();
                pipe.cmd("SADD")
                    .arg(format!("t:{{inst:{dead}}}:peers"))
                    .arg(format!("{room}|{peer}"))
                    .ignore();
            }
        }
        let () = pipe.query_async(&mut c).await.unwrap();
        // One survivor per room, on A.
        let survivors: Vec<_> = futures::stream::iter(rooms.iter().cloned())
            .map(|room| {
                let a = a.clone();
                async move {
                    let id = new_id();
                    let q = a.connect(&id);
                    let peer = NewPeer {
                        id: id.clone(),
                        role: Role::Client,
                        supported_transports: vec![Value::from("webrtc")],
                        preferred_transport: None,
                        metadata: None,
                    };
                    match a.join(&room, peer, 64, Entry::Admitted).await.unwrap() {
                        JoinResult::Joined(_) => q,
                        refused => panic!("refused: {refused:?}"),
                    }
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;

        let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
        let _: i64 = redis::cmd("ZADD")
            .arg("t:{instances}:alive")
            .arg((secs - 60) * 1000)
            .arg(&dead)
            .query_async(&mut c)
            .await
            .unwrap();
        let t0 = Instant::now();

        // Each survivor counts its peer_left; the slowest decides.
        let told = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waits = survivors.into_iter().map(|mut q| {
            let told = told.clone();
            tokio::spawn(async move {
                let mut left = 0;
                while left < DEAD_PER_ROOM {
                    let frame = q.recv().await.expect("survivor's queue closed");
                    let v: Value = serde_json::from_str(&frame).unwrap();
                    if v["type"] == "peer_left" {
                        left += 1;
                        told.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                q
            })
        });
        let all = futures::future::join_all(waits);
        let queues = match tokio::time::timeout(Duration::from_secs(60), all).await {
            Ok(q) => q,
            Err(_) => panic!(
                "only {} of {} peer_left within 60 s",
                told.load(std::sync::atomic::Ordering::Relaxed),
                ROOMS * DEAD_PER_ROOM
            ),
        };
        let told_all = t0.elapsed();
        let set = format!("t:{{inst:{dead}}}:peers");
        loop {
            let left: usize = redis::cmd("SCARD")
                .arg(&set)
                .query_async(&mut c)
                .await
                .unwrap();
            let unfinished: usize = redis::cmd("ZCARD")
                .arg("t:{instances}:dead")
                .query_async(&mut c)
                .await
                .unwrap();
            if left == 0 && unfinished == 0 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{left} entries left"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reaped = t0.elapsed();
        eprintln!(
            "{} peers of a dead instance: every survivor told after {told_all:?}, fully reaped \
             after {reaped:?} (from the moment it was stale; bound {BOUND:?})",
            ROOMS * DEAD_PER_ROOM
        );
        // Only the survivors remain, and none was told anything twice.
        for room in rooms.iter().take(20) {
            let n: usize = redis::cmd("HLEN")
                .arg(format!("t:{{{room}}}:peers"))
                .query_async(&mut c)
                .await
                .unwrap();
            assert_eq!(n, 1, "room {room}");
        }
        for q in queues {
            let mut q = q.unwrap();
            assert!(tokio::time::timeout(Duration::from_millis(1), q.recv())
                .await
                .is_err());
        }
        assert!(told_all < BOUND, "survivors told after {told_all:?}");
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}
