//! # Control plane
//!
//! The REST API operators use to provision caches, and the internal API gateways use to
//! find them.
//!
//! ## Layout (in the order a request flows)
//! - [`startup`]: the HTTP servers; [`state`]: what every handler can reach; [`pools`]:
//!   the engine pools caches are placed in, by name;
//!   [`admin_token`]: the bootstrap admin token.
//! - [`context`]: request ids, source addresses, auditing of refused changes.
//! - [`auth`]: bearer API keys → [`auth::Principal`] with a [`role::Role`] (admin, owner of
//!   an account, auditor).
//! - [`gateways`]: each gateway's credential for the internal API → [`gateways::Gateway`];
//!   [`budget`]: the failed password checks each may ask for.
//! - [`domain`]: what more than one route needs (caches, logins, keys, names); routes do
//!   not call each other.
//! - [`routes`]: one module per resource (`accounts`, `caches`, `tokens`, `usage`, `billing`,
//!   `audit`, `me`, `gateways`, `pools` (the engine's), `health`; `internal` is served on its own listener); `page`
//!   holds pagination, idempotency and ETags; `portal` serves the admin portal (files under
//!   `control-plane/portal/`, compiled in) at `/portal/`.
//! - [`secret`]: random secrets and the hashes the store keeps of them.
//! - [`signing`]: Ed25519 keys that sign data-plane JWTs; the JWKS.
//! - [`store`]: sqlx `Any` over SQLite or PostgreSQL; the audit log's hash chain.
//! - [`occupancy`]: each pool's databases taken and storage reserved, in memory for placement;
//!   [`places`]: where every live cache is, followed change by change, for the sampler.
//! - [`storage`]: the storage sampler — stored bytes per cache, the `data_storage_mb` limit
//!   (eviction, then refused writes), storage accrual for billing.
//! - [`lease`]: the background jobs one control plane at a time runs (PostgreSQL advisory
//!   locks); [`limits`]: the gateways' shares of caches' limits, coordinated by the holder
//!   of the `limits` lease (the others forward reports to it), which also counts every
//!   gateway's failed logins together ([`login_locks`]).
//! - [`metrics`]: Prometheus metrics at `/metrics`.
//! - [`apidoc`]: the OpenAPI document. [`config`], [`error`].

pub mod admin_token;
pub mod apidoc;
pub mod auth;
pub mod budget;
pub mod config;
pub mod context;
pub mod domain;
pub mod engine_hosts;
pub mod error;
pub mod gateways;
pub mod lease;
pub mod limits;
pub mod login_locks;
pub mod metrics;
pub mod occupancy;
pub mod places;
pub mod pools;
pub mod role;
pub mod routes;
pub mod secret;
pub mod signing;
pub mod snapshots;
pub mod startup;
pub mod state;
pub mod storage;
pub mod store;
pub mod token_users;

pub use config::ControlPlaneConfig;
pub use startup::{start, ControlPlane};
