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
//! In a cluster a pipeline must stay on one slot; [`Conn`] splits one that does not into a
//! pipeline per slot, each in its commands' order, sent together (see `split_by_slot`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{
    Arg, Cmd, ErrorKind, Pipeline, ProtocolVersion, PushInfo, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, Value,
};

use super::pushes::Pushes;
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
            Conn::Cluster(c) => match split_by_slot(pipe) {
                None => c.req_packed_commands(pipe, offset, count),
                Some(parts) => Box::pin(query_parts(c.clone(), parts, pipe.len())),
            },
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// The first key of a command we send (`EVALSHA`: after the digest and the key count); `None`
/// for one without (`PING`, `TIME`).
fn first_key(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()?;
    if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        args.nth(1)?;
    }
    args.next()
}

/// A pipeline on several slots (the outbox's publishes to several instances, refreshes of many
/// sessions) as one pipeline per slot with the positions of its commands; keyless commands go
/// with the first. `None` when it is on one slot, as a cluster takes it. A transaction is
/// never split (Redis refuses one across slots, as it should).
fn split_by_slot(pipe: &Pipeline) -> Option<Vec<(Pipeline, Vec<usize>)>> {
    if pipe.is_transaction() {
        return None;
    }
    let slots: Vec<Option<Slot>> = pipe
        .cmd_iter()
        .map(|c| first_key(c).map(Slot::for_key))
        .collect();
    let mut keys: Vec<Slot> = Vec::new();
    for s in slots.iter().flatten() {
        if !keys.contains(s) {
            keys.push(*s);
        }
    }
    if keys.len() < 2 {
        return None;
    }
    let mut parts: Vec<(Pipeline, Vec<usize>)> =
        keys.iter().map(|_| (redis::pipe(), Vec::new())).collect();
    for (i, (cmd, slot)) in pipe.cmd_iter().zip(&slots).enumerate() {
        let part = slot.map_or(0, |s| keys.iter().position(|k| *k == s).unwrap_or(0));
        parts[part].0.add_command(cmd.clone());
        parts[part].1.push(i);
    }
    Some(parts)
}

/// Sends the parts of a split pipeline together; the replies in the pipeline's order. A part
/// that failed while others went (its node is down) answers an error in place of each of its
/// replies, so a caller can tell what went (`Pipeline::ignore_errors`); every part failing is
/// the pipeline failing.
async fn query_parts(
    conn: ClusterConnection,
    parts: Vec<(Pipeline, Vec<usize>)>,
    n: usize,
) -> RedisResult<Vec<Value>> {
    let replies = futures::future::join_all(parts.iter().map(|(pipe, _)| {
        let mut conn = conn.clone();
        async move { conn.req_packed_commands(pipe, 0, pipe.len()).await }
    }))
    .await;
    if replies.iter().all(Result::is_err) {
        return replies
            .into_iter()
            .next()
            .expect("two parts or more")
            .map(|_| Vec::new());
    }
    let mut out = vec![Value::Nil; n];
    for ((_, at), reply) in parts.iter().zip(replies) {
        match reply {
            Ok(values) => at.iter().zip(values).for_each(|(i, v)| out[*i] = v),
            Err(e) => {
                let error = as_reply(&e);
                at.iter().for_each(|i| out[*i] = error.clone());
            }
        }
    }
    Ok(out)
}

/// An error as the reply of a command (redis-rs has no public constructor for one).
fn as_reply(e: &RedisError) -> Value {
    let text = e.to_string().replace(['\r', '\n'], " ");
    let code = e.code().unwrap_or("UNAVAILABLE");
    redis::parse_redis_value(format!("-{code} {text}\r\n").as_bytes()).unwrap_or(Value::Nil)
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

    fn slot(key: &str) -> Slot {
        Slot::for_key(key)
    }

    #[test]
    fn first_keys_of_commands_and_scripts() {
        let c = redis::cmd("HGET").arg("p:{s}:peers").arg("x").clone();
        assert_eq!(first_key(&c), Some(&b"p:{s}:peers"[..]));
        let e = redis::cmd("EVALSHA")
            .arg("abc")
            .arg(1)
            .arg("p:{t}:x")
            .clone();
        assert_eq!(first_key(&e), Some(&b"p:{t}:x"[..]));
        assert_eq!(first_key(&redis::cmd("PING")), None);
    }

    #[test]
    fn a_pipeline_on_one_slot_is_left_whole() {
        let mut p = redis::pipe();
        p.cmd("GET")
            .arg("p:{s}:a")
            .cmd("TIME")
            .cmd("HGETALL")
            .arg("p:{s}:b");
        assert!(split_by_slot(&p).is_none());
        let mut t = redis::pipe();
        t.atomic()
            .cmd("GET")
            .arg("p:{s}:a")
            .cmd("GET")
            .arg("p:{u}:a");
        assert!(split_by_slot(&t).is_none(), "a transaction is never split");
    }

    #[test]
    fn a_pipeline_across_slots_is_split_in_order() {
        let (a, b) = ("p:bus:one", "p:bus:two");
        assert_ne!(slot(a), slot(b));
        let mut p = redis::pipe();
        p.cmd("SPUBLISH").arg(a).arg("1");
        p.cmd("SPUBLISH").arg(b).arg("2");
        p.cmd("PING");
        p.cmd("SPUBLISH").arg(a).arg("3");
        let parts = split_by_slot(&p).expect("two slots");
        let at: Vec<Vec<usize>> = parts.iter().map(|(_, at)| at.clone()).collect();
        assert_eq!(at, [vec![0, 2, 3], vec![1]]);
        let args = |pipe: &Pipeline| -> Vec<Vec<u8>> {
            pipe.cmd_iter()
                .filter_map(|c| match c.args_iter().last() {
                    Some(Arg::Simple(b)) => Some(b.to_vec()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(args(&parts[0].0), [&b"1"[..], b"PING", b"3"]);
        assert_eq!(args(&parts[1].0), [&b"2"[..]]);
    }

    #[test]
    fn a_failed_part_answers_an_error_in_place_of_each_reply() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused\r\n");
        let error = as_reply(&RedisError::from(refused));
        let replies = Value::Array(vec![Value::Int(1), error]);
        let r: Vec<RedisResult<i64>> = redis::from_redis_value(replies).unwrap();
        assert_eq!(r[0].as_ref().ok(), Some(&1));
        assert!(r[1]
            .as_ref()
            .is_err_and(|e| e.to_string().contains("refused")));
    }
}
