//! The Redis engine against a real `redis-server` started by each test (see `common/redis.rs`).
//! Short intervals (heartbeat 200 ms, instance timeout 1 s); every test is bounded in time.
//!
//! What the [`Engine`] trait promises (`src/engine/mod.rs`), checked where it is hardest to keep:
//! across two instances on one Redis, under concurrency, through Redis restarts and fencing.

#[path = "common/redis.rs"]
mod redis_server;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use beach_road::code::Secret;
use beach_road::engine::redis::{RedisEngine, RedisSettings};
use beach_road::engine::{
    Access, CodeCheck, Delivery, Engine, EngineConfig, Entry, Grant, JoinResult, Joined, NewPeer,
    SessionRecord,
};
use beach_road::peers::{CloseReason, PeerQueue};
use beach_road::protocol::{new_id, Role};
use redis_server::RedisServer;
use serde_json::Value;

const TEST_LIMIT: Duration = Duration::from_secs(30);
/// The room limit the server runs with by default (`--max-room-peers`).
const MAX_PEERS: usize = 32;
/// The join code of every test session.
const CODE: &str = "123456";

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

/// The secret the HTTP layer would key code digests with.
fn secret() -> Secret {
    Secret::new(&[b'k'; 32]).unwrap()
}

/// The digest of `code` for session `id`, as `access::admit` computes it.
fn digest(id: &str, code: &str) -> String {
    secret().digest(id, code)
}

fn record(id: &str) -> SessionRecord {
    SessionRecord {
        id: id.to_owned(),
        created_at: 0,
        code: digest(id, CODE),
        relay: false,
    }
}

/// Registers a fresh session; returns its id and host token.
async fn session(e: &RedisEngine) -> (String, String) {
    let (id, host) = (new_id(), new_id());
    assert!(e.register(record(&id), &host).await.unwrap());
    (id, host)
}

fn new_peer(id: &str, role: Role) -> NewPeer {
    let mut metadata = BTreeMap::new();
    metadata.insert("label".to_owned(), "a|b \"quoted\"".to_owned());
    NewPeer {
        id: id.to_owned(),
        role,
        supported_transports: vec![Value::from("webrtc")],
        preferred_transport: None,
        metadata: Some(metadata),
    }
}

#[track_caller]
fn joined(r: JoinResult) -> Joined {
    match r {
        JoinResult::Joined(j) => j,
        refused => panic!("refused: {refused:?}"),
    }
}

/// Connects and joins a fresh peer with `role`; returns its id and queue.
async fn join_as(e: &RedisEngine, room: &str, role: Role) -> (String, PeerQueue) {
    let id = new_id();
    let q = e.connect(&id);
    joined(
        e.join(room, new_peer(&id, role), MAX_PEERS, Entry::Admitted)
            .await
            .unwrap(),
    );
    (id, q)
}

/// A fresh room with a peer on `a` and one on `b`, once `a`'s has heard of `b`'s.
async fn pair_across(
    a: &RedisEngine,
    b: &RedisEngine,
) -> (String, (String, PeerQueue), (String, PeerQueue)) {
    let room = new_id();
    let (pa, mut qa) = join(a, &room).await;
    let (pb, qb) = join(b, &room).await;
    assert_eq!(
        next(&mut qa, Duration::from_secs(2)).await["type"],
        "peer_joined"
    );
    (room, (pa, qa), (pb, qb))
}

/// Connects and joins a fresh `client` peer; returns its id and queue.
async fn join(e: &RedisEngine, room: &str) -> (String, PeerQueue) {
    join_as(e, room, Role::Client).await
}

/// Empties Redis's script cache, as a restart or `SCRIPT FLUSH` does.
async fn flush_scripts(c: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(c)
        .await
        .unwrap();
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

/// The grant and bound peer of `id` (panics when it does not resolve).
#[track_caller]
fn grant_of(access: Option<Access>, session: &str) -> (Grant, Option<String>) {
    let a = access.expect("the id resolves");
    assert_eq!(a.session.id, session, "resolved to the wrong session");
    (a.grant, a.peer)
}

#[tokio::test]
async fn register_exactly_one_wins_and_ids_resolve() {
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        let id = new_id();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let e = if i % 2 == 0 { a.clone() } else { b.clone() };
                let (rec, host) = (record(&id), new_id());
                tokio::spawn(async move {
                    let won = e.register(rec, &host).await.unwrap();
                    (host, won)
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for t in tasks {
            let (host, won) = t.await.unwrap();
            if won {
                winners.push(host);
            } else {
                losers.push(host);
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        let host = &winners[0];

        // The session id is public; the winner's token is the host's, on either instance.
        let s = a.resolve(&id).await.unwrap().expect("registered");
        assert_eq!((s.grant, s.peer), (Grant::Public, None));
        assert_eq!(s.session.code, digest(&id, CODE));
        assert!(
            s.session.created_at > 1_700_000_000,
            "created_at comes from Redis TIME"
        );
        assert_eq!(
            grant_of(b.resolve(host).await.unwrap(), &id),
            (Grant::Host, None)
        );
        // The losers' tokens were never stored (or were undone).
        for t in &losers {
            assert!(a.resolve(t).await.unwrap().is_none(), "loser token {t}");
        }
        assert!(a.resolve(&new_id()).await.unwrap().is_none());
        // Tokens and session ids never alias: neither a token as a session id, nor a token
        // registered twice.
        assert!(!a.register(record(host), &new_id()).await.unwrap());
        let other = new_id();
        assert!(!b.register(record(&other), host).await.unwrap());
        assert!(
            a.resolve(&other).await.unwrap().is_none(),
            "nothing half-registered"
        );
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn tokens_are_minted_bound_and_resolved_across_instances() {
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        let (id, host) = session(&a).await;
        let t = a
            .mint_token(&id, Grant::Joiner)
            .await
            .unwrap()
            .expect("minted");
        assert!(uuid::Uuid::parse_str(&t).is_ok(), "{t}");
        assert!(t != id && t != host);
        // Unbound until a socket joins through it; then bound to that peer, the latest wins.
        assert_eq!(
            grant_of(b.resolve(&t).await.unwrap(), &id),
            (Grant::Joiner, None)
        );
        b.bind_token(&t, "p1").await.unwrap();
        assert_eq!(
            grant_of(a.resolve(&t).await.unwrap(), &id),
            (Grant::Joiner, Some("p1".to_owned()))
        );
        a.bind_token(&t, "p2").await.unwrap();
        assert_eq!(
            grant_of(b.resolve(&t).await.unwrap(), &id),
            (Grant::Joiner, Some("p2".to_owned()))
        );
        // The host's token likewise.
        b.bind_token(&host, "h1").await.unwrap();
        assert_eq!(
            grant_of(a.resolve(&host).await.unwrap(), &id),
            (Grant::Host, Some("h1".to_owned()))
        );
        // Binding an unknown token creates nothing; unknown sessions mint nothing.
        let unknown = new_id();
        a.bind_token(&unknown, "p3").await.unwrap();
        assert!(a.resolve(&unknown).await.unwrap().is_none());
        assert_eq!(a.mint_token(&new_id(), Grant::Joiner).await.unwrap(), None);
        // Every mint is a fresh token.
        let mut more = BTreeSet::new();
        for e in [&a, &b, &a] {
            more.insert(
                e.mint_token(&id, Grant::Joiner)
                    .await
                    .unwrap()
                    .expect("minted"),
            );
        }
        assert_eq!(more.len(), 3);
        assert!(!more.contains(&t) && !more.contains(&host));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn token_quota_holds_under_concurrent_mints() {
    bounded(async {
        let r = RedisServer::start();
        let cfg = EngineConfig {
            max_tokens_per_session: 6,
            ..config()
        };
        let a = engine_with(&r, "t", cfg.clone()).await;
        let b = engine_with(&r, "t", cfg).await;
        let (id, host) = session(&a).await;
        // The host's token counts: five more, whichever instance mints them.
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let e = if i % 2 == 0 { a.clone() } else { b.clone() };
                let id = id.clone();
                tokio::spawn(async move { e.mint_token(&id, Grant::Joiner).await.unwrap() })
            })
            .collect();
        let mut minted = BTreeSet::new();
        for t in tasks {
            minted.extend(t.await.unwrap());
        }
        assert_eq!(minted.len(), 5, "{minted:?}");
        assert_eq!(a.mint_token(&id, Grant::Joiner).await.unwrap(), None);
        // Spent quota takes nothing away: every token still resolves.
        for t in &minted {
            assert_eq!(grant_of(b.resolve(t).await.unwrap(), &id).0, Grant::Joiner);
        }
        assert_eq!(
            grant_of(b.resolve(&host).await.unwrap(), &id).0,
            Grant::Host
        );
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn tokens_live_as_long_as_their_session() {
    bounded(async {
        let r = RedisServer::start();
        let ttl = Duration::from_millis(1500);
        let e = engine_with(
            &r,
            "t",
            EngineConfig {
                session_ttl: ttl,
                ..config()
            },
        )
        .await;
        let (id, host) = session(&e).await;
        let joiner = e.mint_token(&id, Grant::Joiner).await.unwrap().unwrap();
        let (h, _hq) = join_as(&e, &id, Role::Server).await;
        e.bind_token(&host, &h).await.unwrap();
        // A later join keeps the session alive past its first ttl...
        tokio::time::sleep(ttl * 2 / 3).await;
        let (_c, _cq) = join(&e, &id).await;
        tokio::time::sleep(ttl * 2 / 3).await;
        assert!(e.resolve(&id).await.unwrap().is_some(), "the session lives");
        // ... and with it the tokens handed out for it ("Joiner tokens live as long as the
        // session", docs/security.md): the host's, and a joiner's not yet used.
        let access = e.resolve(&host).await.unwrap();
        assert!(
            access.is_some(),
            "the host token expired while its session lives"
        );
        assert_eq!(grant_of(access, &id), (Grant::Host, Some(h.clone())));
        let access = e.resolve(&joiner).await.unwrap();
        assert!(
            access.is_some(),
            "a joiner token expired while its session lives"
        );
        assert_eq!(grant_of(access, &id), (Grant::Joiner, None));
        e.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn code_checks_are_counted_exactly_per_client_and_per_session() {
    bounded(async {
        let r = RedisServer::start();
        let cfg = EngineConfig {
            max_code_failures: 5,
            max_session_code_failures: 12,
            code_failure_window: Duration::from_secs(2),
            ..config()
        };
        let a = engine_with(&r, "t", cfg.clone()).await;
        let b = engine_with(&r, "t", cfg).await;
        let (id, _) = session(&a).await;
        let (right, wrong) = (digest(&id, CODE), digest(&id, "654321"));
        // A right code answers with the session, as resolving it does (a join reads no more).
        let stored = a.resolve(&id).await.unwrap().unwrap().session;
        let correct = CodeCheck::Correct(stored);
        assert_eq!(a.check_code(&id, "c1", &right).await.unwrap(), correct);
        assert_eq!(
            a.check_code(&new_id(), "c1", &right).await.unwrap(),
            CodeCheck::NotFound
        );
        // Thirty concurrent wrong codes from one client on two instances: exactly five count.
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let e = if i % 2 == 0 { a.clone() } else { b.clone() };
                let (id, wrong) = (id.clone(), wrong.clone());
                tokio::spawn(async move { e.check_code(&id, "c1", &wrong).await.unwrap() })
            })
            .collect();
        let mut wrongs = 0;
        for t in tasks {
            match t.await.unwrap() {
                CodeCheck::Wrong => wrongs += 1,
                CodeCheck::Locked(wait) => {
                    assert!(
                        wait > Duration::ZERO && wait <= Duration::from_secs(2),
                        "{wait:?}"
                    )
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(wrongs, 5);
        // Locked: the right code is not even compared.
        assert!(matches!(
            b.check_code(&id, "c1", &right).await.unwrap(),
            CodeCheck::Locked(_)
        ));
        // Another client is not locked out by c1...
        assert_eq!(b.check_code(&id, "c2", &right).await.unwrap(), correct);
        // ... until the session's own budget (12) is spent: 5 + 5 + 2.
        for client in ["c2", "c2", "c2", "c2", "c2", "c3", "c3"] {
            assert_eq!(
                a.check_code(&id, client, &wrong).await.unwrap(),
                CodeCheck::Wrong,
                "{client}"
            );
        }
        for client in ["c3", "c4"] {
            assert!(
                matches!(
                    b.check_code(&id, client, &right).await.unwrap(),
                    CodeCheck::Locked(_)
                ),
                "{client}"
            );
        }
        // Other sessions keep their own counts.
        let (other, _) = session(&b).await;
        assert!(matches!(
            a.check_code(&other, "c1", &digest(&other, CODE))
                .await
                .unwrap(),
            CodeCheck::Correct(s) if s.id == other
        ));
        // The window slides: once the failures age out, the code is checked again.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(
            a.check_code(&id, "c1", &wrong).await.unwrap(),
            CodeCheck::Wrong
        );
        assert_eq!(b.check_code(&id, "c4", &right).await.unwrap(), correct);
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn rate_counts_a_fixed_window_across_instances() {
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        let window = Duration::from_secs(1);
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let e = if i % 2 == 0 { a.clone() } else { b.clone() };
                tokio::spawn(async move { e.rate("reg@10.0.0.1", 5, window).await.unwrap() })
            })
            .collect();
        let mut allowed = 0;
        for t in tasks {
            match t.await.unwrap() {
                None => allowed += 1,
                Some(wait) => assert!(wait > Duration::ZERO && wait <= window, "{wait:?}"),
            }
        }
        assert_eq!(allowed, 5);
        // Keys count apart; a new window starts afresh.
        assert_eq!(a.rate("reg@10.0.0.2", 5, window).await.unwrap(), None);
        tokio::time::sleep(window + Duration::from_millis(100)).await;
        assert_eq!(b.rate("reg@10.0.0.1", 5, window).await.unwrap(), None);
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn joins_keep_their_role_on_any_instance_and_are_idempotent() {
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        for _ in 0..20 {
            let room = new_id();
            // Two clients at once (two joiners first in the room): both clients, no server.
            let (ca, cb) = (new_id(), new_id());
            let _qa = a.connect(&ca);
            let _qb = b.connect(&cb);
            let (ja, jb) = tokio::join!(
                a.join(
                    &room,
                    new_peer(&ca, Role::Client),
                    MAX_PEERS,
                    Entry::Admitted
                ),
                b.join(
                    &room,
                    new_peer(&cb, Role::Client),
                    MAX_PEERS,
                    Entry::Admitted
                )
            );
            let (ja, jb) = (joined(ja.unwrap()), joined(jb.unwrap()));
            assert_eq!((ja.me.role, jb.me.role), (Role::Client, Role::Client));
            assert_eq!(a.server_peer(&room).await.unwrap(), None);
            // Two host sockets at once: both servers; the room's server is one of them.
            let (sa, sb) = (new_id(), new_id());
            let _qsa = a.connect(&sa);
            let _qsb = b.connect(&sb);
            let (ja, jb) = tokio::join!(
                a.join(
                    &room,
                    new_peer(&sa, Role::Server),
                    MAX_PEERS,
                    Entry::Admitted
                ),
                b.join(
                    &room,
                    new_peer(&sb, Role::Server),
                    MAX_PEERS,
                    Entry::Admitted
                )
            );
            let (ja, jb) = (joined(ja.unwrap()), joined(jb.unwrap()));
            assert_eq!((ja.me.role, jb.me.role), (Role::Server, Role::Server));
            let server = b.server_peer(&room).await.unwrap().expect("a server peer");
            assert!(server == sa || server == sb, "{server}");
            // A repeated join changes nothing, whatever role it names: no demotion.
            let again = joined(
                a.join(
                    &room,
                    new_peer(&sa, Role::Client),
                    MAX_PEERS,
                    Entry::Admitted,
                )
                .await
                .unwrap(),
            );
            assert!(!again.fresh);
            assert_eq!(again.me, ja.me);
            assert_eq!(again.peers.len(), 4);
            let again = joined(
                b.join(
                    &room,
                    new_peer(&cb, Role::Server),
                    MAX_PEERS,
                    Entry::Admitted,
                )
                .await
                .unwrap(),
            );
            assert!(!again.fresh);
            assert_eq!(again.me.role, Role::Client);
            assert_eq!(b.server_peer(&room).await.unwrap(), Some(server.clone()));
            // Join order is kept: the two clients first.
            let roles: Vec<Role> = again.peers.iter().map(|p| p.role).collect();
            assert_eq!(
                roles,
                [Role::Client, Role::Client, Role::Server, Role::Server]
            );
            assert_eq!(
                again.me.metadata.as_ref().unwrap()["label"],
                "a|b \"quoted\""
            );
            // The latest server join is the room's server.
            let (s3, _q3) = join_as(&b, &room, Role::Server).await;
            assert_eq!(a.server_peer(&room).await.unwrap(), Some(s3));
        }
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn the_room_limit_holds_across_instances() {
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        let room = new_id();
        let max = 4;
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..12 {
            let e = if i % 2 == 0 { a.clone() } else { b.clone() };
            let id = new_id();
            queues.push(e.connect(&id));
            let room = room.clone();
            tasks.push(tokio::spawn(async move {
                let r = e
                    .join(&room, new_peer(&id, Role::Client), max, Entry::Admitted)
                    .await
                    .unwrap();
                (e, id, r)
            }));
        }
        let mut members = Vec::new();
        let mut refused = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (e, id, JoinResult::Joined(j)) => {
                    assert!(j.fresh && j.peers.len() <= max);
                    members.push((e, id));
                }
                (e, id, JoinResult::Full) => refused.push((e, id)),
                (_, _, refused) => panic!("refused: {refused:?}"),
            }
        }
        assert_eq!(members.len(), max);
        for (_, id) in &refused {
            assert!(
                !a.is_member(&room, id).await.unwrap(),
                "refused {id} is a member"
            );
        }
        // A member's repeated join adds nobody: still answered while the room is full.
        let (e, id) = &members[0];
        let again = joined(
            e.join(&room, new_peer(id, Role::Client), max, Entry::Admitted)
                .await
                .unwrap(),
        );
        assert!(!again.fresh);
        assert_eq!(again.peers.len(), max);
        // One leaves: exactly one more gets in.
        let (e, id) = &members[1];
        e.leave(&room, id).await.unwrap();
        assert!(!a.is_member(&room, id).await.unwrap());
        let (e, id) = &refused[0];
        let r = e
            .join(&room, new_peer(id, Role::Client), max, Entry::Admitted)
            .await
            .unwrap();
        assert!(matches!(r, JoinResult::Joined(_)), "a freed place");
        let (e, id) = &refused[1];
        let r = e
            .join(&room, new_peer(id, Role::Client), max, Entry::Admitted)
            .await
            .unwrap();
        assert!(matches!(r, JoinResult::Full), "full again");
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
async fn answers_go_to_exactly_one_reader_within_a_quota() {
    bounded(async {
        let r = RedisServer::start();
        let e = engine(&r).await;
        let room = new_id();
        assert!(e
            .put_answer(&room, "j", "h", "hs", "first".into())
            .await
            .unwrap());
        assert!(e
            .put_answer(&room, "j", "h", "hs", "second".into())
            .await
            .unwrap());
        // Answers are addressed: another recipient finds nothing under the same handshake.
        assert_eq!(e.take_answer(&room, "x", "hs").await.unwrap(), None);
        let readers: Vec<_> = (0..10)
            .map(|_| {
                let e = e.clone();
                let room = room.clone();
                tokio::spawn(async move { e.take_answer(&room, "h", "hs").await.unwrap() })
            })
            .collect();
        let mut got = Vec::new();
        for t in readers {
            got.extend(t.await.unwrap());
        }
        assert_eq!(got, ["second"]);

        // One sender may have 8 answers waiting for one recipient; a new version of a waiting
        // one replaces it; other senders and recipients have their own quota.
        let quota = config().max_queued_answers;
        for i in 0..quota {
            assert!(e
                .put_answer(&room, "k", "h", &format!("q{i}"), "a".into())
                .await
                .unwrap());
        }
        assert!(!e
            .put_answer(&room, "k", "h", "over", "a".into())
            .await
            .unwrap());
        assert!(e
            .put_answer(&room, "k", "h", "q0", "b".into())
            .await
            .unwrap());
        assert!(e
            .put_answer(&room, "l", "h", "over", "a".into())
            .await
            .unwrap());
        assert!(e
            .put_answer(&room, "k", "g", "over", "a".into())
            .await
            .unwrap());
        // Taken answers are no longer waiting.
        for i in 0..quota {
            assert!(e
                .take_answer(&room, "h", &format!("q{i}"))
                .await
                .unwrap()
                .is_some());
        }
        assert!(
            e.put_answer(&room, "k", "h", "after", "a".into())
                .await
                .unwrap(),
            "refused although none of the sender's answers is waiting any more"
        );

        // An emptied script cache is harmless: EVALSHA reloads on NOSCRIPT.
        let mut c = r.client().get_multiplexed_async_connection().await.unwrap();
        flush_scripts(&mut c).await;
        assert!(e
            .put_answer(&room, "j", "h", "h2", "again".into())
            .await
            .unwrap());
        assert_eq!(
            e.take_answer(&room, "h", "h2").await.unwrap().as_deref(),
            Some("again")
        );
        e.shutdown().await;
    })
    .await
}

/// After Redis lost its scripts (restart, SCRIPT FLUSH) a join still works, and the reaper's
/// intent (the instance's peer set) is recorded for it.
#[tokio::test]
async fn a_join_survives_an_emptied_script_cache() {
    bounded(async {
        let r = RedisServer::start();
        let e = engine(&r).await;
        let room = new_id();
        let (p1, _q1) = join(&e, &room).await;
        let mut c = r.client().get_multiplexed_async_connection().await.unwrap();
        flush_scripts(&mut c).await;
        let (p2, _q2) = join(&e, &room).await;
        let members: Vec<String> = redis::cmd("HKEYS")
            .arg(format!("t:{{{room}}}:peers"))
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(
            members.contains(&p1) && members.contains(&p2),
            "{members:?}"
        );
        let intents: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("t:{{inst:{}}}:peers", e.router().id()))
            .query_async(&mut c)
            .await
            .unwrap();
        for p in [&p1, &p2] {
            assert!(intents.contains(&format!("{room}|{p}")), "{intents:?}");
        }
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
            let d = b
                .send(&room, "sender", &pa, format!("{{\"n\":{i}}}").into())
                .await;
            assert_eq!(d.unwrap(), Delivery::Published);
        }
        for i in 0..50 {
            assert_eq!(next(&mut qa, Duration::from_secs(2)).await["n"], i);
        }
        let d = a.send(&room, "sender", &pb, "{\"x\":1}".into()).await;
        assert_eq!(d.unwrap(), Delivery::Published);
        assert_eq!(next(&mut qb, Duration::from_secs(2)).await["x"], 1);
        let d = a.send(&room, "sender", &new_id(), "{}".into()).await;
        assert_eq!(d.unwrap(), Delivery::NotMember);
        let d = a.send(&new_id(), "sender", &pb, "{}".into()).await;
        assert_eq!(d.unwrap(), Delivery::NotMember);
        assert_eq!(a.local_peers(), 1);

        b.leave(&room, &pb).await.unwrap();
        let l = next(&mut qa, Duration::from_secs(2)).await;
        assert_eq!(l["type"], "peer_left");
        assert_eq!(l["peer_id"], pb.as_str());
        let d = a.send(&room, "sender", &pb, "{}".into()).await;
        assert_eq!(d.unwrap(), Delivery::NotMember);
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
        let (room, (_pa, mut qa), (pb, mut qb)) = pair_across(&a, &b).await;
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
        let d = a.send(&room, "sender", &pc, "{\"hi\":1}".into()).await;
        assert_eq!(d.unwrap(), Delivery::Published);
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
        session(&e).await;

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
        let (id, host) = session(&e).await;
        assert_eq!(
            grant_of(e.resolve(&host).await.unwrap(), &id).0,
            Grant::Host
        );
        let (_p, _q) = join(&e, &id).await;
        assert_eq!(e.local_peers(), 1);
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
        let (id, ha, hb) = (new_id(), new_id(), new_id());
        assert!(a.register(record(&id), &ha).await.unwrap());
        assert!(b.register(record(&id), &hb).await.unwrap());
        assert!(b.resolve(&ha).await.unwrap().is_none());
        assert!(a.resolve(&hb).await.unwrap().is_none());
        let t = a.mint_token(&id, Grant::Joiner).await.unwrap().unwrap();
        assert!(b.resolve(&t).await.unwrap().is_none());
        let (pa, _qa) = join_as(&a, &id, Role::Server).await;
        assert!(!b.is_member(&id, &pa).await.unwrap());
        assert_eq!(b.server_peer(&id).await.unwrap(), None);
        let (pb, _qb) = join(&b, &id).await;
        let d = a.send(&id, "sender", &pb, "{}".into()).await;
        assert_eq!(d.unwrap(), Delivery::NotMember);
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

/// Issue 8, "freeze inside send": the sender's instance passes its liveness deadline while a
/// relay waits inside `send` (here: its hub stalled longer than the instance timeout, with its
/// heartbeat stopped). When the relay resumes, the instance may already be written off and the
/// room told the sender left: the frame must not be published.
#[tokio::test]
async fn a_relay_resumed_past_the_liveness_deadline_is_not_published() {
    bounded(async {
        let r = RedisServer::start();
        // Calls may wait longer than the instance timeout (1 s), so the stall outlasts the
        // deadline without timing the call out.
        let slow = EngineConfig {
            call_timeout: Duration::from_secs(4),
            ..config()
        };
        let a = engine_with(&r, "t", slow.clone()).await;
        let b = engine_with(&r, "t", slow).await;
        let (room, _) = session(&a).await;
        let (host, mut host_q) = join_as(&a, &room, Role::Server).await;
        let (joiner, mut joiner_q) = join(&b, &room).await;
        assert_eq!(
            next(&mut host_q, Duration::from_secs(2)).await["type"],
            "peer_joined"
        );
        let frame = |n: u32| {
            let raw = serde_json::value::RawValue::from_string(format!("{{\"n\":{n}}}")).unwrap();
            beach_road::protocol::Relayed::Signal.frame(&host, &raw)
        };
        // Alive: the relay crosses to B.
        assert_eq!(
            a.send(&room, "sender", &joiner, frame(1)).await.unwrap(),
            Delivery::Published
        );
        assert_eq!(
            next(&mut joiner_q, Duration::from_secs(2)).await["signal"]["n"],
            1
        );

        // Frozen inside send: the check at its start passes, the PUBLISH comes after the
        // deadline.
        a.pause_heartbeat(true);
        a.stall_next_send(Duration::from_millis(1800));
        let sent = a.send(&room, "sender", &joiner, frame(2)).await;
        assert!(
            sent.is_err(),
            "a relay past the deadline must fail, got {sent:?}"
        );
        // The joiner may hear that the host left (A is written off), never its late signal.
        let until = tokio::time::Instant::now() + Duration::from_millis(800);
        while let Ok(Some(f)) = tokio::time::timeout_at(until, joiner_q.recv()).await {
            let v: Value = serde_json::from_str(&f).unwrap();
            assert_ne!(v["type"], "signal", "a stale relay was published: {v}");
        }
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}

/// A relay that the recipient's instance cannot deliver (its queue is full) is reported back to
/// the sender on its own instance, as the `error` a local refusal gets; none is lost silently.
/// Past the relay share (192 of 256) frames from another instance are still queued, up to 16
/// more queues' worth of frames (4,096; these are far from the byte bound), while their sender
/// is held (no socket task here to hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_on_another_instance_is_reported_to_the_sender() {
    const QUEUED: usize = 192 + 16 * 256;
    // Fewer refusals than the sender's own relay share (192): it reads nothing either here.
    const SENT: usize = QUEUED + 150;
    bounded(async {
        let r = RedisServer::start();
        let (a, b) = (engine(&r).await, engine(&r).await);
        // pa never reads: its relay share and the slack for frames from elsewhere fill up.
        let (room, (pa, mut qa), (pb, mut qb)) = pair_across(&a, &b).await;
        for i in 0..SENT {
            let d = b
                .send(&room, &pb, &pa, format!("{{\"n\":{i}}}").into())
                .await;
            assert_eq!(d.unwrap(), Delivery::Published, "published");
        }
        let mut refused = 0;
        while let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(2), qb.recv()).await {
            let v: Value = serde_json::from_str(&f).unwrap();
            assert_eq!(v["type"], "error", "{v}");
            assert!(
                v["message"].as_str().unwrap().contains("not keeping up"),
                "{v}"
            );
            refused += 1;
            if refused == SENT - QUEUED {
                break;
            }
        }
        assert_eq!(refused, SENT - QUEUED);
        let mut delivered = 0;
        while let Some(f) = qa.try_recv() {
            assert_eq!(serde_json::from_str::<Value>(&f).unwrap()["n"], delivered);
            delivered += 1;
        }
        assert_eq!(delivered, QUEUED);
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
}
