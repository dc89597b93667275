//! The WebSocket relay (issue 12): relay sessions' answers, relay tokens, pairing (held host
//! upgrades, the approval check, late reconnect sockets), frames unchanged both ways, ends,
//! limits, and pairs split across two instances on Redis.
//!
//! The test host behaves as the generation-1 CLI does (`apps/beach/src/main.rs`, the acceptor
//! loop): it opens its relay URL, and the moment an upgrade completes it speaks first
//! (`beach:status:approval_granted`) and opens the next socket; a failed upgrade is retried a
//! second later. A joiner opens its URL once and waits for the host's frames.

mod common;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use common::metrics::Scrape;
use common::{bounded_for, uuid, Api, Ctx, Engine, RedisServer, Server, ServerBuilder};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

const LIMIT: Duration = Duration::from_secs(60);
const APPROVAL: &str = "beach:status:approval_granted";

/// One server with `args`, on `engine` (a Redis engine gets its own redis-server).
async fn start(engine: Engine, args: &[&str]) -> Ctx {
    Ctx::start_with(engine, ServerBuilder::new().args(args.iter().copied())).await
}

/// Each test below named here runs on both engines (the Redis one, on one node and on a cluster,
/// pairs through `lua/relay_*.lua`, the in-process one through `relay::pairing`).
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Engine::Memory).await
            })*
        }
        mod redis {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Engine::Redis).await
            })*
        }
        mod cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Engine::RedisCluster).await
            })*
        }
    };
}

on_both_engines!(
    relay_sessions_offer_only_the_relay_and_other_clients_are_refused,
    relay_tokens_are_checked_before_the_upgrade,
    a_held_host_socket_pairs_with_a_joiner_and_frames_pass_unchanged,
    the_acceptor_loop_serves_joiners_and_late_or_silent_sockets_are_not_paired,
    a_host_socket_that_does_not_speak_first_is_closed_and_the_next_is_used,
    a_joiner_without_a_host_is_closed_1013,
    relay_rate_and_duration_are_capped,
    relay_sockets_are_members_and_waiting_ones_are_capped,
    pairs_per_session_are_capped_and_a_gone_hosts_held_sockets_go,
    reconnects_of_many_departed_joiners_never_keep_a_new_joiner_out,
    an_acceptor_socket_taken_for_a_late_one_is_still_found,
    a_held_upgrade_whose_client_goes_leaves_nothing_behind,
);

/// Registers a relay session through the relay base URL: (session id, code, host relay URL).
async fn relay_session(api: &Api) -> (String, String, String) {
    let id = uuid();
    let r = api
        .post("/relay/sessions", &json!({ "session_id": id }))
        .await;
    r.assert_status(200);
    assert_eq!(r.body["success"], true, "{}", r.body);
    let url = r.body["transports"][0]["url"].as_str().unwrap().to_owned();
    (id, r.body["join_code"].as_str().unwrap().to_owned(), url)
}

/// A joiner's relay URL from a successful HTTP join.
async fn join_url(api: &Api, id: &str, code: &str) -> String {
    let r = api.join_http(id, Some(code)).await;
    assert_eq!(r["success"], true, "{r}");
    r["transports"][0]["url"].as_str().unwrap().to_owned()
}

async fn connect(url: &str) -> Result<Socket, tungstenite::Error> {
    tokio_tungstenite::connect_async(url).await.map(|(s, _)| s)
}

/// A connect left running (a host upgrade the server may hold).
fn connecting(url: &str) -> tokio::task::JoinHandle<Result<Socket, tungstenite::Error>> {
    let url = url.to_owned();
    tokio::spawn(async move { connect(&url).await })
}

fn status_of(e: &tungstenite::Error) -> Option<u16> {
    match e {
        tungstenite::Error::Http(r) => Some(r.status().as_u16()),
        _ => None,
    }
}

/// The next data frame (text or binary); `None` when the socket closed (with its close code).
async fn next(s: &mut Socket) -> Result<Message, Option<u16>> {
    loop {
        match s.next().await {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return Ok(m),
            Some(Ok(Message::Close(c))) => return Err(c.map(|c| u16::from(c.code))),
            Some(Ok(_)) => {}
            _ => return Err(None),
        }
    }
}

/// How a socket ended: its close code (`None`: no close frame).
async fn closed(s: &mut Socket) -> Option<u16> {
    loop {
        match next(s).await {
            Ok(_) => {}
            Err(code) => return code,
        }
    }
}

/// The CLI's acceptor loop: every completed upgrade is handed to `tx` after its approval line;
/// a refused one is retried after a second. Ends when `tx` is dropped by the test.
fn host_loop(
    url: String,
) -> (
    tokio::sync::mpsc::Receiver<Socket>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(async move {
        loop {
            match connect(&url).await {
                Ok(mut s) => {
                    if s.send(Message::text(APPROVAL)).await.is_err() {
                        continue;
                    }
                    if tx.send(s).await.is_err() {
                        return;
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    (rx, task)
}

/// A joiner on `url` paired with the acceptor loop's next socket, the approval line seen by
/// the joiner: (host, joiner).
async fn paired(url: &str, accepted: &mut tokio::sync::mpsc::Receiver<Socket>) -> (Socket, Socket) {
    let mut joiner = connect(url).await.unwrap();
    let host = accepted.recv().await.unwrap();
    assert_eq!(next(&mut joiner).await.unwrap(), Message::text(APPROVAL));
    (host, joiner)
}

fn binary(n: usize, seed: u8) -> Message {
    Message::binary(
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

/// Frames of the sizes the CLI sends and beyond: empty, tiny, its largest (48 KiB + 13), 64 KiB.
fn frames(seed: u8) -> Vec<Message> {
    vec![
        Message::text(format!("hello {seed}")),
        binary(0, seed),
        binary(1, seed),
        binary(13 + 48 * 1024, seed),
        Message::text("é".repeat(1000)),
        binary(64 * 1024, seed),
    ]
}

async fn exchange(host: &mut Socket, joiner: &mut Socket) {
    for (i, f) in frames(1).into_iter().enumerate() {
        host.send(f.clone()).await.unwrap();
        assert_eq!(next(joiner).await.unwrap(), f, "host → joiner frame {i}");
    }
    for (i, f) in frames(2).into_iter().enumerate() {
        joiner.send(f.clone()).await.unwrap();
        assert_eq!(next(host).await.unwrap(), f, "joiner → host frame {i}");
    }
}

async fn metric(server: &Server, event: &str) -> f64 {
    let scrape = Scrape::of(server).await;
    scrape.get("beach_road_relay_events_total", &[("event", event)])
}

async fn relay_sessions_offer_only_the_relay_and_other_clients_are_refused(engine: Engine) {
    let s = start(engine, &[]).await;
    let api = s.api();
    bounded_for(LIMIT, async {
        let id = uuid();
        let r = api.post("/relay/sessions", &json!({ "session_id": id })).await;
        let transports = r.body["transports"].as_array().unwrap();
        assert_eq!(transports.len(), 1, "{}", r.body);
        assert_eq!(transports[0]["kind"], "web_socket");
        let host_url = transports[0]["url"].as_str().unwrap();
        let token = host_url.rsplit('/').next().unwrap();
        assert!(host_url.starts_with(&format!("ws://127.0.0.1:{}/relay/", s.server.port())));
        assert!(token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()), "128-bit token: {token}");
        assert_eq!(r.body["websocket_url"], host_url);
        let code = r.body["join_code"].as_str().unwrap();
        assert_eq!(api.get_ok(&format!("/relay/sessions/{id}")).await.body["exists"], true);

        // Joined through either base: only the relay, and no WebRTC offer left in.
        for path in [format!("/sessions/{id}/join"), format!("/relay/sessions/{id}/join")] {
            let j = api.post(&path, &json!({ "passphrase": code })).await.body;
            assert_eq!(j["success"], true, "{j}");
            assert_eq!(j["webrtc_offer"], Value::Null);
            let t = j["transports"].as_array().unwrap();
            assert_eq!(t.len(), 1);
            assert_eq!(t[0]["kind"], "web_socket");
            let url = t[0]["url"].as_str().unwrap();
            assert!(url.contains("/relay/") && url != host_url);
        }
        let wrong = api.post(&format!("/sessions/{id}/join"), &json!({ "passphrase": "000000x" })).await;
        assert_eq!(wrong.body["success"], false);

        // Clients without a WebSocket transport: a clear refusal.
        let attach = api.attach(&id, Some(code), "viewer").await;
        attach.assert_status(403);
        assert!(attach.body["error"].as_str().unwrap().contains("relayed"), "{}", attach.body);
        let mut ws = common::Ws::connect(&s.server.ws_url(&id)).await;
        ws.send_json(json!({ "type": "join", "peer_id": "x", "passphrase": code, "supported_transports": ["webrtc"] })).await;
        let reply = ws.recv_json().await;
        assert_eq!(reply["type"], "join_error");
        assert!(reply["reason"].as_str().unwrap().contains("relayed"), "{reply}");

        // An ordinary session is unchanged.
        let plain = api.register(&uuid(), None).await;
        assert_eq!(plain["transports"][0]["kind"], "web_rtc");
    })
    .await;

    let all = start(engine, &["--relay", "all"]).await;
    let r = all.api().register(&uuid(), None).await;
    assert_eq!(
        r["transports"].as_array().unwrap().len(),
        1,
        "--relay all: {r}"
    );
    let off = start(engine, &["--relay", "off"]).await;
    off.api()
        .post("/relay/sessions", &json!({ "session_id": uuid() }))
        .await
        .assert_status(404);
    let e = connect(&off.server.ws_url("x").replace("/ws/", "/relay/"))
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), Some(404));
}

async fn relay_tokens_are_checked_before_the_upgrade(engine: Engine) {
    let s = start(engine, &[]).await;
    let api = s.api();
    bounded_for(LIMIT, async {
        let (id, code, _host) = relay_session(&api).await;
        let relay = |t: &str| s.server.ws_url(t).replace("/ws/", "/relay/");
        for bad in [uuid(), id.clone(), "a%20b".to_owned(), "x".repeat(65)] {
            let e = connect(&relay(&bad)).await.unwrap_err();
            assert!(matches!(status_of(&e), Some(400 | 403 | 404)), "{bad}: {e}");
        }
        // A non-relay session's host token opens no relay socket.
        let plain = api.register(&uuid(), None).await;
        let plain_host = common::url_id(plain["websocket_url"].as_str().unwrap());
        assert_eq!(
            status_of(&connect(&relay(&plain_host)).await.unwrap_err()),
            Some(403)
        );
        // A joiner's token: once. (No host: the first socket is upgraded, then closed 1013.)
        let url = join_url(&api, &id, &code).await;
        let first = connect(&url).await.expect("first use");
        let e = connect(&url).await.unwrap_err();
        assert_eq!(status_of(&e), Some(403), "second use");
        drop(first);
        // Relay tokens grant nothing else.
        let token = url.rsplit('/').next().unwrap();
        let r = api
            .post(&format!("/sessions/{token}/join"), &json!({}))
            .await;
        assert_eq!(r.body["success"], false, "{}", r.body);
        let refused = metric(&s.server, "token_refused").await;
        assert!(refused >= 4.0, "token_refused = {refused}");
    })
    .await;
}

async fn a_held_host_socket_pairs_with_a_joiner_and_frames_pass_unchanged(engine: Engine) {
    let s = start(engine, &["--relay-hold", "3s"]).await;
    let api = s.api();
    bounded_for(LIMIT, async {
        let (id, code, host_url) = relay_session(&api).await;
        // No 101 while nobody waits.
        let pending = connecting(&host_url);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            !pending.is_finished(),
            "a host upgrade is held until a joiner waits"
        );
        let mut joiner = connect(&join_url(&api, &id, &code).await).await.unwrap();
        let mut host = pending
            .await
            .unwrap()
            .expect("answered once the joiner came");
        host.send(Message::text(APPROVAL)).await.unwrap();
        assert_eq!(
            next(&mut joiner).await.unwrap(),
            Message::text(APPROVAL),
            "the host's first frame too"
        );
        exchange(&mut host, &mut joiner).await;
        // Many frames in order, faster than the joiner reads (credit, not loss).
        for i in 0..500u32 {
            host.send(Message::binary(i.to_be_bytes().repeat(512)))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..500u32 {
            assert_eq!(
                next(&mut joiner).await.unwrap(),
                Message::binary(i.to_be_bytes().repeat(512))
            );
        }
        // The room sees both relay sockets as members.
        let status = api.get_ok(&format!("/sessions/{id}")).await;
        assert_eq!(status.body["exists"], true);
        // The joiner leaves: its host socket is closed; the host's next one is held again.
        drop(joiner);
        assert_eq!(closed(&mut host).await, Some(1000));
        assert!(metric(&s.server, "paired").await >= 1.0);
    })
    .await;
}

async fn the_acceptor_loop_serves_joiners_and_late_or_silent_sockets_are_not_paired(
    engine: Engine,
) {
    // The acceptor's held socket stays held through the test (no hold timeout moves the mark).
    let s = start(
        engine,
        &["--relay-hold", "6s", "--relay-fresh-window", "1500ms"],
    )
    .await;
    let api = s.api();
    bounded_for(LIMIT, async {
        let (id, code, host_url) = relay_session(&api).await;
        let (mut accepted, _task) = host_loop(host_url.clone());
        // Two joiners at once, each with its own host socket.
        let mut a = connect(&join_url(&api, &id, &code).await).await.unwrap();
        let mut b = connect(&join_url(&api, &id, &code).await).await.unwrap();
        let mut ha = accepted.recv().await.unwrap();
        let mut hb = accepted.recv().await.unwrap();
        assert_eq!(next(&mut a).await.unwrap(), Message::text(APPROVAL));
        assert_eq!(next(&mut b).await.unwrap(), Message::text(APPROVAL));
        // Which host socket is whose: each echoes its own marker.
        ha.send(Message::text("to-1")).await.unwrap();
        hb.send(Message::text("to-2")).await.unwrap();
        let (ma, mb) = (next(&mut a).await.unwrap(), next(&mut b).await.unwrap());
        let (mut ha, mut hb) = if ma == Message::text("to-1") {
            (ha, hb)
        } else {
            (hb, ha)
        };
        assert_eq!(
            [ma.clone(), mb.clone()]
                .iter()
                .filter(|m| **m == Message::text("to-1"))
                .count(),
            1
        );
        exchange(&mut ha, &mut a).await;
        exchange(&mut hb, &mut b).await;
        // Joiner a is killed: its host socket closes, b goes on.
        drop(a);
        assert_eq!(closed(&mut ha).await, Some(1000));
        hb.send(Message::text("still here")).await.unwrap();
        assert_eq!(next(&mut b).await.unwrap(), Message::text("still here"));

        // A reconnect socket, long after the last host event: held, never paired, refused 408
        // after the hold. Meanwhile a later joiner still gets the acceptor's fresh socket.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let late_url = host_url.clone();
        let late = tokio::spawn(async move { (Instant::now(), connect(&late_url).await) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut c = connect(&join_url(&api, &id, &code).await).await.unwrap();
        assert_eq!(next(&mut c).await.unwrap(), Message::text(APPROVAL));
        let mut hc = accepted.recv().await.unwrap();
        hc.send(Message::text("fresh")).await.unwrap();
        assert_eq!(next(&mut c).await.unwrap(), Message::text("fresh"));
        let (started, late) = late.await.unwrap();
        assert_eq!(
            status_of(&late.unwrap_err()),
            Some(408),
            "the late socket is never answered 101"
        );
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert!(metric(&s.server, "host_late").await >= 1.0);
    })
    .await;
}

async fn a_host_socket_that_does_not_speak_first_is_closed_and_the_next_is_used(engine: Engine) {
    let s = start(engine, &["--relay-hold", "3s"]).await;
    let api = s.api();
    bounded_for(LIMIT, async {
        let (id, code, host_url) = relay_session(&api).await;
        let silent = connecting(&host_url);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut joiner = connect(&join_url(&api, &id, &code).await).await.unwrap();
        let mut wrong = silent.await.unwrap().unwrap();
        // A heartbeat first (as the CLI's reconnect socket does): not the acceptor's socket.
        wrong.send(binary(30, 9)).await.unwrap();
        assert_eq!(closed(&mut wrong).await, Some(1008));
        // The host's next socket (fresh: the mark moved when `wrong` was answered) pairs.
        let mut host = connect(&host_url).await.unwrap();
        host.send(Message::text("beach:status:approval_pending"))
            .await
            .unwrap();
        assert_eq!(
            next(&mut joiner).await.unwrap(),
            Message::text("beach:status:approval_pending")
        );
        exchange(&mut host, &mut joiner).await;
        assert!(metric(&s.server, "declined").await >= 1.0);
        // The host goes: its joiner is closed.
        drop(host);
        assert_eq!(closed(&mut joiner).await, Some(1000));
    })
    .await;
}

async fn a_joiner_without_a_host_is_closed_1013(engine: Engine) {
    let s = start(engine, &["--relay-joiner-wait", "1s"]).await;
    let api = s.api();
    bounded_for(LIMIT, async {
        let (id, code, _) = relay_session(&api).await;
        let started = Instant::now();
        let mut joiner = connect(&join_url(&api, &id, &code).await).await.unwrap();
        assert_eq!(closed(&mut joiner).await, Some(1013));
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert!(metric(&s.server, "joiner_timeout").await >= 1.0);
    })
    .await;
}

async fn relay_rate_and_duration_are_capped(engine: Engine) {
    let s = start(
        engine,
        &[
            "--relay-bytes-per-second",
            "200000",
            "--relay-byte-burst",
            "131072",
            "--relay-max-duration",
            "4s",
        ],
    )
    .await;
    let api = s.api();
    bounded_for(LIMIT, async {
        let (id, code, host_url) = relay_session(&api).await;
        let (mut accepted, _task) = host_loop(host_url.clone());
        let (mut host, mut joiner) = paired(&join_url(&api, &id, &code).await, &mut accepted).await;
        // 640 KiB at 200 kB/s after a 128 KiB burst: slowed to well over two seconds, not cut.
        let started = Instant::now();
        let reader = tokio::spawn(async move {
            let mut got = 0;
            while got < 20 {
                next(&mut joiner).await.unwrap();
                got += 1;
            }
            joiner
        });
        for i in 0..20u8 {
            host.send(binary(32 * 1024, i)).await.unwrap();
        }
        let mut joiner = reader.await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "paced: {:?}",
            started.elapsed()
        );
        assert!(metric(&s.server, "paced").await >= 1.0);
        // The session's relay time runs out: both closed 1008, new relay sockets refused.
        assert_eq!(closed(&mut joiner).await, Some(1008));
        let e = connect(&join_url(&api, &id, &code).await)
            .await
            .unwrap_err();
        assert_eq!(status_of(&e), Some(403));
        assert!(metric(&s.server, "limit_duration").await >= 1.0);
    })
    .await;
}

const ADMIN: &str = "admin-token-for-the-relay-tests-0123456789";

async fn admin(base: &str, method: reqwest::Method, path: &str) -> Value {
    let resp = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(ADMIN)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.json().await.unwrap()
}

async fn relay_sockets_are_members_and_waiting_ones_are_capped(engine: Engine) {
    let s = start(
        engine,
        &[
            "--admin-token",
            ADMIN,
            "--relay-max-waiting",
            "2",
            "--relay-hold",
            "5s",
        ],
    )
    .await;
    let api = s.api();
    let base = s.server.base();
    bounded_for(LIMIT, async {
        let (id, code, host_url) = relay_session(&api).await;
        let (mut accepted, _task) = host_loop(host_url.clone());
        let (mut host, mut joiner) = paired(&join_url(&api, &id, &code).await, &mut accepted).await;
        // Presence: both relay sockets are members, the host's as `server`.
        let view = admin(
            &base,
            reqwest::Method::GET,
            &format!("/admin/sessions/{id}"),
        )
        .await;
        let roles: Vec<&str> = view["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles.len(), 2, "{view}");
        assert!(
            roles.contains(&"server") && roles.contains(&"client"),
            "{view}"
        );
        // Late host upgrades (reconnects) held per session are capped: two fit, then 503.
        let mut late = Vec::new();
        for _ in 0..2 {
            late.push(connecting(&host_url));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let e = connect(&host_url).await.unwrap_err();
        assert_eq!(status_of(&e), Some(503), "{e}");
        assert!(metric(&s.server, "crowded").await >= 1.0);
        assert!(late.iter().all(|t| !t.is_finished()), "held, unanswered");
        // The operator closes the session: both relay sockets are closed.
        admin(
            &base,
            reqwest::Method::POST,
            &format!("/admin/sessions/{id}/close"),
        )
        .await;
        assert_eq!(closed(&mut joiner).await, Some(1000));
        assert_eq!(closed(&mut host).await, Some(1000));
        let e = connect(&host_url).await.unwrap_err();
        assert_eq!(status_of(&e), Some(403), "a closed session's relay is gone");
    })
    .await;
}

async fn pairs_per_session_are_capped_and_a_gone_hosts_held_sockets_go(engine: Engine) {
    let s = start(engine, &["--relay-max-pairs", "1", "--relay-hold", "20s"]).await;
    let api = s.api();
    bounded_for(LIMIT, async {
        let (id, code, host_url) = relay_session(&api).await;
        let (mut accepted, task) = host_loop(host_url.clone());
        let (mut host, mut first) = paired(&join_url(&api, &id, &code).await, &mut accepted).await;
        let mut second = connect(&join_url(&api, &id, &code).await).await.unwrap();
        assert_eq!(
            closed(&mut second).await,
            Some(1013),
            "one pair per session"
        );
        host.send(Message::text("still")).await.unwrap();
        assert_eq!(next(&mut first).await.unwrap(), Message::text("still"));
        // The host goes (its acceptor's held upgrade with it): nothing of it stays held.
        task.abort();
        drop(accepted);
        drop(host);
        assert_eq!(closed(&mut first).await, Some(1000));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Scrape::of(&s.server)
            .await
            .get("beach_road_relay_sockets", &[])
            > 0.0
        {
            assert!(
                Instant::now() < deadline,
                "a gone host's held upgrade is dropped at once"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// The CLI's reconnect for one departed joiner: a socket on the host URL, again 250 ms after
/// each refusal; a socket it gets answered sends a heartbeat (binary) first.
fn reconnect_loop(url: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match connect(&url).await {
                Ok(mut s) => {
                    let _ = s.send(binary(30, 7)).await;
                    let _ = closed(&mut s).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    })
}

/// Seen with the real CLI: a host that outlived many joiners keeps a reconnect loop per
/// departed joiner, which once took every held place and kept new joiners out (1013).
async fn reconnects_of_many_departed_joiners_never_keep_a_new_joiner_out(engine: Engine) {
    let s = start(engine, &["--relay-max-waiting", "3", "--relay-hold", "2s"]).await;
    let api = s.api();
    bounded_for(LIMIT, async {
        let (id, code, host_url) = relay_session(&api).await;
        let (mut accepted, _task) = host_loop(host_url.clone());
        let loops: Vec<_> = (0..12).map(|_| reconnect_loop(host_url.clone())).collect();
        tokio::time::sleep(Duration::from_secs(3)).await;
        for i in 0..4 {
            let started = Instant::now();
            let mut joiner = connect(&join_url(&api, &id, &code).await).await.unwrap();
            assert_eq!(
                next(&mut joiner).await.unwrap(),
                Message::text(APPROVAL),
                "joiner {i} paired with the acceptor's socket"
            );
            let mut host = accepted.recv().await.unwrap();
            host.send(Message::text(format!("hi {i}"))).await.unwrap();
            assert_eq!(
                next(&mut joiner).await.unwrap(),
                Message::text(format!("hi {i}"))
            );
            eprintln!("joiner {i} working after {:?}", started.elapsed());
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        let turned_away = metric(&s.server, "host_late").await + metric(&s.server, "crowded").await;
        assert!(
            turned_away >= 12.0,
            "reconnect sockets held or refused: {turned_away}"
        );
        for l in loops {
            l.abort();
        }
    })
    .await;
}

/// The freshness rule is a guess; when it takes the acceptor's socket for a late one (here
/// always: a 1 ms window), a joiner with no fresh socket tries the late ones, newest first,
/// and the approval check finds the acceptor's among the reconnects.
async fn an_acceptor_socket_taken_for_a_late_one_is_still_found(engine: Engine) {
    let s = start(
        engine,
        &["--relay-fresh-window", "1ms", "--relay-hold", "10s"],
    )
    .await;
    let api = s.api();
    bounded_for(LIMIT, async {
        let (id, code, host_url) = relay_session(&api).await;
        let (mut accepted, _task) = host_loop(host_url.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let loops: Vec<_> = (0..2).map(|_| reconnect_loop(host_url.clone())).collect();
        for i in 0..3 {
            let mut joiner = connect(&join_url(&api, &id, &code).await).await.unwrap();
            assert_eq!(
                next(&mut joiner).await.unwrap(),
                Message::text(APPROVAL),
                "joiner {i}"
            );
            let mut host = accepted.recv().await.unwrap();
            host.send(Message::text("ok")).await.unwrap();
            assert_eq!(next(&mut joiner).await.unwrap(), Message::text("ok"));
        }
        // The first acceptor socket came 300 ms after the registration: late, found anyway.
        assert!(metric(&s.server, "host_late").await >= 1.0);
        for l in loops {
            l.abort();
        }
    })
    .await;
}

/// A host whose held upgrade vanishes (its connection dropped mid-hold) and comes back at once:
/// the new socket is fresh, not taken for late because of the gone one's list entry.
async fn a_held_upgrade_whose_client_goes_leaves_nothing_behind(engine: Engine) {
    let s = start(engine, &["--relay-fresh-window", "5s"]).await;
    let api = s.api();
    bounded_for(LIMIT, async {
        let (id, code, host_url) = relay_session(&api).await;
        let first = connecting(&host_url);
        tokio::time::sleep(Duration::from_millis(300)).await;
        first.abort();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (mut accepted, _task) = host_loop(host_url);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metric(&s.server, "host_held").await, 2.0, "both fresh");
        assert_eq!(metric(&s.server, "host_late").await, 0.0);
        let mut joiner = connect(&join_url(&api, &id, &code).await).await.unwrap();
        assert_eq!(next(&mut joiner).await.unwrap(), Message::text(APPROVAL));
        let _host = accepted.recv().await.unwrap();
        assert_eq!(
            metric(&s.server, "declined").await,
            0.0,
            "paired at the first try"
        );
    })
    .await;
}

/// Two instances on one Redis: instance 0 takes the hosts, instance 1 the joiners.
async fn two(redis: &RedisServer) -> (Server, Server) {
    two_with(redis, &[]).await
}

/// [`two`], with `extra` flags for both.
async fn two_with(redis: &RedisServer, extra: &[&str]) -> (Server, Server) {
    let secret = format!("relay-{}-{}", uuid(), uuid());
    let start = || {
        ServerBuilder::new()
            .redis_url(&redis.url())
            .args(extra.iter().copied())
            .args([
                "--secret",
                &secret,
                "--heartbeat-interval",
                "250ms",
                "--instance-timeout",
                "1500ms",
                "--relay-hold",
                "3s",
            ])
    };
    let (a, b) = tokio::join!(start().start(), start().start());
    for s in [&a, &b] {
        for _ in 0..100 {
            if s.api().get("/ready").await.is_ok_and(|r| r.status == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    (a, b)
}

fn on(url: &str, s: &Server) -> String {
    let path = &url[url.find("/relay/").unwrap()..];
    format!("ws://127.0.0.1:{}{path}", s.port())
}

#[tokio::test]
async fn a_pair_split_across_instances_relays_and_ends_with_the_joiners_instance() {
    split_pair(Killed::Joiners).await;
}

#[tokio::test]
async fn a_pair_split_across_instances_ends_with_the_hosts_instance() {
    split_pair(Killed::Hosts).await;
}

/// Whose instance a split pair loses.
#[derive(PartialEq)]
enum Killed {
    Hosts,
    Joiners,
}

/// The host on instance 0, its joiner on instance 1; then one instance is killed: the
/// survivor's socket is closed once the dead one's members are reaped.
async fn split_pair(killed: Killed) {
    let redis = RedisServer::start();
    let (a, b) = two(&redis).await;
    bounded_for(LIMIT, async {
        let (id, code, host_url) = relay_session(&a.api()).await;
        let (mut accepted, task) = host_loop(on(&host_url, &a));
        let url = join_url(&b.api(), &id, &code).await;
        let (mut host, mut joiner) = paired(&on(&url, &b), &mut accepted).await;
        exchange(&mut host, &mut joiner).await;
        if killed == Killed::Joiners {
            // Credit across instances: the joiner reads late, nothing is lost or reordered.
            for i in 0..300u32 {
                let frame = Message::binary(i.to_be_bytes().repeat(2048));
                host.send(frame).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            for i in 0..300u32 {
                let frame = Message::binary(i.to_be_bytes().repeat(2048));
                assert_eq!(next(&mut joiner).await.unwrap(), frame);
            }
        }
        let started = Instant::now();
        let survivor = match killed {
            Killed::Joiners => {
                b.signal(libc::SIGKILL);
                &mut host
            }
            Killed::Hosts => {
                task.abort();
                a.signal(libc::SIGKILL);
                &mut joiner
            }
        };
        assert_eq!(closed(survivor).await, Some(1000));
        eprintln!(
            "survivor closed {:?} after the other instance died",
            started.elapsed()
        );
    })
    .await;
    drop((a, b));
}

/// Sockets waiting on an instance that is killed leave entries in the session's lists; once the
/// instance is written off they no longer count against `--relay-max-waiting`.
#[tokio::test]
async fn waiting_entries_of_a_killed_instance_do_not_keep_live_sockets_out() {
    let redis = RedisServer::start();
    let (a, b) = two_with(&redis, &["--relay-max-waiting", "2"]).await;
    bounded_for(LIMIT, async {
        let (id, code, host_url) = relay_session(&a.api()).await;
        let on_b: Vec<_> = (0..3).map(|_| connecting(&on(&host_url, &b))).collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            on_b.iter().all(|c| !c.is_finished()),
            "one fresh, two late, all held"
        );
        b.signal(libc::SIGKILL);
        // Written off after the instance timeout (1.5 s), reaped soon after.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let url = on(&host_url, &a);
        let mine = connecting(&url);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !mine.is_finished(),
            "held, not refused for the dead instance's entries"
        );
        let mut joiner = connect(&on(&join_url(&a.api(), &id, &code).await, &a))
            .await
            .unwrap();
        let mut host = mine.await.unwrap().expect("paired with the joiner");
        host.send(Message::text(APPROVAL)).await.unwrap();
        assert_eq!(next(&mut joiner).await.unwrap(), Message::text(APPROVAL));
    })
    .await;
    drop((a, b));
}
