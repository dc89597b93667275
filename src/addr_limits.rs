//! Per-address limits, so one host cannot take the slots everyone else needs: a cap on
//! concurrent things per address (TCP connections in the listener, WebSockets in `ws::upgrade`)
//! and a token bucket on WebSocket upgrades.
//!
//! Memory stays bounded whatever addresses show up: a count's entry goes when its count returns
//! to zero, and a bucket goes once it has refilled (a full bucket is what a new address gets
//! anyway). Both maps sit behind std mutexes taken only in short sync methods.
//!
//! Hand-written rather than `governor`: the bucket shares its key and its pruning with the socket
//! count, and a 30-line bucket beats six more crates (governor, dashmap, quanta, ...) here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::response::{IntoResponse, Response};
use serde_json::json;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// At most `max` concurrent holders of a [`Slot`] per address.
#[derive(Clone)]
pub struct Counter {
    max: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One counted thing of one address; gives its place back when dropped.
#[derive(Debug)]
pub struct Slot {
    ip: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Counter {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            counts: Arc::default(),
        }
    }

    /// A slot for `ip`, or `None` when it already holds `max`.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<Slot> {
        let mut counts = lock(&self.counts);
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            ip,
            counts: self.counts.clone(),
        })
    }

    /// Addresses holding at least one slot.
    pub fn addresses(&self) -> usize {
        lock(&self.counts).len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Map size below which buckets are never pruned.
const MIN_PRUNE: usize = 1024;

/// A token bucket per address: `burst` tokens, refilled at `refill` per second (`burst` for
/// [`Rate::per_second`]).
pub struct Rate {
    burst: f64,
    refill: f64,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    map: HashMap<IpAddr, Bucket>,
    /// Prune when the map reaches this size; then set to twice what is left (amortized O(1)).
    prune_at: usize,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Rate {
    pub fn per_second(burst: u32) -> Self {
        Self::new(burst, f64::from(burst.max(1)))
    }

    /// `burst` tokens per address, refilled at `refill` tokens per second (at least one a day).
    pub fn new(burst: u32, refill: f64) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            refill: refill.max(1.0 / 86_400.0),
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                prune_at: MIN_PRUNE,
            }),
        }
    }

    fn refilled(&self, b: &Bucket, now: Instant) -> f64 {
        let earned = now.saturating_duration_since(b.at).as_secs_f64() * self.refill;
        (b.tokens + earned).min(self.burst)
    }

    /// Whether `ip` has a token, without taking it; `Err(wait)` until the next one.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let buckets = lock(&self.buckets);
        let tokens = buckets
            .map
            .get(&ip)
            .map_or(self.burst, |b| self.refilled(b, now));
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / self.refill))
        }
    }

    /// Takes a token for `ip`; `Err(wait)` until the next one when there is none.
    pub fn take(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut buckets = lock(&self.buckets);
        if buckets.map.len() >= buckets.prune_at {
            buckets
                .map
                .retain(|_, b| self.refilled(b, now) < self.burst);
            buckets.prune_at = (buckets.map.len() * 2).max(MIN_PRUNE);
        }
        let bucket = buckets.map.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = self.refilled(bucket, now);
        bucket.at = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            Ok(())
        } else {
            bucket.tokens = tokens;
            Err(Duration::from_secs_f64((1.0 - tokens) / self.refill))
        }
    }

    /// Addresses with a bucket that has not refilled yet (or not been pruned yet).
    pub fn addresses(&self) -> usize {
        lock(&self.buckets).map.len()
    }
}

/// The WebSocket limits of `ws::upgrade`: upgrades per second and open sockets per client.
pub struct SocketLimits {
    sockets: Counter,
    upgrades: Rate,
}

/// An upgrade refused by [`SocketLimits`]: 429 with `Retry-After` and a JSON error.
#[derive(Debug)]
pub struct Refused {
    why: &'static str,
    /// The `beach_road_refusals_total` reason.
    metric: &'static str,
    retry_after: Duration,
}

impl SocketLimits {
    pub fn new(max_sockets: usize, upgrades_per_second: u32) -> Self {
        Self {
            sockets: Counter::new(max_sockets),
            upgrades: Rate::per_second(upgrades_per_second),
        }
    }

    /// Admits one more upgrade from `ip`: the returned slot must live as long as the socket.
    pub fn admit(&self, ip: IpAddr) -> Result<Slot, Refused> {
        self.upgrades
            .take(ip, Instant::now())
            .map_err(|wait| Refused {
                why: "too many WebSocket upgrades from this address",
                metric: "upgrade_rate",
                retry_after: wait,
            })?;
        self.sockets.try_acquire(ip).ok_or(Refused {
            why: "too many WebSockets from this address",
            metric: "sockets_per_address",
            // A socket's end cannot be predicted; a second is a polite pace for a retry.
            retry_after: Duration::from_secs(1),
        })
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        crate::metrics::refused(self.metric);
        crate::http::too_many(self.retry_after, json!({ "error": self.why }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{header, StatusCode};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn counter_caps_per_address_and_forgets_at_zero() {
        let c = Counter::new(2);
        let a1 = c.try_acquire(ip("1.1.1.1")).unwrap();
        let a2 = c.try_acquire(ip("1.1.1.1")).unwrap();
        assert!(c.try_acquire(ip("1.1.1.1")).is_none());
        let b = c.try_acquire(ip("2.2.2.2")).unwrap();
        drop(a1);
        let a3 = c.try_acquire(ip("1.1.1.1")).unwrap();
        drop((a2, a3, b));
        assert_eq!(c.addresses(), 0);
    }

    #[test]
    fn bucket_bursts_then_refills() {
        let r = Rate::per_second(4);
        let t0 = Instant::now();
        for _ in 0..4 {
            r.take(ip("1.1.1.1"), t0).unwrap();
        }
        let wait = r.take(ip("1.1.1.1"), t0).unwrap_err();
        assert!(wait <= Duration::from_millis(250), "{wait:?}");
        r.take(ip("2.2.2.2"), t0).unwrap();
        r.take(ip("1.1.1.1"), t0 + Duration::from_millis(260))
            .unwrap();
    }

    #[test]
    fn a_slow_bucket_can_be_checked_without_taking() {
        let r = Rate::new(2, 0.5);
        let t0 = Instant::now();
        assert!(r.check(ip("1.1.1.1"), t0).is_ok());
        r.take(ip("1.1.1.1"), t0).unwrap();
        r.take(ip("1.1.1.1"), t0).unwrap();
        let wait = r.check(ip("1.1.1.1"), t0).unwrap_err();
        assert!(wait > Duration::from_millis(1900), "{wait:?}");
        assert!(r.check(ip("1.1.1.1"), t0).is_err(), "a check takes nothing");
        assert!(r.check(ip("2.2.2.2"), t0).is_ok());
        assert!(r.check(ip("1.1.1.1"), t0 + Duration::from_secs(2)).is_ok());
    }

    #[test]
    fn refilled_buckets_are_pruned() {
        let r = Rate::per_second(10);
        let t0 = Instant::now();
        for i in 0..MIN_PRUNE as u32 {
            r.take(IpAddr::from(i.to_be_bytes()), t0).unwrap();
        }
        assert_eq!(r.addresses(), MIN_PRUNE);
        // A second later every bucket is full again: the next take prunes them all.
        r.take(ip("9.9.9.9"), t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(r.addresses(), 1);
    }

    #[test]
    fn sockets_and_rate_refuse_with_429() {
        let l = SocketLimits::new(1, 20);
        let slot = l.admit(ip("1.1.1.1")).unwrap();
        let refused = l.admit(ip("1.1.1.1")).unwrap_err();
        let resp = refused.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        drop(slot);
        l.admit(ip("1.1.1.1")).unwrap();
    }
}
