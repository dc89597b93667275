//! The local cluster's real HAProxy configuration (`deploy/cluster/haproxy.cfg.template`) in
//! front of three instances on one Redis: clients keep making requests through it while one
//! instance is SIGKILLed, and not one request fails (retried on another instance), the health
//! check takes the dead one out, and `beach-road check` passes through the balancer; a relay
//! session's held host upgrade outlasts the balancer's request timeouts.
//!
//! Needs `haproxy` (scripts/test installs it on a fresh Debian machine).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use common::redis::RedisServer;
use common::{bounded_for, free_port, Api, Server, ServerBuilder, TempDir};

/// HAProxy in the foreground with the rendered template; killed on drop.
struct Haproxy {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Haproxy {
    fn start(servers: &[&Server]) -> Haproxy {
        let dir = TempDir::new("haproxy");
        let port = free_port();
        let lines: Vec<String> = servers
            .iter()
            .enumerate()
            .map(|(i, s)| format!("    server road{} 127.0.0.1:{} check", i + 1, s.port()))
            .collect();
        let template = include_str!("../deploy/cluster/haproxy.cfg.template");
        let config = template
            .replace("@LB_PORT@", &port.to_string())
            .replace("@STATS_PORT@", &free_port().to_string())
            .replace("@WORKDIR@", &dir.path().display().to_string())
            .replace("@SERVERS@", &lines.join("\n"));
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).expect("write the config");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy is installed (scripts/test installs it)");
        Haproxy {
            child,
            port,
            _dir: dir,
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_fails_no_client_request() {
    bounded_for(Duration::from_secs(90), async {
        let redis = RedisServer::start();
        let secret = "c".repeat(40);
        let start = || {
            ServerBuilder::new()
                .redis_url(&redis.url())
                .env("BEACH_ROAD_SECRET", &secret)
                .env("BEACH_ROAD_TRUSTED_PROXIES", "127.0.0.1")
                // Every HTTP join mints a joiner token: thousands here, one session.
                .env("BEACH_ROAD_MAX_TOKENS_PER_SESSION", "1000000")
                .start()
        };
        let (a, mut b, c) = (start().await, start().await, start().await);
        let lb = Haproxy::start(&[&a, &b, &c]);
        let api = Api::new(&lb.base());
        // Up once every instance passed its health check.
        let mut up = false;
        for _ in 0..100 {
            if api.get("/ready").await.is_ok_and(|r| r.status == 200) {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(up, "the balancer never answered /ready");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let session = api.new_session(None).await;

        // Four clients: session status and HTTP joins through the balancer, back to back.
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::new();
        for n in 0..4 {
            let (api, stop, done) = (api.clone(), stop.clone(), done.clone());
            let (id, code) = (session.id.clone(), session.code.clone());
            clients.push(tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let ok = if n % 2 == 0 {
                        match api.get(&format!("/sessions/{id}")).await {
                            Ok(r) if r.status == 200 => Ok(()),
                            Ok(r) => Err(format!("status: {} {}", r.status, r.body)),
                            Err(e) => Err(format!("status: {e}")),
                        }
                    } else {
                        let body = json!({ "passphrase": code });
                        let r = api.post(&format!("/sessions/{id}/join"), &body).await;
                        if r.status == 200 && r.body["success"] == true {
                            Ok(())
                        } else {
                            Err(format!("join: {} {}", r.status, r.body))
                        }
                    };
                    match ok {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(e),
                    }
                }
                failures
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = done.load(Ordering::Relaxed);
        b.signal(libc::SIGKILL);
        let _ = b.wait_exit(Duration::from_secs(5)).await;
        // Past the health check's two failed probes (1 s apart) and beyond.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for c in clients {
            failures.extend(c.await.expect("client task"));
        }
        let total = done.load(Ordering::Relaxed);
        assert!(
            failures.is_empty(),
            "{} of {} requests failed, e.g. {:?}",
            failures.len(),
            total + failures.len() as u64,
            &failures[..failures.len().min(3)]
        );
        assert!(
            total > before + 20,
            "requests went on after the kill: {before} → {total}"
        );

        // The synthetic probe passes through the balancer with one instance dead.
        let out = tokio::task::spawn_blocking({
            let url = lb.base();
            move || {
                Command::new(env!("CARGO_BIN_EXE_beach-road"))
                    .args(["check", "--url", &url, "--timeout", "10s"])
                    .output()
                    .expect("run beach-road check")
            }
        })
        .await
        .expect("probe task");
        let line = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "check failed: {line}");
        drop(lb);
    })
    .await
}

/// A relay session through the real balancer and three instances: the host's upgrade is held
/// past HAProxy's request and keep-alive timeouts (10 s) without being cut or retried, then
/// pairs with a joiner (host and joiner sockets on whichever instances the balancer picked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_pair_forms_through_the_balancer_after_a_long_hold() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    bounded_for(Duration::from_secs(90), async {
        let redis = RedisServer::start();
        let secret = "d".repeat(40);
        let start = || {
            ServerBuilder::new()
                .redis_url(&redis.url())
                .env("BEACH_ROAD_SECRET", &secret)
                .env("BEACH_ROAD_TRUSTED_PROXIES", "127.0.0.1")
                .start()
        };
        let (a, b, c) = (start().await, start().await, start().await);
        let lb = Haproxy::start(&[&a, &b, &c]);
        let api = Api::new(&lb.base());
        for _ in 0..100 {
            if api.get("/ready").await.is_ok_and(|r| r.status == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let id = common::uuid();
        let r = api
            .post("/relay/sessions", &json!({ "session_id": id }))
            .await;
        let host_url = r.body["transports"][0]["url"].as_str().unwrap().to_owned();
        assert!(
            host_url.contains(&format!(":{}/relay/", lb.port)),
            "{host_url}"
        );
        let code = r.body["join_code"].as_str().unwrap().to_owned();
        let held = tokio::spawn(async move { tokio_tungstenite::connect_async(host_url).await });
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert!(
            !held.is_finished(),
            "the held upgrade is neither answered nor cut"
        );
        let j = api.join_http(&id, Some(&code)).await;
        let url = j["transports"][0]["url"].as_str().unwrap().to_owned();
        let (mut joiner, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let (mut host, _) = held.await.unwrap().expect("answered once a joiner came");
        host.send(Message::text("beach:status:approval_granted"))
            .await
            .unwrap();
        let big = Message::binary(vec![7u8; 48 * 1024 + 13]);
        host.send(big.clone()).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = joiner.next().await.unwrap().unwrap();
            if matches!(m, Message::Text(_) | Message::Binary(_)) {
                got.push(m);
            }
        }
        assert_eq!(got[0], Message::text("beach:status:approval_granted"));
        assert_eq!(got[1], big);
        drop(lb);
    })
    .await
}
