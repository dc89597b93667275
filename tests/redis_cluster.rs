//! A Redis Cluster under live relays (issue 11): two real `beach-road` processes on a local
//! cluster of three primaries with a replica each, a room across them (host on A, joiner on B)
//! relaying both ways at a steady pace, while a primary is killed and its replica promoted, or
//! while slots move between primaries.
//!
//! Both tests put everything that matters on the node they disturb: the session's slot, the
//! instance registry's slot (every heartbeat and reap claim) and A's shard channel (what B
//! publishes to A). What they assert is what the issue asks: no instance restarts, readiness
//! comes back, no membership is lost, nothing arrives twice or out of order, and every signal
//! that did not arrive was told to its sender.
//!
//! The flows, kill, freeze and the full Redis outage on a cluster are in `cluster.rs`
//! (`…::cluster`).

mod common;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use common::metrics::Scrape;
use common::{
    bounded_for, find_peer, uuid, RedisCluster, Server, ServerBuilder, Session, Ws, UNPACED,
};

/// Signals each way, one every [`PACE`]: ~6 s of traffic around the disturbance.
const N: usize = 1500;
const PACE: Duration = Duration::from_millis(4);
/// The readers stop after this long without a message once the writers are done.
const QUIET: Duration = Duration::from_secs(2);
/// Readiness must be back within this of the disturbance.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);

/// The servers are killed before the cluster (field order).
struct Setup {
    servers: Vec<Server>,
    redis: RedisCluster,
}

impl Setup {
    async fn start() -> Setup {
        Self::start_with(&[]).await
    }

    /// Two instances with flags `extra` besides the test's.
    async fn start_with(extra: &[&str]) -> Setup {
        let redis = tokio::task::block_in_place(RedisCluster::start);
        let secret = format!("rc-{}-{}", uuid(), uuid());
        let starts = (0..2).map(|_| {
            ServerBuilder::new()
                .redis_url(&redis.url())
                // The instance timeout must outlast a failover of the registry's primary (~2-3 s
                // here with a node timeout of 1 s): no heartbeat gets through meanwhile.
                .args(["--heartbeat-interval", "250ms", "--instance-timeout", "8s"])
                .args(["--secret", &secret])
                .args(UNPACED)
                .args(extra.iter().copied())
                .start()
        });
        let servers = futures::future::join_all(starts).await;
        let setup = Setup { servers, redis };
        for i in 0..2 {
            assert!(
                setup.wait_ready(i, Duration::from_secs(10)).await.is_some(),
                "instance {i} not ready:\n{}",
                setup.servers[i].log()
            );
        }
        setup
    }

    async fn ready(&self, i: usize) -> bool {
        let r = self.servers[i].api().get("/ready").await;
        r.ok().map(|r| r.status) == Some(200)
    }

    async fn wait_ready(&self, i: usize, limit: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.ready(i).await {
                return Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Instance `i`'s id in Redis, from its log.
    fn instance_id(&self, i: usize) -> String {
        let log = self.servers[i].log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("instance registered"))
            .expect("registered");
        let at = line.find("instance=").expect("an instance field") + "instance=".len();
        line[at..].split_whitespace().next().unwrap().to_owned()
    }

    /// Moves the registry's slot and A's shard channel's slot to primary `port` (where not there).
    fn gather_on(&self, port: u16) {
        let a = self.instance_id(0);
        for key in [
            "beach-road:{instances}:alive",
            &format!("beach-road:bus:{a}"),
        ] {
            let slot = RedisCluster::slot_of(key);
            if self.redis.primary_of_slot(slot) != port {
                self.redis.migrate_slot(slot, port, Duration::ZERO);
            }
        }
    }

    /// A session registered on A whose slot is on primary `port`.
    async fn session_on(&self, port: u16) -> Session {
        loop {
            let id = uuid();
            if self
                .redis
                .primary_of_slot(RedisCluster::slot_of(&format!("{{{id}}}")))
                == port
            {
                return self.servers[0].api().new_session_with_id(&id, None).await;
            }
        }
    }

    /// The host on A, a joiner on B.
    async fn room(&self, s: &Session) -> (Ws, Ws) {
        let mut host = Ws::connect(&self.servers[0].ws_url(&s.host)).await;
        host.join(None).await;
        let token = self.servers[1].api().join_token(&s.id, &s.code).await;
        let mut joiner = Ws::connect(&self.servers[1].ws_url(&token)).await;
        let ok = joiner.join(None).await;
        assert_eq!(find_peer(&ok, &host.id())["role"], "server", "{ok}");
        host.recv_type("peer_joined").await;
        (host, joiner)
    }

    /// Neither instance exited.
    fn assert_alive(&mut self, pids: &[i32]) {
        for (i, s) in self.servers.iter_mut().enumerate() {
            assert_eq!(s.try_exit(), None, "instance {i} exited:\n{}", s.log());
            assert_eq!(s.pid(), pids[i]);
        }
    }

    /// The room is whole: a new joiner, on either instance, is told of the host and the
    /// joiner (whose sockets are still open) as members.
    async fn assert_room_whole(&self, s: &Session, host_id: &str, joiner_id: &str) {
        for i in 0..2 {
            let token = self.servers[i].api().join_token(&s.id, &s.code).await;
            let mut third = Ws::connect(&self.servers[i].ws_url(&token)).await;
            let ok = third.join(None).await;
            for id in [host_id, joiner_id] {
                assert!(!find_peer(&ok, id).is_null(), "member {id} lost: {ok}");
            }
        }
    }
}

/// What one side got: the other side's signal numbers and the errors it was told; and its
/// socket, still open.
struct Got {
    signals: Vec<usize>,
    told: Vec<Value>,
    _socket: Option<Box<dyn Send>>,
}

/// One side of the room: a writer sending `N` signals to `to` at [`PACE`], a reader collecting
/// until [`QUIET`] after the writer is done.
fn side(ws: Ws, to: String) -> JoinHandle<Got> {
    let (tx, mut rx) = ws.into_stream().split();
    tokio::spawn(async move {
        let writer = tokio::spawn(async move {
            let mut tx = tx;
            let start = tokio::time::Instant::now();
            for n in 0..N {
                let v = json!({"type": "signal", "to_peer": to, "signal": {"n": n}});
                tx.send(Message::text(v.to_string())).await.expect("sent");
                tokio::time::sleep_until(start + PACE * (n as u32 + 1)).await;
            }
            tx
        });
        let mut got = Got {
            signals: Vec::new(),
            told: Vec::new(),
            _socket: None,
        };
        let mut done = false;
        let mut writer = Some(writer);
        let mut tx = None;
        loop {
            let limit = if done {
                QUIET
            } else {
                Duration::from_millis(200)
            };
            match tokio::time::timeout(limit, rx.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    match v["type"].as_str() {
                        Some("signal") => got
                            .signals
                            .push(v["signal"]["n"].as_u64().unwrap() as usize),
                        Some("error") => got.told.push(v),
                        _ => {}
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("socket failed: {e}"),
                Ok(None) => panic!("socket closed"),
                Err(_) if done => {
                    got._socket = Some(Box::new((tx.take(), rx)));
                    return got;
                }
                Err(_) => {}
            }
            if !done && writer.as_ref().is_some_and(|w| w.is_finished()) {
                tx = Some(writer.take().unwrap().await.unwrap());
                done = true;
            }
        }
    })
}

/// Nothing twice or out of order; every signal that did not arrive was told to its sender;
/// the last ones (after the disturbance) all arrived.
fn assert_every_loss_told(what: &str, at_receiver: &Got, at_sender: &Got) {
    let got = &at_receiver.signals;
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "{what}: duplicated or reordered"
    );
    let lost = N - got.len();
    eprintln!(
        "{what}: {} of {N} delivered, {lost} lost, {} told to the sender: {:?}",
        got.len(),
        at_sender.told.len(),
        at_sender.told.first()
    );
    assert!(
        at_sender.told.len() >= lost,
        "{what}: {lost} lost but {} told",
        at_sender.told.len()
    );
    assert_eq!(
        got.last(),
        Some(&(N - 1)),
        "{what}: the last signal is missing"
    );
    assert!(lost < N / 2, "{what}: most signals lost");
}

/// A room across the instances relaying both ways, everything that matters on one primary.
struct Relaying {
    /// The primary holding the registry's slot, A's channel's and the session's.
    primary: u16,
    a_bus: String,
    session: Session,
    host_id: String,
    joiner_id: String,
    pids: Vec<i32>,
    at_host: JoinHandle<Got>,
    at_joiner: JoinHandle<Got>,
}

impl Setup {
    /// Gathers the registry's slot and A's channel's on the primary of the latter, registers a
    /// session there, opens a room across the instances and relays both ways; returns 1 s in.
    async fn relaying(&self) -> Relaying {
        let a_bus = format!("beach-road:bus:{}", self.instance_id(0));
        let primary = self.redis.primary_of_slot(RedisCluster::slot_of(&a_bus));
        tokio::task::block_in_place(|| self.gather_on(primary));
        let session = self.session_on(primary).await;
        let (host, joiner) = self.room(&session).await;
        let (host_id, joiner_id) = (host.id(), joiner.id());
        let r = Relaying {
            primary,
            a_bus,
            pids: self.servers.iter().map(Server::pid).collect(),
            at_host: side(host, joiner_id.clone()),
            at_joiner: side(joiner, host_id.clone()),
            session,
            host_id,
            joiner_id,
        };
        tokio::time::sleep(Duration::from_millis(1000)).await;
        r
    }

    /// Both ready again within [`RECOVERY_BOUND`] of `t0`.
    async fn assert_ready_again(&self, t0: Instant) {
        for i in 0..2 {
            let left = RECOVERY_BOUND.saturating_sub(t0.elapsed());
            let back = self.wait_ready(i, left).await;
            let log = || self.servers[i].log();
            assert!(back.is_some(), "instance {i} not ready again:\n{}", log());
        }
    }

    /// Once the relays are done: every loss told, nobody restarted, the room whole.
    async fn assert_relayed(&mut self, r: Relaying) {
        let (at_host, at_joiner) = (r.at_host.await.unwrap(), r.at_joiner.await.unwrap());
        assert_every_loss_told("host → joiner", &at_joiner, &at_host);
        assert_every_loss_told("joiner → host", &at_host, &at_joiner);
        self.assert_alive(&r.pids);
        self.assert_room_whole(&r.session, &r.host_id, &r.joiner_id)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_during_relays_loses_no_member_and_every_loss_is_told() {
    let mut c = Setup::start().await;
    bounded_for(Duration::from_secs(120), async {
        let r = c.relaying().await;
        let t0 = Instant::now();
        let slot = RedisCluster::slot_of(&r.a_bus);
        let promoted = tokio::task::block_in_place(|| c.redis.kill_primary_and_wait_failover(slot));
        c.assert_ready_again(t0).await;
        eprintln!(
            "failover: replica promoted after {promoted:?}, both ready after {:?}",
            t0.elapsed()
        );
        c.assert_relayed(r).await;
        // Operators see it: relays that failed on Redis come with failed Redis calls (the
        // member lookup, or the publish, whole or in part) in the metrics.
        for (i, server) in c.servers.iter().enumerate() {
            let m = Scrape::of(server).await;
            let failed = m.get(
                "beach_road_relay_errors_total",
                &[("reason", "publish_failed")],
            );
            let errors = m.get("beach_road_redis_errors_total", &[]);
            eprintln!("instance {i}: {failed} relays failed, {errors} Redis errors");
            assert!(
                failed == 0.0 || errors > 0.0,
                "instance {i}: uncounted Redis failures"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_migrated_during_relays_lose_no_member_and_every_loss_is_told() {
    let mut c = Setup::start().await;
    bounded_for(Duration::from_secs(120), async {
        let r = c.relaying().await;
        // The session's slot, then the registry's and A's channel's, each with half a second
        // in the window where the source answers `ASK` for all its keys.
        let to = c.redis.other_primary(r.primary);
        let slots = [
            RedisCluster::slot_of(&format!("{{{}}}", r.session.id)),
            RedisCluster::slot_of("beach-road:{instances}:alive"),
            RedisCluster::slot_of(&r.a_bus),
        ];
        let before = Scrape::of(&c.servers[0]).await;
        let t0 = Instant::now();
        tokio::task::block_in_place(|| {
            for slot in slots {
                c.redis.migrate_slot(slot, to, Duration::from_millis(500));
            }
        });
        for slot in slots {
            assert_eq!(
                c.redis.primary_of_slot(slot),
                to,
                "slot {slot} did not move"
            );
        }
        c.assert_ready_again(t0).await;
        eprintln!("migration: 3 slots moved in {:?}", t0.elapsed());
        // A's channel moved: Redis ended its subscription, and A subscribed again where it went.
        let after = Scrape::of(&c.servers[0]).await;
        for series in [
            "beach_road_pubsub_disconnects_total",
            "beach_road_pubsub_resubscriptions_total",
        ] {
            let (b, a) = (before.get(series, &[]), after.get(series, &[]));
            assert!(a > b, "{series}: {b} → {a}");
        }
        c.assert_relayed(r).await;
    })
    .await;
}

/// A cluster that is down when an instance starts: the instance is alive and not ready (both
/// answered at once), and ready and serving once the cluster is back, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_while_the_cluster_is_down_serves_once_it_is_back() {
    let mut redis = tokio::task::block_in_place(RedisCluster::start);
    let url = redis.url();
    tokio::task::block_in_place(|| redis.kill_all());
    let mut server = ServerBuilder::new()
        .redis_url(&url)
        .args(["--heartbeat-interval", "250ms"])
        .start()
        .await;
    bounded_for(Duration::from_secs(60), async {
        let api = server.api();
        for _ in 0..5 {
            let t = Instant::now();
            assert_eq!(api.get("/ready").await.unwrap().status, 503);
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "/ready took {:?}",
                t.elapsed()
            );
            assert_eq!(server.health().await.expect("/health answers").0, 200);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::task::block_in_place(|| redis.restart_all());
        let t0 = Instant::now();
        while api.get("/ready").await.map(|r| r.status).ok() != Some(200) {
            assert!(
                t0.elapsed() < RECOVERY_BOUND,
                "not ready:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("cluster back → ready after {:?}", t0.elapsed());
        let s = api.new_session(None).await;
        let mut host = Ws::connect(&server.ws_url(&s.host)).await;
        host.join(None).await;
        assert_eq!(server.try_exit(), None);
    })
    .await;
}

/// Sessions with members on every shard outlive their ttl, every refresh succeeding: the
/// refresher's pipeline of `touch.lua` for all rooms is split by slot, and each node gets the
/// `SCRIPT LOAD` ahead of it (sent to one node only, it left the others answering `NOSCRIPT`
/// until chance had sent it to each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_with_members_on_every_shard_outlive_their_ttl() {
    const TTL: Duration = Duration::from_secs(2);
    let c = Setup::start_with(&["--session-ttl", "2s"]).await;
    bounded_for(Duration::from_secs(60), async {
        let mut rooms = Vec::new();
        for port in c.redis.primaries() {
            let s = c.session_on(port).await;
            let (host, joiner) = c.room(&s).await;
            rooms.push((s, host, joiner));
        }
        // Idle, connected, past the ttl: only the refresher keeps the sessions.
        tokio::time::sleep(TTL + TTL * 3 / 4).await;
        // Every refresh went through (before, the first ones failed with NOSCRIPT until a
        // `SCRIPT LOAD` sent to a random node had happened to reach each node).
        for server in &c.servers {
            let failed: f64 = Scrape::of(server)
                .await
                .0
                .iter()
                .filter(|(series, _)| {
                    series.starts_with("beach_road_redis_errors_total")
                        && series.contains("command=\"touch\"")
                })
                .map(|(_, n)| n)
                .sum();
            assert_eq!(failed, 0.0, "refreshes failed:\n{}", server.log());
        }
        for (s, host, joiner) in &rooms {
            let status = c.servers[1].api().status(&s.id).await;
            assert_eq!(
                status.body["exists"], true,
                "session {} expired: {}",
                s.id, status.body
            );
            c.assert_room_whole(s, &host.id(), &joiner.id()).await;
        }
    })
    .await;
}
