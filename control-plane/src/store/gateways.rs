//! Gateway credentials for the internal API: one row per gateway, with the SHA-256 of its
//! credential (the credential itself is shown once, when it is made).

use super::{now, Store, StoreError};
use sqlx::{AnyConnection, Row};

/// A gateway as listed (no secret).
#[derive(Clone, Debug)]
pub struct GatewayRecord {
    pub name: String,
    pub created_at: String,
    pub created_by: String,
}

/// Adds a gateway; a unique violation when the name is taken.
pub async fn insert(
    conn: &mut AnyConnection,
    name: &str,
    credential_hash: &str,
    created_by: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO gateways (name, credential_hash, created_at, created_by) VALUES ($1, $2, $3, $4)",
    )
    .bind(name)
    .bind(credential_hash)
    .bind(now())
    .bind(created_by)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Removes a gateway (its credential stops working); false if there was none.
pub async fn delete(conn: &mut AnyConnection, name: &str) -> Result<bool, StoreError> {
    let done = sqlx::query("DELETE FROM gateways WHERE name = $1").bind(name).execute(conn).await?;
    Ok(done.rows_affected() == 1)
}

impl Store {
    /// The credential hash of gateway `name`, if it exists.
    pub async fn gateway_credential_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT credential_hash FROM gateways WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get("credential_hash")))
    }

    pub async fn gateways(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        let rows = sqlx::query("SELECT name, created_at, created_by FROM gateways ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| GatewayRecord {
                name: r.get("name"),
                created_at: r.get("created_at"),
                created_by: r.get("created_by"),
            })
            .collect())
    }
}
