//! `beach-road check --url URL [--json] [--timeout 10s]`: a synthetic end-to-end probe for
//! alerting. It plays a generation-1 host and joiner against a running deployment, through the
//! URL and then through the URLs the answers carry, as the clients do (`docs/protocol.md` §1,
//! `docs/protocol.md`): register, host socket (join, ping), HTTP join, joiner socket, the host's
//! `peer_joined`, one `signal` each way, offer and answer through the mailbox, leave.
//!
//! Host and joiner use separate HTTP clients and sockets, so behind a load balancer they can land
//! on different instances, as two real machines do. Every step is bounded by [`STEP_TIMEOUT`]
//! and the whole run by `--timeout`; the output is one line (or one JSON object) on stdout.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::protocol::new_id;

mod client;
use self::client::*;

/// Upper bound of one step (and of one HTTP request), within the run's `--timeout`.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// The mailbox poll interval of the clients (`poll_interval_ms`).
const POLL: Duration = Duration::from_millis(250);
/// Longest piece of a response quoted in a failure.
const QUOTE: usize = 200;
/// The label both peers join with (it shows in PeerInfo and the server's logs).
const LABEL: &str = "beach-road-check";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Base URL of the deployment (the load balancer's), http:// or https://.
    #[arg(long, value_parser = base_url)]
    pub url: String,

    /// Print one JSON object (ok, url, total_ms, steps in ms, failed_step, reason).
    #[arg(long)]
    pub json: bool,

    /// Upper bound of the whole run; each step is bounded by 5 s within it.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    pub timeout: Duration,
}

fn base_url(s: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(s.trim()).map_err(|e| e.to_string())?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("not an http:// or https:// URL".into());
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be greater than zero".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// One step: its key in the JSON output and its name in the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step(pub &'static str, pub &'static str);

pub const REGISTER: Step = Step("register", "register");
pub const HOST_WS: Step = Step("host_ws", "host websocket");
pub const JOIN: Step = Step("join", "join");
pub const JOINER_WS: Step = Step("joiner_ws", "joiner websocket");
pub const PEER_JOINED: Step = Step("peer_joined", "peer_joined");
pub const RELAY_HOST: Step = Step("relay_host_joiner", "relay host->joiner");
pub const RELAY_JOINER: Step = Step("relay_joiner_host", "relay joiner->host");
pub const OFFER: Step = Step("offer", "offer");
pub const FETCH_OFFER: Step = Step("fetch_offer", "fetch offer");
pub const ANSWER: Step = Step("answer", "answer");
pub const TAKE_ANSWER: Step = Step("take_answer", "take answer");
pub const LEAVE: Step = Step("leave", "leave");

#[derive(Debug)]
pub struct Failure {
    pub step: Step,
    pub reason: String,
}

/// What a run did: the steps that passed with their durations, and the failure if any.
#[derive(Debug)]
pub struct Report {
    pub url: String,
    pub total: Duration,
    pub steps: Vec<(Step, Duration)>,
    pub failure: Option<Failure>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// `5s`, or `2.5s` (to a tenth).
fn secs(d: Duration) -> String {
    let tenths = (d.as_secs_f64() * 10.0).round() as u64;
    match tenths % 10 {
        0 => format!("{}s", tenths / 10),
        t => format!("{}.{t}s", tenths / 10),
    }
}

/// One line: control characters (newlines in a response body) become spaces.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Report {
    /// `ok URL in N ms (register 3.1 ms, ...)` or `check failed: STEP: REASON`.
    pub fn line(&self) -> String {
        match &self.failure {
            None => {
                let steps: Vec<String> = self
                    .steps
                    .iter()
                    .map(|(s, d)| format!("{} {:.1} ms", s.0, ms(*d)))
                    .collect();
                let total = ms(self.total).round();
                format!("ok {} in {total} ms ({})", self.url, steps.join(", "))
            }
            Some(f) => one_line(&format!("check failed: {}: {}", f.step.1, f.reason)),
        }
    }

    pub fn json(&self) -> Value {
        let steps: serde_json::Map<String, Value> = self
            .steps
            .iter()
            .map(|(s, d)| (s.0.to_owned(), json!(ms(*d))))
            .collect();
        json!({
            "ok": self.failure.is_none(),
            "url": self.url,
            "total_ms": ms(self.total),
            "steps": steps,
            "failed_step": self.failure.as_ref().map(|f| f.step.0),
            "reason": self.failure.as_ref().map(|f| one_line(&f.reason)),
        })
    }
}

/// The subcommand: runs the probe on its own small runtime and prints its report.
pub fn main(args: CheckArgs) -> ExitCode {
    // Reading the system's roots is blocking file I/O: done before the runtime runs.
    let clients = match Clients::new() {
        Ok(c) => c,
        Err(e) => {
            println!("check failed: setup: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("check failed: setup: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(run(&args.url, args.timeout, &clients));
    // A resolver thread stuck in getaddrinfo must not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(100));
    if args.json {
        println!("{}", report.json());
    } else {
        println!("{}", report.line());
    }
    if report.failure.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The host's and the joiner's HTTP clients (two pools, so behind a load balancer they can
/// reach different instances) and the TLS settings of every connection: rustls with ring and
/// the system's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured), as the Redis
/// connection uses.
pub struct Clients {
    host: reqwest::Client,
    joiner: reqwest::Client,
    tls: Arc<rustls::ClientConfig>,
}

impl Clients {
    pub fn new() -> Result<Clients, String> {
        let mut roots = rustls::RootCertStore::empty();
        // No root at all only matters for https://, where the handshake then says so.
        let _ = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Clients {
            host: http_client(&tls)?,
            joiner: http_client(&tls)?,
            tls: Arc::new(tls),
        })
    }
}

/// Runs every step against `base` within `timeout`.
pub async fn run(base: &str, timeout: Duration, clients: &Clients) -> Report {
    let start = Instant::now();
    let mut clock = Clock {
        deadline: start + timeout,
        timeout,
        steps: Vec::new(),
    };
    let failure = flow(&mut clock, base, clients).await.err();
    Report {
        url: base.to_owned(),
        total: start.elapsed(),
        steps: clock.steps,
        failure,
    }
}

struct Clock {
    deadline: Instant,
    timeout: Duration,
    steps: Vec<(Step, Duration)>,
}

impl Clock {
    /// Runs one step within [`STEP_TIMEOUT`] and what is left of the run; records its time.
    async fn step<T>(
        &mut self,
        step: Step,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, Failure> {
        let start = Instant::now();
        let left = self.deadline.saturating_duration_since(start);
        let (limit, whose) = if left < STEP_TIMEOUT {
            (
                left,
                format!(" (the run's --timeout {})", secs(self.timeout)),
            )
        } else {
            (STEP_TIMEOUT, String::new())
        };
        let reason = match tokio::time::timeout(limit, work).await {
            Ok(Ok(v)) => {
                self.steps.push((step, start.elapsed()));
                return Ok(v);
            }
            Ok(Err(reason)) => reason,
            Err(_) => format!("timed out after {}{whose}", secs(limit)),
        };
        Err(Failure { step, reason })
    }
}

/// A peer's URLs from a register or join answer: its signaling URL (mailbox) and socket.
struct Urls {
    signaling: String,
    ws: String,
}

async fn flow(clock: &mut Clock, base: &str, clients: &Clients) -> Result<(), Failure> {
    let (host_http, joiner_http, tls) = (&clients.host, &clients.joiner, &clients.tls);
    let id = new_id();
    let (code, host) = clock.step(REGISTER, register(host_http, base, &id)).await?;
    let (mut host_ws, host_id) = clock
        .step(HOST_WS, open(&host.ws, tls, &id, &code, "server"))
        .await?;
    let joiner = clock
        .step(JOIN, join(joiner_http, base, &id, &code))
        .await?;
    let (mut joiner_ws, joiner_id) = clock
        .step(JOINER_WS, open(&joiner.ws, tls, &id, &code, "client"))
        .await?;
    clock
        .step(PEER_JOINED, async {
            loop {
                let v = recv(&mut host_ws, "peer_joined").await?;
                if v["peer"]["id"] == joiner_id.as_str() {
                    return Ok(());
                }
            }
        })
        .await?;

    let h = new_id();
    let ice = |n: u32| {
        json!({"transport": "webrtc", "signal": {"signal_type": "ice_candidate",
            "candidate": format!("candidate:{n} 1 udp 1 192.0.2.{n} 9 typ host"),
            "sdp_mid": "", "sdp_mline_index": 0, "handshake_id": h}})
    };
    let (a, b) = (&mut host_ws, &mut joiner_ws);
    clock
        .step(RELAY_HOST, relay(a, b, &host_id, &joiner_id, ice(1)))
        .await?;
    clock
        .step(RELAY_JOINER, relay(b, a, &joiner_id, &host_id, ice(2)))
        .await?;

    // The mailbox as generation 1 uses it: `{signaling_url}/offer|answer` of each peer's URLs.
    let sdp = |kind: &str, from: &str, to: &str| {
        json!({"sdp": format!("v=0 beach-road check {kind} {h}"), "type": kind,
               "handshake_id": h, "from_peer": from, "to_peer": to})
    };
    let offer = sdp("offer", &host_id, &joiner_id);
    let answer = sdp("answer", &joiner_id, &host_id);
    let offers = format!("{}/offer", host.signaling);
    clock.step(OFFER, post(host_http, &offers, &offer)).await?;
    let my_offers = format!("{}/offer?peer_id={joiner_id}", joiner.signaling);
    clock
        .step(FETCH_OFFER, poll(joiner_http, &my_offers, &offer))
        .await?;
    let answers = format!("{}/answer", joiner.signaling);
    clock
        .step(ANSWER, post(joiner_http, &answers, &answer))
        .await?;
    let my_answer = format!("{}/answer?handshake_id={h}", host.signaling);
    clock
        .step(TAKE_ANSWER, poll(host_http, &my_answer, &answer))
        .await?;

    clock
        .step(LEAVE, async {
            joiner_ws.close(None).await.map_err(|e| chain(&e))?;
            loop {
                let v = recv(&mut host_ws, "peer_left").await?;
                if v["peer_id"] == joiner_id.as_str() {
                    break;
                }
            }
            host_ws.close(None).await.map_err(|e| chain(&e))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_durations() {
        assert_eq!(
            base_url("https://road.example.com/").unwrap(),
            "https://road.example.com"
        );
        assert_eq!(
            base_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(base_url("ws://a").is_err());
        assert!(base_url("road.example.com").is_err());
        assert!(positive_duration("0s").is_err());
        assert_eq!(secs(Duration::from_secs(5)), "5s");
        assert_eq!(secs(Duration::from_millis(2500)), "2.5s");
        assert_eq!(secs(Duration::from_micros(999_990)), "1s");
    }

    #[test]
    fn reports_are_one_line() {
        let mut r = Report {
            url: "http://a".into(),
            total: Duration::from_millis(12),
            steps: vec![(REGISTER, Duration::from_micros(1234))],
            failure: None,
        };
        assert_eq!(r.line(), "ok http://a in 12 ms (register 1.2 ms)");
        r.failure = Some(Failure {
            step: RELAY_HOST,
            reason: "HTTP 503 {\"error\":\n\"x\"}".into(),
        });
        assert_eq!(
            r.line(),
            "check failed: relay host->joiner: HTTP 503 {\"error\": \"x\"}"
        );
        let j = r.json();
        assert_eq!(j["ok"], false);
        assert_eq!(j["failed_step"], "relay_host_joiner");
        assert_eq!(j["steps"]["register"], 1.2);
        assert!(quote(&"x".repeat(500)).len() < 210);
    }
}
