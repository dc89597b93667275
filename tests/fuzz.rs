//! Fuzzing the live WebSocket endpoint, on both engines, bounded in time (a fixed part and
//! [`FUZZ_TIME`] of random cases per test) with a fixed RNG seed: `FUZZ_SEED=N` replays a run,
//! and every failure message names the seed.
//!
//! - `json_inputs`: on joined sockets, as text and binary frames: random bytes, truncated and odd
//!   JSON, every field of every client message type of protocol.md §4.1 with values of the wrong
//!   type, deep nesting, huge numbers, random mutations of valid messages. Each unparsable frame
//!   must get an `error` reply and the socket must stay open (protocol.md §4), checked with a
//!   `ping` after every case.
//! - `protocol_violations`: hand-built RFC 6455 frames over raw TCP, each of a known kind of
//!   violation with random details (payloads, opcodes, lengths, fragment splits): the server must
//!   close with a close frame carrying the RFC code: 1002 for unmasked frames, reserved opcodes
//!   or bits, bad fragmentation and bad control frames; 1007 for invalid UTF-8 in text; 1009 for
//!   a message over the 64 KiB limit. Valid but unusual framing (fragments with a ping between
//!   them, a character split across fragments) must keep working.
//! - `garbage`: random bytes right after the upgrade, random frames, garbage instead of HTTP and
//!   mangled upgrade requests.
//!
//! Throughout every test the server must stay up (`/health` 200 every 100 ms, the process alive)
//! and a bystander room on the same server must keep relaying signals both ways, during and
//! after. Failures are collected and reported together at the end (protocol violations per
//! kind: how many of its cases failed, and the first of them).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use common::{uuid, Api, Ctx, Engine, Room, Ws, WAIT};

/// The random part of each test runs this long.
const FUZZ_TIME: Duration = Duration::from_secs(2);
/// Upper bound of a whole test.
const TEST_LIMIT: Duration = Duration::from_secs(90);
/// The seed unless `FUZZ_SEED` says otherwise.
const DEFAULT_SEED: u64 = 0x6265_6163_682d_726f;
/// The server's default `BEACH_ROAD_MAX_MESSAGE_BYTES`.
const MAX_MESSAGE: usize = 64 * 1024;
/// `error` replies a socket gets at most per 10 s (ws.rs): cases per fuzzing socket.
const CASES_PER_SOCKET: usize = 4;

macro_rules! on_both_engines {
    ($($name:ident),*) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Engine::Memory, stringify!($name), super::$name).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Engine::Redis, stringify!($name), super::$name).await
                }
            )*
        }
    };
}

on_both_engines!(json_inputs, protocol_violations, garbage);

// ---------------------------------------------------------------------------------------------
// The fixture: server, bystander room, health prober, failures
// ---------------------------------------------------------------------------------------------

fn seed() -> u64 {
    match std::env::var("FUZZ_SEED") {
        Ok(s) => s.parse().expect("FUZZ_SEED must be a u64"),
        Err(_) => DEFAULT_SEED,
    }
}

struct Fuzz {
    ctx: Ctx,
    rng: StdRng,
    failures: Vec<String>,
    /// Cases run, for the summary.
    cases: usize,
}

impl Fuzz {
    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    /// A fresh session with its own socket joined to it (the room's server peer), so that no
    /// other socket's traffic mixes with the replies.
    async fn joined_socket(&self) -> Ws {
        let session = self.ctx.session().await;
        let mut ws = self.ctx.ws(&session.id).await;
        ws.join(Some(&session.code)).await;
        ws
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.ctx.server.port())
    }
}

/// Starts the server, the bystander and the prober, runs `body`, then checks everything.
async fn run<F>(engine: Engine, name: &str, body: F)
where
    F: for<'a> AsyncFnOnce(&'a mut Fuzz),
{
    let seed = seed();
    eprintln!("fuzz {name} [{engine:?}]: seed {seed} (replay with FUZZ_SEED={seed})");
    common::bounded_for(TEST_LIMIT, async {
        let ctx = Ctx::start(engine).await;
        let bystander = Bystander::start(ctx.room().await);
        let prober = Prober::start(ctx.api());
        let mut fuzz = Fuzz {
            ctx,
            rng: StdRng::seed_from_u64(seed),
            failures: Vec::new(),
            cases: 0,
        };
        let t0 = Instant::now();
        body(&mut fuzz).await;
        let took = t0.elapsed();

        let probes = prober.finish().await;
        if !probes.failures.is_empty() {
            fuzz.fail(format!("/health failed: {:?}", probes.failures));
        }
        match bystander.finish().await {
            Ok(exchanges) if exchanges > 0 => {}
            Ok(_) => fuzz.fail("the bystander room exchanged no signal during the run".into()),
            Err(e) => fuzz.fail(format!("the bystander room broke: {e}")),
        }
        if let Some(status) = fuzz.ctx.server.try_exit() {
            fuzz.fail(format!("the server exited: {status}"));
        }
        eprintln!(
            "fuzz {name} [{engine:?}]: {} cases in {took:?}, {} /health probes, {} failures",
            fuzz.cases,
            probes.count,
            fuzz.failures.len()
        );
        if !fuzz.failures.is_empty() {
            let n = fuzz.failures.len();
            let shown: Vec<&String> = fuzz.failures.iter().take(40).collect();
            panic!(
                "fuzz {name} [{engine:?}], seed {seed} (FUZZ_SEED={seed}): {n} failures:\n  {}",
                shown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n  ")
            );
        }
    })
    .await
}

/// A room on the same server whose two peers keep signalling each other during the run.
struct Bystander {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(Room, u64)>,
}

impl Bystander {
    fn start(room: Room) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut room = room;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    exchange(&mut room, n).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (room, n)
            }
        });
        Bystander { stop, task }
    }

    /// Stops, then one more exchange after the run; the number of exchanges during it.
    async fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        let (mut room, n) = self.task.await.map_err(panic_message)?;
        let after = tokio::spawn(async move {
            exchange(&mut room, u64::MAX).await;
            room
        });
        let room = after
            .await
            .map_err(|e| format!("after the run: {}", panic_message(e)))?;
        room.host.close_abruptly().await;
        room.joiner.close_abruptly().await;
        Ok(n)
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into()),
        Err(e) => e.to_string(),
    }
}

/// One signal each way, checked verbatim (panics otherwise, within the harness's wait).
async fn exchange(room: &mut Room, n: u64) {
    let (host, joiner) = (room.host.id(), room.joiner.id());
    let ice = |side: &str| {
        json!({"transport": "webrtc", "signal": {"signal_type": "ice_candidate",
               "candidate": format!("candidate:{n} {side}"), "sdp_mid": "0",
               "sdp_mline_index": 0, "handshake_id": "bystander"}})
    };
    room.host
        .send_json(json!({"type": "signal", "to_peer": joiner, "signal": ice("h")}))
        .await;
    let got = room.joiner.recv_type("signal").await;
    assert_eq!(got["from_peer"], host.as_str());
    assert_eq!(got["signal"], ice("h"));
    room.joiner
        .send_json(json!({"type": "signal", "to_peer": host, "signal": ice("j")}))
        .await;
    let got = room.host.recv_type("signal").await;
    assert_eq!(got["from_peer"], joiner.as_str());
    assert_eq!(got["signal"], ice("j"));
}

/// `GET /health` every 100 ms (2 s timeout each) until stopped.
struct Prober {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Probes>,
}

#[derive(Debug, Default)]
struct Probes {
    count: usize,
    failures: Vec<String>,
}

impl Prober {
    fn start(api: Api) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut probes = Probes::default();
                while !stop.load(Ordering::Relaxed) {
                    probes.count += 1;
                    let t0 = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(2), api.get("/health")).await {
                        Ok(Ok(r)) if r.status == 200 => {}
                        Ok(Ok(r)) => probes.failures.push(format!("{} {}", r.status, r.body)),
                        Ok(Err(e)) => probes.failures.push(e.to_string()),
                        Err(_) => probes
                            .failures
                            .push(format!("no answer within {:?}", t0.elapsed())),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                probes
            }
        });
        Prober { stop, task }
    }

    async fn finish(self) -> Probes {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("prober panicked")
    }
}

// ---------------------------------------------------------------------------------------------
// 1. JSON-level input on joined sockets
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Unparsable or of the wrong shape: an `error` reply.
    Error,
    /// Valid or borderline: any §4.2 reply, or none.
    Any,
}

struct JsonCase {
    label: String,
    bytes: Vec<u8>,
    binary: bool,
    expect: Expect,
}

impl JsonCase {
    fn text(label: impl Into<String>, text: impl Into<String>, expect: Expect) -> JsonCase {
        JsonCase {
            label: label.into(),
            bytes: text.into().into_bytes(),
            binary: false,
            expect,
        }
    }

    /// Whether the server may answer this case with a `pong` (then the `ping` that follows it
    /// is not the only one): JSON whose `type` is, or may be taken for, `ping`.
    fn may_pong(&self) -> bool {
        match serde_json::from_slice::<Value>(&self.bytes) {
            Ok(v) => v["type"] == "ping" || contains(&self.bytes, b"ping"),
            // Too deep for a tree, yet a ping the server may answer (it ignores unknown
            // fields without building them).
            Err(_) => contains(&self.bytes, b"\"type\":\"ping\""),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A peer id that is in no room.
const NOBODY: &str = "00000000-0000-4000-8000-000000000000";

/// One valid message of each client type of protocol.md §4.1, every field present.
fn templates() -> Vec<Value> {
    vec![
        json!({"type": "join", "peer_id": uuid(), "passphrase": "123456",
               "supported_transports": ["webrtc"], "preferred_transport": "webrtc",
               "label": "fuzz", "mcp": false, "viewer_token": "t", "metadata": {"k": "v"}}),
        json!({"type": "signal", "to_peer": NOBODY,
               "signal": {"transport": "webrtc", "signal": {"signal_type": "ice_candidate",
                          "candidate": "candidate:1", "sdp_mid": "0", "sdp_mline_index": 0}}}),
        json!({"type": "negotiate_transport", "to_peer": NOBODY, "proposed_transport": "webrtc"}),
        json!({"type": "accept_transport", "to_peer": NOBODY, "transport": "webrtc"}),
        json!({"type": "ping"}),
        json!({"type": "debug", "request": {"type": "get_stats"}}),
    ]
}

/// Raw JSON values of every kind, many of them the wrong type for any given field.
fn odd_values() -> Vec<String> {
    let mut v: Vec<String> = [
        "0",
        "-1",
        "1.5",
        "true",
        "false",
        "null",
        "\"str\"",
        "\"\"",
        "[]",
        "[1,\"a\",null]",
        "{}",
        "{\"a\":1}",
        "1e999",
        "-1e999",
        "1E+400",
        "-0",
        "18446744073709551616",
        "123456789012345678901234567890123456789012345678901234567890",
        "\"\\ud800\"",
        "\"\\u0000\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("\"{}\"", "x".repeat(40_000)));
    v.push(format!("{}1{}", "[".repeat(200), "]".repeat(200)));
    v
}

/// What the server must answer when `field` of a `ty` message holds `raw` (protocol.md §4.1).
/// Relayed messages go to [`NOBODY`], so they are answered with `error` whatever else they hold.
fn expect_for(ty: &str, field: &str, raw: &str) -> Expect {
    let v: Option<Value> = serde_json::from_str(raw).ok();
    let is = |f: fn(&Value) -> bool| v.as_ref().is_some_and(f);
    let ok = match (ty, field) {
        (_, "type") => false,
        ("signal" | "negotiate_transport" | "accept_transport", _) => false,
        ("debug", "request") => false,
        ("join", "peer_id") => v.is_none() || is(Value::is_string),
        ("join", "passphrase") => v.is_none() || is(Value::is_string) || is(Value::is_null),
        ("join", "supported_transports") => is(Value::is_array),
        ("join", "mcp") => is(Value::is_boolean) || is(Value::is_null),
        ("join", "metadata") => is(Value::is_object) || is(Value::is_null),
        // preferred_transport, label, viewer_token: types not fixed by protocol.md.
        _ => true,
    };
    if ok {
        Expect::Any
    } else {
        Expect::Error
    }
}

/// `msg` with `field` replaced by raw JSON text (which may not fit in a `Value`, e.g. `1e999`).
fn with_raw_field(msg: &Value, field: &str, raw: &str) -> String {
    let mut m = msg.clone();
    m[field] = json!("\u{1}FUZZ\u{1}");
    m.to_string().replace("\"\\u0001FUZZ\\u0001\"", raw)
}

fn fixed_json_cases() -> Vec<JsonCase> {
    let mut cases = Vec::new();
    let odd = odd_values();
    for t in templates() {
        let ty = t["type"].as_str().unwrap().to_owned();
        let fields: Vec<String> = t.as_object().unwrap().keys().cloned().collect();
        for field in &fields {
            for raw in &odd {
                let label = format!("{ty}.{field} = {}", abbrev(raw));
                let expect = expect_for(&ty, field, raw);
                cases.push(JsonCase::text(
                    label,
                    with_raw_field(&t, field, raw),
                    expect,
                ));
            }
            // The field missing: required ones must be refused.
            let mut m = t.clone();
            m.as_object_mut().unwrap().remove(field);
            let required = matches!(
                (ty.as_str(), field.as_str()),
                (_, "type")
                    | ("join", "peer_id" | "supported_transports")
                    | ("signal" | "negotiate_transport" | "accept_transport", _)
                    | ("debug", "request")
            );
            let expect = if required { Expect::Error } else { Expect::Any };
            cases.push(JsonCase::text(
                format!("{ty} without {field}"),
                m.to_string(),
                expect,
            ));
        }
        // Truncations: no strict prefix of an object is JSON.
        let s = t.to_string();
        for n in (0..s.len()).step_by(7).chain([s.len() - 1]) {
            if s.is_char_boundary(n) {
                cases.push(JsonCase::text(
                    format!("{ty} cut at {n}"),
                    &s[..n],
                    Expect::Error,
                ));
            }
        }
    }
    use Expect::{Any, Error};
    for (text, expect) in [
        ("", Error),
        (" ", Error),
        ("null", Error),
        ("[]", Error),
        ("{}", Error),
        ("\"ping\"", Error),
        ("0", Error),
        ("{\"type\":\"ping\"}}", Error),
        ("{\"type\":\"ping\"} x", Error),
        ("\u{feff}{\"type\":\"ping\"}", Error),
        ("{'type':'ping'}", Error),
        ("{\"type\":\"ping\",}", Error),
        ("{\"type\":\"ping\",\"x\":NaN}", Error),
        ("{\"type\":\"ping\",\"x\":Infinity}", Error),
        ("/*c*/{\"type\":\"ping\"}", Error),
        ("{\"type\":\"PING\"}", Error),
        ("{\"type\":\"ping\\u0000\"}", Error),
        ("{\"type\":\"nope\"}", Error),
        ("{\"type\":\"ping\"}\n", Any),
        ("{\"type\":\"pi\\u006eg\"}", Any),
        ("{\"type\":\"ping\",\"type\":\"ping\"}", Any),
        ("{\"type\":\"ping\",\"type\":\"join\"}", Any),
        ("{\"type\":\"ping\",\"x\":1e999}", Any),
        ("{\"\\ud800\":1,\"type\":\"ping\"}", Any),
    ] {
        cases.push(JsonCase::text(
            format!("odd {}", abbrev(text)),
            text,
            expect,
        ));
    }
    // Deep nesting, within the size limit.
    let deep =
        |open: &str, close: &str, n: usize| format!("{}1{}", open.repeat(n), close.repeat(n));
    cases.push(JsonCase::text("60000 x [", "[".repeat(60_000), Error));
    cases.push(JsonCase::text(
        "30000 x [[..]]",
        deep("[", "]", 30_000),
        Error,
    ));
    cases.push(JsonCase::text(
        "10000 x {\"a\":",
        deep("{\"a\":", "}", 10_000),
        Error,
    ));
    cases.push(JsonCase::text(
        "ping with 30000-deep extra field",
        format!("{{\"type\":\"ping\",\"x\":{}}}", deep("[", "]", 30_000)),
        Any,
    ));
    cases.push(JsonCase::text(
        "signal with 30000-deep signal",
        format!(
            "{{\"type\":\"signal\",\"to_peer\":\"{NOBODY}\",\"signal\":{}}}",
            deep("[", "]", 30_000)
        ),
        Error,
    ));
    cases.push(JsonCase::text(
        "ping with 20000-digit number",
        format!("{{\"type\":\"ping\",\"n\":{}}}", "9".repeat(20_000)),
        Any,
    ));
    cases
}

fn abbrev(s: &str) -> String {
    if s.len() <= 40 {
        format!("{s:?}")
    } else {
        let cut = (0..=40).rev().find(|&i| s.is_char_boundary(i)).unwrap();
        format!("{:?}… ({} bytes)", &s[..cut], s.len())
    }
}

/// A random case: random bytes, random JSON-ish text, or a valid message mutated.
fn random_json_case(rng: &mut StdRng) -> JsonCase {
    let kind = rng.random_range(0..4);
    let bytes: Vec<u8> = match kind {
        0 => {
            let n = rng.random_range(0..512);
            (0..n).map(|_| rng.random()).collect()
        }
        1 => {
            const ALPHABET: &[u8] = b"{}[]\",:\\ 0123456789.eE+-truefalsnl\"type\"ping\"join\"";
            let n = rng.random_range(0..256);
            (0..n).map(|_| *ALPHABET.choose(rng).unwrap()).collect()
        }
        _ => {
            // Mutations of a message other than `ping` (a mutated ping that still parses would
            // cost a wait for a second pong).
            let t = templates();
            let msg = t.iter().filter(|m| m["type"] != "ping").collect::<Vec<_>>();
            let mut b = msg.choose(rng).unwrap().to_string().into_bytes();
            for _ in 0..rng.random_range(1..=4) {
                mutate(rng, &mut b);
            }
            b
        }
    };
    let binary = kind == 0 || rng.random_bool(0.3) || std::str::from_utf8(&bytes).is_err();
    let expect = if serde_json::from_slice::<Value>(&bytes).is_ok() {
        Expect::Any
    } else {
        Expect::Error
    };
    JsonCase {
        label: format!("random {}", abbrev(&String::from_utf8_lossy(&bytes))),
        bytes,
        binary,
        expect,
    }
}

fn mutate(rng: &mut StdRng, b: &mut Vec<u8>) {
    if b.is_empty() {
        b.push(b'{');
        return;
    }
    let i = rng.random_range(0..b.len());
    match rng.random_range(0..5) {
        0 => b[i] = *b"{}[]\",:0e-\\ ".choose(rng).unwrap(),
        1 => {
            let end = (i + rng.random_range(1..8)).min(b.len());
            b.drain(i..end);
        }
        2 => {
            let end = (i + rng.random_range(1..16)).min(b.len());
            let dup = b[i..end].to_vec();
            b.splice(i..i, dup);
        }
        3 => {
            let token = [
                "null", "1e999", "[", "{", "\"", "\\u", "-", "true", "\u{fffd}",
            ];
            let t = token.choose(rng).unwrap().as_bytes().to_vec();
            b.splice(i..i, t);
        }
        _ => b[i] = rng.random(),
    }
}

async fn json_inputs(fuzz: &mut Fuzz) {
    let mut cases = fixed_json_cases();
    for c in cases.iter_mut() {
        c.binary = fuzz.rng.random_bool(0.3);
        assert!(c.bytes.len() < MAX_MESSAGE, "{} is too big", c.label);
    }
    for batch in cases.chunks(CASES_PER_SOCKET) {
        json_batch(fuzz, batch).await;
    }
    let deadline = Instant::now() + FUZZ_TIME;
    while Instant::now() < deadline {
        let batch: Vec<JsonCase> = (0..CASES_PER_SOCKET)
            .map(|_| random_json_case(&mut fuzz.rng))
            .collect();
        json_batch(fuzz, &batch).await;
    }
}

/// Runs `cases` on one fresh joined socket: each case, then `ping`; everything answered before
/// the `pong` is the case's reply.
async fn json_batch(fuzz: &mut Fuzz, cases: &[JsonCase]) {
    let mut ws = fuzz.joined_socket().await;
    for case in cases {
        fuzz.cases += 1;
        let frame = if case.binary {
            Message::binary(case.bytes.clone())
        } else {
            Message::text(String::from_utf8(case.bytes.clone()).expect("text cases are UTF-8"))
        };
        let how = if case.binary { "binary" } else { "text" };
        let sent =
            ws.try_send(frame).await && ws.try_send(Message::text("{\"type\":\"ping\"}")).await;
        if !sent {
            fuzz.fail(format!("{} ({how}): the socket was closed", case.label));
            return;
        }
        let mut replies = Vec::new();
        let mut pongs = 0;
        let wanted = if case.may_pong() { 2 } else { 1 };
        while pongs < wanted {
            // After the first pong, a second one only comes if the case was a ping itself.
            let within = if pongs == 0 {
                WAIT
            } else {
                Duration::from_millis(300)
            };
            match ws.next(within).await {
                Ok(Some(v)) if v["type"] == "pong" => pongs += 1,
                Ok(Some(v)) => replies.push(v),
                Ok(None) if pongs > 0 => break,
                Ok(None) => {
                    fuzz.fail(format!("{} ({how}): no pong within {within:?}", case.label));
                    return;
                }
                Err(closed) => {
                    fuzz.fail(format!(
                        "{} ({how}): socket closed ({closed:?}) instead of an error reply",
                        case.label
                    ));
                    return;
                }
            }
        }
        if case.expect == Expect::Error && !replies.iter().any(|v| v["type"] == "error") {
            fuzz.fail(format!(
                "{} ({how}): no `error` reply, got {replies:?}",
                case.label
            ));
        }
    }
    ws.close_abruptly().await;
}

// ---------------------------------------------------------------------------------------------
// Raw RFC 6455 client
// ---------------------------------------------------------------------------------------------

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// One client frame: `rsv` are the three reserved bits (0..=7); `mask` None sends it unmasked
/// (which a client must never do); `declared` overrides the length in the header (the payload
/// sent may then be shorter or longer than declared).
struct RawFrame<'a> {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: &'a [u8],
    declared: Option<u64>,
}

impl RawFrame<'_> {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![(u8::from(self.fin) << 7) | ((self.rsv & 7) << 4) | (self.opcode & 0xf)];
        let len = self.declared.unwrap_or(self.payload.len() as u64);
        let masked = if self.mask.is_some() { 0x80 } else { 0 };
        if len < 126 {
            out.push(masked | len as u8);
        } else if len <= 0xffff {
            out.push(masked | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(masked | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
        match self.mask {
            Some(m) => {
                out.extend_from_slice(&m);
                out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
            }
            None => out.extend_from_slice(self.payload),
        }
        out
    }
}

/// A masked frame with a random mask.
fn masked(rng: &mut StdRng, fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    RawFrame {
        fin,
        rsv: 0,
        opcode,
        mask: Some(rng.random()),
        payload,
        declared: None,
    }
    .encode()
}

/// What the server sent on a raw socket until it closed or went quiet.
#[derive(Debug, Default)]
struct Seen {
    /// JSON text messages.
    messages: Vec<Value>,
    /// Protocol pongs.
    pongs: usize,
    /// `Some(code)` when a close frame came (`Some(None)`: a close frame without a code).
    close: Option<Option<u16>>,
    /// The connection ended (EOF or error) or stayed open until the wait ran out.
    ended: bool,
}

impl Seen {
    fn json_pong(&self) -> bool {
        self.messages.iter().any(|m| m["type"] == "pong")
    }
}

/// A WebSocket client over raw TCP that sends whatever bytes it is given.
struct Raw {
    tcp: TcpStream,
}

impl Raw {
    /// Upgrades `GET /ws/{id}`; `None` if the server refused.
    async fn upgrade(addr: &str, id: &str) -> Option<Raw> {
        let attempt = async {
            let mut tcp = TcpStream::connect(addr).await.ok()?;
            tcp.set_nodelay(true).ok()?;
            let req = format!(
                "GET /ws/{id} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            );
            tcp.write_all(req.as_bytes()).await.ok()?;
            // Byte by byte, so that nothing after the response is consumed.
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                head.push(tcp.read_u8().await.ok()?);
            }
            head.starts_with(b"HTTP/1.1 101").then_some(Raw { tcp })
        };
        tokio::time::timeout(WAIT, attempt).await.ok().flatten()
    }

    /// Writes; false if the connection is gone (the server may close while we write).
    async fn write(&mut self, bytes: &[u8]) -> bool {
        matches!(
            tokio::time::timeout(WAIT, self.tcp.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// The next server frame (fin, opcode, payload) before `deadline`; `Err(true)` at EOF or on
    /// an error, `Err(false)` when the deadline passed.
    async fn frame(&mut self, deadline: tokio::time::Instant) -> Result<(bool, u8, Vec<u8>), bool> {
        let read = async {
            let b0 = self.tcp.read_u8().await.ok()?;
            let b1 = self.tcp.read_u8().await.ok()?;
            let len = match b1 & 0x7f {
                126 => self.tcp.read_u16().await.ok()? as usize,
                127 => self.tcp.read_u64().await.ok()? as usize,
                n => n as usize,
            };
            if b1 & 0x80 != 0 || len > 1 << 20 {
                return None; // servers never mask; nothing we expect is that big
            }
            let mut payload = vec![0; len];
            self.tcp.read_exact(&mut payload).await.ok()?;
            Some((b0 & 0x80 != 0, b0 & 0x0f, payload))
        };
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(true),
            Err(_) => Err(false),
        }
    }

    /// Reads until a close frame, the end of the connection, or `within` passed; or, with
    /// `until_pong`, until a JSON `pong` came.
    async fn watch(&mut self, within: Duration, until_pong: bool) -> Seen {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Seen::default();
        loop {
            match self.frame(deadline).await {
                Ok((_, TEXT, payload)) => {
                    let v = serde_json::from_slice(&payload)
                        .unwrap_or_else(|_| json!({"non_json": String::from_utf8_lossy(&payload)}));
                    seen.messages.push(v);
                    if until_pong && seen.json_pong() {
                        return seen;
                    }
                }
                Ok((_, CLOSE, payload)) => {
                    seen.close = Some(
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
                    );
                    seen.ended = true;
                    return seen;
                }
                Ok((_, PONG, _)) => seen.pongs += 1,
                Ok(_) => {} // server pings, anything else
                Err(ended) => {
                    seen.ended = ended;
                    return seen;
                }
            }
        }
    }

    /// Joins (masked text frame); false if that failed.
    async fn join(&mut self, rng: &mut StdRng, code: &str) -> bool {
        let msg = Ws::join_msg(Some(code)).to_string();
        if !self.write(&masked(rng, true, TEXT, msg.as_bytes())).await {
            return false;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.frame(deadline).await {
                Ok((_, TEXT, p)) => {
                    let v: Value = serde_json::from_slice(&p).unwrap_or(Value::Null);
                    return v["type"] == "join_success";
                }
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Protocol violations and unusual but valid framing
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Want {
    /// A close frame with one of these codes.
    Close(&'static [u16]),
    /// The socket keeps working: the JSON `ping` in (or after) the frames gets its `pong`.
    Pong,
}

struct Violation {
    label: String,
    bytes: Vec<u8>,
    want: Want,
}

const PROTOCOL: &[u16] = &[1002];
const INVALID_DATA: &[u16] = &[1007];
const TOO_BIG: &[u16] = &[1009];
const PING_JSON: &[u8] = b"{\"type\":\"ping\"}";

/// Invalid UTF-8 sequences: a bare continuation byte, an overlong encoding, a surrogate, a code
/// point above U+10FFFF, 0xFF, and a sequence cut short.
const BAD_UTF8: &[&[u8]] = &[
    b"\x80",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xff",
    b"\xe2\x82",
];

/// One violation of the given kind (0..KINDS), with random details.
const KINDS: usize = 24;

fn violation(rng: &mut StdRng, kind: usize) -> Violation {
    let mask: [u8; 4] = rng.random();
    let random_payload = |rng: &mut StdRng, max: usize| -> Vec<u8> {
        let n = rng.random_range(0..=max);
        (0..n).map(|_| rng.random()).collect()
    };
    let frame = |fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]| {
        RawFrame {
            fin,
            rsv,
            opcode,
            mask,
            payload,
            declared: None,
        }
        .encode()
    };
    let (label, bytes, want): (String, Vec<u8>, Want) = match kind {
        0 => {
            let opcode = *[TEXT, BINARY].choose(rng).unwrap();
            let payload = if rng.random_bool(0.5) {
                PING_JSON.to_vec()
            } else {
                random_payload(rng, 100)
            };
            (
                format!("unmasked data frame (opcode {opcode})"),
                frame(true, 0, opcode, None, &payload),
                Want::Close(PROTOCOL),
            )
        }
        1 => {
            let opcode = *[PING, PONG, CLOSE].choose(rng).unwrap();
            let payload = if opcode == CLOSE {
                1000u16.to_be_bytes().to_vec()
            } else {
                random_payload(rng, 50)
            };
            (
                format!("unmasked control frame (opcode {opcode})"),
                frame(true, 0, opcode, None, &payload),
                Want::Close(PROTOCOL),
            )
        }
        2 => {
            let opcode = rng.random_range(3..=7);
            (
                format!("reserved data opcode {opcode}"),
                frame(true, 0, opcode, Some(mask), &random_payload(rng, 100)),
                Want::Close(PROTOCOL),
            )
        }
        3 => {
            let opcode = rng.random_range(0xb..=0xf);
            (
                format!("reserved control opcode {opcode:#x}"),
                frame(true, 0, opcode, Some(mask), &random_payload(rng, 100)),
                Want::Close(PROTOCOL),
            )
        }
        4 => {
            let rsv = rng.random_range(1..=7);
            (
                format!("reserved bits {rsv:03b} on a text ping"),
                frame(true, rsv, TEXT, Some(mask), PING_JSON),
                Want::Close(PROTOCOL),
            )
        }
        5 => (
            "continuation frame without a message".into(),
            frame(
                rng.random(),
                0,
                CONTINUATION,
                Some(mask),
                &random_payload(rng, 50),
            ),
            Want::Close(PROTOCOL),
        ),
        6 => {
            let opcode = *[TEXT, BINARY].choose(rng).unwrap();
            let mut b = frame(false, 0, TEXT, Some(mask), b"{\"type\":");
            b.extend(frame(true, 0, opcode, Some(mask), b"\"ping\"}"));
            (
                format!("new data frame (opcode {opcode}) inside a fragmented message"),
                b,
                Want::Close(PROTOCOL),
            )
        }
        7 => {
            let opcode = *[PING, PONG].choose(rng).unwrap();
            (
                format!("fragmented control frame (opcode {opcode})"),
                frame(false, 0, opcode, Some(mask), b"x"),
                Want::Close(PROTOCOL),
            )
        }
        8 => {
            let opcode = *[PING, PONG].choose(rng).unwrap();
            let n = rng.random_range(126..=1000);
            (
                format!("control frame (opcode {opcode}) with {n} bytes"),
                frame(true, 0, opcode, Some(mask), &vec![b'p'; n]),
                Want::Close(PROTOCOL),
            )
        }
        9 => {
            let code = *[0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000]
                .choose(rng)
                .unwrap();
            (
                format!("close frame with the invalid code {code}"),
                frame(true, 0, CLOSE, Some(mask), &code.to_be_bytes()),
                Want::Close(PROTOCOL),
            )
        }
        10 => (
            "close frame with a 1-byte payload".into(),
            frame(true, 0, CLOSE, Some(mask), b"\x03"),
            Want::Close(PROTOCOL),
        ),
        11 => {
            let bad = BAD_UTF8.choose(rng).unwrap();
            let cut = rng.random_range(0..=PING_JSON.len());
            let mut p = PING_JSON[..cut].to_vec();
            p.extend_from_slice(bad);
            p.extend_from_slice(&PING_JSON[cut..]);
            (
                format!("invalid UTF-8 {bad:02x?} in a text frame at {cut}"),
                frame(true, 0, TEXT, Some(mask), &p),
                Want::Close(INVALID_DATA),
            )
        }
        12 => {
            let bad = BAD_UTF8.choose(rng).unwrap();
            let mut b = frame(false, 0, TEXT, Some(mask), b"{\"type\":\"pi");
            let mut rest = bad.to_vec();
            rest.extend_from_slice(b"ng\"}");
            b.extend(frame(true, 0, CONTINUATION, Some(mask), &rest));
            (
                format!("invalid UTF-8 {bad:02x?} in a continuation of a text message"),
                b,
                Want::Close(INVALID_DATA),
            )
        }
        13 => {
            let bad = BAD_UTF8.choose(rng).unwrap();
            let mut p = 1000u16.to_be_bytes().to_vec();
            p.extend_from_slice(b"bye ");
            p.extend_from_slice(bad);
            (
                format!("invalid UTF-8 {bad:02x?} in a close reason"),
                frame(true, 0, CLOSE, Some(mask), &p),
                Want::Close(INVALID_DATA),
            )
        }
        14 => {
            // Only the header and a little of the payload: the server must refuse on the header
            // (and unread bytes would make its close a TCP reset).
            let declared = rng.random_range(MAX_MESSAGE as u64 + 1..=4 * MAX_MESSAGE as u64);
            let opcode = *[TEXT, BINARY].choose(rng).unwrap();
            (
                format!("frame (opcode {opcode}) of {declared} bytes"),
                RawFrame {
                    fin: true,
                    rsv: 0,
                    opcode,
                    mask: Some(mask),
                    payload: &[b' '; 1024],
                    declared: Some(declared),
                }
                .encode(),
                Want::Close(TOO_BIG),
            )
        }
        15 => {
            let declared = rng.random_range(1u64 << 32..1u64 << 62);
            (
                format!("frame header declaring {declared} bytes"),
                RawFrame {
                    fin: true,
                    rsv: 0,
                    opcode: BINARY,
                    mask: Some(mask),
                    payload: b"",
                    declared: Some(declared),
                }
                .encode(),
                Want::Close(TOO_BIG),
            )
        }
        16 => (
            "64-bit length with the most significant bit set".into(),
            RawFrame {
                fin: true,
                rsv: 0,
                opcode: BINARY,
                mask: Some(mask),
                payload: b"",
                declared: Some((1 << 63) | rng.random_range(0..1u64 << 20)),
            }
            .encode(),
            // RFC 6455 §5.2 makes it a protocol error; it is also too big.
            Want::Close(&[1002, 1009]),
        ),
        17 => {
            // Each fragment within the limit, the message over it.
            let n = rng.random_range(2..=4);
            let part = MAX_MESSAGE / n + 1024;
            let mut b = Vec::new();
            for i in 0..n {
                let opcode = if i == 0 { TEXT } else { CONTINUATION };
                b.extend(frame(i == n - 1, 0, opcode, Some(mask), &vec![b' '; part]));
            }
            (
                format!("{n} fragments of {part} bytes"),
                b,
                Want::Close(TOO_BIG),
            )
        }
        18 => (
            // The header and the first KiB of "[" x 100000 (see kind 14).
            "100000 x [ in one text frame".into(),
            RawFrame {
                fin: true,
                rsv: 0,
                opcode: TEXT,
                mask: Some(mask),
                payload: &[b'['; 1024],
                declared: Some(100_000),
            }
            .encode(),
            Want::Close(TOO_BIG),
        ),
        // Valid framing that must keep working.
        19 => {
            let mut b = Vec::new();
            let cuts = split_points(rng, PING_JSON.len());
            for (i, w) in cuts.windows(2).enumerate() {
                let opcode = if i == 0 { TEXT } else { CONTINUATION };
                let last = i == cuts.len() - 2;
                b.extend(frame(last, 0, opcode, Some(mask), &PING_JSON[w[0]..w[1]]));
                if !last && rng.random_bool(0.5) {
                    b.extend(frame(true, 0, PING, Some(mask), b"between"));
                }
            }
            (
                format!("text ping in {} fragments, pings between", cuts.len() - 1),
                b,
                Want::Pong,
            )
        }
        20 => {
            let text = "{\"type\":\"ping\",\"x\":\"\u{e9}\u{20ac}\u{1f30a}\"}".as_bytes();
            // Inside the 4-byte character.
            let cut = text.len() - 5;
            let mut b = frame(false, 0, TEXT, Some(mask), &text[..cut]);
            b.extend(frame(true, 0, CONTINUATION, Some(mask), &text[cut..]));
            ("a character split across fragments".into(), b, Want::Pong)
        }
        21 => (
            "ping as a binary frame".into(),
            frame(true, 0, BINARY, Some(mask), PING_JSON),
            Want::Pong,
        ),
        22 => {
            let n = rng.random_range(0..=125);
            let mut b = frame(true, 0, PING, Some(mask), &vec![b'q'; n]);
            b.extend(frame(true, 0, TEXT, Some(mask), PING_JSON));
            (format!("protocol ping with {n} bytes"), b, Want::Pong)
        }
        _ => {
            // An empty fragmented message is answered with `error`, and the socket lives on.
            let mut b = frame(false, 0, TEXT, Some(mask), b"");
            b.extend(frame(true, 0, CONTINUATION, Some(mask), b""));
            b.extend(frame(true, 0, TEXT, Some(mask), PING_JSON));
            ("empty fragmented text message".into(), b, Want::Pong)
        }
    };
    Violation { label, bytes, want }
}

/// 0, some sorted cut points, `len`.
fn split_points(rng: &mut StdRng, len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..rng.random_range(1..=4))
        .map(|_| rng.random_range(1..len))
        .collect();
    cuts.push(0);
    cuts.push(len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

async fn protocol_violations(fuzz: &mut Fuzz) {
    // Every kind a few times, then kinds at random until the time is up. Failures are reported
    // per kind: how many of its cases failed, and the first of them.
    let mut tally: Vec<(usize, usize, Option<String>)> = vec![(0, 0, None); KINDS];
    let deadline = Instant::now() + FUZZ_TIME;
    for i in 0.. {
        let kind = match i {
            i if i < 3 * KINDS => i % KINDS,
            _ if Instant::now() < deadline => fuzz.rng.random_range(0..KINDS),
            _ => break,
        };
        let v = violation(&mut fuzz.rng, kind);
        // Half of them on a socket that joined a room first.
        let join = fuzz.rng.random_bool(0.5);
        fuzz.cases += 1;
        let (cases, failed, first) = &mut tally[kind];
        *cases += 1;
        if let Err(e) = check_violation(fuzz, &v, join).await {
            *failed += 1;
            first.get_or_insert(e);
        }
    }
    for (cases, failed, first) in tally {
        if let Some(first) = first {
            fuzz.fail(format!("{failed} of {cases}: {first}"));
        }
    }
}

async fn check_violation(fuzz: &mut Fuzz, v: &Violation, join: bool) -> Result<(), String> {
    let label = format!("{}{}", v.label, if join { " (joined)" } else { "" });
    let session = fuzz.ctx.session().await;
    let Some(mut raw) = Raw::upgrade(&fuzz.addr(), &session.id).await else {
        return Err(format!("{label}: upgrade refused"));
    };
    if join && !raw.join(&mut fuzz.rng, &session.code).await {
        return Err(format!("{label}: join failed"));
    }
    if !raw.write(&v.bytes).await {
        return Err(format!(
            "{label}: the server closed the socket during the write"
        ));
    }
    match v.want {
        Want::Close(codes) => {
            let seen = raw.watch(WAIT, false).await;
            match seen.close {
                Some(Some(code)) if codes.contains(&code) => Ok(()),
                Some(Some(code)) => Err(format!(
                    "{label}: close code {code}, expected {codes:?} ({seen:?})"
                )),
                Some(None) => Err(format!(
                    "{label}: close frame without a code, expected {codes:?}"
                )),
                None if seen.ended => Err(format!(
                    "{label}: connection dropped without a close frame, expected {codes:?}"
                )),
                None => Err(format!(
                    "{label}: still open after {WAIT:?}, expected a close with {codes:?}"
                )),
            }
        }
        Want::Pong => {
            let seen = raw.watch(WAIT, true).await;
            if seen.json_pong() {
                Ok(())
            } else {
                Err(format!("{label}: no pong, the socket broke: {seen:?}"))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Garbage
// ---------------------------------------------------------------------------------------------

async fn garbage(fuzz: &mut Fuzz) {
    let deadline = Instant::now() + FUZZ_TIME;
    let mut round = 0;
    while Instant::now() < deadline || round < 40 {
        fuzz.cases += 1;
        match round % 4 {
            0 => garbage_after_upgrade(fuzz).await,
            1 => random_frames(fuzz).await,
            2 => garbage_http(fuzz).await,
            _ => mangled_upgrade(fuzz).await,
        }
        round += 1;
    }
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(1..=max);
    (0..n).map(|_| rng.random()).collect()
}

/// Random bytes right after the upgrade (joined first or not).
async fn garbage_after_upgrade(fuzz: &mut Fuzz) {
    let session = fuzz.ctx.session().await;
    let Some(mut raw) = Raw::upgrade(&fuzz.addr(), &session.id).await else {
        fuzz.fail("garbage after upgrade: upgrade refused".into());
        return;
    };
    if fuzz.rng.random_bool(0.5) && !raw.join(&mut fuzz.rng, &session.code).await {
        fuzz.fail("garbage after upgrade: join failed".into());
        return;
    }
    let bytes = random_bytes(&mut fuzz.rng, 4096);
    raw.write(&bytes).await;
    raw.watch(Duration::from_millis(50), false).await;
}

/// A few random frames: any opcode, any bits, masked or not, random payloads.
async fn random_frames(fuzz: &mut Fuzz) {
    let session = fuzz.ctx.session().await;
    let Some(mut raw) = Raw::upgrade(&fuzz.addr(), &session.id).await else {
        fuzz.fail("random frames: upgrade refused".into());
        return;
    };
    let rng = &mut fuzz.rng;
    let mut bytes = Vec::new();
    for _ in 0..rng.random_range(1..=8) {
        let payload = if rng.random_bool(0.3) {
            let t = templates();
            t.choose(rng).unwrap().to_string().into_bytes()
        } else {
            random_bytes(rng, 300)
        };
        bytes.extend(
            RawFrame {
                fin: rng.random_bool(0.8),
                rsv: if rng.random_bool(0.8) {
                    0
                } else {
                    rng.random_range(0..8)
                },
                opcode: rng.random_range(0..16),
                mask: rng.random_bool(0.9).then(|| rng.random()),
                payload: &payload,
                declared: None,
            }
            .encode(),
        );
    }
    raw.write(&bytes).await;
    raw.watch(Duration::from_millis(50), false).await;
}

/// Random bytes instead of an HTTP request: refused (4xx) or dropped, never a 5xx.
async fn garbage_http(fuzz: &mut Fuzz) {
    let mut bytes = random_bytes(&mut fuzz.rng, 2048);
    if fuzz.rng.random_bool(0.5) {
        let mut req = b"GET /ws/".to_vec();
        req.append(&mut bytes);
        bytes = req;
    }
    if let Some(status) = http_exchange(&fuzz.addr(), &bytes).await {
        if status.starts_with(b"HTTP/1.1 5") {
            fuzz.fail(format!(
                "garbage instead of HTTP answered {:?}",
                String::from_utf8_lossy(&status)
            ));
        }
    }
}

/// An upgrade request with headers dropped, repeated, mangled or oversized: never a 5xx.
async fn mangled_upgrade(fuzz: &mut Fuzz) {
    let rng = &mut fuzz.rng;
    let id = if rng.random_bool(0.8) {
        uuid()
    } else {
        String::from_utf8_lossy(&random_bytes(rng, 80))
            .replace(['\r', '\n', ' '], "")
            .to_string()
    };
    let mut headers = vec![
        "Host: 127.0.0.1".to_string(),
        "Upgrade: websocket".into(),
        "Connection: Upgrade".into(),
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==".into(),
        "Sec-WebSocket-Version: 13".into(),
    ];
    for _ in 0..rng.random_range(1..=3) {
        let i = rng.random_range(0..headers.len());
        match rng.random_range(0..5) {
            0 => {
                headers.remove(i);
            }
            1 => headers.push(headers[i].clone()),
            2 => headers[i] = format!("{}: {}", headers[i].split(':').next().unwrap(), "x"),
            3 => headers.push(format!(
                "X-Junk: {}",
                "j".repeat(rng.random_range(1..20_000))
            )),
            _ => headers[i] = String::from_utf8_lossy(&random_bytes(rng, 60)).replace('\n', ""),
        }
        if headers.is_empty() {
            break;
        }
    }
    let req = format!("GET /ws/{id} HTTP/1.1\r\n{}\r\n\r\n", headers.join("\r\n"));
    if let Some(status) = http_exchange(&fuzz.addr(), req.as_bytes()).await {
        if status.starts_with(b"HTTP/1.1 5") {
            fuzz.fail(format!(
                "mangled upgrade {req:?} answered {:?}",
                String::from_utf8_lossy(&status)
            ));
        }
    }
}

/// Sends `bytes` on a new connection and returns the first line of the answer, if any came
/// within 300 ms (the server may well wait for the rest of a request that garbage began).
async fn http_exchange(addr: &str, bytes: &[u8]) -> Option<Vec<u8>> {
    let attempt = async {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        tcp.write_all(bytes).await.ok()?;
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") && line.len() < 256 {
            line.push(tcp.read_u8().await.ok()?);
        }
        Some(line)
    };
    tokio::time::timeout(Duration::from_millis(300), attempt)
        .await
        .ok()
        .flatten()
}
