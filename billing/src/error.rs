//! Why a billing computation refused its input. Every message is safe to show a tenant.

use thiserror::Error;

/// Bad input to a billing function; nothing was computed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BillingError {
    #[error("invalid rate card: {0}")]
    InvalidRates(String),
    #[error("invalid month {0:?}: expected YYYY-MM between 1970-01 and 9999-12")]
    InvalidMonth(String),
    #[error("time {0} is out of range")]
    InvalidTime(i64),
    #[error("the month {0} has not started yet")]
    FutureMonth(String),
    #[error("invalid estimate: {0}")]
    InvalidEstimate(String),
}

impl BillingError {
    /// A short stable label (for metrics and API error codes).
    pub fn kind(&self) -> &'static str {
        match self {
            BillingError::InvalidRates(_) => "invalid_rates",
            BillingError::InvalidMonth(_) => "invalid_month",
            BillingError::InvalidTime(_) => "invalid_time",
            BillingError::FutureMonth(_) => "future_month",
            BillingError::InvalidEstimate(_) => "invalid_estimate",
        }
    }
}
