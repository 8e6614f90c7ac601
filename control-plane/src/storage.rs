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
//! A round costs little for empty caches: an `INFO keyspace` per node finds the databases
//! with keys (the others are not measured), samples are written in batched transactions,
//! and an empty cache's sample is written only when it differs from its last written one or
//! starts a new hour (see [`sample_all`]). `INFO keyspace` walks every database of the node
//! and holds all its caches meanwhile (4–65 ms at 100,000), so it is read once per
//! `storage_keyspace_interval` (60 s); in the rounds between, only caches that may have
//! changed are looked at: those with keys at their last sample, and those in use at a
//! gateway or loaded from a snapshot ([`note_in_use`]).
//!
//! Accrual is the measured bytes only: billing applies the minimum of 100 MB per cache-hour
//! (as ElastiCache Serverless does for Valkey) when it rolls minutes up into GB-hours.

use crate::places::{NodePlaces, Places};
use crate::state::AppState;
use crate::store::{CachePlace, CacheRecord, StorageSampleRecord, StoreError};
use shoal_engine::{CacheDbs, EngineError, EvictionPolicy, StorageProbe};
use shoal_types::CacheId;
use std::collections::HashMap;
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
    let mut sampler = Sampler::default();
    loop {
        tick.tick().await;
        let started = Instant::now();
        match sample_all(&state, &mut sampler).await {
            Ok(round) => tracing::debug!(
                caches = round.caches,
                looked_at = round.looked_at.load(std::sync::atomic::Ordering::Relaxed),
                written = round.written.load(std::sync::atomic::Ordering::Relaxed),
                read = ?round.read,
                took = ?started.elapsed(),
                "storage sampled"
            ),
            Err(e) => tracing::warn!(error = %e, "storage sampling failed"),
        }
    }
}

/// What the periodic sampler keeps from round to round.
#[derive(Default)]
struct Sampler {
    places: Places,
    /// (pool, node) → when its last round read its keyspace: every cache of the node not
    /// looked at then was empty then.
    rounds: HashMap<(String, String), i64>,
}

/// A gateway is about to serve `cache`, whose route it did not have: its clients' keys come
/// after this. A cache not known to hold keys is asked its `DBSIZE`s, and if it holds none
/// that is noted ([`known_empty_at`]): its storage accrues from here, however long ago the
/// node's keyspace was last read. Once served, the gateway's refreshes keep it in use
/// ([`note_in_use`]), so each round looks at it.
pub async fn observe_before_use(
    state: &AppState,
    cache: &CacheRecord,
    stored: Option<&crate::store::CacheStorage>,
) {
    note_in_use([&cache.id]);
    if stored.is_some_and(|s| s.keys > 0 || s.bytes > 0) {
        return;
    }
    let at = chrono::Utc::now().timestamp_millis();
    let dbs: Vec<u32> = CacheDbs { db: cache.db, databases: cache.databases }.iter().collect();
    let found = async {
        let mut probe = state.pools.of(&cache.pool)?.storage_probe(&cache.node).await?;
        Ok::<_, SampleError>(probe.nonempty_among(&dbs).await?)
    };
    // The gateway's login waits for this: a node that does not answer soon is not waited for
    // (the cache then accrues from the node's last keyspace read).
    match tokio::time::timeout(Duration::from_secs(1), found).await {
        Ok(Ok(with_keys)) if with_keys.is_empty() => {
            skips().lock().unwrap().seen_empty.insert(cache.id.clone(), at);
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(cache = %cache.id, error = %e, "cannot look at a cache before use"),
        Err(_) => tracing::debug!(cache = %cache.id, "cannot look at a cache before use: timed out"),
    }
}

/// Notes caches that may gain keys (a gateway holds sessions of them, a snapshot is loaded
/// into them): the next round looks at them even if it does not read the keyspace.
pub fn note_in_use<'a>(ids: impl IntoIterator<Item = &'a CacheId>) {
    let mut skips = skips().lock().unwrap();
    skips.in_use.extend(ids.into_iter().cloned());
}

/// Empty caches' samples the periodic sampler did not write (see [`sample_all`]).
#[derive(Default)]
struct Skips {
    /// Cache → when its latest sample written by this process was taken, if it was empty.
    written_at: HashMap<CacheId, i64>,
    /// Cache → its latest sample not written, when it was looked at (empty like the
    /// written one); one passed over was empty at its node's last round.
    pending: HashMap<CacheId, (i64, StorageSampleRecord)>,
    /// Caches to look at in the next round although they look idle: no sample of theirs is
    /// known (a gateway's request wrote one, a write failed, a sample failed).
    dirty: std::collections::HashSet<CacheId>,
    /// Caches in use at a gateway since the last round ([`note_in_use`]).
    in_use: std::collections::HashSet<CacheId>,
    /// Cache → when it was last found empty as a gateway was about to serve it
    /// ([`observe_before_use`]).
    seen_empty: HashMap<CacheId, i64>,
}

/// What the periodic sampler skipped writing, process-wide (a gateway's request, which
/// always writes, drops its cache's entry).
fn skips() -> &'static std::sync::Mutex<Skips> {
    static SKIPS: std::sync::OnceLock<std::sync::Mutex<Skips>> = std::sync::OnceLock::new();
    SKIPS.get_or_init(Default::default)
}

/// Most samples written per transaction: the write lock is let go between batches (a
/// batch of new caches' first samples holds it about 10 ms).
const WRITE_BATCH: usize = 100;

/// One round: the nodes in parallel, each node's caches one after the other on one
/// connection; the samples written in batches of [`WRITE_BATCH`] per transaction.
///
/// A cache whose databases hold no key (one `INFO keyspace` per node tells which) costs no
/// command; and a sample of an empty cache whose latest written sample (in the same UTC
/// hour) was empty too is not written: it would accrue nothing and add no row billing needs
/// (one row per cache-hour makes the hour billable for the storage minimum; the first sample
/// of each hour is written). The latest such sample is kept, and written before the next
/// one that differs, so the accrual is exactly what writing every sample gives.
///
/// Within an hour a node's idle caches are not even looked at: only those with keys, those
/// whose stored sample is not empty, and those marked dirty are. The others were empty at
/// the node's last round, which is then their kept sample. The first round of a sampler
/// looks at every cache; in each hour, every cache is looked at once more in its turn within
/// the first [`HOURLY_SPREAD_MS`] ([`hourly_turn`]), which writes its first sample of the hour.
///
/// A round that does not read the node's keyspace (it is read every
/// `storage_keyspace_interval`, and at a sampler's first round) looks only at caches
/// whose stored sample is not empty, dirty ones and those in use at a gateway, and asks
/// their databases' `DBSIZE`; it says nothing of the others (the node's last round, the
/// moment they are known empty at, stays the last that read the keyspace), and hourly turns
/// wait for the next read. A cache not in use cannot gain keys; one whose gateway told
/// another control plane (PostgreSQL) is found by the next read, within
/// `storage_keyspace_interval`.
async fn sample_all(state: &Arc<AppState>, sampler: &mut Sampler) -> Result<Round, StoreError> {
    let places = &mut sampler.places;
    let started = Instant::now();
    // Where each cache is (what changed since the last round); a cache with keys is then read
    // whole to measure it.
    let changes = places.refresh(&state.store, state.pools.iter().map(|(name, _)| name)).await?;
    let count = places.len();
    let nonempty = Arc::new(state.store.nonempty_storage().await?);
    let full = Arc::new(state.store.storage_full_caches().await?);
    let in_use = Arc::new(std::mem::take(&mut skips().lock().unwrap().in_use));
    let now_ms = chrono::Utc::now().timestamp_millis();
    let keyspace_every_ms = (state.config.storage_keyspace_interval * 1000.0) as i64;
    let round = Round {
        caches: count,
        read: started.elapsed(),
        looked_at: Default::default(),
        written: Default::default(),
    };
    if !changes.gone.is_empty() || !changes.arrived.is_empty() {
        let mut skips = skips().lock().unwrap();
        for id in &changes.gone {
            skips.written_at.remove(id);
            skips.pending.remove(id);
            skips.dirty.remove(id);
            skips.seen_empty.remove(id);
        }
        // A cache created since the last round has an empty sample as of its creation,
        // written by its create (`record_creation_sample`): as if this process had written it.
        for cache in changes.arrived {
            let created = created_ms(&cache.created_at, 0);
            skips.written_at.insert(cache.id, created);
        }
    }
    let mut nodes = tokio::task::JoinSet::new();
    for NodePlaces { pool, node, caches } in places.by_node() {
        let state = state.clone();
        let (nonempty, full, written) = (nonempty.clone(), full.clone(), round.written.clone());
        let looked_at = round.looked_at.clone();
        let in_use = in_use.clone();
        let key = (pool.clone(), node.clone());
        let last_round = sampler.rounds.get(&key).copied();
        let read_keyspace = last_round.is_none_or(|last| now_ms - last >= keyspace_every_ms);
        nodes.spawn(async move {
            let probe_of = |state: &AppState| {
                let (pool, node) = (pool.clone(), node.clone());
                let pool = state.pools.of(&pool).cloned();
                async move { pool?.storage_probe(&node).await }
            };
            let mut probe = match probe_of(&state).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(node, error = %e, "cannot sample storage");
                    return None;
                }
            };
            // When the keyspace was read: an empty cache's sample is as of then.
            let keyspace_ms = chrono::Utc::now().timestamp_millis();
            // Those that may have changed: with keys at their last sample, dirty, in use.
            let mut ids: std::collections::BTreeSet<&CacheId> = nonempty
                .iter()
                .chain(in_use.iter())
                .filter_map(|id| caches.by_id.get_key_value(id))
                .map(|(k, _)| k)
                .collect();
            {
                // The node's own ids, found under the lock: the dirty set itself is not copied.
                let skips = skips().lock().unwrap();
                ids.extend(
                    skips.dirty.iter().filter_map(|id| caches.by_id.get_key_value(id).map(|(k, _)| k)),
                );
            }
            let with_keys = if read_keyspace {
                probe.nonempty_dbs().await
            } else {
                let dbs: Vec<u32> = ids
                    .iter()
                    .filter_map(|id| caches.by_id.get(*id))
                    .flat_map(|c| CacheDbs { db: c.db, databases: c.databases }.iter())
                    .collect();
                probe.nonempty_among(&dbs).await
            };
            let with_keys = match with_keys {
                Ok(dbs) => dbs,
                Err(e) => {
                    tracing::warn!(node, error = %e, "cannot sample storage");
                    return None;
                }
            };
            let look_at: Vec<&CachePlace> = if last_round.is_none() {
                caches.by_id.values().collect()
            } else {
                if read_keyspace {
                    ids.extend(with_keys.iter().filter_map(|&db| caches.at_db(db)).map(|c| &c.id));
                    if hourly_turns_due(last_round, keyspace_ms) {
                        ids.extend(caches.by_id.keys().filter(|id| hourly_turn(id, last_round, keyspace_ms)));
                    }
                }
                ids.into_iter().filter_map(|id| caches.by_id.get(id)).collect()
            };
            looked_at.fetch_add(look_at.len(), std::sync::atomic::Ordering::Relaxed);
            let not_now = |c: &CachePlace| not_sampled(&c.id, created_ms(&c.created_at, 0), last_round);
            let mut batch = Vec::new();
            let mut look_at = look_at.into_iter();
            for cache in look_at.by_ref() {
                let dbs = CacheDbs { db: cache.db, databases: cache.databases };
                let measured = if dbs.any_in(&with_keys) {
                    let record = match state.store.cache(&cache.id).await {
                        Ok(Some(r)) => r,
                        Ok(None) => continue, // deleted meanwhile
                        Err(e) => {
                            tracing::warn!(cache = %cache.id, error = %e, "storage sample failed");
                            not_now(cache);
                            continue;
                        }
                    };
                    let sampled = tokio::time::timeout(
                        CACHE_TIMEOUT,
                        measure_cache(&state, &mut probe, &record, full.contains(&cache.id)),
                    );
                    match sampled.await.unwrap_or(Err(SampleError::Timeout)) {
                        Ok(m) => m,
                        Err(e @ SampleError::Timeout) => {
                            tracing::warn!(cache = %cache.id, error = %e, "storage sample abandoned");
                            not_now(cache);
                            // The probe may be mid-reply: go on on a fresh connection.
                            match probe_of(&state).await {
                                Ok(p) => probe = p,
                                Err(e) => {
                                    tracing::warn!(node, error = %e, "cannot sample storage");
                                    break;
                                }
                            }
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(cache = %cache.id, error = %e, "storage sample failed");
                            not_now(cache);
                            continue;
                        }
                    }
                } else {
                    StorageSampleRecord::empty(keyspace_ms)
                };
                let since = || created_ms(&cache.created_at, measured.at_ms);
                to_write(&mut batch, &cache.id, since, measured, nonempty.contains(&cache.id), last_round);
                if batch.len() >= WRITE_BATCH {
                    written.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
                    write(&state, std::mem::take(&mut batch)).await;
                }
            }
            // (Left after a lost connection: looked at again next round.)
            look_at.for_each(not_now);
            written.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
            write(&state, batch).await;
            Some(((pool, node), keyspace_ms, read_keyspace))
        });
    }
    while let Some(done) = nodes.join_next().await {
        // A node's round that read its keyspace is one its idle caches were empty at.
        if let Ok(Some((node, keyspace_ms, true))) = done {
            sampler.rounds.insert(node, keyspace_ms);
        }
    }
    Ok(round)
}

/// How much of each hour the caches' first samples of the hour are spread over: each cache
/// has its turn in it (from its id), so that 100,000 idle caches' hourly rows do not all
/// land in the hour's first round, taking turns with creates for half a minute.
const HOURLY_SPREAD_MS: i64 = 300_000;

/// Whether any cache's hourly turn may fall after `last_round` and by `now_ms`.
fn hourly_turns_due(last_round: Option<i64>, now_ms: i64) -> bool {
    let hour_start = now_ms - now_ms.rem_euclid(3_600_000);
    last_round.is_none_or(|last| last < hour_start + HOURLY_SPREAD_MS)
}

/// Whether idle `cache` is looked at by a round at `now_ms` (its node's last round at
/// `last_round`) for its first sample of the hour: it is when that round is the first
/// past the cache's turn, a moment in the hour's first [`HOURLY_SPREAD_MS`].
fn hourly_turn(cache: &CacheId, last_round: Option<i64>, now_ms: i64) -> bool {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    cache.hash(&mut hasher);
    let hour_start = now_ms - now_ms.rem_euclid(3_600_000);
    let turn = hour_start + (hasher.finish() % HOURLY_SPREAD_MS as u64) as i64;
    turn <= now_ms && last_round.is_none_or(|last| last < turn)
}

/// A cache looked at but not sampled (an error): it is looked at again next round, and
/// what it was known to be until then (empty at its node's last round) is kept.
fn not_sampled(cache: &CacheId, since_ms: i64, last_round: Option<i64>) {
    let mut skips = skips().lock().unwrap();
    let passed_over = known_empty_at(&skips, cache, last_round);
    if let Some(at) = passed_over {
        if skips.pending.get(cache).is_none_or(|(_, kept)| kept.at_ms < at) {
            skips.pending.insert(cache.clone(), (since_ms, StorageSampleRecord::empty(at)));
        }
    }
    skips.dirty.insert(cache.clone());
}

/// The latest moment `cache` is known empty at without a sample of it: passed over
/// ([`passed_over_at`]), or found empty before a gateway served it ([`observe_before_use`]),
/// after its latest written sample, which was empty.
fn known_empty_at(skips: &Skips, cache: &CacheId, last_round: Option<i64>) -> Option<i64> {
    let written_at = skips.written_at.get(cache).copied();
    let seen = skips.seen_empty.get(cache).copied().filter(|&at| written_at.is_some_and(|w| at > w));
    passed_over_at(skips, cache, last_round).max(seen)
}

/// When `cache` was last passed over as empty without being looked at: its node's last
/// round, if that came after its latest written (empty) sample and it was not dirty.
fn passed_over_at(skips: &Skips, cache: &CacheId, last_round: Option<i64>) -> Option<i64> {
    match (skips.written_at.get(cache), last_round) {
        (Some(&written), Some(last)) if last > written && !skips.dirty.contains(cache) => Some(last),
        _ => None,
    }
}

/// What a round did (for the debug log).
struct Round {
    caches: usize,
    /// Caches looked at (the others were idle).
    looked_at: Arc<std::sync::atomic::AtomicUsize>,
    /// Samples written.
    written: Arc<std::sync::atomic::AtomicUsize>,
    /// How long finding the caches and their latest samples took.
    read: Duration,
}

/// Adds what a sample of `cache` needs written to `batch` (nothing, itself, or a kept
/// empty sample then itself), and notes it (see [`sample_all`]). `stored_nonempty`: the
/// store's latest sample of the cache is not empty (whoever wrote it). `since_ms`: when
/// the cache was created (worked out only for a sample kept or written). `last_round`:
/// its node's last round (see [`Sampler::rounds`]).
fn to_write(
    batch: &mut Vec<(CacheId, i64, StorageSampleRecord)>,
    cache: &CacheId,
    since_ms: impl Fn() -> i64,
    record: StorageSampleRecord,
    stored_nonempty: bool,
    last_round: Option<i64>,
) {
    let hour = |ms: i64| ms.div_euclid(3_600_000);
    let empty = record.bytes == 0 && record.keys == 0 && !record.storage_full && record.evicted_keys == 0;
    let mut skips = skips().lock().unwrap();
    let passed_over = known_empty_at(&skips, cache, last_round);
    skips.dirty.remove(cache);
    skips.seen_empty.remove(cache);
    let written_at = skips.written_at.get(cache).copied();
    if empty
        && !stored_nonempty
        && written_at.is_some_and(|at| hour(at) == hour(record.at_ms) && at < record.at_ms)
    {
        // Most rounds of an empty cache end here: no key copied when it has one kept already.
        match skips.pending.get_mut(cache) {
            Some(kept) => kept.1 = record,
            None => {
                skips.pending.insert(cache.clone(), (since_ms(), record));
            }
        }
        return;
    }
    let looked_at = skips.pending.remove(cache);
    if !empty {
        // The cache was empty until then: its accrual stops there, not at the written one.
        let kept = match (looked_at, passed_over) {
            (Some(kept), Some(at)) if kept.1.at_ms < at => Some((kept.0, StorageSampleRecord::empty(at))),
            (Some(kept), _) => Some(kept),
            (None, Some(at)) => Some((since_ms(), StorageSampleRecord::empty(at))),
            (None, None) => None,
        };
        if let Some(kept) = kept {
            batch.push((cache.clone(), kept.0, kept.1));
        }
    }
    if empty {
        skips.written_at.insert(cache.clone(), record.at_ms);
    } else {
        skips.written_at.remove(cache);
    }
    batch.push((cache.clone(), since_ms(), record));
}

/// Writes a batch of samples; errors are logged (the next round samples again).
async fn write(state: &AppState, batch: Vec<(CacheId, i64, StorageSampleRecord)>) {
    if batch.is_empty() {
        return;
    }
    if let Err(e) = state.store.record_storage_samples(&batch).await {
        tracing::warn!(samples = batch.len(), error = %e, "storage samples not recorded");
        // Not written: the next round's are written in full.
        let mut skips = skips().lock().unwrap();
        for (id, _, _) in &batch {
            skips.written_at.remove(id);
            skips.dirty.insert(id.clone());
        }
    }
}

/// A cache's `created_at` in Unix milliseconds (`or` if it does not parse).
pub(crate) fn created_ms(created_at: &str, or: i64) -> i64 {
    chrono::DateTime::parse_from_rfc3339(created_at).map(|t| t.timestamp_millis()).unwrap_or(or)
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
        let was_full = state.store.cache_storage(&cache.id).await?.is_some_and(|s| s.storage_full);
        let record = measure_cache(state, &mut probe, cache, was_full).await?;
        {
            // Written whatever it is: the periodic sampler's next sample compares with it.
            let mut skips = skips().lock().unwrap();
            skips.pending.remove(&cache.id);
            skips.written_at.remove(&cache.id);
            skips.dirty.insert(cache.id.clone());
        }
        state
            .store
            .record_storage_sample(&cache.id, created_ms(&cache.created_at, record.at_ms), &record)
            .await?;
        Ok::<_, SampleError>(())
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

/// Measures one cache and evicts if it is over its limit: the sample to record (`was_full`:
/// the store's flag, for the log of a change).
async fn measure_cache(
    state: &AppState,
    probe: &mut StorageProbe,
    cache: &CacheRecord,
    was_full: bool,
) -> Result<StorageSampleRecord, SampleError> {
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
    if was_full != full {
        tracing::info!(cache = %cache.id, full, "storage flag changed: writes {}", if full { "refused" } else { "allowed" });
    }
    Ok(StorageSampleRecord {
        at_ms: started_ms,
        bytes: sample.bytes,
        keys: sample.keys,
        storage_full: full,
        evicted_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cache_has_one_hourly_turn_early_in_each_hour() {
        let caches: Vec<CacheId> = (0..2000).map(|_| CacheId::generate()).collect();
        let h = 500_000 * 3_600_000; // the start of an hour
        let turns = |rounds: &[i64]| -> Vec<usize> {
            caches
                .iter()
                .map(|c| {
                    rounds
                        .windows(2)
                        .filter(|w| hourly_turns_due(Some(w[0]), w[1]) && hourly_turn(c, Some(w[0]), w[1]))
                        .count()
                })
                .collect()
        };
        // Rounds every 5 s from 10 minutes before the hour to 20 minutes into it: one turn
        // each, in the hour's first 5 minutes, spread over many rounds.
        let rounds: Vec<i64> = (-120..240).map(|i| h + i * 5_000).collect();
        assert!(turns(&rounds).iter().all(|&n| n == 1));
        let per_round: Vec<usize> = rounds
            .windows(2)
            .map(|w| caches.iter().filter(|c| hourly_turn(c, Some(w[0]), w[1])).count())
            .collect();
        assert!(per_round.iter().all(|&n| n < 100), "spread: {per_round:?}");
        assert!(!hourly_turns_due(Some(h + 300_000), h + 305_000), "none after the spread");
        // A late round (the sampler stopped for the first 7 minutes) takes every missed turn.
        assert!(turns(&[h - 5_000, h + 420_000]).iter().all(|&n| n == 1));
    }

    fn sample(at_ms: i64, bytes: u64) -> StorageSampleRecord {
        StorageSampleRecord { at_ms, bytes, keys: bytes.min(1), storage_full: false, evicted_keys: 0 }
    }

    /// What [`to_write`] adds for one sample of `id`: (since, at, bytes) of each.
    fn written(
        id: &CacheId,
        at: i64,
        bytes: u64,
        stored_nonempty: bool,
        last_round: Option<i64>,
    ) -> Vec<(i64, i64, u64)> {
        let mut batch = Vec::new();
        to_write(&mut batch, id, || 7, sample(at, bytes), stored_nonempty, last_round);
        batch.iter().map(|(_, since, s)| (*since, s.at_ms, s.bytes)).collect()
    }

    /// Empty samples after an empty written one are kept back within the hour; the latest
    /// kept one is written before the next that differs; a new hour, or a store that holds
    /// something else for the cache, is written at once.
    #[test]
    fn only_empty_samples_like_the_written_one_are_skipped() {
        let id = CacheId::generate();
        let h = 1_800_000_000_000i64 - 3_600_000;
        let step = |at, bytes, stored_nonempty| written(&id, at, bytes, stored_nonempty, None);
        assert_eq!(step(h + 1_000, 0, false), vec![(7, h + 1_000, 0)], "first: written");
        assert_eq!(step(h + 6_000, 0, false), vec![], "empty like the last: kept back");
        assert_eq!(step(h + 11_000, 0, false), vec![]);
        assert_eq!(step(h + 16_000, 0, true), vec![(7, h + 16_000, 0)], "the store holds another");
        assert_eq!(step(h + 21_000, 0, false), vec![]);
        assert_eq!(step(h + 26_000, 50, false), vec![(7, h + 21_000, 0), (7, h + 26_000, 50)]);
        assert_eq!(step(h + 31_000, 50, false), vec![(7, h + 31_000, 50)], "not empty: written");
        assert_eq!(step(h + 36_000, 0, false), vec![(7, h + 36_000, 0)]);
        assert_eq!(step(h + 3_599_000, 0, false), vec![]);
        assert_eq!(step(h + 3_604_000, 0, false), vec![(7, h + 3_604_000, 0)], "a new hour");
    }

    /// A cache passed over (not looked at) in its node's rounds was empty at the last of
    /// them: that is the sample kept and written before it next differs, unless one looked
    /// at later, or a failure that made it dirty, says otherwise.
    #[test]
    fn a_cache_passed_over_was_empty_at_its_nodes_last_round() {
        let id = CacheId::generate();
        let h = 1_800_000_000_000i64 - 3_600_000;
        let step = |at, bytes, last_round| written(&id, at, bytes, false, last_round);
        assert_eq!(step(h + 1_000, 0, None), vec![(7, h + 1_000, 0)], "first: written");
        // Passed over at h+6 s, h+11 s; looked at with keys at h+16 s.
        assert_eq!(step(h + 16_000, 50, Some(h + 11_000)), vec![(7, h + 11_000, 0), (7, h + 16_000, 50)]);
        assert_eq!(step(h + 21_000, 0, Some(h + 16_000)), vec![(7, h + 21_000, 0)], "empty again: written");
        // Looked at (empty, kept back) at h+26 s, passed over at h+31 s: the later one is kept.
        assert_eq!(step(h + 26_000, 0, Some(h + 21_000)), vec![]);
        assert_eq!(step(h + 36_000, 9, Some(h + 31_000)), vec![(7, h + 31_000, 0), (7, h + 36_000, 9)]);
        assert_eq!(step(h + 41_000, 0, Some(h + 36_000)), vec![(7, h + 41_000, 0)]);
        // A sample that failed at h+51 s (the node's last round): nothing is assumed of it then.
        not_sampled(&id, 7, Some(h + 46_000));
        assert_eq!(step(h + 56_000, 5, Some(h + 51_000)), vec![(7, h + 46_000, 0), (7, h + 56_000, 5)]);
        assert!(!skips().lock().unwrap().dirty.contains(&id), "looked at: no longer dirty");
    }

    #[test]
    fn a_cache_found_empty_before_a_gateway_served_it_accrues_from_then() {
        let id = CacheId::generate();
        let h = 1_800_000_000_000i64 - 3_600_000;
        let step = |at, bytes, last_round| written(&id, at, bytes, false, last_round);
        let seen = |at| skips().lock().unwrap().seen_empty.insert(id.clone(), at);
        assert_eq!(step(h + 1_000, 0, None), vec![(7, h + 1_000, 0)], "first: written");
        // The keyspace last read at h+500 ms (before it); found empty at h+40 s, keys at h+45 s.
        seen(h + 40_000);
        assert_eq!(step(h + 45_000, 50, Some(h + 500)), vec![(7, h + 40_000, 0), (7, h + 45_000, 50)]);
        // Found empty before the latest written sample: that sample says more.
        assert_eq!(step(h + 50_000, 0, Some(h + 500)), vec![(7, h + 50_000, 0)], "empty again: written");
        seen(h + 49_000);
        assert_eq!(step(h + 55_000, 9, Some(h + 500)), vec![(7, h + 55_000, 9)]);
        assert!(!skips().lock().unwrap().seen_empty.contains_key(&id), "used once");
    }
}
