//! A Redis failover behind a moving endpoint (issue 8, item 5): two real `beach-road`
//! processes on a primary X with a replica Y, both private `redis-server`s.
//!
//! A managed endpoint (ElastiCache's primary endpoint) is a DNS name that follows the primary:
//! after a failover, new connections reach the new primary, while connections opened before may
//! stay open to the old node, now a replica that answers every write with `READONLY`. The
//! instances reach Redis through a small TCP proxy in this test that plays the endpoint: new
//! connections go to its current upstream, switched from X to Y at the failover; connections
//! opened before stay with X. Before the fix, the instances kept writing to X: every write
//! failed, `/ready` and `POST /sessions` stayed 503 (for good: 90 s and more), and nothing ever
//! reconnected.

mod common;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use common::{bounded_for, find_peer, uuid, RedisServer, Server, ServerBuilder, Ws};

/// Both instances must serve again within this of the failover.
const RECOVERY_BOUND: Duration = Duration::from_secs(5);

/// The endpoint: each new connection goes to the upstream port of the moment.
struct Proxy {
    port: u16,
    upstream: Arc<AtomicU16>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let current = Arc::new(AtomicU16::new(upstream));
        let to = current.clone();
        // Owns every connection task: aborting it (drop) drops the set, which aborts them.
        let accept = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let port = to.load(Ordering::SeqCst);
                conns.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Proxy {
            port,
            upstream: current,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// New connections go to `port` from now on; open ones stay where they are.
    fn switch(&self, port: u16) {
        self.upstream.store(port, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn cmd(r: &RedisServer, args: &[&str]) -> redis::Value {
    let mut c = r.client().get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut c).await.unwrap()
}

/// `REPLICAOF 127.0.0.1 port`, or `REPLICAOF NO ONE`.
async fn replica_of(r: &RedisServer, primary: Option<u16>) {
    match primary {
        Some(port) => cmd(r, &["REPLICAOF", "127.0.0.1", &port.to_string()]).await,
        None => cmd(r, &["REPLICAOF", "NO", "ONE"]).await,
    };
}

async fn info_replication(r: &RedisServer) -> String {
    match cmd(r, &["INFO", "replication"]).await {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("INFO: {other:?}"),
    }
}

async fn ready(s: &Server) -> bool {
    s.api().get("/ready").await.ok().map(|r| r.status) == Some(200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_behind_a_moving_endpoint_recovers_within_seconds() {
    // A full resync writes an RDB file into the server's directory: not into the work tree.
    let dir = common::TempDir::new("failover");
    let (x, y) = (
        RedisServer::start_in(dir.path()),
        RedisServer::start_in(dir.path()),
    );
    let proxy = Proxy::start(x.port()).await;
    let secret = format!("failover-{}-{}", uuid(), uuid());
    let starts = (0..2).map(|_| {
        ServerBuilder::new()
            .redis_url(&proxy.url())
            // The default instance timeout (4 s): with a shorter one an instance whose recovery
            // a loaded machine stretched past it is rightly written off by the other one (its
            // peers leave, it fences itself), which is not what this test is about.
            .args(["--heartbeat-interval", "250ms", "--instance-timeout", "4s"])
            .args(["--secret", &secret])
            .start()
    });
    let mut servers = join_all(starts).await;
    bounded_for(Duration::from_secs(60), async {
        replica_of(&y, Some(x.port())).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !info_replication(&y).await.contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "Y never synced with X");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for s in &servers {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !ready(s).await {
                assert!(Instant::now() < deadline, "not ready:\n{}", s.log());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // A room across the two instances.
        let s = servers[0].api().new_session(None).await;
        let mut host = Ws::connect(&servers[0].ws_url(&s.host)).await;
        host.join(None).await;
        let token = servers[1].api().join_token(&s.id, &s.code).await;
        let mut joiner = Ws::connect(&servers[1].ws_url(&token)).await;
        let ok = joiner.join(None).await;
        assert_eq!(find_peer(&ok, &host.id())["role"], "server");
        host.recv_type("peer_joined").await;
        let pids: Vec<i32> = servers.iter().map(Server::pid).collect();

        // The failover: Y is promoted, X demoted to Y's replica (its clients stay connected),
        // and the endpoint follows the new primary.
        replica_of(&y, None).await;
        replica_of(&x, Some(y.port())).await;
        proxy.switch(y.port());
        let t0 = Instant::now();

        // Each instance registers sessions again and is ready, within seconds.
        let mut recovered = Vec::new();
        for (i, server) in servers.iter().enumerate() {
            let api = server.api();
            loop {
                let r = api
                    .post("/sessions", &json!({ "session_id": uuid() }))
                    .await;
                if r.status == 200 && ready(server).await {
                    recovered.push(t0.elapsed());
                    break;
                }
                assert!(
                    t0.elapsed() < RECOVERY_BOUND,
                    "instance {i} still refuses after {:?}: {} {}\n{}",
                    t0.elapsed(),
                    r.status,
                    r.body,
                    server.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        eprintln!("registration and /ready back after {recovered:?} (bound {RECOVERY_BOUND:?})");
        let role = info_replication(&x).await;
        assert!(role.contains("role:slave"), "X is not a replica: {role}");
        assert!(
            servers
                .iter()
                .any(|s| s.log().contains("replacing the Redis connection")),
            "no instance saw the failover"
        );

        // Nobody restarted, and the room still relays both ways across the instances.
        for (i, s) in servers.iter_mut().enumerate() {
            assert_eq!(s.try_exit(), None, "instance {i} exited");
            assert_eq!(s.pid(), pids[i]);
        }
        host.send_json(json!({"type": "signal", "to_peer": joiner.id(), "signal": {"a": 1}}))
            .await;
        assert_eq!(joiner.recv_type("signal").await["signal"]["a"], 1);
        joiner
            .send_json(json!({"type": "signal", "to_peer": host.id(), "signal": {"b": 2}}))
            .await;
        assert_eq!(host.recv_type("signal").await["signal"]["b"], 2);
    })
    .await;
}
