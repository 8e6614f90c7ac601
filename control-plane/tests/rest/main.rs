//! The public REST API in-process: the app [`shoal_control_plane::startup::public_app`]
//! builds, driven by `actix_web::test` on a fresh store (SQLite, or PostgreSQL in the
//! Postgres lane) with one real valkey-server node. What needs the gateway, RESP clients,
//! a listening socket or a restart is in `tests/it/` at the workspace root.

mod support;

mod api;
mod ha;
mod pools;
mod rest;
