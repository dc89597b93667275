//! What the Admin API (`crate::admin`, its HTTP side) reads and does through an engine: a
//! session's room across every instance, closing a session for good, and the live instances.
//!
//! Nothing here carries a join code, a code digest, a token or a mailbox entry: a view is built
//! from the session's `created_at` and the room's member records only.

use serde::Serialize;

use crate::protocol::Role;

/// A session as the Admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionView {
    pub id: String,
    /// Unix seconds, as stored at registration.
    pub created_at: u64,
    /// Unix seconds when the session's keys expire as they stand now (renewed while the room
    /// has members); `None` when none is stored.
    pub expires_at: Option<u64>,
    /// Unix seconds of its close through the Admin API; a closed session has no peers.
    pub closed_at: Option<u64>,
    /// Every member, on any instance, in join order.
    pub peers: Vec<PeerView>,
}

/// A room member as the Admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerView {
    pub id: String,
    pub role: Role,
    /// The instance holding its socket (`local` on the in-process engine).
    pub instance: String,
    /// Unix seconds, as stored at its join.
    pub joined_at: u64,
    pub supported_transports: Vec<serde_json::Value>,
    pub preferred_transport: Option<serde_json::Value>,
}

/// What [`crate::engine::Engine::admin_close`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseOutcome {
    /// No such session (never registered, or expired).
    NotFound,
    /// Closed now; the room had this many members, each told to close its socket.
    Closed { peers: usize },
    /// Closed before; members found since (none, normally) were told to close again.
    AlreadyClosed { peers: usize },
}

/// A live instance as the Admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceView {
    pub id: String,
    /// Milliseconds since its last heartbeat reached the store.
    pub heartbeat_age_ms: u64,
    /// Whether it is the instance that answered.
    pub this: bool,
}
