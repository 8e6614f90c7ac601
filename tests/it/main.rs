//! Shoal's integration tests: the real `shoal` binary with real Valkey nodes and real
//! clients. One binary (one link for all of them), a module per area; `support` is the
//! shared harness.

mod support;

mod api;
mod audit;
mod auth;
mod billing;
mod clients;
mod commands;
mod deploy;
mod e2e;
mod engine_agent;
mod gateway;
mod hosts;
mod internal;
mod isolation;
mod ldap;
mod limits;
mod metering;
mod modules;
mod outage;
mod pools;
mod portal;
mod production;
mod reader;
mod readme;
mod resources_gateway;
mod resources_node;
mod revocation;
mod secrets;
mod snapshots;
mod storage;
mod tls;
mod tracking;
mod users;
