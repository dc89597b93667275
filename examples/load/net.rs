//! The two servers' ways in: beach-road (register over HTTP, `/ws/{session}`, `join` with the
//! code, `signal` frames) and matchbox_server (`/{room}`, `IdAssigned` / `NewPeer`,
//! `{"Signal":{"receiver","data"}}`), behind one [`Target`].

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::Args;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bytes of every signal's payload (the `signal` / `data` JSON value).
pub const SIGNAL_BYTES: usize = 256;
/// Digits of the send stamp (µs since the load started) inside the payload.
const STAMP_DIGITS: usize = 12;
/// What precedes the stamp in every payload, also as the servers re-serialize it.
const STAMP_KEY: &str = "\"t\":\"";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Beach,
    Matchbox,
}

/// A server (or two instances of one deployment): hosts use `host`, joiners `joiner`.
#[derive(Clone, Debug)]
pub struct Target {
    pub kind: Kind,
    pub host: String,
    pub joiner: String,
}

/// A room to join: a beach-road session with its code, or a matchbox room name.
#[derive(Clone, Debug)]
pub struct Room {
    pub id: String,
    pub code: String,
}

/// A host and a joiner in one room; the host knows the joiner's id.
pub struct Pair {
    pub host: Ws,
    pub joiner: Ws,
    pub joiner_id: String,
}

impl Target {
    pub fn from_args(a: &Args) -> Target {
        let kind = match a.str("kind").as_str() {
            "matchbox" => Kind::Matchbox,
            _ => Kind::Beach,
        };
        let host = a.str("host");
        let joiner = match a.str("joiner") {
            j if j.is_empty() => host.clone(),
            j => j,
        };
        Target { kind, host, joiner }
    }

    /// A fresh room: beach-road registers a session (on the host's instance).
    pub async fn room(&self) -> Room {
        let id = uuid::Uuid::new_v4().to_string();
        match self.kind {
            Kind::Matchbox => Room {
                id,
                code: String::new(),
            },
            Kind::Beach => {
                let body = json!({ "session_id": id, "passphrase": null }).to_string();
                let reply = http(&self.host, "POST", "/sessions", &body).await;
                let v: Value = serde_json::from_str(&reply)
                    .unwrap_or_else(|e| panic!("register answer {reply:?}: {e}"));
                let code = v["join_code"]
                    .as_str()
                    .unwrap_or_else(|| panic!("register refused: {reply}"))
                    .to_owned();
                Room { id, code }
            }
        }
    }

    /// Opens a socket on `base` and joins `room`; returns it with the peer id the server gave.
    /// `small` keeps the client's buffers small (thousands of idle sockets).
    pub async fn join(&self, base: &str, room: &Room, small: bool) -> (Ws, String) {
        let ws_base = base.replacen("http", "ws", 1);
        let url = match self.kind {
            Kind::Beach => format!("{ws_base}/ws/{}", room.id),
            Kind::Matchbox => format!("{ws_base}/{}", room.id),
        };
        let config = small.then(|| {
            WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0)
        });
        // Nagle plus delayed ACKs would add ~40 ms stalls to the client side of the figures.
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, config, true)
            .await
            .unwrap_or_else(|e| panic!("websocket connect to {base}: {e}"));
        match self.kind {
            Kind::Beach => {
                let msg = json!({"type":"join","peer_id":"bench","passphrase":room.code,
                                 "supported_transports":["webrtc"]});
                ws.send(Message::Text(msg.to_string().into()))
                    .await
                    .expect("send join");
                loop {
                    let v = next_json(&mut ws).await;
                    match v["type"].as_str() {
                        Some("join_success") => {
                            let id = v["peer_id"].as_str().expect("peer_id").to_owned();
                            return (ws, id);
                        }
                        Some("join_error") => panic!("join refused: {v}"),
                        _ => continue,
                    }
                }
            }
            Kind::Matchbox => loop {
                let v = next_json(&mut ws).await;
                if let Some(id) = v["IdAssigned"].as_str() {
                    return (ws, id.to_owned());
                }
            },
        }
    }

    /// A host (on `host`) and a joiner (on `joiner`) in a fresh room, once the host has heard of
    /// the joiner (so signals to it are routable).
    pub async fn pair(&self) -> Pair {
        let room = self.room().await;
        let (mut host, _) = self.join(&self.host, &room, false).await;
        let (joiner, joiner_id) = self.join(&self.joiner, &room, false).await;
        let announced = match self.kind {
            Kind::Beach => "\"type\":\"peer_joined\"",
            Kind::Matchbox => "\"NewPeer\"",
        };
        loop {
            let t = next_text(&mut host).await;
            if t.contains(announced) && t.contains(&joiner_id) {
                break;
            }
        }
        Pair {
            host,
            joiner,
            joiner_id,
        }
    }

    /// The frame that sends a stamped signal of `SIGNAL_BYTES` to `to`, with padding `pad`
    /// bytes longer (the flood sends bigger ones).
    pub fn template(&self, to: &str, extra_pad: usize) -> Template {
        // {"t":"<stamp>","p":"xxx…"}
        let fixed = STAMP_KEY.len() + 1 + STAMP_DIGITS + "\",\"p\":\"".len() + "\"}".len();
        let pad = "x".repeat(SIGNAL_BYTES - fixed + extra_pad);
        let (open, close) = match self.kind {
            Kind::Beach => (
                format!("{{\"type\":\"signal\",\"to_peer\":\"{to}\",\"signal\":{{"),
                "}}".to_owned(),
            ),
            Kind::Matchbox => (
                format!("{{\"Signal\":{{\"receiver\":\"{to}\",\"data\":{{"),
                "}}}".to_owned(),
            ),
        };
        Template {
            head: format!("{open}{STAMP_KEY}"),
            tail: format!("\",\"p\":\"{pad}\"{close}"),
        }
    }
}

/// A signal frame cut around its stamp.
#[derive(Clone)]
pub struct Template {
    head: String,
    tail: String,
}

impl Template {
    pub fn frame(&self, stamp_us: u64) -> Message {
        let mut s = String::with_capacity(self.head.len() + STAMP_DIGITS + self.tail.len());
        s.push_str(&self.head);
        let mut digits = [b'0'; STAMP_DIGITS];
        let mut v = stamp_us;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        s.push_str(std::str::from_utf8(&digits).expect("ascii"));
        s.push_str(&self.tail);
        Message::Text(s.into())
    }
}

/// The send stamp of a relayed signal, found without parsing the frame's JSON.
pub fn stamp(frame: &str) -> Option<u64> {
    let at = frame.find(STAMP_KEY)? + STAMP_KEY.len();
    let digits = frame.get(at..at + STAMP_DIGITS)?;
    digits.parse().ok()
}

/// A frame beach-road sends when it refuses a relay (or anything else) to its sender.
pub fn is_error(frame: &str) -> bool {
    frame.contains("\"type\":\"error\"")
}

/// A minimal HTTP/1.1 client (one request per connection) so the benchmark needs no extra crate.
pub async fn http(base: &str, method: &str, path: &str, body: &str) -> String {
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

pub async fn next_text(ws: &mut Ws) -> String {
    loop {
        match ws.next().await.expect("socket open").expect("frame") {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Binary(b) => return String::from_utf8_lossy(&b).into_owned(),
            _ => continue,
        }
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    let t = next_text(ws).await;
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("frame {t:?}: {e}"))
}
