//! # Billing
//! Rates, usage ledger and rollups, invoices — pure logic, no I/O of its own.
//!
//! ## Layout
//! - `rates`: the price list (ElastiCache Serverless Valkey rates, us-east-1, by default).

pub mod rates;
