//! What billing reads (usage minutes and storage accrual of an account's caches, deleted ones
//! included) and keeps (final invoices, never changed once stored).

use super::{Store, StoreError};
use shoal_billing::{DedicatedSpan, StorageSample};
use shoal_types::{AccountId, CacheId, CacheUsage, UsageCounters};
use sqlx::Row;
use std::collections::BTreeMap;

impl Store {
    /// Usage of `account`'s caches with minutes in `[from, to)` (Unix seconds).
    pub async fn account_usage(
        &self,
        account: &AccountId,
        from: i64,
        to: i64,
    ) -> Result<Vec<CacheUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT u.* FROM usage_minutes u JOIN caches c ON c.id = u.cache_id
             WHERE c.account_id = $1 AND u.minute >= $2 AND u.minute < $3",
        )
        .bind(account.as_str())
        .bind(super::usage::minute_text(from))
        .bind(super::usage::minute_text(to))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let minute: &str = r.get("minute");
                let minute =
                    chrono::DateTime::parse_from_rfc3339(minute).map_err(super::decode_err)?.timestamp();
                Ok(CacheUsage {
                    cache_id: CacheId::parse(r.get::<&str, _>("cache_id")).map_err(super::decode_err)?,
                    minute,
                    counters: UsageCounters::from_values(
                        UsageCounters::NAMES.map(|c| r.get::<i64, _>(c) as u64),
                    ),
                    // Connections are not billed (they live in `usage_connections`).
                    peak_connections: 0,
                })
            })
            .collect()
    }

    /// Storage accrued by `account`'s caches in minutes `[from, to)` (Unix seconds).
    pub async fn account_storage(
        &self,
        account: &AccountId,
        from: i64,
        to: i64,
    ) -> Result<Vec<StorageSample>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.cache_id, s.minute, s.byte_seconds FROM storage_usage s JOIN caches c ON c.id = s.cache_id
             WHERE c.account_id = $1 AND s.minute >= $2 AND s.minute < $3",
        )
        .bind(account.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StorageSample {
                    cache_id: CacheId::parse(r.get::<&str, _>("cache_id")).map_err(super::decode_err)?,
                    minute: r.get("minute"),
                    byte_seconds: r.get::<i64, _>("byte_seconds") as u64,
                })
            })
            .collect()
    }

    /// Names of every cache an account ever had (for invoice lines).
    pub async fn cache_names(&self, account: &AccountId) -> Result<BTreeMap<CacheId, String>, StoreError> {
        let rows = sqlx::query("SELECT id, name FROM caches WHERE account_id = $1")
            .bind(account.as_str())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((CacheId::parse(r.get::<&str, _>("id")).ok()?, r.get::<String, _>("name"))))
            .collect())
    }

    /// When each dedicated cache an account ever had held its node (for invoice lines).
    pub async fn dedicated_spans(&self, account: &AccountId) -> Result<Vec<DedicatedSpan>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, created_at, deleted_at FROM caches WHERE account_id = $1 AND placement = 'dedicated'",
        )
        .bind(account.as_str())
        .fetch_all(&self.pool)
        .await?;
        let secs = |t: &str| chrono::DateTime::parse_from_rfc3339(t).ok().map(|t| t.timestamp());
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(DedicatedSpan {
                    cache_id: CacheId::parse(r.get::<&str, _>("id")).ok()?,
                    from: secs(r.get::<&str, _>("created_at"))?,
                    until: r.get::<Option<&str>, _>("deleted_at").and_then(secs),
                })
            })
            .collect())
    }

    /// A stored final invoice (JSON).
    pub async fn final_invoice(
        &self,
        account: &AccountId,
        month: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT body FROM invoices WHERE account_id = $1 AND month = $2")
            .bind(account.as_str())
            .bind(month)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get("body")))
    }

    /// Freezes a final invoice; a concurrent freeze of the same month keeps the first.
    pub async fn store_final_invoice(
        &self,
        id: &str,
        account: &AccountId,
        month: &str,
        body: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO invoices (id, account_id, month, body, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (account_id, month) DO NOTHING",
        )
        .bind(id)
        .bind(account.as_str())
        .bind(month)
        .bind(body)
        .bind(super::now())
        .execute(&self.pool)
        .await
        .map(|_| ())
    }
}
