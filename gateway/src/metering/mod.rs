//! Metering: what each command costs and who pays.
//!
//! - [`ecpu`]: the ECPU rule (pure).
//! - [`shoal_types::UsageCounters`]: one cache's counters; each session adds every command's
//!   to its slot of the gateway's [`Ledger`], kept in the [`journal`] (which outlives a kill).
//! - [`limit`]: the `ecpu_per_second` token bucket of each cache.
//! - [`usage`]: every second the ledger becomes a `UsageBatch` for the control plane
//!   (kept in memory, then spooled to disk while the control plane is unreachable), with
//!   each cache's peak of concurrent connections over that second (from the client registry,
//!   the same count `max_connections` is enforced on; nothing is counted per command).

pub mod ecpu;
pub mod journal;
pub mod limit;
pub mod usage;

use shoal_commands::CommandSpec;
use shoal_types::{CacheId, CacheUsage, UsageCounters};
use std::collections::HashMap;
use std::sync::Mutex;

/// The counters of one metered command: `request` bytes the client sent, `reply` the reply
/// as Valkey sent it (for elements and hits), `delivered` the bytes the client received for
/// it. Free commands count nothing.
#[inline]
pub fn command(spec: Option<&CommandSpec>, request: u64, reply: &[u8], delivered: u64) -> UsageCounters {
    let (weight, per_element) = ecpu::weights(spec);
    if weight == 0 {
        // Free while small; past that, billed for what it moved (not counted as a command).
        let ecpu_milli = ecpu::ecpu_milli(0, 0, 0, request, delivered);
        if ecpu_milli == 0 {
            return UsageCounters::default();
        }
        return UsageCounters { ecpu_milli, bytes_in: request, bytes_out: delivered, ..Default::default() };
    }
    let elements = if per_element > 0 { ecpu::reply_elements(reply) } else { 0 };
    let (hits, misses) = spec.map_or((0, 0), |s| ecpu::hits(s.hits, reply));
    UsageCounters {
        commands: 1,
        ecpu_milli: ecpu::ecpu_milli(weight, per_element, elements, request, delivered),
        bytes_in: request,
        bytes_out: delivered,
        hits,
        misses,
        throttled: 0,
        errors: reply.first().is_some_and(|&b| b == b'-' || b == b'!') as u64,
    }
}

/// A pub/sub message delivered to a subscriber: billed by bytes.
pub fn delivery(bytes: u64) -> UsageCounters {
    UsageCounters { ecpu_milli: ecpu::transfer_milli(bytes), bytes_out: bytes, ..Default::default() }
}

/// What a session remembers about a forwarded request until its reply arrives.
#[derive(Clone, Copy)]
pub(crate) struct Meter {
    pub spec: Option<&'static CommandSpec>,
    /// Bytes of the request as the client sent it.
    pub request: u64,
    pub tx: TxPosition,
    /// When the request was read (for the latency histogram).
    pub started: std::time::Instant,
}

impl Meter {
    /// What the command costs at least, known before its reply: its weight, or its
    /// request's bytes if those cost more (0 for free commands).
    pub fn estimate(&self) -> u64 {
        let (weight, _) = ecpu::weights(self.spec);
        ecpu::ecpu_milli(weight, 0, 0, self.request, 0)
    }

    /// Free of charge, and so of the ECPU limit: a free command that moves little.
    pub fn free(&self) -> bool {
        self.estimate() == 0
    }
}

/// Where a request stands in a transaction.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxPosition {
    Plain,
    /// Sent inside MULTI: billed when EXEC's reply brings its result.
    Queued,
    /// EXEC: its reply's elements belong to the queued commands.
    Exec,
    /// DISCARD: the queued commands are billed on what they moved so far.
    Discard,
}

/// The current Unix minute (seconds, a multiple of 60).
pub fn current_minute() -> i64 {
    current_minute_and_rest().0
}

/// The current Unix minute, and how long until it ends.
pub fn current_minute_and_rest() -> (i64, std::time::Duration) {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let into_minute = std::time::Duration::new(since_epoch.as_secs() % 60, since_epoch.subsec_nanos());
    let secs = since_epoch.as_secs() as i64;
    (secs - secs % 60, std::time::Duration::from_secs(60) - into_minute)
}

/// The gateway's counters not yet put into a batch: the sessions' slots of the [`journal`],
/// and the connection peaks sent per cache this minute.
pub struct Ledger {
    journal: journal::Journal,
    /// The largest peak of connections sent per cache in the current minute. The control
    /// plane keeps each gateway's largest per minute, so a peak goes out again only when it
    /// grows or a minute starts: an idle connected cache costs one row a minute, not sixty.
    sent: Mutex<HashMap<CacheId, (i64, u32)>>,
}

impl Default for Ledger {
    fn default() -> Ledger {
        Ledger::new(journal::Journal::in_memory())
    }
}

/// A batch being made: its usage, and what [`Ledger::commit`] marks as sent.
pub struct Taking {
    pub usage: Vec<CacheUsage>,
    journal: journal::Taking,
}

impl Ledger {
    pub fn new(journal: journal::Journal) -> Ledger {
        Ledger { journal, sent: Default::default() }
    }

    /// Where a session counts what `cache` does in `minute`.
    pub fn slot(&self, cache: &CacheId, minute: i64) -> journal::Slot {
        self.journal.slot(cache, minute)
    }

    /// What batch `seq` would hold: everything counted since the last batch, with each
    /// cache's peak of concurrent connections over the interval (`peaks`, from
    /// [`crate::clients::Registry::take_peaks`]) in its entry of the current minute: a cache
    /// with connections but no commands gets an entry of its own, so the control plane sees
    /// that it is connected. Then [`Self::commit`] once the batch is safe, or [`Self::abort`].
    pub fn take(&self, seq: u64, peaks: Vec<(CacheId, u32)>) -> Taking {
        self.take_at(seq, current_minute(), peaks)
    }

    fn take_at(&self, seq: u64, minute: i64, peaks: Vec<(CacheId, u32)>) -> Taking {
        let mut journal = self.journal.take(seq);
        let mut map = std::mem::take(&mut journal.usage);
        let mut sent = self.sent.lock().unwrap();
        sent.retain(|_, (m, _)| *m == minute);
        let peaks: HashMap<CacheId, u32> = peaks
            .into_iter()
            .filter(|(cache, peak)| sent.get(cache).is_none_or(|&(_, before)| *peak > before))
            .collect();
        for (cache, peak) in &peaks {
            sent.insert(cache.clone(), (minute, *peak));
        }
        for cache_id in peaks.keys() {
            map.entry((cache_id.clone(), minute)).or_default();
        }
        let mut usage: Vec<CacheUsage> = map
            .into_iter()
            .map(|((cache_id, m), c)| CacheUsage {
                peak_connections: if m == minute { peaks.get(&cache_id).copied().unwrap_or(0) } else { 0 },
                cache_id,
                minute: m,
                counters: c,
            })
            .collect();
        usage.sort_by(|a, b| (a.minute, &a.cache_id).cmp(&(b.minute, &b.cache_id)));
        Taking { usage, journal }
    }

    /// The batch is safe: its counters count as sent (and in the gateway's `/metrics`).
    pub fn commit(&self, taking: Taking) {
        for u in &taking.usage {
            crate::metrics::cache_counters(&u.cache_id, &u.counters);
        }
        self.journal.commit(taking.journal);
    }

    /// The batch could not be kept: its counters go in the next.
    pub fn abort(&self, taking: Taking) {
        self.journal.abort(taking.journal);
    }
}

/// A session's own tally: its journal slot for the current minute (written per command),
/// and its latencies, handed to the histogram about once a second.
#[derive(Default)]
pub(crate) struct Tally {
    pub minute: i64,
    pub slot: Option<journal::Slot>,
    /// When the latencies must be flushed (set when the first is counted).
    pub flush_at: Option<std::time::Instant>,
    /// Command latencies counted per bucket of [`crate::metrics::LATENCY_BUCKETS`] (the
    /// last slot: slower than the largest), handed to the histogram at flush time.
    pub latency: [u64; crate::metrics::LATENCY_BUCKETS.len() + 1],
    /// Its `INFO` counters (commandstats, errorstats, ECPU), handed over at flush time too.
    pub info: crate::cache_stats::Tally,
}

/// The latency histogram bucket of a command that took `took`.
pub(crate) fn latency_slot(took: std::time::Duration) -> usize {
    let seconds = took.as_secs_f64();
    let slot = crate::metrics::LATENCY_BUCKETS.iter().position(|&le| seconds <= le);
    slot.unwrap_or(crate::metrics::LATENCY_BUCKETS.len())
}

/// How long a session keeps latencies before it hands them to the histogram.
pub(crate) const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peak_goes_out_again_only_when_it_grows_or_a_minute_starts() {
        let ledger = Ledger::default();
        let take = |minute, peaks| {
            let taking = ledger.take_at(0, minute, peaks);
            let usage = taking.usage.clone();
            ledger.commit(taking);
            usage
        };
        let (a, b) = (CacheId::generate(), CacheId::generate());
        let peaks = |usage: Vec<CacheUsage>| {
            let mut p: Vec<_> =
                usage.into_iter().map(|u| (u.cache_id, u.minute, u.peak_connections)).collect();
            p.sort();
            p
        };
        let sorted = |mut v: Vec<(CacheId, i64, u32)>| {
            v.sort();
            v
        };
        assert_eq!(
            peaks(take(60, vec![(a.clone(), 3), (b.clone(), 1)])),
            sorted(vec![(a.clone(), 60, 3), (b.clone(), 60, 1)])
        );
        // Same minute: lower or equal peaks add nothing; a higher one goes out.
        assert_eq!(peaks(take(60, vec![(a.clone(), 2), (b.clone(), 1)])), vec![]);
        assert_eq!(peaks(take(60, vec![(a.clone(), 4)])), vec![(a.clone(), 60, 4)]);
        // Traffic still goes out, with the peak only when it is news.
        ledger.slot(&b, 60).add(&UsageCounters { commands: 2, ..Default::default() });
        assert_eq!(peaks(take(60, vec![(b.clone(), 1)])), vec![(b.clone(), 60, 0)]);
        // A new minute: every peak once more.
        assert_eq!(
            peaks(take(120, vec![(a.clone(), 1), (b.clone(), 1)])),
            sorted(vec![(a.clone(), 120, 1), (b.clone(), 120, 1)])
        );
    }
}
