//! Metrics: every series the server exports at `GET /metrics` (Prometheus text format), named
//! in one table, [`SERIES`], and recorded through the functions below.
//!
//! The `metrics` crate holds one global recorder per process; [`install`] puts the Prometheus
//! exporter's there before the runtime starts. Recording is an atomic add on a registered
//! handle (the registry's own lock is a short `std::sync::RwLock`, never held across an
//! `.await`); the relay path keeps its handles in [`Hot`] so it does not even hash a key, and
//! counts relays in per-thread stripes summed when scraped.
//! Gauges of state (open sockets, joined peers, lag) are read when scraped, in
//! [`render`], so they cannot drift from the truth. Without [`install`] (unit tests) every
//! call is a no-op.
//!
//! Label values are fixed strings chosen by the server (reasons, commands, kinds), never
//! anything a client sent, so a client cannot grow the number of series.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// What a series is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every series: name, kind, help. The dashboard may use only these (a test checks it).
#[rustfmt::skip]
pub const SERIES: &[(&str, Kind, &str)] = &[
    ("beach_road_build_info", Kind::Gauge, "Always 1; labels: version, engine"),
    ("beach_road_websockets_open", Kind::Gauge, "WebSocket connections open on this instance"),
    ("beach_road_peers_joined", Kind::Gauge, "Peers joined to a session on this instance"),
    ("beach_road_rooms_local", Kind::Gauge, "Sessions with at least one member on this instance"),
    ("beach_road_runtime_scheduling_lag_seconds", Kind::Gauge, "How late the last 100 ms watchdog tick fired"),
    ("beach_road_draining", Kind::Gauge, "1 while the instance drains (after SIGTERM), else 0"),
    ("beach_road_pubsub_self_ping_age_seconds", Kind::Gauge, "Age of the last self-message received over pub/sub (Redis engine)"),
    ("beach_road_heartbeat_age_seconds", Kind::Gauge, "Age of this instance's last successful heartbeat (Redis engine)"),
    ("beach_road_log_lines_dropped_total", Kind::Counter, "Log lines dropped because the log writer could not keep up"),
    ("beach_road_sessions_registered_total", Kind::Counter, "Sessions registered"),
    ("beach_road_peers_joined_total", Kind::Counter, "WebSocket joins accepted, by role"),
    ("beach_road_peers_left_total", Kind::Counter, "Members that left their session on this instance"),
    ("beach_road_messages_relayed_total", Kind::Counter, "Messages relayed, by type and path (local, redis)"),
    ("beach_road_relay_errors_total", Kind::Counter, "Relays not delivered (each reported to its sender), by reason"),
    ("beach_road_redis_command_duration_seconds", Kind::Histogram, "Redis call latency, by command"),
    ("beach_road_redis_errors_total", Kind::Counter, "Failed Redis calls, by command and kind"),
    ("beach_road_pubsub_resubscriptions_total", Kind::Counter, "Pub/sub (re)subscriptions after a reconnect or a stale self-message"),
    ("beach_road_pubsub_gaps_total", Kind::Counter, "Gaps in the subscription whose rooms were re-read (repairs)"),
    ("beach_road_pubsub_disconnects_total", Kind::Counter, "Pub/sub connection losses seen"),
    ("beach_road_redis_connection_replacements_total", Kind::Counter, "Redis connections replaced (failover, deaf subscription)"),
    ("beach_road_pubsub_pushes_dropped_total", Kind::Counter, "Pub/sub messages dropped, by reason"),
    ("beach_road_reaped_peers_total", Kind::Counter, "Peers of dead instances reaped by this instance"),
    ("beach_road_reaped_instances_total", Kind::Counter, "Dead instances fully reaped by this instance"),
    ("beach_road_fencings_total", Kind::Counter, "Times this instance found itself written off and fenced itself"),
    ("beach_road_disconnects_total", Kind::Counter, "WebSockets closed by the server, by reason"),
    ("beach_road_senders_paced_total", Kind::Counter, "Frames a sender had to wait for (over its message or byte rate)"),
    ("beach_road_senders_held_total", Kind::Counter, "Times a sender's reading was held for a recipient on another instance past its relay share"),
    ("beach_road_refusals_total", Kind::Counter, "Requests, upgrades and connections refused, by reason"),
    ("beach_road_code_failures_total", Kind::Counter, "Wrong join codes"),
    ("beach_road_relay_sockets", Kind::Gauge, "Relay sockets on this instance (held, waiting or paired)"),
    ("beach_road_relay_events_total", Kind::Counter, "WebSocket relay events (pairing, refusals, limits, ends), by event"),
    ("beach_road_relay_bytes_total", Kind::Counter, "Bytes of client frames written by the WebSocket relay"),
];

/// Redis call latency buckets (seconds): loopback calls take ~0.1 ms, the call timeout is 2 s.
const REDIS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global one (once; later calls keep the
/// first). Call before anything records, so [`Hot`]'s handles are real ones.
pub fn install(engine: &'static str) {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("beach_road_redis_command_duration_seconds".into()),
                REDIS_BUCKETS,
            )
            .expect("fixed, non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            eprintln!("metrics: a recorder was already installed; /metrics stays empty");
        }
        describe();
        gauge!("beach_road_build_info", "version" => env!("CARGO_PKG_VERSION"), "engine" => engine)
            .set(1.0);
        LazyLock::force(&HOT);
        handle
    });
}

fn describe() {
    for &(name, kind, help) in SERIES {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, Unit::Seconds, help),
        }
    }
    // Register every series with its known label values, so each is scraped as 0 before its
    // first event. Labelled series not preset here appear at their first event.
    for &(name, kind, _) in SERIES {
        let preset = PRESET.iter().any(|p| p.0 == name) || EVENT_LABELLED.contains(&name);
        if kind == Kind::Counter && !preset {
            counter!(name).absolute(0);
        }
    }
    for &(name, label, values) in PRESET {
        for value in values {
            counter!(name, label => *value).absolute(0);
        }
    }
}

/// Labelled counters and their label values, registered at start.
const PRESET: &[(&str, &str, &[&str])] = &[
    ("beach_road_disconnects_total", "reason", DISCONNECTS),
    ("beach_road_refusals_total", "reason", REFUSALS),
    ("beach_road_relay_errors_total", "reason", RELAY_ERRORS),
    (
        "beach_road_pubsub_pushes_dropped_total",
        "reason",
        &["unparsable", "report_backlog_full"],
    ),
    (
        "beach_road_peers_joined_total",
        "role",
        &["server", "client"],
    ),
    ("beach_road_relay_events_total", "event", RELAY_EVENTS),
];

/// What happened to relay sockets (`crate::relay`).
pub const RELAY_EVENTS: &[&str] = &[
    "host_held",
    "host_late",
    "host_timeout",
    "paired",
    "declined",
    "joiner_gone",
    "joiner_timeout",
    "crowded",
    "token_refused",
    "limit_duration",
    "paced",
    "partner_unreachable",
    "overrun",
    "ended",
];

/// Labelled counters registered elsewhere: by [`HOT`], or at their first event (the
/// command-by-kind pairs are too many to preset).
const EVENT_LABELLED: &[&str] = &[
    "beach_road_messages_relayed_total",
    "beach_road_redis_errors_total",
];

/// Why the server closed a WebSocket.
pub const DISCONNECTS: &[&str] = &[
    "slow_consumer",
    "fenced",
    "shutdown",
    "protocol_error",
    "too_big",
    "join_timeout",
    "idle_timeout",
    "admin_close",
];

/// Why a request, an upgrade or a connection was refused.
pub const REFUSALS: &[&str] = &[
    "metrics_not_allowed",
    "admin_off",
    "admin_token",
    "admin_locked",
    "registration_rate",
    "registration_budget",
    "code_locked",
    "tokens_spent",
    "room_full",
    "sockets_per_address",
    "upgrade_rate",
    "sockets_full",
    "connections_per_address",
    "connections_full",
    "bad_upgrade",
    "store_unavailable",
    "store_full",
    "fenced",
    "busy",
    "mailbox_full",
    "too_large",
    "relay_only",
];

/// Why a relayed message was not delivered.
pub const RELAY_ERRORS: &[&str] = &[
    "not_member",
    "unreachable",
    "recipient_full",
    "publish_failed",
];

/// The path of a relayed message.
#[derive(Clone, Copy)]
pub enum Path {
    Local = 0,
    Redis = 1,
}

const RELAY_TYPES: [&str; 3] = ["signal", "transport_proposal", "transport_accepted"];

/// Handles of the per-message series, registered once.
struct Hot {
    relayed: [[Counter; 2]; 3],
    /// Every relay to another instance is one PUBLISH.
    publish: Histogram,
}

static HOT: LazyLock<Hot> = LazyLock::new(|| {
    let per_type = |t: &'static str| {
        ["local", "redis"]
            .map(|path| counter!("beach_road_messages_relayed_total", "type" => t, "path" => path))
    };
    Hot {
        relayed: RELAY_TYPES.map(per_type),
        publish: histogram!("beach_road_redis_command_duration_seconds", "command" => "PUBLISH"),
    }
});

/// Relayed messages by type and path, counted in stripes and summed into
/// `beach_road_messages_relayed_total` when scraped ([`render`]): on the exporter's counter
/// (an add, and a bump of its generation beside it) every relay of every worker thread went
/// through the same two cache lines.
static RELAYED: [Stripe; STRIPES] = [const { Stripe([const { AtomicU64::new(0) }; 6]) }; STRIPES];
const STRIPES: usize = 16;

/// One thread's counts (type × path), alone on its cache lines.
#[repr(align(128))]
struct Stripe([AtomicU64; 6]);

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MY_STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}

/// One relayed message, delivered or handed to Redis.
pub fn relayed(kind: crate::protocol::Relayed, path: Path) {
    let i = kind as usize * 2 + path as usize;
    MY_STRIPE.with(|&s| RELAYED[s].0[i].fetch_add(1, Ordering::Relaxed));
}

fn publish_relayed() {
    for (t, paths) in HOT.relayed.iter().enumerate() {
        for (p, counter) in paths.iter().enumerate() {
            let sum = RELAYED
                .iter()
                .map(|s| s.0[t * 2 + p].load(Ordering::Relaxed));
            counter.absolute(sum.sum());
        }
    }
}

pub fn relay_error(reason: &'static str) {
    counter!("beach_road_relay_errors_total", "reason" => reason).increment(1);
}

pub fn registered() {
    counter!("beach_road_sessions_registered_total").increment(1);
}

pub fn joined(role: &'static str) {
    counter!("beach_road_peers_joined_total", "role" => role).increment(1);
}

pub fn left() {
    counter!("beach_road_peers_left_total").increment(1);
}

/// One Redis call: its latency, and its error's kind if it failed.
pub fn redis_call(command: &'static str, took: Duration, error: Option<&'static str>) {
    let took = took.as_secs_f64();
    if command == "PUBLISH" {
        HOT.publish.record(took);
    } else {
        histogram!("beach_road_redis_command_duration_seconds", "command" => command).record(took);
    }
    if let Some(kind) = error {
        redis_error(command, kind);
    }
}

/// A Redis call that failed, or (a pipeline across a cluster's nodes) failed in part.
pub fn redis_error(command: &'static str, kind: &'static str) {
    counter!("beach_road_redis_errors_total", "command" => command, "kind" => kind).increment(1);
}

pub fn pubsub_resubscribed() {
    counter!("beach_road_pubsub_resubscriptions_total").increment(1);
}

pub fn pubsub_gap() {
    counter!("beach_road_pubsub_gaps_total").increment(1);
}

pub fn pubsub_disconnected() {
    counter!("beach_road_pubsub_disconnects_total").increment(1);
}

pub fn connection_replaced() {
    counter!("beach_road_redis_connection_replacements_total").increment(1);
}

pub fn push_dropped(reason: &'static str) {
    counter!("beach_road_pubsub_pushes_dropped_total", "reason" => reason).increment(1);
}

pub fn reaped(peers: u64) {
    counter!("beach_road_reaped_peers_total").increment(peers);
}

pub fn reaped_instance() {
    counter!("beach_road_reaped_instances_total").increment(1);
}

pub fn fenced() {
    counter!("beach_road_fencings_total").increment(1);
}

pub fn disconnected(reason: &'static str) {
    counter!("beach_road_disconnects_total", "reason" => reason).increment(1);
}

pub fn paced() {
    counter!("beach_road_senders_paced_total").increment(1);
}

pub fn sender_held() {
    counter!("beach_road_senders_held_total").increment(1);
}

pub fn refused(reason: &'static str) {
    counter!("beach_road_refusals_total", "reason" => reason).increment(1);
}

pub fn code_failure() {
    counter!("beach_road_code_failures_total").increment(1);
}

/// `event` is one of [`RELAY_EVENTS`].
pub fn relay_event(event: &'static str) {
    counter!("beach_road_relay_events_total", "event" => event).increment(1);
}

pub fn relay_bytes(n: usize) {
    counter!("beach_road_relay_bytes_total").increment(n as u64);
}

/// State read at scrape time.
pub struct Scrape {
    pub websockets_open: usize,
    pub peers_joined: usize,
    pub rooms_local: usize,
    pub relay_sockets: usize,
    pub lag: Duration,
    pub draining: bool,
    pub log_lines_dropped: u64,
    /// Redis engine only: self-message and heartbeat ages.
    pub pubsub_self_ping_age: Option<Duration>,
    pub heartbeat_age: Option<Duration>,
}

/// Sets the scraped gauges and renders every series; `None` when no recorder is installed.
pub fn render(s: Scrape) -> Option<String> {
    let handle = HANDLE.get()?;
    gauge!("beach_road_websockets_open").set(s.websockets_open as f64);
    gauge!("beach_road_peers_joined").set(s.peers_joined as f64);
    gauge!("beach_road_rooms_local").set(s.rooms_local as f64);
    gauge!("beach_road_relay_sockets").set(s.relay_sockets as f64);
    gauge!("beach_road_runtime_scheduling_lag_seconds").set(s.lag.as_secs_f64());
    gauge!("beach_road_draining").set(if s.draining { 1.0 } else { 0.0 });
    counter!("beach_road_log_lines_dropped_total").absolute(s.log_lines_dropped);
    publish_relayed();
    if let Some(age) = s.pubsub_self_ping_age {
        gauge!("beach_road_pubsub_self_ping_age_seconds").set(age.as_secs_f64());
    }
    if let Some(age) = s.heartbeat_age {
        gauge!("beach_road_heartbeat_age_seconds").set(age.as_secs_f64());
    }
    Some(handle.render())
}

/// Drains histogram samples into their buckets; the server runs it every second so a burst of
/// Redis calls cannot pile up samples between scrapes.
pub async fn upkeep() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(h) = HANDLE.get() {
            h.run_upkeep();
        }
    }
}
