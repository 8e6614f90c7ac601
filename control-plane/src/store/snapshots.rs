//! The `snapshots` table (see [`crate::snapshots`]).

use super::{decode_err, decode_value, Store, StoreError};
use shoal_types::{AccountId, CacheId};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

/// How a snapshot came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// `POST /v1/caches/{id}/snapshots`.
    Manual,
    /// The cache's daily window.
    Automatic,
    /// Taken as the cache was deleted (`DELETE /v1/caches/{id}?final_snapshot=name`).
    Final,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Manual => "manual",
            SnapshotKind::Automatic => "automatic",
            SnapshotKind::Final => "final",
        }
    }

    pub fn parse(s: &str) -> Option<SnapshotKind> {
        [SnapshotKind::Manual, SnapshotKind::Automatic, SnapshotKind::Final]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Where a snapshot is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotStatus {
    Creating,
    Available,
    Failed,
}

impl SnapshotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::Creating => "creating",
            SnapshotStatus::Available => "available",
            SnapshotStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<SnapshotStatus> {
        [SnapshotStatus::Creating, SnapshotStatus::Available, SnapshotStatus::Failed]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// A snapshot row.
#[derive(Clone, Debug)]
pub struct SnapshotRecord {
    pub id: String,
    pub account_id: AccountId,
    pub cache_id: CacheId,
    pub cache_name: String,
    pub name: String,
    pub kind: SnapshotKind,
    pub status: SnapshotStatus,
    pub databases: u32,
    pub keys: u64,
    /// Size of the RDB file.
    pub bytes: u64,
    /// SHA-256 of the RDB file, hex.
    pub sha256: String,
    /// Why it failed.
    pub error: String,
    pub created_at_ms: i64,
    pub completed_at_ms: Option<i64>,
    pub deleted_at_ms: Option<i64>,
}

fn from_row(r: AnyRow) -> Result<SnapshotRecord, StoreError> {
    Ok(SnapshotRecord {
        id: r.get("id"),
        account_id: AccountId::parse(r.get::<&str, _>("account_id")).map_err(decode_err)?,
        cache_id: CacheId::parse(r.get::<&str, _>("cache_id")).map_err(decode_err)?,
        cache_name: r.get("cache_name"),
        name: r.get("name"),
        kind: decode_value("kind", r.get("kind"), SnapshotKind::parse)?,
        status: decode_value("status", r.get("status"), SnapshotStatus::parse)?,
        databases: u32::try_from(r.get::<i64, _>("databases")).unwrap_or(1),
        keys: r.get::<i64, _>("keys").max(0) as u64,
        bytes: r.get::<i64, _>("bytes").max(0) as u64,
        sha256: r.get("sha256"),
        error: r.get("error"),
        created_at_ms: r.get("created_at_ms"),
        completed_at_ms: r.get("completed_at_ms"),
        deleted_at_ms: r.get("deleted_at_ms"),
    })
}

pub async fn insert_snapshot(conn: &mut AnyConnection, s: &SnapshotRecord) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO snapshots (id, account_id, cache_id, cache_name, name, kind, status, databases,
                                created_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&s.id)
    .bind(s.account_id.as_str())
    .bind(s.cache_id.as_str())
    .bind(&s.cache_name)
    .bind(&s.name)
    .bind(s.kind.as_str())
    .bind(s.status.as_str())
    .bind(i64::from(s.databases))
    .bind(s.created_at_ms)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Marks a snapshot deleted (its file is gone or about to be).
pub async fn mark_snapshot_deleted(
    conn: &mut AnyConnection,
    id: &str,
    at_ms: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query("UPDATE snapshots SET deleted_at_ms = $1 WHERE id = $2 AND deleted_at_ms IS NULL")
        .bind(at_ms)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

impl Store {
    /// A snapshot that is not deleted.
    pub async fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM snapshots WHERE id = $1 AND deleted_at_ms IS NULL")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(from_row).transpose()
    }

    /// Snapshots not deleted, newest first: of one account and/or one cache.
    pub async fn snapshots(
        &self,
        account: Option<&AccountId>,
        cache: Option<&CacheId>,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM snapshots WHERE deleted_at_ms IS NULL
               AND (CAST($1 AS TEXT) IS NULL OR account_id = $1)
               AND (CAST($2 AS TEXT) IS NULL OR cache_id = $2)
             ORDER BY created_at_ms DESC, id DESC",
        )
        .bind(account.map(|a| a.as_str()))
        .bind(cache.map(|c| c.as_str()))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(from_row).collect()
    }

    /// Snapshots of `cache` begun since `since_ms`, deleted ones included.
    pub async fn snapshots_since(
        &self,
        cache: &CacheId,
        since_ms: i64,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM snapshots WHERE cache_id = $1 AND created_at_ms >= $2")
            .bind(cache.as_str())
            .bind(since_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(from_row).collect()
    }

    /// Every snapshot of `account` whose file was kept at some time in `[from_ms, to_ms)`,
    /// deleted ones included (for invoices).
    pub async fn snapshots_kept_between(
        &self,
        account: &AccountId,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM snapshots WHERE account_id = $1 AND status = 'available'
               AND created_at_ms < $3 AND (deleted_at_ms IS NULL OR deleted_at_ms > $2)",
        )
        .bind(account.as_str())
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(from_row).collect()
    }

    /// Records how a snapshot's creation ended.
    pub async fn finish_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE snapshots SET status = $1, keys = $2, bytes = $3, sha256 = $4, error = $5,
                    completed_at_ms = $6
             WHERE id = $7",
        )
        .bind(s.status.as_str())
        .bind(s.keys as i64)
        .bind(s.bytes as i64)
        .bind(&s.sha256)
        .bind(&s.error)
        .bind(s.completed_at_ms)
        .bind(&s.id)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Snapshots left `creating` before `before_ms` (their control plane stopped while taking
    /// them): marked failed.
    pub async fn fail_stale_snapshots(&self, before_ms: i64, now_ms: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE snapshots SET status = 'failed', error = 'the control plane taking it stopped',
                    completed_at_ms = $2
             WHERE status = 'creating' AND created_at_ms < $1",
        )
        .bind(before_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
