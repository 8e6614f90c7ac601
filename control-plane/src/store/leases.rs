//! The `leases` table: who holds each lease of the background jobs ([`crate::lease`]). On
//! PostgreSQL the lease is an advisory lock and the row only shows it; the holder writes
//! the row, on its lease's own connection, when it takes the lock and every second after.

use super::{Store, StoreError};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

/// A lease's row: its holder when the heartbeat is recent.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LeaseRecord {
    pub name: String,
    /// The control plane instance (`host/pid/random`, see [`crate::lease::instance_id`]).
    pub holder: String,
    /// Where the holder's internal API is reached (the `limits` lease: see
    /// [`crate::limits::Forwarder`]).
    pub url: Option<String>,
    /// RFC 3339 UTC, the holder's clock.
    pub since: String,
    pub heartbeat: String,
}

impl LeaseRecord {
    /// How long ago the holder last wrote its heartbeat (by this process's clock); None if
    /// the time does not parse.
    pub fn heartbeat_age(&self) -> Option<std::time::Duration> {
        let at = chrono::DateTime::parse_from_rfc3339(&self.heartbeat).ok()?;
        // A heartbeat "from the future" (clocks apart): just now.
        Some((chrono::Utc::now() - at.with_timezone(&chrono::Utc)).to_std().unwrap_or_default())
    }
}

fn from_row(r: AnyRow) -> LeaseRecord {
    LeaseRecord {
        name: r.get("name"),
        holder: r.get("holder"),
        url: r.get("url"),
        since: r.get("since"),
        heartbeat: r.get("heartbeat"),
    }
}

/// Records `holder` as the holder of `name` from now on (it has just taken the lock);
/// returns the row it replaces.
pub async fn claim(
    conn: &mut AnyConnection,
    name: &str,
    holder: &str,
    url: Option<&str>,
) -> Result<Option<LeaseRecord>, StoreError> {
    let previous = sqlx::query("SELECT name, holder, url, since, heartbeat FROM leases WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?
        .map(from_row);
    let now = super::now();
    sqlx::query(
        "INSERT INTO leases (name, holder, url, since, heartbeat) VALUES ($1, $2, $3, $4, $4)
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, url = excluded.url,
                                          since = excluded.since, heartbeat = excluded.heartbeat",
    )
    .bind(name)
    .bind(holder)
    .bind(url)
    .bind(&now)
    .execute(&mut *conn)
    .await?;
    Ok(previous)
}

/// The holder's heartbeat; false if the row is no longer the holder's (someone changed it
/// by hand: [`claim`] writes it again).
pub async fn heartbeat(conn: &mut AnyConnection, name: &str, holder: &str) -> Result<bool, StoreError> {
    let done = sqlx::query("UPDATE leases SET heartbeat = $1 WHERE name = $2 AND holder = $3")
        .bind(super::now())
        .bind(name)
        .bind(holder)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

impl Store {
    /// Every lease's row, by name.
    pub async fn leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let rows = sqlx::query("SELECT name, holder, url, since, heartbeat FROM leases ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(from_row).collect())
    }

    /// One lease's row.
    pub async fn lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let row = sqlx::query("SELECT name, holder, url, since, heartbeat FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(from_row))
    }
}
