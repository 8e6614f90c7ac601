//! `ecpu_per_second`: one token bucket per cache on each gateway.
//!
//! The bucket holds up to one second of the limit and starts full. A command may start
//! while the bucket is not in debt; it takes its estimated cost up front (its weight, or
//! its request's bytes if larger) so that a pipeline cannot run ahead of the limit, and the
//! rest of its cost (reply bytes, elements) once its reply is metered. A command that finds
//! the bucket in debt waits until it is repaid, if that takes at most the configured bound
//! (`throttle_wait`, 10 ms), else it fails with `-THROTTLED`.
//!
//! The rate comes from the cache's route; the router refreshes the routes of caches in use
//! every [`crate::router::REFRESH_INTERVAL`] and [`follow`] applies their limits twice a
//! second, so a changed limit applies within about a second.

use crate::router::Router;
use shoal_types::CacheId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A cache's bucket on this gateway.
pub struct Bucket {
    /// The limit in milli-ECPU per second; 0 = unlimited.
    rate: AtomicU64,
    state: Mutex<State>,
}

struct State {
    /// Milli-ECPU available; negative = debt.
    tokens: i64,
    refilled: Instant,
}

impl Bucket {
    fn new(ecpu_per_second: Option<u64>) -> Bucket {
        let bucket = Bucket {
            rate: AtomicU64::new(0),
            state: Mutex::new(State { tokens: 0, refilled: Instant::now() }),
        };
        bucket.set_limit(ecpu_per_second);
        bucket
    }

    /// Whether the cache has a limit (the hot path checks this and nothing else otherwise).
    pub fn limited(&self) -> bool {
        self.rate.load(Ordering::Relaxed) != 0
    }

    /// Applies a limit; a bucket that gets a limit starts full. Whether it changed.
    pub fn set_limit(&self, ecpu_per_second: Option<u64>) -> bool {
        let rate = ecpu_per_second.unwrap_or(0).saturating_mul(1000);
        let old = self.rate.swap(rate, Ordering::Relaxed);
        if old != rate {
            let mut s = self.state.lock().unwrap();
            if old == 0 {
                s.tokens = rate as i64;
            }
            s.tokens = s.tokens.min(rate as i64);
            s.refilled = Instant::now();
        }
        old != rate
    }

    fn refill(&self, s: &mut State, rate: u64) {
        let now = Instant::now();
        let elapsed = now.duration_since(s.refilled);
        let add = (elapsed.as_nanos() * rate as u128 / 1_000_000_000) as i64;
        if add > 0 {
            s.tokens = (s.tokens + add).min(rate as i64);
            // Keep the remainder of a partial milli-ECPU for the next refill.
            s.refilled += Duration::from_nanos((add as u128 * 1_000_000_000 / rate as u128) as u64);
        }
    }

    /// Takes `cost` milli-ECPU unless the bucket is in debt; then `Err(how long until it is
    /// repaid)`.
    pub fn try_take(&self, cost: u64) -> Result<(), Duration> {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return Ok(());
        }
        let mut s = self.state.lock().unwrap();
        self.refill(&mut s, rate);
        if s.tokens > 0 {
            s.tokens -= cost as i64;
            return Ok(());
        }
        let missing = (1 - s.tokens) as u128;
        Err(Duration::from_nanos((missing * 1_000_000_000 / rate as u128) as u64 + 1))
    }

    /// Gives back what a command took up front when it was not billed after all.
    pub fn refund(&self, cost: u64) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || cost == 0 {
            return;
        }
        let mut s = self.state.lock().unwrap();
        s.tokens = (s.tokens + cost as i64).min(rate as i64);
    }

    /// Charges what a command cost beyond what it took up front.
    pub fn debit(&self, cost: u64) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || cost == 0 {
            return;
        }
        let mut s = self.state.lock().unwrap();
        self.refill(&mut s, rate);
        s.tokens -= cost as i64;
    }
}

/// The buckets of the caches this gateway serves.
#[derive(Default)]
pub struct Buckets {
    map: Mutex<HashMap<CacheId, Arc<Bucket>>>,
}

impl Buckets {
    /// The cache's bucket (shared by its sessions on this gateway).
    pub fn get(&self, cache: &CacheId, ecpu_per_second: Option<u64>) -> Arc<Bucket> {
        let mut map = self.map.lock().unwrap();
        map.entry(cache.clone()).or_insert_with(|| Arc::new(Bucket::new(ecpu_per_second))).clone()
    }

    /// Caches with sessions; buckets no session holds any more are dropped.
    fn served(&self) -> Vec<(CacheId, Arc<Bucket>)> {
        let mut map = self.map.lock().unwrap();
        map.retain(|_, b| Arc::strong_count(b) > 1);
        map.iter().map(|(id, b)| (id.clone(), b.clone())).collect()
    }
}

/// How often the limits of served caches are re-read (a change applies within about this
/// plus one request to the control plane, under the promised second).
pub const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// Re-reads the routes of the caches with sessions here twice a second and applies their
/// limits, until `shutdown`.
pub async fn follow(buckets: &Buckets, router: &Router, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        for (id, bucket) in buckets.served() {
            if let Some(route) = router.cached(&id) {
                if bucket.set_limit(route.limits.ecpu_per_second) {
                    tracing::info!(cache = %id, ecpu_per_second = ?route.limits.ecpu_per_second, "ECPU limit applied");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_its_rate_and_then_asks_to_wait() {
        let b = Bucket::new(Some(10)); // 10 ECPU/s = 10_000 milli
        for _ in 0..10 {
            assert!(b.try_take(1000).is_ok());
        }
        let wait = b.try_take(1000).unwrap_err();
        assert!(wait > Duration::from_micros(50) && wait <= Duration::from_millis(1), "{wait:?}");
        // Debt from replies (bytes beyond the estimate) delays the next command further.
        b.debit(5000);
        let wait = b.try_take(1000).unwrap_err();
        assert!(wait >= Duration::from_millis(490) && wait <= Duration::from_millis(510), "{wait:?}");
        // Lifting the limit lets everything through; setting one starts full.
        b.set_limit(None);
        assert!(b.try_take(1_000_000).is_ok());
        b.set_limit(Some(1));
        assert!(b.try_take(1000).is_ok());
        assert!(b.try_take(1).is_err());
    }

    #[test]
    fn unlimited_buckets_never_refuse() {
        let b = Bucket::new(None);
        assert!(!b.limited());
        for _ in 0..1000 {
            assert!(b.try_take(u32::MAX as u64).is_ok());
        }
    }
}
