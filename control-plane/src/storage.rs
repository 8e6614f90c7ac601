//! The storage sampler: every `storage_interval` seconds it measures each live cache's stored
//! bytes on its node ([`shoal_engine::storage`]; in a cluster pool the sum over every shard's
//! primary, the limit applying to the whole cache), enforces `data_storage_mb`, and accrues
//! the samples into per-minute storage usage ([`crate::store::StorageUsage`]).
//!
//! Over the limit (MB = 10^6 bytes), keys are evicted as the cache's eviction policy says
//! ([`EvictionPolicy`]: with `volatile-lru`, the default, keys with a TTL, idlest first) until
//! the cache is back under (`noeviction` skips this); if that is not enough, the cache's
//! `storage_full` flag is set. Gateways learn
//! the flag with their per-second route refresh and refuse `denyoom` commands with `-OOM`;
//! reads and deletes keep working, and the flag clears at the first sample back under.
//!
//! Accrual is the measured bytes only: billing applies the minimum of 100 MB per cache-hour
//! (as ElastiCache Serverless does for Valkey) when it rolls minutes up into GB-hours.

use crate::state::AppState;
use crate::store::{CacheRecord, StorageSampleRecord, StoreError};
use shoal_engine::{CacheDbs, EngineError, EvictionPolicy, StorageProbe};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest one cache's sampling (and eviction) may take before the sampler moves on.
const CACHE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum SampleError {
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("sampling took longer than {CACHE_TIMEOUT:?}")]
    Timeout,
}

/// Samples every live cache every `interval`, for as long as the control plane runs.
pub async fn run(state: Arc<AppState>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        match sample_all(&state).await {
            Ok(caches) => tracing::debug!(caches, took = ?started.elapsed(), "storage sampled"),
            Err(e) => tracing::warn!(error = %e, "storage sampling failed"),
        }
    }
}

/// One round: the nodes in parallel, each node's caches one after the other on one connection.
async fn sample_all(state: &Arc<AppState>) -> Result<usize, StoreError> {
    let caches = state.store.caches(None).await?;
    let count = caches.len();
    let mut by_node: BTreeMap<(String, String), Vec<CacheRecord>> = BTreeMap::new();
    for cache in caches {
        by_node.entry((cache.pool.clone(), cache.node.clone())).or_default().push(cache);
    }
    let mut nodes = tokio::task::JoinSet::new();
    for ((pool, node), caches) in by_node {
        let state = state.clone();
        nodes.spawn(async move {
            let probe_of = |state: &AppState| {
                let (pool, node) = (pool.clone(), node.clone());
                let pool = state.pools.of(&pool).cloned();
                async move { pool?.storage_probe(&node).await }
            };
            let mut probe = match probe_of(&state).await {
                Ok(p) => p,
                Err(e) => return tracing::warn!(node, error = %e, "cannot sample storage"),
            };
            for cache in caches {
                let sampled = tokio::time::timeout(CACHE_TIMEOUT, sample_cache(&state, &mut probe, &cache));
                match sampled.await.unwrap_or(Err(SampleError::Timeout)) {
                    Ok(()) => {}
                    Err(e @ SampleError::Timeout) => {
                        tracing::warn!(cache = %cache.id, error = %e, "storage sample abandoned");
                        // The probe may be mid-reply: start the next cache on a fresh connection.
                        match probe_of(&state).await {
                            Ok(p) => probe = p,
                            Err(e) => return tracing::warn!(node, error = %e, "cannot sample storage"),
                        }
                    }
                    Err(e) => tracing::warn!(cache = %cache.id, error = %e, "storage sample failed"),
                }
            }
        });
    }
    while nodes.join_next().await.is_some() {}
    Ok(count)
}

/// Samples one cache now, on a gateway's request (see `/internal/v1/caches/{id}/storage-sample`):
/// at most once per 250 ms per cache; errors are logged.
pub async fn sample_now(state: &AppState, cache: &CacheRecord) {
    static LAST: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Instant>>> =
        std::sync::OnceLock::new();
    {
        let mut last = LAST.get_or_init(Default::default).lock().unwrap();
        let now = Instant::now();
        if last.get(cache.id.as_str()).is_some_and(|t| now.duration_since(*t) < Duration::from_millis(250)) {
            return;
        }
        last.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        last.insert(cache.id.to_string(), now);
    }
    let sampled = async {
        let mut probe = state.pools.of(&cache.pool)?.storage_probe(&cache.node).await?;
        sample_cache(state, &mut probe, cache).await
    };
    match tokio::time::timeout(CACHE_TIMEOUT, sampled).await.unwrap_or(Err(SampleError::Timeout)) {
        Ok(()) => tracing::debug!(cache = %cache.id, "storage sampled on a gateway's request"),
        Err(e) => tracing::warn!(cache = %cache.id, error = %e, "storage sample on request failed"),
    }
}

/// One sample of a cache at a time in this process (the periodic sampler's and a gateway's
/// request): two at once would each evict the excess they measured, twice the keys needed.
fn sampling_lock(cache: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: std::sync::OnceLock<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
        std::sync::OnceLock::new();
    let mut locks = LOCKS.get_or_init(Default::default).lock().unwrap();
    // Only the caches being sampled stay in the map.
    locks.retain(|_, l| Arc::strong_count(l) > 1);
    locks.entry(cache.to_string()).or_default().clone()
}

/// Measures one cache, evicts if it is over its limit, and records the outcome.
async fn sample_cache(
    state: &AppState,
    probe: &mut StorageProbe,
    cache: &CacheRecord,
) -> Result<(), SampleError> {
    let lock = sampling_lock(cache.id.as_str());
    let _one_at_a_time = lock.lock().await;
    let dbs = CacheDbs { db: cache.db, databases: cache.databases };
    // When the sample starts: the gateways count writes from here on (see TenantRoute).
    let started_ms = chrono::Utc::now().timestamp_millis();
    let mut sample = probe.measure(dbs).await?;
    let mut evicted_keys = 0;
    let mut full = false;
    let limit_mb = cache.limits.data_storage_mb.unwrap_or(state.config.default_data_storage_mb);
    let limit = limit_mb.saturating_mul(1_000_000);
    if sample.bytes > limit {
        let excess = sample.bytes - limit;
        // `noeviction` caches go straight to refusing writes.
        let policy = EvictionPolicy::parse(&cache.eviction_policy);
        let eviction = match policy {
            Some(policy) => probe.evict(dbs, policy, excess).await?,
            None => Default::default(),
        };
        evicted_keys = eviction.keys;
        if eviction.keys > 0 {
            sample = probe.measure(dbs).await?;
        }
        // Full only when no candidate is left to evict (or eviction is off): a cache
        // whose eviction ran out of time, or whose sampled estimate is still a little over
        // after evicting enough, gets another round of eviction at the next sample.
        let evictable = policy.is_some() && !eviction.exhausted;
        full = sample.bytes > limit && !evictable;
        tracing::info!(
            cache = %cache.id, limit, bytes = sample.bytes, evicted_keys, freed = eviction.bytes, full,
            "cache over its storage limit"
        );
    }
    let was_full = state.store.cache_storage(&cache.id).await?.is_some_and(|s| s.storage_full);
    if was_full != full {
        tracing::info!(cache = %cache.id, full, "storage flag changed: writes {}", if full { "refused" } else { "allowed" });
    }
    let record = StorageSampleRecord {
        at_ms: started_ms,
        bytes: sample.bytes,
        keys: sample.keys,
        storage_full: full,
        evicted_keys,
    };
    let created_ms = chrono::DateTime::parse_from_rfc3339(&cache.created_at)
        .map(|t| t.timestamp_millis())
        .unwrap_or(record.at_ms);
    state.store.record_storage_sample(&cache.id, created_ms, &record).await?;
    Ok(())
}
