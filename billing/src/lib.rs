//! # Billing
//! Rates, hourly rollups, monthly invoices and cost estimates: pure logic, no I/O. The
//! control plane's store feeds it usage rows and persists what it returns; the REST API
//! serves its types as JSON (amounts as decimal strings), CSV and HTML.
//!
//! ## Layout (in the order data flows)
//! - [`rates`]: the price list — a default [`RateCard`] (ElastiCache Serverless Valkey,
//!   us-east-1) and per-account overrides.
//! - [`rollup`]: per-minute usage rows and storage samples summed per cache and UTC hour.
//! - [`invoice`]: a month's invoice per account, one line per cache and meter; `to_csv`,
//!   `to_html`.
//! - [`estimate`]: a monthly cost from expected traffic, with the arithmetic shown.
//! - [`error`]: [`BillingError`], the one error type, with client-safe messages.
//!
//! Money is `rust_decimal::Decimal`, never a float. Units: 1 ECPU = 1000 milli-ECPU (the
//! integer the gateway meters); GB = 10^9 bytes and MB = 10^6 bytes, as in
//! `CacheLimits::data_storage_mb`.

pub mod error;
pub mod estimate;
pub mod invoice;
pub mod rates;
pub mod rollup;

pub use error::BillingError;
pub use estimate::{estimate, Estimate, EstimateInput, EstimateStep, HOURS_PER_MONTH};
pub use invoice::{
    build_invoice, DedicatedSpan, Invoice, InvoiceLine, InvoiceStatus, KeptSnapshot, Meter, Month,
};
pub use rates::{PriceList, RateCard, RateOverride};
pub use rollup::{hour_of, rollup, HourlyRollup, StorageSample};
pub use rust_decimal::Decimal;
