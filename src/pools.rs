//! The `[engine]` section of a control-plane config file, and starting the pools it
//! describes: its `nodes` are the standalone pool `main` (as before pools existed), each
//! `[engine.clusters.<name>]` table a Valkey cluster pool of that name.

use anyhow::Context;
use serde::Deserialize;
use shoal_control_plane::pools::{Pools, MAIN_POOL};
use shoal_engine::{ClusterConfig, NodeSpec, Pool, PoolConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Deserialize)]
pub struct EngineFile {
    valkey_server: Option<PathBuf>,
    dir: PathBuf,
    #[serde(default = "default_databases")]
    databases: u32,
    /// `maxmemory` in MB of nodes without their own (default: half the host's memory, shared).
    maxmemory_mb: Option<u64>,
    /// Seconds a tenant's script may hold a node (default 5).
    script_time_limit: Option<f64>,
    /// The standalone pool `main`; may be empty when clusters are configured.
    #[serde(default)]
    nodes: Vec<NodeFile>,
    /// Cluster pools by name.
    #[serde(default)]
    clusters: BTreeMap<String, ClusterFile>,
    /// The pool of caches created without `"pool"` (default: `main`, or the only cluster
    /// when there are no standalone nodes).
    default_pool: Option<String>,
}

#[derive(Deserialize)]
struct NodeFile {
    name: String,
    #[serde(default = "default_host")]
    host: String,
    port: u16,
    maxmemory_mb: Option<u64>,
}

/// `[engine.clusters.<name>]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    /// Default: `<engine.dir>/cluster-<name>`.
    dir: Option<PathBuf>,
    #[serde(default = "default_host")]
    host: String,
    /// Node `n` listens on `base_port + n`, its cluster bus on that + 10000.
    base_port: u16,
    #[serde(default = "default_shards")]
    shards: usize,
    #[serde(default = "default_replicas")]
    replicas: usize,
    /// `cluster-node-timeout` in seconds (default 5).
    node_timeout: Option<f64>,
    /// `cluster-databases` (default: `[engine] databases`).
    databases: Option<u32>,
    /// `maxmemory` of each node in MB (default: `[engine] maxmemory_mb`, else half the host's
    /// memory shared among the nodes).
    maxmemory_mb: Option<u64>,
}

fn default_databases() -> u32 {
    1024
}

pub fn default_host() -> String {
    "127.0.0.1".into()
}

fn default_shards() -> usize {
    3
}

fn default_replicas() -> usize {
    1
}

/// A script time limit in seconds (0.1 s to 1 hour).
pub fn script_time_limit(secs: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!((0.1..=3600.0).contains(&secs), "script_time_limit must be 0.1–3600 seconds, not {secs}");
    Ok(Duration::from_secs_f64(secs))
}

/// A cluster's `cluster-node-timeout` in seconds (0.5 s to 10 minutes).
pub fn node_timeout(secs: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!((0.5..=600.0).contains(&secs), "node_timeout must be 0.5–600 seconds, not {secs}");
    Ok(Duration::from_secs_f64(secs))
}

/// What to start, checked before any node starts.
#[derive(Debug)]
pub enum PoolPlan {
    Standalone(PoolConfig),
    Cluster(ClusterConfig),
}

impl EngineFile {
    /// The pools to start (by name) and the default pool's name.
    pub fn plan(self) -> anyhow::Result<(Vec<(String, PoolPlan)>, String)> {
        let valkey_server = match self.valkey_server {
            Some(p) => p,
            None => shoal_engine::find_valkey_server()?,
        };
        let script_time_limit = match self.script_time_limit {
            Some(secs) => script_time_limit(secs)?,
            None => shoal_engine::DEFAULT_SCRIPT_TIME_LIMIT,
        };
        let mut plans = Vec::new();
        if !self.nodes.is_empty() {
            let nodes = self
                .nodes
                .into_iter()
                .map(|n| NodeSpec { name: n.name, host: n.host, port: n.port, maxmemory_mb: n.maxmemory_mb })
                .collect();
            plans.push((
                MAIN_POOL.to_string(),
                PoolPlan::Standalone(PoolConfig {
                    valkey_server: valkey_server.clone(),
                    dir: self.dir.clone(),
                    nodes,
                    databases: self.databases,
                    maxmemory_mb: self.maxmemory_mb,
                    script_time_limit,
                }),
            ));
        }
        for (name, c) in self.clusters {
            anyhow::ensure!(
                name != MAIN_POOL || plans.is_empty(),
                "a cluster may not be named {MAIN_POOL:?} when [engine] has nodes"
            );
            anyhow::ensure!(c.shards >= 1, "[engine.clusters.{name}]: shards must be at least 1");
            plans.push((
                name.clone(),
                PoolPlan::Cluster(ClusterConfig {
                    valkey_server: valkey_server.clone(),
                    dir: c.dir.unwrap_or_else(|| self.dir.join(format!("cluster-{name}"))),
                    host: c.host,
                    base_port: c.base_port,
                    shards: c.shards,
                    replicas: c.replicas,
                    databases: c.databases.unwrap_or(self.databases),
                    maxmemory_mb: c.maxmemory_mb.or(self.maxmemory_mb),
                    script_time_limit,
                    node_timeout: match c.node_timeout {
                        Some(secs) => node_timeout(secs)?,
                        None => shoal_engine::cluster::DEFAULT_NODE_TIMEOUT,
                    },
                }),
            ));
        }
        anyhow::ensure!(!plans.is_empty(), "[engine] has no nodes and no clusters");
        let default = match self.default_pool {
            Some(d) => d,
            None if plans.len() == 1 => plans[0].0.clone(),
            None => MAIN_POOL.to_string(),
        };
        anyhow::ensure!(
            plans.iter().any(|(n, _)| *n == default),
            "[engine] default_pool {default:?} is not a configured pool"
        );
        Ok((plans, default))
    }
}

/// Starts every planned pool (stopping those already started if one fails).
pub async fn start(plans: Vec<(String, PoolPlan)>, default: &str) -> anyhow::Result<Arc<Pools>> {
    let mut started: Vec<(String, Arc<Pool>)> = Vec::new();
    for (name, plan) in plans {
        let pool = match plan {
            PoolPlan::Standalone(config) => Pool::start(config).await,
            PoolPlan::Cluster(config) => Pool::start_cluster(config).await,
        };
        match pool {
            Ok(p) => started.push((name, Arc::new(p))),
            Err(e) => {
                for (_, p) in &started {
                    p.stop().await;
                }
                return Err(e).with_context(|| format!("starting the Valkey pool {name:?}"));
            }
        }
    }
    let pools = Pools::new(started, default).map_err(anyhow::Error::msg)?;
    Ok(Arc::new(pools))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(toml_text: &str) -> anyhow::Result<(Vec<(String, PoolPlan)>, String)> {
        let file: EngineFile = toml::from_str(toml_text)?;
        file.plan()
    }

    const HEAD: &str = "valkey_server = \"/bin/true\"\ndir = \"/srv/v\"\n";
    const NODE: &str = "[[nodes]]\nname = \"n0\"\nport = 6400\n";

    #[test]
    fn an_engine_section_of_old_is_the_default_pool_main() {
        let (plans, default) = plan(&format!("{HEAD}{NODE}")).unwrap();
        assert_eq!(default, "main");
        assert!(
            matches!(&plans[..], [(name, PoolPlan::Standalone(c))] if name == "main" && c.nodes.len() == 1)
        );
    }

    #[test]
    fn clusters_are_pools_of_their_own_name_with_defaults_from_the_engine_section() {
        let text = format!("{HEAD}default_pool = \"big\"\n{NODE}[clusters.big]\nbase_port = 7000\nreplicas = 2\nnode_timeout = 1.5\n");
        let (plans, default) = plan(&text).unwrap();
        assert_eq!(default, "big");
        let names: Vec<&str> = plans.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["main", "big"]);
        let PoolPlan::Cluster(c) = &plans[1].1 else { panic!("big is a cluster") };
        assert_eq!((c.base_port, c.shards, c.replicas, c.databases), (7000, 3, 2, 1024));
        assert_eq!(c.node_timeout, Duration::from_millis(1500));
        assert_eq!(c.dir, PathBuf::from("/srv/v/cluster-big"));
        // Without nodes, the only cluster is the default.
        let (_, default) = plan(&format!("{HEAD}[clusters.c]\nbase_port = 7000\n")).unwrap();
        assert_eq!(default, "c");
    }

    #[test]
    fn unknown_defaults_empty_engines_typos_and_name_clashes_are_refused() {
        let unknown = plan(&format!("{HEAD}default_pool = \"nope\"\n{NODE}")).unwrap_err().to_string();
        assert!(unknown.contains("default_pool \"nope\""), "{unknown}");
        assert!(plan(HEAD).is_err(), "no pool at all");
        assert!(plan(&format!("{HEAD}{NODE}[clusters.c]\nbase_port = 7000\nshard = 3\n")).is_err(), "a typo");
        assert!(
            plan(&format!("{HEAD}{NODE}[clusters.main]\nbase_port = 7000\n")).is_err(),
            "two pools named main"
        );
        assert!(plan(&format!("{HEAD}{NODE}[clusters.c]\nbase_port = 7000\nnode_timeout = 0.1\n")).is_err());
    }
}
