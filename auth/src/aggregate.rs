//! Per-source aggregation of failed attempts on their way to the audit log: the first few
//! from one source in a window are recorded one by one, the rest are folded into one record
//! per source and window that counts them (first and last time, reasons, names tried),
//! written when the window ends. Nothing is dropped: what is not recorded alone is counted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Distinct reasons and names an aggregate keeps (further ones are counted under "(other)").
const MAX_REASONS: usize = 20;
const MAX_NAMES: usize = 10;

/// Many events recorded as one.
#[derive(Clone, Debug, PartialEq)]
pub struct Folded<E> {
    /// The first folded event (its source, action, outcome stand for all of them).
    pub template: E,
    pub count: u64,
    pub first_at: String,
    pub last_at: String,
    /// How many had each reason.
    pub reasons: BTreeMap<String, u64>,
    /// Some of the user names tried.
    pub names: BTreeSet<String>,
}

/// What one event (or an aggregate being folded again) adds to an aggregate.
pub struct Fold<'a, E> {
    pub template: &'a E,
    pub count: u64,
    pub first_at: &'a str,
    pub last_at: &'a str,
    pub reasons: Vec<(String, u64)>,
    pub names: Vec<String>,
}

struct Window<E> {
    started: Instant,
    individual: u32,
    folded: Option<Folded<E>>,
}

/// Windows per key (a source, or a source and outcome).
pub struct Aggregator<E> {
    window: Duration,
    individual: u32,
    max_keys: usize,
    windows: HashMap<String, Window<E>>,
}

impl<E: Clone> Aggregator<E> {
    /// `individual` events per key and `window` are recorded alone; at most `max_keys` keys
    /// are tracked (beyond that, events fold into the caller's overflow key).
    pub fn new(window: Duration, individual: u32, max_keys: usize) -> Self {
        Aggregator { window, individual, max_keys, windows: HashMap::new() }
    }

    /// Whether the next event under `key` may be recorded on its own (and counts it if so).
    pub fn individual(&mut self, now: Instant, key: &str) -> bool {
        if !self.windows.contains_key(key) && self.windows.len() >= self.max_keys {
            return false;
        }
        let window = self.window;
        let w = self.windows.entry(key.to_string()).or_insert(Window {
            started: now,
            individual: 0,
            folded: None,
        });
        if now.duration_since(w.started) >= window && w.folded.is_none() {
            *w = Window { started: now, individual: 0, folded: None };
        }
        if w.individual < self.individual {
            w.individual += 1;
            true
        } else {
            false
        }
    }

    /// Folds into `key`'s aggregate, or `overflow`'s when too many keys are tracked.
    pub fn fold(&mut self, now: Instant, key: &str, overflow: &str, f: Fold<'_, E>) {
        let key =
            if self.windows.contains_key(key) || self.windows.len() < self.max_keys { key } else { overflow };
        let w = self.windows.entry(key.to_string()).or_insert(Window {
            started: now,
            individual: 0,
            folded: None,
        });
        let agg = w.folded.get_or_insert_with(|| Folded {
            template: f.template.clone(),
            count: 0,
            first_at: f.first_at.to_string(),
            last_at: f.last_at.to_string(),
            reasons: BTreeMap::new(),
            names: BTreeSet::new(),
        });
        agg.count += f.count;
        // RFC 3339 UTC times order as text.
        if f.first_at < agg.first_at.as_str() {
            agg.first_at = f.first_at.to_string();
        }
        if f.last_at > agg.last_at.as_str() {
            agg.last_at = f.last_at.to_string();
        }
        for (reason, n) in f.reasons {
            let reason = if agg.reasons.contains_key(&reason) || agg.reasons.len() < MAX_REASONS {
                reason
            } else {
                "(other)".into()
            };
            *agg.reasons.entry(reason).or_default() += n;
        }
        for name in f.names {
            if agg.names.len() < MAX_NAMES {
                agg.names.insert(name);
            }
        }
    }

    /// The aggregates whose window has ended (every one with `all`); their windows end.
    pub fn take(&mut self, now: Instant, all: bool) -> Vec<Folded<E>> {
        let window = self.window;
        let mut out = Vec::new();
        self.windows.retain(|_, w| {
            if !all && now.duration_since(w.started) < window {
                return true;
            }
            out.extend(w.folded.take());
            false
        });
        out
    }

    /// Events folded and not yet taken.
    pub fn pending(&self) -> u64 {
        self.windows.values().filter_map(|w| w.folded.as_ref()).map(|f| f.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one<'a>(e: &'a &'static str, at: &'a str, reason: &str) -> Fold<'a, &'static str> {
        Fold {
            template: e,
            count: 1,
            first_at: at,
            last_at: at,
            reasons: vec![(reason.into(), 1)],
            names: vec![],
        }
    }

    #[test]
    fn a_few_alone_then_counted_per_key_and_window() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(Duration::from_secs(5), 2, 100);
        let e = "event";
        let mut alone = 0;
        for i in 0..10 {
            if a.individual(t0, "10.0.0.1") {
                alone += 1;
            } else {
                a.fold(
                    t0,
                    "10.0.0.1",
                    "*",
                    one(&e, &format!("2026-01-01T00:00:0{i}.000Z"), if i % 2 == 0 { "a" } else { "b" }),
                );
            }
        }
        assert_eq!(alone, 2);
        assert!(a.individual(t0, "10.0.0.2"), "another source has its own allowance");
        assert!(a.take(t0 + Duration::from_secs(1), false).is_empty(), "the window has not ended");
        let taken = a.take(t0 + Duration::from_secs(5), false);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].count, 8);
        assert_eq!(taken[0].first_at, "2026-01-01T00:00:02.000Z");
        assert_eq!(taken[0].last_at, "2026-01-01T00:00:09.000Z");
        assert_eq!(taken[0].reasons, BTreeMap::from([("a".to_string(), 4), ("b".to_string(), 4)]));
        assert!(a.individual(t0 + Duration::from_secs(5), "10.0.0.1"), "a new window");
    }

    #[test]
    fn beyond_the_key_bound_events_fold_into_the_overflow_key() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(Duration::from_secs(5), 1, 2);
        let e = "event";
        assert!(a.individual(t0, "s1") && a.individual(t0, "s2"));
        assert!(!a.individual(t0, "s3"));
        a.fold(t0, "s3", "*", one(&e, "2026-01-01T00:00:00.000Z", "x"));
        a.fold(t0, "s4", "*", one(&e, "2026-01-01T00:00:00.000Z", "x"));
        assert_eq!(a.pending(), 2);
        let taken = a.take(t0, true);
        assert_eq!(taken.iter().map(|f| f.count).sum::<u64>(), 2);
    }
}
