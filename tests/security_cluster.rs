//! Issue 7 across real instances on one real Redis: code guesses counted exactly on every
//! instance together, a full Redis that degrades new work without fencing anyone, and what a
//! Redis reader learns of join codes.

mod common;

use std::time::Duration;

use futures::future::join_all;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use common::{bounded_for, uuid, Api, RedisServer, Server, ServerBuilder, Ws};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

/// `n` instances sharing `redis` and the secret, quick liveness, trusting 127.0.0.1 as proxy.
async fn instances(redis: &RedisServer, n: usize) -> Vec<Server> {
    let starts = (0..n).map(|_| {
        ServerBuilder::new()
            .redis_url(&redis.url())
            .args([
                "--secret",
                SECRET,
                "--heartbeat-interval",
                "250ms",
                "--instance-timeout",
                "1500ms",
                "--trusted-proxies",
                "127.0.0.1",
            ])
            .start()
    });
    let servers = join_all(starts).await;
    for s in &servers {
        let mut ok = false;
        for _ in 0..100 {
            if s.api().get("/ready").await.is_ok_and(|r| r.status == 200) {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "instance not ready");
    }
    servers
}

async fn post_from(base: String, path: String, xff: String, body: Value) -> (u16, Value) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = client
        .post(format!("{base}{path}"))
        .header("x-forwarded-for", xff)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_codes_are_counted_exactly_across_instances() {
    let redis = RedisServer::start();
    let servers = instances(&redis, 2).await;
    bounded_for(Duration::from_secs(90), async {
        let s = servers[0].api().new_session(None).await;
        let path = format!("/sessions/{}/join", s.id);
        let wrong = if s.code == "000000" {
            "000001"
        } else {
            "000000"
        };
        // 2 x 500 concurrent guesses from one address, half on each instance, the right code
        // hidden among them: exactly 5 are compared, wherever they landed.
        let tasks = (0..1000).map(|i| {
            let code = if i == 501 {
                s.code.clone()
            } else {
                wrong.to_owned()
            };
            let base = servers[i % 2].base();
            tokio::spawn(post_from(
                base,
                path.clone(),
                "10.4.0.1".into(),
                json!({"passphrase": code}),
            ))
        });
        let results: Vec<(u16, Value)> = join_all(tasks)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let compared = results.iter().filter(|r| r.0 == 200).count();
        assert_eq!(
            compared, 5,
            "codes compared from one address on two instances"
        );
        assert_eq!(results.iter().filter(|r| r.0 == 429).count(), 995);

        // From 200 addresses, 3 guesses each on each instance: the session-wide 50 holds.
        let s = servers[1].api().new_session(None).await;
        let path = format!("/sessions/{}/join", s.id);
        let tasks = (0..1200).map(|i| {
            let base = servers[i % 2].base();
            let from = format!("10.3.{}.{}", i / 6 / 100, i / 6 % 100 + 1);
            tokio::spawn(post_from(
                base,
                path.clone(),
                from,
                json!({"passphrase": "zzzzzz"}),
            ))
        });
        let results: Vec<(u16, Value)> = join_all(tasks)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let compared = results.iter().filter(|r| r.0 == 200).count();
        assert_eq!(compared, 50, "codes compared from everywhere");
        // The rightful joiner from an address of its own is refused while the session is
        // under attack (the bound on distributed guessing), but the host's token still works.
        let mut host = Ws::connect(&servers[0].ws_url(&s.host)).await;
        let ok = host.join(None).await;
        assert_eq!(ok["peers"][0]["role"], "server");
    })
    .await;
}

async fn config_set(conn: &mut redis::aio::MultiplexedConnection, key: &str, value: &str) {
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query_async(conn)
        .await
        .unwrap();
}

/// Writes values of `size` bytes (then ever smaller ones) until Redis answers OOM.
async fn fill(conn: &mut redis::aio::MultiplexedConnection, size: usize) {
    let mut size = size;
    let mut n = 0u64;
    while size >= 16 {
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("filler:{size}:{}", uuid()))
            .arg("f".repeat(size))
            .query_async(conn)
            .await;
        match r {
            Ok(()) => n += 1,
            Err(e) => {
                assert!(e.to_string().contains("OOM"), "{e}");
                size /= 4;
            }
        }
        assert!(n < 100_000, "Redis never filled up");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_refuses_new_work_and_fences_nobody() {
    let redis = RedisServer::start();
    let servers = instances(&redis, 2).await;
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    bounded_for(Duration::from_secs(90), async {
        // A room across the two instances.
        let (a, b) = (servers[0].api(), servers[1].api());
        let s = a.new_session(None).await;
        let mut host = Ws::connect(&servers[0].ws_url(&s.host)).await;
        host.join(Some(&s.code)).await;
        let token = b.join_token(&s.id, &s.code).await;
        let mut joiner = Ws::connect(&servers[1].ws_url(&token)).await;
        joiner.join(Some(&s.code)).await;
        host.recv_type("peer_joined").await;
        let (host_id, joiner_id) = (host.id(), joiner.id());

        // Redis fills up (noeviction, as deploy/ and terraform/ set it): a little above what is
        // used, then filled to the brim by someone else's writes.
        let used: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await
            .unwrap();
        let used: u64 = used
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        config_set(&mut conn, "maxmemory-policy", "noeviction").await;
        config_set(
            &mut conn,
            "maxmemory",
            &(used + 4 * 1024 * 1024).to_string(),
        )
        .await;
        fill(&mut conn, 64 * 1024).await;
        // And keeps being filled by someone else while we look (memory that frees up, e.g.
        // client buffers, is taken again at once, as under real pressure).
        let pressure = {
            let mut conn = conn.clone();
            tokio::spawn(async move {
                loop {
                    fill(&mut conn, 256).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };

        // Twice the instance timeout later nobody was fenced: the room still relays both ways,
        // across instances, and both instances are healthy and ready.
        tokio::time::sleep(Duration::from_secs(3)).await;
        for (i, s) in servers.iter().enumerate() {
            assert!(
                !s.log().contains("instance fenced"),
                "instance {i} fenced:\n{}",
                s.log()
            );
            assert_eq!(s.health().await.map(|h| h.0), Some(200));
        }
        host.send_json(json!({"type": "signal", "to_peer": joiner_id, "signal": {"a": 1}}))
            .await;
        assert_eq!(joiner.recv_type("signal").await["signal"]["a"], 1);
        joiner
            .send_json(json!({"type": "signal", "to_peer": host_id, "signal": {"b": 2}}))
            .await;
        assert_eq!(host.recv_type("signal").await["signal"]["b"], 2);

        // New work is refused with 503 (HTTP) or a join_error, at once and clearly.
        // The kind is told (full, not unreachable); Redis's own words only reach the log.
        let full = "session store full; try again later";
        let reg = a.post("/sessions", &json!({"session_id": uuid()})).await;
        assert_eq!(reg.status, 503, "{}", reg.body);
        assert_eq!(reg.body["error"], full, "{}", reg.body);
        let mut late = Ws::connect(&servers[1].ws_url(&token)).await;
        late.send_json(Ws::join_msg(Some(&s.code))).await;
        let refused = late.recv_type("join_error").await;
        assert_eq!(refused["reason"], full, "{refused}");
        assert!(servers[0]
            .log()
            .contains("command not allowed when used memory"));

        // Room made: everything works again.
        pressure.abort();
        let _: () = redis::cmd("FLUSHDB")
            .arg("ASYNC")
            .query_async(&mut conn)
            .await
            .ok()
            .unwrap_or(());
        config_set(&mut conn, "maxmemory", "0").await;
        let mut ok = false;
        for _ in 0..50 {
            let r = a.post("/sessions", &json!({"session_id": uuid()})).await;
            if r.status == 200 {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "registration works again once Redis has room");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_reader_learns_no_code() {
    let redis = RedisServer::start();
    let servers = instances(&redis, 1).await;
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    bounded_for(Duration::from_secs(30), async {
        let api: Api = servers[0].api();
        let s = api.new_session(None).await;
        api.join_token(&s.id, &s.code).await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut dump = String::new();
        for k in &keys {
            let kind: String = redis::cmd("TYPE")
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap();
            let v: Value = match kind.as_str() {
                "string" => json!(redis::cmd("GET")
                    .arg(k)
                    .query_async::<String>(&mut conn)
                    .await
                    .unwrap()),
                "hash" => json!(redis::cmd("HGETALL")
                    .arg(k)
                    .query_async::<std::collections::HashMap<String, String>>(&mut conn)
                    .await
                    .unwrap()),
                _ => Value::Null,
            };
            dump.push_str(&format!("{k} {v}\n"));
        }
        assert!(!dump.contains(&s.code), "the code is in Redis:\n{dump}");
        let session: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("beach-road:{{{}}}:session", s.id))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!session.contains_key("salt"), "{session:?}");
        // The stored digest is keyed by the secret, which is not in Redis: without it, trying
        // all 10^6 codes finds nothing.
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(s.id.as_bytes());
        mac.update(&[0]);
        mac.update(s.code.as_bytes());
        assert_eq!(session["hash"], hex::encode(mac.finalize().into_bytes()));
        assert!(!dump.contains(SECRET));
        // Nor does a reader learn the host's token from anything a joiner can see: tokens are
        // key names only (their own slots), never values next to the session.
        assert!(!session.values().any(|v| v.contains(&s.host)));
    })
    .await;
}
