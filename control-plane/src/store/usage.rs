//! Usage the gateways metered: batches stored once per (gateway, seq), counters summed per
//! cache and minute (persisted in `usage_minutes`).

use super::{Store, StoreError};
use shoal_types::{CacheId, UsageBatch};
use sqlx::Row;

/// One cache's counters over one period (a minute or an hour).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageRow {
    /// Start of the period, RFC 3339 UTC.
    pub start: String,
    pub commands: u64,
    pub ecpu_milli: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub hits: u64,
    pub misses: u64,
    pub throttled: u64,
    pub errors: u64,
}

/// How usage is grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
}

/// A Unix minute as stored: RFC 3339 UTC, whole seconds (sorts like time).
pub fn minute_text(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix - unix.rem_euclid(60), 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

const COLUMNS: [&str; 8] =
    ["commands", "ecpu_milli", "bytes_in", "bytes_out", "hits", "misses", "throttled", "errors"];

impl Store {
    /// Stores a batch unless it was stored before; `Ok(false)` for a repeat. The batch's
    /// key and its counters go in one transaction: a batch counts once or not at all.
    pub async fn record_usage(&self, batch: &UsageBatch) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO usage_batches (gateway_id, seq, received_at) VALUES ($1, $2, $3)
             ON CONFLICT (gateway_id, seq) DO NOTHING",
        )
        .bind(&batch.gateway_id)
        .bind(batch.seq as i64)
        .bind(super::now())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(false);
        }
        for u in &batch.usage {
            sqlx::query(
                "INSERT INTO usage_minutes (cache_id, minute, commands, ecpu_milli, bytes_in, bytes_out,
                                            hits, misses, throttled, errors)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (cache_id, minute) DO UPDATE SET
                    commands = usage_minutes.commands + excluded.commands,
                    ecpu_milli = usage_minutes.ecpu_milli + excluded.ecpu_milli,
                    bytes_in = usage_minutes.bytes_in + excluded.bytes_in,
                    bytes_out = usage_minutes.bytes_out + excluded.bytes_out,
                    hits = usage_minutes.hits + excluded.hits,
                    misses = usage_minutes.misses + excluded.misses,
                    throttled = usage_minutes.throttled + excluded.throttled,
                    errors = usage_minutes.errors + excluded.errors",
            )
            .bind(u.cache_id.as_str())
            .bind(minute_text(u.minute))
            .bind(u.commands as i64)
            .bind(u.ecpu_milli as i64)
            .bind(u.bytes_in as i64)
            .bind(u.bytes_out as i64)
            .bind(u.hits as i64)
            .bind(u.misses as i64)
            .bind(u.throttled as i64)
            .bind(u.errors as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// A cache's usage in `[from, to)` (RFC 3339 UTC, whole seconds), per period, oldest
    /// first; periods without usage are left out.
    pub async fn usage(
        &self,
        cache: &CacheId,
        from: &str,
        to: &str,
        granularity: Granularity,
    ) -> Result<Vec<UsageRow>, StoreError> {
        // `2026-11-23T16:35:00Z`: the first 13 characters name the hour.
        let period = match granularity {
            Granularity::Minute => "minute",
            Granularity::Hour => "substr(minute, 1, 13) || ':00:00Z'",
        };
        // SUM of BIGINT is NUMERIC on PostgreSQL, which `Any` cannot read: cast back.
        let sums = COLUMNS.map(|c| format!("CAST(SUM({c}) AS BIGINT) AS {c}")).join(", ");
        let rows = sqlx::query(&format!(
            "SELECT {period} AS start, {sums}
             FROM usage_minutes WHERE cache_id = $1 AND minute >= $2 AND minute < $3
             GROUP BY {period} ORDER BY start"
        ))
        .bind(cache.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        let num = |r: &sqlx::any::AnyRow, c: &str| -> Result<u64, StoreError> {
            let v: i64 = r.try_get(c)?;
            Ok(v as u64)
        };
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    start: r.try_get("start")?,
                    commands: num(r, "commands")?,
                    ecpu_milli: num(r, "ecpu_milli")?,
                    bytes_in: num(r, "bytes_in")?,
                    bytes_out: num(r, "bytes_out")?,
                    hits: num(r, "hits")?,
                    misses: num(r, "misses")?,
                    throttled: num(r, "throttled")?,
                    errors: num(r, "errors")?,
                })
            })
            .collect()
    }
}
