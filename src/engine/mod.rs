//! The engine: every piece of state shared between instances, behind one trait.
//!
//! Sessions, peer sessions, the offer/answer mailbox, room membership and roles, and the
//! delivery of a message to a peer (wherever its socket lives) all go through [`Engine`]. The
//! HTTP routes and the WebSocket task never touch shared state any other way, so the in-process
//! engine ([`memory::MemoryEngine`], one node, no setup) and the Redis engine
//! ([`redis::RedisEngine`], many stateless instances) are interchangeable and pass the same
//! conformance tests.
//!
//! Every method is bounded in time: an engine that cannot answer within its timeout returns an
//! [`EngineError`] and the caller answers 503 (or an `error` frame) at once, with the error's
//! fixed client message; the cause goes to the log.

pub mod admin;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use crate::peers::{PeerQueue, QueueLimits};
use crate::protocol::{Frame, PeerInfo};
use crate::router::Router;

/// Tunables common to both engines.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// A session lives this long after its registration or after its last member left; never
    /// expires while its room has a member.
    pub session_ttl: Duration,
    /// Mailbox entries (offers, answers) expire after this.
    pub mailbox_ttl: Duration,
    /// Offers queued for one recipient at most; the oldest is dropped beyond it.
    pub max_queued_offers: usize,
    /// Answers one peer may have waiting for one recipient within `mailbox_ttl`.
    pub max_queued_answers: usize,
    /// Wrong join codes tolerated per session from one client address within the window...
    pub max_code_failures: u32,
    /// ...and from all addresses together (the bound on a distributed guesser).
    pub max_session_code_failures: u32,
    pub code_failure_window: Duration,
    /// Capability tokens (the host's, one per admitted joiner) one session may mint in its life.
    pub max_tokens_per_session: u32,
    /// Bounds of each local peer's outbound queue.
    pub queue: QueueLimits,
    /// Upper bound of any single engine call (Redis round trip, actor reply).
    pub call_timeout: Duration,
    /// A relay joiner's token must be used within this (and is used once).
    pub relay_token_ttl: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(12 * 3600),
            mailbox_ttl: Duration::from_secs(300),
            max_queued_offers: 32,
            max_queued_answers: 8,
            max_code_failures: 5,
            max_session_code_failures: 50,
            code_failure_window: Duration::from_secs(600),
            max_tokens_per_session: 1024,
            queue: QueueLimits {
                messages: 256,
                bytes: 1 << 20,
            },
            call_timeout: Duration::from_secs(2),
            relay_token_ttl: Duration::from_secs(60),
        }
    }
}

/// A registered host session.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionRecord {
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// HMAC of the join code under the server secret (`crate::code::Secret::digest`).
    pub code: String,
    /// A relay session (chosen at registration): its peers talk through beach-road's
    /// WebSocket relay ([`crate::relay`]), never over WebRTC.
    #[serde(default)]
    pub relay: bool,
}

/// What an id in a URL grants (see `docs/protocol.md`, "Capabilities").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The session id everybody is told: joining needs the code; no mailbox rights.
    Public,
    /// The host's token, handed out only in the register response: the `server` role, offers
    /// out, answers in, no code needed.
    Host,
    /// A joiner's token, handed out by a successful join or attach: role `client`, offers in,
    /// answers out, as the peer of its latest WebSocket join.
    Joiner,
    /// A relay joiner's token, handed out by a successful join of a relay session: one relay
    /// socket, once, within `relay_token_ttl`; nothing else.
    Relay,
}

impl Grant {
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::Public => "public",
            Grant::Host => "host",
            Grant::Joiner => "joiner",
            Grant::Relay => "relay",
        }
    }

    pub fn parse(s: &str) -> Option<Grant> {
        match s {
            "host" => Some(Grant::Host),
            "joiner" => Some(Grant::Joiner),
            "relay" => Some(Grant::Relay),
            _ => None,
        }
    }
}

/// An id resolved: its session and what it grants.
#[derive(Clone, Debug)]
pub struct Access {
    pub session: SessionRecord,
    pub grant: Grant,
    /// The token's peer: the latest WebSocket that joined through it (tokens only).
    pub peer: Option<String>,
}

/// The outcome of one join-code check (one atomic step: counted and compared together).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodeCheck {
    /// The code is the session's: here it is (a join needs no other read).
    Correct(SessionRecord),
    Wrong,
    /// Too many wrong codes from this address (or from everywhere) within the window: refused
    /// without comparing, for this long.
    Locked(Duration),
    NotFound,
}

/// What an engine did with a frame for one member, as far as it knows at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for its socket, on this instance.
    Sent,
    /// Queued for the recipient's instance (Redis engine). Only a failure is answered, later
    /// and to the sender's own queue, as an `error` frame: the publish failed, nobody heard it
    /// there (see [`Delivery::Unreachable`]), or the recipient refused it.
    Published,
    /// `to` is not a member of the room.
    NotMember,
    /// The recipient's queue has no room for relayed frames: the frame was not queued.
    Full,
    /// The recipient is a member, but nobody listens on its instance's channel (the instance
    /// died and is not reaped yet, or its subscription is down): the frame is lost.
    Unreachable,
}

impl Delivery {
    /// What the sender of a frame to `to` is told when it was not delivered: the metric's
    /// reason and the `error` message; `None` when it was sent or published.
    pub fn refusal(self, to: &str) -> Option<(&'static str, String)> {
        match self {
            Delivery::Sent | Delivery::Published => None,
            Delivery::NotMember => {
                Some(("not_member", format!("peer {to} is not in this session")))
            }
            Delivery::Full => Some((
                "recipient_full",
                format!("peer {to} is not keeping up; message dropped"),
            )),
            Delivery::Unreachable => Some((
                "unreachable",
                format!("peer {to} is unreachable; message dropped"),
            )),
        }
    }
}

/// What a WebSocket `join` adds to a room; the engine assigns `joined_at`.
#[derive(Clone, Debug)]
pub struct NewPeer {
    pub id: String,
    /// `server` for a join through the host's token, `client` otherwise.
    pub role: crate::protocol::Role,
    pub supported_transports: Vec<serde_json::Value>,
    pub preferred_transport: Option<serde_json::Value>,
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
}

/// How a joiner got in, for [`Engine::join`].
#[derive(Clone, Copy, Debug)]
pub enum Entry<'a> {
    /// The caller admitted it (a token it resolved, or a code it checked).
    Admitted,
    /// With the join code of session `room` (its HMAC), checked in the join's own atomic step
    /// and counted as [`Engine::check_code`] counts it: one Redis round trip for both. When
    /// `room` is a token's id instead, the same round trip looks it up ([`JoinResult::Token`]).
    Code { client: &'a str, digest: &'a str },
}

/// Result of [`Engine::join`].
#[derive(Clone, Debug)]
pub enum JoinResult {
    Joined(Joined),
    /// The room has `max_peers` members already.
    Full,
    /// The session was closed through the Admin API (after the caller resolved it).
    Closed,
    /// [`Entry::Code`] only: the code was not accepted (never [`CodeCheck::Correct`]);
    /// `NotFound` when the id is neither a session's nor a token's.
    Refused(CodeCheck),
    /// [`Entry::Code`] only: the id is a token's, not a session's: not joined; what it grants
    /// (as [`Engine::resolve`] tells it), for a join as [`Entry::Admitted`].
    Token(Access),
    /// [`Entry::Code`] only: the code is right, but a relay session has no signaling room.
    RelayOnly,
}

/// A successful join.
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

/// Why an engine call failed. Every kind is answered with 503 (or an `error`/`join_error`
/// frame) and its fixed [`client_message`](EngineError::client_message); the `String` is the
/// cause, for the log only (it may name Redis errors, ids or internal states).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The store cannot be reached, did not answer within the call timeout, or cannot take
    /// writes (a node demoted to replica during a failover, or loading its dataset).
    StoreUnavailable(String),
    /// The store refused a write: it is at its memory limit (`OOM` under `noeviction`).
    StoreFull(String),
    /// This instance may not act for its peers: not registered yet, or written off (fenced)
    /// and registering again under a fresh id.
    Fenced(String),
    /// The engine's own task did not answer in time (overloaded) or has stopped.
    Busy(String),
}

impl EngineError {
    /// What a client is told: fixed per kind, never the cause.
    pub fn client_message(&self) -> &'static str {
        match self {
            EngineError::StoreUnavailable(_) => "session store unavailable; try again later",
            EngineError::StoreFull(_) => "session store full; try again later",
            EngineError::Fenced(_) => "server not ready; try again shortly",
            EngineError::Busy(_) => "server busy; try again later",
        }
    }

    /// A short machine-readable kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::StoreUnavailable(_) => "store_unavailable",
            EngineError::StoreFull(_) => "store_full",
            EngineError::Fenced(_) => "fenced",
            EngineError::Busy(_) => "busy",
        }
    }

    /// The cause (log only).
    pub fn cause(&self) -> &str {
        match self {
            EngineError::StoreUnavailable(c)
            | EngineError::StoreFull(c)
            | EngineError::Fenced(c)
            | EngineError::Busy(c) => c,
        }
    }
}

/// For logs: kind and cause.
impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind(), self.cause())
    }
}

impl std::error::Error for EngineError {}

pub type EngineResult<T> = Result<T, EngineError>;

/// Shared state and routing. Implementations must never hold a lock across `.await` and must
/// bound every call in time (see module docs).
///
/// `room` is always a host session id (tokens are resolved first).
pub trait Engine: Clone + Send + Sync + 'static {
    /// The tunables this engine was started with.
    fn config(&self) -> &EngineConfig;

    /// Stores a new session and its host token. `false` when the id is taken: of two racing
    /// registrations of one id, exactly one gets `true`.
    fn register(
        &self,
        session: SessionRecord,
        host_token: &str,
    ) -> impl Future<Output = EngineResult<bool>> + Send;

    /// The session behind `id` (a session id or a token) and what `id` grants.
    fn resolve(&self, id: &str) -> impl Future<Output = EngineResult<Option<Access>>> + Send;

    /// Mints a token of `grant` (`Joiner` or `Relay`) for `session`; `None` when the session is
    /// gone or has minted `max_tokens_per_session` already.
    fn mint_token(
        &self,
        session: &str,
        grant: Grant,
    ) -> impl Future<Output = EngineResult<Option<String>>> + Send;

    /// Takes a relay joiner's token: its session the first time, `None` ever after (or for
    /// any other id). Of concurrent takers exactly one gets it.
    fn take_relay_token(
        &self,
        token: &str,
    ) -> impl Future<Output = EngineResult<Option<SessionRecord>>> + Send;

    /// The relay's pairing step for a socket of `room` (see [`crate::relay::pairing`]), atomic
    /// across instances: a fresh host socket (within `limits.fresh` of the room's mark, and no
    /// other fresh one waiting) takes the oldest waiting joiner or waits itself; any other host
    /// socket waits as late; a joiner takes the waiting fresh host socket, else the newest late
    /// one, or waits itself.
    fn relay_arrive(
        &self,
        room: &str,
        side: crate::relay::Side,
        me: &crate::relay::Endpoint,
        limits: crate::relay::Limits,
    ) -> impl Future<Output = EngineResult<crate::relay::Arrival>> + Send;

    /// Takes a socket off the room's waiting lists (it was paired another way, or gave up).
    fn relay_forget(
        &self,
        room: &str,
        me: &crate::relay::Endpoint,
    ) -> impl Future<Output = EngineResult<()>> + Send;

    /// Marks now as the room's last host event (registration, a host socket answered, a fresh
    /// one timed out): host sockets arriving soon after are the host's acceptor loop.
    fn relay_mark(
        &self,
        room: &str,
    ) -> impl Future<Output = EngineResult<crate::relay::Mark>> + Send;

    /// Takes `mark` back (its socket failed the approval check), unless a later one was set.
    fn relay_unmark(
        &self,
        room: &str,
        mark: crate::relay::Mark,
    ) -> impl Future<Output = EngineResult<()>> + Send;

    /// Hands a relay piece to a relay socket of another instance; `false` when nobody took it
    /// (that instance is gone). Only called for remote endpoints (see `crate::relay::post`).
    fn relay_post(
        &self,
        to: &crate::relay::Endpoint,
        piece: crate::relay::Piece,
    ) -> impl Future<Output = EngineResult<bool>> + Send;

    /// Makes `peer` the peer acting through `token` (its WebSocket joined through it).
    fn bind_token(&self, token: &str, peer: &str) -> impl Future<Output = EngineResult<()>> + Send;

    /// Checks the HMAC of a join code against the session's, counting a wrong one for the
    /// session and for `client`, all in one atomic step; past the limits nothing is compared.
    fn check_code(
        &self,
        session: &str,
        client: &str,
        digest: &str,
    ) -> impl Future<Output = EngineResult<CodeCheck>> + Send;

    /// Counts one event under `key` in a fixed window; `Some(retry_after)` once more than `max`
    /// happened within it (the event is counted anyway).
    fn rate(
        &self,
        key: &str,
        max: u32,
        window: Duration,
    ) -> impl Future<Output = EngineResult<Option<Duration>>> + Send;

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

    /// Stores the answer of a handshake from `from` for `to` (a later one replaces it);
    /// `false` when `from` has `max_queued_answers` waiting for `to` already.
    fn put_answer(
        &self,
        room: &str,
        from: &str,
        to: &str,
        handshake: &str,
        payload: String,
    ) -> impl Future<Output = EngineResult<bool>> + Send;

    /// Takes the answer of a handshake for `to`: of concurrent readers exactly one gets it.
    fn take_answer(
        &self,
        room: &str,
        to: &str,
        handshake: &str,
    ) -> impl Future<Output = EngineResult<Option<String>>> + Send;

    /// This instance's sockets, their memberships and the local delivery path.
    fn router(&self) -> &Router;

    /// Registers a socket of this instance under its server-assigned peer id and returns the
    /// queue the socket task writes from.
    fn connect(&self, peer: &str) -> PeerQueue {
        self.router().connect(peer)
    }

    /// Forgets a socket of this instance; one that never left leaves now.
    fn disconnect(&self, peer: &str) -> impl Future<Output = ()> + Send;

    /// Adds the peer to the room with its role, unless the room has `max_peers` members (or
    /// `entry`'s code is refused), and sends `peer_joined` to the other members. Idempotent
    /// per peer.
    fn join(
        &self,
        room: &str,
        peer: NewPeer,
        max_peers: usize,
        entry: Entry<'_>,
    ) -> impl Future<Output = EngineResult<JoinResult>> + Send;

    /// Removes the peer from the room and sends `peer_left` to the remaining members. A peer
    /// that was not a member is ignored (no `peer_left` for sockets that never joined).
    fn leave(&self, room: &str, peer: &str) -> impl Future<Output = EngineResult<()>> + Send;

    /// Whether `peer` is currently a member of `room`.
    fn is_member(&self, room: &str, peer: &str) -> impl Future<Output = EngineResult<bool>> + Send;

    /// The room's `server` peer (its latest host join), while it is a member.
    fn server_peer(&self, room: &str) -> impl Future<Output = EngineResult<Option<String>>> + Send;

    /// Delivers a relayed frame from local member `from` to member `to` of `room`, wherever
    /// its socket is. A local recipient has it (or has refused it) when this returns; for a
    /// remote one it is queued for that instance ([`Delivery::Published`]), so the sender goes
    /// on reading while it is under way, and only a failure is reported back to `from`, as an
    /// `error` frame in its queue.
    fn send(
        &self,
        room: &str,
        from: &str,
        to: &str,
        frame: Frame,
    ) -> impl Future<Output = EngineResult<Delivery>> + Send;

    /// Releases senders on other instances that were held for a local socket's queue (see
    /// [`crate::peers::Hold`]); only the Redis engine has such senders.
    fn release(&self, held: Vec<crate::peers::Held>) {
        debug_assert!(held.is_empty(), "senders held in-process: {held:?}");
    }

    /// `Ok` while this instance can serve: the store answers and routing works.
    fn ready(&self) -> impl Future<Output = EngineResult<()>> + Send;

    /// Number of sockets on this instance (for `/health` and the connection limit).
    fn local_peers(&self) -> usize {
        self.router().count()
    }

    /// Redis engine: how long ago the last pub/sub self-message arrived and the last heartbeat
    /// went through (`None` before the first), for `/metrics`.
    fn liveness_ages(&self) -> (Option<Duration>, Option<Duration>) {
        (None, None)
    }

    /// Admin API: the session `id` and its room across every instance; `None` when unknown.
    fn admin_session(
        &self,
        id: &str,
    ) -> impl Future<Output = EngineResult<Option<admin::SessionView>>> + Send;

    /// Admin API: closes session `id` for good. Its id, tokens and code stop resolving at once
    /// (so it cannot be joined again) and every member, on every instance, has its socket
    /// closed (`CloseReason::SessionClosed`). Idempotent.
    fn admin_close(
        &self,
        id: &str,
    ) -> impl Future<Output = EngineResult<admin::CloseOutcome>> + Send;

    /// Admin API: the live instances and the age of their heartbeats.
    fn admin_instances(
        &self,
    ) -> impl Future<Output = EngineResult<Vec<admin::InstanceView>>> + Send;

    /// Ends the engine's background work (heartbeats, subscriptions); called once, after the
    /// sockets have left their rooms during the drain.
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}
