//! Where each cache lives: asks the control plane's internal API and remembers the answer
//! for a short time (`route_ttl`). A stale route is harmless: a deleted cache's Valkey ACL
//! user is gone, so its upstream login fails.
//!
//! Routes of caches in use (held by a session, or looked up within `route_ttl`) are refreshed
//! in place every [`REFRESH_INTERVAL`] with one batched request ([`Router::run`]), so limits
//! and the storage flag reach connected sessions within about a second.
//!
//! While the control plane cannot be reached, a route fetched within `route_stale_for`
//! (10 min by default) is still used, so clients of caches this gateway served lately keep
//! connecting; a cache it has not served in that time cannot be reached until the control
//! plane is back.

use crate::control_plane::ControlPlane;
use crate::GatewayError;
use shoal_types::{CacheId, TenantRoute};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a route lookup waits for the control plane before it uses the route it has.
const STALE_AFTER: Duration = Duration::from_millis(500);

/// How often the routes of caches in use are fetched again.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(500);

/// A cache's route as this gateway's sessions share it, updated in place by the refresh.
///
/// It also keeps the storage limit tight between two storage samples: the route carries the
/// cache's bytes at its last sample and when that sample started; the gateway counts the
/// request bytes of the writes it forwarded since then (commands refused when full: Valkey's
/// `denyoom` ones and scripts) and treats the cache as full once `sampled bytes + written
/// since ≥ data_storage_mb`. It then asks the control plane for a sample right away (the next
/// refresh, within [`REFRESH_INTERVAL`]), which evicts or marks the cache full, and the route
/// it refreshes next carries the new measurement.
pub struct LiveRoute {
    route: RwLock<TenantRoute>,
    /// `route.storage_full`, readable on every command without a lock.
    storage_full: AtomicBool,
    /// Request bytes of the writes forwarded for this cache by this gateway, ever.
    written: AtomicU64,
    /// `written` when the route's storage sample started: what came after is not in it.
    written_at_sample: AtomicU64,
    /// The storage limit less the sampled bytes (≤ 0: at or over the limit); `i64::MAX`
    /// without a limit.
    room: AtomicI64,
    /// The estimate reached the limit: [`Router::refresh`] asks for a sample now.
    sample_wanted: AtomicBool,
    /// `(wall-clock ms, written)` at each refresh (the last minute), to find which writes a
    /// new sample already saw.
    history: Mutex<VecDeque<(i64, u64)>>,
    /// Writes past the limit allowed while the sample that evicts is on its way: the limit
    /// for a cache with an evicting policy (`volatile-lru` …), 0 for a `noeviction` one.
    eviction_allowance: AtomicI64,
}

/// Refreshes kept in [`LiveRoute`]'s history (a minute of them).
const HISTORY: usize = 120;

fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl LiveRoute {
    fn new(route: TenantRoute) -> Self {
        LiveRoute {
            storage_full: AtomicBool::new(route.storage_full),
            room: AtomicI64::new(room(&route)),
            written: AtomicU64::new(0),
            written_at_sample: AtomicU64::new(0),
            sample_wanted: AtomicBool::new(false),
            history: Mutex::new(VecDeque::from([(wall_ms(), 0)])),
            eviction_allowance: AtomicI64::new(eviction_allowance(&route)),
            route: RwLock::new(route),
        }
    }

    fn set(&self, route: TenantRoute) {
        let written = self.written.load(Ordering::Relaxed);
        let new_sample = route.storage_sampled_at_ms != self.route.read().unwrap().storage_sampled_at_ms;
        {
            let mut history = self.history.lock().unwrap();
            let sampled_at = route.storage_sampled_at_ms;
            if new_sample {
                // The newest point taken before the sample started: writes after it may not
                // be in the sample (counting some twice errs on the safe side).
                let baseline = history
                    .iter()
                    .rev()
                    .find(|(at, _)| *at <= sampled_at)
                    .or(history.front())
                    .map_or(0, |(_, w)| *w);
                self.written_at_sample.store(baseline, Ordering::Relaxed);
            }
            history.push_back((wall_ms(), written));
            while history.len() > HISTORY {
                history.pop_front();
            }
        }
        self.room.store(room(&route), Ordering::Relaxed);
        self.eviction_allowance.store(eviction_allowance(&route), Ordering::Relaxed);
        self.storage_full.store(route.storage_full, Ordering::Relaxed);
        *self.route.write().unwrap() = route;
    }

    /// The latest route.
    pub fn get(&self) -> TenantRoute {
        self.route.read().unwrap().clone()
    }

    /// The cache is over its storage limit even after evictions: writes are refused.
    pub fn storage_full(&self) -> bool {
        self.storage_full.load(Ordering::Relaxed)
    }

    /// For a write of `bytes` (a command refused when full): true when it must be refused
    /// because the cache is full, by the sampler's flag or by the estimate (sampled bytes
    /// plus the writes since ≥ the limit); otherwise counts it and returns false. At the
    /// limit the gateway asks for a sample now. A `noeviction` cache's writes are refused from
    /// there; an evicting cache's (`volatile-lru`, `allkeys-lru` …) go on, up to the limit once
    /// more, since that sample evicts keys (as Valkey evicts rather than refuse).
    pub fn refuses_write(&self, bytes: u64) -> bool {
        if self.storage_full() {
            return true;
        }
        let since = self
            .written
            .load(Ordering::Relaxed)
            .saturating_sub(self.written_at_sample.load(Ordering::Relaxed));
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        let room = self.room.load(Ordering::Relaxed);
        if since >= room {
            self.sample_wanted.store(true, Ordering::Relaxed);
            if since >= room.saturating_add(self.eviction_allowance.load(Ordering::Relaxed)) {
                return true;
            }
        }
        self.written.fetch_add(write_cost(bytes), Ordering::Relaxed);
        false
    }
}

/// See [`LiveRoute::eviction_allowance`].
fn eviction_allowance(route: &TenantRoute) -> i64 {
    match route.limits.data_storage_mb {
        Some(mb) if evicts(&route.eviction_policy) => {
            i64::try_from(mb.saturating_mul(1_000_000)).unwrap_or(i64::MAX)
        }
        _ => 0,
    }
}

/// Whether the control plane evicts keys of a cache with this policy when it is over its limit
/// (every Valkey `maxmemory-policy` but `noeviction`; an unknown one is treated as not evicting).
fn evicts(policy: &str) -> bool {
    matches!(
        policy,
        "volatile-lru"
            | "allkeys-lru"
            | "volatile-lfu"
            | "allkeys-lfu"
            | "volatile-random"
            | "allkeys-random"
            | "volatile-ttl"
    )
}

/// What a write of `bytes` request bytes is counted for: a key stored costs more than its
/// request (Valkey's per-key objects, and allocator size classes that round up by up to 25%),
/// so counting 1.25 × + 64 keeps the estimate at or above the growth it can cause, and the
/// cache within its limit plus one request. Overwrites are counted too: near the limit they
/// cost an extra sample, never bytes over it.
fn write_cost(bytes: u64) -> u64 {
    bytes + bytes / 4 + 64
}

/// Bytes a cache may still write before its estimate reaches its storage limit.
fn room(route: &TenantRoute) -> i64 {
    match route.limits.data_storage_mb {
        Some(mb) => {
            let limit = i64::try_from(mb.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
            limit.saturating_sub(i64::try_from(route.storage_bytes).unwrap_or(i64::MAX))
        }
        None => i64::MAX,
    }
}

struct Entry {
    fetched: Instant,
    live: Arc<LiveRoute>,
}

/// Routes by cache id, cached for `ttl` and kept fresh while in use.
pub struct Router {
    client: Arc<ControlPlane>,
    ttl: Duration,
    /// How long a route is kept for when the control plane cannot be reached.
    stale_for: Duration,
    cache: Mutex<HashMap<CacheId, Entry>>,
}

impl Router {
    pub fn new(client: Arc<ControlPlane>, ttl: Duration, stale_for: Duration) -> Self {
        Router { client, ttl, stale_for: stale_for.max(ttl), cache: Mutex::new(HashMap::new()) }
    }

    pub async fn route(&self, id: &CacheId) -> Result<TenantRoute, GatewayError> {
        Ok(self.live(id).await?.get())
    }

    /// The shared, refreshed route of a cache (what a session keeps); a stale one while the
    /// control plane cannot be reached.
    pub async fn live(&self, id: &CacheId) -> Result<Arc<LiveRoute>, GatewayError> {
        let kept = match self.cache.lock().unwrap().get(id) {
            Some(entry) if entry.fetched.elapsed() < self.ttl => return Ok(entry.live.clone()),
            Some(entry) => entry.fetched.elapsed() < self.stale_for,
            None => false,
        };
        // With a route to fall back on, a control plane slow to answer is not waited for long.
        let fetched = match kept {
            true => tokio::time::timeout(STALE_AFTER, self.fetch(id))
                .await
                .unwrap_or_else(|_| Err(GatewayError::ControlPlane("no answer in time".into()))),
            false => self.fetch(id).await,
        };
        match fetched {
            Err(e) if !matches!(e, GatewayError::UnknownCache) => {
                let cache = self.cache.lock().unwrap();
                match cache.get(id).filter(|entry| entry.fetched.elapsed() < self.stale_for) {
                    Some(entry) => {
                        tracing::warn!(cache = %id, age = ?entry.fetched.elapsed(), error = %e,
                            "control plane unreachable: using the last route");
                        Ok(entry.live.clone())
                    }
                    None => Err(e),
                }
            }
            fetched => fetched,
        }
    }

    /// The latest route of a cache this gateway keeps (refreshed by [`Router::run`]).
    pub fn cached(&self, id: &CacheId) -> Option<TenantRoute> {
        self.cache.lock().unwrap().get(id).map(|e| e.live.get())
    }

    /// Asks the control plane now, whatever is cached.
    async fn fetch(&self, id: &CacheId) -> Result<Arc<LiveRoute>, GatewayError> {
        match self.client.route(id).await? {
            Some(route) => Ok(self.store(route)),
            None => {
                self.cache.lock().unwrap().remove(id);
                Err(GatewayError::UnknownCache)
            }
        }
    }

    /// Keeps a fetched route, updating the shared one if there is one.
    fn store(&self, route: TenantRoute) -> Arc<LiveRoute> {
        let mut cache = self.cache.lock().unwrap();
        match cache.get_mut(&route.cache_id) {
            Some(entry) => {
                entry.fetched = Instant::now();
                entry.live.set(route);
                entry.live.clone()
            }
            None => {
                let live = Arc::new(LiveRoute::new(route.clone()));
                cache.insert(route.cache_id, Entry { fetched: Instant::now(), live: live.clone() });
                live
            }
        }
    }

    /// Fetches the routes of caches in use again; forgets the others once their `ttl` is over.
    pub async fn refresh(&self) -> Result<(), GatewayError> {
        let (ids, to_sample): (Vec<CacheId>, Vec<CacheId>) = {
            let mut cache = self.cache.lock().unwrap();
            // A session holds a clone of `live`: more than one strong count means in use. Others
            // are kept (not refreshed) for an outage of the control plane.
            let in_use = |e: &Entry| Arc::strong_count(&e.live) > 1 || e.fetched.elapsed() < self.ttl;
            cache.retain(|_, e| in_use(e) || e.fetched.elapsed() < self.stale_for);
            let to_sample = cache
                .iter()
                .filter(|(_, e)| e.live.sample_wanted.swap(false, Ordering::Relaxed))
                .map(|(id, _)| id.clone())
                .collect();
            (cache.iter().filter(|(_, e)| in_use(e)).map(|(id, _)| id.clone()).collect(), to_sample)
        };
        if ids.is_empty() {
            return Ok(());
        }
        // Caches whose estimate reached their limit: measured now, so the routes fetched
        // below carry the measurement.
        let samples = to_sample.iter().map(|id| self.client.sample_storage(id));
        for (id, done) in to_sample.iter().zip(futures_util::future::join_all(samples).await) {
            if let Err(e) = done {
                tracing::debug!(cache = %id, error = %e, "could not ask for a storage sample");
            }
        }
        let asked = Instant::now();
        let mut routes: HashMap<CacheId, TenantRoute> = HashMap::new();
        // Bounded requests (the internal API takes JSON bodies up to 64 KiB).
        for chunk in ids.chunks(1000) {
            routes.extend(self.client.routes(chunk).await?.into_iter().map(|r| (r.cache_id.clone(), r)));
        }
        let mut cache = self.cache.lock().unwrap();
        for id in ids {
            match routes.remove(&id) {
                Some(route) => {
                    if let Some(entry) = cache.get_mut(&id) {
                        entry.fetched = asked;
                        entry.live.set(route);
                    }
                }
                // Deleted: the next lookup asks again and learns it is gone.
                None => {
                    cache.remove(&id);
                }
            }
        }
        Ok(())
    }

    /// Refreshes routes every [`REFRESH_INTERVAL`] until `shutdown` turns true.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.refresh().await {
                tracing::debug!(error = %e, "could not refresh routes");
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
