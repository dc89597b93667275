//! Wire types of `docs/protocol.md`, fixed by the existing beach clients.
//!
//! Field names, tags and shapes must not change: generation 1 and 2 CLIs and the browser client
//! parse these strictly. Opaque client payloads (`signal`, transports) stay raw JSON and
//! `sealed` a `serde_json::Value`, so they are relayed verbatim.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// Longest id accepted anywhere (session, peer session, peer, handshake).
pub const MAX_ID_LEN: usize = 64;

/// Ids become Redis keys and map keys, so only a short safe alphabet is accepted (protocol.md §2).
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh server-chosen id (peer ids, peer-session ids).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A fresh secret token of 128 random bits from the OS-seeded CSPRNG (32 hex digits): a
/// relay host's only credential.
pub fn new_token() -> String {
    use rand::Rng;
    hex::encode(rand::rng().random::<[u8; 16]>())
}

/// Unix seconds from the local clock (the in-process engine's clock; Redis scripts use `TIME`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Server,
    Client,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }
}

/// A room member as every peer sees it (`join_success.peers`, `peer_joined.peer`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: String,
    pub role: Role,
    pub joined_at: u64,
    pub supported_transports: Vec<Value>,
    /// Always present on the wire (`null` when the client named none).
    pub preferred_transport: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Client → server WebSocket messages (protocol.md §4.1), borrowed from the frame they were
/// read from. Relayed payloads (`signal`, transports) stay raw JSON: never parsed into a tree,
/// never serialized again, relayed byte for byte.
#[derive(Debug)]
pub enum ClientMessage<'a> {
    Join {
        passphrase: Option<String>,
        supported_transports: Vec<Value>,
        preferred_transport: Option<Value>,
        label: Option<String>,
        mcp: Option<bool>,
        metadata: Option<BTreeMap<String, String>>,
    },
    /// `signal`, `negotiate_transport`, `accept_transport`: a payload for another member.
    Relay {
        kind: Relayed,
        to_peer: Cow<'a, str>,
        payload: &'a RawValue,
    },
    Ping,
    Debug {
        request: Value,
    },
}

/// What a relayed message carries, read first from every client frame: a relay (nearly
/// every frame) is parsed into these few fields and the rest skipped. Any other type is read
/// again, into [`Fields`]. (One struct of every field cost each relay ~3 % of a burst: serde
/// builds, moves and drops all of it.) Flat, not an internally tagged enum, which would
/// buffer the whole frame first and cannot keep payloads raw.
#[derive(Deserialize)]
struct Routing<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    to_peer: Option<Text<'a>>,
    #[serde(default, borrow)]
    signal: Option<&'a RawValue>,
    #[serde(default, borrow)]
    proposed_transport: Option<&'a RawValue>,
    #[serde(default, borrow)]
    transport: Option<&'a RawValue>,
}

/// The fields of the other messages (`join`, `debug`). Unknown fields are ignored; the
/// client's own `peer_id` is informational only, never read (protocol.md §6).
#[derive(Deserialize)]
struct Fields<'a> {
    /// Required of a join, and a string, but never read (protocol.md §6).
    #[serde(default, borrow)]
    peer_id: Option<Text<'a>>,
    #[serde(default)]
    passphrase: Option<String>,
    #[serde(default)]
    supported_transports: Option<Vec<Value>>,
    #[serde(default)]
    preferred_transport: Option<Value>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    mcp: Option<bool>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    request: Option<Value>,
}

/// A string borrowed from the frame unless it has escapes. (serde borrows a `Cow<str>` field
/// only when it is the field's whole type: inside an `Option` it allocated every time.)
#[derive(Clone, Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'a> ClientMessage<'a> {
    /// Parses one client frame; the error says what is wrong with it. Parsed as text, UTF-8
    /// checked already by tungstenite (from bytes, serde_json checked every string again: ~2 %
    /// of a burst).
    pub fn parse(text: &'a str) -> Result<ClientMessage<'a>, String> {
        let r: Routing<'a> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let (kind, payload, name) = match &*r.kind {
            "signal" => (Relayed::Signal, r.signal, "signal"),
            "negotiate_transport" => (
                Relayed::TransportProposal,
                r.proposed_transport,
                "proposed_transport",
            ),
            "accept_transport" => (Relayed::TransportAccepted, r.transport, "transport"),
            other => return Self::control(text, other),
        };
        let payload = payload.ok_or_else(|| missing(name))?;
        if nesting(payload.get()) > MAX_NESTING {
            return Err(format!("`{name}` nests deeper than {MAX_NESTING} levels"));
        }
        Ok(ClientMessage::Relay {
            kind,
            to_peer: r.to_peer.ok_or_else(|| missing("to_peer"))?.0,
            payload,
        })
    }

    /// A message that is not relayed, of type `kind`: read again for its own fields.
    fn control(text: &'a str, kind: &str) -> Result<ClientMessage<'a>, String> {
        let fields = || serde_json::from_str::<Fields>(text).map_err(|e| e.to_string());
        match kind {
            "join" => {
                let f = fields()?;
                f.peer_id.as_ref().ok_or_else(|| missing("peer_id"))?;
                Ok(ClientMessage::Join {
                    supported_transports: f
                        .supported_transports
                        .ok_or_else(|| missing("supported_transports"))?,
                    passphrase: f.passphrase,
                    preferred_transport: f.preferred_transport,
                    label: f.label,
                    mcp: f.mcp,
                    metadata: f.metadata,
                })
            }
            "ping" => Ok(ClientMessage::Ping),
            "debug" => Ok(ClientMessage::Debug {
                request: fields()?.request.ok_or_else(|| missing("request"))?,
            }),
            other => Err(format!("unknown message type `{other}`")),
        }
    }
}

fn missing(field: &str) -> String {
    format!("missing field `{field}`")
}

/// Nesting a relayed payload may have at most: what serde_json (and so many a client) parses
/// into a tree before it gives up. Deeper would reach the recipients and might crash their
/// parsers.
const MAX_NESTING: usize = 128;

/// How deeply `json` (valid JSON) nests arrays and objects (at least; exactly past
/// `MAX_NESTING`).
fn nesting(json: &str) -> usize {
    // Fewer openings than the limit cannot nest deeper: one vectorized count decides nearly
    // every payload. Counted in bytes per chunk of 255 (a `usize` per byte made the compiler
    // widen every comparison to 64-bit lanes: a quarter of a relay's parse).
    let openings: usize = json
        .as_bytes()
        .chunks(255)
        .map(|chunk| {
            let n: u8 = chunk
                .iter()
                .map(|&b| u8::from(b == b'[' || b == b'{'))
                .sum();
            usize::from(n)
        })
        .sum();
    if openings <= MAX_NESTING {
        return openings;
    }
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// What a relayed client message becomes for its recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relayed {
    /// `signal` → `signal`
    Signal,
    /// `negotiate_transport` → `transport_proposal`
    TransportProposal,
    /// `accept_transport` → `transport_accepted`
    TransportAccepted,
}

impl Relayed {
    /// The recipient's frame, written directly: `{"type":…,"from_peer":…,"<payload key>":…}`
    /// with the payload as the client sent it (`from_peer` is a server-assigned id, which
    /// needs no escaping).
    pub fn frame(self, from_peer: &str, payload: &RawValue) -> Frame {
        let (kind, key) = match self {
            Relayed::Signal => ("signal", "signal"),
            Relayed::TransportProposal => ("transport_proposal", "proposed_transport"),
            Relayed::TransportAccepted => ("transport_accepted", "transport"),
        };
        debug_assert!(valid_id(from_peer));
        let raw = payload.get();
        // Exactly the length: a frame whose buffer is full becomes shared bytes without a second
        // allocation.
        let len = 30 + kind.len() + from_peer.len() + key.len() + raw.len();
        let mut out = String::with_capacity(len);
        out.push_str(r#"{"type":""#);
        out.push_str(kind);
        out.push_str(r#"","from_peer":""#);
        out.push_str(from_peer);
        out.push_str(r#"",""#);
        out.push_str(key);
        out.push_str(r#"":"#);
        out.push_str(raw);
        out.push('}');
        debug_assert_eq!(out.len(), len);
        Frame::from(out)
    }
}

/// Server → client WebSocket messages (protocol.md §4.2). Never add a type: the browser client
/// rejects unknown ones.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    JoinSuccess {
        session_id: String,
        peer_id: String,
        peers: Vec<PeerInfo>,
        available_transports: Vec<Value>,
    },
    JoinError {
        reason: String,
    },
    PeerJoined {
        peer: PeerInfo,
    },
    PeerLeft {
        peer_id: String,
    },
    // `transport_proposal`, `transport_accepted` and `signal` are written by [`Relayed::frame`].
    Pong,
    Error {
        message: String,
    },
    Debug {
        response: Value,
    },
}

impl ServerMessage {
    pub fn error(message: impl Into<String>) -> Self {
        ServerMessage::Error {
            message: message.into(),
        }
    }

    /// Serialized once, shared by every recipient of a broadcast.
    pub fn to_frame(&self) -> Frame {
        Frame::from(serde_json::to_string(self).expect("server messages always serialize"))
    }
}

/// One serialized server message: shared bytes, so a broadcast, a queue and the socket write
/// share one allocation (no copy per recipient or per write), and a frame from another
/// instance is a slice of the pub/sub message it came in.
pub type Frame = tungstenite::Utf8Bytes;

/// Transports every peer of the room supports, in the order of the first peer's list.
pub fn common_transports(peers: &[PeerInfo]) -> Vec<Value> {
    let Some(first) = peers.first() else {
        return Vec::new();
    };
    first
        .supported_transports
        .iter()
        .filter(|t| peers.iter().all(|p| p.supported_transports.contains(t)))
        .cloned()
        .collect()
}

/// A mailbox entry (protocol.md §3.3). The five named fields are required; everything else
/// (notably `sealed`) is kept verbatim in `rest` and returned as it came.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SdpPayload {
    pub sdp: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub handshake_id: String,
    pub from_peer: String,
    pub to_peer: String,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_payloads_are_kept_byte_for_byte() {
        let raw = r#"{"type":"signal","peer_id":"x","to_peer":"p-1","signal":{"b":1, "a":[1.50,"\u00e9"]},"extra":0}"#;
        let ClientMessage::Relay {
            kind,
            to_peer,
            payload,
        } = ClientMessage::parse(raw).unwrap()
        else {
            panic!("not a relay");
        };
        assert_eq!((kind, &*to_peer), (Relayed::Signal, "p-1"));
        // Borrowed from the frame, not copied (a relay's parse allocates nothing).
        assert!(matches!(to_peer, Cow::Borrowed(_)));
        let frame = kind.frame("me", payload);
        assert_eq!(
            &*frame,
            r#"{"type":"signal","from_peer":"me","signal":{"b":1, "a":[1.50,"\u00e9"]}}"#
        );
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["signal"]["a"][1], "é");
        let t = ClientMessage::parse(
            r#"{"type":"accept_transport","to_peer":"p","transport":"webrtc"}"#,
        );
        let Ok(ClientMessage::Relay { kind, payload, .. }) = t else {
            panic!("{t:?}");
        };
        let v: Value = serde_json::from_str(&kind.frame("me", payload)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"transport_accepted","from_peer":"me","transport":"webrtc"})
        );
    }

    #[test]
    fn escaped_ids_are_read_too() {
        let raw = r#"{"type":"signal","peer_id":"\u0078","to_peer":"p\u002d1","signal":1}"#;
        let Ok(ClientMessage::Relay { to_peer, .. }) = ClientMessage::parse(raw) else {
            panic!("not a relay");
        };
        assert_eq!(to_peer, "p-1");
        assert!(ClientMessage::parse(r#"{"type":"signal","to_peer":5,"signal":1}"#).is_err());
    }

    #[test]
    fn malformed_client_messages_say_what_is_wrong() {
        let err = |raw: &str| ClientMessage::parse(raw).unwrap_err();
        assert!(err(r#"{"type":"signal","signal":{}}"#).contains("to_peer"));
        assert!(err(r#"{"type":"signal","to_peer":"p"}"#).contains("signal"));
        assert!(err(r#"{"type":"nope"}"#).contains("unknown message type"));
        assert!(err(r#"{"type":"join","peer_id":"x"}"#).contains("supported_transports"));
        assert!(err("[1]").contains("invalid type"));
        let deep = format!(
            r#"{{"type":"signal","to_peer":"p","signal":{}{}}}"#,
            "[".repeat(129),
            "]".repeat(129)
        );
        assert!(err(&deep).contains("deeper"));
        let ok = format!(
            r#"{{"type":"signal","to_peer":"p","signal":{{"s":"[[[[\"{}"}}}}"#,
            "[".repeat(200)
        );
        assert!(
            ClientMessage::parse(&ok).is_ok(),
            "brackets in strings do not count"
        );
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"ping","junk":[1]}"#),
            Ok(ClientMessage::Ping)
        ));
        // A relay is judged by its own fields; a join by its own.
        assert!(ClientMessage::parse(
            r#"{"type":"signal","to_peer":"p","signal":1,"passphrase":5}"#
        )
        .is_ok());
        assert!(
            err(r#"{"type":"join","peer_id":"x","supported_transports":[],"passphrase":5}"#)
                .contains("invalid type")
        );
        assert!(err(r#"{"type":"debug"}"#).contains("request"));
    }

    #[test]
    fn ids_are_short_and_safe() {
        assert!(valid_id("ad48f696-a35d-4968-a9f8-453c7f5c21b3"));
        assert!(valid_id("a_b-C9"));
        assert!(!valid_id(""));
        assert!(!valid_id("a:b"));
        assert!(!valid_id("a b"));
        assert!(!valid_id("{tag}"));
        assert!(!valid_id(&"a".repeat(65)));
    }

    #[test]
    fn sdp_payload_keeps_unknown_fields() {
        let raw = r#"{"sdp":"","type":"offer","handshake_id":"h","from_peer":"a","to_peer":"b","sealed":{"version":1,"nonce":"n","ciphertext":"c"}}"#;
        let p: SdpPayload = serde_json::from_str(raw).unwrap();
        let back: Value = serde_json::to_value(&p).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(raw).unwrap());
    }

    #[test]
    fn peer_info_always_has_preferred_transport() {
        let p = PeerInfo {
            id: "p".into(),
            role: Role::Server,
            joined_at: 1,
            supported_transports: vec!["webrtc".into()],
            preferred_transport: None,
            metadata: None,
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["preferred_transport"], Value::Null);
        assert!(v.get("metadata").is_none());
    }

    #[test]
    fn common_transports_is_the_intersection() {
        let mk = |ts: &[&str]| PeerInfo {
            id: "p".into(),
            role: Role::Client,
            joined_at: 0,
            supported_transports: ts.iter().map(|t| Value::from(*t)).collect(),
            preferred_transport: None,
            metadata: None,
        };
        let peers = [
            mk(&["webrtc", "direct"]),
            mk(&["direct", "webrtc"]),
            mk(&["webrtc"]),
        ];
        assert_eq!(common_transports(&peers), vec![Value::from("webrtc")]);
    }
}
