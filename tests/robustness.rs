//! Robustness (issue 4): the ways the original server froze or ballooned, each reproduced against
//! the real binary on both engines (memory and a private redis-server), and shown impossible.
//!
//! - `hang_reproduction`: hundreds of clients join, send `debug` requests and signals to the
//!   room's server peer and vanish with a TCP reset, while `/health` is probed every 200 ms with a
//!   2 s timeout; `_unread_stdout`: the same with stdout a pipe nobody reads and debug logging
//!   (plus the WebSocket library traced, so the log writer's 16 Ki-line buffer overflows too).
//! - `slow_consumer_relayed_flood`: a host that stops reading is flooded with 1 KiB signals by a
//!   joiner: what it cannot take is refused to the sender, each signal reported, and the host is
//!   not cut off.
//! - `slow_consumer_control_frames`: a peer that stops reading while members come and go falls
//!   behind on the server's own room events: it is disconnected (1008), the room is told.
//! - `idle_peers_vanish`: joined peers that stop answering anything (no FIN) are reaped.
//! - `fd_limit`: the server under `prlimit --nofile=1024:1024` and more clients than that.
//! - `descriptor_table_sized_at_start`: the descriptor table holds every socket from the start.
//! - `redis_slow_and_unreachable`: Redis stalled (`CLIENT PAUSE ALL`), then killed.
//!
//! The tests of this file run one at a time (they measure latency and memory, and load the two
//! cores), each bounded in time; every process they start is killed on drop. The figures they
//! measure are printed on stderr (`cargo test --test robustness -- --nocapture` shows them).

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use common::{Api, Ctx, Engine, RedisServer, Server, Stdout, Ws, UNPACED, WAIT};

/// The tests of this file measure latencies and memory: they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs one test body alone (see [`SERIAL`]), bounded by `limit`.
async fn run(limit: Duration, body: impl Future<Output = ()>) {
    let _alone = SERIAL.lock().await;
    common::bounded_for(limit, body).await
}

/// `name(engine)` as `memory::name` and `redis::name`.
macro_rules! on_both_engines {
    ($($name:ident => $secs:literal s;)*) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(std::time::Duration::from_secs($secs), super::$name(super::Engine::Memory)).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(std::time::Duration::from_secs($secs), super::$name(super::Engine::Redis)).await;
                }
            )*
        }
    };
}

on_both_engines! {
    hang_reproduction => 60 s;
    hang_reproduction_unread_stdout => 60 s;
    slow_consumer_relayed_flood => 60 s;
    slow_consumer_control_frames => 60 s;
    idle_peers_vanish => 30 s;
    fd_limit => 60 s;
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Interval and timeout of the `/health` probes (the issue's figures).
const PROBE_EVERY: Duration = Duration::from_millis(200);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Probes {
    count: usize,
    failures: Vec<String>,
    max: Duration,
}

/// Probes `GET /health` in the background, each on a new connection (as a load balancer does).
struct Prober {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Probes>,
}

impl Prober {
    fn start(base: &str, every: Duration) -> Prober {
        let client = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .expect("http client");
        let url = format!("{base}/health");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut probes = Probes::default();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stopped.load(Ordering::Relaxed) {
                tick.tick().await;
                let t0 = Instant::now();
                let answer = tokio::time::timeout(PROBE_TIMEOUT, async {
                    let resp = client.get(&url).send().await?;
                    let status = resp.status().as_u16();
                    let body = resp.text().await?;
                    Ok::<_, reqwest::Error>((status, body))
                })
                .await;
                let took = t0.elapsed();
                probes.count += 1;
                probes.max = probes.max.max(took);
                match answer {
                    Ok(Ok((200, _))) => {}
                    Ok(Ok((status, body))) => probes
                        .failures
                        .push(format!("{status} after {took:?}: {body}")),
                    Ok(Err(e)) => probes.failures.push(format!("{e} after {took:?}")),
                    Err(_) => probes.failures.push(format!("no answer within {took:?}")),
                }
            }
            probes
        });
        Prober { stop, task }
    }

    async fn finish(self) -> Probes {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(PROBE_EVERY + PROBE_TIMEOUT * 2, self.task)
            .await
            .expect("the prober did not stop")
            .expect("the prober panicked")
    }
}

/// `GET /health`, which must answer 200; the JSON report.
async fn health(api: &Api) -> Value {
    let r = api.get_ok("/health").await;
    r.assert_status(200);
    r.body
}

async fn local_peers(api: &Api) -> u64 {
    let h = health(api).await;
    h["local_peers"]
        .as_u64()
        .unwrap_or_else(|| panic!("no local_peers in {h}"))
}

/// Waits (bounded) until `/health` reports `want` local sockets; returns how long it took.
async fn wait_local_peers(api: &Api, want: u64, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let n = local_peers(api).await;
        if n == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "local_peers still {n} after {within:?}, expected {want} (socket leak?)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A numeric field of /proc/PID/status: `VmRSS`, `VmHWM` (in KiB), `FDSize` (slots).
fn proc_status(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

type Raw = WebSocketStream<TcpStream>;

/// A WebSocket client with direct access to the stream (to split it, or to stop reading it).
/// `recv_buffer`: SO_RCVBUF, set before connecting so the window stays small.
async fn raw_ws(url: &str, recv_buffer: Option<u32>) -> Raw {
    let addr: SocketAddr = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not a ws://IP:PORT url: {url}"));
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(n) = recv_buffer {
        socket.set_recv_buffer_size(n).expect("SO_RCVBUF");
    }
    let connect = async {
        let tcp = socket.connect(addr).await.expect("connect");
        tcp.set_nodelay(true).unwrap();
        tokio_tungstenite::client_async(url, tcp)
            .await
            .expect("WebSocket handshake")
            .0
    };
    tokio::time::timeout(WAIT, connect)
        .await
        .unwrap_or_else(|_| panic!("connect to {url} timed out"))
}

#[derive(Debug)]
enum Got {
    Msg(Value),
    /// Closed: the close code if a close frame came, else how it ended.
    Closed(Result<u16, String>),
    Nothing,
}

/// The next JSON message of a raw client within `within` (pings and pongs skipped).
async fn raw_next<S>(ws: &mut S, within: Duration) -> Got
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Got::Nothing,
            Ok(None) => return Got::Closed(Err("EOF".into())),
            Ok(Some(Err(e))) => return Got::Closed(Err(e.to_string())),
            Ok(Some(Ok(Message::Text(t)))) => {
                return Got::Msg(serde_json::from_str(&t).expect("JSON from the server"))
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Got::Closed(frame.map(|f| f.code.into()).ok_or_else(|| "no code".into()))
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Joins with `code`; returns the server-assigned peer id.
async fn raw_join(ws: &mut Raw, code: &str) -> String {
    ws.send(Message::text(Ws::join_msg(Some(code)).to_string()))
        .await
        .expect("send join");
    match raw_next(ws, WAIT).await {
        Got::Msg(v) if v["type"] == "join_success" => v["peer_id"].as_str().unwrap().to_owned(),
        other => panic!("join failed: {other:?}"),
    }
}

/// The next message of type `ty` (others skipped), within `within`.
async fn raw_expect<S>(ws: &mut S, ty: &str, within: Duration) -> Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match raw_next(ws, left).await {
            Got::Msg(v) if v["type"] == ty => return v,
            Got::Msg(_) => continue,
            other => panic!("waiting for `{ty}`: {other:?}"),
        }
    }
}

/// What a room's host saw.
#[derive(Debug, Default)]
struct HostView {
    joined: HashSet<String>,
    left: HashSet<String>,
    /// When each peer_left arrived.
    left_at: Vec<(String, Instant)>,
    debug_requests: usize,
    signals: usize,
    errors: Vec<Value>,
    closed: Option<String>,
}

impl HostView {
    fn record(&mut self, v: Value) {
        match v["type"].as_str().unwrap_or("") {
            "peer_joined" => {
                self.joined
                    .insert(v["peer"]["id"].as_str().unwrap().to_owned());
            }
            "peer_left" => {
                let id = v["peer_id"].as_str().unwrap().to_owned();
                self.left_at.push((id.clone(), Instant::now()));
                self.left.insert(id);
            }
            "signal" if v["signal"]["transport_name"] == "debug" => {
                assert_eq!(v["signal"]["signal_type"], "debug_request", "{v}");
                assert_eq!(
                    v["signal"]["payload"]["from_peer"], v["from_peer"],
                    "debug request from the wrong peer: {v}"
                );
                self.debug_requests += 1;
            }
            "signal" => self.signals += 1,
            "error" => self.errors.push(v),
            _ => {}
        }
    }
}

/// Reads the host's socket in the background (it must keep reading, as a real host does, and
/// so answers protocol pings) until `expected_left` peers have left or `within` passes.
fn watch_host(
    mut host: Ws,
    expected_left: usize,
    within: Duration,
) -> tokio::task::JoinHandle<(Ws, HostView)> {
    tokio::spawn(async move {
        let mut view = HostView::default();
        let deadline = Instant::now() + within;
        while view.left.len() < expected_left && Instant::now() < deadline {
            match host.next(Duration::from_millis(200)).await {
                Ok(Some(v)) => view.record(v),
                Ok(None) => {}
                Err(c) => {
                    view.closed = Some(format!("{c:?}"));
                    break;
                }
            }
        }
        (host, view)
    })
}

/// `ping` → `pong` on a harness socket (other messages skipped): proves it is still served.
async fn still_served(ws: &mut Ws) {
    ws.send_json(json!({ "type": "ping" })).await;
    loop {
        match ws.next(WAIT).await {
            Ok(Some(v)) if v["type"] == "pong" => return,
            Ok(Some(_)) => continue,
            other => panic!("no pong: {other:?}"),
        }
    }
}

/// A client that speaks just enough WebSocket over raw TCP to upgrade and join, and then is
/// silent: it never reads, never answers a ping, never closes (a frozen process). Reading its
/// socket afterwards shows exactly what the server sent (tungstenite would try to answer the
/// pings when read, and fail on the closed socket before reporting the close frame).
struct SilentPeer {
    tcp: TcpStream,
}

impl SilentPeer {
    async fn connect(addr: SocketAddr, id: &str) -> SilentPeer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "GET /ws/{id} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        // The 101 response, byte by byte so that nothing after it is consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(tcp.read_u8().await.expect("upgrade response"));
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        SilentPeer { tcp }
    }

    /// Sends one masked text frame.
    async fn send(&mut self, text: &str) {
        use tokio::io::AsyncWriteExt;
        let payload = text.as_bytes();
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = vec![0x81];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp.write_all(&frame).await.unwrap();
    }

    /// The next message the server sent: (opcode, payload), its fragments (RFC 6455 §5.4: the
    /// server writes large texts in pieces) put together; `None` at EOF.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let (fin, op, mut payload) = self.one_frame().await?;
        let mut last = fin;
        while !last {
            let (fin, cont, more) = self.one_frame().await?;
            assert_eq!(cont, 0, "a continuation follows a fragment");
            payload.extend_from_slice(&more);
            last = fin;
        }
        Some((op, payload))
    }

    /// One frame: (fin, opcode, payload).
    async fn one_frame(&mut self) -> Option<(bool, u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let b0 = self.tcp.read_u8().await.ok()?;
        let b1 = self.tcp.read_u8().await.ok()?;
        assert_eq!(b1 & 0x80, 0, "server frames are not masked");
        let len = match b1 & 0x7f {
            126 => self.tcp.read_u16().await.ok()? as usize,
            127 => self.tcp.read_u64().await.ok()? as usize,
            n => n as usize,
        };
        let mut payload = vec![0; len];
        self.tcp.read_exact(&mut payload).await.ok()?;
        Some((b0 & 0x80 != 0, b0 & 0x0f, payload))
    }

    /// Joins; returns the assigned peer id.
    async fn join(&mut self, code: &str) -> String {
        self.send(&Ws::join_msg(Some(code)).to_string()).await;
        let (op, payload) = self.frame().await.expect("join reply");
        assert_eq!(op, 1);
        let v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["type"], "join_success", "{v}");
        v["peer_id"].as_str().unwrap().to_owned()
    }

    /// Reads to the end: the pings received and the close code (`None`: no close frame).
    async fn until_closed(&mut self) -> (usize, Option<u16>) {
        let mut pings = 0;
        loop {
            match self.frame().await {
                Some((0x9, _)) => pings += 1,
                Some((0x8, p)) if p.len() >= 2 => {
                    return (pings, Some(u16::from_be_bytes([p[0], p[1]])))
                }
                Some((0x8, _)) | None => return (pings, None),
                Some(_) => {} // messages about the other peers
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The hang reproduction
// ---------------------------------------------------------------------------------------------

const WAVES: usize = 8;
const PER_WAVE: usize = 50;
/// Every `NO_JOIN`-th client resets right after the upgrade, without joining.
const NO_JOIN: usize = 5;

/// One client: joins, sends a `debug` request and a signal to the server peer, makes sure they
/// were handled (`ping` → `pong`, answered in order), then resets the TCP connection (no close
/// frame, no FIN). Returns its peer id if it joined.
async fn hit_and_run(url: String, code: String, host: String, join: bool) -> Option<String> {
    let mut ws = Ws::connect(&url).await;
    if !join {
        ws.reset().await;
        return None;
    }
    ws.join(Some(&code)).await;
    ws.send_json(json!({ "type": "debug", "request": { "type": "get_stats" } }))
        .await;
    ws.send_json(json!({ "type": "signal", "to_peer": host,
        "signal": { "candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host" } }))
        .await;
    ws.send_json(json!({ "type": "ping" })).await;
    loop {
        match ws.next(WAIT).await {
            Ok(Some(v)) if v["type"] == "pong" => break,
            Ok(Some(v)) if v["type"] == "error" => panic!("error reply: {v}"),
            Ok(Some(_)) => continue, // peer_joined / peer_left of the others
            other => panic!("no pong: {other:?}"),
        }
    }
    let id = ws.id();
    ws.reset().await;
    Some(id)
}

async fn hang_reproduction(engine: Engine) {
    hang(engine, Stdout::File).await
}

async fn hang_reproduction_unread_stdout(engine: Engine) {
    hang(engine, Stdout::UnreadPipe).await
}

async fn hang(engine: Engine, stdout: Stdout) {
    let builder = match stdout {
        Stdout::File => Server::builder(),
        // Debug level, and every frame of the WebSocket library traced: the pipe (64 KiB) fills
        // at once, then the log writer's buffer (16 Ki lines). At debug level alone the server
        // writes about one line per abrupt disconnect (as it should: no error for an ordinary
        // disconnect), too few to fill that buffer with a few hundred clients.
        Stdout::UnreadPipe => Server::builder()
            .stdout(Stdout::UnreadPipe)
            .env("RUST_LOG", "debug,tokio_tungstenite=trace"),
    };
    // A wave is one room of PER_WAVE members at once (and the last wave's stragglers): above
    // the default room limit (32), which `security.rs` tests; here it would refuse the load.
    let builder = builder.args(["--max-room-peers", &(3 * PER_WAVE).to_string()]);
    let ctx = Ctx::start_with(engine, builder).await;
    let api = ctx.api();
    let (session, host) = ctx.hosted().await;
    let host_id = host.id();
    let baseline = local_peers(&api).await;
    assert_eq!(baseline, 1, "only the host is connected");

    let total = WAVES * PER_WAVE;
    let joiners = total - total / NO_JOIN;
    let prober = Prober::start(&ctx.base(), PROBE_EVERY);
    let host = watch_host(host, joiners, Duration::from_secs(40));

    let t0 = Instant::now();
    let mut ids = HashSet::new();
    for wave in 0..WAVES {
        let clients = (0..PER_WAVE).map(|i| {
            let join = (wave * PER_WAVE + i) % NO_JOIN != NO_JOIN - 1;
            hit_and_run(
                ctx.ws_url(&session.id),
                session.code.clone(),
                host_id.clone(),
                join,
            )
        });
        ids.extend(join_all(clients).await.into_iter().flatten());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waves_took = t0.elapsed();
    assert_eq!(ids.len(), joiners);

    let (mut host, view) = tokio::time::timeout(Duration::from_secs(45), host)
        .await
        .expect("host watcher bounded")
        .expect("host watcher panicked");
    let all_left = t0.elapsed();
    assert!(view.closed.is_none(), "the host was disconnected: {view:?}");
    assert!(
        view.errors.is_empty(),
        "the host got errors: {:?}",
        view.errors
    );
    assert_eq!(view.joined, ids, "peer_joined for exactly the joiners");
    assert_eq!(
        view.left, ids,
        "peer_left for exactly the joiners (none for sockets that never joined)"
    );
    assert_eq!(
        view.debug_requests, joiners,
        "every debug request reached the host"
    );
    assert_eq!(view.signals, joiners, "every signal reached the host");

    let reaped = wait_local_peers(&api, baseline, Duration::from_secs(10)).await;
    still_served(&mut host).await;
    let probes = prober.finish().await;
    let report = health(&api).await;
    let dropped = report["dropped_log_lines"].as_u64().unwrap();
    eprintln!(
        "[{engine:?}, stdout {stdout:?}] hang reproduction: {total} clients ({joiners} joined, \
         {} reset before joining) in {waves_took:?}, all peer_left after {all_left:?}; \
         local_peers back to {baseline} {reaped:?} later; /health probes: {} (every {PROBE_EVERY:?}), \
         failed {}, slowest {:?}; dropped_log_lines {dropped}",
        total - joiners,
        probes.count,
        probes.failures.len(),
        probes.max,
    );
    assert!(
        probes.failures.is_empty(),
        "failed /health probes: {:?}",
        probes.failures
    );
    assert!(probes.count >= 5, "too few probes: {probes:?}");
    if stdout == Stdout::UnreadPipe {
        assert!(
            dropped > 0,
            "the unread pipe never filled (no dropped log line): {report}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Slow consumers
// ---------------------------------------------------------------------------------------------

/// Signals sent to the host while it does not read, each with a 1 KiB payload: ~25 MiB in all,
/// so buffering them would blow [`RSS_BOUND_MIB`] three times over.
const FLOOD: usize = 24_000;
/// Bound of the server's memory growth (peak RSS minus RSS before the flood). Derivation: relayed
/// frames may fill 3/4 of the per-peer queue (192 frames, ~200 KiB of these signals; at most
/// 768 KiB), tungstenite's write buffer holds at most 2 × 64 KiB + 4 KiB plus a member list, the
/// sender's read buffer one message (64 KiB); socket buffers are kernel memory, not RSS. Add
/// allocator slack (per-thread arenas and fragmentation, a few MiB): 8 MiB, a third of what an
/// unbounded queue would take.
const RSS_BOUND_MIB: u64 = 8;
/// The write timeout ends a socket that takes no bytes at all for that long (silently). The slow
/// peers below stop reading for a few seconds; a longer timeout makes sure that only the queue
/// rules under test decide what happens to them.
const SLOW_WRITE_TIMEOUT: [&str; 2] = ["--write-timeout", "30s"];

/// A joiner floods the host, which has stopped reading (a 4 KiB receive buffer, not read during
/// the flood), with 1 KiB signals, unpaced. What the host's queue cannot take is refused to the
/// sender (`error`: not keeping up), never buffered without bound, and the host is not
/// disconnected (another client must not be able to get a peer cut off): when it reads again it
/// gets what was queued, in order, and then new traffic, as before. The sender stays served.
async fn slow_consumer_relayed_flood(engine: Engine) {
    let builder = Server::builder().args(UNPACED).args(SLOW_WRITE_TIMEOUT);
    let ctx = Ctx::start_with(engine, builder).await;
    let api = ctx.api();
    let pid = ctx.server.pid();
    let session = ctx.session().await;
    let mut slow = raw_ws(&ctx.ws_url(&session.host), Some(4096)).await;
    let slow_id = raw_join(&mut slow, &session.code).await;
    let token = api.join_token(&session.id, &session.code).await;
    let mut sender = raw_ws(&ctx.ws_url(&token), None).await;
    let sender_id = raw_join(&mut sender, &session.code).await;

    let rss_before = proc_status(pid, "VmRSS");
    let (mut tx, mut rx) = sender.split();
    // The sender reads everything the server sends it, in the background.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Got>();
    let reader = tokio::spawn(async move {
        loop {
            let got = raw_next(&mut rx, Duration::from_secs(60)).await;
            let end = !matches!(got, Got::Msg(_));
            let _ = seen_tx.send(got);
            if end {
                return;
            }
        }
    });

    let payload = "x".repeat(1024);
    let t0 = Instant::now();
    let to = slow_id.clone();
    let flood = tokio::spawn(async move {
        for i in 0..FLOOD {
            let msg = format!(
                r#"{{"type":"signal","to_peer":"{to}","signal":{{"seq":{i},"data":"{payload}"}}}}"#
            );
            tx.feed(Message::text(msg)).await?;
            if i % 64 == 63 {
                tx.flush().await?;
            }
        }
        tx.flush().await?;
        Ok::<_, tokio_tungstenite::tungstenite::Error>((tx, t0.elapsed()))
    });
    let (mut tx, flood_took) = tokio::time::timeout(Duration::from_secs(40), flood)
        .await
        .expect("the server stopped reading the sender")
        .expect("flood task")
        .expect("the sender's socket failed");
    // Everything sent was handled: the sender's ping is answered after the whole flood.
    tx.send(Message::text(json!({ "type": "ping" }).to_string()))
        .await
        .expect("the sender can still send");
    let mut refusals = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
            Ok(Some(Got::Msg(v))) if v["type"] == "pong" => break,
            Ok(Some(Got::Msg(v))) if v["type"] == "error" => refusals.push(v),
            Ok(Some(Got::Msg(v))) if v["type"] == "peer_left" => {
                panic!("the flooded host was disconnected: {v}")
            }
            Ok(Some(Got::Msg(v))) => panic!("unexpected message to the sender: {v}"),
            other => panic!("the sender is no longer served: {other:?}"),
        }
    }
    let handled_after = t0.elapsed();
    let rss_peak = proc_status(pid, "VmHWM");
    assert_eq!(
        local_peers(&api).await,
        2,
        "both sockets are still there after the flood"
    );

    // The host reads again: the backlog, in order, and not a close.
    let mut seqs = Vec::new();
    loop {
        match raw_next(&mut slow, Duration::from_secs(1)).await {
            Got::Msg(v) if v["type"] == "peer_joined" && seqs.is_empty() => {
                assert_eq!(v["peer"]["id"], sender_id);
            }
            Got::Msg(v) if v["type"] == "signal" => {
                assert_eq!(v["from_peer"], sender_id);
                seqs.push(v["signal"]["seq"].as_u64().unwrap() as usize);
            }
            Got::Msg(v) => panic!("unexpected message to the flooded host: {v}"),
            Got::Closed(how) => panic!("the flooded host was disconnected: {how:?}"),
            Got::Nothing => break,
        }
    }
    let backlog = seqs.len();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "the backlog is out of order or duplicated"
    );
    // And it is served as before: new traffic from the sender, and its own ping.
    tx.send(Message::text(
        json!({ "type": "signal", "to_peer": slow_id, "signal": { "after": "flood" } }).to_string(),
    ))
    .await
    .unwrap();
    let v = raw_expect(&mut slow, "signal", WAIT).await;
    assert_eq!(v["signal"]["after"], "flood", "{v}");
    slow.send(Message::text(json!({ "type": "ping" }).to_string()))
        .await
        .unwrap();
    raw_expect(&mut slow, "pong", WAIT).await;
    match tokio::time::timeout(QUIET_MS, seen.recv()).await {
        Err(_) => {}
        Ok(other) => panic!("unexpected after the flood, to the sender: {other:?}"),
    }
    drop(tx);
    reader.abort();

    let growth_mib = rss_peak.saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!(
        "[{engine:?}] relayed flood: {FLOOD} signals of 1 KiB sent unpaced in {flood_took:?}, \
         all handled after {handled_after:?}; server RSS {} MiB before, peak {} MiB: growth \
         {growth_mib:.1} MiB (bound {RSS_BOUND_MIB} MiB); {} `error` replies to the sender \
         (first: {}); the host, reading again, got {backlog} signals (seq {:?}..{:?}) and stayed",
        rss_before / 1024,
        rss_peak / 1024,
        refusals.len(),
        refusals
            .first()
            .map_or(Value::Null, |v| v["message"].clone()),
        seqs.first(),
        seqs.last(),
    );
    assert!(
        growth_mib < RSS_BOUND_MIB as f64,
        "server memory grew by {growth_mib:.1} MiB"
    );
    assert!(backlog > 0, "the host got none of the flood");
    assert!(
        backlog < FLOOD,
        "the host got every signal: the flood was buffered for it"
    );
    // Every signal the host did not get was reported to its sender, one `error` each.
    assert_eq!(
        refusals.len() + backlog,
        FLOOD,
        "undelivered signals not all reported"
    );
    for v in &refusals {
        let message = v["message"].as_str().unwrap_or("");
        assert!(
            message.contains("not keeping up"),
            "unexpected refusal: {v}"
        );
    }
}

/// How long the sender must stay quiet after the flood.
const QUIET_MS: Duration = Duration::from_millis(300);
/// Members that come and go per batch (a room holds 32), and the most batches tried.
const CHURN_BATCH: usize = 20;
const CHURN_MAX_BATCHES: usize = 150;

/// A joiner stops reading (a 4 KiB receive buffer) while members come and go: each brings the
/// server's own room events into its queue (`peer_joined` with ~3 KiB of metadata, then
/// `peer_left`), which are never refused like relayed traffic. Once they no longer fit, the peer
/// is disconnected (the room must not go on with a member whose view of it is wrong): close
/// 1008, and the room hears `peer_left`, while the host and the churning members are served as
/// usual. Its backlog is dropped, not written out: reading again, it gets part of it, then the
/// close.
async fn slow_consumer_control_frames(engine: Engine) {
    let ctx = Ctx::start_with(engine, Server::builder().args(SLOW_WRITE_TIMEOUT)).await;
    let api = ctx.api();
    let pid = ctx.server.pid();
    let (session, mut host) = ctx.hosted().await;
    let token = api.join_token(&session.id, &session.code).await;
    let mut slow = raw_ws(&ctx.ws_url(&token), Some(4096)).await;
    let slow_id = raw_join(&mut slow, &session.code).await;
    assert_eq!(host.recv_type("peer_joined").await["peer"]["id"], slow_id);

    let rss_before = proc_status(pid, "VmRSS");
    let big = "m".repeat(1000);
    let t0 = Instant::now();
    let (mut events, mut slow_left_after) = (0, None);
    for batch in 0..CHURN_MAX_BATCHES {
        let joins = (0..CHURN_BATCH).map(|_| async {
            let mut ws = ctx.ws(&session.id).await;
            let mut msg = Ws::join_msg(Some(&session.code));
            msg["metadata"] = json!({ "a": big, "b": big, "c": big });
            ws.join_with(msg).await;
            ws
        });
        let members = join_all(joins).await;
        let ids: HashSet<String> = members.iter().map(Ws::id).collect();
        for ws in members {
            ws.reset().await;
        }
        events += 2 * CHURN_BATCH;
        // The host hears every one of them come and go (and maybe the slow peer leave).
        let (mut joined, mut left) = (HashSet::new(), HashSet::new());
        while joined.len() < ids.len() || left.len() < ids.len() {
            let v = host.recv_json().await;
            match v["type"].as_str() {
                Some("peer_joined") => joined.insert(v["peer"]["id"].as_str().unwrap().to_owned()),
                Some("peer_left") if v["peer_id"] == slow_id.as_str() => {
                    slow_left_after = Some((batch + 1, events, t0.elapsed()));
                    true
                }
                Some("peer_left") => left.insert(v["peer_id"].as_str().unwrap().to_owned()),
                _ => panic!("unexpected message to the host: {v}"),
            };
        }
        assert_eq!(joined, ids, "batch {batch}");
        assert_eq!(left, ids, "batch {batch}");
        if slow_left_after.is_some() {
            break;
        }
    }
    let rss_peak = proc_status(pid, "VmHWM");
    let Some((batches, sent, after)) = slow_left_after else {
        panic!("the peer that stopped reading was never disconnected, after {events} room events");
    };
    // The slow peer reads again: part of its backlog (room events only), then the close.
    let mut backlog = 0;
    let closed = loop {
        match raw_next(&mut slow, Duration::from_secs(10)).await {
            Got::Msg(v) if v["type"] == "peer_joined" || v["type"] == "peer_left" => backlog += 1,
            Got::Msg(v) => panic!("unexpected message to the slow peer: {v}"),
            Got::Closed(how) => break how,
            Got::Nothing => panic!("the slow peer's socket was not closed"),
        }
    };
    wait_local_peers(&api, 1, Duration::from_secs(5)).await;
    still_served(&mut host).await;
    host.expect_silence(Duration::from_millis(300)).await;
    let growth_mib = rss_peak.saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!(
        "[{engine:?}] control frames: the peer that stopped reading was disconnected after \
         {batches} batches of {CHURN_BATCH} members ({sent} room events, {after:?}); it got \
         {backlog} of them, then {closed:?}; server RSS growth {growth_mib:.1} MiB; the host \
         heard every member come and go"
    );
    assert!(backlog < sent, "the whole backlog was written out");
    assert_eq!(
        closed,
        Ok(1008),
        "the slow peer must be closed with 1008 (send queue full)"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Idle peers that vanish silently
// ---------------------------------------------------------------------------------------------

const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
const PING_INTERVAL: Duration = Duration::from_millis(500);
const IDLE_JOINED: usize = 5;
const IDLE_UNJOINED: usize = 2;

async fn idle_peers_vanish(engine: Engine) {
    let builder = Server::builder().args(["--idle-timeout", "2s", "--ping-interval", "500ms"]);
    let ctx = Ctx::start_with(engine, builder).await;
    let api = ctx.api();
    let (session, host) = ctx.hosted().await;
    // The host keeps reading (and so answers the server's pings) throughout.
    let host = watch_host(host, IDLE_JOINED, IDLE_TIMEOUT * 4);

    // Peers that join and then go silent: never read again, never answer a ping, no FIN, as
    // a frozen process or a vanished network path.
    let addr: SocketAddr = format!("127.0.0.1:{}", ctx.server.port()).parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..IDLE_JOINED {
        let mut peer = SilentPeer::connect(addr, &session.id).await;
        let id = peer.join(&session.code).await;
        idle.push((peer, id, Instant::now()));
    }
    let mut unjoined = Vec::new();
    for _ in 0..IDLE_UNJOINED {
        unjoined.push(SilentPeer::connect(addr, &session.id).await);
    }
    assert_eq!(
        local_peers(&api).await,
        (1 + IDLE_JOINED + IDLE_UNJOINED) as u64
    );

    let (mut host, view) = tokio::time::timeout(IDLE_TIMEOUT * 5, host)
        .await
        .expect("host watcher bounded")
        .expect("host watcher panicked");
    assert!(
        view.closed.is_none(),
        "the host (answering pings) was closed"
    );
    let ids: HashSet<String> = idle.iter().map(|(_, id, _)| id.clone()).collect();
    assert_eq!(view.left, ids, "peer_left for every idle peer");
    let mut slowest = Duration::ZERO;
    for (id, at) in &view.left_at {
        let (_, _, last_frame) = idle.iter().find(|(_, i, _)| i == id).unwrap();
        slowest = slowest.max(at.duration_since(*last_frame));
    }
    let reaped = wait_local_peers(&api, 1, PING_INTERVAL * 4).await;

    // What the silent sockets were sent: pings, then the close.
    let mut ends = Vec::new();
    for peer in idle
        .iter_mut()
        .map(|(p, _, _)| p)
        .chain(unjoined.iter_mut())
    {
        ends.push(
            tokio::time::timeout(WAIT, peer.until_closed())
                .await
                .expect("the server closed the idle socket"),
        );
    }
    let codes: Vec<Option<u16>> = ends.iter().map(|(_, code)| *code).collect();
    let pings: Vec<usize> = ends.iter().map(|(pings, _)| *pings).collect();
    still_served(&mut host).await;
    eprintln!(
        "[{engine:?}] idle peers: {IDLE_JOINED} joined + {IDLE_UNJOINED} unjoined silent sockets \
         (idle timeout {IDLE_TIMEOUT:?}, pings every {PING_INTERVAL:?}): slowest peer_left \
         {slowest:?} after the peer's last frame; all sockets reaped {reaped:?} later; pings \
         sent to each {pings:?}, close codes {codes:?}; the host, answering pings, stayed"
    );
    // The issue's bound: within the configured timeout, checked at each ping tick.
    assert!(
        slowest <= IDLE_TIMEOUT + PING_INTERVAL + Duration::from_secs(1),
        "idle peers closed after {slowest:?}"
    );
    assert!(
        codes.iter().all(|c| *c == Some(1001)),
        "idle sockets are closed with 1001: {codes:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. File descriptors
// ---------------------------------------------------------------------------------------------

const FD_LIMIT: u64 = 1024;
const FD_CLIENTS: usize = 1100;

/// Raises this process's soft descriptor limit to at least `want` (at most the hard limit).
fn raise_own_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = lim.rlim_max.min(want.max(lim.rlim_cur));
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= want,
        "this test needs {want} descriptors; the hard limit is {}",
        lim.rlim_max
    );
}

/// The server started under `prlimit --nofile=N:N` (soft and hard, so it cannot raise it), with
/// `--join-timeout 60s`: the test holds hundreds of sockets that never join for longer than the
/// default 10 s could allow on a loaded machine, and counts them (the join timeout itself, which
/// frees such descriptors, is tested in `security.rs`).
struct LimitedServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl LimitedServer {
    async fn start(nofile: u64, redis_url: Option<String>) -> LimitedServer {
        let port = common::free_port();
        let log = std::env::temp_dir().join(format!(
            "beach-road-robustness-{}-{port}.log",
            std::process::id()
        ));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_beach-road"))
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--join-timeout", "60s"])
            .env_remove("REDIS_URL")
            .env_remove("BEACH_ROAD_MAX_CONNECTIONS")
            .envs(common::MANY_CLIENTS)
            .env_remove("BEACH_ROAD_JOIN_TIMEOUT")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if let Some(url) = redis_url {
            cmd.args(["--redis-url", &url]);
        }
        let mut server = LimitedServer {
            child: cmd.spawn().expect("spawn prlimit"),
            port,
            log,
        };
        let api = server.api();
        let deadline = Instant::now() + common::START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("beach-road exited: {status}\n{}", server.log());
            }
            if matches!(api.get("/health").await, Ok(r) if r.status == 200) {
                return server;
            }
            assert!(Instant::now() < deadline, "not healthy:\n{}", server.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn api(&self) -> Api {
        Api::new(&self.base())
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn ws_url(&self, id: &str) -> String {
        format!("ws://127.0.0.1:{}/ws/{id}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LimitedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("beach-road log (prlimit):");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

async fn fd_limit(engine: Engine) {
    raise_own_nofile(FD_CLIENTS as u64 + 512);
    let redis = (engine == Engine::Redis).then(RedisServer::start);
    let server = LimitedServer::start(FD_LIMIT, redis.as_ref().map(RedisServer::url)).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    // Sized up front to the limit (its default --max-connections is above it), not refused
    // (the kernel may round the table up).
    let slots = proc_status(server.child.id() as i32, "FDSize");
    assert!(
        slots >= FD_LIMIT,
        "descriptor table of {slots} slots under a limit of {FD_LIMIT}"
    );
    assert!(!server.log().contains("cannot size the descriptor table"));
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        nofile.split_whitespace().nth(3),
        Some(FD_LIMIT.to_string().as_str()),
        "the server runs with soft limit {FD_LIMIT}: {nofile}"
    );
    let api = server.api();
    let (session, host_token) = {
        let id = common::uuid();
        let body = api.register(&id, Some("fd-limit")).await;
        assert_eq!(body["success"], true);
        let signaling = body["transports"][0]["metadata"]["signaling_url"]
            .as_str()
            .unwrap();
        (id, common::url_id(signaling))
    };
    // The host on its token; everybody else through the public id (and the code).
    let url = server.ws_url(&session);
    let mut host = Ws::connect(&server.ws_url(&host_token)).await;
    host.join(Some("fd-limit")).await;
    let host_id = host.id();
    let prober = Prober::start(&server.base(), PROBE_EVERY);

    // More clients than descriptors, 100 at a time; every attempt is bounded (3 s).
    let t0 = Instant::now();
    let mut open = Vec::new();
    let (mut refused_503, mut refused_closed, mut timed_out) = (0, 0, Vec::new());
    for batch in 0..FD_CLIENTS.div_ceil(100) {
        let n = (FD_CLIENTS - batch * 100).min(100);
        let attempts = (0..n).map(|_| Ws::try_connect(&url));
        for r in join_all(attempts).await {
            match r {
                Ok(ws) => open.push(ws),
                Err(e) if e == "HTTP 503" => refused_503 += 1,
                Err(e) if e.contains("timed out") => timed_out.push(e),
                Err(_) => refused_closed += 1,
            }
        }
    }
    let connect_took = t0.elapsed();
    let accepted = open.len();
    // At the limit: /health and /ready still answer, the accepted sockets are served.
    let h = health(&api).await;
    assert_eq!(h["local_peers"], accepted as u64 + 1, "{h}");
    api.get_ok("/ready").await.assert_status(200);
    for ws in open.iter_mut().take(3) {
        ws.join(Some("fd-limit")).await;
        ws.send_json(json!({ "type": "signal", "to_peer": host_id, "signal": { "n": 1 } }))
            .await;
        still_served(ws).await;
    }
    let mut signals = 0;
    while signals < 3 {
        let v = host.recv_json().await;
        if v["type"] == "signal" {
            signals += 1;
        }
    }

    // The clients go (resets); the server accepts new ones again.
    for ws in open {
        ws.reset().await;
    }
    let reaped = wait_local_peers(&api, 1, Duration::from_secs(10)).await;
    let mut again = Vec::new();
    for _ in 0..20 {
        let mut ws = Ws::connect(&url).await;
        ws.join(Some("fd-limit")).await;
        again.push(ws);
    }
    still_served(again.last_mut().unwrap()).await;
    still_served(&mut host).await;
    let probes = prober.finish().await;
    eprintln!(
        "[{engine:?}] fd limit {FD_LIMIT}: {FD_CLIENTS} clients in {connect_took:?}: {accepted} \
         accepted, {refused_503} refused with 503, {refused_closed} closed at once, {} hung; \
         after the resets local_peers back to 1 in {reaped:?}, 20 new clients joined; /health \
         probes {}, failed {}, slowest {:?}",
        timed_out.len(),
        probes.count,
        probes.failures.len(),
        probes.max,
    );
    assert!(timed_out.is_empty(), "attempts hung: {timed_out:?}");
    assert_eq!(accepted + refused_503 + refused_closed, FD_CLIENTS);
    assert!(
        (accepted as u64) < FD_LIMIT,
        "more sockets than descriptors?"
    );
    assert!(
        accepted as u64 >= FD_LIMIT - 128,
        "most descriptors should serve WebSockets: only {accepted}"
    );
    assert!(
        probes.failures.is_empty(),
        "failed /health probes: {:?}",
        probes.failures
    );
}

/// The descriptor table holds every socket the server may open from the start: grown later,
/// each doubling (256, 512, 1024, …) would stall the `accept` that needed it for an RCU grace
/// period (src/descriptors.rs). Without the up-front sizing a fresh server's table has 256 slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_table_sized_at_start() {
    run(Duration::from_secs(30), async {
        let server = Server::builder()
            .args(["--max-connections", "3000"])
            .start()
            .await;
        let slots = proc_status(server.pid(), "FDSize");
        assert!(
            slots >= 3000,
            "descriptor table of {slots} slots for 3000 sockets"
        );
        assert!(!server.log().contains("cannot size the descriptor table"));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Redis slow, then unreachable
// ---------------------------------------------------------------------------------------------

/// The issue's bound on `/health`.
const HEALTH_BOUND: Duration = Duration::from_millis(100);
/// `/ready` must fail fast.
const READY_BOUND: Duration = Duration::from_secs(1);
/// Requests that need Redis fail within this (the server's `--redis-timeout` is 500 ms).
const REQUEST_BOUND: Duration = Duration::from_secs(2);
/// A Redis stall long enough for every check below to fall inside it.
const REDIS_STALL_S: u32 = 5;

/// True when Redis does not answer a PING within 300 ms.
async fn redis_blocked(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        tcp.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = tcp.read(&mut buf).await.ok()?;
        (n > 0).then_some(())
    };
    !matches!(
        tokio::time::timeout(Duration::from_millis(300), probe).await,
        Ok(Some(()))
    )
}

#[derive(Debug, Default)]
struct Degraded {
    ready: Duration,
    register: Duration,
    join: Duration,
    ws_join: Duration,
    ws_join_reason: String,
}

/// `/ready`, register, HTTP join and WebSocket join while Redis does not answer: each fails
/// fast. Returns the latencies.
async fn degraded_requests(ctx: &Ctx, session: &common::Session) -> Degraded {
    let api = ctx.api();
    let t0 = Instant::now();
    let ready = api.get_ok("/ready").await;
    let ready_t = t0.elapsed();
    assert_eq!(ready.status, 503, "/ready: {}", ready.body);
    let body = json!({ "session_id": common::uuid(), "passphrase": null });
    let t0 = Instant::now();
    let reg = api.post("/sessions", &body).await;
    let register_t = t0.elapsed();
    assert_eq!(reg.status, 503, "register: {}", reg.body);
    let body = json!({ "passphrase": session.code });
    let t0 = Instant::now();
    let join = api
        .post(&format!("/sessions/{}/join", session.id), &body)
        .await;
    let join_t = t0.elapsed();
    assert_eq!(join.status, 503, "join: {}", join.body);
    // A WebSocket join needs Redis too: it is refused (join_error), not left waiting.
    let t0 = Instant::now();
    let mut ws = ctx.ws(&session.id).await;
    ws.send_json(Ws::join_msg(Some(&session.code))).await;
    let reply = match ws.next(REQUEST_BOUND * 2).await {
        Ok(Some(v)) => v,
        other => panic!("WebSocket join left waiting: {other:?}"),
    };
    let ws_join = t0.elapsed();
    assert_eq!(reply["type"], "join_error", "{reply}");
    ws.reset().await;
    let d = Degraded {
        ready: ready_t,
        register: register_t,
        join: join_t,
        ws_join,
        ws_join_reason: reply["reason"].as_str().unwrap_or("").to_owned(),
    };
    assert!(d.ready < READY_BOUND, "/ready took {:?}", d.ready);
    for (what, t) in [
        ("register", d.register),
        ("join", d.join),
        ("WebSocket join", d.ws_join),
    ] {
        assert!(t < REQUEST_BOUND, "{what} took {t:?}");
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slow_and_unreachable() {
    run(Duration::from_secs(60), slow_and_unreachable()).await;
}

async fn slow_and_unreachable() {
    let builder = Server::builder().args(["--redis-timeout", "500ms"]);
    let mut ctx = Ctx::start_with(Engine::Redis, builder).await;
    let api = ctx.api();
    let (session, host) = ctx.hosted().await;
    api.get_ok("/ready").await.assert_status(200);
    let port = ctx.redis.as_ref().unwrap().port();

    // Slow: Redis stops answering for REDIS_STALL_S. `DEBUG SLEEP` is refused by Redis 7's
    // default `enable-debug-command no` (and the harness's redis-server keeps the default), so
    // the stall is `CLIENT PAUSE ... ALL` from another connection: every command of every other
    // client waits, exactly as behind a `DEBUG SLEEP`.
    let prober = Prober::start(&ctx.base(), Duration::from_millis(50));
    let pause = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "CLIENT", "PAUSE"])
        .arg((REDIS_STALL_S * 1000).to_string())
        .arg("ALL")
        .output()
        .expect("redis-cli");
    assert_eq!(
        String::from_utf8_lossy(&pause.stdout).trim(),
        "OK",
        "CLIENT PAUSE: {pause:?}"
    );
    let t0 = Instant::now();
    while !redis_blocked(port).await {
        assert!(t0.elapsed() < WAIT, "CLIENT PAUSE did not take effect");
    }
    let slow = degraded_requests(&ctx, &session).await;
    assert!(
        redis_blocked(port).await,
        "Redis answered again before the checks were over: raise REDIS_STALL_S"
    );
    let slow_probes = prober.finish().await;

    // Redis answers again: so does the server.
    let t1 = Instant::now();
    loop {
        if api.get_ok("/ready").await.status == 200 {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(15), "not ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = t1.elapsed();
    ctx.session().await;

    // Unreachable: redis-server killed.
    let prober = Prober::start(&ctx.base(), Duration::from_millis(50));
    ctx.redis.as_mut().unwrap().kill();
    let gone = degraded_requests(&ctx, &session).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let gone_probes = prober.finish().await;
    let h = health(&api).await;

    eprintln!(
        "[Redis] stalled {REDIS_STALL_S} s (CLIENT PAUSE ALL): /health probes {} (every 50 ms), slowest {:?}, \
         failed {}; /ready 503 in {:?}; register 503 in {:?}; join 503 in {:?}; WebSocket \
         join_error in {:?} ({:?}); ready again {recovered:?} after the checks",
        slow_probes.count,
        slow_probes.max,
        slow_probes.failures.len(),
        slow.ready,
        slow.register,
        slow.join,
        slow.ws_join,
        slow.ws_join_reason,
    );
    eprintln!(
        "[Redis] redis-server killed: /health probes {}, slowest {:?}, failed {}; /ready 503 in \
         {:?}; register 503 in {:?}; join 503 in {:?}; WebSocket join_error in {:?} ({:?}); \
         /health afterwards: {h}",
        gone_probes.count,
        gone_probes.max,
        gone_probes.failures.len(),
        gone.ready,
        gone.register,
        gone.join,
        gone.ws_join,
        gone.ws_join_reason,
    );
    for (what, probes) in [("slow", &slow_probes), ("unreachable", &gone_probes)] {
        assert!(
            probes.failures.is_empty(),
            "/health failed while Redis was {what}: {:?}",
            probes.failures
        );
        assert!(
            probes.max < HEALTH_BOUND,
            "/health took {:?} while Redis was {what}",
            probes.max
        );
    }
    drop(host);
}
