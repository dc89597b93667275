//! Reaping: every heartbeat interval, write off silent instances and remove the peers of a
//! dead one under a renewable lease (a reaper that dies mid-way loses the lease and another one
//! resumes where it stopped).
//!
//! A dead instance may have owned tens of thousands of peers, and its rooms' survivors wait for
//! each `peer_left`. So a claim is worked off batch after batch without waiting for the next
//! tick, and each batch costs a fixed number of round trips whatever its size: one
//! `SRANDMEMBER`, one pipeline of leave scripts (each a short script in its own room's slot,
//! so Redis serves other clients between them, and each stays single-slot for Redis Cluster),
//! the router's local deliveries, and one pipeline of the PUBLISHes to the survivors' instances
//! plus the `SREM` of the batch. Measured: `tests/reaping.rs`, `docs/architecture.md`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::RedisResult;
use tokio::sync::watch;

use super::bus::{parse_members, publish_one};
use super::Inner;
use crate::engine::{EngineError, EngineResult};
use crate::router::{Known, Member};

/// Peers per batch. Each leave script returns its room's remaining members, so a batch's reply
/// is about this many member lists (realistic rooms: a few KiB each).
const REAP_BATCH: usize = 256;

/// How long a reaper's claim on a dead instance holds without renewal.
fn lease(inner: &Inner) -> Duration {
    (inner.settings.instance_timeout * 2).max(inner.config.call_timeout * 4)
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

/// The reaper task (owned by the engine, ends with `stop`).
pub(crate) async fn run(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(inner.settings.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut claimed: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        let me = inner.current();
        if !me.registered
            || inner.paused.load(Ordering::Acquire)
            || inner.reaper_paused.load(Ordering::Acquire)
        {
            continue;
        }
        if claimed.is_none() {
            claimed = claim(&inner, &me.id).await;
        }
        if let Some(dead) = claimed.take() {
            if !reap(&inner, &me.id, &dead, &stop).await {
                claimed = Some(dead);
            }
        }
    }
}

async fn claim(inner: &Inner, me: &str) -> Option<String> {
    let mut cm = inner.cm();
    let mut inv = inner.scripts.reap_claim.prepare_invoke();
    inv.key(inner.keys.alive())
        .key(inner.keys.dead())
        .key(inner.keys.reaper())
        .arg(me)
        .arg(ms(inner.settings.instance_timeout))
        .arg(ms(lease(inner)));
    let v: Vec<String> = inner
        .redis("reap_claim", inv.invoke_async(&mut cm))
        .await
        .ok()?;
    let dead = v.into_iter().next()?;
    tracing::warn!(dead = %dead, "reaping the peers of a dead instance");
    Some(dead)
}

/// Works on one claimed dead instance, batch after batch. Returns true when the claim is
/// finished (all peers gone, or the lease lost), false to continue next tick (a failure, or
/// the engine stopping).
async fn reap(inner: &Inner, me: &str, dead: &str, stop: &watch::Receiver<bool>) -> bool {
    let mut reaped = 0;
    loop {
        if *stop.borrow() {
            return false;
        }
        match batch(inner, dead).await {
            Ok(0) => {
                let _ = lease_op(inner, me, dead, "done").await;
                tracing::info!(dead = %dead, reaped, "dead instance fully reaped");
                crate::metrics::reaped_instance();
                return true;
            }
            Ok(n) => {
                reaped += n;
                crate::metrics::reaped(n as u64);
            }
            Err(e) => {
                tracing::warn!(dead = %dead, error = %e, "reaping paused until the next tick");
                return false;
            }
        }
        match lease_op(inner, me, dead, "renew").await {
            Some(true) => {}
            Some(false) => return true,
            None => return false,
        }
    }
}

/// Reaps up to `REAP_BATCH` peers of `dead`; returns how many entries were done (0: none left).
async fn batch(inner: &Inner, dead: &str) -> EngineResult<usize> {
    let k = &inner.keys;
    let set = k.instance_peers(dead);
    let cmd = redis::cmd("SRANDMEMBER").arg(&set).arg(REAP_BATCH).clone();
    let entries: Vec<String> = inner.query(&cmd).await?;
    if entries.is_empty() {
        return Ok(0);
    }
    let parsed: Vec<(&str, &str)> = entries.iter().filter_map(|e| e.split_once('|')).collect();
    // The leave of `Inner::leave_in_redis`, with the dead owner. A room this empties restarts
    // its session's countdown in the script; its tokens are not refreshed here (one more round
    // trip per room): they were by the last refresh round, so they expire at most one refresh
    // period before their session, as after a crash.
    let mut leaves = redis::pipe();
    leaves
        .ignore_errors()
        .load_script(&inner.scripts.leave)
        .ignore();
    for (room, peer) in &parsed {
        leaves.invoke_script(&inner.leave_invocation(room, peer, dead));
    }
    let mut cm = inner.cm();
    let results: Vec<RedisResult<Vec<String>>> = inner
        .redis("reap_leaves", leaves.query_async(&mut cm))
        .await?;

    // Survivors here are told by the router; the others' instances get one message each.
    let mut done: Vec<String> = entries
        .iter()
        .filter(|e| !e.contains('|'))
        .cloned()
        .collect();
    let mut failed = None;
    let mut fanouts = Vec::new();
    for ((room, peer), result) in parsed.iter().zip(results) {
        let flat = match result {
            Ok(flat) => flat,
            Err(e) => {
                failed = Some(inner.store_error(&e));
                continue;
            }
        };
        done.push(format!("{room}|{peer}"));
        if flat.first().map(String::as_str) != Some("1") {
            continue;
        }
        // Members of the dead instance itself are being reaped: nobody would read theirs.
        let survivors: Vec<Known> = parse_members(&flat[1..])
            .iter()
            .filter(|m| m.owner != dead)
            .map(Member::to_known)
            .collect();
        if !survivors.is_empty() {
            let (frame, groups) = inner.tell_left(room, peer, survivors);
            fanouts.extend(inner.room_event(room, groups, &frame, None, Some(peer)));
        }
    }
    if done.is_empty() {
        return Err(failed.unwrap_or_else(|| EngineError::Busy("empty reap batch".into())));
    }
    let mut publishes = redis::pipe();
    for (owner, payload) in fanouts {
        publish_one(&mut publishes, &inner.keys, &owner, &payload).ignore();
    }
    publishes.cmd("SREM").arg(&set).arg(&done);
    let mut cm = inner.cm();
    let _: Vec<i64> = inner
        .redis("reap_publish", publishes.query_async(&mut cm))
        .await?;
    Ok(done.len())
}

async fn lease_op(inner: &Inner, me: &str, dead: &str, op: &str) -> Option<bool> {
    let mut cm = inner.cm();
    let mut inv = inner.scripts.reap_lease.prepare_invoke();
    inv.key(inner.keys.dead())
        .key(inner.keys.reaper())
        .arg(dead)
        .arg(me)
        .arg(ms(lease(inner)))
        .arg(op);
    inner
        .redis("reap_lease", inv.invoke_async::<i64>(&mut cm))
        .await
        .ok()
        .map(|v| v == 1)
}
