//! A pool run as one Valkey cluster: S shards, each a primary with R replicas.
//!
//! A cache is one database number across every shard (`cluster-databases`); its keys spread
//! over the shards by hash slot. What Valkey does itself: replication, failover of a dead
//! primary to its replica (after `cluster-node-timeout`), a restarted node rejoining from its
//! `nodes.conf` (as a replica of whoever was promoted), and moving slots with their keys,
//! database numbers intact (`CLUSTER MIGRATESLOTS`). What this module adds:
//!
//! - **Forming** the cluster once (MEET, ADDSLOTSRANGE split evenly, REPLICATE); a restart
//!   over existing folders reuses every node's `nodes.conf` instead.
//! - **ACL users on every node.** ACL is per node in Valkey, not replicated. The pool keeps the
//!   source of truth in memory: every user it set, as the `ACL SETUSER` rule lists it sent
//!   (seeded at start from `ACL LIST` of a node, since every node's ACL file holds them).
//!   A node that restarted (keeps its ACL file, but may have missed changes while down) or
//!   came back empty (folder lost) is made to match it before it serves: users replayed,
//!   strays deleted. A node that is down when a user is set is skipped, not waited for.
//! - **A cache's databases flushed on every shard's current primary** when it is created or
//!   deleted: during a failover that waits, bounded, for the shard's replica to be promoted
//!   (or fails with [`EngineError::NoPrimary`] having changed nothing).
//! - **The keeper**, a background task: notices restarted nodes (the supervisor's restart
//!   counter), reconciles their ACL users, and re-adds a node that came back empty (new node
//!   id): the old id forgotten everywhere, MEET, REPLICATE to its shard's primary.
//! - **The script probe**, another background task: a keyed script on every primary every
//!   500 ms; a node Valkey's multi-slot-script bug has poisoned (every keyed script refused
//!   until it restarts) is failed over to its replica and restarted (in place without one).
//! - **Scaling**: [`Cluster::add_shard`] and [`Cluster::remove_shard`], one at a time.
//! - **Run by engine agents** on several hosts ([`ClusterConfig::agents`]): the pool attaches
//!   to their nodes, forms the cluster with each replica on another host than its primary,
//!   learns of restarts from a node's `run_id`, reconciles a node that was out of reach, and
//!   moves a primary back to a host left with none. No scaling there yet.
//!
//! `docs/engine-cluster.md` has the whole story, with the measured failover figures.
//!
//! Nodes are `node-<n>` under the pool's folder, on port `base_port + n` (the cluster bus on
//! port + 10000, Valkey's default). Every node shares the pool's admin password (replicas and
//! slot migrations log in to their peers as the admin user).

use crate::acl_save::UserChange;
use crate::node::{
    ClusterMode, ModuleInfo, ModuleSpec, Node, NodeSecrets, NodeSpec, ADMIN_USER, HEALTH_TIMEOUT,
    OBSERVER_USER,
};
use crate::pool::admin_conn;
use crate::EngineError;
use redis::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod script_probe;

/// Hash slots of a Valkey cluster.
pub const SLOTS: u16 = 16384;
/// Default [`ClusterConfig::node_timeout`] (Valkey's default is 15 s; dev and tests set less).
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the keeper looks at the nodes.
const KEEPER_INTERVAL: Duration = Duration::from_millis(250);
/// How often the keeper spreads the primaries of a cluster run by agents over the hosts.
const BALANCE_INTERVAL: Duration = Duration::from_secs(2);
/// Longest forming, joining or a slot migration may take before it is reported as failed.
const TOPOLOGY_TIMEOUT: Duration = Duration::from_secs(60);
/// Why a cluster pool run by engine agents cannot add or remove a shard.
pub const SCALING_UNDER_AGENTS: &str =
    "adding or removing a shard is not supported yet for a cluster pool run by \
     engine agents: its nodes are those of the agents' configs (see docs/engine-cluster.md)";
/// How to run a cluster pool. Built once at startup.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub valkey_server: PathBuf,
    /// Nodes live in `<dir>/node-<n>/`.
    pub dir: PathBuf,
    pub host: String,
    /// Node `n` listens on `base_port + n` and its cluster bus on that + 10000.
    pub base_port: u16,
    /// Shards formed on first start (a restart keeps what `nodes.conf` says).
    pub shards: usize,
    /// Replicas per shard.
    pub replicas: usize,
    /// `cluster-databases` of every node: see [`ClusterConfig::databases_for`].
    pub databases: u32,
    /// `maxmemory` of every node in MB (10^6 bytes); `None` = half the host's memory shared
    /// equally among the nodes formed on first start.
    pub maxmemory_mb: Option<u64>,
    pub script_time_limit: Duration,
    /// Modules every node loads at start (`loadmodule`); empty: none. Run by engine agents:
    /// the agents' own files say (unused here).
    pub modules: Vec<ModuleSpec>,
    /// `cluster-node-timeout`: a primary not answering this long is failed over.
    pub node_timeout: Duration,
    /// Set when engine agents run the nodes on several hosts: the pool attaches to them
    /// (`dir`, `host`, `base_port` and `shards` then unused) and forms the cluster over them.
    pub agents: Option<AgentNodes>,
}

/// A cluster pool's nodes as engine agents run them (`shoal engine`, see
/// [`crate::ClusterMembers`]).
#[derive(Clone)]
pub struct AgentNodes {
    /// The pool's name: the agents derive its shared passwords from it.
    pub pool: String,
    /// Every node, on every host. Nodes with the same `host` address are on one machine:
    /// forming places each replica on another machine than its primary.
    pub nodes: Vec<NodeSpec>,
    pub node_secret: String,
}

impl std::fmt::Debug for AgentNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<String> =
            self.nodes.iter().map(|n| format!("{}@{}:{}", n.name, n.host, n.port)).collect();
        f.debug_struct("AgentNodes").field("pool", &self.pool).field("nodes", &nodes).finish_non_exhaustive()
    }
}

impl ClusterConfig {
    /// `cluster-databases` for a pool of `caches` caches of up to `per_cache` databases each,
    /// plus database 0 and the cron's anchors ([`crate::cron`]; the platform's, never a
    /// cache's). Empty databases cost next to
    /// nothing (100,000 take 3.3 MB), so size for the pool's capacity, not its use.
    pub fn databases_for(caches: u32, per_cache: u32) -> u32 {
        crate::cron::databases_for(caches.saturating_mul(per_cache.max(1)))
    }

    fn nodes(&self) -> usize {
        self.shards * (1 + self.replicas)
    }
}

/// A node's role in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
}

/// One node as the cluster and the engine see it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeStatus {
    /// The engine's name for it (`node-<n>`); `None` for a node the engine does not run.
    pub name: Option<String>,
    /// Valkey's node id.
    pub id: String,
    pub addr: String,
    pub role: Role,
    /// The cluster's view: `online`, `failed` or `loading`.
    pub health: String,
    /// The engine's own health check answered.
    pub healthy: bool,
    /// `used_memory` from `INFO memory`; `None` if the node did not answer.
    pub used_memory: Option<u64>,
    /// The modules it has loaded (`MODULE LIST`); `None` if it did not answer.
    pub modules: Option<Vec<ModuleInfo>>,
    /// What it tracks of keys' use (cluster nodes: recency).
    pub key_access: crate::KeyAccess,
    /// Which caches it holds (cluster nodes: shared).
    pub placement: crate::Placement,
}

/// One shard: a primary, its replicas and the slots it serves.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ShardStatus {
    /// Valkey's shard id (kept across failovers).
    pub id: String,
    /// Inclusive slot ranges.
    pub slots: Vec<(u16, u16)>,
    pub primary: Option<NodeStatus>,
    /// The other nodes: replicas, and a failed former primary until it is back as one.
    pub replicas: Vec<NodeStatus>,
}

impl ShardStatus {
    pub fn slot_count(&self) -> u32 {
        self.slots.iter().map(|(a, b)| u32::from(b - a) + 1).sum()
    }
}

/// The cluster's topology and state.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterStatus {
    /// `cluster_state:ok` on the node asked.
    pub ok: bool,
    pub shards: Vec<ShardStatus>,
}

/// A node of the pool and what the keeper last knew of it.
struct Member {
    node: Arc<Node>,
    index: u16,
    /// Valkey's node id when last seen; a different one means the node came back empty.
    id: String,
    /// Its shard's id when last seen.
    shard: String,
    /// The supervisor's restart counter when the keeper last reconciled it.
    restarts_seen: u32,
    /// A node an agent runs: its `run_id` when the keeper last reconciled it (a new one means
    /// the agent restarted it), empty until it first answered.
    run_id: String,
    /// A node an agent runs was unreachable since, or a node failed an ACL change: it may
    /// have missed ACL changes.
    missed: bool,
}

/// A running cluster pool.
pub struct Cluster {
    config: ClusterConfig,
    admin_password: String,
    observer_password: String,
    members: Mutex<Vec<Member>>,
    /// Every ACL user the pool set: name → the `ACL SETUSER` rule lists, in order.
    users: Mutex<BTreeMap<String, Vec<Vec<String>>>>,
    /// One topology change at a time (forming, joining a node, adding or removing a shard).
    topology: tokio::sync::Mutex<()>,
    /// `notify-keyspace-events` set last (empty: none), for nodes that join or missed it.
    keyspace_events: Mutex<String>,
    stopping: AtomicBool,
}

impl Cluster {
    /// Starts every node (or, run by engine agents, attaches to them); forms the cluster on
    /// first start, or waits for the one the nodes' `nodes.conf` describe; then starts the
    /// keeper.
    pub async fn start(config: ClusterConfig) -> Result<Arc<Cluster>, EngineError> {
        if config.agents.is_some() {
            return Cluster::attach(config).await;
        }
        for module in &config.modules {
            module.check()?;
        }
        let io = |source| EngineError::Io { node: "cluster".into(), source };
        std::fs::create_dir_all(&config.dir).map_err(io)?;
        crate::private::tighten(&config.dir).map_err(io)?;
        let secret = |name: &str| {
            let path = config.dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
                _ => {
                    let s = crate::node::random_secret();
                    write_private(&path, &s).map(|()| s)
                }
            }
        };
        let admin_password = secret("admin.secret").map_err(io)?;
        let observer_password = secret("observer.secret").map_err(io)?;
        let mut existing = existing_indexes(&config.dir).map_err(io)?;
        let fresh = existing.is_empty();
        if fresh {
            existing = (0..config.nodes() as u16).collect();
        }
        let cluster = Cluster::new(config, admin_password, observer_password);
        let started = async {
            let nodes = cluster.start_nodes(&existing).await?;
            if fresh {
                // Node i < S is shard i's primary; the replicas follow, R per shard in order.
                let (shards, replicas) = (cluster.config.shards.max(1), cluster.config.replicas.max(1));
                let layout: Vec<Option<usize>> = (0..nodes.len())
                    .map(|i| (i >= shards).then(|| (i - shards) / replicas % shards))
                    .collect();
                cluster.form(&nodes, &layout).await?;
            }
            for n in &nodes {
                wait_state_ok(n).await?;
            }
            for n in nodes {
                cluster.admit(n).await?;
            }
            cluster.seed_users().await.map(|()| fresh)
        };
        Arc::clone(&cluster).run(started).await
    }

    /// A cluster with no members admitted and no users known yet.
    fn new(config: ClusterConfig, admin_password: String, observer_password: String) -> Arc<Cluster> {
        Arc::new(Cluster {
            config,
            admin_password,
            observer_password,
            members: Mutex::new(Vec::new()),
            users: Mutex::new(BTreeMap::new()),
            topology: tokio::sync::Mutex::new(()),
            keyspace_events: Mutex::new(String::new()),
            stopping: AtomicBool::new(false),
        })
    }

    /// Attaches to the nodes engine agents run; forms the cluster if none of them serves
    /// slots yet (then every node must answer), else admits those that answer (the keeper
    /// admits the others when they do).
    async fn attach(config: ClusterConfig) -> Result<Arc<Cluster>, EngineError> {
        let agents = config.agents.clone().expect("attach: run by agents");
        let secrets = NodeSecrets::for_cluster(&agents.node_secret, &agents.pool);
        let maxmemory = match config.maxmemory_mb {
            Some(mb) => mb.saturating_mul(1_000_000),
            None => {
                return Err(EngineError::Config("a cluster run by engine agents needs maxmemory_mb".into()))
            }
        };
        let mode = ClusterMode { node_timeout: config.node_timeout };
        let nodes: Vec<Arc<Node>> = agents
            .nodes
            .iter()
            .map(|spec| {
                let node = Node::attach(
                    spec.clone(),
                    config.databases,
                    maxmemory,
                    config.script_time_limit,
                    &secrets,
                );
                Arc::new(node.into_cluster(mode.clone()))
            })
            .collect();
        let cluster = Cluster::new(config, secrets.admin, secrets.observer);
        let started = async {
            for n in &nodes {
                n.start().await?;
            }
            let fresh = !formed_already(&nodes).await?;
            if fresh {
                let hosts: Vec<&str> = nodes.iter().map(|n| n.spec.host.as_str()).collect();
                let layout = spread(&hosts, cluster.config.replicas).map_err(EngineError::Config)?;
                cluster.form(&nodes, &layout).await?;
                for n in &nodes {
                    wait_state_ok(n).await?;
                }
            }
            for (index, n) in nodes.iter().enumerate() {
                let admitted = if n.ping().await {
                    cluster.admit(Arc::clone(n)).await
                } else {
                    Err(EngineError::NotReady(n.name().to_string()))
                };
                if let Err(e) = admitted {
                    tracing::warn!(node = n.name(), error = %e, "cluster node not reachable: admitted when it is");
                    let member = Member {
                        node: Arc::clone(n),
                        index: index as u16,
                        id: String::new(),
                        shard: String::new(),
                        restarts_seen: 0,
                        run_id: String::new(),
                        missed: true,
                    };
                    cluster.members.lock().unwrap().push(member);
                }
            }
            cluster.seed_users().await.map(|()| fresh)
        };
        Arc::clone(&cluster).run(started).await
    }

    /// Waits for `started`; then starts the keeper and the script probe (or stops the nodes).
    async fn run(
        self: Arc<Self>,
        started: impl std::future::Future<Output = Result<bool, EngineError>>,
    ) -> Result<Arc<Cluster>, EngineError> {
        let began = Instant::now();
        let fresh = match started.await {
            Ok(fresh) => fresh,
            Err(e) => {
                self.stop().await;
                return Err(e);
            }
        };
        tracing::info!(fresh, elapsed = ?began.elapsed(), "valkey cluster ready");
        tokio::spawn(Arc::clone(&self).keep());
        tokio::spawn(Arc::clone(&self).probe_scripts());
        Ok(self)
    }

    /// Whether engine agents run the nodes (the pool only attaches to them).
    pub fn run_by_agents(&self) -> bool {
        self.config.agents.is_some()
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Every node of the pool, now.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.members.lock().unwrap().iter().map(|m| Arc::clone(&m.node)).collect()
    }

    pub fn node(&self, name: &str) -> Result<Arc<Node>, EngineError> {
        self.nodes()
            .into_iter()
            .find(|n| n.name() == name)
            .ok_or_else(|| EngineError::UnknownNode(name.into()))
    }

    /// Stops the keeper and every node.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _topology = self.topology.lock().await;
        for node in self.nodes() {
            node.stop().await;
        }
    }

    /// Prepares and starts nodes `node-<i>` (not yet in `members`).
    async fn start_nodes(&self, indexes: &[u16]) -> Result<Vec<Arc<Node>>, EngineError> {
        let c = &self.config;
        let maxmemory = match c.maxmemory_mb {
            Some(mb) => mb.saturating_mul(1_000_000),
            None => crate::node::default_maxmemory(c.nodes()),
        };
        let mut nodes: Vec<Arc<Node>> = Vec::new();
        for &i in indexes {
            let name = format!("node-{i}");
            let port = c.base_port.checked_add(i).filter(|p| *p <= 55535).ok_or_else(|| EngineError::Io {
                node: name.clone(),
                source: std::io::Error::other("port out of range"),
            })?;
            // The pool's shared secrets, before `prepare` reads them.
            let dir = c.dir.join(&name);
            let io = |source| EngineError::Io { node: name.clone(), source };
            std::fs::create_dir_all(&dir).map_err(io)?;
            write_private(&dir.join("admin.secret"), &self.admin_password).map_err(io)?;
            write_private(&dir.join("observer.secret"), &self.observer_password).map_err(io)?;
            let spec = NodeSpec::new(name, c.host.clone(), port);
            let node = Node::prepare(
                spec,
                &c.dir,
                c.valkey_server.clone(),
                c.databases,
                maxmemory,
                c.script_time_limit,
                None,
            )?
            .with_modules(c.modules.clone())
            .into_cluster(ClusterMode { node_timeout: c.node_timeout });
            let node = Arc::new(node);
            let started = node.start().await;
            if let Err(e) = started {
                for n in &nodes {
                    n.stop().await;
                }
                return Err(e);
            }
            nodes.push(node);
        }
        Ok(nodes)
    }

    /// First start: `layout[i]` is None for a primary (each gets an even share of the slots,
    /// in order) and the index of its primary for a replica.
    async fn form(&self, nodes: &[Arc<Node>], layout: &[Option<usize>]) -> Result<(), EngineError> {
        meet_all(&nodes[0], &nodes[1..]).await?;
        for n in nodes {
            wait_known(n, nodes.len()).await?;
        }
        let mut ids = Vec::new();
        for n in nodes {
            ids.push(my_id(n).await?);
        }
        let primaries: Vec<usize> = (0..nodes.len()).filter(|&i| layout[i].is_none()).collect();
        for (&p, (a, b)) in primaries.iter().zip(even_ranges(primaries.len())) {
            admin(&nodes[p], &["CLUSTER", "ADDSLOTSRANGE", &a.to_string(), &b.to_string()]).await?;
        }
        let replicas: Vec<(usize, usize)> =
            layout.iter().enumerate().filter_map(|(i, p)| Some((i, (*p)?))).collect();
        for &(r, p) in &replicas {
            replicate(&nodes[r], &ids[p]).await?;
        }
        for &(r, _) in &replicas {
            wait_synced(&nodes[r]).await?;
        }
        Ok(())
    }

    /// Adds a started node to `members` with its current ids.
    async fn admit(&self, node: Arc<Node>) -> Result<(), EngineError> {
        let id = my_id(&node).await?;
        let shard = admin(&node, &["CLUSTER", "MYSHARDID"]).await?;
        let run_id = if node.is_attached() { run_id(&node).await? } else { String::new() };
        let index = if node.is_attached() {
            self.members.lock().unwrap().len() as u16
        } else {
            node.name().trim_start_matches("node-").parse().unwrap_or(0)
        };
        let restarts_seen = node.restarts();
        let member = Member { node, index, id, shard, restarts_seen, run_id, missed: false };
        self.members.lock().unwrap().push(member);
        Ok(())
    }

    /// The users every node's ACL file holds, read from the first node that answers.
    async fn seed_users(&self) -> Result<(), EngineError> {
        let mut last = None;
        for node in self.nodes() {
            match acl_list(&node).await {
                Ok(list) => {
                    *self.users.lock().unwrap() =
                        list.into_iter().map(|(u, rules)| (u, vec![rules])).collect();
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(EngineError::NoHealthyNode))
    }

    // ---- tenants ----

    /// Makes a cache's database ready on every shard (flushed on each shard's primary: a
    /// previous owner's data never shows), then its ACL user on every node (see
    /// [`crate::Pool::create_tenant`]). During a failover it waits, up to
    /// [`Cluster::failover_wait`], for every shard to have a reachable primary again; past
    /// that it fails with [`EngineError::NoPrimary`] and the user is not created.
    pub async fn create_tenant(&self, acl: &crate::TenantAcl) -> Result<(), EngineError> {
        self.flush_everywhere(acl).await?;
        let rules = acl.setuser_rules();
        self.record(&acl.user, Some(rules.clone()), true);
        for node in self.nodes() {
            let mut pipe = redis::pipe();
            pipe.cmd("ACL").arg("SETUSER").arg(&acl.user).arg(&rules).ignore();
            self.change_users(&node, &pipe, &[(&acl.user, Some(rules.clone()))]).await?;
        }
        Ok(())
    }

    /// Deletes a cache's ACL user on every node (Valkey closes its connections), then flushes
    /// its databases on every shard's primary. Waits for a failover like
    /// [`Cluster::create_tenant`]; when no shard lacks a primary at the start, nothing is
    /// changed before it fails.
    pub async fn delete_tenant(&self, acl: &crate::TenantAcl) -> Result<(), EngineError> {
        self.reachable_primaries(Instant::now() + self.failover_wait()).await?;
        self.record(&acl.user, None, true);
        for node in self.nodes() {
            let mut pipe = redis::pipe();
            pipe.cmd("ACL").arg("DELUSER").arg(&acl.user).ignore();
            self.change_users(&node, &pipe, &[(&acl.user, None)]).await?;
        }
        self.flush_everywhere(acl).await
    }

    /// How long a tenant operation waits for a shard to have a reachable primary again: the
    /// time a failover takes (see [`crate::node::ClusterMode::restart_delay`]) and a second.
    pub fn failover_wait(&self) -> Duration {
        ClusterMode { node_timeout: self.config.node_timeout }.restart_delay() + Duration::from_secs(1)
    }

    /// Flushes a cache's databases on the primary of every shard that serves slots, each
    /// flush waited for on the shard's replicas (`WAIT`); then reads the topology again and
    /// flushes any shard whose primary changed meanwhile (a primary that died before its
    /// replica had the flush), until two readings agree.
    async fn flush_everywhere(&self, acl: &crate::TenantAcl) -> Result<(), EngineError> {
        let deadline = Instant::now() + self.failover_wait();
        // Shard id → the node id of the primary flushed there.
        let mut flushed: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let primaries = self.reachable_primaries(deadline).await?;
            let todo: Vec<&ShardPrimary> =
                primaries.iter().filter(|p| flushed.get(&p.shard) != Some(&p.id)).collect();
            match todo.first() {
                None => return Ok(()),
                // The primaries keep changing.
                Some(p) if Instant::now() > deadline => return Err(EngineError::NoPrimary(p.shard.clone())),
                Some(_) => {}
            }
            for p in todo {
                match flush_dbs(&p.node, acl, p.replicas).await {
                    Ok(acked) => {
                        if acked < p.replicas {
                            tracing::warn!(
                                node = p.node.name(),
                                acked,
                                replicas = p.replicas,
                                "flush not yet on every replica (they get it from the replication stream)"
                            );
                        }
                        flushed.insert(p.shard.clone(), p.id.clone());
                    }
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(e) => {
                        tracing::warn!(node = p.node.name(), error = %e, "flush failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }

    /// The primary of every shard that serves slots, each answering and saying it is a
    /// primary; retried until `deadline` while a shard has none (a primary just died and its
    /// replica is not promoted yet, or the cluster's view is behind).
    async fn reachable_primaries(&self, deadline: Instant) -> Result<Vec<ShardPrimary>, EngineError> {
        loop {
            let missing = match self.shards().await {
                Ok((_, shards)) => {
                    let mut out = Vec::new();
                    let mut missing = None;
                    for shard in shards.iter().filter(|s| !s.slots.is_empty()) {
                        match self.serving_primary(shard).await {
                            Some(p) => out.push(p),
                            None => {
                                missing = Some(shard.id.clone());
                                break;
                            }
                        }
                    }
                    match missing {
                        None => return Ok(out),
                        Some(shard) => shard,
                    }
                }
                Err(e) => format!("(no topology: {e})"),
            };
            if Instant::now() > deadline {
                return Err(EngineError::NoPrimary(missing));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The shard's primary if it is one of ours, running, answering, and a primary by its own
    /// account.
    async fn serving_primary(&self, shard: &Shard) -> Option<ShardPrimary> {
        let id = shard.primary_id()?;
        let node = self.member_by_id(&id).ok()?;
        if !node.may_run() || !node.ping().await {
            return None;
        }
        let role =
            tokio::time::timeout(Duration::from_secs(1), admin_value(&node, &["ROLE"])).await.ok()?.ok()?;
        if items(&role).first().map(text).as_deref() != Some("master") {
            return None;
        }
        let replicas = shard.nodes.iter().filter(|n| n.role == Role::Replica && n.health == "online").count();
        Some(ShardPrimary { shard: shard.id.clone(), id, node, replicas })
    }

    /// `ACL SETUSER user rules` on every node (saved with each node's next ACL save).
    pub async fn set_user(&self, user: &str, rules: &[String]) -> Result<bool, EngineError> {
        let reset = rules.first().is_some_and(|r| r == "reset");
        // A user set again exactly as it is (a scope reused) changes nothing: no node is
        // asked, no ACL file rewritten (the keeper makes nodes match the record).
        let unchanged = reset
            && self.users.lock().unwrap().get(user).is_some_and(|set| set.len() == 1 && set[0] == rules);
        if unchanged {
            return Ok(false);
        }
        self.record(user, Some(rules.to_vec()), reset);
        let whole = self.recorded_rules(user);
        let off = rules.iter().rev().find(|r| *r == "on" || *r == "off").is_some_and(|r| r == "off");
        for node in self.nodes() {
            let mut pipe = redis::pipe();
            pipe.cmd("ACL").arg("SETUSER").arg(user).arg(rules).ignore();
            self.change_users(&node, &pipe, &[(user, whole.clone())]).await?;
            if off && node.healthy() {
                // Errors when nobody was connected.
                let _ = admin(&node, &["CLIENT", "KILL", "USER", user]).await;
            }
        }
        Ok(true)
    }

    /// `ACL DELUSER users` on every node (saved with each node's next ACL save).
    pub async fn delete_users(&self, users: &[String]) -> Result<(), EngineError> {
        for u in users {
            self.record(u, None, true);
        }
        let changes: Vec<(&str, UserChange)> = users.iter().map(|u| (u.as_str(), None)).collect();
        for node in self.nodes() {
            let mut pipe = redis::pipe();
            pipe.cmd("ACL").arg("DELUSER").arg(users).ignore();
            self.change_users(&node, &pipe, &changes).await?;
        }
        Ok(())
    }

    /// Sets `notify-keyspace-events` on every node (a cache's keys, and so its events, are on
    /// every shard, and a replica may be promoted). A node that does not answer gets them when
    /// the keeper brings it up to date; the others are set anyway and the first error is
    /// returned.
    pub async fn set_keyspace_events(&self, flags: &str) -> Result<(), EngineError> {
        *self.keyspace_events.lock().unwrap() = flags.to_string();
        let mut first_error = None;
        for n in self.nodes() {
            // An agent's node out of reach would be waited for: the keeper sets them later.
            if n.is_attached() && !n.healthy() {
                self.member_mut(&n, |m| m.missed = true);
                continue;
            }
            if let Err(e) = n.set_keyspace_events(flags).await {
                self.member_mut(&n, |m| m.missed = true);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Those of `candidates` that are among the pool's ACL users.
    pub fn existing_users(&self, candidates: &[String]) -> Vec<String> {
        let users = self.users.lock().unwrap();
        candidates.iter().filter(|u| users.contains_key(u.as_str())).cloned().collect()
    }

    /// Names of the pool's ACL users that start with `prefix`.
    pub fn users_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.users.lock().unwrap().keys().filter(|u| u.starts_with(prefix)).cloned().collect()
    }

    /// Notes a change in the source of truth: `rules` set (replacing what was there when
    /// `replace`), or the user deleted (`None`).
    fn record(&self, user: &str, rules: Option<Vec<String>>, replace: bool) {
        let mut users = self.users.lock().unwrap();
        match rules {
            None => {
                users.remove(user);
            }
            Some(rules) => {
                let entry = users.entry(user.to_string()).or_default();
                if replace {
                    entry.clear();
                }
                entry.push(rules);
            }
        }
    }

    /// A recorded user's rules as one `ACL SETUSER`: `reset`, then each batch in turn.
    fn recorded_rules(&self, user: &str) -> UserChange {
        let users = self.users.lock().unwrap();
        let batches = users.get(user)?;
        Some(std::iter::once("reset".to_string()).chain(batches.iter().flatten().cloned()).collect())
    }

    /// Runs `pipe` (ACL user changes) on a node and notes `changes` for its next ACL save
    /// ([`crate::acl_save`]); a node that is down gets them from the keeper or the replay.
    async fn change_users(
        &self,
        node: &Node,
        pipe: &redis::Pipeline,
        changes: &[(&str, UserChange)],
    ) -> Result<(), EngineError> {
        let _changing = node.changing_users().await;
        if let Err(e) = self.provision(node, pipe).await {
            // The record has the change already: the keeper makes the node match it (a user
            // deleted from the record is found on no node by the token sweep any more).
            self.member_mut(node, |m| m.missed = true);
            return Err(e);
        }
        for (user, change) in changes {
            node.note_user(user, change.clone());
        }
        Ok(())
    }

    /// Brings a node up to date: its ACL users made those of the record (every recorded user
    /// remade, every other user but the platform's deleted), then the observer user, `ACL
    /// SAVE`, and the keyspace events set last.
    async fn reconcile(&self, node: &Node) -> Result<(), EngineError> {
        let mut conn = admin_conn(node).await?;
        let present: Vec<String> =
            redis::cmd("ACL").arg("USERS").query_async(&mut conn).await.map_err(|e| node.valkey_err(e))?;
        let users = self.users.lock().unwrap().clone();
        let mut pipe = redis::pipe();
        for u in present.iter().filter(|u| !is_platform_user(u) && !users.contains_key(*u)) {
            pipe.cmd("ACL").arg("DELUSER").arg(u).ignore();
        }
        for (user, batches) in &users {
            pipe.cmd("ACL").arg("SETUSER").arg(user).arg("reset").ignore();
            for rules in batches {
                pipe.cmd("ACL").arg("SETUSER").arg(user).arg(rules).ignore();
            }
        }
        pipe.cmd("ACL").arg("SAVE").ignore();
        pipe.query_async::<()>(&mut conn).await.map_err(|e| node.valkey_err(e))?;
        node.ensure_observer().await?;
        let flags = self.keyspace_events.lock().unwrap().clone();
        if flags.is_empty() {
            return Ok(());
        }
        node.set_keyspace_events(&flags).await
    }

    // ---- topology ----

    /// Shards, slots, nodes, roles, memory and health, as a healthy node sees them.
    pub async fn status(&self) -> Result<ClusterStatus, EngineError> {
        let (asked, shards) = self.shards().await?;
        let ok = cluster_info(&asked).await.map(|i| i.contains("cluster_state:ok")).unwrap_or(false);
        let members: Vec<(String, Arc<Node>)> =
            self.members.lock().unwrap().iter().map(|m| (m.id.clone(), Arc::clone(&m.node))).collect();
        let mut out = Vec::new();
        for shard in shards {
            let mut primary = None;
            let mut replicas = Vec::new();
            for n in shard.nodes {
                // By Valkey's id; by port for a node not admitted yet (by address, too, when
                // agents on several hosts run them).
                let ours = members.iter().find(|(id, _)| *id == n.id).or_else(|| {
                    members
                        .iter()
                        .find(|(_, x)| x.spec.port == n.port && (!x.is_attached() || x.spec.host == n.ip))
                });
                let ours = ours.map(|(_, node)| node);
                // Not asked of a node failing its health checks: during an outage the answer
                // would wait for the timeout, once per such node.
                let (used_memory, modules) = match ours {
                    Some(node) if node.healthy() => (used_memory(node).await, node.loaded_modules().await),
                    _ => (None, None),
                };
                let status = NodeStatus {
                    name: ours.map(|x| x.name().to_string()),
                    id: n.id,
                    addr: format!("{}:{}", n.ip, n.port),
                    role: n.role,
                    health: n.health,
                    healthy: ours.is_some_and(|x| x.healthy()),
                    used_memory,
                    modules,
                    key_access: crate::KeyAccess::Recency,
                    placement: crate::Placement::Shared,
                };
                // A failed former primary stays listed as a primary until it is back as a
                // replica: the online primary is the shard's.
                let online_primary =
                    |p: &Option<NodeStatus>| p.as_ref().is_some_and(|p| p.health == "online");
                if n.role == Role::Primary && !online_primary(&primary) {
                    replicas.extend(primary.replace(status));
                } else {
                    replicas.push(status);
                }
            }
            out.push(ShardStatus { id: shard.id, slots: shard.slots, primary, replicas });
        }
        out.sort_by_key(|s| s.slots.first().copied().unwrap_or((SLOTS, SLOTS)));
        Ok(ClusterStatus { ok, shards: out })
    }

    /// The current primary of every shard that serves slots, as the cluster sees it now (not
    /// waited for during a failover): where a cache's keys are, for sampling its storage and
    /// for a gateway's first connection.
    pub async fn primaries(&self) -> Result<Vec<Arc<Node>>, EngineError> {
        let (_, shards) = self.shards().await?;
        Ok(shards
            .iter()
            .filter(|s| !s.slots.is_empty())
            .filter_map(Shard::primary_id)
            .filter_map(|id| self.member_by_id(&id).ok())
            .collect())
    }

    /// Each serving shard's slot ranges and its current primary (see [`Cluster::primaries`]).
    pub async fn slot_owners(&self) -> Result<Vec<(Ranges, Arc<Node>)>, EngineError> {
        let (_, shards) = self.shards().await?;
        Ok(shards
            .iter()
            .filter(|s| !s.slots.is_empty())
            .filter_map(|s| Some((s.slots.clone(), self.member_by_id(&s.primary_id()?).ok()?)))
            .collect())
    }

    /// The observer user's password, the same on every node.
    pub fn observer_password(&self) -> &str {
        &self.observer_password
    }

    /// `CLUSTER SHARDS` from the first node that answers.
    async fn shards(&self) -> Result<(Arc<Node>, Vec<Shard>), EngineError> {
        let mut last = None;
        for node in self.nodes().into_iter().filter(|n| n.healthy()) {
            // A second each: a node just cut off still looks healthy until its next check.
            let asked =
                tokio::time::timeout(HEALTH_TIMEOUT, admin_value(&node, &["CLUSTER", "SHARDS"])).await;
            match asked.unwrap_or_else(|_| Err(EngineError::NotReady(node.name().to_string()))) {
                Ok(v) => return Ok((node, parse_shards(&v))),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(EngineError::NoHealthyNode))
    }

    /// Adds a shard: a new primary and R replicas, given their ACL users before they join,
    /// then an even share of the slots moved onto it from the others. Returns its shard id.
    pub async fn add_shard(&self) -> Result<String, EngineError> {
        self.scalable()?;
        let _topology = self.topology.lock().await;
        let next = self.members.lock().unwrap().iter().map(|m| m.index + 1).max().unwrap_or(0);
        let indexes: Vec<u16> = (next..next + 1 + self.config.replicas as u16).collect();
        let nodes = self.start_nodes(&indexes).await?;
        let joined = async {
            for n in &nodes {
                self.reconcile(n).await?;
            }
            let anchor = self.healthy_member()?;
            meet_all(&anchor, &nodes).await?;
            let total = self.members.lock().unwrap().len() + nodes.len();
            // Every node, old ones included, must know the new ones before slots move to
            // them (a migration to an id the source has not heard of is refused).
            for n in nodes.iter().cloned().chain(self.nodes()) {
                wait_known(&n, total).await?;
            }
            // Knowing the nodes is not knowing their slots: a migration onto a node that has
            // not heard of every slot's owner yet fails ("Slot … has no node served").
            for n in &nodes {
                wait_state_ok(n).await?;
            }
            let primary_id = my_id(&nodes[0]).await?;
            for replica in &nodes[1..] {
                replicate(replica, &primary_id).await?;
            }
            for replica in &nodes[1..] {
                wait_synced(replica).await?;
            }
            Ok::<_, EngineError>(primary_id)
        };
        let primary_id = match joined.await {
            Ok(id) => id,
            Err(e) => {
                for n in &nodes {
                    n.stop().await;
                }
                return Err(e);
            }
        };
        for n in &nodes {
            self.admit(Arc::clone(n)).await?;
        }
        // Each shard keeps an even share; the new one gets the rest.
        let (_, shards) = self.shards().await?;
        let serving: Vec<&Shard> = shards.iter().filter(|s| !s.slots.is_empty()).collect();
        let share = u32::from(SLOTS) / (serving.len() as u32 + 1);
        let began = Instant::now();
        for shard in serving {
            let excess = shard_slot_count(shard).saturating_sub(share);
            if excess == 0 {
                continue;
            }
            let moving = take_last(&shard.slots, excess);
            let source = self.member_by_id(&shard.primary_id().unwrap_or_default())?;
            migrate(&source, &[(moving, primary_id.clone())]).await?;
        }
        for n in self.nodes() {
            wait_state_ok(&n).await?;
        }
        let shard = admin(&nodes[0], &["CLUSTER", "MYSHARDID"]).await?;
        tracing::info!(shard, elapsed = ?began.elapsed(), "shard added, slots moved onto it");
        Ok(shard)
    }

    /// Removes a shard: its slots moved to the others (spread evenly), then its nodes
    /// forgotten by the rest, stopped, and their folders deleted.
    pub async fn remove_shard(&self, shard_id: &str) -> Result<(), EngineError> {
        self.scalable()?;
        let _topology = self.topology.lock().await;
        let (_, shards) = self.shards().await?;
        let leaving = shards
            .iter()
            .find(|s| s.id == shard_id)
            .ok_or_else(|| EngineError::UnknownNode(format!("shard {shard_id}")))?;
        let others: Vec<&Shard> =
            shards.iter().filter(|s| s.id != shard_id && s.primary_id().is_some()).collect();
        if others.is_empty() {
            return Err(EngineError::UnknownNode(format!("shard {shard_id} is the last one")));
        }
        let began = Instant::now();
        if !leaving.slots.is_empty() {
            let source = self.member_by_id(&leaving.primary_id().unwrap_or_default())?;
            let all = leaving.slots.clone();
            let count = shard_slot_count(leaving);
            let mut jobs = Vec::new();
            let mut rest = all;
            for (k, other) in others.iter().enumerate() {
                let part = count / others.len() as u32 + u32::from((k as u32) < count % others.len() as u32);
                let (taken, left) = split_first(&rest, part);
                rest = left;
                if !taken.is_empty() {
                    jobs.push((taken, other.primary_id().unwrap_or_default()));
                }
            }
            migrate(&source, &jobs).await?;
        }
        let leaving_ids: Vec<String> = leaving.nodes.iter().map(|n| n.id.clone()).collect();
        let (gone, staying): (Vec<Member>, Vec<Member>) = std::mem::take(&mut *self.members.lock().unwrap())
            .into_iter()
            .partition(|m| leaving_ids.contains(&m.id));
        *self.members.lock().unwrap() = staying;
        // Forgotten before they stop: a gateway that finds one gone then reads a map without
        // it, and knows that what it had sent there was never run (it owned no slot).
        for node in self.nodes() {
            for id in &leaving_ids {
                if let Err(e) = admin(&node, &["CLUSTER", "FORGET", id]).await {
                    tracing::warn!(node = node.name(), error = %e, "CLUSTER FORGET failed");
                }
            }
        }
        for m in &gone {
            m.node.stop().await;
            let _ = std::fs::remove_dir_all(&m.node.dir);
        }
        for n in self.nodes() {
            wait_state_ok(&n).await?;
        }
        tracing::info!(shard = shard_id, elapsed = ?began.elapsed(), "shard drained and removed");
        Ok(())
    }

    /// Scaling starts and stops nodes: not yet where engine agents run them.
    fn scalable(&self) -> Result<(), EngineError> {
        if self.run_by_agents() {
            return Err(EngineError::Config(SCALING_UNDER_AGENTS.into()));
        }
        Ok(())
    }

    fn healthy_member(&self) -> Result<Arc<Node>, EngineError> {
        self.nodes().into_iter().find(|n| n.healthy()).ok_or(EngineError::NoHealthyNode)
    }

    fn member_by_id(&self, id: &str) -> Result<Arc<Node>, EngineError> {
        let members = self.members.lock().unwrap();
        members
            .iter()
            .find(|m| m.id == id)
            .map(|m| Arc::clone(&m.node))
            .ok_or_else(|| EngineError::UnknownNode(format!("node id {id}")))
    }

    // ---- the keeper ----

    /// Every [`KEEPER_INTERVAL`]: a node that restarted (or, run by an agent, was out of
    /// reach) gets its ACL users reconciled, and rejoins the cluster if it came back empty.
    async fn keep(self: Arc<Self>) {
        let mut last_balance = Instant::now();
        while !self.stopping.load(Ordering::SeqCst) {
            tokio::time::sleep(KEEPER_INTERVAL).await;
            if self.run_by_agents() && last_balance.elapsed() >= BALANCE_INTERVAL {
                last_balance = Instant::now();
                let _topology = self.topology.lock().await;
                if let Err(e) = self.balance_primaries().await {
                    tracing::warn!(error = %e, "primaries not spread over the hosts yet");
                }
            }
            for (node, restarts, run_id) in self.due().await {
                if self.stopping.load(Ordering::SeqCst) || !node.ping().await {
                    continue;
                }
                let _topology = self.topology.lock().await;
                match self.rejoin(&node).await {
                    Ok(()) => {
                        self.member_mut(&node, |m| {
                            (m.restarts_seen, m.run_id, m.missed) = (restarts, run_id, false)
                        });
                    }
                    Err(e) => {
                        tracing::warn!(node = node.name(), error = %e, "restarted node not rejoined yet")
                    }
                }
            }
        }
    }

    /// Spreads the primaries over the hosts again (a cluster run by agents on several). A
    /// failover leaves the promoted replica's host with two primaries; a host with most of
    /// them would take the cluster down with it (promoting a replica takes the votes of most
    /// primaries). When every node is online and a host has two primaries more than one with
    /// an in-sync replica of one of them, that replica takes over (`CLUSTER FAILOVER`, Valkey's
    /// graceful failover: nothing acknowledged is lost). One move per call.
    async fn balance_primaries(&self) -> Result<(), EngineError> {
        let (_, shards) = self.shards().await?;
        let nodes = || shards.iter().flat_map(|s| &s.nodes);
        if nodes().any(|n| n.health != "online") {
            return Ok(());
        }
        let mut primaries: BTreeMap<&str, usize> = nodes().map(|n| (n.ip.as_str(), 0)).collect();
        let serving: Vec<(&Shard, &ShardNode)> = shards
            .iter()
            .filter(|s| !s.slots.is_empty())
            .filter_map(|s| Some((s, s.nodes.iter().find(|n| Some(&n.id) == s.primary_id().as_ref())?)))
            .collect();
        for (_, p) in &serving {
            *primaries.entry(p.ip.as_str()).or_default() += 1;
        }
        for (shard, p) in serving {
            let candidates = shard.nodes.iter().filter(|r| {
                r.role == Role::Replica && primaries[r.ip.as_str()] + 2 <= primaries[p.ip.as_str()]
            });
            for r in candidates {
                let Ok(replica) = self.member_by_id(&r.id) else { continue };
                if !replica.healthy() || !linked(&replica).await {
                    continue;
                }
                tracing::info!(
                    node = replica.name(),
                    from = p.ip,
                    to = r.ip,
                    "moving a primary to a host with fewer"
                );
                return self.fail_over_to(&replica).await;
            }
        }
        Ok(())
    }

    /// The nodes to bring up to date, with the restart count and `run_id` they have now: those
    /// the supervisor restarted or that failed an ACL change; of those an agent runs (which
    /// restarts them unseen), those that answer with another `run_id`, or again after they
    /// were out of reach.
    async fn due(&self) -> Vec<(Arc<Node>, u32, String)> {
        let members: Vec<(Arc<Node>, u32, String, bool)> = self
            .members
            .lock()
            .unwrap()
            .iter()
            .map(|m| (Arc::clone(&m.node), m.restarts_seen, m.run_id.clone(), m.missed))
            .collect();
        let mut out = Vec::new();
        for (node, restarts_seen, run_id_seen, missed) in members {
            if !node.is_attached() {
                if node.restarts() != restarts_seen || missed {
                    out.push((Arc::clone(&node), node.restarts(), String::new()));
                }
                continue;
            }
            if !node.healthy() {
                self.member_mut(&node, |m| m.missed = true);
                continue;
            }
            let Ok(Ok(now)) = tokio::time::timeout(Duration::from_secs(1), run_id(&node)).await else {
                continue;
            };
            if missed || now != run_id_seen {
                out.push((node, 0, now));
            }
        }
        out
    }

    /// Applies `change` to `node`'s member entry, if it still has one.
    fn member_mut(&self, node: &Node, change: impl FnOnce(&mut Member)) -> Option<()> {
        let mut members = self.members.lock().unwrap();
        members.iter_mut().find(|m| m.node.name() == node.name()).map(change)
    }

    /// After a restart: ACL users first (before the node serves), then, for a node that came
    /// back empty, its place in the cluster again.
    async fn rejoin(&self, node: &Arc<Node>) -> Result<(), EngineError> {
        self.reconcile(node).await?;
        let id = my_id(node).await?;
        let (old_id, shard) = {
            let members = self.members.lock().unwrap();
            let m = members.iter().find(|m| m.node.name() == node.name()).expect("member");
            (m.id.clone(), m.shard.clone())
        };
        if id == old_id {
            tracing::info!(node = node.name(), "restarted node rejoined; ACL users reconciled");
            return Ok(());
        }
        // First seen now (it did not answer when this process started): a member already if
        // the others know its id.
        let others: Vec<Arc<Node>> = self.nodes().into_iter().filter(|n| n.name() != node.name()).collect();
        let anchor = others.iter().find(|n| n.healthy()).ok_or(EngineError::NoHealthyNode)?;
        if old_id.is_empty() && admin(anchor, &["CLUSTER", "NODES"]).await?.contains(&id) {
            let shard = admin(node, &["CLUSTER", "MYSHARDID"]).await?;
            tracing::info!(node = node.name(), "cluster node reachable: admitted; ACL users reconciled");
            self.member_mut(node, |m| (m.id, m.shard) = (id, shard));
            return Ok(());
        }
        tracing::warn!(
            node = node.name(),
            old_id,
            id,
            "node came back empty: adding it to the cluster again"
        );
        for other in others.iter().filter(|_| !old_id.is_empty()) {
            // Unknown already (forgotten on an earlier try) is fine.
            let _ = admin(other, &["CLUSTER", "FORGET", &old_id]).await;
        }
        meet_all(anchor, std::slice::from_ref(node)).await?;
        wait_known(node, others.len() + 1).await?;
        let (_, shards) = self.shards().await?;
        // Its own shard again; one it never had (its id unknown since this process started):
        // the serving shard with the fewest replicas whose primary is on another host.
        let primary = match shards.iter().find(|s| s.id == shard) {
            Some(s) => s.primary_id(),
            None => shards
                .iter()
                .filter(|s| !s.slots.is_empty())
                .filter(|s| {
                    let primary = s.primary_id();
                    !s.nodes.iter().any(|n| Some(&n.id) == primary.as_ref() && n.ip == node.spec.host)
                })
                .min_by_key(|s| s.nodes.iter().filter(|n| n.role == Role::Replica).count())
                .and_then(Shard::primary_id),
        }
        .ok_or_else(|| EngineError::UnknownNode(format!("primary of shard {shard}")))?;
        replicate(node, &primary).await?;
        wait_synced(node).await?;
        let shard = admin(node, &["CLUSTER", "MYSHARDID"]).await?;
        tracing::info!(node = node.name(), shard, "empty node rejoined as a replica");
        self.member_mut(node, |m| (m.id, m.shard) = (id, shard));
        Ok(())
    }
}

fn is_platform_user(user: &str) -> bool {
    user == "default" || user == ADMIN_USER || user == OBSERVER_USER
}

impl Cluster {
    /// Runs a provisioning pipeline on `node`, or skips it when it is down. An agent's node
    /// failing its health checks (its host cut off, say) is skipped at once rather than
    /// waited for; the keeper brings it up to date when it answers again.
    async fn provision(&self, node: &Node, pipe: &redis::Pipeline) -> Result<(), EngineError> {
        if node.is_attached() && !node.healthy() {
            tracing::warn!(node = node.name(), "node unreachable: its ACL users follow when it is back");
            self.member_mut(node, |m| m.missed = true);
            return Ok(());
        }
        self.skip_if_down(node, node.provision(pipe).await).await
    }

    /// A failure on a node that is down is not the caller's: the keeper brings the node up to
    /// date when it is back. A node that answers and refuses is.
    async fn skip_if_down(&self, node: &Node, result: Result<(), EngineError>) -> Result<(), EngineError> {
        match result {
            Err(e) if !node.may_run() || !node.ping().await => {
                tracing::warn!(node = node.name(), error = %e, "node down: its ACL users follow when it is back");
                self.member_mut(node, |m| m.missed = true);
                Ok(())
            }
            other => other,
        }
    }
}

/// Whether any of `nodes` (run by agents) serves slots: the cluster was formed before. Waits
/// (up to [`TOPOLOGY_TIMEOUT`]) while none does and some do not answer: forming needs all.
async fn formed_already(nodes: &[Arc<Node>]) -> Result<bool, EngineError> {
    let deadline = Instant::now() + TOPOLOGY_TIMEOUT;
    loop {
        let mut silent = Vec::new();
        for n in nodes {
            match tokio::time::timeout(Duration::from_secs(2), cluster_info(n)).await {
                Ok(Ok(info)) if info_field(&info, "cluster_slots_assigned").unwrap_or(0) > 0 => {
                    return Ok(true)
                }
                Ok(Ok(_)) => {}
                _ => silent.push(format!("{} at {}", n.name(), n.addr())),
            }
        }
        if silent.is_empty() {
            return Ok(false);
        }
        if Instant::now() > deadline {
            return Err(EngineError::Config(format!(
                "forming the cluster needs every node, and these do not answer (is their engine agent \
                 running, with this cluster's nodes and the same node secret?): {}",
                silent.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Which node replicates which, for nodes on `hosts` (a node's host address each) with
/// `replicas` replicas per shard: None for a primary, else its primary's index. Primaries are
/// taken in turn from each host; every replica is on another host than its primary, so losing
/// one host leaves every shard a copy. Err when that cannot be.
fn spread(hosts: &[&str], replicas: usize) -> Result<Vec<Option<usize>>, String> {
    let per_shard = 1 + replicas;
    if hosts.is_empty() || !hosts.len().is_multiple_of(per_shard) {
        return Err(format!(
            "{} nodes cannot make shards of a primary and {replicas} replicas each",
            hosts.len()
        ));
    }
    let shards = hosts.len() / per_shard;
    // Round robin over the hosts: h1's first node, h2's first, …, h1's second, …
    let mut by_host: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        match by_host.iter_mut().find(|(x, _)| x == h) {
            Some((_, nodes)) => nodes.push(i),
            None => by_host.push((h, vec![i])),
        }
    }
    let order: Vec<usize> =
        (0..hosts.len()).flat_map(|k| by_host.iter().filter_map(move |(_, n)| n.get(k).copied())).collect();
    let (primaries, others) = order.split_at(shards);
    // Replicas matched to primaries' seats (`replicas` each) on other hosts: Kuhn's
    // augmenting paths, so a greedy first choice never blocks a later replica.
    let seats: Vec<usize> = primaries.iter().flat_map(|&p| std::iter::repeat_n(p, replicas)).collect();
    let mut taken: Vec<Option<usize>> = vec![None; seats.len()];
    fn place(
        r: usize,
        hosts: &[&str],
        seats: &[usize],
        taken: &mut [Option<usize>],
        tried: &mut [bool],
    ) -> bool {
        for s in 0..seats.len() {
            if tried[s] || hosts[seats[s]] == hosts[r] {
                continue;
            }
            tried[s] = true;
            if taken[s].is_none_or(|other| place(other, hosts, seats, taken, tried)) {
                taken[s] = Some(r);
                return true;
            }
        }
        false
    }
    for &r in others {
        if !place(r, hosts, &seats, &mut taken, &mut vec![false; seats.len()]) {
            return Err(format!(
                "the nodes' hosts cannot give every replica another host than its primary \
                 ({shards} shards over hosts {:?}): add nodes on other hosts",
                by_host.iter().map(|(h, n)| format!("{h} ({} nodes)", n.len())).collect::<Vec<_>>()
            ));
        }
    }
    let mut layout = vec![None; hosts.len()];
    for (s, r) in taken.iter().enumerate() {
        layout[r.expect("every seat taken")] = Some(seats[s]);
    }
    Ok(layout)
}

/// Whether a replica's link to its primary is up.
async fn linked(node: &Node) -> bool {
    let info = tokio::time::timeout(Duration::from_secs(1), admin(node, &["INFO", "replication"])).await;
    info.is_ok_and(|i| i.is_ok_and(|i| i.contains("master_link_status:up")))
}

/// `run_id` from `INFO server`: a new one each time the process starts.
async fn run_id(node: &Node) -> Result<String, EngineError> {
    let info = admin(node, &["INFO", "server"]).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| EngineError::NotReady(node.name().to_string()))
}

/// `node-<n>` folders under the pool's folder.
fn existing_indexes(dir: &std::path::Path) -> std::io::Result<Vec<u16>> {
    let mut out: Vec<u16> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("nodes.conf").exists())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("node-")?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    std::io::Write::write_all(&mut f, contents.as_bytes())
}

/// Inclusive slot ranges.
pub type Ranges = Vec<(u16, u16)>;

/// `shards` even, contiguous slot ranges covering every slot.
fn even_ranges(shards: usize) -> Vec<(u16, u16)> {
    let n = shards.max(1) as u32;
    let total = u32::from(SLOTS);
    (0..n).map(|i| ((total * i / n) as u16, (total * (i + 1) / n - 1) as u16)).collect()
}

/// The last `count` slots of `ranges` (sorted), as ranges.
fn take_last(ranges: &[(u16, u16)], count: u32) -> Vec<(u16, u16)> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let mut out = Vec::new();
    let mut left = count;
    for &(a, b) in sorted.iter().rev() {
        if left == 0 {
            break;
        }
        let len = u32::from(b - a) + 1;
        let take = len.min(left);
        out.push((b - (take - 1) as u16, b));
        left -= take;
    }
    out.reverse();
    out
}

/// The first `count` slots of `ranges` (sorted), and the rest.
fn split_first(ranges: &[(u16, u16)], count: u32) -> (Ranges, Ranges) {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let (mut taken, mut rest) = (Vec::new(), Vec::new());
    let mut left = count;
    for (a, b) in sorted {
        let len = u32::from(b - a) + 1;
        if left >= len {
            taken.push((a, b));
            left -= len;
        } else if left > 0 {
            taken.push((a, a + (left - 1) as u16));
            rest.push((a + left as u16, b));
            left = 0;
        } else {
            rest.push((a, b));
        }
    }
    (taken, rest)
}

/// A shard's primary, found answering.
struct ShardPrimary {
    shard: String,
    /// Valkey's node id.
    id: String,
    node: Arc<Node>,
    /// Replicas the cluster sees online.
    replicas: usize,
}

/// `FLUSHDB SYNC` of a cache's databases on a primary, then `WAIT` (up to a second) for its
/// `replicas`, on the same connection (WAIT counts that connection's writes); how many
/// replicas acknowledged.
async fn flush_dbs(node: &Node, acl: &crate::TenantAcl, replicas: usize) -> Result<usize, EngineError> {
    let mut conn = admin_conn(node).await?;
    let mut pipe = redis::pipe();
    for db in acl.db..acl.db + acl.databases.max(1) {
        pipe.cmd("SELECT").arg(db).ignore().cmd("FLUSHDB").arg("SYNC").ignore();
    }
    pipe.cmd("SELECT").arg(0).ignore();
    pipe.cmd("WAIT").arg(replicas).arg(1000);
    let answered =
        tokio::time::timeout(Duration::from_secs(10), pipe.query_async::<(usize,)>(&mut conn)).await;
    match answered {
        Ok(r) => r.map(|(acked,)| acked).map_err(|e| node.valkey_err(e)),
        Err(_) => Err(EngineError::NotReady(node.name().to_string())),
    }
}

// ---- what the nodes say ----

struct Shard {
    id: String,
    slots: Vec<(u16, u16)>,
    nodes: Vec<ShardNode>,
}

impl Shard {
    /// The online primary; else any. Right after a failover the dead primary is still
    /// listed as a primary of the shard (failed, without slots) next to the promoted one.
    fn primary_id(&self) -> Option<String> {
        let primaries = || self.nodes.iter().filter(|n| n.role == Role::Primary);
        primaries().find(|n| n.health == "online").or_else(|| primaries().next()).map(|n| n.id.clone())
    }
}

fn shard_slot_count(shard: &Shard) -> u32 {
    shard.slots.iter().map(|(a, b)| u32::from(b - a) + 1).sum()
}

struct ShardNode {
    id: String,
    ip: String,
    port: u16,
    role: Role,
    health: String,
}

/// A RESP2 flat key/value array or a RESP3 map, as pairs.
fn pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Map(m) => m.iter().map(|(k, v)| (text(k), v)).collect(),
        Value::Array(a) => a.chunks(2).filter(|c| c.len() == 2).map(|c| (text(&c[0]), &c[1])).collect(),
        _ => Vec::new(),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::VerbatimString { text, .. } => text.clone(),
        _ => String::new(),
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) => a,
        _ => &[],
    }
}

fn parse_shards(v: &Value) -> Vec<Shard> {
    items(v)
        .iter()
        .map(|shard| {
            let mut out = Shard { id: String::new(), slots: Vec::new(), nodes: Vec::new() };
            for (key, value) in pairs(shard) {
                match key.as_str() {
                    "id" => out.id = text(value),
                    "slots" => {
                        let bounds: Vec<u16> =
                            items(value).iter().filter_map(|b| text(b).parse().ok()).collect();
                        out.slots = bounds.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0], c[1])).collect();
                    }
                    "nodes" => {
                        for node in items(value) {
                            let f: BTreeMap<String, String> =
                                pairs(node).into_iter().map(|(k, v)| (k, text(v))).collect();
                            let get = |k: &str| f.get(k).cloned().unwrap_or_default();
                            out.nodes.push(ShardNode {
                                id: get("id"),
                                ip: get("ip"),
                                port: get("port").parse().unwrap_or(0),
                                role: if get("role") == "master" { Role::Primary } else { Role::Replica },
                                health: get("health"),
                            });
                        }
                    }
                    _ => {}
                }
            }
            out
        })
        .collect()
}

/// One admin command; its reply as text.
async fn admin(node: &Node, args: &[&str]) -> Result<String, EngineError> {
    admin_value(node, args).await.map(|v| text(&v))
}

async fn admin_value(node: &Node, args: &[&str]) -> Result<Value, EngineError> {
    let mut conn = admin_conn(node).await?;
    let mut cmd = redis::cmd(args[0]);
    cmd.arg(&args[1..]);
    match tokio::time::timeout(Duration::from_secs(5), cmd.query_async::<Value>(&mut conn)).await {
        Ok(r) => r.map_err(|e| node.valkey_err(e)),
        Err(_) => Err(EngineError::NotReady(node.name().to_string())),
    }
}

async fn my_id(node: &Node) -> Result<String, EngineError> {
    admin(node, &["CLUSTER", "MYID"]).await
}

async fn cluster_info(node: &Node) -> Result<String, EngineError> {
    admin(node, &["CLUSTER", "INFO"]).await
}

fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
}

pub(crate) async fn used_memory(node: &Node) -> Option<u64> {
    let info =
        tokio::time::timeout(Duration::from_secs(1), admin(node, &["INFO", "memory"])).await.ok()?.ok()?;
    info_field(&info, "used_memory")
}

/// `ACL LIST` without the platform's users: name → rules (`reset` first).
async fn acl_list(node: &Node) -> Result<Vec<(String, Vec<String>)>, EngineError> {
    let mut conn = admin_conn(node).await?;
    let lines: Vec<String> =
        redis::cmd("ACL").arg("LIST").query_async(&mut conn).await.map_err(|e| node.valkey_err(e))?;
    Ok(lines
        .iter()
        .filter_map(|line| {
            let mut words = line.split(' ');
            (words.next()? == "user").then_some(())?;
            let name = words.next()?.to_string();
            let rules = std::iter::once("reset".to_string()).chain(words.map(str::to_string)).collect();
            (!is_platform_user(&name)).then_some((name, rules))
        })
        .collect())
}

/// `anchor` MEETs every node of `nodes`.
async fn meet_all(anchor: &Node, nodes: &[Arc<Node>]) -> Result<(), EngineError> {
    for n in nodes {
        admin(anchor, &["CLUSTER", "MEET", &n.spec.host, &n.spec.port.to_string()]).await?;
    }
    Ok(())
}

/// Polls until `check` holds, or [`TOPOLOGY_TIMEOUT`].
async fn poll<F, Fut>(node: &Node, mut check: F) -> Result<(), EngineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + TOPOLOGY_TIMEOUT;
    while !check().await {
        if Instant::now() > deadline {
            return Err(EngineError::NotReady(node.name().to_string()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Until the node knows `count` nodes (MEET spreads by gossip).
async fn wait_known(node: &Node, count: usize) -> Result<(), EngineError> {
    poll(node, || async {
        let info = cluster_info(node).await.unwrap_or_default();
        info_field(&info, "cluster_known_nodes").is_some_and(|k| k as usize >= count)
            && !admin(node, &["CLUSTER", "NODES"]).await.unwrap_or_default().contains("handshake")
    })
    .await
}

/// Until a replica has its primary's data (`master_link_status:up` after the first sync).
async fn wait_synced(node: &Node) -> Result<(), EngineError> {
    poll(node, || async {
        admin(node, &["INFO", "replication"]).await.is_ok_and(|i| i.contains("master_link_status:up"))
    })
    .await
}

async fn wait_state_ok(node: &Node) -> Result<(), EngineError> {
    poll(node, || async { cluster_info(node).await.is_ok_and(|i| i.contains("cluster_state:ok")) }).await
}

/// `CLUSTER REPLICATE primary`, retried for a few seconds: it is refused until gossip has
/// told the node about the primary.
async fn replicate(node: &Node, primary: &str) -> Result<String, EngineError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match admin(node, &["CLUSTER", "REPLICATE", primary]).await {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `CLUSTER MIGRATESLOTS` on `source` (the slots' primary): each job's ranges to its target
/// node id; waits until `CLUSTER GETSLOTMIGRATIONS` on the source shows every job finished.
async fn migrate(source: &Node, jobs: &[(Ranges, String)]) -> Result<(), EngineError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let mut args = vec!["CLUSTER".to_string(), "MIGRATESLOTS".to_string()];
    let mut expected = Vec::new();
    for (ranges, target) in jobs {
        args.push("SLOTSRANGE".into());
        for (a, b) in ranges {
            args.push(a.to_string());
            args.push(b.to_string());
        }
        args.push("NODE".into());
        args.push(target.clone());
        expected.push((ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect::<Vec<_>>().join(" "), target));
    }
    let began = Instant::now();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    admin(source, &argv).await?;
    let deadline = Instant::now() + TOPOLOGY_TIMEOUT;
    loop {
        let listed = admin_value(source, &["CLUSTER", "GETSLOTMIGRATIONS"]).await?;
        let entries: Vec<BTreeMap<String, String>> = items(&listed)
            .iter()
            .map(|e| pairs(e).into_iter().map(|(k, v)| (k, text(v))).collect())
            .collect();
        let mut done = 0;
        for (ranges, target) in &expected {
            // The newest entry for this job (the list keeps finished ones too).
            let entry = entries.iter().rev().find(|e| {
                e.get("operation").map(String::as_str) == Some("EXPORT")
                    && e.get("target_node") == Some(*target)
                    && e.get("slot_ranges") == Some(ranges)
            });
            match entry.and_then(|e| e.get("state")).map(String::as_str) {
                Some("success") => done += 1,
                Some(state @ ("failed" | "cancelled" | "canceled")) => {
                    let message = entry.and_then(|e| e.get("message")).cloned().unwrap_or_default();
                    return Err(EngineError::Io {
                        node: source.name().to_string(),
                        source: std::io::Error::other(format!("slot migration {ranges} {state}: {message}")),
                    });
                }
                _ => {}
            }
        }
        if done == expected.len() {
            break;
        }
        if Instant::now() > deadline {
            return Err(EngineError::NotReady(source.name().to_string()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(node = source.name(), jobs = jobs.len(), elapsed = ?began.elapsed(), "slots migrated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_go_to_another_host_than_their_primary() {
        let hosts = ["a", "a", "b", "b", "c", "c"];
        let layout = spread(&hosts, 1).unwrap();
        let primaries: Vec<usize> = (0..6).filter(|&i| layout[i].is_none()).collect();
        assert_eq!(primaries, [0, 2, 4], "one primary per host");
        for (r, p) in layout.iter().enumerate().filter_map(|(r, p)| Some((r, (*p)?))) {
            assert_ne!(hosts[r], hosts[p], "replica {r} of {p}");
        }
        let mut replicated: Vec<usize> = layout.iter().flatten().copied().collect();
        replicated.sort_unstable();
        assert_eq!(replicated, [0, 2, 4], "one replica each");
        // Two replicas each over three hosts; then what cannot be.
        let layout = spread(&["a", "b", "c", "a", "b", "c", "a", "b", "c"], 2).unwrap();
        assert!(layout.iter().enumerate().all(|(r, p)| p.is_none_or(|p| r % 3 != p % 3)));
        assert!(spread(&["a", "a", "a", "a"], 1).unwrap_err().contains("another host"));
        assert!(spread(&["a", "a", "a", "a", "b", "b"], 1).is_err(), "a shard would be on a alone");
        assert!(spread(&["a", "b", "c"], 1).unwrap_err().contains("3 nodes"));
    }

    #[test]
    fn slot_ranges_split_evenly_and_cover_everything() {
        assert_eq!(even_ranges(3), [(0, 5460), (5461, 10921), (10922, 16383)]);
        assert_eq!(take_last(&[(0, 9), (20, 24)], 7), [(8, 9), (20, 24)]);
        let (taken, rest) = split_first(&[(20, 24), (0, 9)], 12);
        assert_eq!(taken, [(0, 9), (20, 21)]);
        assert_eq!(rest, [(22, 24)]);
    }
}
