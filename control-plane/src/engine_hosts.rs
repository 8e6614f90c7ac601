//! What the engine agents (`shoal engine`) last reported: which host runs which node, with
//! the pid and restarts of its valkey-server. Kept in memory: agents report every few
//! seconds, so a restarted control plane knows them again within one report.

use serde::Serialize;
use shoal_types::EngineReport;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;
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
    /// Seconds since that report.
    pub reported_seconds_ago: f64,
}

#[derive(Default)]
pub struct EngineHosts {
    /// By node name.
    nodes: Mutex<HashMap<String, (Instant, EngineHostSeen)>>,
}

impl EngineHosts {
    /// Records a report; the nodes it names that `known` does not know are returned (the
    /// agent's config and the control plane's disagree).
    pub fn report(
        &self,
        credential: &str,
        report: EngineReport,
        known: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let now = Instant::now();
        let mut unknown = Vec::new();
        let mut nodes = self.nodes.lock().unwrap();
        for n in report.nodes {
            if !known(&n.name) {
                unknown.push(n.name);
                continue;
            }
            let seen = EngineHostSeen {
                name: report.host.clone(),
                credential: credential.to_string(),
                pid: n.pid,
                restarts: n.restarts,
                reported_seconds_ago: 0.0,
            };
            nodes.insert(n.name, (now, seen));
        }
        unknown
    }

    /// The host that runs `node`, if an agent reported it.
    pub fn of(&self, node: &str) -> Option<EngineHostSeen> {
        let nodes = self.nodes.lock().unwrap();
        let (at, seen) = nodes.get(node)?;
        Some(EngineHostSeen { reported_seconds_ago: at.elapsed().as_secs_f64(), ..seen.clone() })
    }
}
