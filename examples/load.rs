//! Load generator behind `scripts/bench`: drives running beach-road instances over loopback and
//! prints figures. It never decides pass or fail; the numbers go into notes and docs.
//!
//! ```text
//! load relay  <base-host> <base-joiner> <signals>      # latency / throughput of signal relay
//! load idle   <base> <sockets> <server-pid>            # resident memory per joined idle socket
//! load flood  <base> <signals> <server-pid>            # memory bound with a peer that stops reading
//! ```
//! `<base>` is `http://127.0.0.1:PORT`; host and joiner may be on different instances.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Signals in flight at most in `relay`.
const WINDOW: usize = 100;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let run = async {
        match arg(0).as_str() {
            "relay" => relay(&arg(1), &arg(2), arg(3).parse().unwrap_or(10_000)).await,
            "idle" => idle(&arg(1), arg(2).parse().unwrap_or(2000), &arg(3)).await,
            "flood" => flood(&arg(1), arg(2).parse().unwrap_or(20_000), &arg(3)).await,
            _ => eprintln!("usage: see the module docs of examples/load.rs"),
        }
    };
    if tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .is_err()
    {
        eprintln!("load: gave up after 300 s");
        std::process::exit(1);
    }
}

async fn register(base: &str) -> (String, String) {
    let id = uuid::Uuid::new_v4().to_string();
    let body = json!({ "session_id": id, "passphrase": null }).to_string();
    let reply = http(base, "POST", "/sessions", &body).await;
    let v: Value = serde_json::from_str(&reply).expect("register answer");
    (id, v["join_code"].as_str().expect("join code").to_owned())
}

/// A minimal HTTP/1.1 client (one request per connection) so the benchmark needs no extra crate.
async fn http(base: &str, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

async fn join(base: &str, session: &str, code: &str) -> (Ws, String) {
    let url = format!("{}/ws/{session}", base.replacen("http", "ws", 1));
    // Nagle plus delayed ACKs would add ~40 ms stalls to the client side of the figures.
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .expect("ws");
    let msg = json!({"type":"join","peer_id":"bench","passphrase":code,"supported_transports":["webrtc"]});
    ws.send(Message::Text(msg.to_string().into()))
        .await
        .unwrap();
    loop {
        let v = next_json(&mut ws).await;
        if v["type"] == "join_success" {
            return (ws, v["peer_id"].as_str().unwrap().to_owned());
        }
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await.expect("socket open").expect("frame") {
            Message::Text(t) => return serde_json::from_str(&t).expect("json"),
            Message::Binary(b) => return serde_json::from_slice(&b).expect("json"),
            _ => continue,
        }
    }
}

/// Host sends `n` signals to the joiner, each stamped; the joiner measures one-way latency
/// (same machine, same clock) and the whole run's throughput.
async fn relay(host_base: &str, joiner_base: &str, n: usize) {
    let (session, code) = register(host_base).await;
    let (mut host, _) = join(host_base, &session, &code).await;
    let (mut joiner, joiner_id) = join(joiner_base, &session, &code).await;
    let _peer_joined = next_json(&mut host).await;
    let origin = Instant::now();
    let received = Arc::new(AtomicUsize::new(0));
    let seen = received.clone();
    let receiver = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            let v = next_json(&mut joiner).await;
            if let Some(sent) = v["signal"]["t"].as_u64() {
                lat.push(origin.elapsed().as_micros() as u64 - sent);
                seen.fetch_add(1, Ordering::Relaxed);
            }
        }
        lat
    });
    let start = Instant::now();
    // Closed loop: at most WINDOW signals in flight, so the run measures relay and stays
    // below the server's per-peer queue bound (an open-loop flood is `flood`'s job).
    for i in 0..n {
        while i - received.load(Ordering::Relaxed) >= WINDOW {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let t = origin.elapsed().as_micros() as u64;
        let msg = json!({"type":"signal","to_peer":joiner_id,"signal":{"t":t,"candidate":"candidate:1 1 udp 2130706431 10.0.0.1 5000 typ host"}});
        host.send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
    }
    let mut lat = receiver.await.expect("receiver");
    let elapsed = start.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "relay: {n} signals in {:.2} s = {:.0}/s; latency ms p50 {:.2} p99 {:.2} max {:.2}",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
}

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `n` sockets join one room each pair and stay idle; resident memory per socket.
async fn idle(base: &str, n: usize, pid: &str) {
    let before = rss_kib(pid);
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n / 2 {
        let (session, code) = register(base).await;
        sockets.push(join(base, &session, &code).await.0);
        sockets.push(join(base, &session, &code).await.0);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    println!(
        "idle: {} joined sockets: RSS +{} KiB = {:.1} KiB per socket",
        sockets.len(),
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / sockets.len() as f64
    );
}

/// The joiner stops reading; the host sends `n` 1 KiB signals. Prints the server's peak RSS
/// growth and what became of the flood: relayed frames beyond the reader's queue share are
/// refused to their sender (`error`), and the reader is not cut off for them.
async fn flood(base: &str, n: usize, pid: &str) {
    let (session, code) = register(base).await;
    let (mut host, _) = join(base, &session, &code).await;
    let (joiner, joiner_id) = join(base, &session, &code).await;
    let _peer_joined = next_json(&mut host).await;
    let before = rss_kib(pid);
    let mut peak = before;
    let pad = "x".repeat(1024);
    let mut kicked_at = None;
    let mut refused = 0usize;
    for i in 0..n {
        let msg = json!({"type":"signal","to_peer":joiner_id,"signal":{"pad":pad}});
        if host
            .send(Message::Text(msg.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
        if i % 500 == 0 {
            peak = peak.max(rss_kib(pid));
            // Drain the host's own replies (an `error` once the joiner is gone).
            while let Ok(Some(Ok(Message::Text(t)))) =
                tokio::time::timeout(Duration::from_millis(1), host.next()).await
            {
                if kicked_at.is_none() && t.contains("peer_left") {
                    kicked_at = Some(i);
                }
                if t.contains("not keeping up") {
                    refused += 1;
                }
            }
        }
    }
    peak = peak.max(rss_kib(pid));
    drop(joiner);
    println!(
        "flood: {n} x 1 KiB signals to a peer that never reads: server RSS peak +{} KiB; \
         sender told 'not keeping up' {refused}+ times; reader {}",
        peak.saturating_sub(before),
        match kicked_at {
            Some(i) => format!("disconnected (peer_left seen after ~{i} signals)"),
            None => "kept".into(),
        }
    );
}
