//! # Control plane
//!
//! The REST API operators use to provision caches, and the internal API gateways use to
//! find them.
//!
//! ## Layout (in the order a request flows)
//! - [`startup`]: app state, HTTP server, bootstrap admin token.
//! - [`auth`]: bearer API keys → [`auth::Principal`].
//! - [`routes`]: one module per resource (`caches`, `tokens`, `internal`, `health`).
//! - [`signing`]: Ed25519 keys that sign data-plane JWTs; the JWKS.
//! - [`store`]: sqlx over SQLite, migrations in `migrations/`.
//! - [`apidoc`]: the OpenAPI document. [`config`], [`error`].

pub mod apidoc;
pub mod auth;
pub mod config;
pub mod error;
pub mod routes;
pub mod signing;
pub mod startup;
pub mod store;

pub use config::ControlPlaneConfig;
pub use startup::{start, ControlPlane};
