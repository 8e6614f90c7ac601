//! Hourly rollups: per-minute usage rows and storage samples summed per (cache, hour).
//!
//! A rollup is a pure sum, so it does not care in which order or how late rows arrive: a batch
//! a cut-off gateway sends an hour later lands in the hour of its minute. Deduplication is the
//! store's job (batches are unique on `(gateway_id, seq)`); two rows for the same cache and
//! minute from different gateways are both real usage and are both counted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_types::{CacheId, CacheUsage, UsageCounters};

/// Seconds in an hour.
pub const HOUR: i64 = 3600;

/// Data stored by one cache during one minute, as the storage sampler measured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageSample {
    pub cache_id: CacheId,
    /// Start of the minute (Unix seconds, a multiple of 60).
    pub minute: i64,
    /// Bytes stored × seconds they were stored within the minute: the sampler adds
    /// `bytes × interval` for each sample (6 GB held the whole minute = 360 × 10^9).
    pub byte_seconds: u64,
}

/// The sums of one cache over one UTC hour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourlyRollup {
    pub cache_id: CacheId,
    /// Start of the hour (Unix seconds, a multiple of 3600).
    pub hour: i64,
    #[serde(flatten)]
    pub counters: UsageCounters,
    /// Sum of the storage samples' byte-seconds; ÷ 3600 is the hour's average bytes.
    pub byte_seconds: u64,
}

/// The start of the UTC hour containing `t` (Unix seconds; works before 1970 too).
pub fn hour_of(t: i64) -> i64 {
    t.div_euclid(HOUR) * HOUR
}

impl HourlyRollup {
    fn empty(cache_id: &CacheId, hour: i64) -> Self {
        HourlyRollup { cache_id: cache_id.clone(), hour, counters: UsageCounters::default(), byte_seconds: 0 }
    }

    fn add_usage(&mut self, u: &CacheUsage) {
        self.counters.add(&u.counters);
    }

    /// Byte-seconds billed for this hour when `covered` of its seconds are billed (3600 for
    /// a complete hour; fewer for the running hour of a draft): the measured byte-seconds, but
    /// at least `min_bytes` for every covered second. So a full hour bills
    /// `max(average bytes, minimum) × 1 hour`.
    pub fn billed_byte_seconds(&self, min_bytes: u64, covered: i64) -> u128 {
        let floor = min_bytes as u128 * covered.clamp(0, HOUR) as u128;
        (self.byte_seconds as u128).max(floor)
    }
}

/// Sums `usage` and `storage` rows per (cache, hour). Every hour with at least one row of
/// either kind gets a rollup (that is what makes a cache-hour billable for the storage
/// minimum). The result is sorted by cache id, then hour, and does not depend on row order.
pub fn rollup<'a>(
    usage: impl IntoIterator<Item = &'a CacheUsage>,
    storage: impl IntoIterator<Item = &'a StorageSample>,
) -> Vec<HourlyRollup> {
    let mut by_key: BTreeMap<(&CacheId, i64), HourlyRollup> = BTreeMap::new();
    for u in usage {
        let hour = hour_of(u.minute);
        by_key
            .entry((&u.cache_id, hour))
            .or_insert_with(|| HourlyRollup::empty(&u.cache_id, hour))
            .add_usage(u);
    }
    for s in storage {
        let hour = hour_of(s.minute);
        by_key
            .entry((&s.cache_id, hour))
            .or_insert_with(|| HourlyRollup::empty(&s.cache_id, hour))
            .byte_seconds += s.byte_seconds;
    }
    by_key.into_values().collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn cache(n: u8) -> CacheId {
        CacheId::parse(&format!("c0000000000{n:02x}")).unwrap()
    }

    pub fn usage(c: u8, minute: i64, ecpu_milli: u64) -> CacheUsage {
        CacheUsage {
            cache_id: cache(c),
            minute,
            counters: UsageCounters {
                commands: 1,
                ecpu_milli,
                bytes_in: 10,
                bytes_out: 20,
                hits: 1,
                ..Default::default()
            },
            peak_connections: 0,
        }
    }

    pub fn stored(c: u8, minute: i64, byte_seconds: u64) -> StorageSample {
        StorageSample { cache_id: cache(c), minute, byte_seconds }
    }

    #[test]
    fn rows_are_summed_into_the_hour_of_their_minute() {
        // 2026-11-23 10:00:00 UTC
        let h = 1_795_428_000;
        assert_eq!(hour_of(h), h);
        let rows = [usage(1, h, 1_000), usage(1, h + 59 * 60, 2_500), usage(1, h + 3600, 7), usage(2, h, 5)];
        let r = rollup(&rows, &[stored(1, h + 60, 600)]);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].cache_id.clone(), r[0].hour, r[0].counters.ecpu_milli), (cache(1), h, 3_500));
        assert_eq!(
            (r[0].counters.commands, r[0].counters.bytes_in, r[0].counters.bytes_out, r[0].counters.hits),
            (2, 20, 40, 2)
        );
        assert_eq!(r[0].byte_seconds, 600);
        assert_eq!((r[1].hour, r[1].counters.ecpu_milli, r[1].byte_seconds), (h + 3600, 7, 0));
        assert_eq!((r[2].cache_id.clone(), r[2].counters.ecpu_milli), (cache(2), 5));
    }

    #[test]
    fn a_late_row_lands_in_its_own_hour_whatever_the_order() {
        let h = 1_795_428_000;
        let on_time = [usage(1, h, 1), usage(1, h + 3600, 2)];
        let mut late = vec![usage(1, h + 3600, 2), usage(1, h + 2 * 3600, 4)];
        late.push(usage(1, h + 30 * 60, 8)); // arrived two hours after its minute
        let all: Vec<_> = on_time.iter().chain(&late).cloned().collect();
        let mut reversed = all.clone();
        reversed.reverse();
        let r = rollup(&all, &[]);
        assert_eq!(r, rollup(&reversed, &[]));
        assert_eq!(
            r.iter().map(|x| (x.hour, x.counters.ecpu_milli)).collect::<Vec<_>>(),
            [(h, 9), (h + 3600, 4), (h + 7200, 4)]
        );
    }

    #[test]
    fn an_hour_is_billed_at_least_the_minimum_storage() {
        let r = HourlyRollup { byte_seconds: 3600 * 50_000_000, ..HourlyRollup::empty(&cache(1), 0) };
        // 50 MB average < 100 MB minimum.
        assert_eq!(r.billed_byte_seconds(100_000_000, HOUR), 3600 * 100_000_000);
        // 50 MB average > 10 MB minimum.
        assert_eq!(r.billed_byte_seconds(10_000_000, HOUR), 3600 * 50_000_000);
        // The first 10 minutes of a running hour: the minimum accrues for 600 s only.
        let r = HourlyRollup { byte_seconds: 0, ..r };
        assert_eq!(r.billed_byte_seconds(100_000_000, 600), 600 * 100_000_000);
    }
}
