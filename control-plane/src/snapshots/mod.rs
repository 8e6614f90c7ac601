//! Snapshots of caches (see `docs/snapshots.md`): taking one (the engine reads the cache's
//! databases from its node's replication stream into an RDB file, kept in the
//! [`SnapshotStore`]), loading an RDB into a cache (a restore into a new cache, or a user's
//! import), and the daily schedule with its retention ([`schedule`]).

pub mod objects;
pub mod schedule;

pub use objects::SnapshotStore;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::snapshots::{SnapshotKind, SnapshotRecord, SnapshotStatus};
use crate::store::CacheRecord;
use sha2::{Digest, Sha256};
use shoal_engine::RestoreKey;
use shoal_types::{CacheUsage, UsageBatch, UsageCounters};
use std::path::{Path, PathBuf};

/// Keys per `RESTORE` pipeline, and the bytes of payload that end one sooner.
const BATCH_KEYS: usize = 500;
const BATCH_BYTES: usize = 4 << 20;

/// Object name of a snapshot's RDB file in the snapshot store.
pub fn object_name(id: &str) -> String {
    format!("{id}.rdb")
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A new snapshot of `cache`, `creating`.
pub fn new_record(cache: &CacheRecord, name: String, kind: SnapshotKind) -> SnapshotRecord {
    SnapshotRecord {
        id: format!("snap-{}", crate::secret::random_token(8)),
        account_id: cache.account_id.clone(),
        cache_id: cache.id.clone(),
        cache_name: cache.name.clone(),
        name,
        kind,
        status: SnapshotStatus::Creating,
        databases: cache.databases,
        keys: 0,
        bytes: 0,
        sha256: String::new(),
        error: String::new(),
        created_at_ms: now_ms(),
        completed_at_ms: None,
        deleted_at_ms: None,
    }
}

/// A file of this control plane's work directory for `id`.
pub fn work_file(state: &AppState, id: &str, suffix: &str) -> Result<PathBuf, String> {
    let dir = &state.config.snapshots.work_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir.join(format!("{id}.{suffix}")))
}

/// Takes snapshot `record` of `cache` now and records how that ended (the row is
/// `available` or `failed` afterwards). The error says why it failed.
pub async fn take(state: &AppState, cache: &CacheRecord, record: &mut SnapshotRecord) -> Result<(), String> {
    let began = std::time::Instant::now();
    let work = work_file(state, &record.id, "rdb.part")?;
    let result = async {
        let pool = state.pools.of(&cache.pool).map_err(|e| e.to_string())?;
        let file =
            pool.snapshot(&cache.node, cache.db, cache.databases, &work).await.map_err(|e| e.to_string())?;
        let (bytes, sha256) = hash_file(&work).await?;
        state.snapshots.upload(&object_name(&record.id), &work).await?;
        Ok::<_, String>((file.keys, bytes, sha256))
    }
    .await;
    let _ = tokio::fs::remove_file(&work).await;
    record.completed_at_ms = Some(now_ms());
    match &result {
        Ok((keys, bytes, sha256)) => {
            record.status = SnapshotStatus::Available;
            (record.keys, record.bytes, record.sha256) = (*keys, *bytes, sha256.clone());
            tracing::info!(snapshot = %record.id, cache = %cache.id, keys, bytes, took = ?began.elapsed(), "snapshot taken");
        }
        Err(e) => {
            record.status = SnapshotStatus::Failed;
            record.error = e.clone();
            tracing::warn!(snapshot = %record.id, cache = %cache.id, error = %e, "snapshot failed");
        }
    }
    metrics::counter!("shoal_snapshots_total", "outcome" => record.status.as_str()).increment(1);
    state.store.finish_snapshot(record).await.map_err(|e| e.to_string())?;
    result.map(|_| ())
}

/// Size and SHA-256 (hex) of a file.
pub async fn hash_file(path: &Path) -> Result<(u64, String), String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0; 1 << 20];
        let mut total = 0;
        loop {
            let n = file.read(&mut buf).map_err(|e| format!("reading {}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        Ok((total, hex::encode(hasher.finalize())))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Fetches an available snapshot's file into the work directory, checked against the
/// checksum recorded when it was taken. The caller removes the file.
pub async fn fetch(state: &AppState, snapshot: &SnapshotRecord) -> Result<PathBuf, ApiError> {
    let work = work_file(state, &format!("{}-{}", snapshot.id, crate::secret::random_token(4)), "rdb")
        .map_err(ApiError::Internal)?;
    let fetched = async {
        state.snapshots.download(&object_name(&snapshot.id), &work).await.map_err(ApiError::Unavailable)?;
        let (bytes, sha256) = hash_file(&work).await.map_err(ApiError::Internal)?;
        if bytes != snapshot.bytes || sha256 != snapshot.sha256 {
            return Err(ApiError::Conflict(format!(
                "snapshot {} is corrupt: its file in the snapshot store has {bytes} bytes with SHA-256 {sha256}, \
                 it was stored with {} bytes and SHA-256 {}",
                snapshot.id, snapshot.bytes, snapshot.sha256
            )));
        }
        Ok(())
    }
    .await;
    match fetched {
        Ok(()) => Ok(work),
        Err(e) => {
            let _ = tokio::fs::remove_file(&work).await;
            Err(e)
        }
    }
}

/// What an RDB file holds, read through once with its checksum verified.
#[derive(Clone, Copy, Debug)]
pub struct RdbSummary {
    pub keys: u64,
    /// Bytes of keys and serialized values.
    pub bytes: u64,
    /// Highest database number used + 1 (0: no keys).
    pub databases: u32,
}

/// Reads the RDB at `path` through: its structure and checksum. The error is for users
/// ("the RDB file is truncated", …).
pub async fn inspect(path: &Path) -> Result<RdbSummary, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(|e| format!("reading the file: {e}"))?;
        let mut reader = shoal_rdb::Reader::new(std::io::BufReader::with_capacity(1 << 16, file))
            .map_err(|e| e.to_string())?;
        let mut summary = RdbSummary { keys: 0, bytes: 0, databases: 0 };
        while let Some(entry) = reader.next_entry().map_err(|e| e.to_string())? {
            summary.keys += 1;
            summary.bytes += (entry.key.len() + entry.value.len()) as u64;
            summary.databases = summary.databases.max(entry.db + 1);
        }
        Ok(summary)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// How [`load`] treats keys the cache already has.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// A new cache: nothing to look for.
    Empty,
    /// An import: a key the cache already has refuses the whole file (nothing changes).
    Refuse,
}

/// What [`load`] wrote.
#[derive(Clone, Copy, Debug, Default)]
pub struct Loaded {
    pub keys: u64,
    /// Keys left out because they had expired when the file was written.
    pub expired: u64,
    pub counters: UsageCounters,
}

/// Writes every key of the RDB at `path` (checked by [`inspect`] first) into `cache`, each
/// into the cache's database of the same number. A key's TTL is what it had left when the
/// file was written: its expiry minus `written_ms` (default: the file's own `ctime`, else
/// now); keys already expired then are left out. If anything fails, the keys written so far
/// are removed again (with [`Existing::Refuse`], those were new keys: nothing changed).
/// The writes are metered to the cache like `RESTORE` commands.
pub async fn load(
    state: &AppState,
    cache: &CacheRecord,
    path: &Path,
    written_ms: Option<i64>,
    existing: Existing,
) -> Result<Loaded, ApiError> {
    // Its new keys are measured by the next rounds of the storage sampler.
    crate::storage::note_in_use([&cache.id]);
    let pool = state.pools.of(&cache.pool)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<RestoreKey>, String>>(4);
    let reading = {
        let path = path.to_path_buf();
        let databases = cache.databases;
        tokio::task::spawn_blocking(move || read_batches(&path, databases, written_ms, tx))
    };
    let restore =
        shoal_commands::table().get("RESTORE").map(|s| (s.weight, s.per_element)).unwrap_or((1000, 0));
    let mut loaded = Loaded::default();
    let mut written: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut failure: Option<ApiError> = None;
    while let Some(batch) = rx.recv().await {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                failure = Some(ApiError::Unprocessable { detail: e, field: None });
                break;
            }
        };
        if existing == Existing::Refuse {
            let keys: Vec<(u32, Vec<u8>)> = batch.iter().map(|k| (k.db, k.key.clone())).collect();
            match pool.existing_keys(&cache.node, cache.db, &keys).await {
                Ok(found) => {
                    if let Some(i) = found.iter().position(|&f| f) {
                        failure = Some(ApiError::Conflict(format!(
                            "the cache already has key {:?} (database {}), which the file also holds: an \
                             import only adds keys; delete them first. Nothing was imported",
                            String::from_utf8_lossy(&keys[i].1),
                            keys[i].0
                        )));
                        break;
                    }
                }
                Err(e) => {
                    failure = Some(ApiError::Unavailable(e.to_string()));
                    break;
                }
            }
        }
        if let Err(e) = pool.restore_keys(&cache.node, cache.db, &batch).await {
            failure = Some(ApiError::Unprocessable {
                detail: format!("Valkey refused a key of the file: {e}. Nothing was kept"),
                field: None,
            });
            // The batch may be partly written.
            written.extend(batch.iter().map(|k| (k.db, k.key.clone())));
            break;
        }
        for k in &batch {
            // RESTORE key ttl payload REPLACE, as framed, and its +OK.
            let request = 40 + k.key.len() as u64 + k.payload.len() as u64;
            loaded.counters.commands += 1;
            loaded.counters.bytes_in += request;
            loaded.counters.bytes_out += 5;
            loaded.counters.ecpu_milli +=
                shoal_commands::ecpu::ecpu_milli(restore.0, restore.1, 0, request, 5);
        }
        loaded.keys += batch.len() as u64;
        written.extend(batch.into_iter().map(|k| (k.db, k.key)));
    }
    drop(rx);
    let expired = reading.await.map_err(|e| ApiError::Internal(e.to_string()))?;
    if failure.is_none() {
        match expired {
            Ok(n) => loaded.expired = n,
            Err(e) => failure = Some(ApiError::Unprocessable { detail: e, field: None }),
        }
    }
    if let Some(failure) = failure {
        for chunk in written.chunks(BATCH_KEYS) {
            if let Err(e) = pool.delete_keys(&cache.node, cache.db, chunk).await {
                tracing::error!(cache = %cache.id, error = %e, "could not remove the keys of a failed load");
            }
        }
        return Err(failure);
    }
    if loaded.counters.commands > 0 {
        let now = chrono::Utc::now().timestamp();
        let batch = UsageBatch {
            gateway_id: format!("control-plane-load-{}", crate::secret::random_token(8)),
            seq: 0,
            usage: vec![CacheUsage {
                cache_id: cache.id.clone(),
                minute: now - now % 60,
                counters: loaded.counters,
                peak_connections: 0,
            }],
        };
        state.store.record_usage(&batch).await?;
    }
    crate::storage::note_in_use([&cache.id]);
    Ok(loaded)
}

/// The blocking half of [`load`]: the file's keys, as `RESTORE`s, in batches. Returns how
/// many keys were left out as expired.
fn read_batches(
    path: &Path,
    databases: u32,
    written_ms: Option<i64>,
    tx: tokio::sync::mpsc::Sender<Result<Vec<RestoreKey>, String>>,
) -> Result<u64, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("reading the file: {e}"))?;
    let mut reader = shoal_rdb::Reader::new(std::io::BufReader::with_capacity(1 << 16, file))
        .map_err(|e| e.to_string())?;
    let version = u16::try_from(reader.header().version()).unwrap_or(u16::MAX);
    let mut base_ms: Option<i64> = written_ms;
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let mut expired = 0;
    while let Some(entry) = reader.next_entry().map_err(|e| e.to_string())? {
        if entry.db >= databases {
            let e = format!(
                "the file has keys in database {}, and the cache has {databases} database(s) (0–{})",
                entry.db,
                databases - 1
            );
            let _ = tx.blocking_send(Err(e.clone()));
            return Err(e);
        }
        let base = *base_ms.get_or_insert_with(|| ctime_ms(reader.aux()).unwrap_or_else(now_ms));
        let ttl_ms = match entry.expire_ms {
            None => 0,
            Some(at) if at - base <= 0 => {
                expired += 1;
                continue;
            }
            Some(at) => (at - base) as u64,
        };
        let payload = shoal_rdb::dump_payload(&entry, version);
        batch_bytes += payload.len() + entry.key.len();
        batch.push(RestoreKey {
            db: entry.db,
            key: entry.key,
            ttl_ms,
            payload,
            idle_seconds: entry.idle,
            freq: if entry.idle.is_some() { None } else { entry.freq },
        });
        if batch.len() >= BATCH_KEYS || batch_bytes >= BATCH_BYTES {
            if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                return Ok(expired);
            }
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
    Ok(expired)
}

/// The `ctime` AUX field (Unix seconds the file was written), in milliseconds.
fn ctime_ms(aux: &[(Vec<u8>, Vec<u8>)]) -> Option<i64> {
    aux.iter()
        .find(|(k, _)| k.as_slice() == b"ctime")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
        .map(|s| s * 1000)
}
