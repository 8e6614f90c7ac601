//! The control plane's configuration: one struct with defaults, built once at startup.

use serde::Deserialize;
use std::path::PathBuf;

/// Default [`ControlPlaneConfig::default_data_storage_mb`].
pub const DEFAULT_DATA_STORAGE_MB: u64 = 100;

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ControlPlaneConfig {
    /// Where the REST API listens.
    pub listen: String,
    /// sqlx URL of the store.
    pub database_url: String,
    /// Where the bootstrap admin token is written.
    pub admin_token_path: PathBuf,
    /// The audit chain's key (created 0600 if missing), kept outside the database; the
    /// newest head written is remembered beside it (`audit.head`). The folder must be
    /// writable. Default: `audit.key` next to the admin token.
    pub audit_key_path: Option<PathBuf>,
    /// The RESP endpoint tenants connect to, shown in cache responses.
    pub public_endpoint: String,
    /// Bearer token gateways present to the internal API.
    pub internal_token: String,
    /// Default and maximum lifetime of data-plane tokens, in seconds.
    pub token_ttl_default: u64,
    pub token_ttl_max: u64,
    /// HTTP worker threads.
    pub workers: usize,
    /// LDAP logins (`POST /v1/auth/login`, and `AUTH <user>@<cache>` at gateways); off when
    /// absent. In TOML: a `[control_plane.ldap]` table (see `shoal_auth::LdapConfig`).
    pub ldap: Option<shoal_auth::LdapConfig>,
    /// Lifetime in seconds of the REST bearer token an LDAP login returns.
    pub session_ttl: u64,
    /// Throttling of failed `POST /v1/auth/login` attempts, per source and per user name.
    pub login_throttle: shoal_auth::ThrottlePolicy,
    /// Prices: defaults (ElastiCache Serverless, Valkey, us-east-1) and per-account plans.
    pub billing: shoal_billing::PriceList,
    /// Seconds after a month ends before its invoices are final (late usage still counts).
    pub invoice_grace_seconds: i64,
    /// Seconds between two storage samples of each cache (0.1–60; default 5, so that every
    /// cache is sampled at least every 10 s).
    pub storage_interval: f64,
    /// The gateways' `max_connections` (connections per gateway): a cache's
    /// `limits.max_connections` (per gateway) may not exceed it.
    pub gateway_max_connections: u32,
    /// `data_storage_mb` of caches created without one (MB = 10^6 bytes; default 100, the
    /// storage billed at least anyway). Every cache has a storage limit: the limits of a
    /// node's caches add up to at most 75% of its `maxmemory`.
    pub default_data_storage_mb: u64,
    /// The process's metrics recorder, when the embedding program installed one.
    #[serde(skip)]
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl ControlPlaneConfig {
    /// Where the audit chain's key is ([`ControlPlaneConfig::audit_key_path`]).
    pub fn audit_key_path(&self) -> PathBuf {
        self.audit_key_path.clone().unwrap_or_else(|| self.admin_token_path.with_file_name("audit.key"))
    }
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            listen: "127.0.0.1:8080".into(),
            database_url: "sqlite://.shoal/shoal.db".into(),
            admin_token_path: ".shoal/admin.token".into(),
            audit_key_path: None,
            public_endpoint: "127.0.0.1:6380".into(),
            internal_token: String::new(),
            token_ttl_default: 15 * 60,
            token_ttl_max: 12 * 3600,
            workers: 2,
            ldap: None,
            session_ttl: 3600,
            login_throttle: shoal_auth::ThrottlePolicy::default(),
            billing: Default::default(),
            invoice_grace_seconds: 3600,
            storage_interval: 5.0,
            // The gateway's default `max_connections`.
            gateway_max_connections: 10_000,
            default_data_storage_mb: DEFAULT_DATA_STORAGE_MB,
            metrics: None,
        }
    }
}
