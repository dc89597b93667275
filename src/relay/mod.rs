//! The WebSocket relay: terminal traffic between a host and its joiners, through beach-road,
//! for sessions where WebRTC cannot work (`docs/protocol.md`, "Relay sessions").
//!
//! A relay session is one from its registration (through `{base}/relay/`, or every session
//! with `--relay all`); its answers offer only the `web_socket` transport, whose URL is
//! `{ws-base}/relay/{token}`. The generation-1 CLI then speaks its own framing over that socket
//! and beach-road pairs sockets and forwards frames, unchanged, between the two of a pair:
//!
//! - The host opens one socket per joiner, the next as soon as the previous is answered. Its
//!   upgrade is **held** (no 101) until a joiner socket waits ([`host`]). A socket arriving
//!   soon after the session's last host event, with no other waiting, is taken for the
//!   acceptor's (fresh); others, most likely the CLI's reconnects for departed joiners, are
//!   tried only when no fresh one waits. A paired host socket must speak first with
//!   `beach:status:approval_…`, which tells them apart.
//! - A joiner's socket is answered at once (its single-use token checked first, [`socket`]) and
//!   waits for a host socket, or is closed 1013 ([`joiner`]).
//! - Who waits for whom is in the engine ([`pairing`] in process, `lua/relay_*.lua` in Redis),
//!   so host and joiner may land on different instances; pieces travel between them through
//!   [`post`]: a direct call into the partner's inbox ([`locals`]) when it is here, the
//!   partner's instance channel otherwise.
//! - Forwarding ([`pipe`]) is credit-based: at most [`WINDOW`] frames of a direction are on
//!   their way before the receiver's side has written them, so a slow reader slows its sender
//!   (its socket is not read) and nothing is dropped; rates and a session's duration are capped.
//! - Relay sockets are room members (presence, reaping, admin close, fencing): a partner's
//!   `peer_left` (it left, or its instance died and was reaped) ends the pair.

pub mod config;
mod host;
mod joiner;
pub mod locals;
pub mod pairing;
mod pipe;
pub mod socket;

use std::fmt;
use std::time::Duration;

use axum::body::Bytes;
use tungstenite::{Message, Utf8Bytes};

use crate::engine::{Engine, EngineResult};

pub use self::config::{RelayConfig, RelayMode};

/// Frames of one direction on their way (sent, not yet written by the receiving side) at most.
pub const WINDOW: u32 = 64;
/// The receiving side acknowledges written frames in batches of this many (or when idle).
pub const ACK_EVERY: u32 = 16;
/// Largest relayed message: the CLI's frames are at most 48 KiB + 13 bytes.
pub const MAX_MESSAGE: usize = 128 * 1024;
/// The first frame a paired host socket must send (the CLI's approval status line).
pub const APPROVAL_PREFIX: &str = "beach:status:approval_";

/// Which end of a pair a relay socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Host,
    Joiner,
}

/// A relay socket: the instance it is on, and its id there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub owner: String,
    pub socket: String,
}

impl Endpoint {
    /// `owner|socket` (instance ids and socket ids never contain `|`).
    pub fn parse(s: &str) -> Option<Endpoint> {
        let (owner, socket) = s.split_once('|')?;
        Some(Endpoint {
            owner: owner.to_owned(),
            socket: socket.to_owned(),
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}|{}", self.owner, self.socket)
    }
}

/// The bounds of [`Engine::relay_arrive`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A host socket is fresh within this of the session's mark.
    pub fresh: Duration,
    /// Joiners one session may have waiting.
    pub max_waiting: usize,
    /// A list entry older than this is stale (its socket went without a word).
    pub stale: Duration,
}

impl Limits {
    pub fn of(relay: &RelayConfig) -> Limits {
        Limits {
            fresh: relay.fresh_window,
            max_waiting: relay.max_waiting,
            stale: relay.hold.max(relay.joiner_wait) + Duration::from_secs(5),
        }
    }
}

/// A mark as [`Engine::relay_mark`] set it (ms on the engine's clock), so it can be taken
/// back when its socket turns out not to be the host's acceptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub set: u64,
    pub prev: u64,
}

/// What [`Engine::relay_arrive`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Paired with this waiting socket of the other side (taken off its list).
    Paired(Endpoint),
    /// Waiting in the session's list.
    Queued,
    /// A host socket that is not fresh: held in the late list (a joiner with no fresh socket
    /// to take tries the newest late one).
    Late,
    /// `max_waiting` wait in this socket's list already.
    Crowded,
}

/// What relay sockets tell each other.
#[derive(Debug)]
pub enum Piece {
    /// From a joiner that took this (held) host socket off the list.
    Offer { from: Endpoint },
    /// From the host socket that is now this joiner's partner; its first frame follows.
    Accepted { from: Endpoint },
    /// The host socket this joiner took cannot be its partner (gone, or not the host's
    /// acceptor socket): pair again.
    Declined,
    /// A client frame, unchanged: text...
    Text(Utf8Bytes),
    /// ...or binary (the only kinds a relay forwards; see [`Piece::frame`]).
    Binary(Bytes),
    /// The receiving side wrote this many frames: as many more may be sent.
    Ack(u32),
    /// The partner's socket ended.
    End,
}

impl Piece {
    /// A client's data frame as a piece; `None` for control frames (ping, pong, close), which
    /// the relay answers itself.
    pub fn frame(msg: Message) -> Option<Piece> {
        match msg {
            Message::Text(t) => Some(Piece::Text(t)),
            Message::Binary(b) => Some(Piece::Binary(b)),
            _ => None,
        }
    }
}

/// Takes the waiting-list entries of held upgrades whose requests were dropped (see
/// [`locals::Locals::forget_later`]) off their lists, so a host's next socket is not taken for
/// late because of a socket that is gone. Owned by the server, which aborts it at exit.
pub async fn janitor<E: Engine>(engine: E) {
    let locals = engine.router().relays().clone();
    loop {
        for (room, me) in locals.gone().await {
            if let Err(e) = engine.relay_forget(&room, &me).await {
                tracing::debug!(error = %e, "relay entry of a dropped upgrade not cleared");
            }
        }
    }
}

/// Hands `piece` to the relay socket `to`, wherever it is; `false` when nobody took it.
pub async fn post<E: Engine>(engine: &E, to: &Endpoint, piece: Piece) -> EngineResult<bool> {
    let router = engine.router();
    if router.is_local(&to.owner) {
        return Ok(router.relays().deliver(&to.socket, piece));
    }
    engine.relay_post(to, piece).await
}
