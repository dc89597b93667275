//! Multi-instance tests (issue 3, and the SIGTERM drain of issue 4): two or three real
//! `beach-road` processes on one real `redis-server` that each test starts on a free port.
//! The flows, the signals in order, kill, freeze and the Redis outage also run on a local Redis
//! Cluster of three primaries and three replicas (issue 11): each is a module of two tests,
//! `node` and `cluster` ([`on_both`]).
//!
//! Instances run with short liveness intervals (`--heartbeat-interval 250ms`,
//! `--instance-timeout 1500ms`) so that kill, freeze and outage scenarios finish quickly, and
//! all with the same `--secret` (a fresh one per cluster): join codes are stored as an HMAC under
//! it, so a code registered through one instance is checked by another only with the same
//! secret ([`instances_without_a_shared_secret_refuse_each_others_codes`] shows the failure).
//!
//! Members join as the clients do (`docs/protocol.md`): the host through the token of its
//! register answer (role `server`), joiners with an HTTP join and then the socket of the token
//! its answer carries (role `client`); [`Cluster::public`] joins through the session id and the
//! code, which is `client` too.
//!
//! Every test body is bounded; processes are killed when the [`Cluster`] is dropped (Server and
//! RedisServer handles kill on drop, also on panic). Observed timings are printed with
//! `eprintln!` (run with `--nocapture` to see them); only the bounds the issues state are
//! asserted.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{json, Value};

use common::{
    bounded_for, find_peer, flows, sdp, uuid, Api, RedisCluster, RedisServer, Scope, Server,
    ServerBuilder, Session, Ws, WAIT,
};

const HEARTBEAT: &str = "250ms";
const INSTANCE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Long enough for a stray message to show up on loopback.
const QUIET: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// `n` instances on one private Redis. Field order: the servers are killed before Redis.
struct Cluster {
    servers: Vec<Server>,
    redis: Store,
}

/// Which Redis the instances share.
#[derive(Clone, Copy, Debug)]
enum On {
    Node,
    Cluster,
}

/// Runs `async fn $body(On)` as two tests: `$body::node` on one Redis server and
/// `$body::cluster` on a Redis Cluster.
macro_rules! on_both {
    ($body:ident) => {
        mod $body {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn node() {
                super::$body(super::On::Node).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                super::$body(super::On::Cluster).await
            }
        }
    };
}

/// The Redis of one [`Cluster`]: one server, or three primaries with a replica each.
enum Store {
    Node(RedisServer),
    Cluster(RedisCluster),
}

impl Store {
    fn start(on: On) -> Store {
        match on {
            On::Node => Store::Node(RedisServer::start()),
            On::Cluster => Store::Cluster(RedisCluster::start()),
        }
    }

    fn url(&self) -> String {
        match self {
            Store::Node(r) => r.url(),
            Store::Cluster(c) => c.url(),
        }
    }

    /// Every Redis process killed (an outage).
    fn kill(&mut self) {
        match self {
            Store::Node(r) => r.kill(),
            Store::Cluster(c) => c.kill_all(),
        }
    }

    /// Back, empty, on the same ports.
    fn restart(&mut self) {
        match self {
            Store::Node(r) => r.restart(),
            Store::Cluster(c) => c.restart_all(),
        }
    }
}

/// A fresh secret for one cluster (at least 32 bytes, as the server requires).
fn cluster_secret() -> String {
    format!("cluster-{}-{}", uuid(), uuid())
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        Self::start_on(On::Node, n).await
    }

    /// `n` instances on a fresh Redis of kind `on`.
    async fn start_on(on: On, n: usize) -> Cluster {
        Self::start_with(on, n, |_| Vec::new()).await
    }

    /// Starts `n` instances sharing one secret; `extra(i)` adds flags to instance `i`. Waits
    /// until all are ready.
    async fn start_with(on: On, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Cluster {
        let secret = cluster_secret();
        Self::start_with_secrets(on, n, |i| {
            let mut args = vec!["--secret".to_owned(), secret.clone()];
            args.extend(extra(i));
            args
        })
        .await
    }

    /// Starts `n` instances with exactly the flags of `extra(i)` (which must give the secret)
    /// besides Redis and the liveness intervals.
    async fn start_with_secrets(on: On, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Cluster {
        let redis = tokio::task::block_in_place(|| Store::start(on));
        let starts = (0..n).map(|i| {
            let builder = ServerBuilder::new()
                .redis_url(&redis.url())
                .args([
                    "--heartbeat-interval".to_owned(),
                    HEARTBEAT.to_owned(),
                    "--instance-timeout".to_owned(),
                    format!("{}ms", INSTANCE_TIMEOUT.as_millis()),
                ])
                .args(extra(i));
            builder.start()
        });
        let servers = join_all(starts).await;
        let cluster = Cluster { servers, redis };
        for i in 0..n {
            if cluster
                .wait_ready(i, true, Duration::from_secs(10))
                .await
                .is_none()
            {
                panic!("instance {i} not ready within 10 s");
            }
        }
        cluster
    }

    fn s(&self, i: usize) -> &Server {
        &self.servers[i]
    }

    fn api(&self, i: usize) -> Api {
        self.servers[i].api()
    }

    /// `GET /ready` status (`None`: no answer within the client timeout).
    async fn ready_status(&self, i: usize) -> Option<u16> {
        self.api(i).get("/ready").await.ok().map(|r| r.status)
    }

    /// Polls `/ready` every 20 ms until it is 200 (`want`) or not 200 (`!want`); returns how
    /// long that took, `None` after `timeout`.
    async fn wait_ready(&self, i: usize, want: bool, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let ok = self.ready_status(i).await == Some(200);
            if ok == want {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Registers a session on instance `i` (generated code).
    async fn session(&self, i: usize) -> Session {
        self.api(i).new_session(None).await
    }

    /// The host joins on instance `i` through its token; asserts role `server`. Returns the
    /// socket and `join_success`.
    async fn host(&self, i: usize, session: &Session) -> (Ws, Value) {
        let mut ws = Ws::connect(&self.s(i).ws_url(&session.host)).await;
        let ok = ws.join(Some(&session.code)).await;
        assert_eq!(find_peer(&ok, &ws.id())["role"], "server", "{ok}");
        (ws, ok)
    }

    /// A joiner as the CLIs join, all on instance `i`: HTTP join with the code, then the socket
    /// of the token the answer carries; asserts role `client`.
    async fn joiner(&self, i: usize, session: &Session) -> (Ws, Value) {
        let token = self.api(i).join_token(&session.id, &session.code).await;
        let mut ws = Ws::connect(&self.s(i).ws_url(&token)).await;
        let ok = ws.join(Some(&session.code)).await;
        assert_eq!(find_peer(&ok, &ws.id())["role"], "client", "{ok}");
        (ws, ok)
    }

    /// A WebSocket join on instance `i` through the public session id and the code (no token):
    /// role `client`.
    async fn public(&self, i: usize, session: &Session) -> (Ws, Value) {
        let mut ws = Ws::connect(&self.s(i).ws_url(&session.id)).await;
        let ok = ws.join(Some(&session.code)).await;
        assert_eq!(find_peer(&ok, &ws.id())["role"], "client", "{ok}");
        (ws, ok)
    }
}

/// The next message within `d`; panics on silence or close.
async fn recv_within(ws: &mut Ws, d: Duration, what: &str) -> Value {
    match ws.next(d).await {
        Ok(Some(v)) => v,
        Ok(None) => panic!("no {what} within {d:?}"),
        Err(c) => panic!("socket closed while waiting for {what}: {c:?}"),
    }
}

fn peer_ids(join_success: &Value) -> Vec<String> {
    let mut ids: Vec<String> = join_success["peers"]
        .as_array()
        .unwrap_or_else(|| panic!("no peers in {join_success}"))
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// A session registered on `a`, its host joined on `a` and a joiner on `b`: signals both ways
/// and an offer posted via `a` (host token) and fetched via `b` (the joiner's token). Proves the
/// cluster routes a fresh room.
async fn assert_cross_instance_room(c: &Cluster, a: usize, b: usize) -> (Ws, Ws, Session) {
    let s = c.session(a).await;
    let (mut host, _) = c.host(a, &s).await;
    let token = c.api(b).join_token(&s.id, &s.code).await;
    let mut joiner = Ws::connect(&c.s(b).ws_url(&token)).await;
    let ok = joiner.join(Some(&s.code)).await;
    assert_eq!(find_peer(&ok, &joiner.id())["role"], "client");
    assert_eq!(find_peer(&ok, &host.id())["role"], "server");
    let joined = host.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["id"], joiner.id());
    host.send_json(json!({"type": "signal", "to_peer": joiner.id(), "signal": {"n": 1}}))
        .await;
    let got = joiner.recv_type("signal").await;
    assert_eq!(got["from_peer"], host.id());
    assert_eq!(got["signal"], json!({"n": 1}));
    joiner
        .send_json(json!({"type": "signal", "to_peer": host.id(), "signal": {"n": 2}}))
        .await;
    let got = host.recv_type("signal").await;
    assert_eq!(got["from_peer"], joiner.id());
    let h = uuid();
    let offer = sdp("offer", &h, &host.id(), &joiner.id());
    c.api(a)
        .post_sdp(Scope::Sessions, &s.host, "offer", &offer)
        .await
        .assert_status(204);
    let got = c
        .api(b)
        .get_offer(Scope::Sessions, &token, &joiner.id())
        .await;
    got.assert_status(200);
    assert_eq!(got.body, offer);
    (host, joiner, s)
}

// ---------------------------------------------------------------------------------------------
// 1. Whole flows of both generations, host on A and joiner on B
// ---------------------------------------------------------------------------------------------

on_both!(generation1_flow_across_instances);
async fn generation1_flow_across_instances(on: On) {
    let c = Cluster::start_on(on, 2).await;
    bounded_for(
        Duration::from_secs(30),
        flows::generation1_flow(c.s(0), c.s(1)),
    )
    .await;
}

on_both!(generation2_flow_across_instances);
async fn generation2_flow_across_instances(on: On) {
    let c = Cluster::start_on(on, 2).await;
    bounded_for(
        Duration::from_secs(30),
        flows::generation2_flow(c.s(0), c.s(1)),
    )
    .await;
}

/// The browser client (no `ping`, `negotiate_transport`) with host and joiner on two instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_flow_across_instances() {
    let c = Cluster::start(2).await;
    bounded_for(Duration::from_secs(30), flows::browser_flow(c.s(0), c.s(1))).await;
}

// ---------------------------------------------------------------------------------------------
// 2. 1000 signals across instances, both directions interleaved
// ---------------------------------------------------------------------------------------------

on_both!(thousand_signals_across_instances_in_order);
/// With the default sender budget (50 signals/s after a burst of 200) each side's 1000 signals
/// take ~16 s: pacing must slow a sender down without losing, duplicating or reordering any.
async fn thousand_signals_across_instances_in_order(on: On) {
    const N: usize = 1000;
    /// Signals in flight per direction before the receivers drain: well below the share of the
    /// per-peer queue relayed frames may fill (3/4 of 256), so none is refused as "not keeping
    /// up" (the test fails on any `error`).
    const WINDOW: usize = 50;
    let c = Cluster::start_on(on, 2).await;
    bounded_for(Duration::from_secs(60), async {
        let s = c.session(0).await;
        let (mut a, _) = c.host(0, &s).await;
        let (mut b, _) = c.joiner(1, &s).await;
        a.recv_type("peer_joined").await;
        let (a_id, b_id) = (a.id(), b.id());
        let started = Instant::now();
        let (mut got_at_a, mut got_at_b) = (Vec::new(), Vec::new());
        for start in (0..N).step_by(WINDOW) {
            let end = (start + WINDOW).min(N);
            for n in start..end {
                a.send_json(json!({"type": "signal", "to_peer": b_id,
                                   "signal": {"seq": n, "dir": "a2b"}}))
                    .await;
                b.send_json(json!({"type": "signal", "to_peer": a_id,
                                   "signal": {"seq": n, "dir": "b2a"}}))
                    .await;
            }
            for _ in start..end {
                let v = recv_within(&mut b, Duration::from_secs(5), "signal at B").await;
                assert_eq!(v["type"], "signal", "{v}");
                assert_eq!(v["from_peer"], a_id.as_str());
                assert_eq!(v["signal"]["dir"], "a2b");
                got_at_b.push(v["signal"]["seq"].as_u64().unwrap() as usize);
                let v = recv_within(&mut a, Duration::from_secs(5), "signal at A").await;
                assert_eq!(v["type"], "signal", "{v}");
                assert_eq!(v["from_peer"], b_id.as_str());
                assert_eq!(v["signal"]["dir"], "b2a");
                got_at_a.push(v["signal"]["seq"].as_u64().unwrap() as usize);
            }
        }
        // None duplicated: nothing more arrives.
        a.expect_silence(QUIET).await;
        b.expect_silence(QUIET).await;
        let want: Vec<usize> = (0..N).collect();
        assert_eq!(got_at_b, want, "A→B lost, duplicated or reordered");
        assert_eq!(got_at_a, want, "B→A lost, duplicated or reordered");
        eprintln!(
            "cluster: {} signals across instances ({N} each way) in {:?}",
            2 * N,
            started.elapsed()
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Concurrent joins through two instances: roles by token, one consistent room
// ---------------------------------------------------------------------------------------------

/// The host (through its token), a joiner (through its token) and a client through the public
/// id and the code join one fresh room at the same time, spread over both instances, 20 times.
/// Whatever order the joins take in Redis, the host's join is `server` and both others are
/// `client`, in every member's view (the original made whoever came first `server`). And the
/// room is consistent: of every two members exactly one lists the other in its `join_success`
/// (the joins are ordered), and the earlier one hears exactly one `peer_joined` for the later
/// one. Each member signals every member it lists at once, possibly before that one's join has
/// fully completed on its instance: every signal arrives, after its sender's `peer_joined`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_through_two_instances_roles_by_token_one_room() {
    const ROOMS: usize = 20;
    // Every client is 127.0.0.1, which registers more sessions than the default allows one
    // address per minute (20, counted cluster-wide).
    let c = Cluster::start_with(On::Node, 2, |_| {
        vec!["--registrations-per-minute".into(), "1000".into()]
    })
    .await;
    bounded_for(Duration::from_secs(60), async {
        // How often the host's join came first, second, third.
        let mut host_position = [0usize; 3];
        for k in 0..ROOMS {
            // Neither instance always has the host; the public join moves between them too.
            let (a, b, p) = (k % 2, 1 - k % 2, (k / 2) % 2);
            let s = c.session(a).await;
            let token = c.api(b).join_token(&s.id, &s.code).await;
            let mut ws = [
                Ws::connect(&c.s(a).ws_url(&s.host)).await,
                Ws::connect(&c.s(b).ws_url(&token)).await,
                Ws::connect(&c.s(p).ws_url(&s.id)).await,
            ];
            let [h, j, q] = &mut ws;
            let (ok_h, ok_j, ok_q) = tokio::join!(
                h.join(Some(&s.code)),
                j.join(Some(&s.code)),
                q.join(Some(&s.code))
            );
            let oks = [ok_h, ok_j, ok_q];
            let ids: Vec<String> = ws.iter().map(Ws::id).collect();
            let role = |id: &str| if id == ids[0] { "server" } else { "client" };
            for ok in &oks {
                for peer in ok["peers"].as_array().unwrap() {
                    let id = peer["id"].as_str().unwrap();
                    assert_eq!(peer["role"], role(id), "room {k}: {ok}");
                }
            }
            let lists = |x: usize, y: usize| peer_ids(&oks[x]).contains(&ids[y]);
            for x in 0..3 {
                assert!(lists(x, x), "room {k}: {} lists not itself", oks[x]);
                for y in x + 1..3 {
                    assert!(
                        lists(x, y) != lists(y, x),
                        "room {k}: members {x} and {y}: exactly one must list the other\n\
                         {}\n{}",
                        oks[x],
                        oks[y]
                    );
                }
            }
            host_position[peer_ids(&oks[0]).len() - 1] += 1;
            // The later members signal the earlier ones at once.
            for (x, w) in ws.iter_mut().enumerate() {
                for y in (0..3).filter(|&y| y != x && lists(x, y)) {
                    w.send_json(json!({"type": "signal", "to_peer": ids[y],
                                       "signal": {"room": k, "from": x}}))
                        .await;
                }
            }
            // Each earlier member hears of each later one: `peer_joined` (its role as everyone
            // sees it), then its signal; nothing else.
            for (x, w) in ws.iter_mut().enumerate() {
                let later: Vec<usize> = (0..3).filter(|&y| y != x && !lists(x, y)).collect();
                let mut got = Vec::new();
                for _ in 0..2 * later.len() {
                    got.push(recv_within(w, WAIT, "peer_joined or signal").await);
                }
                for &y in &later {
                    let joined = got.iter().position(|v| {
                        v["type"] == "peer_joined" && v["peer"]["id"] == ids[y].as_str()
                    });
                    let signal = got
                        .iter()
                        .position(|v| v["type"] == "signal" && v["from_peer"] == ids[y].as_str());
                    let (Some(joined), Some(signal)) = (joined, signal) else {
                        panic!("room {k}: member {x} missed member {y}'s join or signal: {got:?}");
                    };
                    assert!(
                        joined < signal,
                        "room {k}: member {y}'s signal reached {x} before its peer_joined: {got:?}"
                    );
                    assert_eq!(got[joined]["peer"]["role"], role(&ids[y]), "{got:?}");
                    assert_eq!(got[signal]["signal"], json!({"room": k, "from": y}));
                }
            }
            for w in ws.iter_mut() {
                w.expect_silence(Duration::from_millis(50)).await;
            }
        }
        eprintln!(
            "cluster: {ROOMS} rooms of concurrent joins: the host's join was first {} times, \
             second {}, third {}",
            host_position[0], host_position[1], host_position[2]
        );
    })
    .await;
}

/// The `server` role follows the host's token, never the order, across instances: a joiner
/// alone in the room (through B) is `client`, and the host joining after it (through A) is
/// `server`; once the host has left, a client coming (through B, with the public id) into a room
/// without a host is `client`, and the host coming back through B is `server` again while both
/// stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_role_follows_the_host_token_across_instances() {
    let c = Cluster::start(2).await;
    bounded_for(Duration::from_secs(30), async {
        let s = c.session(0).await;
        let (mut j1, ok) = c.joiner(1, &s).await;
        assert_eq!(peer_ids(&ok), vec![j1.id()], "{ok}");
        let (host, ok) = c.host(0, &s).await;
        assert_eq!(find_peer(&ok, &j1.id())["role"], "client");
        let joined = j1.recv_type("peer_joined").await;
        assert_eq!(joined["peer"]["id"], host.id());
        assert_eq!(joined["peer"]["role"], "server");

        let host_id = host.id();
        host.close_abruptly().await;
        assert_eq!(
            j1.recv_type("peer_left").await,
            json!({"type": "peer_left", "peer_id": host_id})
        );
        let (mut j2, ok) = c.public(1, &s).await;
        assert_eq!(find_peer(&ok, &j1.id())["role"], "client");
        assert_eq!(peer_ids(&ok).len(), 2, "{ok}");
        let joined = j1.recv_type("peer_joined").await;
        assert_eq!(joined["peer"]["role"], "client");

        let (back, ok) = c.host(1, &s).await;
        assert_eq!(peer_ids(&ok).len(), 3, "{ok}");
        for ws in [&mut j1, &mut j2] {
            let joined = ws.recv_type("peer_joined").await;
            assert_eq!(joined["peer"]["id"], back.id());
            assert_eq!(joined["peer"]["role"], "server");
            ws.expect_silence(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// Instances started with different secrets: a join code registered through A is refused by B
/// (its digest is keyed by A's secret, which is not in Redis), while tokens, which need no code,
/// work through either. This is why every instance needs the same `--secret`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_without_a_shared_secret_refuse_each_others_codes() {
    let secrets = [cluster_secret(), cluster_secret()];
    let c =
        Cluster::start_with_secrets(On::Node, 2, |i| vec!["--secret".into(), secrets[i].clone()])
            .await;
    bounded_for(Duration::from_secs(30), async {
        let s = c.session(0).await;
        let refused = c.api(1).join_http(&s.id, Some(&s.code)).await;
        assert_eq!(refused["success"], false, "{refused}");
        let mut ws = Ws::connect(&c.s(1).ws_url(&s.id)).await;
        let reason = ws.join_refused(Some(&s.code)).await;
        eprintln!("cluster: different secrets: B refuses A's code: {refused} / {reason:?}");
        // A checks its own code; the token it hands out works through B, and so does the host's.
        let (mut joiner, _) = c.joiner(0, &s).await;
        let (host, _) = c.host(1, &s).await;
        assert_eq!(
            joiner.recv_type("peer_joined").await["peer"]["id"],
            host.id()
        );
        let token = c.api(0).join_token(&s.id, &s.code).await;
        let mut other = Ws::connect(&c.s(1).ws_url(&token)).await;
        other.join(None).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. kill -9 of an instance
// ---------------------------------------------------------------------------------------------

on_both!(kill_9_survivors_get_peer_left_within_5s);
async fn kill_9_survivors_get_peer_left_within_5s(on: On) {
    let c = Cluster::start_on(on, 3).await;
    bounded_for(Duration::from_secs(30), async {
        // Room 1: host on A, victim joiner on B, joiner on C.
        let r1 = c.session(0).await;
        let (mut h1, _) = c.host(0, &r1).await;
        let (_v1, _) = c.joiner(1, &r1).await;
        let (mut j1, _) = c.joiner(2, &r1).await;
        let v1_id = _v1.id();
        h1.recv_type("peer_joined").await;
        h1.recv_type("peer_joined").await;
        j1.expect_silence(Duration::from_millis(50)).await;
        // Room 2: the host (role server) is on B, a joiner on A.
        let r2 = c.session(1).await;
        let (v2, _) = c.host(1, &r2).await;
        let v2_id = v2.id();
        let (mut j2, _) = c.joiner(0, &r2).await;

        let t0 = Instant::now();
        c.servers[1].signal(libc::SIGKILL);
        let limit = Duration::from_secs(5);
        let mut latencies = BTreeMap::new();
        for (name, ws, gone) in [
            ("room1 host on A", &mut h1, &v1_id),
            ("room1 joiner on C", &mut j1, &v1_id),
            ("room2 joiner on A", &mut j2, &v2_id),
        ] {
            let left = limit.saturating_sub(t0.elapsed());
            let v = recv_within(ws, left, "peer_left after kill -9").await;
            assert_eq!(v, json!({"type": "peer_left", "peer_id": gone}), "{name}");
            latencies.insert(name, t0.elapsed());
        }
        for ws in [&mut h1, &mut j1, &mut j2] {
            ws.expect_silence(QUIET).await;
        }
        eprintln!("cluster: kill -9 → peer_left latency (T = {INSTANCE_TIMEOUT:?}, H = {HEARTBEAT}): {latencies:?}");

        // The dead peers are gone from Redis: a fresh joiner (through C) sees only survivors.
        let (mut fresh, ok) = c.joiner(2, &r1).await;
        let mut want = vec![h1.id(), j1.id(), fresh.id()];
        want.sort();
        assert_eq!(peer_ids(&ok), want);
        let (_, ok) = c.joiner(2, &r2).await;
        assert_eq!(peer_ids(&ok).len(), 2, "{ok}");
        assert!(!peer_ids(&ok).contains(&v2_id));
        // And the room still relays across the surviving instances.
        h1.recv_type("peer_joined").await;
        fresh
            .send_json(json!({"type": "signal", "to_peer": h1.id(), "signal": "hi"}))
            .await;
        assert_eq!(h1.recv_type("signal").await["from_peer"], fresh.id());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. SIGSTOP past the timeout, then SIGCONT
// ---------------------------------------------------------------------------------------------

on_both!(sigstop_then_sigcont_fences_without_ghosts);
async fn sigstop_then_sigcont_fences_without_ghosts(on: On) {
    let c = Cluster::start_on(on, 3).await;
    bounded_for(Duration::from_secs(40), async {
        // One room: host on A, two peers on B (to be frozen), a joiner on C.
        let s = c.session(0).await;
        let (mut host, _) = c.host(0, &s).await;
        let (mut g1, _) = c.joiner(1, &s).await;
        let (mut g2, _) = c.joiner(1, &s).await;
        let (mut j, _) = c.joiner(2, &s).await;
        for _ in 0..3 {
            host.recv_type("peer_joined").await;
        }
        j.expect_silence(Duration::from_millis(50)).await;
        g1.recv_type("peer_joined").await;
        g1.recv_type("peer_joined").await;
        g2.recv_type("peer_joined").await;
        let mut ghosts = vec![g1.id(), g2.id()];
        ghosts.sort();

        let t0 = Instant::now();
        c.s(1).signal(libc::SIGSTOP);
        // Survivors hear of both frozen peers, once each.
        for (name, ws) in [("host on A", &mut host), ("joiner on C", &mut j)] {
            let mut left = Vec::new();
            for _ in 0..2 {
                let limit = Duration::from_secs(5).saturating_sub(t0.elapsed());
                let v = recv_within(ws, limit, "peer_left of a frozen peer").await;
                assert_eq!(v["type"], "peer_left", "{name}: {v}");
                left.push(v["peer_id"].as_str().unwrap().to_owned());
            }
            left.sort();
            assert_eq!(left, ghosts, "{name}");
            eprintln!(
                "cluster: SIGSTOP → both peer_left at the {name} after {:?}",
                t0.elapsed()
            );
        }
        // Stay frozen well past the timeout, then resume.
        let frozen_for = INSTANCE_TIMEOUT * 2;
        tokio::time::sleep(frozen_for.saturating_sub(t0.elapsed())).await;
        let t1 = Instant::now();
        c.s(1).signal(libc::SIGCONT);

        // Its stale sockets are closed (fenced: 1012).
        for g in [&mut g1, &mut g2] {
            let (before, closed) = g.expect_close().await;
            assert!(
                before.iter().all(|v| v["type"] != "peer_joined"),
                "a ghost was told of joins: {before:?}"
            );
            eprintln!(
                "cluster: SIGCONT → stale socket closed after {:?} ({closed:?})",
                t1.elapsed()
            );
            assert_eq!(closed.code(), Some(1012), "{closed:?}");
        }
        // No ghost reappears: the survivors hear nothing more. Meanwhile the resumed instance
        // registers under a new id and becomes ready again.
        let (ready_after, (), ()) = tokio::join!(
            c.wait_ready(1, true, Duration::from_secs(5)),
            host.expect_silence(Duration::from_millis(1500)),
            j.expect_silence(Duration::from_millis(1500)),
        );
        let ready_after = ready_after.expect("the resumed instance is not ready again");
        eprintln!("cluster: SIGCONT → ready again (new instance id) after {ready_after:?}");

        // An operator sees it: the fence and its two closed sockets on the resumed instance,
        // the reaping of its two peers on the others.
        let resumed = common::metrics::Scrape::of(c.s(1)).await;
        assert_eq!(resumed.get("beach_road_fencings_total", &[]), 1.0);
        let fenced = [("reason", "fenced")];
        assert_eq!(resumed.get("beach_road_disconnects_total", &fenced), 2.0);
        let mut reaped = 0.0;
        let mut instances = 0.0;
        for i in 0..3 {
            let scrape = common::metrics::Scrape::of(c.s(i)).await;
            reaped += scrape.get("beach_road_reaped_peers_total", &[]);
            instances += scrape.get("beach_road_reaped_instances_total", &[]);
        }
        assert_eq!(reaped, 2.0, "peers reaped");
        assert!(instances >= 1.0, "the dead id fully reaped");

        // A fresh peer elsewhere sees only the survivors.
        let (mut fresh_c, ok) = c.joiner(2, &s).await;
        let mut want = vec![host.id(), j.id(), fresh_c.id()];
        want.sort();
        assert_eq!(peer_ids(&ok), want, "ghosts listed: {ok}");
        host.recv_type("peer_joined").await;
        j.recv_type("peer_joined").await;

        // Fresh peers can join through the resumed instance (it re-registered).
        let (mut fresh_b, ok) = c.joiner(1, &s).await;
        let mut want = vec![host.id(), j.id(), fresh_c.id(), fresh_b.id()];
        want.sort();
        assert_eq!(peer_ids(&ok), want, "ghosts listed: {ok}");
        assert_eq!(find_peer(&ok, &fresh_b.id())["role"], "client");
        for ws in [&mut host, &mut j, &mut fresh_c] {
            let v = ws.recv_type("peer_joined").await;
            assert_eq!(v["peer"]["id"], fresh_b.id());
            ws.expect_silence(Duration::from_millis(100)).await;
        }
        fresh_b
            .send_json(json!({"type": "signal", "to_peer": host.id(), "signal": "from B"}))
            .await;
        assert_eq!(host.recv_type("signal").await["from_peer"], fresh_b.id());
        host.send_json(json!({"type": "signal", "to_peer": fresh_b.id(), "signal": "to B"}))
            .await;
        assert_eq!(fresh_b.recv_type("signal").await["signal"], "to B");
        // Signals to a ghost are refused: it is not a member any more.
        host.send_json(json!({"type": "signal", "to_peer": ghosts[0], "signal": "boo"}))
            .await;
        assert_eq!(host.recv_type("error").await["type"], "error");
        // Still no storm later on.
        for ws in [&mut host, &mut j, &mut fresh_c, &mut fresh_b] {
            ws.expect_silence(QUIET).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Redis killed and restarted empty
// ---------------------------------------------------------------------------------------------

on_both!(redis_restarted_empty_ready_flips_and_new_sessions_work);
async fn redis_restarted_empty_ready_flips_and_new_sessions_work(on: On) {
    let mut c = Cluster::start_on(on, 3).await;
    let n = c.servers.len();
    bounded_for(Duration::from_secs(60), async {
        // A working room before the outage.
        let (_host, _joiner, _) = assert_cross_instance_room(&c, 0, 1).await;

        tokio::task::block_in_place(|| c.redis.kill());
        let t0 = Instant::now();
        let flips = join_all((0..n).map(|i| c.wait_ready(i, false, Duration::from_secs(2)))).await;
        for (i, f) in flips.iter().enumerate() {
            let f =
                f.unwrap_or_else(|| panic!("instance {i}: /ready still 200 2 s after Redis died"));
            eprintln!("cluster: Redis killed → instance {i} /ready 503 after {f:?}");
        }
        // While Redis is away /ready stays 503 and /health stays 200, both answering fast.
        // The outage outlasts the ~9.4 s after which a default ConnectionManager gives up.
        while t0.elapsed() < Duration::from_secs(11) {
            for i in 0..n {
                let t = Instant::now();
                assert_ne!(
                    c.ready_status(i).await,
                    Some(200),
                    "instance {i} ready without Redis"
                );
                assert!(
                    t.elapsed() < Duration::from_secs(1),
                    "/ready took {:?}",
                    t.elapsed()
                );
                let (status, _) = c.s(i).health().await.expect("/health answers");
                assert_eq!(status, 200, "instance {i} /health during the outage");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        tokio::task::block_in_place(|| c.redis.restart());
        let back = join_all((0..n).map(|i| c.wait_ready(i, true, Duration::from_secs(2)))).await;
        for (i, b) in back.iter().enumerate() {
            let b = b.unwrap_or_else(|| {
                panic!("instance {i}: /ready not 200 within 2 s of Redis's return")
            });
            eprintln!("cluster: Redis back (empty) → instance {i} /ready 200 after {b:?}");
        }

        // A new session works across instances, no instance restarted.
        let (mut h, _j, s) = assert_cross_instance_room(&c, 1, 2).await;
        let (mut third, ok) = c.public(0, &s).await;
        assert_eq!(peer_ids(&ok).len(), 3, "{ok}");
        third
            .send_json(json!({"type": "signal", "to_peer": h.id(), "signal": "via A"}))
            .await;
        let v = h.recv_type("peer_joined").await;
        assert_eq!(v["peer"]["id"], third.id());
        assert_eq!(h.recv_type("signal").await["from_peer"], third.id());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. SIGTERM drain (issue 4)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_across_instances() {
    let delay = Duration::from_secs(1);
    let jitter = Duration::from_secs(1);
    let mut c = Cluster::start_with(On::Node, 2, |i| {
        if i == 0 {
            vec![
                "--drain-delay".into(),
                "1s".into(),
                "--drain-jitter".into(),
                "1s".into(),
            ]
        } else {
            Vec::new()
        }
    })
    .await;
    bounded_for(Duration::from_secs(30), async {
        // Host and a second peer on A; a joiner on B.
        let s = c.session(0).await;
        let (mut host, _) = c.host(0, &s).await;
        let (mut a2, _) = c.joiner(0, &s).await;
        let (mut b, _) = c.joiner(1, &s).await;
        host.recv_type("peer_joined").await;
        host.recv_type("peer_joined").await;
        a2.recv_type("peer_joined").await;
        let mut on_a = vec![host.id(), a2.id()];
        on_a.sort();

        let t0 = Instant::now();
        c.servers[0].signal(libc::SIGTERM);
        c.wait_ready(0, false, Duration::from_millis(500))
            .await
            .expect("/ready on A not 503 within 500 ms of SIGTERM");
        eprintln!("cluster: SIGTERM → /ready 503 after {:?}", t0.elapsed());
        let (status, _) = c
            .s(0)
            .health()
            .await
            .expect("/health answers while draining");
        assert_eq!(status, 200, "/health while draining");
        assert_eq!(c.ready_status(1).await, Some(200), "B stays ready");

        // During the delay A still serves its sockets, across instances.
        b.send_json(json!({"type": "signal", "to_peer": host.id(), "signal": "still there?"}))
            .await;
        assert_eq!(host.recv_type("signal").await["from_peer"], b.id());
        assert!(t0.elapsed() < delay, "too slow to check the delay window");

        // B's peer hears both A peers leave once the delay ends, not before.
        let mut left = Vec::new();
        let mut times = Vec::new();
        for _ in 0..2 {
            let v = recv_within(&mut b, delay + jitter + Duration::from_secs(2), "peer_left").await;
            times.push(t0.elapsed());
            assert_eq!(v["type"], "peer_left", "{v}");
            left.push(v["peer_id"].as_str().unwrap().to_owned());
        }
        left.sort();
        assert_eq!(left, on_a);
        eprintln!("cluster: SIGTERM → peer_left on B after {times:?} (delay {delay:?})");
        for t in &times {
            assert!(*t >= delay, "peer_left before the drain delay ended: {t:?}");
            assert!(
                *t < delay + jitter,
                "peer_left waited for the jitter: {t:?}"
            );
        }

        // A's clients get 1001 within the jitter window.
        for ws in [&mut host, &mut a2] {
            let (before, closed) = ws.expect_close().await;
            assert!(
                before.iter().all(|v| v["type"] == "peer_left"),
                "unexpected before close: {before:?}"
            );
            eprintln!(
                "cluster: SIGTERM → A's client closed after {:?} ({closed:?})",
                t0.elapsed()
            );
            assert_eq!(closed.code(), Some(1001), "{closed:?}");
        }
        let bound = delay + jitter + Duration::from_secs(5);
        let status = c.servers[0]
            .wait_exit(bound.saturating_sub(t0.elapsed()))
            .await
            .unwrap_or_else(|| panic!("A did not exit within {bound:?}"));
        eprintln!(
            "cluster: SIGTERM → A exited after {:?} ({status})",
            t0.elapsed()
        );
        assert!(status.success(), "exit status {status}");
        // B is unaffected.
        b.expect_silence(QUIET).await;
        assert_eq!(c.ready_status(1).await, Some(200));
    })
    .await;
}

/// Frames that reach a frozen instance while it is frozen are processed when it resumes, racing
/// its fencing: a stale socket's repeated `join` must not re-announce it, its `signal`s must
/// not reach the room, and a connection accepted by the kernel during the freeze must not end
/// up as a member under the dead instance id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_frames_queued_during_the_freeze_do_not_resurrect_ghosts() {
    let c = Cluster::start(2).await;
    bounded_for(Duration::from_secs(40), async {
        let s = c.session(0).await;
        let (mut host, _) = c.host(0, &s).await;
        let (mut g1, _) = c.joiner(1, &s).await;
        let (mut g2, _) = c.joiner(1, &s).await;
        host.recv_type("peer_joined").await;
        host.recv_type("peer_joined").await;
        g1.recv_type("peer_joined").await;
        let ghosts = [g1.id(), g2.id()];

        let t0 = Instant::now();
        c.s(1).signal(libc::SIGSTOP);
        for _ in 0..2 {
            let limit = Duration::from_secs(5).saturating_sub(t0.elapsed());
            let v = recv_within(&mut host, limit, "peer_left of a frozen peer").await;
            assert_eq!(v["type"], "peer_left", "{v}");
        }
        // While frozen: the stale sockets speak (the kernel buffers it), a new client connects.
        g1.send_json(Ws::join_msg(Some(&s.code))).await;
        g2.send_json(json!({"type": "signal", "to_peer": host.id(), "signal": "ghost"}))
            .await;
        let url = c.s(1).ws_url(&s.id);
        let code = s.code.clone();
        let late = tokio::spawn(async move {
            let mut ws = Ws::connect(&url).await;
            ws.send_json(Ws::join_msg(Some(&code))).await;
            let first = ws.next(Duration::from_secs(5)).await;
            (ws, first)
        });
        tokio::time::sleep((INSTANCE_TIMEOUT * 2).saturating_sub(t0.elapsed())).await;
        c.s(1).signal(libc::SIGCONT);

        for g in [&mut g1, &mut g2] {
            let (_, closed) = g.expect_close().await;
            assert_eq!(closed.code(), Some(1012), "{closed:?}");
        }
        let (mut late, first) = late.await.unwrap();
        eprintln!("cluster: a client that connected during the freeze got {first:?}");
        let late_id = match first {
            Ok(Some(v)) if v["type"] == "join_success" => v["peer_id"].as_str().map(str::to_owned),
            _ => None,
        };
        // The host hears nothing of the ghosts: no peer_joined, no signal from them.
        let mut seen = Vec::new();
        while let Ok(Some(v)) = host.next(Duration::from_millis(1500)).await {
            seen.push(v);
        }
        for v in &seen {
            let about = v["peer"]["id"].as_str().or(v["from_peer"].as_str());
            let about = about.or(v["peer_id"].as_str()).unwrap_or("");
            assert!(!ghosts.iter().any(|g| g == about), "ghost reappeared: {v}");
        }
        // The late client is either a proper member (joined under the new id: the host saw it
        // join, and it stays) or not at all.
        let (_, ok) = c.joiner(0, &s).await;
        let members = peer_ids(&ok);
        for g in &ghosts {
            assert!(!members.contains(g), "ghost {g} is a member again: {ok}");
        }
        match &late_id {
            Some(id) => {
                let still_open = late.next(Duration::from_millis(50)).await.is_ok();
                assert_eq!(
                    members.contains(id),
                    still_open,
                    "late peer {id}: {ok}; seen {seen:?}"
                );
            }
            None => assert_eq!(members.len(), 2, "{ok}"),
        }
    })
    .await;
}
