//! beach-road: the session and signaling server of beach.
//!
//! A host registers a session, clients join it with a code, and beach-road relays their
//! signaling (offers, answers, ICE candidates) over HTTP and WebSocket until the peers talk
//! directly. The wire format is fixed by existing clients: `docs/protocol.md`.
//!
//! # Layout
//!
//! | module | what it is |
//! |---|---|
//! | [`cli`] | the command line: the server's flags, or the `check` subcommand |
//! | [`config`] | flags with environment fallbacks |
//! | [`descriptors`] | the descriptor limit raised, the descriptor table sized before threads exist |
//! | [`protocol`] | wire types and id validation |
//! | [`code`] | join codes: generation, salted hashing, constant-time check |
//! | [`client`] | the client's address: TCP peer or trusted proxies' `X-Forwarded-For` |
//! | [`addr_limits`] | per-address caps (connections, WebSockets) and the upgrade rate |
//! | [`access`] | the join-code check shared by HTTP join, attach and WebSocket join |
//! | [`engine`] | the [`engine::Engine`] trait: all shared state and routing |
//! | [`engine::memory`] | in-process engine (no `REDIS_URL`): state behind one `std::sync::Mutex` |
//! | [`engine::redis`] | Redis engine: stateless instances, Lua scripts in `lua/`, pub/sub routing |
//! | [`engine::admin`] | what the Admin API reads and does through an engine |
//! | [`router`] | this instance's sockets, memberships and room views: the one local delivery path |
//! | [`peers`] | the sockets' bounded outbound queues, and backpressure (waits for room, holds across instances) |
//! | [`http`] | HTTP plumbing (state, errors, public URLs), health and readiness |
//! | [`sessions`] | register, status, HTTP join, attach: capabilities handed out |
//! | [`mailbox`] | offers and answers, acting for the peer of the URL's token |
//! | [`admin`] | the Admin API (off without a token): a room across instances, closing a session, the live instances |
//! | [`health`] | liveness: scheduling lag, systemd watchdog |
//! | [`logging`] | non-blocking, lossy log writer that cannot stall the runtime; text or JSON lines |
//! | [`metrics`] | every exported series (Prometheus text at `/metrics`) and how it is recorded |
//! | [`relay`] | the WebSocket relay for relay sessions: holding, pairing, credit-based forwarding, the janitor of dropped held upgrades |
//! | [`ws`] | one WebSocket connection: handshake, join, relay, batched writes, keep-alive, leave |
//! | [`listener`] | TCP accept with a connection cap, a per-address cap and no stall on EMFILE |
//! | [`http_conn`] | the accept loop; each HTTP/1.1 connection with header-read and idle timeouts |
//! | [`server`] | wiring: router, listener, connection limit, serve until shutdown |
//! | [`shutdown`] | graceful drain on SIGTERM/SIGINT |
//! | [`check`] | `beach-road check`: the end-to-end probe for alerting (HTTP and WebSocket client) |
//!
//! # Rules every module follows
//!
//! No lock guard or borrow of shared state lives across an `.await` (shared state sits behind
//! a private `std::sync::Mutex` reached only through synchronous methods); every queue is bounded and says what happens when it is full; every
//! call to Redis or the network has a timeout; every spawned task ends with its owner.

pub mod access;
pub mod addr_limits;
pub mod admin;
pub mod check;
pub mod cli;
pub mod client;
pub mod code;
pub mod config;
pub mod descriptors;
pub mod engine;
pub mod health;
pub mod http;
pub mod http_conn;
pub mod listener;
pub mod logging;
pub mod mailbox;
pub mod metrics;
pub mod peers;
pub mod protocol;
pub mod relay;
pub mod router;
pub mod server;
pub mod sessions;
pub mod shutdown;
pub mod ws;
