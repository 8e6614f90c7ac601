//! What every handler can reach: configuration, the store, the engine's pools, the signing
//! keys, the directory and the throttles. Built once when the control plane starts.

use crate::config::ControlPlaneConfig;
use crate::pools::Pools;
use crate::signing::Signer;
use crate::store::Store;
use std::sync::Arc;

/// What every handler can reach.
pub struct AppState {
    pub config: ControlPlaneConfig,
    pub store: Store,
    pub pools: Arc<Pools>,
    pub signer: Signer,
    /// Serializes placement so two creates never take the same database.
    pub placement_lock: tokio::sync::Mutex<()>,
    /// Each pool's databases taken and storage reserved (used under `placement_lock`).
    pub occupancy: crate::occupancy::Occupancy,
    /// Serializes changes to cache users (their upstream ACL users and rows change together).
    pub users_lock: tokio::sync::Mutex<()>,
    /// Scoped tokens' upstream ACL users this process has made (or made sure of), and caches
    /// it deleted (a stray token user of theirs is the sweep's to take): the token sweep
    /// lists the nodes' users again when it moves ([`crate::token_users::run`]).
    pub token_user_changes: std::sync::atomic::AtomicU64,
    /// The LDAP directory, when configured.
    pub directory: Option<shoal_auth::Directory>,
    /// Failed `POST /v1/auth/login` attempts.
    pub login_throttle: std::sync::Mutex<shoal_auth::Throttle>,
    /// Failed password checks gateways asked for, per (user, source), and per gateway.
    pub verify_throttle: std::sync::Mutex<shoal_auth::Throttle>,
    pub verify_budget: std::sync::Mutex<crate::budget::FailureBudget>,
    /// Every gateway's share of each cache's limits (while this process coordinates them).
    pub limits: crate::limits::Coordinator,
    /// Sends gateways' limit reports to the control plane that coordinates them.
    pub limits_forwarder: crate::limits::Forwarder,
    /// This process among the control planes ([`crate::lease::instance_id`]).
    pub instance: String,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Where snapshot files are kept.
    pub snapshots: crate::snapshots::SnapshotStore,
}
