//! Usage the gateways metered: batches stored once per (gateway, seq), counters summed per
//! cache and minute (persisted in `usage_minutes`), peak connections kept per cache, minute
//! and gateway (`usage_connections`: the largest a gateway reported in the minute; a cache's
//! connections in a minute are the sum over its gateways, in an hour the largest minute's).

use super::{Store, StoreError};
use shoal_types::{CacheId, UsageBatch, UsageCounters};
use sqlx::Row;

/// One cache's counters over one period (a minute or an hour).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageRow {
    /// Start of the period, RFC 3339 UTC.
    pub start: String,
    pub counters: UsageCounters,
    /// Peak concurrent client connections (over all gateways).
    pub connections: u64,
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

/// Adds one cache's minute of counters to `usage_minutes`, column by counter name.
fn add_minute_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let names = UsageCounters::NAMES;
        let params: Vec<String> = (3..3 + names.len()).map(|i| format!("${i}")).collect();
        let sums: Vec<String> =
            names.iter().map(|c| format!("{c} = usage_minutes.{c} + excluded.{c}")).collect();
        format!(
            "INSERT INTO usage_minutes (cache_id, minute, {}) VALUES ($1, $2, {})
             ON CONFLICT (cache_id, minute) DO UPDATE SET {}",
            names.join(", "),
            params.join(", "),
            sums.join(", ")
        )
    })
}

impl Store {
    /// Stores a batch unless it was stored before; `Ok(false)` for a repeat. The batch's
    /// key and its counters go in one transaction: a batch counts once or not at all.
    pub async fn record_usage(&self, batch: &UsageBatch) -> Result<bool, StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
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
            if u.peak_connections > 0 {
                // The minute's largest peak of this gateway (MAX, portably).
                sqlx::query(
                    "INSERT INTO usage_connections (cache_id, minute, gateway_id, connections)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (cache_id, minute, gateway_id) DO UPDATE SET connections =
                        CASE WHEN excluded.connections > usage_connections.connections
                             THEN excluded.connections ELSE usage_connections.connections END",
                )
                .bind(u.cache_id.as_str())
                .bind(minute_text(u.minute))
                .bind(&batch.gateway_id)
                .bind(i64::from(u.peak_connections))
                .execute(&mut *tx)
                .await?;
            }
            // An entry that only reports connections adds no usage row (such a row would make
            // its hour billable for the storage minimum).
            if u.counters.is_zero() {
                continue;
            }
            let mut insert =
                sqlx::query(add_minute_sql()).bind(u.cache_id.as_str()).bind(minute_text(u.minute));
            for value in u.counters.values() {
                insert = insert.bind(value as i64);
            }
            insert.execute(&mut *tx).await?;
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
        let sums = UsageCounters::NAMES.map(|c| format!("CAST(SUM({c}) AS BIGINT) AS {c}")).join(", ");
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
        let mut out: std::collections::BTreeMap<String, UsageRow> = rows
            .iter()
            .map(|r| {
                let start: String = r.try_get("start")?;
                let mut values = [0; 8];
                for (value, name) in values.iter_mut().zip(UsageCounters::NAMES) {
                    *value = num(r, name)?;
                }
                let row = UsageRow {
                    start: start.clone(),
                    counters: UsageCounters::from_values(values),
                    connections: 0,
                };
                Ok((start, row))
            })
            .collect::<Result<_, StoreError>>()?;
        // Connections: per minute the sum over gateways; per hour the largest minute.
        let minutes = sqlx::query(
            "SELECT minute, CAST(SUM(connections) AS BIGINT) AS connections
             FROM usage_connections WHERE cache_id = $1 AND minute >= $2 AND minute < $3
             GROUP BY minute",
        )
        .bind(cache.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        for r in &minutes {
            let minute: String = r.try_get("minute")?;
            let start = match granularity {
                Granularity::Minute => minute,
                Granularity::Hour => format!("{}:00:00Z", minute.get(..13).unwrap_or_default()),
            };
            let row = out.entry(start.clone()).or_insert_with(|| UsageRow { start, ..Default::default() });
            row.connections = row.connections.max(num(r, "connections")?);
        }
        Ok(out.into_values().collect())
    }
}
