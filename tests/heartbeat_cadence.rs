//! Issue 8, item 6: an instance heartbeats once per `--heartbeat-interval`, not every other
//! tick. The "is a beat due" check used to compare against the same interval as the tick that
//! drives it, so a tick that woke a millisecond early skipped its beat, halving the slack
//! before `--instance-timeout` writes the instance off.
//!
//! Measured from Redis itself: the instance's score in `{instances}:alive` is the Redis time
//! (ms) of its latest heartbeat, so polling it much faster than the interval sees every beat.

mod common;

use std::time::{Duration, Instant};

use common::{bounded, RedisServer, ServerBuilder};

const INTERVAL: Duration = Duration::from_millis(200);
const WINDOW: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_come_once_per_interval() {
    bounded(async {
        let redis = RedisServer::start();
        let _server = ServerBuilder::new()
            .redis_url(&redis.url())
            .args(["--heartbeat-interval", "200ms"])
            .start()
            .await;
        let mut c = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        // Distinct scores seen, in order: one per heartbeat (or the registration).
        let mut beats: Vec<u64> = Vec::new();
        let start = Instant::now();
        while start.elapsed() < WINDOW {
            let alive: Vec<(String, u64)> = redis::cmd("ZRANGE")
                .arg("beach-road:{instances}:alive")
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut c)
                .await
                .unwrap();
            assert!(alive.len() <= 1, "one instance only: {alive:?}");
            if let Some((_, score)) = alive.first() {
                if beats.last() != Some(score) {
                    beats.push(*score);
                }
            }
            tokio::time::sleep(POLL).await;
        }
        assert!(beats.len() >= 3, "too few heartbeats seen: {beats:?}");
        let gaps: Vec<u64> = beats.windows(2).map(|w| w[1] - w[0]).collect();
        let span = beats[beats.len() - 1] - beats[0];
        let per_interval = gaps.len() as f64 * INTERVAL.as_millis() as f64 / span as f64;
        eprintln!(
            "{} gaps between beats in {span} ms: {per_interval:.2} per interval; gaps (ms) {gaps:?}",
            gaps.len()
        );
        assert!(
            (0.9..=1.3).contains(&per_interval),
            "{per_interval:.2} heartbeats per interval (want ≈ 1); gaps (ms) {gaps:?}"
        );
        // A skipped beat shows as a double gap; a loaded machine may delay a tick now and then.
        let long = INTERVAL.as_millis() as u64 * 7 / 4;
        let skipped = gaps.iter().filter(|g| **g >= long).count();
        assert!(
            skipped * 10 <= gaps.len(),
            "{skipped} of {} heartbeats came a whole interval late: {gaps:?}",
            gaps.len()
        );
    })
    .await
}
