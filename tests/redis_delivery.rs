//! Delivery over the Redis engine when pub/sub loses messages (issue 8): real `beach-road`
//! processes on one private `redis-server`, sharing one `--secret`.
//!
//! Each instance connects as its own Redis ACL user (`i0`, `i1`, ...), so a test can cut one
//! instance off exactly: `ACL SETUSER iN off` plus `CLIENT KILL USER iN TYPE pubsub` drops its
//! subscription and keeps it from reconnecting until the user is switched on again, while the
//! other instances carry on. Each instance's channel is found as it starts (`PUBSUB CHANNELS`),
//! so a test can publish to it as another instance would.
//!
//! Every test body is bounded; processes are killed when the [`Cluster`] is dropped. Observed
//! timings are printed with `eprintln!` (`--nocapture`).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::AsyncCommands;
use serde_json::{json, Value};

use common::{bounded_for, find_peer, uuid, RedisServer, Server, ServerBuilder, Session, Ws};

const HEARTBEAT: &str = "250ms";
/// Long enough for a stray message to show up on loopback.
const QUIET: Duration = Duration::from_millis(700);
const PREFIX: &str = "beach-road";

/// Instances on one private Redis. Field order: the servers are killed before Redis.
struct Cluster {
    servers: Vec<Server>,
    /// The instance id behind each server (its channel is `PREFIX:chan:<id>`).
    ids: Vec<String>,
    /// Held for the cluster's life (killed on drop, after the servers).
    _redis: RedisServer,
    admin: redis::aio::MultiplexedConnection,
}

impl Cluster {
    /// Starts `n` instances one after another (to tell their channels apart), each as Redis
    /// user `i<k>`, with `--instance-timeout instance_timeout`.
    async fn start(n: usize, instance_timeout: &str) -> Cluster {
        let redis = RedisServer::start();
        let mut admin = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("admin connection");
        let secret = format!("delivery-{}-{}", uuid(), uuid());
        let (mut servers, mut ids) = (Vec::new(), Vec::new());
        for i in 0..n {
            let user = format!("i{i}");
            let _: () = redis::cmd("ACL")
                .arg(&[
                    "SETUSER",
                    &user,
                    "on",
                    &format!(">pw{i}"),
                    "~*",
                    "&*",
                    "+@all",
                ])
                .query_async(&mut admin)
                .await
                .unwrap();
            let url = format!("redis://{user}:pw{i}@127.0.0.1:{}/", redis.port());
            let server = ServerBuilder::new()
                .redis_url(&url)
                .args(["--secret", &secret, "--heartbeat-interval", HEARTBEAT])
                .args(["--instance-timeout", instance_timeout])
                .start()
                .await;
            wait_ready(&server).await;
            let channels: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg(format!("{PREFIX}:chan:*"))
                .query_async(&mut admin)
                .await
                .unwrap();
            let prefix = format!("{PREFIX}:chan:");
            let new: Vec<String> = channels
                .iter()
                .filter_map(|c| c.strip_prefix(&prefix))
                .filter(|id| !ids.iter().any(|known| known == id))
                .map(str::to_owned)
                .collect();
            assert_eq!(
                new.len(),
                1,
                "one new channel for instance {i}: {channels:?}"
            );
            ids.extend(new);
            servers.push(server);
        }
        Cluster {
            servers,
            ids,
            _redis: redis,
            admin,
        }
    }

    fn s(&self, i: usize) -> &Server {
        &self.servers[i]
    }

    async fn session(&self, i: usize) -> Session {
        self.s(i).api().new_session(None).await
    }

    async fn host(&self, i: usize, session: &Session) -> Ws {
        let mut ws = Ws::connect(&self.s(i).ws_url(&session.host)).await;
        let ok = ws.join(Some(&session.code)).await;
        assert_eq!(find_peer(&ok, &ws.id())["role"], "server", "{ok}");
        ws
    }

    /// A joiner as the CLIs join, on instance `i`: HTTP join, then its token's socket.
    async fn joiner(&self, i: usize, session: &Session) -> Ws {
        let token = self.s(i).api().join_token(&session.id, &session.code).await;
        let mut ws = Ws::connect(&self.s(i).ws_url(&token)).await;
        ws.join(Some(&session.code)).await;
        ws
    }

    /// Cuts instance `i` off pub/sub (and Redis): its subscription is killed and it cannot
    /// reconnect until [`Cluster::reconnect`].
    async fn cut_off(&mut self, i: usize) {
        let user = format!("i{i}");
        let _: () = redis::cmd("ACL")
            .arg(&["SETUSER", &user, "off"])
            .query_async(&mut self.admin)
            .await
            .unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "USER", &user, "TYPE", "pubsub"])
            .query_async(&mut self.admin)
            .await
            .unwrap();
        assert!(killed >= 1, "instance {i} had no pubsub connection");
    }

    async fn reconnect(&mut self, i: usize) {
        let _: () = redis::cmd("ACL")
            .arg(&["SETUSER", &format!("i{i}"), "on"])
            .query_async(&mut self.admin)
            .await
            .unwrap();
    }

    fn channel(&self, i: usize) -> String {
        format!("{PREFIX}:chan:{}", self.ids[i])
    }

    async fn subscribers(&mut self, i: usize) -> i64 {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(self.channel(i))
            .query_async(&mut self.admin)
            .await
            .unwrap();
        counts.first().map_or(0, |c| c.1)
    }
}

/// Polls `/ready` until it is 200 (bounded).
async fn wait_ready(server: &Server) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(r) = server.api().get("/ready").await {
            if r.status == 200 {
                return start.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("instance not ready within 10 s");
}

/// Every message within `d` (the socket must stay open).
async fn drain(ws: &mut Ws, d: Duration) -> Vec<Value> {
    let deadline = Instant::now() + d;
    let mut got = Vec::new();
    loop {
        match ws
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Ok(Some(v)) => got.push(v),
            Ok(None) => return got,
            Err(c) => panic!("socket closed: {c:?}; got {got:?}"),
        }
    }
}

fn signal(to: &str, n: u32) -> Value {
    json!({"type": "signal", "to_peer": to, "signal": {"n": n}})
}

/// A `peer_left` and a `peer_joined` published while one instance's subscription is down
/// (killed and kept from reconnecting) are lost on the wire; once it is back, its local member
/// still gets both, exactly once, the `peer_joined` with the full PeerInfo of the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_events_published_during_a_pubsub_gap_are_repaired() {
    let mut c = Cluster::start(2, "10s").await;
    bounded_for(Duration::from_secs(40), async {
        let s = c.session(0).await;
        let mut host = c.host(0, &s).await;
        let mut watcher = c.joiner(1, &s).await;
        let leaver = c.joiner(0, &s).await;
        host.recv_type("peer_joined").await;
        host.recv_type("peer_joined").await;
        assert_eq!(
            watcher.recv_type("peer_joined").await["peer"]["id"],
            leaver.id()
        );
        let leaver_id = leaver.id();

        c.cut_off(1).await;
        leaver.close_abruptly().await;
        assert_eq!(host.recv_type("peer_left").await["peer_id"], leaver_id);
        let mut newcomer = c.joiner(0, &s).await;
        let joined = host.recv_type("peer_joined").await;
        assert_eq!(joined["peer"]["id"], newcomer.id());
        // Published to nobody: the watcher's instance is not subscribed.
        assert_eq!(c.subscribers(1).await, 0);
        watcher.expect_silence(Duration::from_millis(300)).await;

        let back = Instant::now();
        c.reconnect(1).await;
        let mut got = Vec::new();
        while got.len() < 2 {
            match watcher.next(Duration::from_secs(5)).await {
                Ok(Some(v)) => got.push(v),
                other => panic!("after the gap: {other:?}; got {got:?}"),
            }
        }
        eprintln!(
            "delivery: missed peer_left + peer_joined repaired {:?} after the subscription could return",
            back.elapsed()
        );
        got.extend(drain(&mut watcher, QUIET).await);
        let left = json!({"type": "peer_left", "peer_id": leaver_id});
        assert_eq!(got.iter().filter(|v| **v == left).count(), 1, "{got:?}");
        assert_eq!(got.iter().filter(|v| **v == joined).count(), 1, "{got:?}");
        assert_eq!(got.len(), 2, "nothing else: {got:?}");

        // Live delivery goes on, and a repaired member is not announced again.
        host.send_json(signal(&watcher.id(), 1)).await;
        assert_eq!(watcher.recv_type("signal").await["signal"]["n"], 1);
        watcher.send_json(signal(&newcomer.id(), 2)).await;
        assert_eq!(newcomer.recv_type("signal").await["from_peer"], watcher.id());
        watcher.expect_silence(QUIET).await;
    })
    .await;
}

/// A relay to a peer whose instance was SIGKILLed, before anyone reaped it (instance timeout
/// 30 s): the PUBLISH reaches no subscriber, and the sender gets an `error`, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_to_a_killed_unreaped_instance_answer_error() {
    let mut c = Cluster::start(2, "30s").await;
    bounded_for(Duration::from_secs(30), async {
        let s = c.session(0).await;
        let mut host = c.host(0, &s).await;
        let mut joiner = c.joiner(1, &s).await;
        host.recv_type("peer_joined").await;
        host.send_json(signal(&joiner.id(), 1)).await;
        assert_eq!(joiner.recv_type("signal").await["signal"]["n"], 1);

        c.s(1).signal(libc::SIGKILL);
        let t0 = Instant::now();
        while c.subscribers(1).await > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "killed instance still subscribed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for n in 2..5 {
            let sent = Instant::now();
            host.send_json(signal(&joiner.id(), n)).await;
            let v = host.recv_type("error").await;
            eprintln!(
                "delivery: relay to a dead instance: {} after {:?}",
                v["message"],
                sent.elapsed()
            );
            assert!(v["message"].as_str().unwrap().contains(&joiner.id()), "{v}");
        }
        // Not reaped: the record is still there, and the room has heard nothing.
        let member: bool = c
            .admin
            .hexists(format!("{PREFIX}:{{{}}}:peers", s.id), joiner.id())
            .await
            .unwrap();
        assert!(member, "the dead instance's peer was reaped already");
        host.expect_silence(QUIET).await;
    })
    .await;
}

/// A PUBLISH that fails (here: refused by an ACL) answers the sender with an `error`; once
/// publishing works again, relays do too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_answers_error() {
    let mut c = Cluster::start(2, "10s").await;
    bounded_for(Duration::from_secs(30), async {
        let s = c.session(0).await;
        let mut host = c.host(0, &s).await;
        let mut joiner = c.joiner(1, &s).await;
        host.recv_type("peer_joined").await;
        host.send_json(signal(&joiner.id(), 1)).await;
        assert_eq!(joiner.recv_type("signal").await["signal"]["n"], 1);

        let _: () = redis::cmd("ACL")
            .arg(&["SETUSER", "i0", "-publish"])
            .query_async(&mut c.admin)
            .await
            .unwrap();
        host.send_json(signal(&joiner.id(), 2)).await;
        let v = host.recv_type("error").await;
        eprintln!("delivery: failed publish answered {}", v["message"]);
        joiner.expect_silence(Duration::from_millis(300)).await;

        let _: () = redis::cmd("ACL")
            .arg(&["SETUSER", "i0", "+publish"])
            .query_async(&mut c.admin)
            .await
            .unwrap();
        host.send_json(signal(&joiner.id(), 3)).await;
        assert_eq!(joiner.recv_type("signal").await["signal"]["n"], 3);
        host.expect_silence(QUIET).await;
    })
    .await;
}

/// News of a departed peer that arrives after its `peer_left` (a delayed `peer_joined` for it,
/// as its instance published it, with its owner to cache) brings nothing back: the room is not
/// told of the ghost again, and relays to it answer `error` instead of "succeeding" into its
/// instance, which is alive and subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_news_does_not_resurrect_a_departed_peer() {
    let mut c = Cluster::start(2, "10s").await;
    bounded_for(Duration::from_secs(30), async {
        let s = c.session(0).await;
        let mut host = c.host(0, &s).await;
        let mut gone = c.joiner(1, &s).await;
        let joined = host.recv_type("peer_joined").await;
        let gone_id = gone.id();
        host.send_json(signal(&gone_id, 1)).await;
        assert_eq!(gone.recv_type("signal").await["signal"]["n"], 1);
        gone.close_abruptly().await;
        assert_eq!(host.recv_type("peer_left").await["peer_id"], gone_id);

        // The departed peer's join, as its instance published it, arriving late.
        let late = json!({
            "t": "deliver", "room": s.id, "to": [host.id()], "frame": joined.to_string(),
            "joined": [gone_id, c.ids[1]], "joined_seq": 2,
        });
        let receivers: i64 = c
            .admin
            .publish(c.channel(0), late.to_string())
            .await
            .unwrap();
        assert_eq!(receivers, 1);
        host.expect_silence(QUIET).await;
        let mut answers = BTreeSet::new();
        for n in 2..4 {
            host.send_json(signal(&gone_id, n)).await;
            let v = host.recv_type("error").await;
            answers.insert(v["message"].as_str().unwrap().to_owned());
        }
        assert_eq!(
            answers.into_iter().collect::<Vec<_>>(),
            [format!("peer {gone_id} is not in this session")]
        );
    })
    .await;
}

/// A rolling deploy: an instance of the version before packed messages listens only on its
/// legacy channel (`PREFIX:chan:<id>`, one message per PUBLISH). A relay to its member is
/// published packed on its bus channel, reaches nobody, and goes again on the legacy channel,
/// as that version expects it; the sender is told nothing (it was delivered). Its own messages,
/// one per PUBLISH on our legacy channel, still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_of_the_previous_version_still_gets_its_messages() {
    let c = Cluster::start(1, "10s").await;
    bounded_for(Duration::from_secs(30), async {
        let s = c.session(0).await;
        let mut host = c.host(0, &s).await;
        let (old, member) = (uuid(), uuid());
        let client = c._redis.client();
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
        pubsub
            .subscribe(format!("{PREFIX}:chan:{old}"))
            .await
            .unwrap();
        let mut admin = c.admin.clone();
        let record = format!(
            "2|client|0|{old}|{}",
            json!({"supported_transports": ["webrtc"], "preferred_transport": null})
        );
        let _: () = admin
            .hset(format!("{PREFIX}:{{{}}}:peers", s.id), &member, record)
            .await
            .unwrap();

        for n in 0..3 {
            host.send_json(signal(&member, n)).await;
        }
        let mut messages = pubsub.on_message();
        for n in 0..3 {
            let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .expect("no message on the legacy channel")
                .expect("subscription ended");
            let payload: Vec<u8> = m.get_payload().unwrap();
            let split = payload.iter().position(|b| *b == b'\n').expect("header");
            let header: Value = serde_json::from_slice(&payload[..split]).unwrap();
            assert_eq!(header["t"], "deliver");
            assert_eq!(header["to"], json!([member]));
            let frame: Value = serde_json::from_slice(&payload[split + 1..]).unwrap();
            assert_eq!(frame["type"], "signal");
            assert_eq!(frame["from_peer"], host.id());
            assert_eq!(frame["signal"]["n"], n, "in order");
        }
        host.expect_silence(QUIET).await;

        // And what the old instance publishes, one message per PUBLISH, reaches our member.
        let frame = json!({"type": "signal", "from_peer": member, "signal": {"n": 9}});
        let header =
            json!({"t": "deliver", "room": s.id, "to": [host.id()], "from": [member, old]});
        let receivers: i64 = admin
            .publish(c.channel(0), format!("{header}\n{frame}"))
            .await
            .unwrap();
        assert_eq!(receivers, 1);
        assert_eq!(host.recv_type("signal").await["signal"]["n"], 9);
    })
    .await;
}
