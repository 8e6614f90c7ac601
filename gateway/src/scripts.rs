//! Scripts in flight on each node through this gateway, per cache: a tenant's `SCRIPT KILL`
//! may end only its own cache's script, and Valkey's own SCRIPT KILL cannot tell whose
//! script runs. The session counts a script from when it is sent until its reply (or its
//! connection) is gone.
//!
//! Also each cache's strikes: a script ended by force (killed at the time limit, or its node
//! restarted under it) pauses the cache's scripts on this gateway for a while, doubling while
//! it goes on, so that a tenant cannot hold its node by running one runaway script after
//! another.

use shoal_types::CacheId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Each pause within [`STRIKES_FORGOTTEN`] of the last doubles the one before (the first is
/// the gateway's `script_pause`), up to [`MAX_PAUSE`].
pub const MAX_PAUSE: Duration = Duration::from_secs(300);
pub const STRIKES_FORGOTTEN: Duration = Duration::from_secs(600);

/// Whose script may be running on a node.
#[derive(Debug, PartialEq, Eq)]
pub enum Owner {
    /// No script of any cache is in flight there through this gateway.
    Nobody,
    /// Only scripts of the asking cache.
    Asker,
    /// Another cache has one in flight too: the running one may be its.
    Another,
}

#[derive(Default)]
pub struct Running {
    by_node: Mutex<HashMap<String, HashMap<CacheId, u32>>>,
    /// Caches whose scripts are paused: until when, and how many strikes led there.
    paused: Mutex<HashMap<CacheId, (Instant, u32)>>,
}

impl Running {
    /// A script of the cache was ended by force: its scripts pause (see the module docs),
    /// the first time for `first` (zero: never).
    pub fn strike(&self, cache: &CacheId, now: Instant, first: Duration) -> Duration {
        if first.is_zero() {
            return first;
        }
        let mut paused = self.paused.lock().unwrap();
        let strikes = match paused.get(cache) {
            Some(&(until, n)) if now < until + STRIKES_FORGOTTEN => n + 1,
            _ => 1,
        };
        let pause = first.saturating_mul(1 << (strikes - 1).min(16)).min(MAX_PAUSE.max(first));
        paused.insert(cache.clone(), (now + pause, strikes));
        pause
    }

    /// How long the cache's scripts stay paused, if they are.
    pub fn paused(&self, cache: &CacheId, now: Instant) -> Option<Duration> {
        let paused = self.paused.lock().unwrap();
        paused.get(cache).and_then(|&(until, _)| until.checked_duration_since(now)).filter(|d| !d.is_zero())
    }

    pub fn started(&self, node: &str, cache: &CacheId) {
        let mut nodes = self.by_node.lock().unwrap();
        *nodes.entry(node.to_string()).or_default().entry(cache.clone()).or_default() += 1;
    }

    /// `n` scripts of the cache are over (answered, or their connection is gone).
    pub fn ended(&self, node: &str, cache: &CacheId, n: u32) {
        if n == 0 {
            return;
        }
        let mut nodes = self.by_node.lock().unwrap();
        if let Some(caches) = nodes.get_mut(node) {
            if let Some(count) = caches.get_mut(cache) {
                *count = count.saturating_sub(n);
                if *count == 0 {
                    caches.remove(cache);
                }
            }
            if caches.is_empty() {
                nodes.remove(node);
            }
        }
    }

    pub fn owner(&self, node: &str, cache: &CacheId) -> Owner {
        let nodes = self.by_node.lock().unwrap();
        match nodes.get(node) {
            None => Owner::Nobody,
            Some(caches) if caches.keys().all(|c| c == cache) => Owner::Asker,
            Some(_) => Owner::Another,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_ended_by_force_pause_the_cache_longer_each_time() {
        let r = Running::default();
        let (a, b) = (CacheId::generate(), CacheId::generate());
        let t0 = Instant::now();
        const FIRST_PAUSE: Duration = Duration::from_secs(10);
        assert_eq!(r.paused(&a, t0), None);
        assert_eq!(r.strike(&a, t0, Duration::ZERO), Duration::ZERO, "pauses off");
        assert_eq!(r.paused(&a, t0), None);
        assert_eq!(r.strike(&a, t0, FIRST_PAUSE), FIRST_PAUSE);
        assert_eq!(r.paused(&a, t0 + Duration::from_secs(4)), Some(Duration::from_secs(6)));
        assert_eq!(r.paused(&b, t0), None, "only the cache that struck");
        assert_eq!(r.paused(&a, t0 + FIRST_PAUSE), None);
        assert_eq!(r.strike(&a, t0 + FIRST_PAUSE, FIRST_PAUSE), FIRST_PAUSE * 2);
        let mut last = t0;
        for _ in 0..10 {
            last += Duration::from_secs(1);
            r.strike(&a, last, FIRST_PAUSE);
        }
        assert_eq!(r.paused(&a, last), Some(MAX_PAUSE));
        let later = last + MAX_PAUSE + STRIKES_FORGOTTEN;
        assert_eq!(
            r.strike(&a, later, FIRST_PAUSE),
            FIRST_PAUSE,
            "strikes are forgotten after a quiet while"
        );
    }

    #[test]
    fn a_script_is_the_askers_only_while_no_other_cache_has_one_on_the_node() {
        let r = Running::default();
        let (a, b) = (CacheId::generate(), CacheId::generate());
        assert_eq!(r.owner("n0", &a), Owner::Nobody);
        r.started("n0", &a);
        r.started("n1", &b);
        assert_eq!(r.owner("n0", &a), Owner::Asker);
        assert_eq!(r.owner("n0", &b), Owner::Another);
        r.started("n0", &b);
        assert_eq!(r.owner("n0", &a), Owner::Another);
        r.ended("n0", &b, 1);
        r.ended("n0", &a, 5);
        assert_eq!(r.owner("n0", &a), Owner::Nobody);
    }
}
