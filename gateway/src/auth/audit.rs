//! Data-plane login events on their way to the control plane's audit log: sessions drop
//! them into a bounded queue; one task posts them in batches (every second, or sooner when
//! many wait) and keeps what it could not send for the next try.

use crate::router::ControlPlaneClient;
use shoal_types::LoginEvent;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Most events held while the control plane cannot take them; older ones are dropped
/// (and counted) beyond that.
const MAX_QUEUED: usize = 10_000;
/// Most events per request.
const BATCH: usize = 500;
const INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct AuditQueue {
    events: Mutex<VecDeque<LoginEvent>>,
    wake: Notify,
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Events delivered.
    pub sent: AtomicU64,
}

impl AuditQueue {
    pub fn push(&self, event: LoginEvent) {
        let mut events = self.events.lock().unwrap();
        if events.len() >= MAX_QUEUED {
            events.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        events.push_back(event);
        if events.len() >= BATCH {
            self.wake.notify_one();
        }
    }

    /// Posts queued events until `shutdown`, then once more.
    pub async fn run(self: Arc<Self>, client: Arc<ControlPlaneClient>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => false,
                _ = self.wake.notified() => false,
                _ = shutdown.changed() => true,
            };
            self.flush(&client).await;
            if stopping {
                return;
            }
        }
    }

    async fn flush(&self, client: &ControlPlaneClient) {
        loop {
            let batch: Vec<LoginEvent> = {
                let mut events = self.events.lock().unwrap();
                let n = events.len().min(BATCH);
                events.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            if let Err(e) = client.post_audit(&batch).await {
                // Back to the front, oldest first; beyond the bound the oldest are dropped.
                let mut events = self.events.lock().unwrap();
                for event in batch.into_iter().rev() {
                    if events.len() >= MAX_QUEUED {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    events.push_front(event);
                }
                tracing::warn!(error = %e, queued = events.len(), "could not send login events; will retry");
                return;
            }
            self.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
    }
}
