//! Monthly invoices per account (calendar months, UTC): one line per cache and meter, priced
//! from hourly rollups, rendered as JSON (serde), CSV and a printable HTML page.
//!
//! Rounding: quantities and line amounts are kept exact (ECPU to the milli-ECPU; GB-hours to
//! 10 decimal places, rounded half-even — 10^-10 GB-hour is 0.36 byte-seconds), the subtotal
//! is their exact sum and only the invoice total is rounded, half-even, to cents. This follows
//! AWS, whose cost and usage report keeps line items unrounded and whose bill rounds the sum.
//! We found no AWS document that names the tie-breaking rule; half-even is our choice, as it
//! has no bias over many invoices.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use shoal_types::{AccountId, CacheId, CacheUsage};

use crate::error::BillingError;
use crate::rates::RateCard;
use crate::rollup::{rollup, StorageSample, HOUR};

/// A calendar month in UTC, written `YYYY-MM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Month {
    year: i32,
    month: u32,
}

impl Month {
    /// `month` is 1–12; years 1970–9999.
    pub fn new(year: i32, month: u32) -> Result<Month, BillingError> {
        if (1970..=9999).contains(&year) && (1..=12).contains(&month) {
            Ok(Month { year, month })
        } else {
            Err(BillingError::InvalidMonth(format!("{year:04}-{month:02}")))
        }
    }

    /// Parses `YYYY-MM`.
    pub fn parse(s: &str) -> Result<Month, BillingError> {
        let bad = || BillingError::InvalidMonth(s.chars().take(32).collect());
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 || !(y.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit())) {
            return Err(bad());
        }
        Month::new(y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?).map_err(|_| bad())
    }

    /// The month containing the instant `t` (Unix seconds).
    pub fn containing(t: i64) -> Result<Month, BillingError> {
        let at = DateTime::from_timestamp(t, 0).ok_or(BillingError::InvalidTime(t))?;
        Month::new(at.year(), at.month()).map_err(|_| BillingError::InvalidTime(t))
    }

    pub fn year(self) -> i32 {
        self.year
    }

    pub fn month(self) -> u32 {
        self.month
    }

    /// The following month.
    pub fn next(self) -> Month {
        if self.month == 12 {
            Month { year: self.year + 1, month: 1 }
        } else {
            Month { year: self.year, month: self.month + 1 }
        }
    }

    /// First second of the month (Unix seconds).
    pub fn start(self) -> i64 {
        NaiveDate::from_ymd_opt(self.year, self.month, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc().timestamp())
            .expect("a valid Month has a first day")
    }

    /// First second after the month (Unix seconds).
    pub fn end(self) -> i64 {
        self.next().start()
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl TryFrom<String> for Month {
    type Error = BillingError;
    fn try_from(s: String) -> Result<Month, BillingError> {
        Month::parse(&s)
    }
}

impl From<Month> for String {
    fn from(m: Month) -> String {
        m.to_string()
    }
}

/// A month's invoice is a draft while the month runs, final once it has ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InvoiceStatus {
    Draft,
    Final,
}

/// What a line charges for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Meter {
    /// Requests, in ElastiCache Processing Units.
    Ecpu,
    /// Data stored, in GB-hours.
    Storage,
    /// Snapshot files kept, in GB-months.
    Snapshots,
    /// A dedicated cache's node, in node-hours.
    #[serde(rename = "dedicated_node")]
    DedicatedNode,
}

impl Meter {
    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Ecpu => "ecpu",
            Meter::Storage => "storage",
            Meter::Snapshots => "snapshots",
            Meter::DedicatedNode => "dedicated_node",
        }
    }

    /// The unit a line's quantity is counted in.
    pub fn unit(self) -> &'static str {
        match self {
            Meter::Ecpu => "million ECPU",
            Meter::Storage => "GB-hour",
            Meter::Snapshots => "GB-month",
            Meter::DedicatedNode => "node-hour",
        }
    }
}

/// One cache's charge for one meter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InvoiceLine {
    #[schema(value_type = String, example = "c0123456789ab")]
    pub cache_id: CacheId,
    /// The cache's name when the invoice was made (see [`Invoice::set_cache_names`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_name: Option<String>,
    pub meter: Meter,
    /// Exact: million ECPU to 9 decimals (= milli-ECPU), GB-hours to 10 decimals.
    pub quantity: Decimal,
    /// `million ECPU` or `GB-hour`.
    pub unit: String,
    pub unit_price: Decimal,
    /// `quantity × unit_price`, not rounded.
    pub amount: Decimal,
}

/// An account's bill for one month. Amounts serialize as decimal strings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Invoice {
    #[schema(value_type = String, example = "a0123456789ab")]
    pub account_id: AccountId,
    /// `YYYY-MM` (UTC).
    #[schema(value_type = String, example = "2026-11")]
    pub month: Month,
    pub status: InvoiceStatus,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// Usage before this instant is included: the month's end for a final invoice, the
    /// start of the current minute (the end of the last completed one) for a draft.
    pub usage_until: DateTime<Utc>,
    pub currency: String,
    /// The rates the lines were priced at.
    pub rates: RateCard,
    /// Sorted by cache id, then meter (ECPU before storage).
    pub lines: Vec<InvoiceLine>,
    /// Exact sum of the line amounts.
    pub subtotal: Decimal,
    /// `subtotal` rounded half-even to cents: what is owed.
    pub total: Decimal,
}

/// Builds `account_id`'s invoice for `month` as of `now` (Unix seconds).
///
/// `usage` and `storage` are the rows of the account's caches (deduplicated by the store);
/// rows outside the month, or not before the last completed minute, are ignored, so a
/// superset may be passed. A cache appears when it has any row in the covered period; it then
/// gets an ECPU line and a storage line, the storage line billing each of its hours at
/// least the card's minimum (the running hour of a draft only for its elapsed seconds).
pub fn build_invoice<'a>(
    account_id: &AccountId,
    month: Month,
    usage: impl IntoIterator<Item = &'a CacheUsage>,
    storage: impl IntoIterator<Item = &'a StorageSample>,
    rates: &RateCard,
    now: i64,
) -> Result<Invoice, BillingError> {
    rates.validate()?;
    let (start, end) = (month.start(), month.end());
    if now < start {
        return Err(BillingError::FutureMonth(month.to_string()));
    }
    let until = end.min(now.div_euclid(60) * 60);
    let status = if now >= end { InvoiceStatus::Final } else { InvoiceStatus::Draft };
    let covered = |minute: i64| (start..until).contains(&minute);
    let rollups = rollup(
        usage.into_iter().filter(|u| covered(u.minute)),
        storage.into_iter().filter(|s| covered(s.minute)),
    );

    // Per cache: exact milli-ECPU and billed byte-seconds (u128: a month of a large cache
    // exceeds u64 byte-seconds).
    let mut per_cache: BTreeMap<&CacheId, (u128, u128)> = BTreeMap::new();
    for r in &rollups {
        let seconds = until.min(r.hour + HOUR) - r.hour;
        let e = per_cache.entry(&r.cache_id).or_default();
        e.0 += r.counters.ecpu_milli as u128;
        e.1 += r.billed_byte_seconds(rates.min_storage_bytes(), seconds);
    }

    let mut lines = Vec::with_capacity(per_cache.len() * 2);
    for (cache_id, (ecpu_milli, byte_seconds)) in per_cache {
        // 10^9 milli-ECPU = 1 million ECPU: scale 9 is exact.
        let ecpu = decimal(ecpu_milli as i128, 9);
        // 1 GB-hour = 3.6 × 10^12 byte-seconds, so 10^-10 GB-hour = 360 byte-seconds.
        let gb_hours = decimal(div_half_even(byte_seconds, 360) as i128, 10);
        for (meter, quantity, unit_price) in
            [(Meter::Ecpu, ecpu, rates.per_million_ecpu), (Meter::Storage, gb_hours, rates.per_gb_hour)]
        {
            lines.push(InvoiceLine {
                cache_id: cache_id.clone(),
                cache_name: None,
                meter,
                quantity,
                unit: meter.unit().to_owned(),
                unit_price,
                // Validated prices (≤ 10^6) keep this product far from Decimal's limit.
                amount: (quantity * unit_price).normalize(),
            });
        }
    }
    let (subtotal, total) = totals(&lines);

    let at = |t: i64| DateTime::from_timestamp(t, 0).ok_or(BillingError::InvalidTime(t));
    Ok(Invoice {
        account_id: account_id.clone(),
        month,
        status,
        period_start: at(start)?,
        period_end: at(end)?,
        usage_until: at(until)?,
        currency: rates.currency.clone(),
        rates: rates.clone(),
        lines,
        subtotal,
        total,
    })
}

/// The exact sum of the lines' amounts, and it rounded half-even to cents.
fn totals(lines: &[InvoiceLine]) -> (Decimal, Decimal) {
    let subtotal = lines.iter().map(|l| l.amount).sum::<Decimal>().normalize();
    let mut total = subtotal.round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven);
    total.rescale(2);
    (subtotal, total)
}

/// A snapshot file as kept: its size and when it was kept (Unix seconds; `until` None:
/// still kept). See [`Invoice::add_snapshot_storage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptSnapshot {
    pub cache_id: CacheId,
    pub bytes: u64,
    pub from: i64,
    pub until: Option<i64>,
}

/// A dedicated cache's time on its node (Unix seconds; `until` None: still there). See
/// [`Invoice::add_dedicated_nodes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedicatedSpan {
    pub cache_id: CacheId,
    pub from: i64,
    pub until: Option<i64>,
}

/// `mantissa × 10^-scale`, normalized (no trailing zeros). Callers keep mantissas below
/// 2^96 (a month of u64 counters stays far below).
fn decimal(mantissa: i128, scale: u32) -> Decimal {
    Decimal::from_i128_with_scale(mantissa, scale).normalize()
}

/// `n / d` rounded to the nearest integer, ties to even.
fn div_half_even(n: u128, d: u128) -> u128 {
    let (q, r) = (n / d, n % d);
    match (2 * r).cmp(&d) {
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal if q % 2 == 1 => q + 1,
        _ => q,
    }
}

impl Invoice {
    /// Records the caches' current names on the lines (names are tenant input: the renderers
    /// escape them).
    pub fn set_cache_names(&mut self, names: &BTreeMap<CacheId, String>) {
        for line in &mut self.lines {
            line.cache_name = names.get(&line.cache_id).cloned();
        }
    }

    /// Adds a snapshot-storage line per cache whose snapshots were kept in the invoice's
    /// period (up to `usage_until`): bytes × seconds kept, in GB-months of this month's
    /// length (to 10 decimals), at the card's `per_snapshot_gb_month`. Lines stay sorted by
    /// cache, then meter; the totals are recomputed.
    pub fn add_snapshot_storage(&mut self, snapshots: &[KeptSnapshot]) {
        let month_seconds = (self.period_end.timestamp() - self.period_start.timestamp()).max(1) as u128;
        let kept = snapshots.iter().map(|s| (&s.cache_id, s.from, s.until, s.bytes as u128));
        // GB-months × 10^10 = byte-seconds × 10^10 / (10^9 × month seconds).
        let quantity = |byte_seconds: u128| div_half_even(byte_seconds * 10, month_seconds);
        self.add_time_lines(Meter::Snapshots, self.rates.per_snapshot_gb_month, kept, quantity);
    }

    /// Adds a node-hour line per dedicated cache that had its node in the invoice's period
    /// (up to `usage_until`): the seconds it held it, in hours to 10 decimals, at the card's
    /// `per_dedicated_node_hour` (billed per second, as ElastiCache bills nodes). Lines stay
    /// sorted; the totals are recomputed.
    pub fn add_dedicated_nodes(&mut self, spans: &[DedicatedSpan]) {
        let held = spans.iter().map(|s| (&s.cache_id, s.from, s.until, 1));
        // Hours × 10^10 = seconds × 10^10 / 3600.
        let quantity = |seconds: u128| div_half_even(seconds * 10_000_000_000, 3600);
        self.add_time_lines(Meter::DedicatedNode, self.rates.per_dedicated_node_hour, held, quantity);
    }

    /// Adds a `meter` line per cache of `spans` (cache, from, until or None: still, weight)
    /// that overlap the invoice's period up to `usage_until`: its weight × seconds within it,
    /// turned by `quantity` into the meter's unit × 10^10, at `price`. Lines stay sorted by
    /// cache, then meter; the totals are recomputed.
    fn add_time_lines<'a>(
        &mut self,
        meter: Meter,
        price: Decimal,
        spans: impl Iterator<Item = (&'a CacheId, i64, Option<i64>, u128)>,
        quantity: impl Fn(u128) -> u128,
    ) {
        let (start, until) = (self.period_start.timestamp(), self.usage_until.timestamp());
        let mut per_cache: BTreeMap<&CacheId, u128> = BTreeMap::new();
        for (cache_id, from, to, weight) in spans {
            let (from, to) = (from.max(start), to.unwrap_or(i64::MAX).min(until));
            if to > from {
                *per_cache.entry(cache_id).or_default() += weight * (to - from) as u128;
            }
        }
        for (cache_id, amount) in per_cache {
            let quantity = decimal(quantity(amount) as i128, 10);
            self.lines.push(InvoiceLine {
                cache_id: cache_id.clone(),
                cache_name: None,
                meter,
                quantity,
                unit: meter.unit().to_owned(),
                unit_price: price,
                amount: (quantity * price).normalize(),
            });
        }
        self.lines.sort_by(|a, b| (&a.cache_id, a.meter).cmp(&(&b.cache_id, b.meter)));
        (self.subtotal, self.total) = totals(&self.lines);
    }

    /// The lines as CSV (RFC 4180, CRLF line ends) with a header row, then one `total` row.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        let mut row = |fields: &[&str]| {
            let cells: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
            out.push_str(&cells.join(","));
            out.push_str("\r\n");
        };
        row(&[
            "account_id",
            "month",
            "status",
            "cache_id",
            "cache_name",
            "meter",
            "quantity",
            "unit",
            "unit_price",
            "amount",
            "currency",
        ]);
        let (account, month, status) =
            (self.account_id.to_string(), self.month.to_string(), self.status_str());
        for l in &self.lines {
            row(&[
                &account,
                &month,
                status,
                l.cache_id.as_str(),
                l.cache_name.as_deref().unwrap_or(""),
                l.meter.as_str(),
                &l.quantity.to_string(),
                &l.unit,
                &l.unit_price.to_string(),
                &l.amount.to_string(),
                &self.currency,
            ]);
        }
        row(&[
            &account,
            &month,
            status,
            "",
            "",
            "total",
            "",
            "",
            "",
            &self.total.to_string(),
            &self.currency,
        ]);
        out
    }

    /// A self-contained, printable HTML page (inline CSS, no scripts, every text escaped).
    pub fn to_html(&self) -> String {
        let e = html_escape;
        let mut rows = String::new();
        for l in &self.lines {
            let cache = match &l.cache_name {
                Some(name) => format!("{} <span class=\"id\">{}</span>", e(name), e(l.cache_id.as_str())),
                None => e(l.cache_id.as_str()),
            };
            rows.push_str(&format!(
                "<tr><td>{cache}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>\n",
                e(l.meter.as_str()),
                e(&l.quantity.to_string()),
                e(&l.unit),
                e(&l.unit_price.to_string()),
                e(&l.amount.to_string()),
            ));
        }
        if self.lines.is_empty() {
            rows.push_str("<tr><td colspan=\"6\">No usage in this period.</td></tr>\n");
        }
        let status = match self.status {
            InvoiceStatus::Final => "Final".to_owned(),
            InvoiceStatus::Draft => format!("Draft: usage up to {}", rfc3339(&self.usage_until)),
        };
        format!(
            r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Invoice {account} {month}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #111; }}
table {{ border-collapse: collapse; width: 100%; margin-top: 1em; }}
th, td {{ border-bottom: 1px solid #ccc; padding: .35em .6em; text-align: left; }}
.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.id {{ color: #666; font-size: .85em; }}
tfoot td {{ font-weight: bold; border-bottom: none; }}
.note {{ color: #555; font-size: .85em; }}
@media print {{ body {{ margin: 0; }} }}
</style>
</head>
<body>
<h1>Invoice</h1>
<dl>
<dt>Account</dt><dd>{account}</dd>
<dt>Period</dt><dd>{month} ({start} to {end})</dd>
<dt>Status</dt><dd>{status}</dd>
<dt>Rates</dt><dd>{ecpu_price} {currency} per million ECPU; {gb_price} {currency} per GB-hour; at least {min_mb} MB per cache-hour</dd>
</dl>
<table>
<thead><tr><th>Cache</th><th>Meter</th><th class="num">Quantity</th><th>Unit</th><th class="num">Unit price</th><th class="num">Amount</th></tr></thead>
<tbody>
{rows}</tbody>
<tfoot>
<tr><td colspan="5">Subtotal</td><td class="num">{subtotal}</td></tr>
<tr><td colspan="5">Total ({currency})</td><td class="num">{total}</td></tr>
</tfoot>
</table>
<p class="note">Amounts are exact; the total is the subtotal rounded half-even to cents. GB = 10<sup>9</sup> bytes.</p>
</body>
</html>
"#,
            account = e(self.account_id.as_str()),
            month = e(&self.month.to_string()),
            start = e(&rfc3339(&self.period_start)),
            end = e(&rfc3339(&self.period_end)),
            status = e(&status),
            ecpu_price = e(&self.rates.per_million_ecpu.to_string()),
            gb_price = e(&self.rates.per_gb_hour.to_string()),
            min_mb = self.rates.min_storage_mb,
            currency = e(&self.currency),
            subtotal = e(&self.subtotal.to_string()),
            total = e(&self.total.to_string()),
        )
    }

    fn status_str(&self) -> &'static str {
        match self.status {
            InvoiceStatus::Draft => "draft",
            InvoiceStatus::Final => "final",
        }
    }
}

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Quotes a CSV field when needed; a field a spreadsheet would run as a formula gets a
/// leading apostrophe (cache names are tenant input).
fn csv_field(f: &str) -> String {
    let f = if f.starts_with(['=', '+', '-', '@', '\t', '\r']) && f.parse::<Decimal>().is_err() {
        format!("'{f}")
    } else {
        f.to_owned()
    };
    if f.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f
    }
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::tests::{cache, stored, usage};
    use std::str::FromStr;

    const NOV: i64 = 1_793_491_200; // 2026-11-01T00:00:00Z
    const DEC: i64 = 1_796_083_200; // 2026-12-01T00:00:00Z

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn acct() -> AccountId {
        AccountId::parse("a0123456789ab").unwrap()
    }

    fn nov() -> Month {
        Month::parse("2026-11").unwrap()
    }

    #[test]
    fn months_parse_and_know_their_bounds() {
        assert_eq!((nov().start(), nov().end()), (NOV, DEC));
        assert_eq!(Month::containing(DEC - 1).unwrap(), nov());
        assert_eq!(Month::containing(DEC).unwrap().to_string(), "2026-12");
        assert_eq!(Month::parse("2026-12").unwrap().next().to_string(), "2027-01");
        let feb = Month::new(2028, 2).unwrap();
        assert_eq!(feb.end() - feb.start(), 29 * 86_400);
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "2026-00", "+026-11", "1969-12", ""] {
            assert_eq!(Month::parse(bad).unwrap_err().kind(), "invalid_month", "{bad}");
        }
        assert_eq!(serde_json::to_string(&nov()).unwrap(), "\"2026-11\"");
        assert!(serde_json::from_str::<Month>("\"2026-13\"").is_err());
    }

    #[test]
    fn a_final_invoice_prices_each_cache_and_meter() {
        // Cache 1: 3 × 10^9 milli-ECPU (3 million ECPU) and 1 GB for 2 hours.
        // Cache 2: 1.5 ECPU, nothing stored, in one hour: the 100 MB minimum applies.
        let usage = [usage(1, NOV, 1_000_000_000), usage(1, NOV + 3600, 2_000_000_000), usage(2, NOV, 1_500)];
        let gb_hour = 3600 * 1_000_000_000;
        let storage = [stored(1, NOV, gb_hour), stored(1, NOV + 3600, gb_hour)];
        let inv = build_invoice(&acct(), nov(), &usage, &storage, &RateCard::default(), DEC + 10).unwrap();
        assert_eq!(inv.status, InvoiceStatus::Final);
        assert_eq!(inv.usage_until.timestamp(), DEC);
        let got: Vec<_> = inv
            .lines
            .iter()
            .map(|l| (l.cache_id.clone(), l.meter, l.quantity, l.unit.as_str(), l.amount))
            .collect();
        assert_eq!(
            got,
            [
                (cache(1), Meter::Ecpu, d("3"), "million ECPU", d("0.0069")),
                (cache(1), Meter::Storage, d("2"), "GB-hour", d("0.168")),
                (cache(2), Meter::Ecpu, d("0.0000015"), "million ECPU", d("0.00000000345")),
                (cache(2), Meter::Storage, d("0.1"), "GB-hour", d("0.0084")),
            ]
        );
        assert_eq!(inv.subtotal, d("0.18330000345"));
        assert_eq!(inv.total.to_string(), "0.18");
        let json = serde_json::to_value(&inv).unwrap();
        assert_eq!(json["lines"][1]["amount"], "0.168");
        assert_eq!(json["lines"][0]["meter"], "ecpu");
        assert_eq!(json["status"], "final");
        assert_eq!(json["month"], "2026-11");
        assert_eq!(json["period_start"], "2026-11-01T00:00:00Z");
        assert_eq!(serde_json::from_value::<Invoice>(json).unwrap(), inv);
    }

    #[test]
    fn a_draft_covers_completed_minutes_only() {
        let now = NOV + 2 * 3600 + 10 * 60 + 30; // 02:10:30 on the 1st
        let rows = [
            usage(1, NOV + 2 * 3600 + 9 * 60, 7),  // 02:09, complete: counted
            usage(1, NOV + 2 * 3600 + 10 * 60, 5), // 02:10, still running: not yet
            usage(1, NOV - 60, 1_000),             // October
        ];
        let inv = build_invoice(&acct(), nov(), &rows, &[], &RateCard::default(), now).unwrap();
        assert_eq!(inv.status, InvoiceStatus::Draft);
        assert_eq!(inv.usage_until.timestamp(), NOV + 2 * 3600 + 10 * 60);
        assert_eq!(inv.lines[0].quantity, d("0.000000007"));
        // The running hour bills the minimum for its 10 elapsed minutes: 0.1 GB × 1/6 h.
        assert_eq!(inv.lines[1].quantity, d("0.0166666667"));
        let later = build_invoice(&acct(), nov(), &rows, &[], &RateCard::default(), now + 60).unwrap();
        assert_eq!(later.lines[0].quantity, d("0.000000012"));
    }

    #[test]
    fn a_late_row_is_billed_in_the_month_of_its_minute() {
        // Sent on December 1st for 23:59 on November 30th: November's invoice has it.
        let late = [usage(1, DEC - 60, 4_000), usage(1, DEC, 1_000)];
        let n = build_invoice(&acct(), nov(), &late, &[], &RateCard::default(), DEC + 120).unwrap();
        let dec = build_invoice(&acct(), nov().next(), &late, &[], &RateCard::default(), DEC + 120).unwrap();
        assert_eq!(n.lines[0].quantity, d("0.000004"));
        assert_eq!(dec.lines[0].quantity, d("0.000001"));
        assert_eq!((n.status, dec.status), (InvoiceStatus::Final, InvoiceStatus::Draft));
    }

    #[test]
    fn the_total_is_rounded_half_even_to_cents() {
        let rates =
            |price: &str| RateCard { per_million_ecpu: d(price), min_storage_mb: 0, ..Default::default() };
        let one_million = [usage(1, NOV, 1_000_000_000)];
        for (price, total) in [("0.125", "0.12"), ("0.135", "0.14"), ("0.1251", "0.13"), ("0", "0.00")] {
            let inv = build_invoice(&acct(), nov(), &one_million, &[], &rates(price), DEC).unwrap();
            assert_eq!(inv.subtotal, d(price));
            assert_eq!(inv.total.to_string(), total, "price {price}");
        }
    }

    #[test]
    fn bad_input_is_refused() {
        let err = build_invoice(&acct(), nov(), &[], &[], &RateCard::default(), NOV - 1).unwrap_err();
        assert_eq!(err.to_string(), "the month 2026-11 has not started yet");
        let bad = RateCard { per_gb_hour: d("-1"), ..Default::default() };
        assert_eq!(build_invoice(&acct(), nov(), &[], &[], &bad, DEC).unwrap_err().kind(), "invalid_rates");
    }

    #[test]
    fn half_even_division() {
        assert_eq!(div_half_even(180, 360), 0);
        assert_eq!(div_half_even(540, 360), 2);
        assert_eq!(div_half_even(181, 360), 1);
        assert_eq!(div_half_even(719, 360), 2);
    }

    #[test]
    fn the_openapi_schema_shows_money_and_months_as_strings() {
        use utoipa::PartialSchema;
        let schema = serde_json::to_value(Invoice::schema()).unwrap();
        for field in ["total", "subtotal", "month", "account_id", "period_start"] {
            assert_eq!(schema["properties"][field]["type"], "string", "{field}: {schema}");
        }
        let line = serde_json::to_value(InvoiceLine::schema()).unwrap();
        assert_eq!(line["properties"]["amount"]["type"], "string", "{line}");
    }

    fn sample_invoice() -> Invoice {
        let rows = [usage(1, NOV, 2_000_000_000)];
        let mut inv = build_invoice(&acct(), nov(), &rows, &[], &RateCard::default(), DEC).unwrap();
        inv.set_cache_names(&[(cache(1), "=cmd|\"</td><script>x</script>, 'y'".to_owned())].into());
        inv
    }

    #[test]
    fn csv_has_a_row_per_line_and_a_total() {
        let csv = sample_invoice().to_csv();
        let expected = "account_id,month,status,cache_id,cache_name,meter,quantity,unit,unit_price,amount,currency\r\n\
            a0123456789ab,2026-11,final,c000000000001,\"'=cmd|\"\"</td><script>x</script>, 'y'\",ecpu,2,million ECPU,0.0023,0.0046,USD\r\n\
            a0123456789ab,2026-11,final,c000000000001,\"'=cmd|\"\"</td><script>x</script>, 'y'\",storage,0.1,GB-hour,0.084,0.0084,USD\r\n\
            a0123456789ab,2026-11,final,,,total,,,,0.01,USD\r\n";
        assert_eq!(csv, expected);
    }

    #[test]
    fn html_is_self_contained_and_escapes_tenant_text() {
        let html = sample_invoice().to_html();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("=cmd|&quot;&lt;/td&gt;&lt;script&gt;x&lt;/script&gt;, &#39;y&#39;"));
        assert!(html.contains("<td class=\"num\">0.0046</td>"));
        assert!(html.contains("<tr><td colspan=\"5\">Total (USD)</td><td class=\"num\">0.01</td></tr>"));
        assert!(!html.contains("http"), "no external resources");
        let mut draft = sample_invoice();
        draft.status = InvoiceStatus::Draft;
        assert!(draft.to_html().contains("Draft: usage up to 2026-12-01T00:00:00Z"));
    }

    #[test]
    fn snapshot_storage_is_billed_per_gb_month_for_the_time_each_file_was_kept() {
        let mut inv =
            build_invoice(&acct(), nov(), &[usage(1, NOV, 1_000)], &[], &RateCard::default(), DEC).unwrap();
        let before = inv.subtotal;
        let kept = [
            // 3 GB the whole month; 2 GB for half of it (deleted mid-month), of a cache with
            // no other line; one taken after the month and one deleted before it: nothing.
            KeptSnapshot { cache_id: cache(1), bytes: 3_000_000_000, from: NOV - 86_400, until: None },
            KeptSnapshot {
                cache_id: cache(2),
                bytes: 2_000_000_000,
                from: NOV,
                until: Some(NOV + (DEC - NOV) / 2),
            },
            KeptSnapshot { cache_id: cache(2), bytes: 9, from: DEC + 1, until: None },
            KeptSnapshot { cache_id: cache(3), bytes: 9, from: NOV - 10, until: Some(NOV - 1) },
        ];
        inv.add_snapshot_storage(&kept);
        let snapshots: Vec<_> = inv.lines.iter().filter(|l| l.meter == Meter::Snapshots).collect();
        assert_eq!(snapshots.len(), 2);
        assert_eq!((&snapshots[0].cache_id, snapshots[0].quantity), (&cache(1), d("3")));
        assert_eq!((&snapshots[1].cache_id, snapshots[1].quantity), (&cache(2), d("1")));
        assert_eq!(snapshots[0].unit, "GB-month");
        assert_eq!(snapshots[0].amount, d("0.255"), "3 GB-months at $0.085");
        assert_eq!(inv.subtotal, before + d("0.34"));
        let order: Vec<_> = inv.lines.iter().map(|l| (l.cache_id.clone(), l.meter)).collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "lines sorted by cache, then meter");
    }

    #[test]
    fn a_dedicated_node_is_billed_per_second_it_was_held() {
        let mut inv =
            build_invoice(&acct(), nov(), &[usage(1, NOV, 1_000)], &[], &RateCard::default(), DEC).unwrap();
        let before = inv.subtotal;
        let spans = [
            // Held since before the month: the whole month (720 hours); a second cache for
            // 90 minutes; one deleted before the month: nothing.
            DedicatedSpan { cache_id: cache(1), from: NOV - 86_400, until: None },
            DedicatedSpan { cache_id: cache(2), from: NOV + 3600, until: Some(NOV + 3600 + 5400) },
            DedicatedSpan { cache_id: cache(3), from: NOV - 10, until: Some(NOV - 1) },
        ];
        inv.add_dedicated_nodes(&spans);
        let nodes: Vec<_> = inv.lines.iter().filter(|l| l.meter == Meter::DedicatedNode).collect();
        assert_eq!(nodes.len(), 2);
        assert_eq!(
            (&nodes[0].cache_id, nodes[0].quantity, nodes[0].unit.as_str()),
            (&cache(1), d("720"), "node-hour")
        );
        assert_eq!(nodes[0].amount, d("90.72"), "720 hours at $0.126");
        assert_eq!((&nodes[1].cache_id, nodes[1].quantity), (&cache(2), d("1.5")));
        assert_eq!(inv.subtotal, before + d("90.72") + d("0.189"));
    }
}
