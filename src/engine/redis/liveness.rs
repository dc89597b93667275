//! Instance liveness: registration, heartbeats, the pub/sub self-check and fencing (reaping is
//! in [`super::reaper`]).
//!
//! Timeline (see `docs/architecture.md`): an instance heartbeats every `heartbeat_interval`; a
//! heartbeat older than `instance_timeout` lets any other instance write it off and reap its
//! peers. The written-off instance fences itself as soon as it notices (its heartbeat script
//! says it is gone, or it has not heartbeated successfully for `instance_timeout`): it closes
//! its sockets and registers under a fresh id, never re-announcing the stale peers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::bus::{encode, Bus, Pack};
use super::conn::{connect, Conn, FAILOVER_RECONNECT_EVERY};
use super::{Inner, Instance, RedisSettings};

/// How often the self-message is published: every heartbeat, at least once a second.
pub(crate) fn tick_interval(s: &RedisSettings) -> Duration {
    s.heartbeat_interval.min(Duration::from_secs(1))
}

/// Whether a heartbeat is due `since` the last one. The tick driving it jitters, so against
/// the full interval a tick that fires a little early skips its beat (beats came every 2 H at
/// H ≤ 1 s); half a tick of slack gives one beat per interval, never two.
fn beat_due(since: Duration, s: &RedisSettings) -> bool {
    since + tick_interval(s) / 2 >= s.heartbeat_interval
}

/// The self-message is stale (not ready, resubscribe) when older than this.
pub(crate) fn stale_after(s: &RedisSettings) -> Duration {
    (tick_interval(s) * 3).max(Duration::from_secs(1))
}

/// Owns the connection and identity senders: the only writer of both.
pub(crate) struct Liveness {
    inner: Arc<Inner>,
    conn: watch::Sender<Conn>,
    instance: watch::Sender<Instance>,
    gen: Arc<AtomicU64>,
    last_ok: Instant,
    last_beat: Option<Instant>,
    last_resubscribe: Option<Instant>,
    last_replace: Instant,
    last_failover_replace: Option<Instant>,
}

impl Liveness {
    pub(crate) fn new(
        inner: Arc<Inner>,
        conn: watch::Sender<Conn>,
        instance: watch::Sender<Instance>,
        gen: Arc<AtomicU64>,
    ) -> Self {
        Self {
            inner,
            conn,
            instance,
            gen,
            last_ok: Instant::now(),
            last_beat: None,
            last_resubscribe: None,
            last_replace: Instant::now(),
            last_failover_replace: None,
        }
    }

    fn paused(&self) -> bool {
        self.inner.paused.load(Ordering::Acquire)
    }

    /// Subscribes to this id's channels, then registers it as live. Retried every tick until
    /// it succeeds; peers can join only after it did.
    pub(crate) async fn try_register(&mut self) {
        if self.paused() {
            return;
        }
        let inner = &self.inner;
        let id = inner.current().id;
        if let Err(e) = inner.subscribe(&id).await {
            tracing::debug!(error = %e, "subscribe failed; will retry");
            return;
        }
        let mut cm = inner.cm();
        let mut inv = inner.scripts.instance_register.prepare_invoke();
        inv.key(inner.keys.alive()).key(inner.keys.dead()).arg(&id);
        let sent = Instant::now();
        match inner
            .redis("instance_register", inv.invoke_async::<u64>(&mut cm))
            .await
        {
            Ok(0) => {
                // Written off already: continue under a fresh id; the next tick registers it.
                let fresh = crate::protocol::new_id();
                tracing::warn!(old = %id, new = %fresh, "instance id written off; taking a fresh one");
                self.take_id(fresh);
                inner.unsubscribe(&id).await;
            }
            Ok(_) => {
                inner.mark_alive(sent);
                self.last_ok = Instant::now();
                self.last_beat = Some(self.last_ok);
                self.instance.send_modify(|i| {
                    if i.id == id {
                        i.registered = true;
                    }
                });
                tracing::info!(instance = %id, "instance registered");
                self.publish_tick().await;
            }
            Err(e) => tracing::debug!(error = %e, "instance registration failed; will retry"),
        }
    }

    async fn publish_tick(&self) {
        let inner = &self.inner;
        let id = inner.current().id;
        // On the bus channel, packed like what the outbox sends there: the tick proves the
        // path the messages take.
        let tick = encode(&Bus::Tick { id: id.clone() }, None);
        let cmd = redis::cmd(inner.keys.publish())
            .arg(inner.keys.bus(&id))
            .arg(Pack(vec![&tick]))
            .clone();
        let _ = inner.query::<i64>(&cmd).await;
    }

    pub(crate) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(tick_interval(&self.inner.settings));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let inner = self.inner.clone();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tick.tick() => self.step().await,
                // A failover sign: reconnect now, not at the next tick.
                _ = inner.reconnect.notified() => {}
                // Redis dropped our shard subscription (its slot moved): renew it now.
                _ = inner.pushes.unsubscribed.notified() => {
                    let _ = inner.subscribe(&inner.current().id).await;
                }
            }
            self.reconnect_after_failover().await;
        }
    }

    /// Redis refused a write as a replica (or loading): the connection may be to the old
    /// primary of a failover, which the manager never leaves by itself. Replaced at most every
    /// `FAILOVER_RECONNECT_EVERY` until a heartbeat succeeds again (`Inner::mark_alive`).
    async fn reconnect_after_failover(&mut self) {
        if self.inner.failover_at.load(Ordering::Acquire) == 0
            || self
                .last_failover_replace
                .is_some_and(|t| t.elapsed() < FAILOVER_RECONNECT_EVERY)
        {
            return;
        }
        self.last_failover_replace = Some(Instant::now());
        self.replace_connection("Redis refuses writes (failover)")
            .await;
    }

    /// Replaces the manager by a fresh one (a new connection, the endpoint resolved anew) and
    /// subscribes it; pushes of the old one are ignored from now on (their generation is old).
    async fn replace_connection(&mut self, why: &str) {
        let inner = self.inner.clone();
        let gen = self.gen.load(Ordering::Acquire) + 1;
        match connect(
            &inner.settings.url,
            inner.config.call_timeout,
            inner.pushes.clone(),
            gen,
        ) {
            Ok(cm) => {
                tracing::warn!(gen, why, "replacing the Redis connection");
                crate::metrics::connection_replaced();
                self.gen.store(gen, Ordering::Release);
                self.conn.send_replace(cm);
                let _ = inner.subscribe(&inner.current().id).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot build a Redis connection"),
        }
    }

    async fn step(&mut self) {
        let settings = self.inner.settings.clone();
        let inst = self.inner.current();
        if !inst.registered {
            self.try_register().await;
        } else {
            // Checked before anything else: after a freeze (SIGSTOP) we may be written off
            // already, and fencing must not wait for a Redis round trip.
            if !self.inner.alive_locally() {
                return self
                    .fence("no successful heartbeat within the instance timeout")
                    .await;
            }
            let due = self
                .last_beat
                .is_none_or(|t| beat_due(t.elapsed(), &settings));
            if due && !self.paused() {
                self.last_beat = Some(Instant::now());
                let mut cm = self.inner.cm();
                let mut inv = self.inner.scripts.heartbeat.prepare_invoke();
                inv.key(self.inner.keys.alive()).arg(&inst.id);
                let sent = Instant::now();
                match self
                    .inner
                    .redis("heartbeat", inv.invoke_async::<i64>(&mut cm))
                    .await
                {
                    Ok(1) => {
                        self.inner.mark_alive(sent);
                        self.last_ok = Instant::now();
                    }
                    Ok(_) => return self.fence("written off by another instance").await,
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
            if !self.inner.alive_locally() {
                return self
                    .fence("no successful heartbeat within the instance timeout")
                    .await;
            }
        }
        self.publish_tick().await;
        self.watchdog().await;
        self.retry_leaves().await;
    }

    /// Keeps the subscription honest: a stale self-message first resubscribes, and if that does
    /// not help while Redis answers commands, the manager is replaced by a fresh one.
    async fn watchdog(&mut self) {
        let inner = &self.inner;
        let stale = stale_after(&inner.settings);
        let last = inner.last_tick.load(Ordering::Acquire);
        let age =
            Duration::from_millis((inner.origin.elapsed().as_millis() as u64).saturating_sub(last));
        let never = last == 0;
        if !never && age <= stale {
            self.last_resubscribe = None;
            return;
        }
        let id = inner.current().id;
        if self.last_resubscribe.is_none_or(|t| t.elapsed() >= stale) {
            self.last_resubscribe = Some(Instant::now());
            let _ = inner.subscribe(&id).await;
            return;
        }
        // Still deaf after a resubscribe. Replace the manager only when Redis does answer (a
        // deaf or half-open connection), at most every 10 s: during an outage the manager
        // reconnects by itself and a replaced one would keep retrying in the background.
        if self.last_replace.elapsed() < Duration::from_secs(10) {
            return;
        }
        let pong = inner.query::<i64>(&inner.probe()).await.is_ok();
        let long_outage = self.last_ok.elapsed() > Duration::from_secs(30);
        if !(pong || long_outage) {
            return;
        }
        self.last_replace = Instant::now();
        self.replace_connection("pub/sub self-message missing")
            .await;
    }

    /// Continues under a fresh id: the router closes every socket and forgets every
    /// membership first (atomically), so nothing is recorded under the old id afterwards.
    fn take_id(&self, id: String) {
        self.inner.router.follow(&id);
        self.instance.send_replace(Instance {
            id,
            registered: false,
        });
        self.inner.last_tick.store(0, Ordering::Release);
    }

    async fn retry_leaves(&self) {
        for (peer, m) in self.inner.take_retries() {
            if self
                .inner
                .leave_in_redis(&m.room, &peer, &m.owner, true)
                .await
                .is_err()
            {
                self.inner.retry_leave(&peer, m);
            }
        }
    }

    /// This instance was written off (or must assume so): close every local socket, queue the
    /// old id for reaping, and continue under a fresh id. Stale peers are never re-announced.
    async fn fence(&mut self, why: &str) {
        let inner = self.inner.clone();
        let old = inner.current().id;
        let new_id = crate::protocol::new_id();
        // Nothing acts under the old id from now on (joins and relays check this).
        inner.mark_dead();
        // No join completes under the old id after this point.
        self.take_id(new_id.clone());
        tracing::warn!(old = %old, new = %new_id, why, "instance fenced");
        crate::metrics::fenced();
        // Best effort: hand the old id to the reapers now rather than after the timeout.
        let mut cm = inner.cm();
        let mut inv = inner.scripts.deregister.prepare_invoke();
        inv.key(inner.keys.alive())
            .key(inner.keys.dead())
            .arg(&old)
            .arg("1");
        let _ = inner
            .redis("deregister", inv.invoke_async::<i64>(&mut cm))
            .await;
        inner.unsubscribe(&old).await;
        self.last_resubscribe = None;
        self.try_register().await;
    }
}

/// Removes this instance from the live set at shutdown. Its peers have normally left during
/// the drain; any that remain are handed to the reapers instead.
pub(crate) async fn deregister(inner: &Inner) {
    let id = inner.current().id;
    let remaining = inner
        .query::<i64>(
            &redis::cmd("SCARD")
                .arg(inner.keys.instance_peers(&id))
                .clone(),
        )
        .await
        .unwrap_or(1);
    let mut cm = inner.cm();
    let mut inv = inner.scripts.deregister.prepare_invoke();
    inv.key(inner.keys.alive())
        .key(inner.keys.dead())
        .arg(&id)
        .arg(if remaining > 0 { "1" } else { "0" });
    if let Err(e) = inner
        .redis("deregister", inv.invoke_async::<i64>(&mut cm))
        .await
    {
        tracing::warn!(error = %e, "deregistration failed; other instances will reap this one");
    }
    inner.unsubscribe(&id).await;
}
