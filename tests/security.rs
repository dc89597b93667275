//! Issue 7 ("safe on the open internet"), on both engines: each finding an attacker made against
//! the original, as a test that fails on it. Multi-instance and Redis-memory findings are in
//! `security_cluster.rs`; connection hygiene in `hygiene.rs`; logs in `logs.rs`; random input in
//! `fuzz.rs`.

mod common;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{find_peer, sdp, uuid, Ctx, Engine, Scope, ServerBuilder, Ws};

/// `count` requests at once; their answers in completion order.
async fn burst<F, Fut, T>(count: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = (0..count).map(|i| tokio::spawn(f(i))).collect();
    let mut out = Vec::with_capacity(count);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// `POST path` with an `X-Forwarded-For` header: status, `Retry-After`, body.
async fn post_from(base: &str, path: &str, xff: &str, body: &Value) -> (u16, Option<u64>, Value) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = client
        .post(format!("{base}{path}"))
        .header("x-forwarded-for", xff)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, retry, body)
}

/// A WebSocket whose upgrade request carries `X-Forwarded-For: xff`.
async fn ws_from(
    url: &str,
    xff: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", xff.parse().unwrap());
    let addr = url
        .strip_prefix("ws://")
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_tungstenite::client_async(req, tcp).await.unwrap().0
}

async fn next_json(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(3), ws.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("ok");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

async fn start(engine: Engine, args: &[&str]) -> Ctx {
    Ctx::start_with(engine, ServerBuilder::new().args(args.iter().copied())).await
}

/// Runs `body` on a fresh server of each engine started with `args`.
macro_rules! both {
    ($name:ident, $args:expr, |$ctx:ident| $body:block) => {
        mod $name {
            use super::*;
            async fn run($ctx: Ctx) $body
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                let ctx = start(Engine::Memory, $args).await;
                common::bounded_for(Duration::from_secs(60), run(ctx)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let ctx = start(Engine::Redis, $args).await;
                common::bounded_for(Duration::from_secs(60), run(ctx)).await;
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// #2: a joiner floods the host; then tries to take the server role.
// ---------------------------------------------------------------------------------------------

both!(flooder_is_paced_and_the_host_stays, &[], |ctx| {
    let mut room = ctx.room().await;
    let (mut witness, _) = ctx.joiner(&room.session).await;
    room.host.recv_type("peer_joined").await;
    let host_id = room.host.id();
    let witness_id = witness.id();

    // The attacker writes as fast as it can: 3,000 small signals, 40 of 60 KiB, debug requests.
    let mut attacker = room.joiner;
    let flood = {
        let host_id = host_id.clone();
        tokio::spawn(async move {
            let small = json!({"type": "signal", "to_peer": host_id, "signal": {"x": 1}});
            let big = json!({"type": "signal", "to_peer": host_id,
                             "signal": {"pad": "p".repeat(60 * 1024)}});
            let debug = json!({"type": "debug", "request": {"type": "get_stats"}});
            for i in 0..3000 {
                let msg = if i % 75 == 0 {
                    &big
                } else if i % 10 == 0 {
                    &debug
                } else {
                    &small
                };
                if !attacker.try_send(Message::text(msg.to_string())).await {
                    break;
                }
            }
            attacker
        })
    };
    // Meanwhile a witness signals the host 20 times a second; the host reads at full speed.
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut from_attacker = 0usize;
    let mut sent_at = std::collections::HashMap::new();
    let mut next = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while started.elapsed() < Duration::from_secs(4) {
        tokio::select! {
            _ = tick.tick() => {
                sent_at.insert(next, Instant::now());
                witness
                    .send_json(json!({"type": "signal", "to_peer": host_id, "signal": {"n": next}}))
                    .await;
                next += 1;
            }
            got = room.host.next(Duration::from_millis(20)) => match got {
                Ok(Some(v)) if v["type"] == "signal" => {
                    if v["from_peer"] == witness_id.as_str() {
                        let n = v["signal"]["n"].as_u64().unwrap() as u32;
                        latencies.push(sent_at[&n].elapsed());
                    } else {
                        from_attacker += 1;
                    }
                }
                Ok(_) => {}
                Err(c) => panic!("the host was disconnected by the flood: {c:?}"),
            }
        }
    }
    // The flooder was slowed to its budget (burst 200 + 50/s), not its victim cut.
    assert!(
        from_attacker <= 200 + 50 * 5,
        "{from_attacker} flood frames reached the host in ~4 s"
    );
    assert!(from_attacker > 0, "the flood is paced, not blocked");
    latencies.sort();
    assert!(
        latencies.len() >= 70,
        "witness signals lost: {}",
        latencies.len()
    );
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    assert!(p99 < Duration::from_millis(50), "witness p99 {p99:?}");

    // The attacker leaves; the room is the host's still. Rejoining, through its token or the
    // public id, it is a client; the host reconnecting is the server again.
    eprintln!("flood frames at the host in 4 s: {from_attacker}; witness p99 {p99:?}");
    let attacker = flood.await.unwrap();
    drop(attacker);
    loop {
        let v = room.host.recv_json().await;
        if v["type"] == "peer_left" {
            break;
        }
        assert_eq!(v["type"], "signal", "{v}");
    }
    let (mut back, _) = ctx.joiner(&room.session).await;
    let joined = room.host.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["role"], "client");
    let mut public = ctx.ws(&room.session.id).await;
    let ok = public.join(Some(&room.session.code)).await;
    assert_eq!(find_peer(&ok, &public.id())["role"], "client");
    room.host.close_abruptly().await;
    back.recv_type("peer_joined").await;
    back.recv_type("peer_left").await;
    let mut host = ctx.ws(&room.session.host).await;
    let ok = host.join(Some(&room.session.code)).await;
    assert_eq!(find_peer(&ok, &host.id())["role"], "server");
    let joined = back.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["role"], "server");
    // debug goes to the host again.
    back.send_json(json!({"type": "debug", "request": {"type": "get_stats"}}))
        .await;
    let got = host.recv_type("signal").await;
    assert_eq!(got["signal"]["signal_type"], "debug_request");
});

// ---------------------------------------------------------------------------------------------
// #1, #8: the mailbox acts only for the peer of the URL's token; quotas per sender.
// ---------------------------------------------------------------------------------------------

both!(mailbox_refuses_forged_and_stolen_entries, &[], |ctx| {
    let mut room = ctx.room().await;
    let (victim, victim_token) = ctx.joiner(&room.session).await;
    room.host.recv_type("peer_joined").await;
    let api = ctx.api();
    let s = &room.session;
    let (host_id, attacker_id, victim_id) = (room.host.id(), room.joiner.id(), victim.id());
    let attacker_token = &room.joiner_token;
    let scope = Scope::Sessions;
    let h = uuid();
    api.post_sdp(
        scope,
        &s.host,
        "offer",
        &sdp("offer", &h, &host_id, &victim_id),
    )
    .await
    .assert_status(204);
    // The attacker cannot take the victim's offer, through any id it knows.
    for id in [attacker_token.as_str(), s.id.as_str(), s.host.as_str()] {
        let got = api.get_offer(scope, id, &victim_id).await;
        assert_eq!(got.status, 403, "GET offer via {id}: {}", got.body);
    }
    // Nor forge an offer from the host, nor an answer from the victim.
    let forged = [
        (
            attacker_token.as_str(),
            "offer",
            sdp("offer", &uuid(), &host_id, &victim_id),
        ),
        (
            s.id.as_str(),
            "offer",
            sdp("offer", &uuid(), &host_id, &victim_id),
        ),
        (
            attacker_token.as_str(),
            "answer",
            sdp("answer", &h, &victim_id, &host_id),
        ),
        (
            s.id.as_str(),
            "answer",
            sdp("answer", &h, &victim_id, &host_id),
        ),
    ];
    for (id, kind, payload) in forged {
        let got = api.post_sdp(scope, id, kind, &payload).await;
        assert_eq!(got.status, 403, "POST {kind} via {id}: {}", got.body);
    }
    // Nor take the host's answers knowing the session id and the handshake id.
    api.post_sdp(
        scope,
        &victim_token,
        "answer",
        &sdp("answer", &h, &victim_id, &host_id),
    )
    .await
    .assert_status(204);
    for id in [attacker_token.as_str(), s.id.as_str()] {
        assert_eq!(api.get_answer(scope, id, &h).await.status, 403);
    }
    assert_eq!(
        api.get_offer(scope, &victim_token, &victim_id).await.status,
        200
    );
    assert_eq!(api.get_answer(scope, &s.host, &h).await.status, 200);

    // #1: one sender's answers are capped (8 within the mailbox ttl), then 429; the victim's
    // own answers still go through.
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let a = sdp("answer", &uuid(), &attacker_id, &host_id);
        statuses.push(
            api.post_sdp(scope, attacker_token, "answer", &a)
                .await
                .status,
        );
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 204).count(),
        8,
        "{statuses:?}"
    );
    assert!(statuses[8..].iter().all(|s| *s == 429), "{statuses:?}");
    let a = sdp("answer", &uuid(), &victim_id, &host_id);
    api.post_sdp(scope, &victim_token, "answer", &a)
        .await
        .assert_status(204);
    // Oversized payloads are refused before anything is stored.
    let mut big = sdp("answer", &uuid(), &victim_id, &host_id);
    big["sdp"] = json!("v".repeat(40 * 1024));
    assert_eq!(
        api.post_sdp(scope, &victim_token, "answer", &big)
            .await
            .status,
        413
    );

    // A peer that left can do nothing with its token any more.
    let attacker_token = attacker_token.clone();
    room.joiner.close_abruptly().await;
    let mut host = room.host;
    host.recv_type("peer_left").await;
    let a = sdp("answer", &uuid(), &attacker_id, &host_id);
    assert_eq!(
        api.post_sdp(scope, &attacker_token, "answer", &a)
            .await
            .status,
        403
    );
    assert_eq!(
        api.get_offer(scope, &attacker_token, &attacker_id)
            .await
            .status,
        403
    );
});

// ---------------------------------------------------------------------------------------------
// #3: registrations per address and in total.
// ---------------------------------------------------------------------------------------------

both!(
    registration_flood_is_limited_per_address,
    &[
        "--trusted-proxies",
        "127.0.0.1",
        "--registrations-per-minute",
        "20"
    ],
    |ctx| {
        let base = ctx.base();
        let results = burst(40, |_| {
            let base = base.clone();
            async move {
                post_from(
                    &base,
                    "/sessions",
                    "10.9.9.9",
                    &json!({"session_id": uuid()}),
                )
                .await
            }
        })
        .await;
        let ok = results
            .iter()
            .filter(|r| r.0 == 200 && r.2["success"] == true)
            .count();
        assert_eq!(ok, 20, "registrations accepted from one address");
        for (status, retry, body) in results.iter().filter(|r| r.0 != 200) {
            assert_eq!(*status, 429);
            let retry = retry.expect("Retry-After");
            assert!((1..=60).contains(&retry), "{retry}");
            assert_eq!(body["success"], false);
            assert!(
                body["message"].as_str().unwrap().contains("Too many"),
                "{body}"
            );
        }
        // Another address is not affected.
        let (status, _, body) = post_from(
            &base,
            "/sessions",
            "10.9.9.10",
            &json!({"session_id": uuid()}),
        )
        .await;
        assert_eq!((status, &body["success"]), (200, &json!(true)), "{body}");
    }
);

both!(
    registration_budget_holds_for_everyone_together,
    &[
        "--trusted-proxies",
        "127.0.0.1",
        "--registrations-per-minute-total",
        "30"
    ],
    |ctx| {
        let base = ctx.base();
        let results = burst(60, |i| {
            let base = base.clone();
            async move {
                let from = format!("10.8.{}.{}", i / 200, i % 200 + 1);
                post_from(&base, "/sessions", &from, &json!({"session_id": uuid()})).await
            }
        })
        .await;
        let ok = results.iter().filter(|r| r.0 == 200).count();
        assert_eq!(ok, 30);
        assert!(results.iter().all(|r| r.0 == 200 || r.0 == 429));
    }
);

// ---------------------------------------------------------------------------------------------
// #4, #5: code guessing is counted exactly, per address and per session; no lockout of others.
// ---------------------------------------------------------------------------------------------

both!(
    concurrent_wrong_codes_are_counted_exactly,
    &["--trusted-proxies", "127.0.0.1"],
    |ctx| {
        let s = ctx.session().await;
        let base = ctx.base();
        // One address, 600 concurrent guesses with the right code hidden among them: exactly
        // 5 are compared (the per-address limit), all others are refused unchecked.
        let wrong = if s.code == "000000" {
            "000001"
        } else {
            "000000"
        };
        let path = format!("/sessions/{}/join", s.id);
        let results = burst(600, |i| {
            let (base, path) = (base.clone(), path.clone());
            let code = if i == 300 {
                s.code.clone()
            } else {
                wrong.to_owned()
            };
            async move { post_from(&base, &path, "10.7.0.1", &json!({"passphrase": code})).await }
        })
        .await;
        let compared = results.iter().filter(|r| r.0 == 200).count();
        let locked = results.iter().filter(|r| r.0 == 429).count();
        assert_eq!(compared, 5, "codes compared from one address");
        assert_eq!(locked, 595);
        // Spread over 200 addresses (3 each), the session-wide limit holds exactly: 50.
        let s = ctx.session().await;
        let path = format!("/sessions/{}/join", s.id);
        let results = burst(600, |i| {
            let (base, path) = (base.clone(), path.clone());
            let from = format!("10.6.{}.{}", i / 3 / 100, i / 3 % 100 + 1);
            async move { post_from(&base, &path, &from, &json!({"passphrase": "zzzzzz"})).await }
        })
        .await;
        let wrong = results
            .iter()
            .filter(|r| r.0 == 200 && r.2["message"] == "Invalid passphrase")
            .count();
        assert_eq!(wrong, 50, "codes compared from everywhere");
        assert!(results.iter().all(|r| r.0 == 200 || r.0 == 429));
    }
);

both!(
    a_guesser_does_not_lock_out_others,
    &["--trusted-proxies", "127.0.0.1"],
    |ctx| {
        let (s, host) = ctx.hosted().await;
        let base = ctx.base();
        let path = format!("/sessions/{}/join", s.id);
        // The attacker's address spends its 5 tries, then is refused with Retry-After.
        for _ in 0..5 {
            let (status, _, body) =
                post_from(&base, &path, "10.5.0.66", &json!({"passphrase": "nope"})).await;
            assert_eq!(
                (status, body["message"].as_str()),
                (200, Some("Invalid passphrase"))
            );
        }
        let (status, retry, body) =
            post_from(&base, &path, "10.5.0.66", &json!({"passphrase": s.code})).await;
        assert_eq!(status, 429, "{body}");
        assert!(retry.unwrap() > 500, "{retry:?}");
        assert_eq!(body["success"], false);
        // Its WebSocket joins are refused too...
        let mut ws = ws_from(&ctx.ws_url(&s.id), "10.5.0.66").await;
        ws.send(Message::text(Ws::join_msg(Some(&s.code)).to_string()))
            .await
            .unwrap();
        let got = next_json(&mut ws).await;
        assert_eq!(got["type"], "join_error");
        assert_eq!(got["reason"], "Too many invalid codes; try again later");
        // ...while the rightful joiner, from its own address, gets in at once.
        let (status, _, body) =
            post_from(&base, &path, "10.5.0.7", &json!({"passphrase": s.code})).await;
        assert_eq!((status, &body["success"]), (200, &json!(true)), "{body}");
        // And the host, holding its token, is never locked out: reconnecting works.
        host.close_abruptly().await;
        let mut again = ctx.ws(&s.host).await;
        let ok = again.join(Some("whatever")).await;
        assert_eq!(ok["peers"][0]["role"], "server");
    }
);

// ---------------------------------------------------------------------------------------------
// #6 (part), #9: join deadline, room limit, bounded member lists.
// ---------------------------------------------------------------------------------------------

both!(
    never_joining_sockets_are_closed,
    &["--join-timeout", "1s"],
    |ctx| {
        let s = ctx.session().await;
        let mut idle = ctx.ws(&s.id).await;
        // It answers pings and even sends pings of its own: still closed, 1008, soon after 1 s.
        let started = Instant::now();
        idle.send_json(json!({"type": "ping"})).await;
        idle.recv_type("pong").await;
        let (_, closed) = idle.expect_close().await;
        assert_eq!(closed.code(), Some(1008), "{closed:?}");
        let after = started.elapsed();
        assert!(after < Duration::from_millis(2500), "{after:?}");
        // A socket that joins in time stays.
        let (_s, mut host) = ctx.hosted().await;
        host.expect_silence(Duration::from_millis(1500)).await;
    }
);

both!(
    a_room_stops_at_its_limit,
    &["--max-room-peers", "4"],
    |ctx| {
        let (s, mut host) = ctx.hosted().await;
        let mut joiners = Vec::new();
        for _ in 0..3 {
            joiners.push(ctx.joiner(&s).await.0);
            host.recv_type("peer_joined").await;
        }
        let token = ctx.api().join_token(&s.id, &s.code).await;
        let mut fifth = ctx.ws(&token).await;
        assert_eq!(fifth.join_refused(Some(&s.code)).await, "Session is full");
        host.expect_silence(Duration::from_millis(300)).await;
        // A place frees up: the next join succeeds.
        joiners.pop().unwrap().close_abruptly().await;
        host.recv_type("peer_left").await;
        fifth.join(Some(&s.code)).await;
    }
);

both!(member_lists_never_outgrow_the_socket, &[], |ctx| {
    // A full room (32) of members with the largest PeerInfo allowed: every join still gets
    // its whole member list.
    let (s, _host) = ctx.hosted().await;
    let big_meta = |n: usize| {
        let mut meta = serde_json::Map::new();
        for k in 0..3 {
            meta.insert(format!("k{k}"), json!(format!("{n}{}", "m".repeat(1000))));
        }
        Value::Object(meta)
    };
    let mut sockets = Vec::new();
    for n in 1..32 {
        let token = ctx.api().join_token(&s.id, &s.code).await;
        let mut ws = ctx.ws(&token).await;
        let mut msg = Ws::join_msg(Some(&s.code));
        msg["metadata"] = big_meta(n);
        let ok = ws.join_with(msg).await;
        assert_eq!(ok["peers"].as_array().unwrap().len(), n + 1);
        sockets.push(ws);
    }
    // Over the per-peer bound: a clear join_error, nothing else breaks.
    let token = ctx.api().join_token(&s.id, &s.code).await;
    let mut ws = ctx.ws(&token).await;
    let mut msg = Ws::join_msg(Some(&s.code));
    let mut meta = serde_json::Map::new();
    for k in 0..8 {
        meta.insert(format!("k{k}"), json!("x".repeat(1000)));
    }
    msg["metadata"] = Value::Object(meta);
    ws.send_json(msg).await;
    let got = ws.recv_type("join_error").await;
    assert!(
        got["reason"].as_str().unwrap().contains("too much"),
        "{got}"
    );
});

// ---------------------------------------------------------------------------------------------
// #10: X-Forwarded-For only from trusted proxies; remote_addr is an address we vouch for.
// ---------------------------------------------------------------------------------------------

both!(forged_forwarded_for_is_ignored, &[], |ctx| {
    let (s, mut host) = ctx.hosted().await;
    let token = ctx.api().join_token(&s.id, &s.code).await;
    let mut ws = ws_from(&ctx.ws_url(&token), "<b>admin</b>, 6.6.6.6").await;
    ws.send(Message::text(Ws::join_msg(Some(&s.code)).to_string()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "join_success");
    let joined = host.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["metadata"]["remote_addr"], "127.0.0.1");
});

both!(
    trusted_proxies_forward_a_validated_address,
    &["--trusted-proxies", "127.0.0.0/8"],
    |ctx| {
        let (s, mut host) = ctx.hosted().await;
        let mut sockets = Vec::new();
        // The client forged "6.6.6.6"; the proxy appended what it saw.
        for (xff, shown) in [
            ("6.6.6.6, 203.0.113.9", "203.0.113.9"),
            ("<b>x</b>", "127.0.0.1"),
        ] {
            let token = ctx.api().join_token(&s.id, &s.code).await;
            let mut ws = ws_from(&ctx.ws_url(&token), xff).await;
            ws.send(Message::text(Ws::join_msg(Some(&s.code)).to_string()))
                .await
                .unwrap();
            assert_eq!(next_json(&mut ws).await["type"], "join_success");
            let joined = host.recv_type("peer_joined").await;
            assert_eq!(joined["peer"]["metadata"]["remote_addr"], shown, "{xff}");
            sockets.push(ws);
        }
    }
);

both!(only_token_values_are_dropped_from_metadata, &[], |ctx| {
    let (s, mut host) = ctx.hosted().await;
    // Through the public id, a value equal to the session id is an ordinary value.
    let mut public = ctx.ws(&s.id).await;
    let mut msg = Ws::join_msg(Some(&s.code));
    msg["metadata"] = json!({"host_session_id": s.id});
    public.join_with(msg).await;
    let joined = host.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["metadata"]["host_session_id"], s.id.as_str());
    // Through a token, the token itself is never shown to the room.
    let token = ctx.api().join_token(&s.id, &s.code).await;
    let mut ws = ctx.ws(&token).await;
    let mut msg = Ws::join_msg(Some(&s.code));
    msg["metadata"] = json!({"peer_session_id": token, "label2": "kept"});
    ws.join_with(msg).await;
    let joined = host.recv_type("peer_joined").await;
    let meta = &joined["peer"]["metadata"];
    assert!(meta.get("peer_session_id").is_none(), "{meta}");
    assert_eq!(meta["label2"], "kept");
});
