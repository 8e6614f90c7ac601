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
    /// The reader endpoint (read-only commands, served by a cluster pool's replicas), shown
    /// in cache responses when set.
    pub public_reader_endpoint: Option<String>,
    /// Where the internal API gateways use listens (never on `listen`): plain HTTP only on
    /// a loopback address; anywhere else it needs `internal_tls_cert` and `internal_tls_key`.
    pub internal_listen: String,
    /// PEM certificate chain and private key: the internal API is served over TLS.
    pub internal_tls_cert: Option<PathBuf>,
    pub internal_tls_key: Option<PathBuf>,
    /// The URL other control planes reach this one's internal API at, e.g.
    /// `https://cp-1.example.internal:8081` (`{hostname}` is replaced by this machine's host
    /// name): while this one coordinates the limits (the `limits` lease), the others forward
    /// the gateways' limit reports there (docs/control-plane-ha.md). Default: `internal_listen`
    /// (https when TLS is on) unless that is a wildcard address (0.0.0.0, [::]).
    pub internal_advertise: Option<String>,
    /// PEM certificates the other control planes' internal API is trusted with when reports
    /// are forwarded there. Default: those in `internal_tls_cert`.
    pub internal_peer_ca: Option<PathBuf>,
    /// The one shared gateway token of old: refused at start (each gateway has its own
    /// credential now, see `shoal admin gateway create`).
    pub internal_token: Option<String>,
    /// Throttling of failed password checks gateways ask for, per (user, source).
    pub verify_throttle: shoal_auth::ThrottlePolicy,
    /// Most failed password checks one gateway credential may ask for per minute, whatever
    /// sources it names (0: no bound).
    pub verify_failures_per_gateway: u32,
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
    /// Seconds between two reads of a node's whole keyspace by the storage sampler (1–3600;
    /// default 60). The read walks every database of the node (4–65 ms at 100,000); the
    /// rounds between look only at caches in use or with keys.
    pub storage_keyspace_interval: f64,
    /// Seconds between two sweeps of scoped tokens' upstream ACL users (0.1–3600; default
    /// 60): a user no unexpired, unrevoked token uses any more is deleted from its node.
    pub acl_sweep_interval: f64,
    /// The gateways' `max_connections` (connections per gateway): a cache's
    /// `limits.max_connections` (per gateway) may not exceed it.
    pub gateway_max_connections: u32,
    /// `data_storage_mb` of caches created without one (MB = 10^6 bytes; default 100, the
    /// storage billed at least anyway). Every cache has a storage limit: the limits of a
    /// node's caches add up to at most 75% of its `maxmemory`.
    pub default_data_storage_mb: u64,
    /// Where snapshots are kept, and their limits (`[control_plane.snapshots]`).
    pub snapshots: SnapshotConfig,
    /// The process's metrics recorder, when the embedding program installed one.
    #[serde(skip)]
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// `[control_plane.snapshots]`: where snapshot files are kept (see `docs/snapshots.md`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotConfig {
    /// A local directory, or `s3://bucket[/prefix]` for S3-compatible object storage
    /// (credentials from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`).
    pub location: String,
    /// The S3 endpoint, for storage other than AWS (e.g. `http://127.0.0.1:9000`).
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    /// Where snapshots are written and read while they are taken, restored or imported.
    pub work_dir: PathBuf,
    /// Largest RDB file `PUT /v1/caches/{id}/import` takes, in MB.
    pub import_max_mb: u64,
    /// Seconds between the daily schedule's checks for open windows and expired snapshots.
    pub schedule_interval: f64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            location: ".shoal/snapshots".into(),
            s3_endpoint: None,
            s3_region: "us-east-1".into(),
            work_dir: ".shoal/snapshots-work".into(),
            import_max_mb: 1024,
            schedule_interval: 60.0,
        }
    }
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
            public_reader_endpoint: None,
            internal_listen: "127.0.0.1:8081".into(),
            internal_tls_cert: None,
            internal_tls_key: None,
            internal_advertise: None,
            internal_peer_ca: None,
            internal_token: None,
            verify_throttle: shoal_auth::ThrottlePolicy::default(),
            verify_failures_per_gateway: 600,
            token_ttl_default: 15 * 60,
            token_ttl_max: 12 * 3600,
            workers: 2,
            ldap: None,
            session_ttl: 3600,
            login_throttle: shoal_auth::ThrottlePolicy::default(),
            billing: Default::default(),
            invoice_grace_seconds: 3600,
            storage_interval: 5.0,
            storage_keyspace_interval: 60.0,
            acl_sweep_interval: 60.0,
            // The gateway's default `max_connections`.
            gateway_max_connections: 10_000,
            default_data_storage_mb: DEFAULT_DATA_STORAGE_MB,
            snapshots: SnapshotConfig::default(),
            metrics: None,
        }
    }
}

impl ControlPlaneConfig {
    /// Refuses an internal API that would carry cache secrets unencrypted over a network,
    /// and the shared token of old.
    pub fn check_internal(&self) -> Result<(), String> {
        if self.internal_token.is_some() {
            return Err("internal_token is no longer used and must be removed: each gateway has its own \
                 credential. Make one with `shoal admin gateway create <name> --config <this file>` (or \
                 POST /v1/gateways) and give it to that gateway as internal_credential_file"
                .into());
        }
        if self.internal_listen == self.listen {
            return Err(format!("internal_listen must differ from listen ({})", self.listen));
        }
        match (&self.internal_tls_cert, &self.internal_tls_key) {
            (Some(_), Some(_)) => Ok(()),
            (None, None) if shoal_types::is_loopback(&self.internal_listen) => Ok(()),
            (None, None) => Err(format!(
                "internal_listen {} is not a loopback address: the internal API carries cache passwords, so \
                 off loopback it is served over TLS only; set internal_tls_cert and internal_tls_key (PEM)",
                self.internal_listen
            )),
            _ => Err("internal_tls_cert and internal_tls_key go together".into()),
        }
    }
}

impl ControlPlaneConfig {
    /// Refuses a secret file that holds a placeholder left from an example (`CHANGE_ME`,
    /// `<…>`, see [`shoal_types::is_placeholder`]), naming the file: the admin token, the
    /// audit key and the internal API's TLS key. A file that does not exist yet is left to
    /// the start, which writes the admin token and the audit key.
    pub fn check_secrets(&self) -> Result<(), String> {
        let files = [
            (
                "admin_token_path",
                Some(self.admin_token_path.clone()),
                "delete it (the control plane writes a new token at start) or run `shoal admin rotate-token`",
            ),
            (
                "audit_key_path",
                Some(self.audit_key_path()),
                "delete it (a new key is made at start) or copy the audit key of the other control planes there",
            ),
            ("internal_tls_key", self.internal_tls_key.clone(), "put the internal API's PEM private key there"),
        ];
        for (option, path, fix) in files {
            let Some(path) = path else { continue };
            if std::fs::read_to_string(&path).is_ok_and(|text| shoal_types::is_placeholder(&text)) {
                return Err(format!("{option} {} holds a placeholder, not a secret: {fix}", path.display()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_for_loopback_only_and_the_shared_token_is_refused() {
        let ok = |listen: &str| ControlPlaneConfig { internal_listen: listen.into(), ..Default::default() };
        for listen in ["127.0.0.1:8081", "127.1.2.3:1", "[::1]:8081", "localhost:8081"] {
            assert_eq!(ok(listen).check_internal(), Ok(()), "{listen}");
        }
        for listen in ["0.0.0.0:8081", "10.0.0.1:8081", "[::]:8081", "cp.example.internal:8081"] {
            let err = ok(listen).check_internal().unwrap_err();
            assert!(err.contains("internal_tls_cert"), "{listen}: {err}");
        }
        let tls = ControlPlaneConfig {
            internal_listen: "0.0.0.0:8081".into(),
            internal_tls_cert: Some("c.pem".into()),
            internal_tls_key: Some("k.pem".into()),
            ..Default::default()
        };
        assert_eq!(tls.check_internal(), Ok(()));
        let half = ControlPlaneConfig { internal_tls_key: None, ..tls };
        assert!(half.check_internal().is_err());
        let shared =
            ControlPlaneConfig { internal_token: Some("a-long-random-value".into()), ..Default::default() };
        assert!(shared.check_internal().unwrap_err().contains("shoal admin gateway create"));
        let same = ControlPlaneConfig { internal_listen: "127.0.0.1:8080".into(), ..Default::default() };
        assert!(same.check_internal().is_err());
    }
}
