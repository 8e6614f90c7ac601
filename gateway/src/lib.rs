//! # Gateway: the RESP endpoint
//!
//! Clients connect here, authenticate, and talk to their cache as if it were their own
//! Valkey. Bytes are forwarded, not rebuilt: the gateway finds frame boundaries and the
//! command name, and copies the original bytes upstream.
//!
//! ## Layout (in the order a request flows)
//! - [`listener`]: accept loops (TCP and [`tls`]), connection limits, shutdown.
//! - [`session`]: one task per connection; AUTH, then forward in order.
//! - [`resp`]: request parser, reply boundary scanner, a small value model (no I/O).
//! - [`auth`]: verifies data-plane JWTs with the control plane's JWKS; throttles failed
//!   logins, counted with the other gateways' through the limits report.
//! - [`router`]: cache id → [`shoal_types::TenantRoute`], from the control plane.
//! - [`control_plane`]: what the gateway asks of the control plane and sends it: the
//!   internal API over HTTP, or an in-memory fake for tests (feature `testing`).
//! - the command table is the `shoal-commands` crate: pass, deny or virtualize, weights, flags.
//! - [`cmd`]: commands the gateway answers or rewrites per cache (one file per family), with
//!   [`pubsub`] (channel namespaces), [`cluster`] (one-node cluster answers),
//!   [`clients`] (each cache's connections), [`observer`] (node-wide views, filtered) and
//!   [`tracking`] (client-side caching invalidations from keyspace events).
//! - [`upstream`]: opens the per-session connection to the cache's Valkey node; [`mux`]
//!   shares connections among sessions for stateless commands.
//! - [`metering`]: ECPU per command, per-cache counters, usage batches to the control plane.
//! - [`metrics`]: Prometheus metrics at `/metrics`.
//! - [`config`], [`error`].

pub mod auth;
pub mod cache_stats;
pub mod clients;
pub mod cluster;
pub mod cluster_link;
pub mod cmd;
pub mod config;
pub mod control_plane;
pub mod error;
pub mod listener;
pub mod metering;
pub mod metrics;
pub mod mux;
pub mod observer;
pub mod pubsub;
pub mod resp;
pub mod router;
pub mod scripts;
pub mod session;
pub mod slots;
pub mod state;
pub mod tls;
pub mod tracking;
pub mod upstream;

pub use config::GatewayConfig;
pub use error::GatewayError;
pub use listener::Gateway;
