//! The connection to Redis: one node (`ConnectionManager`) or a Redis Cluster
//! (`ClusterConnection`, `redis+cluster://` URLs) behind one [`Conn`]; readiness; and the one
//! place its errors become [`EngineError`]s, noting signs of a failover.
//!
//! A failover moves the primary elsewhere (ElastiCache: the endpoint's DNS name follows the new
//! primary), but a connection to the old node may stay open: demoted to a replica, it answers
//! every write with `READONLY` (or `LOADING` while it resyncs, `MASTERDOWN` while its primary is
//! unreachable), and the manager, seeing no I/O error, never reconnects. Such an error marks the
//! engine not ready and wakes the liveness task, which replaces the manager by a fresh one (a new
//! connection, the endpoint resolved anew), at most once per [`FAILOVER_RECONNECT_EVERY`]. A
//! cluster connection follows failovers and slot moves itself (`MOVED`, `ASK`, a refreshed slot
//! map) and resubscribes its shard channel where the slot went.
//!
//! In a cluster a pipeline must stay on one slot; [`Conn`] splits one that does not
//! (`super::slots`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ErrorKind, Pipeline, ProtocolVersion, PushInfo, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, Value,
};

use super::pushes::Pushes;
use super::slots;
use super::{fenced, liveness, unavailable, Inner};
use crate::engine::{EngineError, EngineResult};

/// Reconnect backoff cap: short enough to be ready again within ~1 s of Redis's return.
const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// With the default 6 retries the manager gives up ~9.4 s into an outage and never resumes by
/// itself (`shared/notes/crates.md`); this is "forever" at ≤1 s per attempt.
const RECONNECT_RETRIES: usize = 1_000_000;
/// A failover replaces the connection at most this often (the new endpoint may take a few
/// seconds to resolve to the new primary; each attempt costs one TCP connection).
pub(crate) const FAILOVER_RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Readiness's probe gets at most this long, so `/ready` answers fast.
const READY_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Appends `protocol=resp3` (required for the push channel) unless the URL names a protocol.
fn resp3_url(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

/// Where the engine's commands and its subscription go. Cheap to clone (both are handles to
/// one multiplexed connection, or one per cluster node).
#[derive(Clone)]
pub(crate) enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The seed nodes of a `redis+cluster://` (or `rediss+cluster://`) URL: its comma-separated
/// hosts, each as a one-node URL with the same credentials, path and query. `None`: a one-node
/// URL.
pub(crate) fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = url.split_once("+cluster://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (auth, hosts) = match authority.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), authority),
    };
    let nodes = hosts.split(',').filter(|h| !h.is_empty());
    Some(
        nodes
            .map(|h| format!("{scheme}://{auth}{h}{tail}"))
            .collect(),
    )
}

/// A lazily connecting connection whose pushes go to `pushes` tagged with `gen`, so a replaced
/// connection's late messages are ignored. The handler never blocks the connection: it only
/// delivers into bounded queues (see `super::pushes`).
pub(crate) fn connect(
    url: &str,
    timeout: Duration,
    pushes: Arc<Pushes>,
    gen: u64,
) -> RedisResult<Conn> {
    let sender = move |info: PushInfo| -> Result<(), std::convert::Infallible> {
        pushes.handle(gen, info);
        Ok(())
    };
    let Some(nodes) = cluster_nodes(url) else {
        let client = redis::Client::open(resp3_url(url))?;
        let cfg = ConnectionManagerConfig::new()
            .set_push_sender(sender)
            .set_automatic_resubscription()
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(MAX_RECONNECT_DELAY)
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        return ConnectionManager::new_lazy_with_config(client, cfg).map(Conn::Node);
    };
    if nodes
        .iter()
        .any(|n| !(n.starts_with("redis://") || n.starts_with("rediss://")))
    {
        return Err(RedisError::from((
            ErrorKind::InvalidClientConfig,
            "a cluster URL is redis+cluster://host:port[,host:port...] (or rediss+cluster://)",
        )));
    }
    // Subscriptions are tracked and renewed where their slot goes (failover, migration).
    let client = ClusterClientBuilder::new(nodes)
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(sender)
        .build()?;
    let cfg = ClusterConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout);
    Ok(Conn::Cluster(
        client.get_pending_async_connection_with_config(cfg),
    ))
}

impl Conn {
    /// Subscribes to `channels`: plain channels on one node, a shard channel in a cluster (see
    /// `Keys::channels`).
    pub(crate) async fn subscribe(&mut self, channels: Vec<String>) -> RedisResult<()> {
        match self {
            Conn::Node(cm) => cm.subscribe(channels).await,
            Conn::Cluster(c) => c.ssubscribe(channels).await,
        }
    }

    pub(crate) async fn unsubscribe(&mut self, channels: Vec<String>) -> RedisResult<()> {
        match self {
            Conn::Node(cm) => cm.unsubscribe(channels).await,
            Conn::Cluster(c) => c.sunsubscribe(channels).await,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(cm) => cm.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(cm) => cm.req_packed_commands(pipe, offset, count),
            Conn::Cluster(c) => match slots::split_by_slot(pipe) {
                None => c.req_packed_commands(pipe, offset, count),
                Some(parts) => Box::pin(slots::query_parts(c.clone(), parts, pipe.len())),
            },
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// The node cannot take writes, and reconnecting may reach one that can.
fn is_failover(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::ReadOnly | ServerErrorKind::BusyLoading | ServerErrorKind::MasterDown
        )
    )
}

impl Inner {
    /// `Ok` while this instance can serve (see `docs/architecture.md`, "Readiness").
    pub(super) async fn ready(&self) -> EngineResult<()> {
        if !self.current().registered {
            return Err(fenced("instance not registered in Redis"));
        }
        if self.failover_at.load(Ordering::Acquire) != 0 {
            return Err(unavailable("Redis refuses writes (failover); reconnecting"));
        }
        let last = self.last_tick.load(Ordering::Acquire);
        let age = (self.origin.elapsed().as_millis() as u64).saturating_sub(last);
        if last == 0 || age > liveness::stale_after(&self.settings).as_millis() as u64 {
            return Err(unavailable("pub/sub self-message is not arriving"));
        }
        let mut cm = self.cm();
        let limit = READY_PROBE_TIMEOUT.min(self.config.call_timeout);
        match tokio::time::timeout(limit, self.probe().query_async::<i64>(&mut cm)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.store_error(&e)),
            Err(_) => Err(unavailable("Redis probe timed out")),
        }
    }

    /// Subscribes to instance `id`'s channels.
    pub(super) async fn subscribe(&self, id: &str) -> EngineResult<()> {
        let mut cm = self.cm();
        self.redis("subscribe", cm.subscribe(self.keys.channels(id)))
            .await
    }

    /// Best effort: a channel left subscribed only receives what is then ignored.
    pub(super) async fn unsubscribe(&self, id: &str) {
        let mut cm = self.cm();
        let _ = self
            .redis("unsubscribe", cm.unsubscribe(self.keys.channels(id)))
            .await;
    }

    /// What proves Redis answers: a read on the instance registry's slot, which every instance
    /// needs (in a cluster a `PING` would go to every node, not to the one that matters).
    pub(super) fn probe(&self) -> redis::Cmd {
        redis::cmd("EXISTS").arg(self.keys.alive()).clone()
    }

    /// The one place a Redis error becomes an [`EngineError`].
    pub(super) fn store_error(&self, e: &RedisError) -> EngineError {
        if is_failover(e) {
            let now = (self.origin.elapsed().as_millis() as u64).max(1);
            if self.failover_at.swap(now, Ordering::AcqRel) == 0 {
                tracing::warn!(error = %e, "Redis refuses writes (failover?): reconnecting");
            }
            self.reconnect.notify_one();
        }
        match e.code() {
            // noeviction at maxmemory: what is stored stays, new writes are refused.
            Some("OOM") => EngineError::StoreFull(e.to_string()),
            _ => unavailable(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_their_seed_nodes() {
        assert_eq!(cluster_nodes("redis://h:6379/0"), None);
        assert_eq!(
            cluster_nodes("redis+cluster://a:1,b:2/"),
            Some(vec!["redis://a:1/".to_owned(), "redis://b:2/".to_owned()])
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://u:p%40ss@cfg.example:6379?insecure"),
            Some(vec![
                "rediss://u:p%40ss@cfg.example:6379?insecure".to_owned()
            ])
        );
    }

    #[test]
    fn a_bad_cluster_url_is_refused_at_start() {
        let pushes = || {
            let limits = crate::peers::QueueLimits {
                messages: 8,
                bytes: 1024,
            };
            let router = Arc::new(crate::router::Router::new("i", limits));
            let keys = super::super::keys::Keys::new("p", true);
            let outbox = Arc::new(super::super::outbox::Outbox::new(Duration::from_secs(1)));
            let gen = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let tick = Arc::new(std::sync::atomic::AtomicU64::new(0));
            Pushes::new(router, gen, tick, std::time::Instant::now(), keys, outbox)
        };
        let t = Duration::from_secs(1);
        assert!(connect("http+cluster://a:1", t, pushes(), 0).is_err());
        assert!(connect("redis+cluster://", t, pushes(), 0).is_err());
    }
}
