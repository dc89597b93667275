//! The connection to Redis: building a `ConnectionManager`, readiness, and the one place its
//! errors become [`EngineError`]s, noting signs of a failover.
//!
//! A failover moves the primary elsewhere (ElastiCache: the endpoint's DNS name follows the new
//! primary), but a connection to the old node may stay open: demoted to a replica, it answers
//! every write with `READONLY` (or `LOADING` while it resyncs, `MASTERDOWN` while its primary is
//! unreachable), and the manager, seeing no I/O error, never reconnects. Such an error marks the
//! engine not ready and wakes the liveness task, which replaces the manager by a fresh one (a new
//! connection, the endpoint resolved anew), at most once per [`FAILOVER_RECONNECT_EVERY`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, PushInfo, RedisError, RedisResult, ServerErrorKind};

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
/// Readiness's PING gets at most this long, so `/ready` answers fast.
const READY_PING_TIMEOUT: Duration = Duration::from_millis(500);

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

/// A lazily connecting manager whose pushes go to `pushes` tagged with `gen`, so a replaced
/// manager's late messages are ignored. The handler never blocks the connection: it only
/// delivers into bounded queues (see `super::pushes`).
pub(crate) fn build_manager(
    url: &str,
    timeout: Duration,
    pushes: Arc<Pushes>,
    gen: u64,
) -> RedisResult<ConnectionManager> {
    let client = redis::Client::open(resp3_url(url))?;
    let sender = move |info: PushInfo| -> Result<(), std::convert::Infallible> {
        pushes.handle(gen, info);
        Ok(())
    };
    let cfg = ConnectionManagerConfig::new()
        .set_push_sender(sender)
        .set_automatic_resubscription()
        .set_number_of_retries(RECONNECT_RETRIES)
        .set_max_delay(MAX_RECONNECT_DELAY)
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    ConnectionManager::new_lazy_with_config(client, cfg)
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
        let limit = READY_PING_TIMEOUT.min(self.config.call_timeout);
        match tokio::time::timeout(limit, redis::cmd("PING").query_async::<String>(&mut cm)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.store_error(&e)),
            Err(_) => Err(unavailable("Redis PING timed out")),
        }
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
