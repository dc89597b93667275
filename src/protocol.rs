//! Wire types of `../shared/protocol.md`, fixed by the existing beach clients.
//!
//! Field names, tags and shapes must not change: generation 1 and 2 CLIs and the browser client
//! parse these strictly. Opaque client payloads (`signal`, transports, `sealed`) stay
//! `serde_json::Value` so they are relayed verbatim.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
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

/// Client → server WebSocket messages (protocol.md §4.1). Unknown fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Join {
        /// The client's own random id: informational only, never trusted (protocol.md §6).
        #[allow(dead_code)]
        peer_id: String,
        #[serde(default)]
        passphrase: Option<String>,
        supported_transports: Vec<Value>,
        #[serde(default)]
        preferred_transport: Option<Value>,
        #[serde(default)]
        label: Option<String>,
        #[serde(default)]
        mcp: Option<bool>,
        #[serde(default)]
        metadata: Option<BTreeMap<String, String>>,
    },
    Signal {
        to_peer: String,
        signal: Value,
    },
    NegotiateTransport {
        to_peer: String,
        proposed_transport: Value,
    },
    AcceptTransport {
        to_peer: String,
        transport: Value,
    },
    Ping,
    Debug {
        request: Value,
    },
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
    TransportProposal {
        from_peer: String,
        proposed_transport: Value,
    },
    TransportAccepted {
        from_peer: String,
        transport: Value,
    },
    Signal {
        from_peer: String,
        signal: Value,
    },
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
pub type Frame = axum::extract::ws::Utf8Bytes;

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
