//! Prometheus metrics of the control plane, served at `/metrics` (names in the README).

use metrics::counter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use shoal_types::UsageBatch;
use std::sync::OnceLock;

/// The recorder the embedding program gave, or one installed now (`shoal control-plane`).
pub fn handle(given: Option<&PrometheusHandle>) -> PrometheusHandle {
    static OWN: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(h) = given {
        return h.clone();
    }
    OWN.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        handle
    })
    .clone()
}

/// A usage batch arrived: stored, or a repeat of one stored before.
pub fn usage_batch(batch: &UsageBatch, stored: bool) {
    let outcome = if stored { "stored" } else { "duplicate" };
    counter!("shoal_usage_batches_total", "outcome" => outcome).increment(1);
    if stored {
        let ecpu: u64 = batch.usage.iter().map(|u| u.counters.ecpu_milli).sum();
        let commands: u64 = batch.usage.iter().map(|u| u.counters.commands).sum();
        counter!("shoal_usage_stored_ecpu_milli_total").increment(ecpu);
        counter!("shoal_usage_stored_commands_total").increment(commands);
    }
}
