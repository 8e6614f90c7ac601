//! Data-plane login events on their way to the control plane's audit log: sessions drop
//! them into a bounded queue; one task posts them in batches (every second, or sooner when
//! many wait) and keeps what it could not send for the next try.
//!
//! Failures are throttled per source before they are queued: the first few per source and
//! window go alone, the rest are folded into one counted aggregate per source, outcome and
//! window ([`shoal_auth::aggregate`]). When the queue is full, events are folded the same way
//! instead of dropped, so every attempt is accounted for.

use crate::control_plane::ControlPlane;
use shoal_auth::aggregate::{Aggregator, Fold, Folded};
use shoal_types::{LoginAggregate, LoginEvent};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// Most single events held while the control plane cannot take them; beyond, they are
/// folded into aggregates.
const MAX_QUEUED: usize = 10_000;
/// Most events per request, and most bytes (the control plane takes JSON bodies of 64 KiB).
const BATCH: usize = 500;
const BATCH_BYTES: usize = 48 * 1024;
const INTERVAL: Duration = Duration::from_secs(1);
/// Failures per source recorded alone in each window; the rest are counted.
const INDIVIDUAL: u32 = 20;
const WINDOW: Duration = Duration::from_secs(5);
/// Sources tracked at once (beyond, failures are counted under one `*` source).
const MAX_SOURCES: usize = 10_000;

struct Inner {
    events: VecDeque<LoginEvent>,
    folds: Aggregator<LoginEvent>,
}

pub struct AuditQueue {
    inner: Mutex<Inner>,
    wake: Notify,
    /// Events folded into an aggregate because the queue was full.
    pub folded: AtomicU64,
    /// Events delivered (an aggregate counts as one).
    pub sent: AtomicU64,
}

impl Default for AuditQueue {
    fn default() -> Self {
        AuditQueue {
            inner: Mutex::new(Inner {
                events: VecDeque::new(),
                folds: Aggregator::new(WINDOW, INDIVIDUAL, MAX_SOURCES),
            }),
            wake: Notify::new(),
            folded: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        }
    }
}

/// Folds an event (or an aggregate) into its source's and outcome's aggregate.
fn fold(folds: &mut Aggregator<LoginEvent>, now: Instant, e: LoginEvent) {
    let key = format!("{}|{}", e.source, e.outcome);
    let overflow = format!("*|{}", e.outcome);
    let (count, first_at, reasons, names) = match &e.aggregate {
        Some(a) => {
            (a.count, a.first_at.clone(), a.reasons.clone().into_iter().collect(), a.usernames.clone())
        }
        None => (1, e.at.clone(), vec![(e.reason.clone(), 1)], vec![e.username.clone()]),
    };
    let f = Fold { template: &e, count, first_at: &first_at, last_at: &e.at, reasons, names };
    folds.fold(now, &key, &overflow, f);
}

/// An aggregate as the event the control plane records.
fn aggregate_event(f: Folded<LoginEvent>) -> LoginEvent {
    let mut e = f.template;
    if e.aggregate.is_none() && f.count == 1 {
        return e;
    }
    e.at = f.last_at;
    e.username =
        if f.names.len() == 1 { f.names.first().cloned().unwrap_or_default() } else { "(several)".into() };
    e.reason = format!("{} attempts from {}", f.count, e.source);
    e.jti = None;
    e.aggregate = Some(LoginAggregate {
        count: f.count,
        first_at: f.first_at,
        reasons: f.reasons,
        usernames: f.names.into_iter().collect(),
    });
    e
}

impl AuditQueue {
    pub fn push(&self, event: LoginEvent) {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap();
        let full = inner.events.len() >= MAX_QUEUED;
        let alone = event.outcome == "success"
            || inner.folds.individual(now, &format!("{}|{}", event.source, event.outcome));
        if full || !alone {
            if full {
                self.folded.fetch_add(1, Ordering::Relaxed);
            }
            fold(&mut inner.folds, now, event);
            return;
        }
        inner.events.push_back(event);
        if inner.events.len() >= BATCH {
            self.wake.notify_one();
        }
    }

    /// Posts queued events until `shutdown`, then once more (with every aggregate).
    pub async fn run(self: Arc<Self>, client: Arc<ControlPlane>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => false,
                _ = self.wake.notified() => false,
                _ = shutdown.changed() => true,
            };
            self.flush(&client, stopping).await;
            if stopping {
                return;
            }
        }
    }

    /// The next batch: queued events, after aggregates whose window ended (all with `all`).
    fn next_batch(&self, all: bool) -> Vec<LoginEvent> {
        let mut inner = self.inner.lock().unwrap();
        let ended = inner.folds.take(Instant::now(), all);
        inner.events.extend(ended.into_iter().map(aggregate_event));
        let (mut batch, mut bytes) = (Vec::new(), 0);
        while let Some(e) = inner.events.front() {
            let size = serde_json::to_string(e).map(|s| s.len() + 1).unwrap_or(0);
            if batch.len() >= BATCH || (!batch.is_empty() && bytes + size > BATCH_BYTES) {
                break;
            }
            bytes += size;
            batch.extend(inner.events.pop_front());
        }
        batch
    }

    async fn flush(&self, client: &ControlPlane, all: bool) {
        loop {
            let batch = self.next_batch(all);
            if batch.is_empty() {
                return;
            }
            if let Err(e) = client.post_audit(&batch).await {
                // Back to the front, oldest first; beyond the bound they are counted in aggregates.
                let mut inner = self.inner.lock().unwrap();
                let now = Instant::now();
                for event in batch.into_iter().rev() {
                    if inner.events.len() >= MAX_QUEUED {
                        self.folded.fetch_add(1, Ordering::Relaxed);
                        fold(&mut inner.folds, now, event);
                    } else {
                        inner.events.push_front(event);
                    }
                }
                tracing::warn!(error = %e, queued = inner.events.len(), "could not send login events; will retry");
                return;
            }
            self.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(source: &str, outcome: &str, i: usize) -> LoginEvent {
        LoginEvent {
            at: format!("2026-01-01T00:00:00.{:03}Z", i % 1000),
            gateway_id: "gw".into(),
            source: source.into(),
            username: "someone".into(),
            cache_id: None,
            account_id: None,
            mechanism: "none".into(),
            outcome: outcome.into(),
            reason: "bad".into(),
            jti: None,
            aggregate: None,
        }
    }

    fn counted(events: &[LoginEvent]) -> u64 {
        events.iter().map(|e| e.aggregate.as_ref().map_or(1, |a| a.count)).sum()
    }

    #[test]
    fn failures_beyond_a_few_per_source_are_counted_in_one_aggregate() {
        let q = AuditQueue::default();
        for i in 0..5000 {
            q.push(event("10.0.0.1", "failure", i));
        }
        let mut all = Vec::new();
        loop {
            let batch = q.next_batch(true);
            if batch.is_empty() {
                break;
            }
            all.extend(batch);
        }
        assert_eq!(all.len(), INDIVIDUAL as usize + 1);
        assert_eq!(counted(&all), 5000);
        let agg = all.last().unwrap().aggregate.as_ref().unwrap();
        assert_eq!(agg.reasons["bad"], 5000 - u64::from(INDIVIDUAL));
    }

    #[test]
    fn a_full_queue_folds_instead_of_dropping() {
        let q = AuditQueue::default();
        let n = MAX_QUEUED + 777;
        for i in 0..n {
            q.push(event("10.0.0.1", "success", i));
        }
        assert_eq!(q.folded.load(Ordering::Relaxed), 777);
        let mut all = Vec::new();
        loop {
            let batch = q.next_batch(true);
            if batch.is_empty() {
                break;
            }
            let bytes: usize = batch.iter().map(|e| serde_json::to_string(e).unwrap().len() + 1).sum();
            assert!(bytes <= BATCH_BYTES);
            all.extend(batch);
        }
        assert_eq!(counted(&all), n as u64);
    }
}
