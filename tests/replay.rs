//! Replay of real client traffic (`transcripts/`, copied from `../shared/transcripts/`; see
//! its README): the recorded CLIENT side of both client generations is played against our
//! server, on both engines, and every server reply is compared with the recorded one.
//!
//! What is compared: per connection, the order of replies; for HTTP the status, the JSON body's
//! shape (same keys recursively, same JSON value types) and the headers the clients may rely on;
//! for WebSocket frames the same for each JSON message. Strings must be equal once the values
//! that naturally differ are substituted (below). Times, `remote_addr` (ours: an IP address
//! without port) and ports differ freely.
//!
//! # Substitutions
//!
//! The same for every connection: the host:port of the base URL, the session id `S` (a fresh
//! one), the server-assigned peer ids (learned from our `join_success` / `peer_joined`), and the
//! generated join code (only in `passphrase` and `join_code` fields).
//!
//! The ids of URLs are substituted *by role*, the way the real clients derive them from our
//! answers (`docs/protocol.md`). The recorded server put `S` into every URL and answered both
//! attaches with one shared peer session `P`; ours hands each client its own token. Every
//! connection belongs to one client (`host-*` or `join-*`), and a client uses, for a recorded
//! id, what the latest answer *it* got gave it in place of that id:
//!
//! - Host. The register answer carries its token `H` in `signaling_url`, the `web_socket` URL
//!   and `websocket_url`: from then on the recorded `S` is `H` in the host's requests
//!   (generation 1: `/ws/H`, `/sessions/H/webrtc/...`; generation 2: attach with
//!   `host_session_id = H`, taken from the signaling URL). Generation 2's attach answers
//!   `peer_session_id = H` (recorded: `P`) and `host_session_id = S`: from then on the host's `P`
//!   is `H` (`/ws/H`, `/peer-sessions/H/...`, `join.metadata.peer_session_id`) and its `S` is `S`
//!   again (`join.metadata.host_session_id`).
//! - Joiner. Its HTTP join goes to `/sessions/S/join` (the id it was told). The answer carries its
//!   own token `T` in the same URLs, and everything after follows as for the host, with `T`
//!   (generation 1: `/ws/T`, `/sessions/T/webrtc/...`; generation 2: attach with `T`, then
//!   `/ws/T`, `/peer-sessions/T/...`). Generation 2's fallback socket (`join-ws-2`) opens
//!   `/ws/S`: after the attach the recorded `S` is the attach answer's `host_session_id`.
//!
//! The same rule gives what our replies must say: a client's own token in the URLs of its
//! register / join answer (learned there from the `web_rtc` transport's `signaling_url`, then
//! required in every other URL field) and as its attach answer's `peer_session_id` (required to
//! be the token it attached with, not learned); the public `S` in `session_id`, `session_url`,
//! `host_session_id` and `join_success.session_id`, whoever asks. Every token must be fresh (a
//! UUID, neither `S` nor another client's token), must never appear in a WebSocket frame (all
//! members read those: generation 2's `join.metadata.peer_session_id` is absent from our
//! PeerInfo, which the recording had) nor in an answer to the other client.
//!
//! # Order and timing
//!
//! The recorded gaps (30 s between pings, ...) are not slept; only the order is kept.
//! HTTP requests are played at the position of their recorded *response*: that is the order
//! in which the original server handled them, so poll loops (404/409, then 200) come out the
//! same (in gen 1 a `GET answer` was answered 404 before the concurrent `POST answer` was).
//! HTTP goes over raw TCP with exactly the recorded request line and headers, on the same
//! keep-alive connections as recorded. The replay takes a few seconds, well within the join
//! timeout (10 s) that now closes generation 2's never-joining fallback socket; what that
//! socket gets from start to close is checked on its own, with a 1 s join timeout
//! ([`generation2_fallback_socket`]).
//!
//! Where the recorded server did something protocol.md §7 calls a bug, the expectation is
//! corrected before the replay (see [`correct_recorded_bugs`]) and our correct behaviour is
//! asserted instead.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use common::{hex_bytes, url_id, uuid, Ctx, Engine, ServerBuilder, Ws, WAIT};

const GEN1: &str = include_str!("transcripts/gen1-host-join.jsonl");
const GEN2: &str = include_str!("transcripts/gen2-host-join.jsonl");

/// How long a socket must stay quiet where the recording shows no reply.
const QUIET: Duration = Duration::from_millis(300);

/// The recorded server's public host:port.
const RECORDED_HOST: &str = "127.0.0.1:8080";

fn parse(transcript: &str) -> Vec<Value> {
    transcript
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("transcript line is JSON"))
        .collect()
}

fn is(e: &Value, conn: Option<&str>, dir: &str, kind: &str) -> bool {
    conn.is_none_or(|c| e["conn"] == c) && e["dir"] == dir && e["kind"] == kind
}

const C2S: &str = "client->server";
const S2C: &str = "server->client";

fn ws_type(e: &Value) -> Option<&str> {
    if e["kind"] == "ws_text" {
        e["payload"]["type"].as_str()
    } else {
        None
    }
}

/// Corrects the recorded expectations where the original server had a bug (protocol.md §7.8:
/// "`peer_left` was sent for sockets that never joined"), so that our correct behaviour is
/// asserted instead. Returns what was changed, for the caller to check against what is known
/// about the transcript.
///
/// 1. A recorded `peer_left` whose peer id never joined (gen 2: the joiner's fallback socket
///    `join-ws-2`, which only sends binary frames) is dropped: we must not send it.
/// 2. When a joined socket closes, every other joined socket of the room still open must get
///    `peer_left` for it. Where the recording lacks it (gen 2: the host never heard that the
///    joiner left; the original announced the fallback socket's id instead), it is inserted
///    right after the close.
fn correct_recorded_bugs(events: &mut Vec<Value>) -> Vec<String> {
    let mut fixes = Vec::new();
    // Server-assigned id of each joined socket, by connection.
    let mut joined: HashMap<String, String> = HashMap::new();
    for e in events.iter() {
        if is(e, None, S2C, "ws_text") && ws_type(e) == Some("join_success") {
            let conn = e["conn"].as_str().unwrap().to_owned();
            joined.insert(conn, e["payload"]["peer_id"].as_str().unwrap().to_owned());
        }
    }
    let ids: HashSet<&str> = joined.values().map(String::as_str).collect();
    let before = events.len();
    events.retain(|e| {
        let never_joined = |id: &Value| !ids.contains(id.as_str().unwrap());
        ws_type(e) != Some("peer_left") || !never_joined(&e["payload"]["peer_id"])
    });
    if events.len() != before {
        fixes.push(format!(
            "dropped {} peer_left for a socket that never joined",
            before - events.len()
        ));
    }

    let index = |events: &[Value], pred: &dyn Fn(&Value) -> bool| events.iter().position(pred);
    let closed_at = |events: &[Value], conn: &str| {
        index(events, &|e: &Value| {
            e["conn"] == conn
                && e["dir"] == C2S
                && (e["kind"] == "tcp_fin" || e["kind"] == "tcp_rst")
        })
        .unwrap_or(events.len())
    };
    let mut conns: Vec<(String, String)> = joined.into_iter().collect();
    conns.sort();
    for (leaver, leaver_id) in &conns {
        let close = closed_at(events, leaver);
        if close == events.len() {
            continue;
        }
        for (other, _) in conns.iter().filter(|(c, _)| c != leaver) {
            let joined_before = index(events, &|e: &Value| {
                e["conn"] == other.as_str() && ws_type(e) == Some("join_success")
            })
            .is_some_and(|j| j < close);
            if !joined_before || closed_at(events, other) < close {
                continue;
            }
            let heard = events.iter().any(|e| {
                e["conn"] == other.as_str()
                    && ws_type(e) == Some("peer_left")
                    && e["payload"]["peer_id"] == leaver_id.as_str()
            });
            if !heard {
                events.insert(
                    close + 1,
                    json!({"conn": other, "dir": S2C, "kind": "ws_text", "payload_format": "json",
                           "payload": {"type": "peer_left", "peer_id": leaver_id}}),
                );
                fixes.push(format!("inserted peer_left for {leaver} on {other}"));
            }
        }
    }
    fixes
}

/// The two clients of a transcript; every connection belongs to one (`host-*`, `join-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    Host,
    Joiner,
}

impl Client {
    fn of(conn: &str) -> Client {
        if conn.starts_with("host-") {
            Client::Host
        } else if conn.starts_with("join-") {
            Client::Joiner
        } else {
            panic!("connection {conn} belongs to no known client")
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Keys of our replies that carry the public session id, whoever asks.
const PUBLIC_ID_KEYS: &[&str] = &["session_id", "session_url", "host_session_id"];

/// Recorded → ours (see the module docs).
#[derive(Default)]
struct Subst {
    /// The same for every connection: host:port, the session id, the peer ids.
    common: Vec<(String, String)>,
    /// Per client: the ids it took from the answers it got; a later answer overrides.
    own: [Vec<(String, String)>; 2],
    /// The join code, substituted only in `passphrase` and `join_code` fields.
    code: Option<(String, String)>,
    /// Our session id.
    session: String,
    /// The tokens our server issued, and to whom.
    tokens: Vec<(Client, String)>,
}

impl Subst {
    /// A value the same for every client (peer ids): the first mapping wins.
    fn learn(&mut self, recorded: &Value, ours: &Value) {
        if let (Some(r), Some(o)) = (recorded.as_str(), ours.as_str()) {
            if !self.common.iter().any(|(from, _)| from == r) {
                self.common.push((r.to_owned(), o.to_owned()));
            }
        }
    }

    /// What `client` uses for `recorded` from now on (it got `ours` in an answer).
    fn learn_own(&mut self, client: Client, recorded: &str, ours: &str) {
        let own = &mut self.own[client.index()];
        own.retain(|(from, _)| from != recorded);
        own.push((recorded.to_owned(), ours.to_owned()));
    }

    /// A token our server gave `client` where the recording has `recorded`: it must be fresh.
    fn issue_token(&mut self, what: &str, client: Client, recorded: &str, ours: &str) {
        assert!(
            uuid::Uuid::parse_str(ours).is_ok(),
            "{what}: the URL's id {ours:?} is not a token (a UUID)"
        );
        assert_ne!(
            ours, self.session,
            "{what}: the URLs carry the public session id, not a token"
        );
        assert!(
            !self.tokens.iter().any(|(_, t)| t == ours),
            "{what}: token {ours} was issued before: {:?}",
            self.tokens
        );
        self.tokens.push((client, ours.to_owned()));
        self.learn_own(client, recorded, ours);
    }

    /// The mappings in force for `client` (`None`: only the common ones), its own first.
    fn pairs(&self, client: Option<Client>) -> Vec<(&str, &str)> {
        let own: &[(String, String)] = client.map_or(&[], |c| &self.own[c.index()]);
        let shadowed = |from: &str| own.iter().any(|(o, _)| o == from);
        own.iter()
            .chain(self.common.iter().filter(|(from, _)| !shadowed(from)))
            .map(|(from, to)| (from.as_str(), to.as_str()))
            .collect()
    }

    fn str(&self, client: Option<Client>, s: &str) -> String {
        let mut s = s.to_owned();
        for (from, to) in self.pairs(client) {
            if s.contains(from) {
                s = s.replace(from, to);
            }
        }
        s
    }

    /// A recorded request of `client` (target, body, WebSocket payload), as it sends it to us.
    fn request(&self, client: Client, v: &Value) -> Value {
        self.value_at(v, "", Some(client), false)
    }

    /// A recorded reply to `client`, as ours must be: as [`Subst::request`], except that
    /// [`PUBLIC_ID_KEYS`] hold the public session id.
    fn expected(&self, client: Client, v: &Value) -> Value {
        self.value_at(v, "", Some(client), true)
    }

    fn value_at(&self, v: &Value, key: &str, client: Option<Client>, reply: bool) -> Value {
        match v {
            Value::String(s) => match &self.code {
                Some((from, to)) if (key == "passphrase" || key == "join_code") && s == from => {
                    Value::String(to.clone())
                }
                _ if reply && PUBLIC_ID_KEYS.contains(&key) => Value::String(self.str(None, s)),
                _ => Value::String(self.str(client, s)),
            },
            Value::Array(a) => Value::Array(
                a.iter()
                    .map(|x| self.value_at(x, key, client, reply))
                    .collect(),
            ),
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, x)| (self.str(client, k), self.value_at(x, k, client, reply)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// Tokens reach their holders only: none in a WebSocket frame (`to: None`, every member
    /// reads them), none of the other client's in an HTTP answer to `to`.
    #[track_caller]
    fn assert_no_foreign_token(&self, what: &str, to: Option<Client>, text: &str) {
        for (holder, token) in &self.tokens {
            if Some(*holder) != to {
                assert!(
                    !text.contains(token.as_str()),
                    "{what}: the {holder:?}'s token {token} shown to {}: {text}",
                    to.map_or("every member".to_owned(), |c| format!("the {c:?}"))
                );
            }
        }
    }
}

/// Compares our value with the recorded one (already substituted): same keys recursively, same
/// JSON types, equal strings and booleans; numbers only by kind. Arrays of PeerInfo are
/// compared as sets (by id). Mismatches are collected with their JSON path.
fn compare(path: &str, rec: &Value, ours: &Value, errs: &mut Vec<String>) {
    match (rec, ours) {
        (Value::Object(r), Value::Object(o)) => {
            let is_peer = r.contains_key("joined_at");
            for k in r.keys() {
                if !o.contains_key(k) {
                    errs.push(format!("{path}: missing key `{k}`"));
                }
            }
            for k in o.keys() {
                // The webrtc metadata of a join answer carries the joiner's `label` (the gen-2
                // server sent it, the gen-1 server did not; it is an extra key in an object
                // the clients read by name).
                let label_in_offer = k == "label"
                    && (path.ends_with(".webrtc_offer") || path.ends_with(".metadata"));
                if !r.contains_key(k) && !label_in_offer {
                    errs.push(format!("{path}: unexpected key `{k}`"));
                }
            }
            for (k, rv) in r {
                let Some(ov) = o.get(k) else { continue };
                let p = format!("{path}.{k}");
                if is_peer && k == "metadata" {
                    compare_peer_metadata(&p, rv, ov, errs);
                } else {
                    compare(&p, rv, ov, errs);
                }
            }
        }
        (Value::Array(r), Value::Array(o)) => {
            if r.len() != o.len() {
                errs.push(format!(
                    "{path}: {} elements, recorded {}",
                    o.len(),
                    r.len()
                ));
                return;
            }
            let by_id = |a: &[Value]| {
                let mut a = a.to_vec();
                if a.iter().all(|x| x.get("joined_at").is_some()) {
                    a.sort_by(|x, y| x["id"].as_str().cmp(&y["id"].as_str()));
                }
                a
            };
            let (r, o) = (by_id(r), by_id(o));
            for (i, (rv, ov)) in r.iter().zip(&o).enumerate() {
                compare(&format!("{path}[{i}]"), rv, ov, errs);
            }
        }
        (Value::String(r), Value::String(o)) => {
            if r != o {
                errs.push(format!("{path}: {o:?}, recorded {r:?}"));
            }
        }
        (Value::Number(r), Value::Number(o)) => {
            if r.is_u64() != o.is_u64() || r.is_f64() != o.is_f64() {
                errs.push(format!("{path}: number kind {o}, recorded {r}"));
            }
        }
        (Value::Bool(r), Value::Bool(o)) if r == o => {}
        (Value::Null, Value::Null) => {}
        (r, o) => errs.push(format!("{path}: {o}, recorded {r}")),
    }
}

/// PeerInfo `metadata` is a string map whose keys legitimately differ (protocol.md §4.2: it
/// "may carry" label, remote_addr, mcp and the generation-2 client's keys; the original
/// added `role`/`session_id` of its own and dropped the client's keys in `join_success`).
/// Ours must be a string map with `remote_addr` (an IP address, no port: the recorded one had
/// one), keep a recorded `label`, and show no `peer_session_id`: generation 2 copies its token
/// there, and a metadata value equal to the socket's token is dropped (the recording has it).
fn compare_peer_metadata(path: &str, rec: &Value, ours: &Value, errs: &mut Vec<String>) {
    let Some(o) = ours.as_object() else {
        errs.push(format!("{path}: not an object: {ours}"));
        return;
    };
    if o.values().any(|v| !v.is_string()) {
        errs.push(format!("{path}: non-string value: {ours}"));
    }
    match o.get("remote_addr").and_then(Value::as_str) {
        None => errs.push(format!("{path}: no remote_addr")),
        Some(addr) if addr.parse::<std::net::IpAddr>().is_err() => {
            errs.push(format!("{path}.remote_addr: {addr:?} is not an IP address"))
        }
        Some(_) => {}
    }
    if rec.get("peer_session_id").is_some() && o.contains_key("peer_session_id") {
        errs.push(format!("{path}: peer_session_id (a token) shown: {ours}"));
    }
    if let Some(label) = rec.get("label") {
        if o.get("label") != Some(label) {
            errs.push(format!(
                "{path}.label: {:?}, recorded {label}",
                o.get("label")
            ));
        }
    }
}

#[track_caller]
fn assert_same(what: &str, rec: &Value, ours: &Value) {
    let mut errs = Vec::new();
    compare("$", rec, ours, &mut errs);
    assert!(
        errs.is_empty(),
        "{what}: our reply differs from the recorded one:\n  {}\nours:     {ours}\nrecorded: {rec}",
        errs.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 over a kept-alive TCP connection
// ---------------------------------------------------------------------------------------------

struct HttpConn {
    io: BufReader<TcpStream>,
    /// Requests sent by the client, played when their response is due.
    pending: VecDeque<Value>,
}

struct RawResponse {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl HttpConn {
    async fn open(port: u16) -> HttpConn {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        HttpConn {
            io: BufReader::new(tcp),
            pending: VecDeque::new(),
        }
    }

    /// Sends `client`'s recorded request (target, headers and body substituted for it) and our answer.
    async fn exchange(
        &mut self,
        req: &Value,
        subst: &Subst,
        client: Client,
        host: &str,
    ) -> RawResponse {
        let body = match req["body_format"].as_str() {
            Some("json") => subst.request(client, &req["body"]).to_string().into_bytes(),
            Some("text") => subst
                .str(Some(client), req["body"].as_str().unwrap())
                .into_bytes(),
            _ => Vec::new(),
        };
        let target = subst.str(Some(client), req["target"].as_str().unwrap());
        let mut head = format!("{} {target} HTTP/1.1\r\n", req["method"].as_str().unwrap());
        for (name, value) in req["headers"].as_object().unwrap() {
            let value = match name.to_ascii_lowercase().as_str() {
                "host" => host.to_owned(),
                "content-length" => body.len().to_string(),
                _ => value.as_str().unwrap().to_owned(),
            };
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let exchange = async {
            let tcp = self.io.get_mut();
            tcp.write_all(head.as_bytes()).await?;
            tcp.write_all(&body).await?;
            self.read_response().await
        };
        match tokio::time::timeout(WAIT, exchange).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("{} {target}: {e}", req["method"]),
            Err(_) => panic!("{} {target}: no response within {WAIT:?}", req["method"]),
        }
    }

    async fn read_response(&mut self) -> std::io::Result<RawResponse> {
        let mut line = String::new();
        self.io.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = HashMap::new();
        loop {
            line.clear();
            self.io.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("header line");
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
        let mut body = Vec::new();
        if status == 204 || status == 304 || status < 200 {
            // no body
        } else if let Some(n) = headers.get("content-length") {
            body.resize(n.parse().expect("content-length"), 0);
            self.io.read_exact(&mut body).await?;
        } else if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
            loop {
                line.clear();
                self.io.read_line(&mut line).await?;
                let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
                let mut chunk = vec![0; size + 2];
                self.io.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            panic!("response {status} without length: {headers:?}");
        }
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The replay
// ---------------------------------------------------------------------------------------------

struct WsConn {
    ws: Ws,
    binary_sent: usize,
}

enum Conn {
    Http(HttpConn),
    /// Upgrade requested, not yet answered.
    WsPending(Value),
    Ws(Box<WsConn>),
    Closed,
}

/// Drains what a socket received beyond the recording: nothing, except at most one `error`
/// per binary non-JSON frame it sent (the fallback socket of gen 2).
async fn drain_extra(name: &str, c: &mut WsConn) {
    let mut errors = 0;
    loop {
        match c.ws.next(QUIET).await {
            Ok(Some(v)) => {
                assert!(
                    v["type"] == "error" && errors < c.binary_sent,
                    "{name}: unexpected message {v} (the recording has none here)"
                );
                errors += 1;
            }
            Ok(None) => break,
            Err(closed) => panic!("{name}: the server closed the socket: {closed:?}"),
        }
    }
}

async fn replay(ctx: &Ctx, transcript: &str, expected_fixes: &[&str]) {
    let mut events = parse(transcript);
    let fixes = correct_recorded_bugs(&mut events);
    assert_eq!(fixes, expected_fixes, "corrections of recorded server bugs");

    let port = ctx.server.port();
    let host = format!("127.0.0.1:{port}");
    let mut subst = Subst {
        session: uuid(),
        ..Subst::default()
    };
    subst.common.push((RECORDED_HOST.to_owned(), host.clone()));
    let recorded_session = events
        .iter()
        .find(|e| is(e, None, C2S, "http_request") && e["path"] == "/sessions")
        .expect("a registration")["body"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    subst.common.push((recorded_session, subst.session.clone()));

    let mut conns: HashMap<String, Conn> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        let name = e["conn"].as_str().unwrap().to_owned();
        let client = Client::of(&name);
        let at = format!("event {i} ({name}, t={})", e["t"]);
        let is_ws_conn = name.contains("-ws");
        match (e["dir"].as_str().unwrap(), e["kind"].as_str().unwrap()) {
            (C2S, "tcp_connect") => {
                if !is_ws_conn {
                    conns.insert(name, Conn::Http(HttpConn::open(port).await));
                }
            }
            (C2S, "http_request") => match conns.get_mut(&name) {
                Some(Conn::Http(h)) => h.pending.push_back(e.clone()),
                None if is_ws_conn => {
                    conns.insert(name, Conn::WsPending(e.clone()));
                }
                _ => panic!("{at}: request on a closed connection"),
            },
            (S2C, "http_response") => match conns.get_mut(&name) {
                Some(Conn::Http(h)) => {
                    let req = h.pending.pop_front().expect("a request to answer");
                    let resp = h.exchange(&req, &subst, client, &host).await;
                    check_http(&at, client, &req, e, &resp, &mut subst);
                }
                Some(Conn::WsPending(req)) => {
                    assert_eq!(e["status"], 101, "{at}");
                    let path = subst.str(Some(client), req["path"].as_str().unwrap());
                    let url = format!("ws://{host}{path}");
                    let ws = match Ws::try_connect(&url).await {
                        Ok(ws) => ws,
                        Err(why) => panic!("{at}: upgrade of {path} refused: {why}"),
                    };
                    conns.insert(name, Conn::Ws(Box::new(WsConn { ws, binary_sent: 0 })));
                }
                _ => panic!("{at}: response on a closed connection"),
            },
            (C2S, "ws_text") => {
                let Some(Conn::Ws(c)) = conns.get_mut(&name) else {
                    panic!("{at}: no socket")
                };
                let payload = subst.request(client, &e["payload"]);
                c.ws.send_json(payload).await;
            }
            (C2S, "ws_binary") => {
                let Some(Conn::Ws(c)) = conns.get_mut(&name) else {
                    panic!("{at}: no socket")
                };
                c.ws.send_binary(hex_bytes(e["payload"].as_str().unwrap()))
                    .await;
                c.binary_sent += 1;
            }
            (S2C, "ws_text") => {
                let Some(Conn::Ws(c)) = conns.get_mut(&name) else {
                    panic!("{at}: no socket")
                };
                let rec = &e["payload"];
                let ours = match c.ws.next(WAIT).await {
                    Ok(Some(v)) => v,
                    Ok(None) => panic!("{at}: expected {rec}, got nothing within {WAIT:?}"),
                    Err(closed) => panic!("{at}: expected {rec}, socket closed: {closed:?}"),
                };
                learn_ws(rec, &ours, &mut subst);
                subst.assert_no_foreign_token(&at, None, &ours.to_string());
                assert_same(&at, &subst.expected(client, rec), &ours);
            }
            (C2S, "tcp_fin") | (C2S, "tcp_rst") => match conns.insert(name.clone(), Conn::Closed) {
                Some(Conn::Ws(mut c)) => {
                    drain_extra(&name, &mut c).await;
                    if e["kind"] == "tcp_rst" {
                        c.ws.reset().await;
                    } else {
                        c.ws.close_abruptly().await;
                    }
                }
                Some(Conn::Http(h)) => {
                    assert!(h.pending.is_empty(), "{at}: unanswered requests");
                    let mut tcp = h.io.into_inner();
                    let _ = tcp.shutdown().await;
                }
                _ => {}
            },
            (S2C, "tcp_fin") | (S2C, "tcp_rst") => {}
            (dir, kind) => panic!("{at}: unexpected event {dir} {kind}"),
        }
    }
    // Whatever is still open got nothing beyond the recording.
    for (name, conn) in conns.iter_mut() {
        if let Conn::Ws(c) = conn {
            drain_extra(name, c).await;
        }
    }
}

/// Learns the server-assigned ids of a WebSocket reply (before comparing it).
fn learn_ws(rec: &Value, ours: &Value, subst: &mut Subst) {
    match rec["type"].as_str() {
        Some("join_success") => {
            subst.learn(&rec["peer_id"], &ours["peer_id"]);
            // The other peers: matched by role (one server, the rest known by now).
            if let (Some(r), Some(o)) = (rec["peers"].as_array(), ours["peers"].as_array()) {
                for rp in r {
                    let candidates: Vec<&Value> =
                        o.iter().filter(|op| op["role"] == rp["role"]).collect();
                    if candidates.len() == 1 {
                        subst.learn(&rp["id"], &candidates[0]["id"]);
                    }
                }
            }
        }
        Some("peer_joined") => subst.learn(&rec["peer"]["id"], &ours["peer"]["id"]),
        _ => {}
    }
}

fn check_http(
    at: &str,
    client: Client,
    req: &Value,
    rec: &Value,
    ours: &RawResponse,
    subst: &mut Subst,
) {
    let what = format!("{at}: {} {}", req["method"], req["target"]);
    assert_eq!(
        ours.status,
        rec["status"].as_u64().unwrap() as u16,
        "{what}: status (body {:?})",
        String::from_utf8_lossy(&ours.body)
    );
    subst.assert_no_foreign_token(&what, Some(client), &String::from_utf8_lossy(&ours.body));
    let rec_headers = rec["headers"].as_object().unwrap();
    // The browser client needs CORS on every answer.
    if rec_headers.contains_key("access-control-allow-origin") {
        assert_eq!(
            ours.headers
                .get("access-control-allow-origin")
                .map(String::as_str),
            Some("*"),
            "{what}: CORS header"
        );
    }
    match rec["body_format"].as_str() {
        Some("json") => {
            let ct = ours
                .headers
                .get("content-type")
                .cloned()
                .unwrap_or_default();
            assert!(
                ct.starts_with("application/json"),
                "{what}: content-type {ct:?}"
            );
            let body: Value = serde_json::from_slice(&ours.body)
                .unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}"));
            let rb = &rec["body"];
            // Values the server chooses: learn them first.
            learn_http(&what, client, req, rb, &body, subst);
            if let (Some(r), Some(o)) = (rb["join_code"].as_str(), body["join_code"].as_str()) {
                subst.code = Some((r.to_owned(), o.to_owned()));
            }
            assert_same(&what, &subst.expected(client, rb), &body);
        }
        Some("empty") if ours.status < 300 => {
            assert!(
                ours.body.is_empty(),
                "{what}: body {:?}, recorded none",
                String::from_utf8_lossy(&ours.body)
            );
        }
        // 404/409 of the mailbox: the original sent no body, ours a JSON `{"error": ...}`;
        // the clients poll on the status only.
        Some("empty") => {
            if !ours.body.is_empty() {
                let body: Value = serde_json::from_slice(&ours.body)
                    .unwrap_or_else(|e| panic!("{what}: error body is not JSON: {e}"));
                assert!(body["error"].is_string(), "{what}: {body}");
            }
        }
        other => panic!("{what}: unexpected recorded body format {other:?}"),
    }
}

/// Learns the ids an HTTP answer gives `client`, before it is compared (see the module docs):
/// the token of a register / join answer's URLs, and what an attach answer makes of the
/// recorded peer session and session ids.
fn learn_http(
    what: &str,
    client: Client,
    req: &Value,
    rec: &Value,
    ours: &Value,
    subst: &mut Subst,
) {
    let path = req["path"].as_str().unwrap();
    let post = req["method"] == "POST";
    if post && (path == "/sessions" || path.ends_with("/join")) && rec["success"] == true {
        // The web_rtc transport's signaling URL; the comparison then requires the same id in
        // every other URL of the answer.
        let url = |body: &Value| {
            body["transports"][0]["metadata"]["signaling_url"]
                .as_str()
                .map(url_id)
                .unwrap_or_else(|| panic!("{what}: no signaling_url in {body}"))
        };
        subst.issue_token(what, client, &url(rec), &url(ours));
    } else if post && path == "/peer-sessions/attach" && rec["peer_session_id"].is_string() {
        // Attached with the token of its signaling URL: that is its peer session (required, not
        // learned), and the recorded session id is the public one again.
        let sent = subst.str(
            Some(client),
            req["body"]["host_session_id"].as_str().unwrap(),
        );
        assert!(
            subst.tokens.contains(&(client, sent.clone())),
            "{what}: the {client:?} attached with {sent}, not with its own token"
        );
        subst.learn_own(client, rec["peer_session_id"].as_str().unwrap(), &sent);
        let session = subst.session.clone();
        subst.learn_own(client, rec["host_session_id"].as_str().unwrap(), &session);
    }
}

conformance! {

async fn generation1_host_and_joiner(ctx: &Ctx) {
    // The original had no bug visible in this capture.
    replay(ctx, GEN1, &[]).await;
}

async fn generation2_host_joiner_and_fallback_socket(ctx: &Ctx) {
    replay(
        ctx,
        GEN2,
        &[
            // The original sent `peer_left` for the fallback socket `join-ws-2`, which never
            // joined, to the joiner and to the host ...
            "dropped 2 peer_left for a socket that never joined",
            // ... and never told the host that the joiner itself left.
            "inserted peer_left for join-ws on host-ws",
        ],
    )
    .await;
}

}

/// Generation 2's fallback socket as recorded (`join-ws-2`): it opens `/ws/S` (the public id,
/// see the module docs) and sends only binary frames, never a `join`. The replay ends long
/// before the join timeout; here, with `--join-timeout 1s`, the socket gets at most one `error`
/// per frame, is closed with 1008 once the timeout has passed (not before), and the room never
/// hears of it.
async fn generation2_fallback_socket(engine: Engine) {
    const JOIN_TIMEOUT: Duration = Duration::from_secs(1);
    let events = parse(GEN2);
    let recorded_session = events
        .iter()
        .find(|e| is(e, None, C2S, "http_request") && e["path"] == "/sessions")
        .expect("a registration")["body"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let upgrade = events
        .iter()
        .find(|e| is(e, Some("join-ws-2"), C2S, "http_request"))
        .expect("the fallback socket's upgrade");
    assert_eq!(upgrade["path"], format!("/ws/{recorded_session}"));
    let frames: Vec<Vec<u8>> = events
        .iter()
        .filter(|e| is(e, Some("join-ws-2"), C2S, "ws_binary"))
        .map(|e| hex_bytes(e["payload"].as_str().unwrap()))
        .collect();
    assert_eq!(
        frames.len(),
        2,
        "the recorded fallback socket sends two frames"
    );
    assert!(
        !events
            .iter()
            .any(|e| is(e, Some("join-ws-2"), C2S, "ws_text")),
        "the recorded fallback socket never sends text"
    );

    let builder = ServerBuilder::new().args(["--join-timeout", "1s"]);
    let ctx = Ctx::start_with(engine, builder).await;
    common::bounded(async {
        let (session, mut host) = ctx.hosted().await;
        let opened = tokio::time::Instant::now();
        let mut fallback = ctx.ws(&session.id).await;
        for frame in &frames {
            fallback.send_binary(frame.clone()).await;
        }
        let (before, closed) = fallback.expect_close().await;
        let after = opened.elapsed();
        assert!(
            before.len() <= frames.len() && before.iter().all(|v| v["type"] == "error"),
            "the fallback socket got {before:?}"
        );
        assert_eq!(closed.code(), Some(1008), "{closed:?}");
        assert!(
            after >= JOIN_TIMEOUT - Duration::from_millis(100),
            "closed after {after:?}, before the join timeout"
        );
        assert!(
            after < JOIN_TIMEOUT + Duration::from_millis(1500),
            "closed only after {after:?}"
        );
        // The host hears nothing of it, and is still served.
        host.expect_silence(QUIET).await;
        host.send_json(json!({"type": "ping"})).await;
        host.recv_type("pong").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation2_fallback_socket_closed_after_the_join_timeout_memory() {
    generation2_fallback_socket(Engine::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation2_fallback_socket_closed_after_the_join_timeout_redis() {
    generation2_fallback_socket(Engine::Redis).await;
}

#[test]
fn transcripts_match_the_shared_copy() {
    // tests/transcripts/ is a copy of ../shared/transcripts/ (kept in the repository so the
    // replay runs on a fresh clone); when the shared copy is present, they must be the same.
    let shared = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/transcripts");
    for (name, ours) in [
        ("gen1-host-join.jsonl", GEN1),
        ("gen2-host-join.jsonl", GEN2),
    ] {
        if let Ok(theirs) = std::fs::read_to_string(format!("{shared}/{name}")) {
            assert_eq!(theirs, ours, "{name} differs from the shared transcript");
        }
    }
}
