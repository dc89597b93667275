//! The repair task: after a gap in this instance's subscription the router marks its rooms
//! (those with local members) and wakes this task, which re-reads each one's membership and
//! hands the read back; the router tells each local member the `peer_joined`/`peer_left` it
//! missed (see `router/view.rs`). The router never waits on Redis; this task does, every call
//! bounded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{watch, Notify};

use super::bus::parse_members;
use super::Inner;
use crate::engine::EngineResult;
use crate::router::Member;

/// Rooms read at once: each read is two commands on the shared connection.
const CONCURRENCY: usize = 16;
/// A read that failed (Redis away again) is retried after this.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub(crate) async fn run(inner: Arc<Inner>, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let mut failed: Vec<(String, u64)> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RETRY_AFTER), if !failed.is_empty() => {}
        }
        let mut rooms = inner.router.take_repairs();
        if !rooms.is_empty() {
            crate::metrics::pubsub_gap();
        }
        for f in failed.drain(..) {
            if !rooms.iter().any(|(room, _)| *room == f.0) {
                rooms.push(f);
            }
        }
        let reads = futures::stream::iter(rooms)
            .map(|(room, epoch)| {
                let inner = &inner;
                async move {
                    let read = read(inner, &room).await;
                    (room, epoch, read)
                }
            })
            .buffer_unordered(CONCURRENCY);
        tokio::pin!(reads);
        loop {
            let next = tokio::select! {
                _ = stop.changed() => return,
                next = reads.next() => next,
            };
            let Some((room, epoch, read)) = next else {
                break;
            };
            match read {
                Ok((counter, members)) => inner.router.repair(&room, epoch, counter, &members),
                Err(e) => {
                    tracing::debug!(session = %room, error = %e, "room repair read failed");
                    failed.push((room, epoch));
                }
            }
        }
    }
}

/// The room's join counter, then its members. Read in this order, every member that joined up
/// to the counter is in the member list unless it has left (one joined in between is listed
/// too, which only makes the repair keep it).
async fn read(inner: &Inner, room: &str) -> EngineResult<(Option<u64>, Vec<Member>)> {
    let mut pipe = redis::pipe();
    pipe.cmd("GET")
        .arg(inner.keys.seq(room))
        .cmd("HGETALL")
        .arg(inner.keys.members(room));
    let mut cm = inner.cm();
    let (counter, records): (Option<u64>, HashMap<String, String>) = inner
        .redis("repair_read", pipe.query_async(&mut cm))
        .await?;
    let flat: Vec<String> = records.into_iter().flat_map(|(k, v)| [k, v]).collect();
    let members = parse_members(&flat);
    // Without the counter (cannot happen while the room has members), the last listed join
    // is a lower bound of it.
    let counter = counter.or_else(|| members.last().map(|m| m.seq));
    Ok((counter, members))
}
