//! Stored bytes per cache: the latest sample (`cache_storage`) and the storage accrued per
//! minute (`storage_usage`), written by the sampler in control-plane/src/storage.rs.

use super::{Store, StoreError};
use shoal_types::CacheId;
use sqlx::Row;
use std::collections::HashSet;

/// One sample of a cache, as the sampler took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorageSampleRecord {
    /// When it was taken, Unix milliseconds.
    pub at_ms: i64,
    pub bytes: u64,
    pub keys: u64,
    /// Over the limit after evicting what could be evicted: writes are refused.
    pub storage_full: bool,
    /// Keys evicted in this round.
    pub evicted_keys: u64,
}

impl StorageSampleRecord {
    /// An empty sample at `at_ms`.
    pub fn empty(at_ms: i64) -> StorageSampleRecord {
        StorageSampleRecord { at_ms, bytes: 0, keys: 0, storage_full: false, evicted_keys: 0 }
    }
}

/// The latest sample of a cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheStorage {
    pub bytes: u64,
    pub keys: u64,
    pub sampled_at_ms: i64,
    pub storage_full: bool,
    /// Keys evicted for the storage limit since the cache was created.
    pub evicted_keys: u64,
}

/// Storage of one cache during one minute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageUsage {
    /// Start of the minute, Unix seconds.
    pub minute: i64,
    /// Bytes stored × seconds, summed over the minute (at most 60 × the bytes stored).
    pub byte_seconds: u64,
    /// The largest sample in the minute.
    pub max_bytes: u64,
    pub evicted_keys: u64,
}

/// The longest a sample reaches back: after a sampler outage longer than this, the gap is
/// left unbilled rather than guessed from one sample (and a cache sampled for the first time
/// long after its creation, e.g. after an upgrade, is not billed retroactively).
pub const MAX_COVER_MS: i64 = 15 * 60 * 1000;

/// What a sample covering `[from_ms, to_ms)` with `bytes` stored adds to each minute it
/// touches: `(minute, byte_seconds)`. Rounded down per minute (less than one byte-second).
pub fn accrual(from_ms: i64, to_ms: i64, bytes: u64) -> Vec<(i64, u64)> {
    let mut out = Vec::new();
    let mut t = from_ms;
    while t < to_ms {
        let minute_ms = t.div_euclid(60_000) * 60_000;
        let end = (minute_ms + 60_000).min(to_ms);
        let byte_ms = bytes as u128 * (end - t) as u128;
        out.push((minute_ms / 1000, (byte_ms / 1000) as u64));
        t = end;
    }
    out
}

impl Store {
    /// Records a sample: it covers the time since the cache's previous sample (or since
    /// `since_ms`, the cache's creation, for the first), at most [`MAX_COVER_MS`], and accrues
    /// into `storage_usage`.
    /// Returns false, changing nothing, if another sampler recorded one meanwhile (or a
    /// later one before).
    pub async fn record_storage_sample(
        &self,
        cache: &CacheId,
        since_ms: i64,
        sample: &StorageSampleRecord,
    ) -> Result<bool, StoreError> {
        let recorded = self.record_storage_samples(&[(cache.clone(), since_ms, *sample)]).await?;
        Ok(recorded == 1)
    }

    /// [`Store::record_storage_sample`] for several samples (a sampling round's) in one
    /// transaction: one commit (and on SQLite one wait for the write lock) for all of them.
    /// Returns how many were recorded.
    ///
    /// On SQLite (one writer at a time) it waits in turn with the audited changes — cache
    /// creates and deletes among them — on the store's write lock: without it, a create that
    /// found the database busy polled SQLite's busy handler (sleeps of up to 100 ms) while
    /// a round's batches followed one another, and waited for the whole round.
    pub async fn record_storage_samples(
        &self,
        samples: &[(CacheId, i64, StorageSampleRecord)],
    ) -> Result<usize, StoreError> {
        if samples.is_empty() {
            return Ok(0);
        }
        let _in_turn = match self.backend {
            super::Backend::Sqlite => Some(self.audit_lock.lock().await),
            super::Backend::Postgres => None,
        };
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let mut recorded = 0;
        for (cache, since_ms, sample) in samples {
            if record_in(&mut tx, cache, *since_ms, sample).await? {
                recorded += 1;
            }
        }
        tx.commit().await?;
        Ok(recorded)
    }

    /// Caches whose latest recorded sample is not empty (bytes or keys) or is full: the rest
    /// stored nothing at their latest sample (usually most; a scan of `cache_storage`).
    pub async fn nonempty_storage(&self) -> Result<HashSet<CacheId>, StoreError> {
        let rows = sqlx::query(
            "SELECT cache_id FROM cache_storage WHERE bytes <> 0 OR keys <> 0 OR storage_full <> 0",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().filter_map(|r| CacheId::parse(r.get::<&str, _>("cache_id")).ok()).collect())
    }

    /// The live caches among `ids`, in one query (the gateways' route refresh).
    pub async fn live_caches(&self, ids: &[CacheId]) -> Result<Vec<super::CacheRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql =
            format!("SELECT * FROM caches WHERE status <> 'deleted' AND id IN ({})", placeholders.join(", "));
        let mut query = sqlx::query(&sql);
        for id in ids {
            query = query.bind(id.as_str());
        }
        query.fetch_all(&self.pool).await?.into_iter().map(super::cache_from_row).collect()
    }

    /// The latest sample of a cache, if it was sampled.
    pub async fn cache_storage(&self, cache: &CacheId) -> Result<Option<CacheStorage>, StoreError> {
        let row = sqlx::query(
            "SELECT bytes, keys, sampled_at, storage_full, evicted_keys FROM cache_storage WHERE cache_id = $1",
        )
        .bind(cache.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| CacheStorage {
            bytes: r.get::<i64, _>("bytes") as u64,
            keys: r.get::<i64, _>("keys") as u64,
            sampled_at_ms: r.get("sampled_at"),
            storage_full: r.get::<i64, _>("storage_full") != 0,
            evicted_keys: r.get::<i64, _>("evicted_keys") as u64,
        }))
    }

    /// The latest samples of several caches (those never sampled are left out).
    pub async fn caches_storage(
        &self,
        ids: &[CacheId],
    ) -> Result<std::collections::HashMap<CacheId, CacheStorage>, StoreError> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT cache_id, bytes, keys, sampled_at, storage_full, evicted_keys FROM cache_storage
             WHERE cache_id IN ({})",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for id in ids {
            query = query.bind(id.as_str());
        }
        let rows = query.fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let id = CacheId::parse(r.get::<&str, _>("cache_id")).ok()?;
                Some((
                    id,
                    CacheStorage {
                        bytes: r.get::<i64, _>("bytes") as u64,
                        keys: r.get::<i64, _>("keys") as u64,
                        sampled_at_ms: r.get("sampled_at"),
                        storage_full: r.get::<i64, _>("storage_full") != 0,
                        evicted_keys: r.get::<i64, _>("evicted_keys") as u64,
                    },
                ))
            })
            .collect())
    }

    /// Caches whose writes are refused because their storage is full (usually few).
    pub async fn storage_full_caches(&self) -> Result<HashSet<CacheId>, StoreError> {
        let rows = sqlx::query("SELECT cache_id FROM cache_storage WHERE storage_full <> 0")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().filter_map(|r| CacheId::parse(r.get::<&str, _>("cache_id")).ok()).collect())
    }

    /// Per-minute storage of a cache for minutes starting in `[from, to)` (Unix seconds).
    pub async fn storage_usage(
        &self,
        cache: &CacheId,
        from: i64,
        to: i64,
    ) -> Result<Vec<StorageUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT minute, byte_seconds, max_bytes, evicted_keys FROM storage_usage
             WHERE cache_id = $1 AND minute >= $2 AND minute < $3 ORDER BY minute",
        )
        .bind(cache.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| StorageUsage {
                minute: r.get("minute"),
                byte_seconds: r.get::<i64, _>("byte_seconds") as u64,
                max_bytes: r.get::<i64, _>("max_bytes") as u64,
                evicted_keys: r.get::<i64, _>("evicted_keys") as u64,
            })
            .collect())
    }
}

/// A new cache's first sample, empty, as of its creation (in its create's transaction): a
/// row for its first hour without the storage sampler writing one (the sampler knows new
/// caches from [`crate::places`]).
pub async fn record_creation_sample(
    conn: &mut sqlx::AnyConnection,
    cache: &CacheId,
    created_ms: i64,
) -> Result<(), StoreError> {
    record_in(conn, cache, created_ms, &StorageSampleRecord::empty(created_ms)).await.map(|_| ())
}

/// One sample of [`Store::record_storage_samples`], in its transaction.
async fn record_in(
    tx: &mut sqlx::AnyConnection,
    cache: &CacheId,
    since_ms: i64,
    sample: &StorageSampleRecord,
) -> Result<bool, StoreError> {
    let previous: Option<i64> = sqlx::query("SELECT sampled_at FROM cache_storage WHERE cache_id = $1")
        .bind(cache.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.get("sampled_at"));
    // A sample taken before the latest one recorded (two samplers at once: a takeover of
    // the sampler's lease, or a gateway's request) changes nothing: it would move the
    // latest sample back, and the next one would accrue that time again.
    if previous.is_some_and(|prev| prev >= sample.at_ms) {
        return Ok(false);
    }
    let claimed = match previous {
        // Only if the previous sample is still the latest: two samplers never both accrue.
        Some(prev) => sqlx::query(
            "UPDATE cache_storage SET bytes = $1, keys = $2, sampled_at = $3, storage_full = $4,
                    evicted_keys = evicted_keys + $5
             WHERE cache_id = $6 AND sampled_at = $7",
        )
        .bind(sample.bytes as i64)
        .bind(sample.keys as i64)
        .bind(sample.at_ms)
        .bind(sample.storage_full as i64)
        .bind(sample.evicted_keys as i64)
        .bind(cache.as_str())
        .bind(prev)
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        None => sqlx::query(
            "INSERT INTO cache_storage (cache_id, bytes, keys, sampled_at, storage_full, evicted_keys)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (cache_id) DO NOTHING",
        )
        .bind(cache.as_str())
        .bind(sample.bytes as i64)
        .bind(sample.keys as i64)
        .bind(sample.at_ms)
        .bind(sample.storage_full as i64)
        .bind(sample.evicted_keys as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected(),
    };
    if claimed == 0 {
        return Ok(false);
    }
    let from = previous.unwrap_or(since_ms).max(sample.at_ms - MAX_COVER_MS).min(sample.at_ms);
    let mut minutes = accrual(from, sample.at_ms, sample.bytes);
    // The sample's own minute gets its size and evictions even if it accrues nothing there.
    let own_minute = sample.at_ms.div_euclid(60_000) * 60;
    if minutes.last().is_none_or(|(m, _)| *m != own_minute) {
        minutes.push((own_minute, 0));
    }
    // Minutes that accrue nothing (an empty cache's) get no row, but for one per hour
    // (the sample's own minute in its hour): a row is what makes a cache-hour billable for
    // the storage minimum (see shoal_billing::rollup), and more would only add zeros.
    let mut hours_with_row = std::collections::HashSet::from([own_minute.div_euclid(3600)]);
    minutes.retain(|&(minute, byte_seconds)| {
        minute == own_minute || byte_seconds > 0 || hours_with_row.insert(minute.div_euclid(3600))
    });
    for (minute, byte_seconds) in minutes {
        let own = minute == own_minute;
        sqlx::query(
            "INSERT INTO storage_usage (cache_id, minute, byte_seconds, max_bytes, evicted_keys)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (cache_id, minute) DO UPDATE SET
                byte_seconds = storage_usage.byte_seconds + excluded.byte_seconds,
                max_bytes = CASE WHEN excluded.max_bytes > storage_usage.max_bytes
                                 THEN excluded.max_bytes ELSE storage_usage.max_bytes END,
                evicted_keys = storage_usage.evicted_keys + excluded.evicted_keys",
        )
        .bind(cache.as_str())
        .bind(minute)
        .bind(byte_seconds as i64)
        // The sample's size counts for every minute it covers.
        .bind(sample.bytes as i64)
        .bind(if own { sample.evicted_keys as i64 } else { 0 })
        .execute(&mut *tx)
        .await?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_accrues_into_every_minute_it_covers() {
        // 10 s inside one minute.
        assert_eq!(accrual(60_000, 70_000, 1_000), vec![(60, 10_000)]);
        // From 0:50 to 2:05: 10 s, a full minute, 5 s.
        assert_eq!(accrual(50_000, 125_000, 3), vec![(0, 30), (60, 180), (120, 15)]);
        // Sub-second pieces round down per minute; nothing for an empty interval.
        assert_eq!(accrual(59_999, 60_001, 1_000), vec![(0, 1), (60, 1)]);
        assert_eq!(accrual(5_000, 5_000, 1_000), vec![]);
        // A terabyte for an hour does not overflow.
        let hour: u64 = accrual(0, 3_600_000, 1 << 40).iter().map(|(_, b)| b).sum();
        assert_eq!(hour, (1u64 << 40) * 3600);
    }

    /// A fresh store: SQLite in a temporary directory, or a new database on the Postgres
    /// lane's server (`SHOAL_TEST_POSTGRES_URL`, see scripts/test.sh).
    async fn store_with_cache() -> (Store, CacheId, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = crate::store::fresh_postgres_database("storage")
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("s.db").display()));
        let store = Store::open(&url).await.unwrap();
        let id = CacheId::generate();
        let record = super::super::test_cache_record(&id);
        let mut conn = store.pool.acquire().await.unwrap();
        super::super::insert_cache(&mut conn, &record).await.unwrap();
        (store, id, dir)
    }

    fn sample(at_ms: i64, bytes: u64, evicted_keys: u64) -> StorageSampleRecord {
        StorageSampleRecord { at_ms, bytes, keys: 1, storage_full: false, evicted_keys }
    }

    #[tokio::test]
    async fn samples_accrue_once_each_from_the_previous_one() {
        let (store, id, _dir) = store_with_cache().await;
        let t0 = 1_800_000_000_000i64; // a minute boundary
                                       // First sample: covers since creation (20 s before).
        assert!(store.record_storage_sample(&id, t0 - 20_000, &sample(t0 + 10_000, 100, 0)).await.unwrap());
        assert!(store.record_storage_sample(&id, 0, &sample(t0 + 40_000, 200, 2)).await.unwrap());
        assert!(store.record_storage_sample(&id, 0, &sample(t0 + 70_000, 50, 1)).await.unwrap());
        // One taken before the latest (another sampler's, recorded late) changes nothing.
        assert!(!store.record_storage_sample(&id, 0, &sample(t0 + 60_000, 999, 5)).await.unwrap());
        assert!(!store.record_storage_sample(&id, 0, &sample(t0 + 70_000, 999, 5)).await.unwrap());
        let m = t0 / 1000;
        let usage = store.storage_usage(&id, m - 60, m + 120).await.unwrap();
        let row = |minute, byte_seconds, max_bytes, evicted_keys| StorageUsage {
            minute,
            byte_seconds,
            max_bytes,
            evicted_keys,
        };
        assert_eq!(
            usage,
            vec![
                row(m - 60, 100 * 20, 100, 0),
                row(m, 100 * 10 + 200 * 30 + 50 * 20, 200, 2),
                row(m + 60, 50 * 10, 50, 1),
            ]
        );
        let latest = store.cache_storage(&id).await.unwrap().unwrap();
        assert_eq!((latest.bytes, latest.sampled_at_ms, latest.evicted_keys), (50, t0 + 70_000, 3));
        // The range is half-open.
        assert_eq!(store.storage_usage(&id, m, m + 60).await.unwrap().len(), 1);
    }

    /// Samples of many caches recorded at once (the sampler's nodes in parallel, gateways'
    /// requests) all land: before write transactions began `IMMEDIATE` on SQLite, such a
    /// burst failed some with `database is locked` at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn samples_recorded_concurrently_all_land() {
        let (store, _, _dir) = store_with_cache().await;
        let mut ids = Vec::new();
        for _ in 0..16 {
            let (id, mut conn) = (CacheId::generate(), store.pool.acquire().await.unwrap());
            let mut record = super::super::test_cache_record(&id);
            record.db = ids.len() as u32 + 2;
            super::super::insert_cache(&mut conn, &record).await.unwrap();
            ids.push(id);
        }
        let t0 = 1_800_000_000_000i64;
        let mut tasks = tokio::task::JoinSet::new();
        for id in ids {
            let store = store.clone();
            tasks.spawn(async move {
                for i in 0..20 {
                    store.record_storage_sample(&id, t0 - 1000, &sample(t0 + i * 1000, 100, 0)).await?;
                }
                Ok::<_, StoreError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_sample_reaches_back_at_most_fifteen_minutes() {
        let (store, id, _dir) = store_with_cache().await;
        let t0 = 1_800_000_000_000i64;
        store.record_storage_sample(&id, t0 - 3_600_000, &sample(t0, 10, 0)).await.unwrap();
        store.record_storage_sample(&id, 0, &sample(t0 + 3_600_000, 10, 0)).await.unwrap();
        let all = store.storage_usage(&id, 0, i64::MAX).await.unwrap();
        assert_eq!(all.iter().map(|u| u.byte_seconds).sum::<u64>(), 2 * 10 * 15 * 60);
    }

    /// An empty cache's samples add one row per hour (what billing needs for the storage
    /// minimum), not one per minute; a batch records like samples one by one.
    #[tokio::test]
    async fn an_empty_cache_gets_one_row_per_hour_and_batches_record_alike() {
        let (store, id, _dir) = store_with_cache().await;
        let t0 = 1_800_000_000_000i64 - 3_600_000; // an hour boundary
        let batch = [
            (id.clone(), t0 - 120_000, sample(t0 + 600_000, 0, 0)),
            // Reaches back 15 minutes only, over the hour boundary.
            (id.clone(), 0, sample(t0 + 3_600_000 + 300_000, 0, 0)),
            (id.clone(), 0, sample(t0 + 3_600_000 + 360_000, 0, 4)),
            (id.clone(), 0, sample(t0 + 3_600_000 + 420_000, 1_000, 0)),
            // Out of order: not recorded.
            (id.clone(), 0, sample(t0 + 3_600_000 + 400_000, 5, 0)),
        ];
        assert_eq!(store.record_storage_samples(&batch).await.unwrap(), 4);
        let (h0, h1) = (t0 / 1000, t0 / 1000 + 3600);
        let minutes: Vec<(i64, u64, u64)> = store
            .storage_usage(&id, 0, i64::MAX)
            .await
            .unwrap()
            .iter()
            .map(|u| (u.minute, u.byte_seconds, u.evicted_keys))
            .collect();
        assert_eq!(
            minutes,
            vec![
                // The first sample reaches back to its cache's creation, in the hour before:
                // that hour's first minute, and its own minute.
                (h0 - 120, 0, 0),
                (h0 + 600, 0, 0),
                // The second reaches back 15 minutes, into hour 0 (its first minute there).
                (h0 + 3000, 0, 0),
                (h1 + 300, 0, 0),
                // The third's own minute (its evictions), where the fourth accrues 60 s.
                (h1 + 360, 60 * 1_000, 4),
                (h1 + 420, 0, 0),
            ]
        );
    }

    #[tokio::test]
    async fn live_caches_come_in_one_query() {
        let (store, id, _dir) = store_with_cache().await;
        let unknown = CacheId::generate();
        let found = store.live_caches(&[unknown.clone(), id.clone()]).await.unwrap();
        assert_eq!(found.iter().map(|c| c.id.clone()).collect::<Vec<_>>(), vec![id]);
        assert!(store.live_caches(&[unknown]).await.unwrap().is_empty());
        assert!(store.live_caches(&[]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_full_flag_is_stored_and_listed() {
        let (store, id, _dir) = store_with_cache().await;
        assert!(store.storage_full_caches().await.unwrap().is_empty());
        let full = StorageSampleRecord { storage_full: true, ..sample(1_000, 10, 0) };
        store.record_storage_sample(&id, 0, &full).await.unwrap();
        assert!(store.storage_full_caches().await.unwrap().contains(&id));
        store.record_storage_sample(&id, 0, &sample(2_000, 5, 0)).await.unwrap();
        assert!(store.storage_full_caches().await.unwrap().is_empty());
    }
}
