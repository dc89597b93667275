//! Configuration: command-line flags, each with an environment fallback (`--help` lists them).

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;

use crate::engine::EngineConfig;
use crate::peers::QueueLimits;

/// An address or a CIDR (`10.0.0.7` is `10.0.0.7/32`).
fn ip_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("not an address or CIDR: {s}"))
}

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// A duration that must not be zero (a zero timeout would close every connection at once).
fn positive_duration(s: &str) -> Result<Duration, String> {
    duration(s).and_then(|d| {
        if d.is_zero() {
            Err("must be greater than zero".into())
        } else {
            Ok(d)
        }
    })
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("not a whole number of at least 1: {s}")),
    }
}

/// beach-road: session and signaling server for beach.
#[derive(Parser, Debug, Clone)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// TCP port to listen on.
    #[arg(long, env = "BEACH_ROAD_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Address to bind.
    #[arg(long, env = "BEACH_ROAD_BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,

    /// Redis URL (redis://host:port/db; redis+cluster://host:port[,host:port...] for a Redis
    /// Cluster; rediss for TLS). Unset: one instance on the in-process engine.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Public base URL put into responses (the load balancer's, e.g. https://road.example.com).
    /// Unset: derived from each request's Host and X-Forwarded-Proto headers.
    #[arg(long, env = "BEACH_SESSION_SERVER")]
    pub public_url: Option<String>,

    /// Proxies whose `X-Forwarded-For` is believed (comma-separated addresses or CIDRs, e.g. the
    /// load balancer's subnets). Unset: the TCP peer is the client, whatever the header says.
    #[arg(long, env = "BEACH_ROAD_TRUSTED_PROXIES", value_delimiter = ',', value_parser = ip_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Prefix of every Redis key and channel of this deployment.
    #[arg(long, env = "BEACH_ROAD_KEY_PREFIX", default_value = "beach-road")]
    pub key_prefix: String,

    /// A session lives this long after registration or after its last member left (never while
    /// it has a member).
    #[arg(long, env = "BEACH_ROAD_SESSION_TTL", default_value = "12h", value_parser = duration)]
    pub session_ttl: Duration,

    /// Offers and answers not fetched within this time are dropped.
    #[arg(long, env = "BEACH_ROAD_MAILBOX_TTL", default_value = "5m", value_parser = duration)]
    pub mailbox_ttl: Duration,

    /// Secret keying the stored digests of join codes (at least 32 bytes; the same on every
    /// instance; never stored in Redis). Unset, with no --secret-file: a random one, which is
    /// right for a single instance only.
    #[arg(long, env = "BEACH_ROAD_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// File holding the secret (e.g. fetched from a secret store at boot).
    #[arg(long, env = "BEACH_ROAD_SECRET_FILE")]
    pub secret_file: Option<std::path::PathBuf>,

    /// Bearer token of the Admin API (`/admin/...`; at least 32 bytes). Unset, with no
    /// --admin-token-file: the Admin API is off and its paths answer 404.
    #[arg(long, env = "BEACH_ROAD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// File holding the Admin API's bearer token.
    #[arg(long, env = "BEACH_ROAD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,

    /// Wrong join codes tolerated per session from one client address within the window;
    /// past it that address is refused (HTTP 429) until the window frees up.
    #[arg(long, env = "BEACH_ROAD_MAX_CODE_FAILURES", default_value_t = 5)]
    pub max_code_failures: u32,

    /// Wrong join codes tolerated per session from all addresses within the window; past it
    /// the code is not checked for anyone but token holders (the host and admitted joiners).
    #[arg(
        long,
        env = "BEACH_ROAD_MAX_SESSION_CODE_FAILURES",
        default_value_t = 50
    )]
    pub max_session_code_failures: u32,

    /// The window of both code-failure limits.
    #[arg(long, env = "BEACH_ROAD_CODE_FAILURE_WINDOW", default_value = "10m", value_parser = duration)]
    pub code_failure_window: Duration,

    /// Sessions one client address may register per minute (HTTP 429 beyond).
    #[arg(
        long,
        env = "BEACH_ROAD_REGISTRATIONS_PER_MINUTE",
        default_value_t = 20
    )]
    pub registrations_per_minute: u32,

    /// Sessions the whole deployment accepts per minute, all addresses together: the budget
    /// that keeps Redis from filling (size it as rate x session TTL x ~1 KiB < maxmemory).
    #[arg(
        long,
        env = "BEACH_ROAD_REGISTRATIONS_PER_MINUTE_TOTAL",
        default_value_t = 6000
    )]
    pub registrations_per_minute_total: u32,

    /// Members one room holds at most; further joins get `join_error` "Session is full".
    #[arg(long, env = "BEACH_ROAD_MAX_ROOM_PEERS", default_value_t = 32)]
    pub max_room_peers: usize,

    /// Joiner tokens (one per successful HTTP join or attach) one session may mint in its life.
    #[arg(
        long,
        env = "BEACH_ROAD_MAX_TOKENS_PER_SESSION",
        default_value_t = 1024
    )]
    pub max_tokens_per_session: u32,

    /// Largest offer or answer accepted by the mailbox, in bytes (real SDPs fit ~16 KiB).
    #[arg(long, env = "BEACH_ROAD_MAX_SDP_BYTES", default_value_t = 32 * 1024)]
    pub max_sdp_bytes: usize,

    /// A WebSocket that has not joined within this time is closed.
    #[arg(long, env = "BEACH_ROAD_JOIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub join_timeout: Duration,

    /// Frames per second one socket may send (sustained); a faster sender is slowed down.
    #[arg(
        long,
        env = "BEACH_ROAD_PEER_MESSAGES_PER_SECOND",
        default_value_t = 50
    )]
    pub peer_messages_per_second: u32,

    /// Frames one socket may send in a burst above the sustained rate.
    #[arg(long, env = "BEACH_ROAD_PEER_MESSAGE_BURST", default_value_t = 200)]
    pub peer_message_burst: u32,

    /// Bytes per second one socket may send (sustained); a faster sender is slowed down.
    #[arg(long, env = "BEACH_ROAD_PEER_BYTES_PER_SECOND", default_value_t = 256 * 1024)]
    pub peer_bytes_per_second: u32,

    /// Bytes one socket may send in a burst above the sustained rate.
    #[arg(long, env = "BEACH_ROAD_PEER_BYTE_BURST", default_value_t = 1 << 20)]
    pub peer_byte_burst: u32,

    /// How often this instance refreshes its liveness in Redis.
    #[arg(long, env = "BEACH_ROAD_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = duration)]
    pub heartbeat_interval: Duration,

    /// An instance whose heartbeat is older than this is written off and its peers removed.
    #[arg(long, env = "BEACH_ROAD_INSTANCE_TIMEOUT", default_value = "4s", value_parser = duration)]
    pub instance_timeout: Duration,

    /// Upper bound of one Redis call.
    #[arg(long, env = "BEACH_ROAD_REDIS_TIMEOUT", default_value = "1s", value_parser = duration)]
    pub redis_timeout: Duration,

    /// Upper bound of one HTTP request.
    #[arg(long, env = "BEACH_ROAD_REQUEST_TIMEOUT", default_value = "8s", value_parser = duration)]
    pub request_timeout: Duration,

    /// Interval of the server's WebSocket protocol pings.
    #[arg(long, env = "BEACH_ROAD_PING_INTERVAL", default_value = "20s", value_parser = duration)]
    pub ping_interval: Duration,

    /// A socket silent (no frame, no pong) for this long is closed and leaves its room.
    #[arg(long, env = "BEACH_ROAD_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// A socket write that takes longer than this ends the connection.
    #[arg(long, env = "BEACH_ROAD_WRITE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub write_timeout: Duration,

    /// The WebSocket relay's flags.
    #[command(flatten)]
    pub relay: crate::relay::RelayConfig,

    /// Frames queued for one peer: other clients' relays may fill 3/4 (beyond, they are
    /// refused and their senders told); relays from other instances 16 times this more while
    /// their senders are held; the server's own events a quarter more, beyond which the peer
    /// is disconnected.
    #[arg(long, env = "BEACH_ROAD_PEER_QUEUE_MESSAGES", default_value_t = 256)]
    pub peer_queue_messages: usize,

    /// Bytes queued for one peer, shared out as `--peer-queue-messages` is (relays from other
    /// instances one more queue's bytes, the server's own events twice this).
    #[arg(long, env = "BEACH_ROAD_PEER_QUEUE_BYTES", default_value_t = 1 << 20)]
    pub peer_queue_bytes: usize,

    /// Largest WebSocket message or HTTP body accepted, in bytes.
    #[arg(long, env = "BEACH_ROAD_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Open WebSockets at most; more upgrades are refused with 503. A few more TCP connections
    /// are kept for HTTP and health checks, and both caps stay below the descriptor limit.
    #[arg(long, env = "BEACH_ROAD_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,

    /// Open WebSockets per client address at most (the address behind trusted proxies); more
    /// upgrades are refused with 429.
    #[arg(long, env = "BEACH_ROAD_MAX_SOCKETS_PER_ADDRESS", default_value_t = 64, value_parser = at_least_one)]
    pub max_sockets_per_address: usize,

    /// WebSocket upgrades per client address per second (a token bucket with this burst);
    /// more are refused with 429.
    #[arg(long, env = "BEACH_ROAD_UPGRADES_PER_ADDRESS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub upgrades_per_address: u32,

    /// TCP connections per peer address at most, except from trusted proxies; more are closed
    /// at once, so one host cannot take the connections /health needs.
    #[arg(long, env = "BEACH_ROAD_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 256, value_parser = at_least_one)]
    pub max_connections_per_address: usize,

    /// A new HTTP connection, or a keep-alive one from the first byte of its next request, must
    /// send the whole request head within this; else it is closed.
    #[arg(long, env = "BEACH_ROAD_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub header_read_timeout: Duration,

    /// A keep-alive HTTP connection that sends nothing this long after a response is closed.
    /// Not applied to WebSockets (see --idle-timeout).
    #[arg(long, env = "BEACH_ROAD_HTTP_IDLE_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub http_idle_timeout: Duration,

    /// The keep-alive idle timeout for connections from a trusted proxy: longer than the load
    /// balancer's own (ALB: 3600 s), so that the balancer, not us, closes an idle connection and
    /// no request races our close (AWS's advice for backends).
    #[arg(long, env = "BEACH_ROAD_PROXY_IDLE_TIMEOUT", default_value = "3900s", value_parser = positive_duration)]
    pub proxy_idle_timeout: Duration,

    /// After SIGTERM: how long to keep serving while /ready fails, so the load balancer can
    /// deregister this instance.
    #[arg(long, env = "BEACH_ROAD_DRAIN_DELAY", default_value = "0s", value_parser = duration)]
    pub drain_delay: Duration,

    /// Window over which sockets are closed after the drain delay, so clients do not reconnect
    /// all at once.
    #[arg(long, env = "BEACH_ROAD_DRAIN_JITTER", default_value = "2s", value_parser = duration)]
    pub drain_jitter: Duration,

    /// Scheduling lag past which /health fails (the runtime is considered stuck).
    #[arg(long, env = "BEACH_ROAD_MAX_LAG", default_value = "2s", value_parser = duration)]
    pub max_lag: Duration,

    /// Addresses allowed to scrape `GET /metrics` (comma-separated addresses or CIDRs), checked
    /// against the TCP peer; a request relayed by a trusted proxy is refused whatever its
    /// address (scrape instances directly, not through the load balancer). Others get 404.
    #[arg(
        long,
        env = "BEACH_ROAD_METRICS_ALLOW",
        value_delimiter = ',',
        value_parser = ip_net,
        default_value = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"
    )]
    pub metrics_allow: Vec<ipnet::IpNet>,

    /// Log line format: `text` for a terminal, `json` (one object per line) for journald or
    /// CloudWatch. The level and targets come from `RUST_LOG` (default `info`; e.g.
    /// `RUST_LOG=beach_road=debug,info`); payload-carrying library targets stay capped.
    #[arg(long, env = "BEACH_ROAD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// See [`Config::log_format`].
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            session_ttl: self.session_ttl,
            mailbox_ttl: self.mailbox_ttl,
            max_code_failures: self.max_code_failures,
            max_session_code_failures: self.max_session_code_failures,
            code_failure_window: self.code_failure_window,
            max_tokens_per_session: self.max_tokens_per_session,
            queue: QueueLimits {
                messages: self.peer_queue_messages,
                bytes: self.peer_queue_bytes,
            },
            call_timeout: self.redis_timeout,
            ..EngineConfig::default()
        }
    }

    /// The code secret: configured, read from its file, or random (with a warning).
    pub fn load_secret(&self) -> Result<crate::code::Secret, String> {
        match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => Err("set either --secret or --secret-file, not both".into()),
            (Some(s), None) => crate::code::Secret::new(s.as_bytes()),
            (None, Some(path)) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?;
                crate::code::Secret::new(&bytes)
            }
            (None, None) => {
                tracing::warn!(
                    "no --secret or --secret-file: using a random secret; join codes will not \
                     work across several instances"
                );
                Ok(crate::code::Secret::random())
            }
        }
    }

    /// Defaults as if no flag and no variable were given (tests override fields).
    pub fn defaults() -> Self {
        Self::parse_from(["beach-road"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hygiene_defaults() {
        let c = Config::defaults();
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.http_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.max_sockets_per_address, 64);
        assert_eq!(c.upgrades_per_address, 20);
        assert_eq!(c.max_connections_per_address, 256);
        assert!(Config::try_parse_from(["beach-road", "--http-idle-timeout", "0s"]).is_err());
        assert!(Config::try_parse_from(["beach-road", "--max-sockets-per-address", "0"]).is_err());
    }
}
