//! Redis engine: many stateless instances share one Redis.
//!
//! Sessions, the mailbox, room membership and instance liveness live in Redis and change only
//! through the Lua scripts of `lua/` (one per operation, see [`scripts`]). An instance keeps only
//! its own sockets, in the shared [`Router`]. A frame for a peer on another instance is
//! published to that instance's channel ([`bus`]) through the [`outbox`], in order; what arrives
//! there is handled in [`pushes`]. Sessions, tokens, code checks and the mailbox are in [`store`];
//! joining in [`join`], leaving and delivery in [`rooms`]; liveness and fencing in [`liveness`],
//! reaping in [`reaper`]; keeping sessions with members alive in [`refresh`]; the Admin API's
//! reads and closes in [`admin`]; the connection and its errors in [`conn`], pipelines on a
//! cluster in [`slots`].
//! The key schema is in [`keys`] and `docs/architecture.md`.
//!
//! One connection ([`conn::Conn`]: a `ConnectionManager` to one node, or a cluster connection
//! to a Redis Cluster; RESP3, push channel, automatic resubscription) carries both commands and
//! the subscription; every call is bounded by `call_timeout`.

mod admin;
mod bus;
mod conn;
mod join;
mod keys;
mod liveness;
mod outbox;
mod pushes;
mod reaper;
mod refresh;
mod relay;
mod repair;
mod rooms;
mod scripts;
mod slots;
mod store;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::RedisResult;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::conn::{cluster_nodes, connect, Conn};
use self::keys::Keys;
use self::pushes::Pushes;
use self::scripts::Scripts;
use crate::engine::admin::{CloseOutcome, InstanceView, SessionView};
use crate::engine::{
    Access, CodeCheck, Delivery, Engine, EngineConfig, EngineError, EngineResult, Entry, Grant,
    JoinResult, NewPeer, SessionRecord,
};
use crate::protocol::Frame;
use crate::router::{Membership, Router};

/// Redis-specific settings (see `Config`).
#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub url: String,
    /// Prefix of every key and channel, so deployments can share a Redis.
    pub key_prefix: String,
    pub heartbeat_interval: Duration,
    /// A heartbeat older than this writes an instance off (its peers are reaped).
    pub instance_timeout: Duration,
}

/// This process's identity in Redis; replaced by a fresh one when the instance is fenced.
#[derive(Clone, Debug)]
pub(crate) struct Instance {
    pub id: String,
    /// Registered in the live set: only then may peers join through this instance.
    pub registered: bool,
}

/// The Redis engine. Cheap to clone; all clones share one instance.
#[derive(Clone)]
pub struct RedisEngine {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: EngineConfig,
    settings: RedisSettings,
    keys: Keys,
    scripts: Scripts,
    conn: watch::Receiver<Conn>,
    instance: watch::Receiver<Instance>,
    router: Arc<Router>,
    /// What arrives on this instance's channel (the manager calls it).
    pushes: Arc<Pushes>,
    /// What this instance publishes to the others, in order.
    outbox: Arc<outbox::Outbox>,
    /// Leaves whose Redis part failed; the liveness task retries them.
    retries: Mutex<Vec<(String, Membership)>>,
    last_tick: Arc<AtomicU64>,
    origin: Instant,
    /// Until when (ms since `origin`) this instance is certainly not written off: the send time
    /// of its last successful heartbeat (or registration) plus `instance_timeout`. 0: never.
    alive_until: AtomicU64,
    stop: watch::Sender<bool>,
    tasks: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Test hook: stop heartbeating and registering, as if cut off from Redis.
    paused: AtomicBool,
    /// Test hook: reap nothing (so a test can choose which instance reaps).
    reaper_paused: AtomicBool,
    /// Test hook: the next relay to another instance stalls this long (ms) after its first
    /// liveness check, as if the process froze there.
    stall_send: AtomicU64,
    /// When (ms since `origin`; 0: never) Redis last said it cannot take writes (a failover,
    /// see `conn`). Not ready until a heartbeat sent after it succeeds.
    failover_at: AtomicU64,
    /// Wakes the liveness task at once on such an error, to replace the connection.
    reconnect: tokio::sync::Notify,
}

/// An unreachable or unusable store (see [`Inner::store_error`] for errors Redis returned).
fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::StoreUnavailable(e.to_string())
}

/// This instance may not act for its peers (unregistered, or possibly written off).
fn fenced(why: &str) -> EngineError {
    EngineError::Fenced(why.to_owned())
}

impl RedisEngine {
    /// Starts the engine. Fails only on a malformed URL, never because Redis is down: the
    /// instance then starts not ready and registers as soon as Redis answers.
    pub async fn start(config: EngineConfig, settings: RedisSettings) -> RedisResult<RedisEngine> {
        let gen = Arc::new(AtomicU64::new(0));
        let id = crate::protocol::new_id();
        let router = Arc::new(Router::new(&id, config.queue));
        let last_tick = Arc::new(AtomicU64::new(0));
        let origin = Instant::now();
        let keys = Keys::new(&settings.key_prefix, cluster_nodes(&settings.url).is_some());
        let outbox = Arc::new(outbox::Outbox::new(config.call_timeout));
        let pushes = Pushes::new(
            router.clone(),
            gen.clone(),
            last_tick.clone(),
            origin,
            keys.clone(),
            outbox.clone(),
        );
        let cm = connect(&settings.url, config.call_timeout, pushes.clone(), 0)?;
        let (conn_tx, conn_rx) = watch::channel(cm);
        let (inst_tx, inst_rx) = watch::channel(Instance {
            id,
            registered: false,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let repair_wake = router.repair_wake();
        let inner = Arc::new(Inner {
            keys,
            outbox,
            config,
            settings,
            scripts: Scripts::load(),
            conn: conn_rx,
            instance: inst_rx,
            router,
            pushes,
            retries: Mutex::new(Vec::new()),
            last_tick,
            origin,
            alive_until: AtomicU64::new(0),
            stop: stop_tx,
            tasks: tokio::sync::Mutex::new(Vec::new()),
            paused: AtomicBool::new(false),
            reaper_paused: AtomicBool::new(false),
            stall_send: AtomicU64::new(0),
            failover_at: AtomicU64::new(0),
            reconnect: tokio::sync::Notify::new(),
        });
        let mut live = liveness::Liveness::new(inner.clone(), conn_tx, inst_tx, gen);
        // A first attempt inline, so a healthy start is ready at once; failures are retried.
        live.try_register().await;
        let live_task = tokio::spawn(live.run(stop_rx.clone()));
        let refresh_task = tokio::spawn(refresh::refresher(inner.clone(), stop_rx.clone()));
        let reap_task = tokio::spawn(reaper::run(inner.clone(), stop_rx.clone()));
        let repair_task = tokio::spawn(repair::run(inner.clone(), repair_wake, stop_rx.clone()));
        let publish_task = tokio::spawn(outbox::publisher(inner.clone(), stop_rx));
        inner.tasks.lock().await.extend([
            live_task,
            reap_task,
            refresh_task,
            repair_task,
            publish_task,
        ]);
        Ok(RedisEngine { inner })
    }

    /// This process's current instance id (changes when the instance is fenced).
    pub fn instance_id(&self) -> String {
        self.inner.instance.borrow().id.clone()
    }

    /// Test hook: stops every background task without deregistering, as if the process had
    /// been killed (its heartbeat stops, its sockets close, other instances must reap it).
    #[doc(hidden)]
    pub async fn simulate_crash(&self) {
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().await);
        for t in tasks {
            t.abort();
        }
        self.inner
            .router
            .close_all(crate::peers::CloseReason::GoingAway);
    }

    /// Test hook: the next relay to another instance stalls for `d` right after its first
    /// liveness check, as if the process froze there.
    #[doc(hidden)]
    pub fn stall_next_send(&self, d: Duration) {
        let ms = d.as_millis() as u64;
        self.inner.stall_send.store(ms, Ordering::Release);
    }

    /// Test hook: this instance claims and reaps no dead instance (others still do).
    #[doc(hidden)]
    pub fn pause_reaper(&self, paused: bool) {
        self.inner.reaper_paused.store(paused, Ordering::Release);
    }

    /// Test hook: stops (or resumes) heartbeats and registration, as if this instance alone
    /// were cut off from Redis; after `instance_timeout` it fences itself.
    #[doc(hidden)]
    pub fn pause_heartbeat(&self, paused: bool) {
        self.inner.paused.store(paused, Ordering::Release);
    }
}

impl Inner {
    fn cm(&self) -> Conn {
        self.conn.borrow().clone()
    }

    fn current(&self) -> Instance {
        self.instance.borrow().clone()
    }

    /// Whether this instance can be sure it has not been written off: its last successful
    /// heartbeat was *sent* less than `instance_timeout` ago (local monotonic clock; the
    /// heartbeat reached Redis after it was sent, so others cannot have reaped us earlier).
    /// Past that, other instances may have reaped its peers, so it must not act for them
    /// (join, relay) even before the liveness task gets to fence it, e.g. right after a
    /// SIGSTOP/SIGCONT, when every task resumes at once.
    pub(crate) fn alive_locally(&self) -> bool {
        (self.origin.elapsed().as_millis() as u64) < self.alive_until.load(Ordering::Acquire)
    }

    /// Records a successful heartbeat (or registration) sent at `sent`.
    pub(crate) fn mark_alive(&self, sent: Instant) {
        let base = sent.saturating_duration_since(self.origin);
        let until = (base + self.settings.instance_timeout).as_millis() as u64;
        self.alive_until.fetch_max(until, Ordering::AcqRel);
        // A write went through: whatever refused writes before it was sent is past.
        let sent_ms = base.as_millis() as u64;
        let _ = self
            .failover_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |at| {
                (at != 0 && at <= sent_ms).then_some(0)
            });
    }

    /// Forgets the liveness deadline (fencing: nothing may act under the old id any more).
    pub(crate) fn mark_dead(&self) {
        self.alive_until.store(0, Ordering::Release);
    }

    /// Bounds one Redis call by `call_timeout`, and records its latency and failure under
    /// `what` (the command, script or pipeline: a fixed name).
    async fn redis<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> EngineResult<T> {
        let start = Instant::now();
        let (result, error) = match tokio::time::timeout(self.config.call_timeout, fut).await {
            Ok(Ok(v)) => (Ok(v), None),
            Ok(Err(e)) => {
                let err = self.store_error(&e);
                let kind = err.kind();
                (Err(err), Some(kind))
            }
            Err(_) => (Err(unavailable("Redis call timed out")), Some("timeout")),
        };
        crate::metrics::redis_call(what, start.elapsed(), error);
        result
    }

    /// One command, recorded under its name.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> EngineResult<T> {
        let mut cm = self.cm();
        self.redis(command_name(cmd), cmd.query_async(&mut cm))
            .await
    }

    /// Queues a leave whose Redis part failed, for the liveness task to retry.
    fn retry_leave(&self, peer: &str, m: Membership) {
        let mut retries = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the sockets this instance had: one entry per peer.
        if m.owner == self.router.id() && !retries.iter().any(|(p, _)| p == peer) {
            retries.push((peer.to_owned(), m));
        }
    }

    fn take_retries(&self) -> Vec<(String, Membership)> {
        std::mem::take(&mut *self.retries.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn ttl_ms(d: Duration) -> u64 {
        (d.as_millis() as u64).max(1)
    }
}

/// A command's name as a fixed label (the commands this engine sends).
fn command_name(cmd: &redis::Cmd) -> &'static str {
    let Some(redis::Arg::Simple(name)) = cmd.args_iter().next() else {
        return "other";
    };
    const KNOWN: &[&str] = &[
        "PUBLISH",
        "SPUBLISH",
        "GET",
        "HGET",
        "HEXISTS",
        "HMGET",
        "EXISTS",
        "DEL",
        "SADD",
        "SREM",
        "ZREM",
        "SMEMBERS",
        "SRANDMEMBER",
    ];
    KNOWN
        .iter()
        .find(|k| k.as_bytes().eq_ignore_ascii_case(name))
        .copied()
        .unwrap_or("other")
}

impl Engine for RedisEngine {
    fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    fn liveness_ages(&self) -> (Option<Duration>, Option<Duration>) {
        let i = &self.inner;
        let now = i.origin.elapsed().as_millis() as u64;
        let age = |ms: u64| Duration::from_millis(now.saturating_sub(ms));
        let tick = i.last_tick.load(Ordering::Acquire);
        let until = i.alive_until.load(Ordering::Acquire);
        let timeout = i.settings.instance_timeout.as_millis() as u64;
        (
            (tick != 0).then(|| age(tick)),
            (until != 0).then(|| age(until.saturating_sub(timeout))),
        )
    }

    async fn register(&self, session: SessionRecord, host_token: &str) -> EngineResult<bool> {
        self.inner.register(session, host_token).await
    }

    async fn resolve(&self, id: &str) -> EngineResult<Option<Access>> {
        self.inner.resolve(id).await
    }

    async fn mint_token(&self, session: &str, grant: Grant) -> EngineResult<Option<String>> {
        self.inner.mint_token(session, grant).await
    }

    async fn take_relay_token(&self, token: &str) -> EngineResult<Option<SessionRecord>> {
        self.inner.take_relay_token(token).await
    }

    async fn relay_arrive(
        &self,
        room: &str,
        side: crate::relay::Side,
        me: &crate::relay::Endpoint,
        limits: crate::relay::Limits,
    ) -> EngineResult<crate::relay::Arrival> {
        self.inner.relay_arrive(room, side, me, limits).await
    }

    async fn relay_forget(&self, room: &str, me: &crate::relay::Endpoint) -> EngineResult<()> {
        self.inner.relay_forget(room, me).await
    }

    async fn relay_mark(&self, room: &str) -> EngineResult<crate::relay::Mark> {
        self.inner.relay_mark(room).await
    }

    async fn relay_unmark(&self, room: &str, mark: crate::relay::Mark) -> EngineResult<()> {
        self.inner.relay_unmark(room, mark).await
    }

    async fn relay_post(
        &self,
        to: &crate::relay::Endpoint,
        piece: crate::relay::Piece,
    ) -> EngineResult<bool> {
        self.inner.relay_post(to, piece).await
    }

    async fn bind_token(&self, token: &str, peer: &str) -> EngineResult<()> {
        self.inner.bind_token(token, peer).await
    }

    async fn check_code(
        &self,
        session: &str,
        client: &str,
        digest: &str,
    ) -> EngineResult<CodeCheck> {
        self.inner.check_code(session, client, digest).await
    }

    async fn rate(&self, key: &str, max: u32, window: Duration) -> EngineResult<Option<Duration>> {
        self.inner.rate(key, max, window).await
    }

    async fn push_offer(&self, room: &str, to: &str, payload: String) -> EngineResult<()> {
        self.inner.push_offer(room, to, payload).await
    }

    async fn pop_offer(&self, room: &str, to: &str) -> EngineResult<Option<String>> {
        self.inner.pop_offer(room, to).await
    }

    async fn put_answer(
        &self,
        room: &str,
        from: &str,
        to: &str,
        handshake: &str,
        payload: String,
    ) -> EngineResult<bool> {
        self.inner
            .put_answer(room, from, to, handshake, payload)
            .await
    }

    async fn take_answer(
        &self,
        room: &str,
        to: &str,
        handshake: &str,
    ) -> EngineResult<Option<String>> {
        self.inner.take_answer(room, to, handshake).await
    }

    fn router(&self) -> &Router {
        &self.inner.router
    }

    async fn disconnect(&self, peer: &str) {
        // A socket that goes without leaving must not stay a member.
        if let Some(m) = self.inner.router.disconnect(peer) {
            let _ = self.inner.leave_member(peer, m).await;
        }
    }

    async fn join(
        &self,
        room: &str,
        peer: NewPeer,
        max_peers: usize,
        entry: Entry<'_>,
    ) -> EngineResult<JoinResult> {
        self.inner.join(room, peer, max_peers, entry).await
    }

    async fn leave(&self, room: &str, peer: &str) -> EngineResult<()> {
        self.inner.leave(room, peer).await
    }

    async fn is_member(&self, room: &str, peer: &str) -> EngineResult<bool> {
        let i = &self.inner;
        let cmd = redis::cmd("HEXISTS")
            .arg(i.keys.members(room))
            .arg(peer)
            .clone();
        i.query::<bool>(&cmd).await
    }

    async fn server_peer(&self, room: &str) -> EngineResult<Option<String>> {
        let i = &self.inner;
        let cmd = redis::cmd("GET").arg(i.keys.server(room)).clone();
        i.query(&cmd).await
    }

    async fn send(&self, room: &str, from: &str, to: &str, frame: Frame) -> EngineResult<Delivery> {
        self.inner.send(room, from, to, frame).await
    }

    fn release(&self, held: Vec<crate::peers::Held>) {
        if !held.is_empty() {
            self.inner.pushes.release(held);
        }
    }

    async fn ready(&self) -> EngineResult<()> {
        self.inner.ready().await
    }

    async fn admin_session(&self, id: &str) -> EngineResult<Option<SessionView>> {
        self.inner.admin_session(id).await
    }

    async fn admin_close(&self, id: &str) -> EngineResult<CloseOutcome> {
        self.inner.admin_close(id).await
    }

    async fn admin_instances(&self) -> EngineResult<Vec<InstanceView>> {
        self.inner.admin_instances().await
    }

    async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().await);
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(self.inner.config.call_timeout * 2, t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.inner
            .router
            .close_all(crate::peers::CloseReason::GoingAway);
        liveness::deregister(&self.inner).await;
    }
}
