//! The `[engine]` section of a control-plane or engine-agent config file, and starting the
//! pools it describes: its `nodes` are the standalone pool `main` (as before pools existed),
//! each `[engine.clusters.<name>]` table a Valkey cluster pool of that name. With
//! `supervisor = "agents"` a control plane runs no Valkey process: engine agents
//! (`shoal engine`, the same `[engine]` section) run the nodes on their hosts — a cluster's
//! too, each agent those of its `[[engine.clusters.<name>.nodes]]`, the control plane forming
//! the cluster over all of them.

use anyhow::Context;
use serde::Deserialize;
use shoal_control_plane::pools::{Pools, MAIN_POOL};
use shoal_engine::{
    AgentNodes, ClusterConfig, ClusterMembers, ClusterMode, KeyAccess, ModuleSpec, NodeSpec, Placement, Pool,
    PoolConfig, Supervisor,
};
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
    /// Valkey modules the nodes of pool `main` load at start (`loadmodule <path> <args…>`),
    /// as `[{ path = "/abs/libjson.so", args = ["…"] }]`; also those of clusters that do not
    /// list their own. Default: none.
    #[serde(default)]
    modules: Vec<ModuleSpec>,
    /// The standalone pool `main`; may be empty when clusters are configured.
    #[serde(default)]
    nodes: Vec<NodeFile>,
    /// Cluster pools by name.
    #[serde(default)]
    clusters: BTreeMap<String, ClusterFile>,
    /// The pool of caches created without `"pool"` (default: `main`, or the only cluster
    /// when there are no standalone nodes).
    default_pool: Option<String>,
    /// Who runs the standalone nodes: the control plane itself (default), or engine agents.
    #[serde(default)]
    supervisor: SupervisorFile,
    /// The node secret shared by control planes and engine agents (at least 32 characters;
    /// the nodes' passwords derive from it). Required with engine agents.
    node_secret_file: Option<PathBuf>,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
enum SupervisorFile {
    #[default]
    ControlPlane,
    Agents,
}

/// Which role reads the `[engine]` section.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// `shoal control-plane`: starts the nodes itself, or connects to engine agents' nodes.
    ControlPlane,
    /// `shoal engine`: runs this host's nodes.
    Agent,
}

/// The node secret in `path`: refused when short or a placeholder left from an example.
pub fn read_node_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading node_secret_file {}", path.display()))?;
    let secret = text.trim();
    let lower = secret.to_ascii_lowercase();
    anyhow::ensure!(
        !["change", "replace", "placeholder", "example", "secret", "<", "xxx"]
            .iter()
            .any(|w| lower.contains(w)),
        "node_secret_file {} holds a placeholder: write a random secret there (e.g. `openssl rand -hex 32`)",
        path.display()
    );
    anyhow::ensure!(
        secret.len() >= 32,
        "node_secret_file {} holds {} characters: at least 32 random ones are needed (e.g. `openssl rand -hex 32`)",
        path.display(),
        secret.len()
    );
    Ok(secret.to_string())
}

#[derive(Deserialize)]
struct NodeFile {
    name: String,
    #[serde(default = "default_host")]
    host: String,
    port: u16,
    maxmemory_mb: Option<u64>,
    /// `"frequency"` for a node of caches with an LFU eviction policy (default `"recency"`).
    #[serde(default)]
    key_access: KeyAccess,
    /// `"dedicated"` for a node that holds one dedicated cache at a time (default `"shared"`).
    #[serde(default)]
    placement: Placement,
}

/// `[engine.clusters.<name>]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    /// Default: `<engine.dir>/cluster-<name>`.
    dir: Option<PathBuf>,
    /// Default `127.0.0.1`. Run by engine agents: use `nodes` instead.
    host: Option<String>,
    /// Node `n` listens on `base_port + n`, its cluster bus on that + 10000. Run by engine
    /// agents: use `nodes` instead.
    base_port: Option<u16>,
    /// Default 3. Run by engine agents: the nodes listed make the shards.
    shards: Option<usize>,
    /// The nodes engine agents run (`supervisor = "agents"`): every node in a control
    /// plane's file, this host's in an agent's. Their cluster bus is on port + 10000.
    #[serde(default)]
    nodes: Vec<NodeFile>,
    /// Replicas per shard (default 1; an agent, which forms nothing, ignores it).
    #[serde(default = "default_replicas")]
    replicas: usize,
    /// `cluster-node-timeout` in seconds (default 5).
    node_timeout: Option<f64>,
    /// `cluster-databases` (default: `[engine] databases`).
    databases: Option<u32>,
    /// `maxmemory` of each node in MB (default: `[engine] maxmemory_mb`, else half the host's
    /// memory shared among the nodes).
    maxmemory_mb: Option<u64>,
    /// Modules every node of the cluster loads (default: `[engine] modules`; `[]` for none).
    modules: Option<Vec<ModuleSpec>>,
}

fn default_databases() -> u32 {
    1024
}

pub fn default_host() -> String {
    "127.0.0.1".into()
}

const DEFAULT_SHARDS: usize = 3;

fn default_replicas() -> usize {
    1
}

/// A script time limit in seconds (0.1 s to 1 hour).
pub fn script_time_limit(secs: f64) -> anyhow::Result<Duration> {
    let min = shoal_types::MIN_SCRIPT_TIME_LIMIT.as_secs_f64();
    anyhow::ensure!(
        (min..=3600.0).contains(&secs),
        "script_time_limit must be {min}–3600 seconds, not {secs}"
    );
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
    /// The pools `role` starts (by name) and the default pool's name.
    pub fn plan(self, role: Role) -> anyhow::Result<(Vec<(String, PoolPlan)>, String)> {
        let supervisor = match (role, self.supervisor) {
            (Role::Agent, _) | (Role::ControlPlane, SupervisorFile::ControlPlane) => Supervisor::ThisProcess,
            (Role::ControlPlane, SupervisorFile::Agents) => Supervisor::Agents,
        };
        let node_secret = match &self.node_secret_file {
            Some(path) => Some(read_node_secret(path)?),
            None if role == Role::Agent || supervisor == Supervisor::Agents => {
                anyhow::bail!("[engine] node_secret_file is required where engine agents run the nodes")
            }
            None => None,
        };
        let agents_run = role == Role::Agent || supervisor == Supervisor::Agents;
        if supervisor == Supervisor::Agents {
            anyhow::ensure!(
                self.maxmemory_mb.is_some() || self.nodes.iter().all(|n| n.maxmemory_mb.is_some()),
                "[engine] maxmemory_mb is required with engine agents (the same as on the agents' hosts)"
            );
        }
        // A control plane whose nodes the agents run needs no Valkey binary.
        let valkey_server = match self.valkey_server {
            Some(p) => p,
            None if supervisor == Supervisor::Agents => PathBuf::new(),
            None => shoal_engine::find_valkey_server()?,
        };
        let script_time_limit = match self.script_time_limit {
            Some(secs) => script_time_limit(secs)?,
            None => shoal_engine::DEFAULT_SCRIPT_TIME_LIMIT,
        };
        // Checked here for the whole file: whether each file exists, the role that starts the
        // nodes checks on their host (a control plane of agents has none of them).
        let absolute = |at: &str, modules: &[ModuleSpec]| -> anyhow::Result<()> {
            if let Some(m) = modules.iter().find(|m| !m.path.is_absolute()) {
                anyhow::bail!("{at} modules: {} is not an absolute path", m.path.display());
            }
            Ok(())
        };
        absolute("[engine]", &self.modules)?;
        for (name, c) in &self.clusters {
            absolute(&format!("[engine.clusters.{name}]"), c.modules.as_deref().unwrap_or_default())?;
        }
        let mut plans = Vec::new();
        if !self.nodes.is_empty() {
            let nodes = self
                .nodes
                .into_iter()
                .map(|n| NodeSpec {
                    name: n.name,
                    host: n.host,
                    port: n.port,
                    maxmemory_mb: n.maxmemory_mb,
                    key_access: n.key_access,
                    placement: n.placement,
                })
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
                    modules: self.modules.clone(),
                    node_secret: node_secret.clone(),
                    supervisor,
                    cluster: None,
                }),
            ));
        }
        for (name, c) in self.clusters {
            anyhow::ensure!(
                name != MAIN_POOL || plans.is_empty(),
                "a cluster may not be named {MAIN_POOL:?} when [engine] has nodes"
            );
            let at = format!("[engine.clusters.{name}]");
            let node_timeout = match c.node_timeout {
                Some(secs) => node_timeout(secs)?,
                None => shoal_engine::cluster::DEFAULT_NODE_TIMEOUT,
            };
            let databases = c.databases.unwrap_or(self.databases);
            let modules = c.modules.clone().unwrap_or_else(|| self.modules.clone());
            let maxmemory_mb = c.maxmemory_mb.or(self.maxmemory_mb);
            let dir = c.dir.unwrap_or_else(|| self.dir.join(format!("cluster-{name}")));
            if !agents_run {
                anyhow::ensure!(
                    c.nodes.is_empty(),
                    "{at}: nodes are for a cluster that engine agents run (supervisor = \"agents\"); \
                     this control plane runs it itself, on host and base_port"
                );
                let base_port = c.base_port.with_context(|| format!("{at}: base_port is required"))?;
                let shards = c.shards.unwrap_or(DEFAULT_SHARDS);
                anyhow::ensure!(shards >= 1, "{at}: shards must be at least 1");
                plans.push((
                    name.clone(),
                    PoolPlan::Cluster(ClusterConfig {
                        valkey_server: valkey_server.clone(),
                        dir,
                        host: c.host.unwrap_or_else(default_host),
                        base_port,
                        shards,
                        replicas: c.replicas,
                        databases,
                        maxmemory_mb,
                        script_time_limit,
                        modules,
                        node_timeout,
                        agents: None,
                    }),
                ));
                continue;
            }
            anyhow::ensure!(
                c.host.is_none() && c.base_port.is_none() && c.shards.is_none(),
                "{at}: engine agents run this cluster's nodes: list them ([[engine.clusters.{name}.nodes]] \
                 with name, host and port) instead of host, base_port and shards"
            );
            anyhow::ensure!(
                !c.nodes.is_empty(),
                "{at}: engine agents run this cluster's nodes: list them in [[engine.clusters.{name}.nodes]] \
                 (name, host, port)"
            );
            anyhow::ensure!(
                c.nodes.iter().all(|n| n.placement == Placement::Shared),
                "{at}: dedicated caches take standalone nodes: mark them placement = \"dedicated\" in \
                 [[engine.nodes]], not in a cluster"
            );
            anyhow::ensure!(
                c.nodes.iter().all(|n| n.key_access == KeyAccess::Recency),
                "{at}: cluster nodes track recency; caches with an LFU eviction policy go to standalone \
                 nodes with key_access = \"frequency\" in [[engine.nodes]]"
            );
            anyhow::ensure!(
                c.nodes.iter().all(|n| n.maxmemory_mb.is_none()),
                "{at}: a cluster's nodes share its maxmemory_mb; set it on the cluster, not on a node"
            );
            // Valkey's CLUSTER MEET takes addresses, and nodes of one host share one.
            if let Some(n) = c.nodes.iter().find(|n| n.host.parse::<std::net::IpAddr>().is_err()) {
                anyhow::bail!(
                    "{at}: node {} has host {:?}: a cluster's nodes need an IP address",
                    n.name,
                    n.host
                );
            }
            let nodes: Vec<NodeSpec> =
                c.nodes.into_iter().map(|n| NodeSpec::new(n.name, n.host, n.port)).collect();
            let node_secret = node_secret.clone().expect("required above where agents run the nodes");
            let plan = match role {
                // This host's share, started in cluster mode; the control plane forms the cluster.
                Role::Agent => PoolPlan::Standalone(PoolConfig {
                    valkey_server: valkey_server.clone(),
                    dir,
                    nodes,
                    databases,
                    maxmemory_mb,
                    script_time_limit,
                    modules,
                    node_secret: Some(node_secret),
                    supervisor,
                    cluster: Some(ClusterMembers { pool: name.clone(), mode: ClusterMode { node_timeout } }),
                }),
                Role::ControlPlane => {
                    anyhow::ensure!(
                        maxmemory_mb.is_some(),
                        "{at}: maxmemory_mb (here or in [engine]) is required with engine agents (the same \
                         as in the agents' files)"
                    );
                    let per_shard = 1 + c.replicas;
                    anyhow::ensure!(
                        nodes.len().is_multiple_of(per_shard),
                        "{at}: {} nodes cannot make shards of a primary and {} replicas each",
                        nodes.len(),
                        c.replicas
                    );
                    PoolPlan::Cluster(ClusterConfig {
                        valkey_server: valkey_server.clone(),
                        dir,
                        host: String::new(),
                        base_port: 0,
                        shards: nodes.len() / per_shard,
                        replicas: c.replicas,
                        databases,
                        maxmemory_mb,
                        script_time_limit,
                        modules,
                        node_timeout,
                        agents: Some(AgentNodes { pool: name.clone(), nodes, node_secret }),
                    })
                }
            };
            plans.push((name, plan));
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
        file.plan(Role::ControlPlane)
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
    fn engine_agents_need_a_real_node_secret_and_a_memory_size() {
        let dir = tempfile::tempdir().unwrap();
        let secret = |text: &str| {
            let path = dir.path().join("node.secret");
            std::fs::write(&path, text).unwrap();
            format!("node_secret_file = \"{}\"\n", path.display())
        };
        let agents = "supervisor = \"agents\"\nmaxmemory_mb = 500\n";
        let good = secret(&"a1".repeat(32));
        let (plans, _) = plan(&format!("{agents}{good}dir = \"/srv/v\"\n{NODE}")).unwrap();
        let PoolPlan::Standalone(c) = &plans[0].1 else { panic!("standalone") };
        assert_eq!(c.supervisor, Supervisor::Agents);
        assert_eq!(c.node_secret.as_deref(), Some("a1".repeat(32).as_str()));
        let err = |text: String| plan(&text).unwrap_err().to_string();
        assert!(err(format!("{agents}{HEAD}{NODE}")).contains("node_secret_file is required"));
        let placeholder = secret("CHANGE_ME_CHANGE_ME_CHANGE_ME_CHANGE_ME");
        assert!(err(format!("{agents}{placeholder}{HEAD}{NODE}")).contains("placeholder"));
        let short = secret("0123456789abcdef");
        assert!(err(format!("{agents}{short}{HEAD}{NODE}")).contains("at least 32"));
        let good = secret(&"a1".repeat(32));
        let no_memory = format!("supervisor = \"agents\"\n{good}{HEAD}{NODE}");
        assert!(err(no_memory).contains("maxmemory_mb is required"));
        let cluster = format!("{agents}{good}{HEAD}{NODE}[clusters.c]\nbase_port = 7000\n");
        assert!(err(cluster).contains("instead of host, base_port and shards"));
    }

    #[test]
    fn a_cluster_run_by_engine_agents_lists_its_nodes_in_both_roles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.secret");
        std::fs::write(&path, "b2".repeat(32)).unwrap();
        let head =
            format!("supervisor = \"agents\"\nnode_secret_file = \"{}\"\ndir = \"/srv/v\"\n", path.display());
        let nodes = |names: &[&str]| -> String {
            names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    format!("[[clusters.c.nodes]]\nname = \"{n}\"\nhost = \"10.0.0.{i}\"\nport = 7000\n")
                })
                .collect()
        };
        let section = "[clusters.c]\nnode_timeout = 2\nmaxmemory_mb = 300\n";
        let four = format!("{head}{section}{}", nodes(&["a", "b", "c", "d"]));
        let (plans, default) = plan(&four).unwrap();
        assert_eq!(default, "c");
        let PoolPlan::Cluster(c) = &plans[0].1 else { panic!("a cluster") };
        let agents = c.agents.as_ref().expect("attached");
        assert_eq!((c.shards, c.replicas, agents.nodes.len(), agents.pool.as_str()), (2, 1, 4, "c"));
        // The agent's file: its own nodes, started as cluster members.
        let file: EngineFile = toml::from_str(&four).unwrap();
        let (plans, _) = file.plan(Role::Agent).unwrap();
        let PoolPlan::Standalone(p) = &plans[0].1 else { panic!("the agent's nodes") };
        let members = p.cluster.as_ref().expect("cluster members");
        assert_eq!((members.pool.as_str(), members.mode.node_timeout), ("c", Duration::from_secs(2)));
        assert_eq!((p.dir.clone(), p.maxmemory_mb), (PathBuf::from("/srv/v/cluster-c"), Some(300)));
        // What is refused, and why.
        let err = |text: String| plan(&text).unwrap_err().to_string();
        assert!(
            err(format!("{head}{section}{}", nodes(&["a", "b", "c"]))).contains("3 nodes cannot make shards")
        );
        assert!(err(format!("{head}{section}")).contains("list them in [[engine.clusters.c.nodes]]"));
        let no_memory = format!("{head}[clusters.c]\n{}", nodes(&["a", "b"]));
        assert!(err(no_memory).contains("maxmemory_mb"));
        let named = four.replace("10.0.0.1", "db.example");
        assert!(err(named).contains("node b has host \"db.example\": a cluster's nodes need an IP address"));
        let own = format!("{HEAD}[clusters.c]\nbase_port = 7000\n{}", nodes(&["a", "b"]));
        assert!(err(own).contains("nodes are for a cluster that engine agents run"));
    }

    #[test]
    fn modules_are_the_pools_and_a_clusters_own_list_replaces_them() {
        let modules = "modules = [{ path = \"/opt/valkey/libjson.so\" }, { path = \"/opt/valkey/libbloom.so\", args = [\"BF_ERROR_RATE\", \"0.01\"] }]\n";
        let text = format!(
            "{HEAD}{modules}{NODE}[clusters.same]\nbase_port = 7000\n[clusters.none]\nbase_port = 7100\nmodules = []\n"
        );
        let (plans, _) = plan(&text).unwrap();
        let PoolPlan::Standalone(main) = &plans[0].1 else { panic!("main is standalone") };
        let json = ModuleSpec::new("/opt/valkey/libjson.so");
        let bloom = ModuleSpec {
            path: "/opt/valkey/libbloom.so".into(),
            args: vec!["BF_ERROR_RATE".into(), "0.01".into()],
        };
        assert_eq!(main.modules, [json.clone(), bloom.clone()]);
        let cluster = |name: &str| match &plans.iter().find(|(n, _)| n == name).unwrap().1 {
            PoolPlan::Cluster(c) => c.modules.clone(),
            PoolPlan::Standalone(_) => panic!("{name} is a cluster"),
        };
        assert_eq!(cluster("same"), [json, bloom]);
        assert!(cluster("none").is_empty());
        // Without the setting: none, as before.
        let PoolPlan::Standalone(plain) = &plan(&format!("{HEAD}{NODE}")).unwrap().0[0].1 else { panic!() };
        assert!(plain.modules.is_empty());
        // Relative paths and unknown fields are refused.
        let err = |text: String| plan(&text).unwrap_err().to_string();
        let relative = err(format!("{HEAD}modules = [{{ path = \"libjson.so\" }}]\n{NODE}"));
        assert!(relative.contains("[engine] modules: libjson.so is not an absolute path"), "{relative}");
        let typo = format!("{HEAD}modules = [{{ path = \"/x.so\", arg = [] }}]\n{NODE}");
        assert!(toml::from_str::<EngineFile>(&typo).is_err());
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
