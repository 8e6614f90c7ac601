//! The gateway's configuration: one struct with defaults, built once at startup.

use serde::Deserialize;
use std::time::Duration;

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// Where the RESP endpoint listens.
    pub listen: String,
    /// Base URL of the control plane's internal API (`internal_listen`): routes, password
    /// checks, usage, audit and the JWKS. `https://` — plain `http://` only to a loopback
    /// address.
    pub control_plane_url: String,
    /// PEM certificate(s) to trust for `https://` (the internal listener's certificate or
    /// its CA); without it the usual public roots.
    pub control_plane_ca: Option<std::path::PathBuf>,
    /// Where the TLS RESP endpoint listens (off when unset).
    pub tls_listen: Option<String>,
    /// Where the reader endpoint listens (off when unset): read-only commands, served by
    /// replicas on a cluster pool; writes get `-READONLY`.
    pub reader_listen: Option<String>,
    /// PEM certificate chain and private key for TLS; reloaded on SIGHUP.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// This gateway's own credential for the internal API (`sgw_<name>_<secret>`, made by
    /// `shoal admin gateway create <name>`), inline or — better — in a file (0600).
    pub internal_credential: String,
    pub internal_credential_file: Option<std::path::PathBuf>,
    /// The one shared token of old: refused at start.
    pub internal_token: Option<String>,
    /// Largest bulk string accepted after AUTH (Valkey's `proto-max-bulk-len`).
    pub max_bulk_bytes: usize,
    /// Most arguments in one command after AUTH.
    pub max_args: usize,
    /// The address clients should use to reach this gateway (cluster-mode answers);
    /// defaults to `listen`.
    pub advertise: Option<String>,
    /// Threads that serve client connections, each with its own event loop and its own
    /// shared upstream connections (0 = one per CPU).
    pub threads: usize,
    /// Most client connections at once.
    pub max_connections: usize,
    /// Most connections one cache may hold on this gateway.
    pub max_connections_per_cache: usize,
    /// Most connections that have not authenticated yet (TLS handshakes included).
    pub max_unauthenticated: usize,
    /// Most of those from one source address (an IPv4 address or an IPv6 /64).
    pub max_unauthenticated_per_source: usize,
    /// Most TLS handshakes in progress from one source address.
    pub max_tls_handshakes_per_source: usize,
    /// Seconds a TLS client has to finish its handshake.
    #[serde(with = "secs")]
    pub tls_handshake_timeout: Duration,
    /// Seconds a new connection has to authenticate.
    #[serde(with = "secs")]
    pub auth_timeout: Duration,
    /// How long a connection may outlive its token's expiry before it must `AUTH` again.
    #[serde(with = "secs")]
    pub token_grace: Duration,
    /// Close connections idle this long (0 = never, as Valkey's `timeout 0`).
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// How long a cache's route is reused before it is asked for again.
    #[serde(with = "secs")]
    pub route_ttl: Duration,
    /// How long a route is still used while the control plane cannot be reached (seconds).
    #[serde(with = "secs")]
    pub route_stale_for: Duration,
    /// Throttling of failed `AUTH` attempts per source address and per user name
    /// (`[gateway.auth_throttle]`; durations in ms, see `shoal_auth::ThrottlePolicy`).
    pub auth_throttle: shoal_auth::ThrottlePolicy,
    /// This gateway's name in audit records (default: its advertised address).
    pub gateway_id: Option<String>,
    /// Meter commands (ECPU, bytes, hits) and ship usage to the control plane.
    pub metering: bool,
    /// Where the gateway keeps its identity, usage journal and spooled usage batches (none:
    /// in memory).
    pub data_dir: Option<std::path::PathBuf>,
    /// Without a data dir: usage batches kept in memory while the control plane is
    /// unreachable (past that the oldest is dropped).
    pub usage_memory_batches: usize,
    /// How long a command may wait for its cache's ECPU limit before `-THROTTLED` (seconds).
    #[serde(with = "secs")]
    pub throttle_wait: Duration,
    /// Where `/metrics` (Prometheus) is served (off when unset).
    pub metrics_listen: Option<String>,
    /// Most output a client may leave unread before it is disconnected (as Valkey's
    /// `client-output-buffer-limit`). Big replies go on in pieces and the gateway stops
    /// reading for a client that does not read, so only pub/sub and invalidation floods
    /// reach it.
    pub max_client_output: usize,
    /// A cache whose script was ended by force (killed at the script time limit, or its node
    /// restarted under it) may run no script on this gateway for this long, doubled at each
    /// further one within 10 minutes, up to 5 minutes (0: never paused).
    #[serde(with = "secs")]
    pub script_pause: Duration,
    /// The process's metrics recorder, when the embedding program installed one.
    #[serde(skip)]
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:6380".into(),
            control_plane_url: "http://127.0.0.1:8081".into(),
            control_plane_ca: None,
            tls_listen: None,
            reader_listen: None,
            tls_cert: None,
            tls_key: None,
            internal_credential: String::new(),
            internal_credential_file: None,
            internal_token: None,
            max_bulk_bytes: 512 * 1024 * 1024,
            max_args: 1024 * 1024,
            advertise: None,
            threads: 0,
            max_connections: 10_000,
            max_connections_per_cache: 1_000,
            max_unauthenticated: 1_000,
            max_unauthenticated_per_source: 100,
            max_tls_handshakes_per_source: 20,
            tls_handshake_timeout: Duration::from_secs(5),
            auth_timeout: Duration::from_secs(10),
            idle_timeout: Duration::ZERO,
            token_grace: Duration::from_secs(60),
            route_ttl: Duration::from_secs(2),
            route_stale_for: Duration::from_secs(600),
            auth_throttle: shoal_auth::ThrottlePolicy::default(),
            gateway_id: None,
            metering: true,
            data_dir: None,
            usage_memory_batches: 120,
            throttle_wait: Duration::from_millis(10),
            metrics_listen: None,
            max_client_output: 64 * 1024 * 1024,
            script_pause: Duration::from_secs(10),
            metrics: None,
        }
    }
}

mod secs {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs_f64(f64::deserialize(d)?))
    }
}
