//! The engine: every piece of state shared between instances, behind one trait.
//!
//! Sessions, peer sessions, the offer/answer mailbox, room membership and roles, and the
//! delivery of a message to a peer (wherever its socket lives) all go through [`Engine`]. The
//! HTTP routes and the WebSocket task never touch shared state any other way, so the in-process
//! engine ([`memory::MemoryEngine`], one node, no setup) and the Redis engine
//! ([`redis::RedisEngine`], many stateless instances) are interchangeable and pass the same
//! conformance tests.
//!
//! Every method is bounded in time: an engine that cannot answer within its timeout returns
//! [`EngineError::Unavailable`] and the caller answers 503 (or an `error` frame) at once.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use crate::code::CodeHash;
use crate::peers::{PeerQueue, QueueLimits};
use crate::protocol::{Frame, PeerInfo};

/// Tunables common to both engines.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// A session lives this long after its registration or its latest WebSocket join.
    pub session_ttl: Duration,
    /// Mailbox entries (offers, answers) expire after this.
    pub mailbox_ttl: Duration,
    /// Offers queued for one recipient at most; the oldest is dropped beyond it.
    pub max_queued_offers: usize,
    /// Wrong join codes tolerated per session within `code_failure_window`.
    pub max_code_failures: u32,
    pub code_failure_window: Duration,
    /// Bounds of each local peer's outbound queue.
    pub queue: QueueLimits,
    /// Upper bound of any single engine call (Redis round trip, actor reply).
    pub call_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(12 * 3600),
            mailbox_ttl: Duration::from_secs(300),
            max_queued_offers: 32,
            max_code_failures: 10,
            code_failure_window: Duration::from_secs(600),
            queue: QueueLimits {
                messages: 256,
                bytes: 1 << 20,
            },
            call_timeout: Duration::from_secs(2),
        }
    }
}

/// A registered host session.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionRecord {
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    pub code: CodeHash,
}

/// What a WebSocket `join` adds to a room; the engine assigns `role` and `joined_at`.
#[derive(Clone, Debug)]
pub struct NewPeer {
    pub id: String,
    pub supported_transports: Vec<serde_json::Value>,
    pub preferred_transport: Option<serde_json::Value>,
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
}

/// Result of [`Engine::join`].
#[derive(Clone, Debug)]
pub struct Joined {
    /// The joiner as the room sees it.
    pub me: PeerInfo,
    /// Every member, the joiner included, in join order.
    pub peers: Vec<PeerInfo>,
    /// False when this peer was already a member (a repeated `join`): nothing was changed and
    /// nobody was told.
    pub fresh: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The store did not answer in time or is unreachable; try again later (HTTP 503).
    Unavailable(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::Unavailable(why) => write!(f, "session store unavailable: {why}"),
        }
    }
}

impl std::error::Error for EngineError {}

pub type EngineResult<T> = Result<T, EngineError>;

/// Shared state and routing. Implementations must never hold a lock across `.await` and must
/// bound every call in time (see module docs).
///
/// `room` is always a host session id (peer-session aliases are resolved first).
pub trait Engine: Clone + Send + Sync + 'static {
    /// The tunables this engine was started with.
    fn config(&self) -> &EngineConfig;

    /// Stores a new session. `false` when the id is taken: of two racing registrations of one
    /// id, exactly one gets `true`.
    fn register(&self, session: SessionRecord) -> impl Future<Output = EngineResult<bool>> + Send;

    /// The host session behind `id`, which is a session id or a peer-session id.
    fn resolve(&self, id: &str)
        -> impl Future<Output = EngineResult<Option<SessionRecord>>> + Send;

    /// The peer-session id of `host`, created on first use and reused after; `None` when the
    /// host session does not exist.
    fn attach(&self, host: &str) -> impl Future<Output = EngineResult<Option<String>>> + Send;

    /// Records one wrong join code for `session` and returns the failures counted within the
    /// window, this one included.
    fn code_failure(&self, session: &str) -> impl Future<Output = EngineResult<u32>> + Send;

    /// Wrong join codes counted for `session` within the window.
    fn code_failures(&self, session: &str) -> impl Future<Output = EngineResult<u32>> + Send;

    /// Queues an offer for `to` (FIFO; at most `max_queued_offers`, oldest dropped).
    fn push_offer(
        &self,
        room: &str,
        to: &str,
        payload: String,
    ) -> impl Future<Output = EngineResult<()>> + Send;

    /// Takes the oldest offer for `to`; each offer is delivered once.
    fn pop_offer(
        &self,
        room: &str,
        to: &str,
    ) -> impl Future<Output = EngineResult<Option<String>>> + Send;

    /// Stores the answer of a handshake (one slot; a later answer replaces it).
    fn put_answer(
        &self,
        room: &str,
        handshake: &str,
        payload: String,
    ) -> impl Future<Output = EngineResult<()>> + Send;

    /// Takes the answer of a handshake: of concurrent readers exactly one gets it.
    fn take_answer(
        &self,
        room: &str,
        handshake: &str,
    ) -> impl Future<Output = EngineResult<Option<String>>> + Send;

    /// Registers a socket of this instance under its server-assigned peer id and returns the
    /// queue the socket task writes from.
    fn connect(&self, peer: &str) -> impl Future<Output = EngineResult<PeerQueue>> + Send;

    /// Forgets a socket of this instance (after `leave`, if it had joined).
    fn disconnect(&self, peer: &str) -> impl Future<Output = ()> + Send;

    /// Adds the peer to the room, atomically choosing its role (first in an empty room:
    /// `server`), and sends `peer_joined` to the other members. Idempotent per peer.
    fn join(&self, room: &str, peer: NewPeer) -> impl Future<Output = EngineResult<Joined>> + Send;

    /// Removes the peer from the room and sends `peer_left` to the remaining members. A peer
    /// that was not a member is ignored (no `peer_left` for sockets that never joined).
    fn leave(&self, room: &str, peer: &str) -> impl Future<Output = EngineResult<()>> + Send;

    /// Whether `peer` is currently a member of `room`.
    fn is_member(&self, room: &str, peer: &str) -> impl Future<Output = EngineResult<bool>> + Send;

    /// The room's `server` peer, if one is joined.
    fn server_peer(&self, room: &str) -> impl Future<Output = EngineResult<Option<String>>> + Send;

    /// Delivers a frame to member `to` of `room`, wherever its socket is. `false` when `to` is
    /// not a member of that room.
    fn send(
        &self,
        room: &str,
        to: &str,
        frame: Frame,
    ) -> impl Future<Output = EngineResult<bool>> + Send;

    /// `Ok` while this instance can serve: the store answers and routing works.
    fn ready(&self) -> impl Future<Output = EngineResult<()>> + Send;

    /// Number of sockets on this instance (for `/health` and the connection limit).
    fn local_peers(&self) -> impl Future<Output = EngineResult<usize>> + Send;

    /// Ends the engine's background work (heartbeats, subscriptions); called once, after the
    /// sockets have left their rooms during the drain.
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}
