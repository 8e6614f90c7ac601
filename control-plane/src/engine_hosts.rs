//! What the engine agents (`shoal engine`) last reported: which host runs which node, with
//! the pid and restarts of its valkey-server. Kept in the store, so every control plane
//! shows what an agent reported to any of them.

use crate::store::{EngineNodeRecord, Store, StoreError};
use serde::Serialize;
use shoal_types::EngineReport;
use std::collections::HashMap;
use utoipa::ToSchema;

/// Most nodes one report may name.
pub const MAX_REPORTED_NODES: usize = 1_000;

/// The engine host that runs a node, as its agent last reported.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EngineHostSeen {
    /// The agent's `[agent] name`.
    pub name: String,
    /// The credential the agent reported with.
    pub credential: String,
    /// The valkey-server's pid on that host (absent while it restarts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Restarts by the agent since it started.
    pub restarts: u32,
    /// Seconds since that report (by the clocks of the control planes involved).
    pub reported_seconds_ago: f64,
}

/// Records a report made with `credential`; the nodes it names that `known` does not know
/// are returned (the agent's config and the control plane's disagree), not recorded.
pub async fn record(
    store: &Store,
    credential: &str,
    report: EngineReport,
    known: impl Fn(&str) -> bool,
) -> Result<Vec<String>, StoreError> {
    let now = unix_ms();
    let (known, unknown): (Vec<_>, Vec<_>) = report.nodes.into_iter().partition(|n| known(&n.name));
    let records: Vec<EngineNodeRecord> = known
        .into_iter()
        .map(|n| EngineNodeRecord {
            node: n.name,
            host: report.host.clone(),
            credential: credential.to_string(),
            pid: n.pid,
            restarts: n.restarts,
            reported_at_ms: now,
        })
        .collect();
    store.record_engine_nodes(&records).await?;
    Ok(unknown.into_iter().map(|n| n.name).collect())
}

/// Every node's last report, by node name.
pub async fn seen(store: &Store) -> Result<HashMap<String, EngineHostSeen>, StoreError> {
    let now = unix_ms();
    Ok(store
        .engine_nodes()
        .await?
        .into_iter()
        .map(|r| {
            let seen = EngineHostSeen {
                name: r.host,
                credential: r.credential,
                pid: r.pid,
                restarts: r.restarts,
                reported_seconds_ago: (now - r.reported_at_ms).max(0) as f64 / 1000.0,
            };
            (r.node, seen)
        })
        .collect())
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}
