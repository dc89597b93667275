//! A sender's budgets: messages and bytes per second, with bursts (GCRA, by governor).
//!
//! Both budgets read one clock: the instant the socket's latest frame arrived, which the
//! connection reads once per frame anyway (for its idle check). Each limiter on the system
//! clock read it again: two more clock reads per relayed frame, 3 % of a burst's CPU.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Nanoseconds from the budget's creation to the frame being paced.
#[derive(Clone, Default)]
struct Arrival(Arc<AtomicU64>);

impl Clock for Arrival {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.load(Ordering::Relaxed))
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, Arrival, NoOpMiddleware<Nanos>>;

pub(super) struct Budget {
    origin: Instant,
    arrival: Arrival,
    messages: Limiter,
    bytes: Limiter,
}

impl Budget {
    /// Full budgets as of `origin`.
    pub(super) fn new(config: &crate::config::Config, origin: Instant) -> Self {
        let quota = |per_second: u32, burst: u32| {
            let rate = NonZeroU32::new(per_second.max(1)).expect("non-zero");
            let burst = NonZeroU32::new(burst.max(1)).expect("non-zero");
            Quota::per_second(rate).allow_burst(burst)
        };
        let arrival = Arrival::default();
        let limiter = |quota| Limiter::direct_with_clock(quota, arrival.clone());
        Self {
            origin,
            messages: limiter(quota(
                config.peer_messages_per_second,
                config.peer_message_burst,
            )),
            bytes: limiter(quota(
                config.peer_bytes_per_second,
                config.peer_byte_burst.max(config.max_message_bytes as u32),
            )),
            arrival,
        }
    }

    /// Returns once a frame of `len` bytes that arrived at `now` fits both budgets: until then
    /// the socket is not read, so a flooder's own TCP connection backs up (and its own queue,
    /// if it also stops reading, gets it disconnected) while every other socket is served as
    /// usual. Real signaling (an ICE trickle is tens of messages) stays far inside the burst.
    pub(super) async fn pace(&self, mut now: Instant, len: usize) {
        let len = NonZeroU32::new(len.clamp(1, u32::MAX as usize) as u32).expect("non-zero");
        loop {
            let at = now.saturating_duration_since(self.origin).as_nanos();
            self.arrival
                .0
                .store(u64::try_from(at).unwrap_or(u64::MAX), Ordering::Relaxed);
            let at = self.arrival.now();
            let wait = match self.messages.check() {
                Ok(()) => match self.bytes.check_n(len) {
                    Ok(Ok(())) => return,
                    Ok(Err(not_until)) => not_until.wait_time_from(at),
                    // Larger than the burst (cannot happen: the burst covers the largest
                    // message); let it through rather than wait for ever.
                    Err(_) => return,
                },
                Err(not_until) => not_until.wait_time_from(at),
            };
            crate::metrics::paced();
            tokio::time::sleep(wait).await;
            now = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn budget(messages: u32, burst: u32, bytes: u32, byte_burst: u32) -> Budget {
        let mut config = crate::config::Config::defaults();
        config.peer_messages_per_second = messages;
        config.peer_message_burst = burst;
        config.peer_bytes_per_second = bytes;
        config.peer_byte_burst = byte_burst;
        config.max_message_bytes = 1;
        Budget::new(&config, Instant::now())
    }

    /// Paces `len` at `now`; true if it had to wait for the system clock.
    async fn waited(b: &Budget, now: Instant, len: usize) -> bool {
        let bounded = tokio::time::timeout(Duration::from_millis(30), b.pace(now, len));
        bounded.await.is_err()
    }

    #[tokio::test]
    async fn budgets_count_at_the_frames_arrival() {
        let b = budget(10, 3, 1_000_000, 1_000_000);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!waited(&b, t0, 1).await, "within the burst");
        }
        assert!(waited(&b, t0, 1).await, "the burst is spent at t0");
        // Arrived a second later (by its own clock read, not the budget's): room again.
        assert!(!waited(&b, t0 + Duration::from_secs(1), 1).await);
    }

    #[tokio::test]
    async fn bytes_have_their_own_budget() {
        let b = budget(1000, 1000, 100, 300);
        let t0 = Instant::now();
        assert!(!waited(&b, t0, 300).await);
        assert!(waited(&b, t0, 50).await, "300 bytes spent the byte burst");
        assert!(!waited(&b, t0 + Duration::from_secs(1), 50).await);
    }
}
