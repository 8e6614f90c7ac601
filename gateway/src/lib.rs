//! # Gateway: the RESP endpoint
//!
//! Clients connect here, authenticate, and talk to their cache as if it were their own
//! Valkey. Bytes are forwarded, not rebuilt: the gateway finds frame boundaries and the
//! command name, and copies the original bytes upstream.
//!
//! ## Layout (in the order a request flows)
//! - [`listener`]: accept loop, connection limit, shutdown.
//! - [`session`]: one task per connection; the state machine AUTH → forward.
//! - [`resp`]: request parser and reply boundary scanner (no I/O).
//! - [`auth`]: verifies data-plane JWTs with the control plane's JWKS.
//! - [`router`]: cache id → [`shoal_types::TenantRoute`], from the control plane.
//! - [`upstream`]: opens the per-session connection to the cache's Valkey node.
//! - [`config`], [`error`].

pub mod auth;
pub mod config;
pub mod error;
pub mod listener;
pub mod resp;
pub mod router;
pub mod session;
pub mod upstream;

pub use config::GatewayConfig;
pub use error::GatewayError;
pub use listener::Gateway;
