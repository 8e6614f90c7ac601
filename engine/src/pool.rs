//! The pool: every node of this engine, started and stopped together, and the admin
//! operations the control plane asks for (create and remove a tenant's ACL user and data).
//!
//! A pool is either standalone nodes (each cache in a database of one node) or one Valkey
//! cluster ([`crate::cluster`]: each cache in one database number across every shard). The
//! tenant operations take a node name; a cluster pool is one placement target,
//! [`CLUSTER_TARGET`], and applies them to every node.

use crate::cluster::{Cluster, ClusterConfig, ClusterStatus, NodeStatus, Role};
use crate::node::{ClusterMode, ModuleSpec, Node, NodeSecrets, NodeSpec};
use crate::placement::NodeLoad;
use crate::{EngineError, TenantAcl};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How to run the pool. Built once at startup.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// The `valkey-server` binary.
    pub valkey_server: PathBuf,
    /// Nodes live in `<dir>/<node name>/`.
    pub dir: PathBuf,
    pub nodes: Vec<NodeSpec>,
    /// `databases` of each node: how many caches (plus the reserved database 0) it can hold.
    pub databases: u32,
    /// `maxmemory` in MB (10^6 bytes) of nodes that do not set their own; `None` = half the
    /// host's memory shared equally among the nodes ([`crate::node::default_maxmemory`]).
    pub maxmemory_mb: Option<u64>,
    /// Longest a tenant's script may hold a node (Valkey's `busy-reply-threshold`, then the
    /// engine's `SCRIPT KILL`, or a restart if the script already wrote).
    pub script_time_limit: Duration,
    /// Modules every node loads at start (`loadmodule`); empty: none. Each path must exist
    /// where the nodes run (checked before any starts).
    pub modules: Vec<ModuleSpec>,
    /// The platform's node secret, shared by control planes and engine agents: the nodes'
    /// passwords derive from it ([`NodeSecrets::derive`]). None: each node keeps random
    /// passwords of its own in its folder (one process runs everything).
    pub node_secret: Option<String>,
    pub supervisor: Supervisor,
    /// Set when these nodes are an engine agent's share of a cluster pool: they start in
    /// cluster mode with the pool's shared passwords; the control plane forms the cluster.
    pub cluster: Option<ClusterMembers>,
}

/// This host's nodes of cluster pool `pool` (see [`PoolConfig::cluster`]).
#[derive(Clone, Debug)]
pub struct ClusterMembers {
    pub pool: String,
    pub mode: ClusterMode,
}

/// Who runs a standalone pool's Valkey processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Supervisor {
    /// This process starts, watches, restarts and stops them.
    #[default]
    ThisProcess,
    /// Engine agents (`shoal engine`) on the nodes' hosts: this process only connects to
    /// them, and a restart of it restarts none of them.
    Agents,
}

/// Default [`PoolConfig::script_time_limit`]: Valkey's own `busy-reply-threshold` default.
pub const DEFAULT_SCRIPT_TIME_LIMIT: Duration = Duration::from_secs(5);
/// Share of a node's `maxmemory` kept free of cache storage limits: the sum of the
/// `data_storage_mb` of the caches on a node stays within the other 75% (ElastiCache's
/// `reserved-memory-percent` default is 25 too). The rest absorbs what per-cache accounting
/// does not see: client buffers, the script cache, the hash tables, sampling lag.
pub const RESERVED_MEMORY_PERCENT: u64 = 25;

/// The one placement target of a cluster pool (its [`Pool::loads`] entry): a cache placed
/// there lives in its database number on every shard.
pub const CLUSTER_TARGET: &str = "cluster";

/// A running pool of supervised nodes.
pub struct Pool {
    /// The standalone nodes (empty for a cluster pool, whose nodes change: see
    /// [`Pool::cluster`]).
    nodes: Vec<Arc<Node>>,
    cluster: Option<Arc<Cluster>>,
}

impl Pool {
    /// Starts every node and waits until all answer.
    pub async fn start(config: PoolConfig) -> Result<Pool, EngineError> {
        let mut nodes = Vec::with_capacity(config.nodes.len());
        if config.supervisor == Supervisor::ThisProcess {
            for module in &config.modules {
                module.check()?;
            }
        }
        let shared = crate::node::default_maxmemory(config.nodes.len());
        for spec in config.nodes {
            let maxmemory = match spec.maxmemory_mb.or(config.maxmemory_mb) {
                Some(mb) => mb.saturating_mul(1_000_000),
                None => shared,
            };
            let secrets = match (&config.node_secret, &config.cluster) {
                (Some(s), Some(members)) => Some(NodeSecrets::for_cluster(s, &members.pool)),
                (Some(s), None) => Some(NodeSecrets::derive(s, &spec.name)),
                (None, Some(_)) => {
                    return Err(EngineError::Config("cluster members need the node secret".into()))
                }
                (None, None) => None,
            };
            let node = match (config.supervisor, &secrets) {
                (Supervisor::ThisProcess, _) => Node::prepare(
                    spec,
                    &config.dir,
                    config.valkey_server.clone(),
                    config.databases,
                    maxmemory,
                    config.script_time_limit,
                    secrets.as_ref(),
                )?,
                (Supervisor::Agents, Some(secrets)) => {
                    Node::attach(spec, config.databases, maxmemory, config.script_time_limit, secrets)
                }
                (Supervisor::Agents, None) => {
                    return Err(EngineError::Config("nodes run by engine agents need the node secret".into()))
                }
            };
            let node = node.with_modules(config.modules.clone());
            let node = match &config.cluster {
                Some(members) => node.into_cluster(members.mode.clone()),
                None => node,
            };
            nodes.push(Arc::new(node));
        }
        let pool = Pool { nodes, cluster: None };
        for node in &pool.nodes {
            if let Err(e) = node.start().await {
                pool.stop().await;
                return Err(e);
            }
            if node.is_attached() {
                tracing::info!(node = node.name(), addr = %node.addr(), "valkey node run by an engine agent");
            } else {
                tracing::info!(node = node.name(), addr = %node.addr(), "valkey node ready");
            }
        }
        Ok(pool)
    }

    /// Starts a cluster pool: every node, the cluster formed (or reused), its keeper.
    pub async fn start_cluster(config: ClusterConfig) -> Result<Pool, EngineError> {
        let cluster = Some(Cluster::start(config).await?);
        Ok(Pool { nodes: Vec::new(), cluster })
    }

    /// The standalone nodes; empty for a cluster pool (see [`Pool::cluster`]).
    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    /// The cluster, for a cluster pool.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    fn clustered(&self) -> Result<&Arc<Cluster>, EngineError> {
        self.cluster.as_ref().ok_or_else(|| EngineError::UnknownNode(CLUSTER_TARGET.into()))
    }

    /// Shards (id, primary, replicas, slot ranges), each node's role, memory and health.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, EngineError> {
        self.clustered()?.status().await
    }

    /// Adds a shard to a cluster pool and moves an even share of the slots onto it; returns
    /// its shard id.
    pub async fn add_shard(&self) -> Result<String, EngineError> {
        self.clustered()?.add_shard().await
    }

    /// Moves a shard's slots to the others, then removes its nodes.
    pub async fn remove_shard(&self, shard_id: &str) -> Result<(), EngineError> {
        self.clustered()?.remove_shard(shard_id).await
    }

    /// The commands the pool's modules add, as its first node that answers describes them
    /// (every node of a pool loads the same modules); empty without modules.
    pub async fn module_commands(&self) -> Vec<shoal_commands::ModuleCommand> {
        let cluster_nodes = self.cluster.as_ref().map(|c| c.nodes()).unwrap_or_default();
        for node in self.nodes.iter().chain(cluster_nodes.iter()) {
            if let Some(commands) = node.module_commands().await {
                return commands;
            }
        }
        Vec::new()
    }

    /// The standalone nodes in the shape of a cluster's ([`NodeStatus`]): each a primary
    /// without replicas or a Valkey cluster id, `health` `online` when it answered its last
    /// health check. Empty for a cluster pool.
    pub async fn standalone_status(&self) -> Vec<NodeStatus> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            out.push(NodeStatus {
                name: Some(node.name().to_string()),
                id: String::new(),
                addr: node.addr(),
                role: Role::Primary,
                health: if node.healthy() { "online" } else { "failed" }.to_string(),
                healthy: node.healthy(),
                used_memory: crate::cluster::used_memory(node).await,
                modules: if node.healthy() { node.loaded_modules().await } else { None },
                key_access: node.key_access(),
                placement: node.placement(),
            });
        }
        out
    }

    /// Whether `name` is a node of this pool (standalone or of its cluster) that an engine
    /// agent runs: one whose agent's report is expected.
    pub fn runs_on_agent(&self, name: &str) -> bool {
        let standalone = self.node(name).is_ok_and(|n| n.is_attached());
        standalone || self.cluster.as_ref().is_some_and(|c| c.node(name).is_ok_and(|n| n.is_attached()))
    }

    pub fn node(&self, name: &str) -> Result<&Arc<Node>, EngineError> {
        self.nodes.iter().find(|n| n.name() == name).ok_or_else(|| EngineError::UnknownNode(name.to_string()))
    }

    /// Empty loads of every node, for [`crate::placement::choose`] to fill in.
    pub fn loads(&self) -> Vec<NodeLoad> {
        if let Some(cluster) = &self.cluster {
            // Storage counts against the shards' primaries together.
            let nodes = cluster.nodes();
            let primaries = (nodes.len() / (1 + cluster.config().replicas)).max(1);
            return vec![NodeLoad {
                node: CLUSTER_TARGET.to_string(),
                databases: cluster.config().databases,
                taken: Default::default(),
                healthy: nodes.iter().any(|n| n.healthy()),
                capacity_mb: nodes.first().map_or(0, |n| n.storage_capacity_mb()) * primaries as u64,
                reserved_mb: 0,
                // Cluster nodes track recency (LFU caches go to standalone frequency nodes).
                key_access: crate::KeyAccess::Recency,
                placement: crate::Placement::Shared,
            }];
        }
        self.nodes
            .iter()
            .map(|n| NodeLoad {
                node: n.name().to_string(),
                databases: n.databases,
                taken: Default::default(),
                healthy: n.healthy(),
                capacity_mb: n.storage_capacity_mb(),
                reserved_mb: 0,
                key_access: n.key_access(),
                placement: n.placement(),
            })
            .collect()
    }

    /// Stops every node; returns when all valkey-server children are gone.
    pub async fn stop(&self) {
        if let Some(cluster) = &self.cluster {
            cluster.stop().await;
        }
        for node in &self.nodes {
            node.stop().await;
        }
    }

    /// Sets a node's `notify-keyspace-events` (the union of its caches' flags); in a cluster
    /// pool, on every node (a cache's keys, and so its events, are on every shard, and a
    /// replica may be promoted). A node that does not answer keeps the flags for its restart;
    /// the others are set anyway and the first error is returned.
    pub async fn set_keyspace_events(&self, node: &str, flags: &str) -> Result<(), EngineError> {
        let Some(cluster) = &self.cluster else {
            return self.node(node)?.set_keyspace_events(flags).await;
        };
        cluster.set_keyspace_events(flags).await
    }

    /// Whether the pool is a cluster (`"cluster"`) or standalone nodes (`"standalone"`).
    pub fn kind(&self) -> &'static str {
        if self.cluster.is_some() {
            "cluster"
        } else {
            "standalone"
        }
    }

    /// MB of storage limits a placement target ([`Pool::loads`]) may hold.
    pub fn capacity_mb(&self, target: &str) -> Result<u64, EngineError> {
        self.loads()
            .into_iter()
            .find(|l| l.node == target)
            .map(|l| l.capacity_mb)
            .ok_or_else(|| EngineError::UnknownNode(target.to_string()))
    }

    /// Where a gateway reaches a cache placed on `target`: one node's address (a shard's
    /// primary in a cluster pool), every node of a cluster (empty for standalone), and the
    /// observer user's password there.
    pub async fn route(&self, target: &str) -> Result<(String, Vec<String>, String), EngineError> {
        let Some(cluster) = &self.cluster else {
            let node = self.node(target)?;
            return Ok((node.addr(), Vec::new(), node.observer_password().to_string()));
        };
        let all: Vec<String> = cluster.nodes().iter().map(|n| n.addr()).collect();
        let first = match cluster.primaries().await {
            Ok(p) if !p.is_empty() => p[0].addr(),
            _ => all.first().cloned().ok_or(EngineError::NoHealthyNode)?,
        };
        Ok((first, all, cluster.observer_password().to_string()))
    }

    /// Makes a cache's databases ready: flushes them (a previous owner's data never shows),
    /// then creates its ACL user; saved with the next ACL save ([`crate::acl_save`]).
    pub async fn create_tenant(&self, node: &str, acl: &TenantAcl) -> Result<(), EngineError> {
        if let Some(cluster) = &self.cluster {
            return cluster.create_tenant(acl).await;
        }
        let node = self.node(node)?;
        if acl.placement == crate::Placement::Dedicated {
            node.clear_node_wide_state().await?;
        }
        let mut pipe = redis::pipe();
        for db in acl.db..acl.db + acl.databases.max(1) {
            pipe.cmd("SELECT").arg(db).ignore().cmd("FLUSHDB").arg("SYNC").ignore();
        }
        pipe.cmd("SELECT").arg(0).ignore();
        let rules = acl.setuser_rules();
        pipe.cmd("ACL").arg("SETUSER").arg(&acl.user).arg(&rules).ignore();
        node.change_users(&pipe, &[(&acl.user, Some(rules))]).await
    }

    /// Removes a cache: deletes its ACL user (Valkey closes its connections) and flushes its
    /// databases.
    pub async fn delete_tenant(&self, node: &str, acl: &TenantAcl) -> Result<(), EngineError> {
        if let Some(cluster) = &self.cluster {
            return cluster.delete_tenant(acl).await;
        }
        let node = self.node(node)?;
        let mut pipe = redis::pipe();
        pipe.cmd("ACL").arg("DELUSER").arg(&acl.user).ignore();
        for db in acl.db..acl.db + acl.databases.max(1) {
            pipe.cmd("SELECT").arg(db).ignore().cmd("FLUSHDB").arg("SYNC").ignore();
        }
        pipe.cmd("SELECT").arg(0).ignore();
        node.change_users(&pipe, &[(&acl.user, None)]).await?;
        if acl.placement == crate::Placement::Dedicated {
            node.clear_node_wide_state().await?;
        }
        Ok(())
    }

    /// Makes a standalone node's tenant users match the store's caches (at control-plane
    /// start, when changes not saved before a crash may be missing): `live` users created if
    /// absent, `gone` users (deleted caches') and their logins' users deleted if present, then
    /// the ACL file saved.
    /// Returns how many users it created and deleted. A cluster pool keeps its own record.
    pub async fn restore_tenant_users(
        &self,
        node: &str,
        live: &[TenantAcl],
        gone: &[String],
    ) -> Result<(usize, usize), EngineError> {
        if self.cluster.is_some() {
            return Ok((0, 0));
        }
        let node = self.node(node)?;
        let mut conn = admin_conn(node).await?;
        let present: std::collections::HashSet<String> =
            redis::cmd("ACL").arg("USERS").query_async(&mut conn).await.map_err(|e| node.valkey_err(e))?;
        let mut pipe = redis::pipe();
        let missing: Vec<&TenantAcl> = live.iter().filter(|a| !present.contains(&a.user)).collect();
        for acl in &missing {
            pipe.cmd("ACL").arg("SETUSER").arg(&acl.user).arg(acl.setuser_rules()).ignore();
        }
        // A deleted cache's own user and its logins' (`<user>.user.…`, `.jwt.…`, `.ldap.…`).
        let gone: std::collections::HashSet<&str> = gone.iter().map(String::as_str).collect();
        let strays: Vec<&String> = present
            .iter()
            .filter(|u| {
                gone.contains(u.as_str()) || u.split_once('.').is_some_and(|(own, _)| gone.contains(own))
            })
            .collect();
        for user in &strays {
            pipe.cmd("ACL").arg("DELUSER").arg(user).ignore();
        }
        if missing.is_empty() && strays.is_empty() {
            return Ok((0, 0));
        }
        pipe.cmd("ACL").arg("SAVE").ignore();
        pipe.query_async::<()>(&mut conn).await.map_err(|e| node.valkey_err(e))?;
        Ok((missing.len(), strays.len()))
    }

    /// Creates or changes a cache user's ACL user (`rules` as `ACL SETUSER` takes them,
    /// starting with `reset`, the password included), saved with the next ACL save
    /// ([`crate::acl_save`]) if that changed the user (a login that remakes its user on every
    /// use writes nothing). Valkey applies changed rules to the user's open connections at
    /// once; a user switched `off` has its connections closed. Returns whether it changed
    /// the user.
    pub async fn set_cache_user(
        &self,
        node: &str,
        user: &str,
        rules: &[String],
    ) -> Result<bool, EngineError> {
        Ok(self.set_cache_users(node, &[(user.to_string(), rules.to_vec())]).await? > 0)
    }

    /// [`Pool::set_cache_user`] for each of `users` (name, rules), one after the other (on a
    /// standalone node, on one connection). Returns how many it changed.
    pub async fn set_cache_users(
        &self,
        node: &str,
        users: &[(String, Vec<String>)],
    ) -> Result<usize, EngineError> {
        if let Some(cluster) = &self.cluster {
            let mut changed = 0;
            for (user, rules) in users {
                changed += usize::from(cluster.set_user(user, rules).await?);
            }
            return Ok(changed);
        }
        let node = self.node(node)?;
        let _changing = node.changing_users().await;
        let mut conn = admin_conn(node).await?;
        let mut changed = 0;
        for (user, rules) in users {
            let getuser = || redis::cmd("ACL").arg("GETUSER").arg(user).clone();
            let (before, (), after): (redis::Value, (), redis::Value) = redis::pipe()
                .add_command(getuser())
                .cmd("ACL")
                .arg("SETUSER")
                .arg(user)
                .arg(rules)
                .add_command(getuser())
                .query_async(&mut conn)
                .await
                .map_err(|e| node.valkey_err(e))?;
            if rules.iter().rev().find(|r| *r == "on" || *r == "off").is_some_and(|r| r == "off") {
                match redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("USER")
                    .arg(user)
                    .query_async::<()>(&mut conn)
                    .await
                {
                    // CLIENT KILL USER answers an error when nobody was connected.
                    Err(e) if !e.to_string().contains("No such user") => return Err(node.valkey_err(e)),
                    _ => {}
                }
            }
            if before != after {
                node.note_user(user, Some(rules.clone()));
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Deletes cache users' ACL users (Valkey closes their connections), saved with the next
    /// ACL save.
    pub async fn delete_cache_users(&self, node: &str, users: &[String]) -> Result<(), EngineError> {
        if users.is_empty() {
            return Ok(());
        }
        if let Some(cluster) = &self.cluster {
            return cluster.delete_users(users).await;
        }
        let node = self.node(node)?;
        let mut pipe = redis::pipe();
        pipe.cmd("ACL").arg("DELUSER").arg(users).ignore();
        let changes: Vec<(&str, crate::acl_save::UserChange)> =
            users.iter().map(|u| (u.as_str(), None)).collect();
        node.change_users(&pipe, &changes).await
    }

    /// Those of `candidates` that exist as ACL users on the node (one `ACL GETUSER` each, in
    /// one pipeline: O(1) per name, however many users the node has).
    pub async fn existing_acl_users(
        &self,
        node: &str,
        candidates: &[String],
    ) -> Result<Vec<String>, EngineError> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(cluster) = &self.cluster {
            return Ok(cluster.existing_users(candidates));
        }
        let node = self.node(node)?;
        let mut conn = admin_conn(node).await?;
        let mut pipe = redis::pipe();
        for name in candidates {
            pipe.cmd("ACL").arg("GETUSER").arg(name);
        }
        let found: Vec<redis::Value> = pipe.query_async(&mut conn).await.map_err(|e| node.valkey_err(e))?;
        Ok(candidates
            .iter()
            .zip(found)
            .filter(|(_, v)| !matches!(v, redis::Value::Nil))
            .map(|(name, _)| name.clone())
            .collect())
    }

    /// Names of the node's ACL users that start with `prefix` (a cache's users).
    pub async fn acl_users_with_prefix(&self, node: &str, prefix: &str) -> Result<Vec<String>, EngineError> {
        if let Some(cluster) = &self.cluster {
            return Ok(cluster.users_with_prefix(prefix));
        }
        let node = self.node(node)?;
        let mut conn = admin_conn(node).await?;
        let users: Vec<String> =
            redis::cmd("ACL").arg("USERS").query_async(&mut conn).await.map_err(|e| node.valkey_err(e))?;
        Ok(users.into_iter().filter(|u| u.starts_with(prefix)).collect())
    }
}

pub(crate) async fn admin_conn(node: &Node) -> Result<redis::aio::MultiplexedConnection, EngineError> {
    let client = node.admin_client()?;
    let connect = client.get_multiplexed_async_connection();
    match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(r) => r.map_err(|e| node.valkey_err(e)),
        Err(_) => Err(EngineError::NotReady(node.name().to_string())),
    }
}
