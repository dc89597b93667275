//! Connection hygiene on the open internet: half-sent requests and idle keep-alive connections
//! are closed in time, idle connections cannot starve `/health`, and one address can take
//! neither every TCP connection nor every WebSocket (in-process engine; no Redis).
//!
//! Extra loopback source addresses (127.0.0.2, 127.0.0.3) stand for other hosts: Linux routes
//! all of 127/8 to `lo`, so a client socket can bind one and reach the server on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::WebSocketStream;

use common::{bounded, bounded_for, Server, ServerBuilder, Ws};

const SHORT: [&str; 4] = ["--header-read-timeout", "1s", "--http-idle-timeout", "2s"];

/// A TCP connection to the server from loopback address `from`.
async fn connect_from(from: &str, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{from}:0").parse().unwrap())
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    tokio::time::timeout(common::WAIT, socket.connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// Reads (and discards) until the server closes; how long that took, or `None` if the
/// connection is still open after `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    let read_until_closed = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return t0.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_until_closed).await.ok()
}

/// Sends `GET /health` and reads the whole response (its status line and body).
async fn get_health(tcp: &mut TcpStream) -> String {
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let n = tcp.read(&mut buf).await.expect("read the response");
            assert!(n > 0, "closed before the response: {got:?}");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .expect("content-length");
                if body.len() >= len {
                    return text.into_owned();
                }
            }
        }
    };
    tokio::time::timeout(common::WAIT, read)
        .await
        .expect("no response")
}

/// How an upgrade was refused: status, `Retry-After`, JSON body.
#[derive(Debug)]
struct Refusal {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

/// A WebSocket upgrade to `/ws/{id}`, with an `X-Forwarded-For` header if given.
async fn upgrade(
    server: &Server,
    id: &str,
    forwarded_for: Option<&str>,
) -> Result<WebSocketStream<TcpStream>, Refusal> {
    let mut req = server.ws_url(id).into_client_request().unwrap();
    if let Some(xff) = forwarded_for {
        req.headers_mut()
            .insert("x-forwarded-for", xff.parse().unwrap());
    }
    let attempt = async {
        let tcp = TcpStream::connect(("127.0.0.1", server.port()))
            .await
            .unwrap();
        tokio_tungstenite::client_async(req, tcp).await
    };
    match tokio::time::timeout(common::WAIT, attempt).await {
        Err(_) => panic!("upgrade timed out"),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(WsError::Http(resp))) => Err(Refusal {
            status: resp.status().as_u16(),
            retry_after: resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned()),
            body: resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null),
        }),
        Ok(Err(e)) => panic!("upgrade failed: {e}"),
    }
}

#[track_caller]
fn assert_429(r: Result<WebSocketStream<TcpStream>, Refusal>, what: &str) -> Refusal {
    let refusal = match r {
        Ok(_) => panic!("{what}: upgraded, expected 429"),
        Err(refusal) => refusal,
    };
    assert_eq!(refusal.status, 429, "{what}: {refusal:?}");
    assert!(refusal.retry_after.is_some(), "{what}: no Retry-After");
    assert!(refusal.body["error"].is_string(), "{what}: {refusal:?}");
    refusal
}

fn id() -> String {
    common::uuid()
}

// ---------------------------------------------------------------------------------------------
// HTTP timeouts
// ---------------------------------------------------------------------------------------------

/// A request whose head never ends, one that dribbles a byte at a time, and a connection that
/// sends nothing are all closed after the header-read timeout (1 s), not held forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_request_is_closed() {
    let server = Server::builder().args(SHORT).start().await;
    bounded(async {
        let mut half = connect_from("127.0.0.1", server.port()).await;
        half.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n")
            .await
            .unwrap();
        let mut silent = connect_from("127.0.0.1", server.port()).await;
        let mut dribble = connect_from("127.0.0.1", server.port()).await;
        // One byte every 100 ms: each read is progress, but the head never ends.
        let dribbling = async {
            let t0 = Instant::now();
            let (mut rd, mut wr) = dribble.split();
            let write = async {
                for b in b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: "
                    .iter()
                    .cycle()
                {
                    if wr.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                std::future::pending::<()>().await
            };
            let mut buf = [0u8; 256];
            let closed = async {
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = write => {}
                _ = closed => {}
            }
            t0.elapsed()
        };
        let (half, silent, dribble) = tokio::join!(
            closed_within(&mut half, Duration::from_secs(4)),
            closed_within(&mut silent, Duration::from_secs(4)),
            async {
                tokio::time::timeout(Duration::from_secs(4), dribbling)
                    .await
                    .ok()
            },
        );
        eprintln!(
            "header-read timeout 1s: closed after: half-sent {half:?}, silent {silent:?}, \
             dribbling {dribble:?}"
        );
        for (what, t) in [
            ("half-sent", half),
            ("silent", silent),
            ("dribbling", dribble),
        ] {
            let t = t.unwrap_or_else(|| panic!("{what} connection still open after 4 s"));
            assert!(
                t >= Duration::from_millis(800),
                "{what} closed too early: {t:?}"
            );
            assert!(
                t <= Duration::from_millis(1800),
                "{what} closed late: {t:?}"
            );
        }
        assert_eq!(server.health().await.map(|h| h.0), Some(200));
    })
    .await;
}

/// After a response the connection may idle past the header-read timeout and send another
/// request; idle past the idle timeout (2 s), it is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_is_closed() {
    let server = Server::builder().args(SHORT).start().await;
    bounded(async {
        let mut tcp = connect_from("127.0.0.1", server.port()).await;
        assert!(get_health(&mut tcp).await.starts_with("HTTP/1.1 200"));
        // Longer than the header-read timeout: idle time is not head time.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(get_health(&mut tcp).await.starts_with("HTTP/1.1 200"));
        let closed = closed_within(&mut tcp, Duration::from_secs(5)).await;
        eprintln!("http idle timeout 2s: idle keep-alive closed after {closed:?}");
        let t = closed.expect("idle keep-alive connection still open after 5 s");
        assert!(t >= Duration::from_millis(1800), "closed too early: {t:?}");
        assert!(t <= Duration::from_millis(2800), "closed late: {t:?}");
    })
    .await;
}

/// A trusted proxy (the load balancer) keeps idle backend connections for longer than our idle
/// timeout (ALB: 3600 s); closing them ourselves would race its next request into a 502, so a
/// proxy's connections get `--proxy-idle-timeout` instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_keeps_its_idle_connections() {
    let server = Server::builder()
        .args(SHORT)
        .args([
            "--trusted-proxies",
            "127.0.0.1",
            "--proxy-idle-timeout",
            "4s",
        ])
        .start()
        .await;
    bounded(async {
        let mut proxy = connect_from("127.0.0.1", server.port()).await;
        let mut direct = connect_from("127.0.0.2", server.port()).await;
        assert!(get_health(&mut proxy).await.starts_with("HTTP/1.1 200"));
        assert!(get_health(&mut direct).await.starts_with("HTTP/1.1 200"));
        let closed = closed_within(&mut direct, Duration::from_secs(5)).await;
        assert!(
            closed.is_some(),
            "a direct client's idle connection is closed"
        );
        // Past the plain idle timeout (2 s) the proxy's connection still serves.
        assert!(get_health(&mut proxy).await.starts_with("HTTP/1.1 200"));
        let closed = closed_within(&mut proxy, Duration::from_secs(6)).await;
        let t = closed.expect("closed at the proxy idle timeout");
        assert!(t >= Duration::from_millis(3500), "closed too early: {t:?}");
    })
    .await;
}

/// The original failure: idle connections filled every TCP slot (the WebSocket cap plus the
/// headroom kept for HTTP) and `/health` failed for as long as they were held. Now the
/// timeouts free the slots while the client still holds its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_starve_health() {
    const IDLE: usize = 150;
    let server = Server::builder()
        .args(SHORT)
        .args(["--max-connections", "40"])
        .start()
        .await;
    bounded(async {
        let mut held = Vec::new();
        for _ in 0..IDLE {
            held.push(connect_from("127.0.0.1", server.port()).await);
        }
        // Every slot (40 + 32) is taken now, the rest wait in the backlog.
        let t0 = Instant::now();
        let mut first_ok = None;
        while t0.elapsed() < Duration::from_secs(6) {
            let probe = tokio::time::timeout(Duration::from_millis(500), server.health()).await;
            if let Ok(Some((200, _))) = probe {
                first_ok = Some(t0.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let closing = held
            .iter_mut()
            .map(|tcp| closed_within(tcp, Duration::from_secs(6)));
        let closed = futures::future::join_all(closing).await;
        let all = closed.iter().flatten().max();
        eprintln!(
            "{IDLE} idle connections, TCP cap 72: /health 200 after {first_ok:?}; server closed \
             {} of them, the last after {all:?} (from the probe loop's end)",
            closed.iter().flatten().count()
        );
        let first_ok = first_ok.expect("/health never answered 200 while idle connections held");
        assert!(first_ok <= Duration::from_secs(4), "{first_ok:?}");
        assert!(
            closed.iter().all(Option::is_some),
            "some idle connections were never closed"
        );
    })
    .await;
}

/// One directly connected host keeps at most `--max-connections-per-address` connections;
/// the rest are closed at once, and `/health` from another address is served meanwhile. A
/// trusted proxy is not capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    let server = Server::builder()
        .args([
            "--max-connections",
            "40",
            "--max-connections-per-address",
            "20",
        ])
        .args(["--trusted-proxies", "127.0.0.3"])
        .start()
        .await;
    bounded(async {
        let mut flood = Vec::new();
        for _ in 0..100 {
            flood.push(connect_from("127.0.0.2", server.port()).await);
        }
        let checks = flood
            .iter_mut()
            .map(|tcp| closed_within(tcp, Duration::from_millis(1000)));
        let open = futures::future::join_all(checks)
            .await
            .iter()
            .filter(|c| c.is_none())
            .count();
        let t0 = Instant::now();
        let health = server.health().await.map(|h| h.0);
        eprintln!(
            "100 connections from one address: {open} kept, /health {health:?} in {:?}",
            t0.elapsed()
        );
        assert_eq!(open, 20, "connections kept from one address");
        assert_eq!(health, Some(200));

        let mut proxy = Vec::new();
        for _ in 0..40 {
            proxy.push(connect_from("127.0.0.3", server.port()).await);
        }
        let checks = proxy
            .iter_mut()
            .map(|tcp| closed_within(tcp, Duration::from_millis(500)));
        let closed = futures::future::join_all(checks)
            .await
            .iter()
            .filter(|c| c.is_some())
            .count();
        assert_eq!(closed, 0, "connections from a trusted proxy were closed");
        drop(flood);
    })
    .await;
}

/// An upgraded WebSocket is not an HTTP connection any more: silent past both HTTP timeouts,
/// it still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_outlives_http_timeouts() {
    let server = Server::builder().args(SHORT).start().await;
    bounded(async {
        let session = server.api().new_session(None).await;
        let mut ws = Ws::connect(&server.ws_url(&session.id)).await;
        ws.expect_silence(Duration::from_millis(3500)).await;
        ws.join(Some(&session.code)).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Per-address WebSocket limits
// ---------------------------------------------------------------------------------------------

/// The 6th WebSocket of one client gets 429 while another client behind the same trusted proxy
/// still upgrades; a closed socket gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_per_address_are_capped() {
    let server = ServerBuilder::new()
        .args([
            "--max-sockets-per-address",
            "5",
            "--trusted-proxies",
            "127.0.0.1",
        ])
        .start()
        .await;
    bounded(async {
        let room = id();
        let mut mine = Vec::new();
        for _ in 0..5 {
            mine.push(upgrade(&server, &room, None).await.expect("within the cap"));
        }
        let refusal = assert_429(upgrade(&server, &room, None).await, "6th from 127.0.0.1");
        eprintln!("6th WebSocket from one address: {refusal:?}");
        let mut theirs = Vec::new();
        for _ in 0..5 {
            let ws = upgrade(&server, &room, Some("10.1.2.3")).await;
            theirs.push(ws.expect("another client behind the proxy"));
        }
        assert_429(
            upgrade(&server, &room, Some("10.1.2.3")).await,
            "6th from 10.1.2.3",
        );

        // One of mine goes (TCP close): its place frees once the server has seen it.
        let gone = mine.pop().unwrap();
        drop(gone);
        let t0 = Instant::now();
        let again = loop {
            match upgrade(&server, &room, None).await {
                Ok(ws) => break ws,
                Err(r) if r.status == 429 && t0.elapsed() < Duration::from_secs(3) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(r) => panic!("place not given back after a close: {r:?}"),
            }
        };
        eprintln!("place given back {:?} after a close", t0.elapsed());
        drop((again, mine, theirs));
    })
    .await;
}

/// Upgrades from one address are paced (burst 5, 5 per second here); another address is not
/// affected, and the bucket refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_per_address_are_rate_limited() {
    let server = ServerBuilder::new()
        .args([
            "--upgrades-per-address",
            "5",
            "--trusted-proxies",
            "127.0.0.1",
        ])
        .start()
        .await;
    bounded(async {
        let room = id();
        let (mut upgraded, mut refused) = (0, 0);
        for _ in 0..10 {
            match upgrade(&server, &room, None).await {
                Ok(ws) => {
                    upgraded += 1;
                    drop(ws);
                }
                Err(r) => {
                    assert_429(Err(r), "rate");
                    refused += 1;
                }
            }
        }
        eprintln!("10 quick upgrades at 5/s: {upgraded} upgraded, {refused} refused");
        assert!((5..=6).contains(&upgraded), "upgraded {upgraded} of 10");
        upgrade(&server, &room, Some("10.1.2.3"))
            .await
            .expect("another address is not limited");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        upgrade(&server, &room, None)
            .await
            .expect("the bucket refills");
    })
    .await;
}

/// Without `--trusted-proxies`, `X-Forwarded-For` is the client's own claim: every socket counts
/// against the TCP peer, whatever it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_forwarded_for_is_ignored() {
    let server = ServerBuilder::new()
        .args(["--max-sockets-per-address", "3"])
        .start()
        .await;
    bounded_for(Duration::from_secs(15), async {
        let room = id();
        let mut held = Vec::new();
        for i in 1..=3 {
            let xff = format!("10.0.0.{i}");
            held.push(
                upgrade(&server, &room, Some(&xff))
                    .await
                    .expect("within the cap"),
            );
        }
        assert_429(
            upgrade(&server, &room, Some("10.0.0.4")).await,
            "forged 4th",
        );
        assert_429(upgrade(&server, &room, None).await, "4th without header");
        drop(held);
    })
    .await;
}
