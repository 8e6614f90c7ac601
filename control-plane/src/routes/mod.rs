//! One module per resource; each has `configure(cfg)`. `page` holds pagination,
//! idempotency and ETags; `responses` the error responses their OpenAPI entries share.

pub mod accounts;
pub mod audit;
pub mod auth;
pub mod billing;
pub mod caches;
pub mod gateways;
pub mod health;
pub mod internal;
pub mod me;
pub mod page;
pub mod pools;
pub mod portal;
pub mod responses;
pub mod sessions;
pub mod snapshots;
pub mod tokens;
pub mod usage;
pub mod users;
