//! Prometheus metrics (the only process-wide globals), served at `/metrics` on the
//! gateway's metrics listener. Names and labels are listed in the README.
//!
//! Per-cache counters are added when sessions flush their tallies (about twice a second),
//! not per command. So is the latency histogram: sessions count their commands per bucket
//! and add the counts here ([`Latency`]); it is rendered after the exporter's text. (The
//! exporter's histograms keep every sample with a timestamp until upkeep folds them: that
//! cost about 4% of the gateway's CPU at pipeline 16.)

use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use shoal_types::CacheId;
use shoal_types::UsageCounters;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Buckets of the latency histograms (seconds): few, to keep 10,000 caches cheap to scrape.
pub const LATENCY_BUCKETS: [f64; 8] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0];

const LATENCY_METRIC: &str = "shoal_cache_command_duration_seconds";

/// One cache's command latency histogram: a count per bucket (the last one above 1 s) and
/// the sum, in microseconds, of each command's bucket bound (an upper bound of the real sum).
#[derive(Default)]
pub struct Latency {
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// Every cache's latency histogram, by cache id.
fn latencies() -> &'static Mutex<HashMap<String, Arc<Latency>>> {
    static LATENCIES: OnceLock<Mutex<HashMap<String, Arc<Latency>>>> = OnceLock::new();
    LATENCIES.get_or_init(Default::default)
}

/// Appends the latency histograms to `out` in the Prometheus text format.
fn render_latencies(out: &mut String) {
    let all: Vec<(String, Arc<Latency>)> =
        latencies().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    if all.is_empty() {
        return;
    }
    let _ = writeln!(out, "# TYPE {LATENCY_METRIC} histogram");
    for (cache, h) in all {
        let mut total = 0;
        for (i, count) in h.counts.iter().enumerate() {
            total += count.load(Ordering::Relaxed);
            match LATENCY_BUCKETS.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "{LATENCY_METRIC}_bucket{{cache=\"{cache}\",le=\"{le}\"}} {total}");
                }
                None => {
                    let _ = writeln!(out, "{LATENCY_METRIC}_bucket{{cache=\"{cache}\",le=\"+Inf\"}} {total}");
                }
            }
        }
        let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{LATENCY_METRIC}_sum{{cache=\"{cache}\"}} {sum}");
        let _ = writeln!(out, "{LATENCY_METRIC}_count{{cache=\"{cache}\"}} {total}");
    }
}

/// The exporter's metrics followed by the latency histograms.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut out = handle.render();
    render_latencies(&mut out);
    out
}

/// The process's recorder, installed on first use. `shoal dev` runs the control plane and
/// the gateway in one process: both then serve the same registry.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// Adds a session's flushed counters to the cache's metrics.
pub fn cache_counters(cache: &CacheId, c: &UsageCounters) {
    let id = cache.to_string();
    for (name, value) in [
        ("shoal_cache_commands_total", c.commands),
        ("shoal_cache_ecpu_milli_total", c.ecpu_milli),
        ("shoal_cache_bytes_in_total", c.bytes_in),
        ("shoal_cache_bytes_out_total", c.bytes_out),
        ("shoal_cache_hits_total", c.hits),
        ("shoal_cache_misses_total", c.misses),
        ("shoal_cache_throttled_total", c.throttled),
        ("shoal_cache_errors_total", c.errors),
    ] {
        if value > 0 {
            counter!(name, "cache" => id.clone()).increment(value);
        }
    }
}

/// Adds a session's latency counts (per bucket) to the cache's histogram: each at its
/// bucket's bound, so the buckets are exact and the sum is an upper bound.
pub fn record_latencies(histogram: &Latency, counts: &[u64]) {
    for (i, (&n, count)) in counts.iter().zip(&histogram.counts).enumerate() {
        if n > 0 {
            count.fetch_add(n, Ordering::Relaxed);
            let bound =
                LATENCY_BUCKETS.get(i).copied().unwrap_or(2.0 * LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1]);
            histogram.sum_micros.fetch_add(n * (bound * 1e6) as u64, Ordering::Relaxed);
        }
    }
}

/// The cache's command latency histogram (request parsed → reply handed to the client).
pub fn latency(cache: &CacheId) -> Arc<Latency> {
    latencies().lock().unwrap().entry(cache.to_string()).or_default().clone()
}

pub fn connection_opened(cache: &CacheId) {
    let id = cache.to_string();
    gauge!("shoal_cache_connections", "cache" => id.clone()).increment(1.0);
    counter!("shoal_cache_connections_total", "cache" => id).increment(1);
}

pub fn connection_closed(cache: &CacheId) {
    gauge!("shoal_cache_connections", "cache" => cache.to_string()).decrement(1.0);
}

/// A refused login. The cache label is set only once a token proved which cache it is for
/// (anything else would let clients invent label values).
pub fn auth_failure(cache: Option<&CacheId>) {
    match cache {
        Some(c) => counter!("shoal_cache_auth_failures_total", "cache" => c.to_string()).increment(1),
        None => counter!("shoal_gateway_auth_failures_total").increment(1),
    }
}

/// A login attempt by mechanism (`jwt`, `cache-user`, `ldap`, `none`) and outcome
/// (`success`, `failure`, `lockout`): fixed label values, whatever the client sent.
pub fn auth_attempt(mechanism: &str, outcome: &str) {
    let mechanism = ["jwt", "cache-user", "ldap"].into_iter().find(|m| *m == mechanism).unwrap_or("none");
    let outcome = ["success", "lockout"].into_iter().find(|o| *o == outcome).unwrap_or("failure");
    counter!("shoal_gateway_auth_attempts_total", "mechanism" => mechanism, "outcome" => outcome)
        .increment(1);
}

pub fn session_started() {
    gauge!("shoal_gateway_sessions").increment(1.0);
}

pub fn session_ended() {
    gauge!("shoal_gateway_sessions").decrement(1.0);
}

/// A client disconnected for leaving too much output unread.
pub fn output_limit_closed() {
    counter!("shoal_gateway_output_limit_closed_total").increment(1);
}

/// A failed login's key found the next limits report full: only this gateway counts it.
pub fn login_key_unreported() {
    counter!("shoal_gateway_login_keys_unreported_total").increment(1);
}

/// Counts an open upstream connection (a session's own, or a mux's) while it lives.
pub struct Upstream(());

impl Upstream {
    pub fn opened() -> Upstream {
        gauge!("shoal_gateway_upstream_connections").increment(1.0);
        Upstream(())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        gauge!("shoal_gateway_upstream_connections").decrement(1.0);
    }
}

pub fn pending_usage_batches(n: u64) {
    gauge!("shoal_gateway_usage_batches_pending").set(n as f64);
}

/// Serves `GET /metrics` until the task is dropped. A minimal HTTP/1.1 responder: one
/// request per connection.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => request.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let (status, body) =
                if request.starts_with(b"GET /metrics ") || request.starts_with(b"GET /metrics?") {
                    // Rendering thousands of caches takes a while: off the async workers.
                    let body = tokio::task::spawn_blocking(move || render(&handle)).await.unwrap_or_default();
                    ("200 OK", body)
                } else {
                    ("404 Not Found", "not found\n".to_string())
                };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_caches_scrape_quickly() {
        let handle = install();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, handle));
        let caches: Vec<CacheId> = (0..10_000).map(|_| CacheId::generate()).collect();
        let c = UsageCounters {
            commands: 3,
            ecpu_milli: 3000,
            bytes_in: 90,
            bytes_out: 40,
            hits: 1,
            misses: 1,
            throttled: 1,
            errors: 1,
        };
        for cache in &caches {
            cache_counters(cache, &c);
            connection_opened(cache);
            record_latencies(&latency(cache), &[0, 1]);
            auth_failure(Some(cache));
        }
        let http = reqwest::Client::new();
        // The first scrape folds 10,000 histograms' samples; later ones render only.
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let body = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
            let took = started.elapsed();
            assert!(took < Duration::from_secs(3), "scrape took {took:?}");
            let one = &caches[1234];
            assert!(
                body.contains(&format!("shoal_cache_ecpu_milli_total{{cache=\"{one}\"}} 3000")),
                "{}",
                &body[..500]
            );
            assert!(body.contains(&format!(
                "shoal_cache_command_duration_seconds_bucket{{cache=\"{one}\",le=\"0.001\"}} 1"
            )));
        }
        let missing = http.get(format!("http://{addr}/nope")).send().await.unwrap();
        assert_eq!(missing.status(), 404);
        server.abort();
    }
}
