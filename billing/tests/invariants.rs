//! The billing invariant: the sum over usage batches = the sum over hourly
//! rollups = the invoice quantities, to the milli-ECPU — with duplicate batches, late batches
//! and rows on both sides of hour and month boundaries. Through the public API only.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use shoal_billing::{
    build_invoice, rollup, Decimal, HourlyRollup, Invoice, InvoiceStatus, Meter, Month, RateCard,
    StorageSample,
};
use shoal_types::{AccountId, CacheId, CacheUsage, UsageBatch, UsageCounters};

const DEC: i64 = 1_796_083_200; // 2026-12-01T00:00:00Z
const JAN: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z

fn cache(n: u8) -> CacheId {
    CacheId::parse(&format!("c0000000000{n:02x}")).unwrap()
}

fn account() -> AccountId {
    AccountId::parse("a0123456789ab").unwrap()
}

fn row(c: u8, minute: i64, ecpu_milli: u64) -> CacheUsage {
    CacheUsage {
        cache_id: cache(c),
        minute,
        counters: UsageCounters {
            commands: 1 + ecpu_milli % 7,
            ecpu_milli,
            bytes_in: ecpu_milli / 3,
            bytes_out: ecpu_milli / 2,
            hits: ecpu_milli % 5,
            misses: ecpu_milli % 3,
            throttled: ecpu_milli % 2,
            errors: 0,
        },
        peak_connections: 0,
    }
}

/// What the control plane's store does on ingest: a batch is stored once per
/// `(gateway_id, seq)`, however often and however late it is sent.
fn store(arrivals: &[UsageBatch]) -> Vec<CacheUsage> {
    let mut seen = BTreeSet::new();
    arrivals
        .iter()
        .filter(|b| seen.insert((b.gateway_id.clone(), b.seq)))
        .flat_map(|b| b.usage.clone())
        .collect()
}

fn ecpu_milli_of(invoices: &[&Invoice]) -> u128 {
    let billion = Decimal::from(1_000_000_000u64);
    invoices
        .iter()
        .flat_map(|i| &i.lines)
        .filter(|l| l.meter == Meter::Ecpu)
        .map(|l| {
            let milli = l.quantity * billion;
            assert!(milli.fract().is_zero(), "quantity {} is not whole milli-ECPU", l.quantity);
            u128::try_from(milli).unwrap()
        })
        .sum()
}

fn months(rows: &[CacheUsage], storage: &[StorageSample], now: i64) -> (Invoice, Invoice) {
    let nov = Month::parse("2026-11").unwrap();
    let rates = RateCard::default();
    (
        build_invoice(&account(), nov, rows, storage, &rates, now).unwrap(),
        build_invoice(&account(), nov.next(), rows, storage, &rates, now).unwrap(),
    )
}

#[test]
fn duplicate_and_late_batches_across_hour_and_month_boundaries() {
    let batch = |gw: &str, seq, usage| UsageBatch { gateway_id: gw.to_owned(), seq, usage };
    let first = batch("gw-a", 1, vec![row(1, DEC - 120, 1_000), row(2, DEC - 60, 250)]);
    let second = batch("gw-a", 2, vec![row(1, DEC, 4_000), row(1, DEC + 3600, 9)]);
    // gw-b was cut off at 23:58 on November 30th and catches up after midnight; it also
    // reports cache 1's minute 23:58 (both gateways served that cache): both are usage.
    let late = batch("gw-b", 7, vec![row(1, DEC - 120, 333), row(1, DEC - 3600 - 60, 5)]);
    let arrivals = [first.clone(), second.clone(), first.clone(), late.clone(), second.clone(), late];
    let rows = store(&arrivals);
    assert_eq!(rows.len(), 6, "each batch stored once");
    let total: u64 = rows.iter().map(|r| r.counters.ecpu_milli).sum();
    assert_eq!(total, 1_000 + 250 + 4_000 + 9 + 333 + 5);

    let rollups = rollup(&rows, &[]);
    let by_hour: Vec<_> =
        rollups.iter().map(|r| (r.cache_id.clone(), r.hour - DEC, r.counters.ecpu_milli)).collect();
    assert_eq!(
        by_hour,
        [
            (cache(1), -7200, 5), // 22:59 on November 30th
            (cache(1), -3600, 1_333),
            (cache(1), 0, 4_000),
            (cache(1), 3600, 9),
            (cache(2), -3600, 250),
        ]
    );
    assert_eq!(rollups.iter().map(|r| r.counters.ecpu_milli).sum::<u64>(), total);

    let (nov, dec) = months(&rows, &[], DEC + 2 * 3600);
    assert_eq!((nov.status, dec.status), (InvoiceStatus::Final, InvoiceStatus::Draft));
    assert_eq!(ecpu_milli_of(&[&nov]), 1_588);
    assert_eq!(ecpu_milli_of(&[&dec]), 4_009);
    assert_eq!(ecpu_milli_of(&[&nov, &dec]), total as u128);
    // Cache 1 had rows in two November hours, cache 2 in one: 0.3 GB-hours of minimum.
    let nov_gb: Decimal = nov.lines.iter().filter(|l| l.meter == Meter::Storage).map(|l| l.quantity).sum();
    assert_eq!(nov_gb, Decimal::new(3, 1));
}

/// A generated stream: batches with unique `(gateway_id, seq)`, some sent more than once,
/// all arriving in a random order; rows fall within three hours of the month boundary.
fn arrivals() -> impl Strategy<Value = Vec<UsageBatch>> {
    let row = (0u8..4, -180i64..180, 0u64..5_000_000_000).prop_map(|(c, m, e)| row(c, DEC + m * 60, e));
    let batches = prop::collection::vec(prop::collection::vec(row, 0..8), 0..40);
    (batches, prop::collection::vec(any::<prop::sample::Index>(), 0..20))
        .prop_map(|(batches, resend)| {
            let sent: Vec<UsageBatch> = batches
                .into_iter()
                .enumerate()
                .map(|(i, usage)| UsageBatch {
                    gateway_id: format!("gw-{}", i % 3),
                    seq: i as u64 / 3,
                    usage,
                })
                .collect();
            let mut all = sent.clone();
            if !sent.is_empty() {
                all.extend(resend.iter().map(|ix| sent[ix.index(sent.len())].clone()));
            }
            all
        })
        .prop_shuffle()
}

fn storage_samples() -> impl Strategy<Value = Vec<StorageSample>> {
    let sample = (0u8..4, -180i64..180, 0u64..(1 << 40)).prop_map(|(c, m, b)| StorageSample {
        cache_id: cache(c),
        minute: DEC + m * 60,
        byte_seconds: b,
    });
    prop::collection::vec(sample, 0..30)
}

fn sum_rows(rows: &[&CacheUsage]) -> [u64; 8] {
    let mut s = [0; 8];
    for r in rows {
        let v = r.counters.values();
        for (a, b) in s.iter_mut().zip(v) {
            *a += b;
        }
    }
    s
}

fn sum_rollup(r: &HourlyRollup) -> [u64; 8] {
    r.counters.values()
}

proptest! {
    #[test]
    fn batches_rollups_and_invoices_agree(arrivals in arrivals(), storage in storage_samples(), now_min in 0i64..240) {
        let rows = store(&arrivals);

        // Rollups: each (cache, hour) is the sum of exactly its rows, whatever the order.
        let rollups = rollup(&rows, &storage);
        let mut reversed = rows.clone();
        reversed.reverse();
        prop_assert_eq!(&rollup(&reversed, &storage), &rollups);
        let mut hours = BTreeSet::new();
        for r in &rollups {
            let mine: Vec<&CacheUsage> = rows
                .iter()
                .filter(|u| u.cache_id == r.cache_id && u.minute.div_euclid(3600) * 3600 == r.hour)
                .collect();
            prop_assert_eq!(sum_rows(&mine), sum_rollup(r));
            let stored: u64 = storage
                .iter()
                .filter(|s| s.cache_id == r.cache_id && s.minute.div_euclid(3600) * 3600 == r.hour)
                .map(|s| s.byte_seconds)
                .sum();
            prop_assert_eq!(stored, r.byte_seconds);
            hours.insert((r.cache_id.clone(), r.hour));
        }
        // …and every row's hour has a rollup.
        for u in &rows {
            prop_assert!(hours.contains(&(u.cache_id.clone(), u.minute.div_euclid(3600) * 3600)));
        }
        let all_rows: u128 = rows.iter().map(|r| r.counters.ecpu_milli as u128).sum();
        let all_rollups: u128 = rollups.iter().map(|r| r.counters.ecpu_milli as u128).sum();
        prop_assert_eq!(all_rows, all_rollups);

        // Final invoices of both months: ECPU quantities add up to the milli-ECPU, per cache
        // too, and storage bills each cache-hour at least the 100 MB minimum.
        let (nov, dec) = months(&rows, &storage, JAN);
        prop_assert_eq!(ecpu_milli_of(&[&nov, &dec]), all_rows);
        for inv in [&nov, &dec] {
            let (start, end) = (inv.period_start.timestamp(), inv.period_end.timestamp());
            let mut billed: BTreeMap<&CacheId, u128> = BTreeMap::new();
            for r in rollups.iter().filter(|r| (start..end).contains(&r.hour)) {
                *billed.entry(&r.cache_id).or_default() += (r.byte_seconds as u128).max(100_000_000 * 3600);
            }
            let lines: BTreeMap<&CacheId, Decimal> =
                inv.lines.iter().filter(|l| l.meter == Meter::Storage).map(|l| (&l.cache_id, l.quantity)).collect();
            prop_assert_eq!(lines.len(), billed.len());
            for (c, bs) in billed {
                let exact = Decimal::from(bs as u64) / Decimal::from(3_600_000_000_000u64);
                prop_assert!((lines[c] - exact).abs() <= Decimal::new(5, 11), "{} vs {}", lines[c], exact);
            }
            let subtotal: Decimal = inv.lines.iter().map(|l| l.amount).sum();
            prop_assert_eq!(subtotal, inv.subtotal);
            prop_assert!((inv.total - inv.subtotal).abs() <= Decimal::new(5, 3));
        }

        // A draft during December covers exactly the rows of its completed minutes.
        let now = DEC + now_min * 60 + 17;
        let (_, draft) = months(&rows, &storage, now);
        let covered: u128 = rows
            .iter()
            .filter(|r| r.minute >= DEC && r.minute < now - 17)
            .map(|r| r.counters.ecpu_milli as u128)
            .sum();
        prop_assert_eq!(draft.status, InvoiceStatus::Draft);
        prop_assert_eq!(ecpu_milli_of(&[&draft]), covered);
    }
}
