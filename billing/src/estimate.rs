//! Cost estimates before a cache exists, like the AWS pricing calculator: from expected
//! requests per second, request and reply sizes and data stored to a monthly cost, with
//! every step of the arithmetic written out.
//!
//! A request costs `max(command weight, (request + reply bytes) / 1024)` ECPU, the same
//! formula the gateway meters with (docs/architecture.md, "Metering"); a month is 730 hours, as AWS assumes.

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use crate::error::BillingError;
use crate::rates::{RateCard, BYTES_PER_GB, BYTES_PER_MB};

/// Hours in the month an estimate prices (365 × 24 / 12, what AWS's calculator uses).
pub const HOURS_PER_MONTH: u32 = 730;

/// What the caller expects of the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EstimateInput {
    /// Average requests per second over the month.
    pub requests_per_second: Decimal,
    /// Average size of a request on the wire, in bytes.
    pub avg_request_bytes: u64,
    /// Average size of a reply on the wire, in bytes.
    pub avg_reply_bytes: u64,
    /// Average data stored, in GB (10^9 bytes).
    pub stored_gb: Decimal,
    /// CPU cost of the average command relative to a small GET/SET (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_weight: Option<Decimal>,
}

/// One line of the worked arithmetic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EstimateStep {
    /// The step in words and numbers, e.g. `ECPU cost = 5,132.8125 million ECPU × 0.0023 USD = 11.80546875 USD`.
    pub text: String,
    /// The step's result.
    pub value: Decimal,
    /// The result's unit.
    pub unit: String,
}

/// A monthly cost estimate. Intermediate amounts are exact; `monthly_cost` is their sum
/// rounded half-even to cents, as on an invoice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Estimate {
    pub input: EstimateInput,
    pub rates: RateCard,
    pub hours_per_month: u32,
    pub ecpu_per_request: Decimal,
    pub million_ecpu_per_month: Decimal,
    pub ecpu_cost: Decimal,
    /// Data stored, raised to the per-cache minimum.
    pub billed_gb: Decimal,
    pub gb_hours_per_month: Decimal,
    pub storage_cost: Decimal,
    pub monthly_cost: Decimal,
    pub currency: String,
    pub steps: Vec<EstimateStep>,
}

/// Prices `input` at `rates` for a 730-hour month.
pub fn estimate(input: &EstimateInput, rates: &RateCard) -> Result<Estimate, BillingError> {
    rates.validate()?;
    let weight = input.command_weight.unwrap_or(Decimal::ONE);
    check(input, weight)?;
    let cur = rates.currency.as_str();
    let hours = Decimal::from(HOURS_PER_MONTH);
    let mut steps = Vec::new();
    let mut step = |text: String, value: Decimal, unit: &str| {
        steps.push(EstimateStep { text, value, unit: unit.to_owned() });
        value
    };

    let requests = step(
        format!(
            "Requests per month = {} requests/s × 3,600 s/hour × {} hours = {}",
            n(input.requests_per_second),
            HOURS_PER_MONTH,
            n(mul(input.requests_per_second, Decimal::from(3600 * HOURS_PER_MONTH))?)
        ),
        mul(input.requests_per_second, Decimal::from(3600 * HOURS_PER_MONTH))?,
        "requests",
    );
    let bytes = input.avg_request_bytes + input.avg_reply_bytes;
    // ÷ 1024 is exact in decimal (1/1024 = 0.0009765625).
    let kib = (Decimal::from(bytes) / Decimal::from(1024)).normalize();
    step(
        format!(
            "Data per request = {} + {} bytes = {} bytes ÷ 1,024 = {} KiB",
            n(input.avg_request_bytes.into()),
            n(input.avg_reply_bytes.into()),
            n(bytes.into()),
            n(kib)
        ),
        kib,
        "KiB",
    );
    let per_request = kib.max(weight);
    step(
        format!(
            "ECPU per request = max(command weight {}, {} KiB transferred) = {}",
            n(weight),
            n(kib),
            n(per_request)
        ),
        per_request,
        "ECPU",
    );
    let ecpu = mul(requests, per_request)?;
    step(
        format!("ECPU per month = {} requests × {} = {}", n(requests), n(per_request), n(ecpu)),
        ecpu,
        "ECPU",
    );
    let million_ecpu = (ecpu / Decimal::from(1_000_000)).normalize();
    let ecpu_cost = mul(million_ecpu, rates.per_million_ecpu)?;
    step(
        format!(
            "ECPU cost = {} million ECPU × {} {cur} = {} {cur}",
            n(million_ecpu),
            n(rates.per_million_ecpu),
            n(ecpu_cost)
        ),
        ecpu_cost,
        cur,
    );

    let min_gb =
        (Decimal::from(rates.min_storage_mb * BYTES_PER_MB) / Decimal::from(BYTES_PER_GB)).normalize();
    let billed_gb = input.stored_gb.max(min_gb).normalize();
    step(
        format!(
            "Billed storage = max({} GB stored, {} GB minimum) = {} GB",
            n(input.stored_gb),
            n(min_gb),
            n(billed_gb)
        ),
        billed_gb,
        "GB",
    );
    let gb_hours = mul(billed_gb, hours)?;
    step(
        format!(
            "Storage per month = {} GB × {} hours = {} GB-hours",
            n(billed_gb),
            HOURS_PER_MONTH,
            n(gb_hours)
        ),
        gb_hours,
        "GB-hour",
    );
    let storage_cost = mul(gb_hours, rates.per_gb_hour)?;
    step(
        format!(
            "Storage cost = {} GB-hours × {} {cur} = {} {cur}",
            n(gb_hours),
            n(rates.per_gb_hour),
            n(storage_cost)
        ),
        storage_cost,
        cur,
    );
    let exact = (ecpu_cost + storage_cost).normalize();
    let mut monthly = exact.round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven);
    monthly.rescale(2);
    step(
        format!(
            "Monthly cost = {} + {} = {} {cur}, rounded to {} {cur}",
            n(ecpu_cost),
            n(storage_cost),
            n(exact),
            n(monthly)
        ),
        monthly,
        cur,
    );

    Ok(Estimate {
        input: input.clone(),
        rates: rates.clone(),
        hours_per_month: HOURS_PER_MONTH,
        ecpu_per_request: per_request,
        million_ecpu_per_month: million_ecpu,
        ecpu_cost,
        billed_gb,
        gb_hours_per_month: gb_hours,
        storage_cost,
        monthly_cost: monthly,
        currency: rates.currency.clone(),
        steps,
    })
}

/// Bounds that keep every product well inside `Decimal` and reject nonsense.
fn check(input: &EstimateInput, weight: Decimal) -> Result<(), BillingError> {
    let bad = |m: &str| Err(BillingError::InvalidEstimate(m.to_owned()));
    if input.requests_per_second.is_sign_negative()
        || input.requests_per_second > Decimal::from(1_000_000_000)
    {
        return bad("requests_per_second must be between 0 and 1000000000");
    }
    const MAX_BYTES: u64 = 512 * 1024 * 1024; // Valkey's largest bulk string
    if input.avg_request_bytes > MAX_BYTES || input.avg_reply_bytes > MAX_BYTES {
        return bad("avg_request_bytes and avg_reply_bytes must be at most 536870912 (512 MiB)");
    }
    if input.stored_gb.is_sign_negative() || input.stored_gb > Decimal::from(1_000_000) {
        return bad("stored_gb must be between 0 and 1000000");
    }
    if weight <= Decimal::ZERO || weight > Decimal::from(1_000_000) {
        return bad("command_weight must be greater than 0 and at most 1000000");
    }
    Ok(())
}

fn mul(a: Decimal, b: Decimal) -> Result<Decimal, BillingError> {
    a.checked_mul(b)
        .map(|p| p.normalize())
        .ok_or_else(|| BillingError::InvalidEstimate("the numbers are too large to price".to_owned()))
}

/// `d` with thousands separators: 2628000000 → `2,628,000,000`, 5132.8125 → `5,132.8125`.
/// Trailing zeros are kept (callers normalize where they do not want them).
fn n(d: Decimal) -> String {
    let s = d.to_string();
    let (int, frac) = s.split_once('.').map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn input(rps: &str, req: u64, reply: u64, gb: &str) -> EstimateInput {
        EstimateInput {
            requests_per_second: d(rps),
            avg_request_bytes: req,
            avg_reply_bytes: reply,
            stored_gb: d(gb),
            command_weight: None,
        }
    }

    /// Worked by hand: 1,000 requests/s of 500-byte requests and 1,500-byte replies over
    /// 10 GB, at the default (ElastiCache Serverless Valkey, us-east-1) rates.
    #[test]
    fn worked_example_step_by_step() {
        let e = estimate(&input("1000", 500, 1500, "10"), &RateCard::default()).unwrap();
        let text: Vec<&str> = e.steps.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            text,
            [
                "Requests per month = 1,000 requests/s × 3,600 s/hour × 730 hours = 2,628,000,000",
                "Data per request = 500 + 1,500 bytes = 2,000 bytes ÷ 1,024 = 1.953125 KiB",
                "ECPU per request = max(command weight 1, 1.953125 KiB transferred) = 1.953125",
                "ECPU per month = 2,628,000,000 requests × 1.953125 = 5,132,812,500",
                "ECPU cost = 5,132.8125 million ECPU × 0.0023 USD = 11.80546875 USD",
                "Billed storage = max(10 GB stored, 0.1 GB minimum) = 10 GB",
                "Storage per month = 10 GB × 730 hours = 7,300 GB-hours",
                "Storage cost = 7,300 GB-hours × 0.084 USD = 613.2 USD",
                "Monthly cost = 11.80546875 + 613.2 = 625.00546875 USD, rounded to 625.01 USD",
            ]
        );
        assert_eq!(e.million_ecpu_per_month, d("5132.8125"));
        assert_eq!(e.ecpu_cost, d("11.80546875"));
        assert_eq!(e.storage_cost, d("613.2"));
        assert_eq!(e.monthly_cost.to_string(), "625.01");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["monthly_cost"], "625.01");
        assert_eq!(json["steps"][4]["value"], "11.80546875");
        assert_eq!(json["steps"][4]["unit"], "USD");
    }

    #[test]
    fn an_idle_cache_costs_the_storage_minimum() {
        // 0.1 GB × 730 h × $0.084 = $6.132 a month: the ~$6 floor of a Valkey serverless cache.
        let e = estimate(&input("0", 0, 0, "0"), &RateCard::default()).unwrap();
        assert_eq!(e.ecpu_cost, Decimal::ZERO);
        assert_eq!(e.gb_hours_per_month, d("73"));
        assert_eq!(e.monthly_cost.to_string(), "6.13");
    }

    #[test]
    fn a_heavy_command_costs_its_weight_when_it_moves_little_data() {
        let mut i = input("10", 40, 60, "1");
        i.command_weight = Some(d("4.5"));
        let e = estimate(&i, &RateCard::default()).unwrap();
        assert_eq!(e.ecpu_per_request, d("4.5"));
        assert!(e.steps[2].text.starts_with("ECPU per request = max(command weight 4.5, 0.09765625 KiB"));
        // 10 × 3,600 × 730 × 4.5 = 118,260,000 ECPU.
        assert_eq!(e.million_ecpu_per_month, d("118.26"));
    }

    #[test]
    fn nonsense_is_refused_with_a_clear_message() {
        let mut neg = input("-1", 1, 1, "1");
        assert_eq!(
            estimate(&neg, &RateCard::default()).unwrap_err().to_string(),
            "invalid estimate: requests_per_second must be between 0 and 1000000000"
        );
        neg = input("1", 1, 1, "1");
        neg.command_weight = Some(Decimal::ZERO);
        assert_eq!(estimate(&neg, &RateCard::default()).unwrap_err().kind(), "invalid_estimate");
        assert!(estimate(&input("1", 1 << 40, 1, "1"), &RateCard::default()).is_err());
        assert!(estimate(&input("1", 1, 1, "-0.5"), &RateCard::default()).is_err());
        // The largest accepted input still prices without overflow.
        let mut max = input("1000000000", 512 << 20, 512 << 20, "1000000");
        max.command_weight = Some(d("1000000"));
        let big_rates =
            RateCard { per_million_ecpu: d("1000000"), per_gb_hour: d("1000000"), ..Default::default() };
        estimate(&max, &big_rates).unwrap();
    }

    #[test]
    fn input_parses_from_the_rest_json() {
        let i: EstimateInput = serde_json::from_str(
            r#"{"requests_per_second": 1000, "avg_request_bytes": 500, "avg_reply_bytes": 1500, "stored_gb": "10"}"#,
        )
        .unwrap();
        assert_eq!(i, input("1000", 500, 1500, "10"));
        assert!(serde_json::from_str::<EstimateInput>(r#"{"requests_per_second": 1}"#).is_err());
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(n(d("2628000000")), "2,628,000,000");
        assert_eq!(n(d("5132.8125")), "5,132.8125");
        assert_eq!(n(d("100")), "100");
        assert_eq!(n(d("0.0023")), "0.0023");
        assert_eq!(n(d("1613.20")), "1,613.20");
    }
}
