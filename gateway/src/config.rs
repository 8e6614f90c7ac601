//! The gateway's configuration: one struct with defaults, built once at startup.

use serde::Deserialize;
use std::time::Duration;

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// Where the RESP endpoint listens.
    pub listen: String,
    /// Base URL of the control plane (JWKS and the internal route API).
    pub control_plane_url: String,
    /// Bearer token for the control plane's internal API.
    pub internal_token: String,
    /// Largest bulk string accepted after AUTH (Valkey's `proto-max-bulk-len`).
    pub max_bulk_bytes: usize,
    /// Most arguments in one command after AUTH.
    pub max_args: usize,
    /// Most client connections at once.
    pub max_connections: usize,
    /// How long a cache's route is reused before it is asked for again.
    #[serde(with = "secs")]
    pub route_ttl: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:6380".into(),
            control_plane_url: "http://127.0.0.1:8080".into(),
            internal_token: String::new(),
            max_bulk_bytes: 512 * 1024 * 1024,
            max_args: 1024 * 1024,
            max_connections: 10_000,
            route_ttl: Duration::from_secs(2),
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
