//! `beach-road check`, the end-to-end probe, run as the real binary against real servers: a
//! two-instance cluster on one private `redis-server` behind a round-robin balancer (host and
//! joiner on different instances), the in-process engine, a cluster whose Redis is gone,
//! a port where nothing listens and one that never answers, and the JSON output.
//!
//! Every probe run is bounded ([`PROBE_LIMIT`], and the probe's own `--timeout`); servers,
//! redis-server and probes are killed when their handles drop, also on panic.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use common::{bounded, free_port, uuid, RedisServer, Server, ServerBuilder, TempDir};

/// Upper bound of one run of the binary (the probe's default --timeout is 10 s).
const PROBE_LIMIT: Duration = Duration::from_secs(20);

/// Every step of a green run, as the JSON output names them.
const STEPS: [&str; 12] = [
    "register",
    "host_ws",
    "join",
    "joiner_ws",
    "peer_joined",
    "relay_host_joiner",
    "relay_joiner_host",
    "offer",
    "fetch_offer",
    "answer",
    "take_answer",
    "leave",
];

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    /// The one line the probe prints (asserts there is exactly one).
    #[track_caller]
    fn line(&self) -> &str {
        let lines: Vec<&str> = self.stdout.lines().collect();
        eprintln!("probe ({:?}): {}", self.took, self.stdout.trim_end());
        assert_eq!(
            lines.len(),
            1,
            "not one line: {:?} (stderr {:?})",
            self.stdout,
            self.stderr
        );
        lines[0]
    }
}

/// Runs `beach-road ARGS` (bounded by [`PROBE_LIMIT`]; killed if it overruns).
async fn run_bin(args: &[&str]) -> Run {
    run_bin_env(args, &[]).await
}

/// As [`run_bin`], with the system's roots replaced by those of `env` (`SSL_CERT_FILE`).
async fn run_bin_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let start = Instant::now();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_beach-road"))
        .args(args)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn beach-road");
    let out = tokio::time::timeout(PROBE_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("beach-road {args:?} still running after {PROBE_LIMIT:?}"))
        .expect("beach-road output");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: start.elapsed(),
    }
}

/// `beach-road check --url URL EXTRA...`
async fn probe(url: &str, extra: &[&str]) -> Run {
    probe_env(url, extra, &[]).await
}

async fn probe_env(url: &str, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let mut args = vec!["check", "--url", url];
    args.extend_from_slice(extra);
    run_bin_env(&args, env).await
}

#[track_caller]
fn assert_green(run: &Run, url: &str) {
    let line = run.line();
    assert_eq!(run.code, Some(0), "{line} {}", run.stderr);
    assert!(line.starts_with(&format!("ok {url} in ")), "{line}");
    for step in STEPS {
        assert!(line.contains(&format!("{step} ")), "{step} missing: {line}");
    }
}

// ---------------------------------------------------------------------------------------------
// A round-robin balancer
// ---------------------------------------------------------------------------------------------

/// A round-robin TCP balancer: each new connection goes to the next instance, WebSocket
/// upgrades (`GET /ws/`) and other connections counted apart, as an ALB balances requests and
/// sockets: two consecutive sockets land on different instances whatever HTTP keep-alive does.
/// Records, per connection, whether it was a socket and where it went.
struct Balancer {
    port: u16,
    routes: Arc<Mutex<Vec<(bool, usize)>>>,
    accept: JoinHandle<()>,
}

impl Balancer {
    async fn start(upstreams: Vec<u16>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes = Arc::new(Mutex::new(Vec::new()));
        let log = routes.clone();
        // Owns every connection task: aborting it (drop) drops the set, which aborts them.
        let accept = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            let mut next = [0usize; 2];
            while let Ok((mut client, _)) = listener.accept().await {
                let ws = starts_with_ws(&client).await;
                let i = next[ws as usize] % upstreams.len();
                next[ws as usize] += 1;
                log.lock().unwrap().push((ws, i));
                let upstream = upstreams[i];
                conns.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Balancer {
            port,
            routes,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The instances the connections went to: (sockets, others).
    fn routes(&self) -> (Vec<usize>, Vec<usize>) {
        let routes = self.routes.lock().unwrap();
        let of = |ws: bool| routes.iter().filter(|r| r.0 == ws).map(|r| r.1).collect();
        (of(true), of(false))
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Whether the connection's first bytes are a WebSocket upgrade's (waits up to 2 s for them).
async fn starts_with_ws(client: &TcpStream) -> bool {
    const WS: &[u8] = b"GET /ws/";
    let mut buf = [0u8; 8];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(100), client.peek(&mut buf)).await {
            Ok(Ok(n)) if n >= WS.len() => return buf == WS,
            Ok(Ok(0)) | Ok(Err(_)) => return false,
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// A cluster
// ---------------------------------------------------------------------------------------------

/// Two instances on one private Redis behind a [`Balancer`]. Field order: the balancer and
/// the servers go before Redis.
struct Cluster {
    lb: Balancer,
    servers: Vec<Server>,
    redis: RedisServer,
}

impl Cluster {
    async fn start() -> Cluster {
        let redis = tokio::task::spawn_blocking(RedisServer::start)
            .await
            .unwrap();
        let secret = format!("check-{}-{}", uuid(), uuid());
        let starts = (0..2).map(|_| {
            ServerBuilder::new()
                .redis_url(&redis.url())
                .args(["--secret", &secret])
                .start()
        });
        let servers = join_all(starts).await;
        for s in &servers {
            wait_ready(s).await;
        }
        let lb = Balancer::start(servers.iter().map(Server::port).collect()).await;
        Cluster { lb, servers, redis }
    }
}

async fn wait_ready(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if s.api().get("/ready").await.map(|r| r.status).ok() == Some(200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("instance on {} not ready within 10 s", s.port());
}

// ---------------------------------------------------------------------------------------------
// TLS in front, as the ALB terminates it
// ---------------------------------------------------------------------------------------------

/// Terminates TLS on `listener` with `dir`'s certificate and forwards the plain bytes to the
/// instance on `upstream`. Owns its connection tasks (aborted with it).
struct TlsFront(JoinHandle<()>);

impl TlsFront {
    fn start(listener: TcpListener, dir: &Path, upstream: u16) -> TlsFront {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("front.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("front.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        TlsFront(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    let accept = acceptor.accept(client);
                    let Ok(Ok(mut tls)) =
                        tokio::time::timeout(Duration::from_secs(5), accept).await
                    else {
                        return;
                    };
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        }))
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_across_two_instances() {
    bounded(async {
        let cluster = Cluster::start().await;
        let url = cluster.lb.url();
        let run = probe(&url, &[]).await;
        assert_green(&run, &url);
        // The host's socket and the joiner's were on different instances (so were their HTTP
        // clients): the relays and the mailbox crossed Redis.
        let (sockets, http) = cluster.lb.routes();
        assert_eq!(sockets, vec![0, 1], "sockets went to {sockets:?}");
        assert!(
            http.contains(&0) && http.contains(&1),
            "HTTP went to {http:?}"
        );
        assert_eq!(cluster.servers.len(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_on_the_in_process_engine() {
    bounded(async {
        let server = Server::start().await;
        let run = probe(&server.base(), &[]).await;
        assert_green(&run, &server.base());
        // A trailing slash is the same URL.
        let run = probe(&format!("{}/", server.base()), &[]).await;
        assert_green(&run, &server.base());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_when_redis_is_gone() {
    bounded(async {
        let mut cluster = Cluster::start().await;
        tokio::task::block_in_place(|| cluster.redis.kill());
        let run = probe(&cluster.lb.url(), &[]).await;
        let line = run.line();
        assert_eq!(run.code, Some(1), "{line}");
        assert!(
            line.starts_with("check failed: register: HTTP 503 {\"error\":"),
            "{line}"
        );
        assert!(run.took < Duration::from_secs(10), "took {:?}", run.took);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_and_fast_when_nothing_listens() {
    bounded(async {
        let url = format!("http://127.0.0.1:{}", free_port());
        let run = probe(&url, &[]).await;
        let line = run.line();
        assert_eq!(run.code, Some(1), "{line}");
        assert!(line.starts_with("check failed: register: "), "{line}");
        assert!(line.to_lowercase().contains("refused"), "{line}");
        assert!(run.took < Duration::from_secs(3), "took {:?}", run.took);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_timeout_bounds_a_server_that_never_answers() {
    bounded(async {
        // Accepts connections and never answers; the connections live as long as the task.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mute = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let run = probe(&url, &["--timeout", "1s"]).await;
        mute.abort();
        let line = run.line();
        assert_eq!(run.code, Some(1), "{line}");
        assert_eq!(
            line,
            "check failed: register: timed out after 1s (the run's --timeout 1s)"
        );
        assert!(run.took < Duration::from_secs(4), "took {:?}", run.took);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_has_the_fields() {
    bounded(async {
        let server = Server::start().await;
        let run = probe(&server.base(), &["--json"]).await;
        assert_eq!(run.code, Some(0), "{}", run.stdout);
        let v: Value = serde_json::from_str(run.line()).expect("one JSON object");
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["url"], server.base().as_str());
        assert!(v["failed_step"].is_null() && v["reason"].is_null(), "{v}");
        assert!(v["total_ms"].as_f64().unwrap() > 0.0, "{v}");
        for step in STEPS {
            assert!(v["steps"][step].as_f64().is_some(), "{step} missing: {v}");
        }
        assert_eq!(v["steps"].as_object().unwrap().len(), STEPS.len());

        let url = format!("http://127.0.0.1:{}", free_port());
        let run = probe(&url, &["--json"]).await;
        assert_eq!(run.code, Some(1), "{}", run.stdout);
        let v: Value = serde_json::from_str(run.line()).expect("one JSON object");
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["failed_step"], "register", "{v}");
        assert!(v["reason"].as_str().unwrap().contains("refused"), "{v}");
        assert_eq!(v["steps"], serde_json::json!({}), "{v}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_command_line_is_unchanged() {
    bounded(async {
        let run = run_bin(&["--help"]).await;
        assert_eq!(run.code, Some(0));
        for flag in [
            "--port",
            "--bind",
            "--redis-url",
            "--public-url",
            "BEACH_ROAD_PORT",
        ] {
            assert!(run.stdout.contains(flag), "{flag} missing: {}", run.stdout);
        }
        assert!(run.stdout.contains("check"), "{}", run.stdout);
        let run = run_bin(&["check", "--help"]).await;
        assert_eq!(run.code, Some(0));
        for flag in ["--url", "--json", "--timeout"] {
            assert!(run.stdout.contains(flag), "{flag} missing: {}", run.stdout);
        }
        assert!(!run.stdout.contains("--redis-url"), "{}", run.stdout);
        // Server flags do not go with the subcommand; a bad URL is a usage error (2).
        let run = run_bin(&["--port", "1", "check", "--url", "http://127.0.0.1:1"]).await;
        assert_eq!(run.code, Some(2), "{}", run.stderr);
        let run = run_bin(&["check", "--url", "ftp://127.0.0.1"]).await;
        assert_eq!(run.code, Some(2), "{}", run.stderr);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_over_https_and_wss() {
    bounded(async {
        let dir = TempDir::new("check-tls");
        let at = dir.path().to_owned();
        tokio::task::spawn_blocking(move || common::tls::make_certs(&at, "front"))
            .await
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        // The instance hands out the front's URLs (https://, wss://), as behind the ALB.
        let server = ServerBuilder::new()
            .args(["--public-url", &url])
            .start()
            .await;
        let _front = TlsFront::start(listener, dir.path(), server.port());
        let ca = dir.join("ca.pem");
        let env = [("SSL_CERT_FILE", ca.to_str().unwrap())];
        let run = probe_env(&url, &[], &env).await;
        assert_green(&run, &url);
        // Without the CA among the roots the certificate is refused, and the line says so.
        let run = probe(&url, &[]).await;
        let line = run.line();
        assert_eq!(run.code, Some(1), "{line}");
        assert!(line.starts_with("check failed: register: "), "{line}");
        assert!(line.contains("certificate"), "{line}");
    })
    .await;
}
