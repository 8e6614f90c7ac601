//! The `engine_nodes` table: what engine agents last reported of each node they run (see
//! [`crate::engine_hosts`]).

use super::{Store, StoreError};
use sqlx::Row;

/// One node as its agent last reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineNodeRecord {
    pub node: String,
    pub host: String,
    pub credential: String,
    pub pid: Option<u32>,
    pub restarts: u32,
    /// Unix milliseconds, by the clock of the control plane that received the report.
    pub reported_at_ms: i64,
}

impl Store {
    /// Records what one report says of its nodes (one statement per node, in one transaction).
    pub async fn record_engine_nodes(&self, nodes: &[EngineNodeRecord]) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        for n in nodes {
            sqlx::query(
                "INSERT INTO engine_nodes (node, host, credential, pid, restarts, reported_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (node) DO UPDATE SET host = excluded.host, credential = excluded.credential,
                     pid = excluded.pid, restarts = excluded.restarts, reported_at_ms = excluded.reported_at_ms",
            )
            .bind(&n.node)
            .bind(&n.host)
            .bind(&n.credential)
            .bind(n.pid.map(i64::from))
            .bind(i64::from(n.restarts))
            .bind(n.reported_at_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    pub async fn engine_nodes(&self) -> Result<Vec<EngineNodeRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT node, host, credential, pid, restarts, reported_at_ms FROM engine_nodes")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|r| EngineNodeRecord {
                node: r.get("node"),
                host: r.get("host"),
                credential: r.get("credential"),
                pid: r.get::<Option<i64>, _>("pid").and_then(|p| u32::try_from(p).ok()),
                restarts: u32::try_from(r.get::<i64, _>("restarts")).unwrap_or(u32::MAX),
                reported_at_ms: r.get("reported_at_ms"),
            })
            .collect())
    }
}
