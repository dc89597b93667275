//! The relay's flags (flattened into [`crate::config::Config`]).

use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::config::duration;

/// Which sessions are relay sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RelayMode {
    /// No relay: `/relay/...` answers 404.
    Off,
    /// A host chooses it by registering through the relay base URL (`{base}/relay/`).
    OnRequest,
    /// Every session registered here is a relay session.
    All,
}

#[derive(Parser, Debug, Clone)]
pub struct RelayConfig {
    /// Relay sessions: off, on-request (registered through `{base}/relay/`) or all.
    #[arg(long = "relay", env = "BEACH_ROAD_RELAY", value_enum, default_value_t = RelayMode::OnRequest)]
    pub mode: RelayMode,

    /// A host relay socket waits this long for a joiner before it is answered 408 (the host
    /// opens another). Long, because every answer wakes the CLI's loops (a reconnect held this
    /// long sits still instead of retrying); keep it below the load balancer's idle timeout
    /// (ALB: 3600 s) and HAProxy's relay `timeout server` (15 min).
    #[arg(long = "relay-hold", env = "BEACH_ROAD_RELAY_HOLD", default_value = "10m", value_parser = duration)]
    pub hold: Duration,

    /// A joiner relay socket with no host socket to pair within this is closed 1013.
    #[arg(long = "relay-joiner-wait", env = "BEACH_ROAD_RELAY_JOINER_WAIT", default_value = "20s", value_parser = duration)]
    pub joiner_wait: Duration,

    /// A host socket arriving within this of the session's last host event (registration,
    /// a host socket answered, a fresh one timed out), while no other fresh one waits, is taken
    /// for the host's acceptor loop; others (most likely the host's reconnects for departed
    /// joiners) are held and tried only when no fresh one waits.
    #[arg(long = "relay-fresh-window", env = "BEACH_ROAD_RELAY_FRESH_WINDOW", default_value = "3s", value_parser = duration)]
    pub fresh_window: Duration,

    /// Relay sockets waiting per session at most: joiners waiting for a host socket, and late
    /// host sockets (the CLI's reconnects for departed joiners) held on this instance; more are
    /// refused (joiners 1013, late host sockets 503). The host's fresh socket is never refused.
    #[arg(
        long = "relay-max-waiting",
        env = "BEACH_ROAD_RELAY_MAX_WAITING",
        default_value_t = 32
    )]
    pub max_waiting: usize,

    /// Relay pairs per session at most (a pair is two members of the room).
    #[arg(
        long = "relay-max-pairs",
        env = "BEACH_ROAD_RELAY_MAX_PAIRS",
        default_value_t = 8
    )]
    pub max_pairs: usize,

    /// Bytes per second one relay socket may send through (sustained); a faster sender is
    /// slowed (its frames wait), never dropped.
    #[arg(long = "relay-bytes-per-second", env = "BEACH_ROAD_RELAY_BYTES_PER_SECOND", default_value_t = 1 << 20)]
    pub bytes_per_second: u32,

    /// Bytes one relay socket may send in a burst above the sustained rate.
    #[arg(long = "relay-byte-burst", env = "BEACH_ROAD_RELAY_BYTE_BURST", default_value_t = 4 << 20)]
    pub byte_burst: u32,

    /// A relay session relays for this long after its registration at most; then its relay
    /// sockets are closed (1008) and new ones refused.
    #[arg(long = "relay-max-duration", env = "BEACH_ROAD_RELAY_MAX_DURATION", default_value = "24h", value_parser = duration)]
    pub max_duration: Duration,
}

impl RelayConfig {
    pub fn enabled(&self) -> bool {
        self.mode != RelayMode::Off
    }
}
