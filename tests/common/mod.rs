//! Shared harness of the integration tests: the real `beach-road` binary on a free loopback
//! port, a WebSocket client, HTTP helpers, and [`conformance!`] to run one test body against
//! both engines (the Redis engine on one node and on a Redis Cluster).
//!
//! Every wait here is bounded: a server that does not come up, a message that does not arrive
//! or a test that hangs fails with a message instead of blocking the suite. Processes are killed
//! when their handle is dropped (also when a test panics). Nothing here uses port 8080 or the
//! system Redis on 6379: every port is a free ephemeral one.

#![allow(dead_code)]

pub mod flows;
pub mod metrics;
pub mod pair;
pub mod redis;
pub mod redis_cluster;
pub mod tls;

use std::fs::File;
use std::future::Future;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub use self::redis::RedisServer;
// Unused in the test binaries without a cluster (`-D warnings`).
#[allow(unused_imports)]
pub use self::redis_cluster::RedisCluster;

/// Default wait for one expected message or response.
pub const WAIT: Duration = Duration::from_secs(3);
/// Upper bound of one whole test body.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound of a server start (until `/health` answers 200).
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Server → client `type`s of protocol.md §4.2; anything else breaks the browser client.
pub const SERVER_TYPES: &[&str] = &[
    "join_success",
    "join_error",
    "peer_joined",
    "peer_left",
    "transport_proposal",
    "transport_accepted",
    "signal",
    "pong",
    "error",
    "debug",
];

/// Runs `fut` within [`TEST_TIMEOUT`].
pub async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    bounded_for(TEST_TIMEOUT, fut).await
}

/// Runs `fut` within `limit` (for tests that need more, or less, than [`TEST_TIMEOUT`]).
pub async fn bounded_for<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// Sender budgets high enough that one client floods unpaced (the defaults allow 50 frames/s
/// after a burst of 200): the flood then tests the receiver's queue, not the sender's budget
/// (which `security.rs` tests).
pub const UNPACED: [&str; 8] = [
    "--peer-messages-per-second",
    "1000000",
    "--peer-message-burst",
    "1000000",
    "--peer-bytes-per-second",
    "2000000000",
    "--peer-byte-burst",
    "2000000000",
];

/// A fresh UUID v4 string (session ids, client peer ids, handshake ids).
pub fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A loopback port that was free a moment ago (the caller retries if it is taken meanwhile).
pub fn free_port() -> u16 {
    let l = StdListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

fn temp_path(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "beach-road-test-{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A fresh directory under the system temp dir, `beach-road-{what}-{uuid}`. Removed on drop,
/// except while panicking (left for a look, as the server log is).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("beach-road-{what}-{}", uuid()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// `self/name`
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Engines and the per-test context
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Memory,
    Redis,
    /// The Redis engine on a Redis Cluster (three primaries, three replicas).
    RedisCluster,
}

/// One server (and, for the Redis engine, its own redis-server or Redis Cluster) for one test.
pub struct Ctx {
    pub engine: Engine,
    pub server: Server,
    /// Declared after `server` so the server is killed first.
    pub redis: Option<RedisServer>,
    pub cluster: Option<RedisCluster>,
}

impl Ctx {
    pub async fn start(engine: Engine) -> Ctx {
        Self::start_with(engine, ServerBuilder::new()).await
    }

    /// Starts with extra flags or environment; the Redis URL is added for [`Engine::Redis`].
    pub async fn start_with(engine: Engine, builder: ServerBuilder) -> Ctx {
        let redis = (engine == Engine::Redis).then(RedisServer::start);
        let cluster = (engine == Engine::RedisCluster)
            .then(|| tokio::task::block_in_place(RedisCluster::start));
        let url = match (&redis, &cluster) {
            (Some(r), _) => Some(r.url()),
            (_, Some(c)) => Some(c.url()),
            _ => None,
        };
        let builder = match url {
            Some(url) => builder.redis_url(&url),
            None => builder,
        };
        let server = builder.start().await;
        Ctx {
            engine,
            server,
            redis,
            cluster,
        }
    }

    pub fn api(&self) -> Api {
        self.server.api()
    }

    pub fn base(&self) -> String {
        self.server.base()
    }

    pub fn ws_url(&self, id: &str) -> String {
        self.server.ws_url(id)
    }

    /// Opens a WebSocket to `/ws/{id}`.
    pub async fn ws(&self, id: &str) -> Ws {
        Ws::connect(&self.ws_url(id)).await
    }

    /// Registers a fresh session (generated code).
    pub async fn session(&self) -> Session {
        self.session_with(None).await
    }

    /// Registers a fresh session with a client-chosen passphrase (generation 2).
    pub async fn session_with(&self, passphrase: Option<&str>) -> Session {
        self.api().new_session(passphrase).await
    }

    /// A registered session (generated code) and its host (role `server`), joined over
    /// `/ws/{host token}` as the CLIs do (the register response's URLs carry the token).
    pub async fn hosted(&self) -> (Session, Ws) {
        let session = self.session().await;
        let mut host = self.ws(&session.host).await;
        host.join(Some(&session.code)).await;
        (session, host)
    }

    /// A joiner as the CLIs join: HTTP join with the code, then the socket of the token its
    /// answer carries. Returns the joined socket and its token.
    pub async fn joiner(&self, session: &Session) -> (Ws, String) {
        let token = self.api().join_token(&session.id, &session.code).await;
        let mut ws = self.ws(&token).await;
        ws.join(Some(&session.code)).await;
        (ws, token)
    }

    /// A registered session with its host (role `server`) and one joiner (role `client`), each
    /// on the socket of its own token; the host's `peer_joined` is consumed.
    pub async fn room(&self) -> Room {
        let (session, mut host) = self.hosted().await;
        let (joiner, joiner_token) = self.joiner(&session).await;
        let joined = host.recv_type("peer_joined").await;
        assert_eq!(joined["peer"]["id"], joiner.id());
        Room {
            session,
            host,
            joiner,
            joiner_token,
        }
    }
}

pub struct Session {
    /// The public session id (what a joiner is told).
    pub id: String,
    pub code: String,
    /// The host's token: the id in the register response's URLs.
    pub host: String,
}

pub struct Room {
    pub session: Session,
    pub host: Ws,
    pub joiner: Ws,
    /// The joiner's token (its URLs' id: socket and mailbox).
    pub joiner_token: String,
}

/// The id in a signaling or WebSocket URL (`…/sessions/{X}/webrtc`, `…/peer-sessions/{X}/…`,
/// `…/ws/{X}`), as the CLIs extract it.
pub fn url_id(url: &str) -> String {
    let segments: Vec<&str> = url.split('/').collect();
    let at = segments
        .iter()
        .position(|s| *s == "sessions" || *s == "peer-sessions" || *s == "ws")
        .unwrap_or_else(|| panic!("no id in {url}"));
    segments[at + 1].to_owned()
}

/// Runs each `async fn name(ctx: &Ctx) { .. }` as three tests, `memory::name`, `redis::name` and
/// `cluster::name` (the Redis engine on a Redis Cluster), each with its own server (and
/// redis-server or cluster), bounded by [`TEST_TIMEOUT`].
#[macro_export]
macro_rules! conformance {
    ($(async fn $name:ident($ctx:ident: &Ctx) $body:block)*) => {
        $(async fn $name($ctx: &$crate::common::Ctx) $body)*

        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let ctx = $crate::common::Ctx::start($crate::common::Engine::Memory).await;
                    $crate::common::bounded(super::$name(&ctx)).await;
                }
            )*
        }

        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let ctx = $crate::common::Ctx::start($crate::common::Engine::Redis).await;
                    $crate::common::bounded(super::$name(&ctx)).await;
                }
            )*
        }

        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let ctx =
                        $crate::common::Ctx::start($crate::common::Engine::RedisCluster).await;
                    $crate::common::bounded(super::$name(&ctx)).await;
                }
            )*
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

/// Every test client connects from 127.0.0.1, where the per-address limits meant for one real
/// host would stop a test of a thousand clients (or sessions); so they are raised, as environment variables
/// that a test's own flags override (tests/hygiene.rs tests the limits themselves).
pub const MANY_CLIENTS: [(&str, &str); 4] = [
    ("BEACH_ROAD_MAX_SOCKETS_PER_ADDRESS", "1000000"),
    ("BEACH_ROAD_UPGRADES_PER_ADDRESS", "1000000"),
    ("BEACH_ROAD_MAX_CONNECTIONS_PER_ADDRESS", "1000000"),
    ("BEACH_ROAD_REGISTRATIONS_PER_MINUTE", "1000000"),
];

/// Where the server's stdout goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdout {
    /// stdout and stderr into one temp file ([`Server::log`]).
    File,
    /// stdout into a pipe nobody reads (it fills up); stderr still into the file.
    UnreadPipe,
}

pub struct ServerBuilder {
    redis_url: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    stdout: Stdout,
    port: Option<u16>,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerBuilder {
    pub fn new() -> Self {
        Self {
            redis_url: None,
            args: Vec::new(),
            env: Vec::new(),
            stdout: Stdout::File,
            port: None,
        }
    }

    pub fn redis_url(mut self, url: &str) -> Self {
        self.redis_url = Some(url.to_owned());
        self
    }

    /// Extra command-line arguments, e.g. `["--idle-timeout", "2s"]`.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn stdout(mut self, stdout: Stdout) -> Self {
        self.stdout = stdout;
        self
    }

    /// A fixed port (e.g. to restart a server where it was); default: a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Spawns the binary and waits (bounded) until `GET /health` is 200. Retries on another
    /// port if the chosen one was taken in the meantime.
    pub async fn start(self) -> Server {
        let mut last = String::new();
        for _ in 0..3 {
            let port = self.port.unwrap_or_else(free_port);
            let mut server = self.spawn(port);
            match server.wait_healthy(START_TIMEOUT).await {
                Ok(()) => return server,
                Err(why) => {
                    last = format!("{why}\n--- server log ---\n{}", server.log());
                    if self.port.is_some() {
                        break;
                    }
                }
            }
        }
        panic!("beach-road did not become healthy: {last}");
    }

    fn spawn(&self, port: u16) -> Server {
        let log_path = temp_path("server.log");
        let log = File::create(&log_path).expect("create the server log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_beach-road"));
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .env_remove("REDIS_URL")
            .env_remove("BEACH_SESSION_SERVER")
            .env_remove("BEACH_ROAD_PORT")
            .env_remove("BEACH_ROAD_BIND")
            .envs(MANY_CLIENTS)
            .stdin(Stdio::null())
            .stderr(log.try_clone().unwrap());
        if let Some(url) = &self.redis_url {
            cmd.args(["--redis-url", url]);
        }
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        match self.stdout {
            Stdout::File => cmd.stdout(log),
            Stdout::UnreadPipe => cmd.stdout(Stdio::piped()),
        };
        let mut child = cmd.spawn().expect("spawn beach-road");
        let pipe = child.stdout.take();
        Server {
            child,
            port,
            log_path,
            _pipe: pipe,
            exited: None,
        }
    }
}

/// A running `beach-road` process; SIGKILLed and reaped on drop.
pub struct Server {
    child: Child,
    port: u16,
    log_path: PathBuf,
    /// Held open and never read (see [`Stdout::UnreadPipe`]).
    _pipe: Option<ChildStdout>,
    exited: Option<ExitStatus>,
}

impl Server {
    /// A server on the in-process engine with default flags.
    pub async fn start() -> Server {
        ServerBuilder::new().start().await
    }

    pub fn builder() -> ServerBuilder {
        ServerBuilder::new()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `http://127.0.0.1:PORT`
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `ws://127.0.0.1:PORT/ws/{id}`
    pub fn ws_url(&self, id: &str) -> String {
        format!("ws://127.0.0.1:{}/ws/{id}", self.port)
    }

    pub fn api(&self) -> Api {
        Api::new(&self.base())
    }

    /// Sends a signal (`libc::SIGSTOP`, `SIGCONT`, `SIGTERM`, `SIGKILL`, ...).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// Everything the process wrote to the log file so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_path(&self) -> &std::path::Path {
        &self.log_path
    }

    /// Waits (bounded) until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.log().contains(needle)
    }

    /// The exit status if the process has ended.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /health` once: status and body (`None` when the request fails or times out).
    pub async fn health(&self) -> Option<(u16, Value)> {
        let resp = self.api().get("/health").await.ok()?;
        Some((resp.status, resp.body))
    }

    /// Waits until `GET /health` answers 200, or the process exits, or `timeout` passes.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit() {
                return Err(format!("beach-road exited during start: {status}"));
            }
            match self.health().await {
                Some((200, _)) => return Ok(()),
                Some((status, body)) => last = format!("{status} {body}"),
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("/health not 200 within {timeout:?}: {last}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "beach-road log (port {}): {}\n{}",
                self.port,
                self.log_path.display(),
                tail(&self.log(), 60)
            );
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// One HTTP answer: status and JSON body (`Null` when the body is empty; a non-JSON body is
/// kept as a JSON string).
#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
}

impl Resp {
    #[track_caller]
    pub fn assert_status(&self, status: u16) -> &Self {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.body
        );
        self
    }
}

/// The mailbox routes' two prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `/sessions/{id}/webrtc/...` (missing: 404)
    Sessions,
    /// `/peer-sessions/{pid}/webrtc/...` (missing: 409)
    PeerSessions,
}

impl Scope {
    pub fn prefix(self) -> &'static str {
        match self {
            Scope::Sessions => "sessions",
            Scope::PeerSessions => "peer-sessions",
        }
    }

    /// The status of "unknown" and "nothing yet" on this prefix.
    pub fn missing(self) -> u16 {
        match self {
            Scope::Sessions => 404,
            Scope::PeerSessions => 409,
        }
    }
}

/// HTTP client of one server; every request bounded by [`WAIT`].
#[derive(Clone)]
pub struct Api {
    pub base: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(base: &str) -> Api {
        let client = reqwest::Client::builder()
            .timeout(WAIT)
            .no_proxy()
            .build()
            .expect("http client");
        Api {
            base: base.trim_end_matches('/').to_owned(),
            client,
        }
    }

    async fn finish(resp: reqwest::Response) -> Resp {
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("read the response body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Resp { status, body }
    }

    /// `GET path` (path includes any query); `Err` when the request fails or times out.
    pub async fn get(&self, path: &str) -> Result<Resp, reqwest::Error> {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await?;
        Ok(Self::finish(resp).await)
    }

    /// `POST path` with a raw body (content-type JSON).
    pub async fn post_raw(&self, path: &str, body: impl Into<String>) -> Resp {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.into())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        Self::finish(resp).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Resp {
        self.post_raw(path, body.to_string()).await
    }

    pub async fn get_ok(&self, path: &str) -> Resp {
        self.get(path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// `POST /sessions`; asserts 200 and returns the body.
    pub async fn register(&self, id: &str, passphrase: Option<&str>) -> Value {
        let r = self
            .post(
                "/sessions",
                &json!({ "session_id": id, "passphrase": passphrase }),
            )
            .await;
        r.assert_status(200);
        r.body
    }

    /// Registers a fresh session (`None`: a generated code); asserts success.
    pub async fn new_session(&self, passphrase: Option<&str>) -> Session {
        self.new_session_with_id(&uuid(), passphrase).await
    }

    /// Registers session `id`; asserts success.
    pub async fn new_session_with_id(&self, id: &str, passphrase: Option<&str>) -> Session {
        let body = self.register(id, passphrase).await;
        assert_eq!(body["success"], true, "register failed: {body}");
        let signaling = body["transports"][0]["metadata"]["signaling_url"]
            .as_str()
            .unwrap();
        Session {
            code: body["join_code"].as_str().unwrap().to_owned(),
            host: url_id(signaling),
            id: id.to_owned(),
        }
    }

    /// HTTP join with the code; asserts success and returns the joiner's token (the id of the
    /// answer's signaling URL).
    pub async fn join_token(&self, id: &str, code: &str) -> String {
        let body = self.join_http(id, Some(code)).await;
        assert_eq!(body["success"], true, "join failed: {body}");
        url_id(body["webrtc_offer"]["signaling_url"].as_str().unwrap())
    }

    /// `GET /sessions/{id}`
    pub async fn status(&self, id: &str) -> Resp {
        self.get_ok(&format!("/sessions/{id}")).await
    }

    /// `POST /sessions/{id}/join`; asserts 200 and returns the body.
    pub async fn join_http(&self, id: &str, passphrase: Option<&str>) -> Value {
        let r = self
            .post(
                &format!("/sessions/{id}/join"),
                &json!({ "passphrase": passphrase }),
            )
            .await;
        r.assert_status(200);
        r.body
    }

    /// `POST /peer-sessions/attach`.
    pub async fn attach(&self, host: &str, passphrase: Option<&str>, role: &str) -> Resp {
        self.post(
            "/peer-sessions/attach",
            &json!({ "host_session_id": host, "passphrase": passphrase,
                     "peer_id": uuid(), "role": role }),
        )
        .await
    }

    /// Attaches and returns the peer-session id (asserts 200).
    pub async fn peer_session(&self, host: &str, passphrase: &str) -> String {
        let r = self.attach(host, Some(passphrase), "offerer").await;
        r.assert_status(200);
        r.body["peer_session_id"].as_str().unwrap().to_owned()
    }

    /// `POST /{scope}/{id}/webrtc/{offer|answer}`.
    pub async fn post_sdp(&self, scope: Scope, id: &str, kind: &str, payload: &Value) -> Resp {
        self.post(&format!("/{}/{id}/webrtc/{kind}", scope.prefix()), payload)
            .await
    }

    /// `GET /{scope}/{id}/webrtc/offer?peer_id=P`.
    pub async fn get_offer(&self, scope: Scope, id: &str, peer: &str) -> Resp {
        self.get_ok(&format!(
            "/{}/{id}/webrtc/offer?peer_id={peer}",
            scope.prefix()
        ))
        .await
    }

    /// `GET /{scope}/{id}/webrtc/answer?handshake_id=H`.
    pub async fn get_answer(&self, scope: Scope, id: &str, handshake: &str) -> Resp {
        self.get_ok(&format!(
            "/{}/{id}/webrtc/answer?handshake_id={handshake}",
            scope.prefix()
        ))
        .await
    }
}

/// An SDP mailbox payload (protocol.md §3.3).
pub fn sdp(kind: &str, handshake: &str, from: &str, to: &str) -> Value {
    json!({ "sdp": format!("v=0 {kind} {handshake}"), "type": kind, "handshake_id": handshake,
            "from_peer": from, "to_peer": to })
}

/// A generation-2 payload: empty `sdp`, the real one in `sealed`.
pub fn sealed_sdp(kind: &str, handshake: &str, from: &str, to: &str) -> Value {
    json!({ "sdp": "", "type": kind, "handshake_id": handshake, "from_peer": from,
            "to_peer": to,
            "sealed": { "version": 1, "nonce": "2XQ1CnOwvRAEHUJE",
                        "ciphertext": format!("c1ph3r/{kind}/{handshake}+==") } })
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

/// A WebSocket client as the beach CLIs are: JSON text frames, never a close frame when quitting.
pub struct Ws {
    ws: WebSocketStream<TcpStream>,
    url: String,
    /// The server-assigned peer id, once joined.
    pub peer_id: Option<String>,
}

impl Ws {
    /// Connects (bounded by [`WAIT`]); panics on failure.
    pub async fn connect(url: &str) -> Ws {
        match Self::try_connect(url).await {
            Ok(ws) => ws,
            Err(e) => panic!("WebSocket connect to {url}: {e}"),
        }
    }

    /// Connects (bounded by [`WAIT`]); the error says why the upgrade failed.
    pub async fn try_connect(url: &str) -> Result<Ws, String> {
        let attempt = async {
            let addr = url
                .strip_prefix("ws://")
                .and_then(|rest| rest.split('/').next())
                .ok_or_else(|| format!("not a ws:// url: {url}"))?;
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            let (ws, _) = tokio_tungstenite::client_async(url, tcp)
                .await
                .map_err(|e| match e {
                    tokio_tungstenite::tungstenite::Error::Http(resp) => {
                        format!("HTTP {}", resp.status().as_u16())
                    }
                    e => e.to_string(),
                })?;
            Ok(Ws {
                ws,
                url: url.to_owned(),
                peer_id: None,
            })
        };
        match tokio::time::timeout(WAIT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(format!("connect to {url} timed out")),
        }
    }

    /// The stream itself, to split it (reading and writing at once).
    pub fn into_stream(self) -> WebSocketStream<TcpStream> {
        self.ws
    }

    /// The server-assigned peer id (panics before `join_success`).
    pub fn id(&self) -> String {
        self.peer_id.clone().expect("this socket has not joined")
    }

    pub async fn send(&mut self, msg: Message) {
        let r = tokio::time::timeout(WAIT, self.ws.send(msg)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("send on {}: {e}", self.url),
            Err(_) => panic!("send on {} timed out", self.url),
        }
    }

    /// Sends and reports failure instead of panicking (for sockets the server may close).
    pub async fn try_send(&mut self, msg: Message) -> bool {
        matches!(
            tokio::time::timeout(WAIT, self.ws.send(msg)).await,
            Ok(Ok(()))
        )
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send(Message::text(v.to_string())).await
    }

    pub async fn send_text(&mut self, s: &str) {
        self.send(Message::text(s.to_owned())).await
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.send(Message::binary(bytes)).await
    }

    /// The next data frame within `timeout`: `Ok(Some(json))`, `Ok(None)` on timeout,
    /// `Err(close)` when the server closed (close frame, EOF or error). Protocol pings and
    /// pongs are skipped (tungstenite answers pings itself). Every JSON message is checked
    /// against the server → client types of protocol.md §4.2.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Value>, Closed> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Err(Closed::Eof),
                Ok(Some(Err(e))) => return Err(Closed::Error(e.to_string())),
                Ok(Some(Ok(frame))) => frame,
            };
            let text = match frame {
                Message::Text(t) => t.to_string(),
                Message::Binary(b) => {
                    panic!("server sent a binary frame on {}: {b:?}", self.url)
                }
                Message::Close(frame) => return Err(Closed::Frame(frame)),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("server sent non-JSON text {text:?}: {e}"));
            let ty = v["type"].as_str().unwrap_or("");
            assert!(
                SERVER_TYPES.contains(&ty),
                "server sent a type outside protocol.md §4.2: {v}"
            );
            return Ok(Some(v));
        }
    }

    /// The next JSON message within [`WAIT`]; panics on timeout or close.
    #[track_caller]
    pub fn recv_json(&mut self) -> impl Future<Output = Value> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            match self.next(WAIT).await {
                Ok(Some(v)) => v,
                Ok(None) => panic!("{caller}: no message within {WAIT:?} on {}", self.url),
                Err(c) => panic!("{caller}: socket {} closed while waiting: {c:?}", self.url),
            }
        }
    }

    /// The next message, which must have type `ty`.
    #[track_caller]
    pub fn recv_type<'a>(&'a mut self, ty: &'a str) -> impl Future<Output = Value> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let v = match self.next(WAIT).await {
                Ok(Some(v)) => v,
                Ok(None) => panic!("{caller}: no `{ty}` within {WAIT:?} on {}", self.url),
                Err(c) => panic!(
                    "{caller}: socket {} closed while waiting for `{ty}`: {c:?}",
                    self.url
                ),
            };
            assert_eq!(v["type"], ty, "{caller}: expected `{ty}`, got {v}");
            v
        }
    }

    /// Asserts that no message arrives within `d` (and the socket stays open).
    #[track_caller]
    pub fn expect_silence(&mut self, d: Duration) -> impl Future<Output = ()> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            match self.next(d).await {
                Ok(None) => {}
                Ok(Some(v)) => panic!("{caller}: expected silence on {}, got {v}", self.url),
                Err(c) => panic!(
                    "{caller}: expected silence on {}, socket closed: {c:?}",
                    self.url
                ),
            }
        }
    }

    /// Waits (bounded by [`WAIT`]) for the server to close; returns how. Messages before the
    /// close are returned too.
    pub async fn expect_close(&mut self) -> (Vec<Value>, Closed) {
        let mut before = Vec::new();
        loop {
            match self.next(WAIT).await {
                Ok(Some(v)) => before.push(v),
                Ok(None) => panic!("{} not closed within {WAIT:?}; got {before:?}", self.url),
                Err(c) => return (before, c),
            }
        }
    }

    /// A `join` message as the generation-1 CLI sends it.
    pub fn join_msg(passphrase: Option<&str>) -> Value {
        json!({ "type": "join", "peer_id": uuid(), "passphrase": passphrase,
                "supported_transports": ["webrtc"], "preferred_transport": "webrtc",
                "label": null, "mcp": false })
    }

    /// Joins with [`Ws::join_msg`]; returns `join_success` (panics on anything else).
    pub async fn join(&mut self, passphrase: Option<&str>) -> Value {
        self.join_with(Self::join_msg(passphrase)).await
    }

    /// Sends a `join` message, expects `join_success`, remembers the assigned peer id.
    pub async fn join_with(&mut self, msg: Value) -> Value {
        self.send_json(msg).await;
        let v = self.recv_json().await;
        assert_eq!(v["type"], "join_success", "join failed: {v}");
        self.peer_id = Some(v["peer_id"].as_str().expect("peer_id").to_owned());
        v
    }

    /// Sends `join`, expects `join_error`, returns its reason.
    pub async fn join_refused(&mut self, passphrase: Option<&str>) -> String {
        self.send_json(Self::join_msg(passphrase)).await;
        let v = self.recv_type("join_error").await;
        v["reason"].as_str().expect("reason").to_owned()
    }

    /// Quits as the CLIs do: TCP close (FIN) without a WebSocket close frame.
    pub async fn close_abruptly(self) {
        let mut tcp = self.ws.into_inner();
        let _ = tokio::time::timeout(WAIT, tokio::io::AsyncWriteExt::shutdown(&mut tcp)).await;
        drop(tcp);
    }

    /// Quits with a TCP reset (SO_LINGER 0), no close frame.
    pub async fn reset(self) {
        let tcp = self.ws.into_inner();
        tcp.set_zero_linger().expect("SO_LINGER 0");
        drop(tcp);
    }

    /// A polite close (close frame), which the real clients never send.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(WAIT, self.ws.close(None)).await;
    }
}

/// How a socket ended.
#[derive(Debug)]
pub enum Closed {
    Frame(Option<CloseFrame>),
    Eof,
    Error(String),
}

impl Closed {
    /// The close code, if a close frame was received.
    pub fn code(&self) -> Option<u16> {
        match self {
            Closed::Frame(Some(f)) => Some(f.code.into()),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON shapes
// ---------------------------------------------------------------------------------------------

/// Keys of an object, sorted (for shape assertions).
pub fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

/// Asserts that `v` is an object with exactly `expected` keys.
#[track_caller]
pub fn assert_keys(v: &Value, expected: &[&str]) {
    let mut e: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    e.sort();
    assert_eq!(keys(v), e, "keys of {v}");
}

/// The entry for peer `id` in the `peers` of a `join_success`.
#[track_caller]
pub fn find_peer<'a>(join_success: &'a Value, id: &str) -> &'a Value {
    join_success["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("peer {id} not in {join_success}"))
}

/// A generated join code: six ASCII digits.
pub fn is_six_digits(code: &str) -> bool {
    code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit())
}

/// `"0100…"` → its bytes.
pub fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
