//! Many joined peers: what an idle one costs the server in memory (`idle`), and how long a join
//! takes with many already in (`joins`). Peers join rooms of `--group` (the first one on the
//! host's instance, the others on the joiner's), at most `--concurrency` joins at once.

use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::net::{Room, Target, Ws};
use crate::sys::{quantile, rss_kib_sum};
use crate::{emit, Args};

struct Crowd {
    target: Target,
    peers: usize,
    group: usize,
    concurrency: usize,
}

impl Crowd {
    fn from_args(a: &Args, peers: usize) -> Crowd {
        Crowd {
            target: Target::from_args(a),
            peers: a.get("peers", peers),
            group: a.get("group", 10usize).max(1),
            concurrency: a.get("concurrency", 50usize).max(1),
        }
    }

    async fn rooms(&self) -> Vec<Room> {
        futures::stream::iter(0..self.peers.div_ceil(self.group))
            .map(|_| self.target.room())
            .buffered(self.concurrency)
            .collect()
            .await
    }

    /// Every peer joined, with the time each join took (connect start to join_success /
    /// IdAssigned).
    async fn join_all(&self, rooms: &[Room]) -> Vec<(Ws, Duration)> {
        futures::stream::iter(0..self.peers)
            .map(|i| async move {
                let base = if i % self.group == 0 {
                    &self.target.host
                } else {
                    &self.target.joiner
                };
                let start = Instant::now();
                let (ws, _) = self.target.join(base, &rooms[i / self.group], true).await;
                (ws, start.elapsed())
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await
    }
}

/// Server RSS before and after `--peers` sockets joined and went idle, per peer.
pub async fn idle(a: &Args) {
    let label = a.str("label");
    let crowd = Crowd::from_args(a, 10_000);
    let pids = a.pids("pids");
    let settle = Duration::from_millis(a.get("settle-ms", 2000u64));
    let before = rss_kib_sum(&pids);
    let rooms = crowd.rooms().await;
    let joined = crowd.join_all(&rooms).await;
    tokio::time::sleep(settle).await;
    let after = rss_kib_sum(&pids);
    let per_peer = after.saturating_sub(before) as f64 / joined.len().max(1) as f64;
    emit(&label, "idle_kib", (per_peer * 100.0).round() / 100.0);
    eprintln!(
        "  {label} idle: {} peers in {} rooms: RSS {before} -> {after} KiB = {per_peer:.2} KiB per peer",
        joined.len(),
        rooms.len()
    );
}

/// Join latency of `--peers` peers (default 2000) joining while the earlier ones stay.
pub async fn joins(a: &Args) {
    let label = a.str("label");
    // `--prefix join_one` with `--concurrency 1`: what one join costs when it waits on nothing.
    let key: String = a.get("prefix", "join".to_owned());
    let crowd = Crowd::from_args(a, 2000);
    let rooms = crowd.rooms().await;
    let start = Instant::now();
    let joined = crowd.join_all(&rooms).await;
    let wall = start.elapsed();
    let mut us: Vec<u64> = joined.iter().map(|(_, d)| d.as_micros() as u64).collect();
    us.sort_unstable();
    let ms = |p: f64| quantile(&us, p) as f64 / 1000.0;
    emit(&label, &format!("{key}_p50_ms"), ms(0.50));
    emit(&label, &format!("{key}_p99_ms"), ms(0.99));
    emit(&label, &format!("{key}_max_ms"), ms(1.0));
    eprintln!(
        "  {label} {key}: {} in {:.2} s, {} at once: p50 {:.2} p99 {:.2} max {:.2} ms",
        us.len(),
        wall.as_secs_f64(),
        crowd.concurrency,
        ms(0.5),
        ms(0.99),
        ms(1.0)
    );
}
