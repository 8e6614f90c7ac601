//! The price list. Rates are data: a default [`RateCard`] (the Valkey rates of ElastiCache
//! Serverless in us-east-1) and optional per-account overrides, both loadable from JSON/TOML.
//! Prices are exact decimals; money never touches floating point.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use shoal_types::AccountId;

use crate::error::BillingError;

/// Bytes in a megabyte, as in `CacheLimits::data_storage_mb` (decimal units, like AWS's GB).
pub const BYTES_PER_MB: u64 = 1_000_000;
/// Bytes in a gigabyte of billed storage.
pub const BYTES_PER_GB: u64 = 1_000_000_000;

/// What one account pays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RateCard {
    /// ISO 4217 code. Totals are rounded to two decimals, so a currency with another minor
    /// unit needs a rounding change first.
    pub currency: String,
    /// Price of one million ECPU.
    pub per_million_ecpu: Decimal,
    /// Price of one GB-hour (10^9 bytes stored for one hour).
    pub per_gb_hour: Decimal,
    /// Storage billed at least, per cache and hour the cache had any usage or storage sample.
    pub min_storage_mb: u64,
    /// Price of one GB-month of snapshot storage (10^9 bytes kept for a whole month).
    #[serde(default = "default_snapshot_gb_month")]
    pub per_snapshot_gb_month: Decimal,
    /// Price of one hour of a dedicated cache's node (on top of its ECPU and storage).
    #[serde(default = "default_dedicated_node_hour")]
    pub per_dedicated_node_hour: Decimal,
}

/// About ElastiCache's on-demand price of a cache.m7g.large Valkey node (2 vCPU, 6.38 GiB)
/// in us-east-1: $0.126 per hour.
fn default_dedicated_node_hour() -> Decimal {
    Decimal::new(126, 3)
}

/// ElastiCache's snapshot storage rate in us-east-1: $0.085 per GB-month.
fn default_snapshot_gb_month() -> Decimal {
    Decimal::new(85, 3)
}

impl Default for RateCard {
    /// The Valkey rates of ElastiCache Serverless in us-east-1: $0.0023 per million ECPU,
    /// $0.084 per GB-hour, at least 100 MB stored; snapshots $0.085 per GB-month.
    fn default() -> Self {
        RateCard {
            currency: "USD".to_owned(),
            per_million_ecpu: Decimal::new(23, 4),
            per_gb_hour: Decimal::new(84, 3),
            min_storage_mb: 100,
            per_snapshot_gb_month: default_snapshot_gb_month(),
            per_dedicated_node_hour: default_dedicated_node_hour(),
        }
    }
}

impl RateCard {
    /// Rejects negative prices, an implausible currency code and an absurd minimum.
    pub fn validate(&self) -> Result<(), BillingError> {
        let bad = |m: &str| Err(BillingError::InvalidRates(m.to_owned()));
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return bad("currency must be a three-letter ISO 4217 code such as USD");
        }
        if self.per_million_ecpu.is_sign_negative()
            || self.per_gb_hour.is_sign_negative()
            || self.per_snapshot_gb_month.is_sign_negative()
            || self.per_dedicated_node_hour.is_sign_negative()
        {
            return bad("prices must not be negative");
        }
        // Keeps every product in the invoice far inside Decimal's 28 digits.
        let max_price = Decimal::from(1_000_000);
        if self.per_million_ecpu > max_price
            || self.per_gb_hour > max_price
            || self.per_snapshot_gb_month > max_price
            || self.per_dedicated_node_hour > max_price
        {
            return bad("prices must be at most 1000000");
        }
        if self.min_storage_mb > 1_000_000 {
            return bad("min_storage_mb must be at most 1000000 (1 TB)");
        }
        Ok(())
    }

    /// Bytes billed at least per cache-hour.
    pub fn min_storage_bytes(&self) -> u64 {
        self.min_storage_mb * BYTES_PER_MB
    }

    /// This card with the fields `o` sets replaced; the result is validated.
    pub fn with_override(&self, o: &RateOverride) -> Result<RateCard, BillingError> {
        let card = RateCard {
            currency: o.currency.clone().unwrap_or_else(|| self.currency.clone()),
            per_million_ecpu: o.per_million_ecpu.unwrap_or(self.per_million_ecpu),
            per_gb_hour: o.per_gb_hour.unwrap_or(self.per_gb_hour),
            min_storage_mb: o.min_storage_mb.unwrap_or(self.min_storage_mb),
            per_snapshot_gb_month: o.per_snapshot_gb_month.unwrap_or(self.per_snapshot_gb_month),
            per_dedicated_node_hour: o.per_dedicated_node_hour.unwrap_or(self.per_dedicated_node_hour),
        };
        card.validate()?;
        Ok(card)
    }
}

/// A plan's deviations from the default card; unset fields keep the default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_million_ecpu: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_gb_hour: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_storage_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_snapshot_gb_month: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_dedicated_node_hour: Option<Decimal>,
}

/// The default card plus per-account plan overrides. Build it with [`PriceList::new`] so that
/// every account's effective card is known to be valid.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceList {
    #[serde(default)]
    pub defaults: RateCard,
    #[serde(default)]
    pub accounts: BTreeMap<AccountId, RateOverride>,
}

impl PriceList {
    /// Validates the defaults and each account's effective card.
    pub fn new(
        defaults: RateCard,
        accounts: BTreeMap<AccountId, RateOverride>,
    ) -> Result<PriceList, BillingError> {
        let list = PriceList { defaults, accounts };
        list.validate()?;
        Ok(list)
    }

    /// Checks what [`PriceList::new`] checks (use after deserializing one).
    pub fn validate(&self) -> Result<(), BillingError> {
        self.defaults.validate()?;
        for (account, o) in &self.accounts {
            self.defaults
                .with_override(o)
                .map_err(|e| BillingError::InvalidRates(format!("account {account}: {e}")))?;
        }
        Ok(())
    }

    /// The card `account` pays: its override applied to the defaults.
    pub fn for_account(&self, account: &AccountId) -> Result<RateCard, BillingError> {
        match self.accounts.get(account) {
            Some(o) => self.defaults.with_override(o),
            None => Ok(self.defaults.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn defaults_are_the_elasticache_serverless_valkey_rates() {
        let r = RateCard::default();
        assert_eq!(r.per_million_ecpu, d("0.0023"));
        assert_eq!(r.per_gb_hour, d("0.084"));
        assert_eq!(r.min_storage_bytes(), 100_000_000);
        assert_eq!(r.currency, "USD");
        r.validate().unwrap();
    }

    #[test]
    fn an_account_override_replaces_only_what_it_sets() {
        let acct = AccountId::parse("a0123456789ab").unwrap();
        let other = AccountId::parse("a0000000000ff").unwrap();
        let o = RateOverride { per_gb_hour: Some(d("0.05")), ..Default::default() };
        let list = PriceList::new(RateCard::default(), [(acct.clone(), o)].into()).unwrap();
        let card = list.for_account(&acct).unwrap();
        assert_eq!(card.per_gb_hour, d("0.05"));
        assert_eq!(card.per_million_ecpu, d("0.0023"));
        assert_eq!(list.for_account(&other).unwrap(), RateCard::default());
    }

    #[test]
    fn bad_rates_are_refused_with_a_clear_message() {
        let neg = RateOverride { per_million_ecpu: Some(d("-0.01")), ..Default::default() };
        let acct = AccountId::parse("a0123456789ab").unwrap();
        let err = PriceList::new(RateCard::default(), [(acct, neg)].into()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid rate card: account a0123456789ab: invalid rate card: prices must not be negative"
        );
        let cur = RateCard { currency: "usd".into(), ..Default::default() };
        assert_eq!(cur.validate().unwrap_err().kind(), "invalid_rates");
    }

    #[test]
    fn a_price_list_loads_from_json_with_prices_as_strings_or_numbers() {
        let json = r#"{"defaults":{"currency":"EUR","per_million_ecpu":"0.002","per_gb_hour":0.07,
            "min_storage_mb":100},"accounts":{"a0123456789ab":{"min_storage_mb":0}}}"#;
        let list: PriceList = serde_json::from_str(json).unwrap();
        list.validate().unwrap();
        assert_eq!(list.defaults.per_gb_hour, d("0.07"));
        let acct = AccountId::parse("a0123456789ab").unwrap();
        assert_eq!(list.for_account(&acct).unwrap().min_storage_mb, 0);
        // Prices are written back as strings, so no client parses money as a float.
        let back = serde_json::to_value(&list.defaults).unwrap();
        assert_eq!(back["per_million_ecpu"], "0.002");
        // A typo in an override is an error, not a silently ignored field.
        assert!(serde_json::from_str::<RateOverride>(r#"{"per_gb_hr":"1"}"#).is_err());
    }
}
