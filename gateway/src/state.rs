//! What every session of a gateway shares: configuration, the control plane's client and
//! what it answers (routes, keys), the registries of clients, scripts, shared upstreams and
//! limits. Built once when the gateway binds; sessions reach it through an `Arc`.

use crate::auth::jwt::JwtVerifier;
use crate::clients::Registry;
use crate::cluster::Identity;
use crate::control_plane::ControlPlane;
use crate::observer::Observers;
use crate::router::Router;
use crate::GatewayConfig;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;

/// What every session shares.
pub struct Shared {
    pub config: GatewayConfig,
    pub jwt: JwtVerifier,
    pub router: Router,
    pub control_plane: Arc<ControlPlane>,
    pub tracker: crate::tracking::Tracker,
    pub clients: Arc<Registry>,
    /// Scripts in flight per node and cache (whose script a tenant's SCRIPT KILL may end).
    pub scripts: crate::scripts::Running,
    pub observers: Observers,
    /// Shared upstream connections for stateless commands.
    pub muxes: crate::mux::Registry,
    /// How the gateway presents itself to cluster-mode clients.
    pub identity: Identity,
    pub started: Instant,
    /// Permits for connections that have not authenticated yet.
    pub unauthenticated: Arc<Semaphore>,
    /// The same, per source address.
    pub unauthenticated_per_source: Arc<crate::slots::PerSource>,
    /// TLS handshakes in progress, per source address.
    pub handshakes_per_source: Arc<crate::slots::PerSource>,
    /// Failed `AUTH` attempts: of cache and LDAP users per source and user name, of tokens
    /// per source; counted here and with the other gateways'.
    pub throttles: crate::auth::throttle::Throttles,
    /// Login events on their way to the audit log.
    pub audit: Arc<crate::auth::audit::AuditQueue>,
    /// This gateway's name in audit records.
    pub gateway_id: String,
    /// Usage counters not yet shipped to the control plane.
    pub ledger: crate::metering::Ledger,
    /// `ecpu_per_second` buckets of the caches with sessions here.
    pub buckets: crate::metering::limit::Buckets,
}

impl Shared {
    /// `advertise`: the address cluster-mode answers point clients to.
    pub fn new(
        config: GatewayConfig,
        client: Arc<ControlPlane>,
        advertise: &str,
        ledger: crate::metering::Ledger,
    ) -> Shared {
        Shared {
            jwt: JwtVerifier::new(client.clone()),
            router: Router::new(client.clone(), config.route_ttl, config.route_stale_for),
            control_plane: client,
            tracker: Default::default(),
            clients: Default::default(),
            scripts: Default::default(),
            observers: Observers::default(),
            muxes: Default::default(),
            identity: Identity::new(advertise),
            started: Instant::now(),
            unauthenticated: Arc::new(Semaphore::new(config.max_unauthenticated)),
            unauthenticated_per_source: crate::slots::PerSource::new(config.max_unauthenticated_per_source),
            handshakes_per_source: crate::slots::PerSource::new(config.max_tls_handshakes_per_source),
            throttles: crate::auth::throttle::Throttles::new(config.auth_throttle),
            audit: Default::default(),
            gateway_id: config.gateway_id.clone().unwrap_or_else(|| format!("gateway-{advertise}")),
            ledger,
            buckets: Default::default(),
            config,
        }
    }
}
