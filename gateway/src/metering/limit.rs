//! A cache's limits on this gateway: `ecpu_per_second` as a token bucket, and the share of
//! its `max_connections` this gateway may hold. Both hold for the cache as a whole,
//! whichever gateways its clients use: every [`REPORT_EVERY`] the gateway tells the control
//! plane what it used and was refused, and gets its share of each limit until the next
//! report (the control plane's `limits` module splits them by demand).
//!
//! The bucket holds up to one second of the gateway's share and starts full. A command may
//! start while the bucket is not in debt; it takes its estimated cost up front (its weight,
//! or its request's bytes if larger) so that a pipeline cannot run ahead of the limit, and
//! the rest of its cost (reply bytes, elements) once its reply is metered. A command that
//! finds the bucket in debt waits until it is repaid, if that takes at most the configured
//! bound (`throttle_wait`, 10 ms), else it fails with `-THROTTLED`.
//!
//! While the control plane cannot be reached, the last shares hold for [`SHARE_FOR`]; after
//! that each limit is divided by the number of gateways that shared the cache last (so the
//! total still holds unless gateways are added during the outage). The limits themselves
//! come from the cache's route, re-read by the router, so a changed limit applies within
//! about a second.
//!
//! The same report carries the failed logins counted since the last one, and its answer the
//! lockouts every gateway's failures together led to (`crate::auth::throttle`): so the
//! report is sent every [`REPORT_EVERY`] while login throttling is on, with or without
//! limited caches.

use crate::state::Shared;
use shoal_types::throttle::LoginReport;
use shoal_types::{CacheId, LimitDemand, LimitReport, LimitShare};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often shares are asked for (and limits re-read from routes).
pub const REPORT_EVERY: Duration = Duration::from_millis(250);
/// How long refused clients count as waiting for a connection.
pub const REFUSALS_FOR: Duration = Duration::from_secs(2);
/// How long a share holds without a newer one.
pub const SHARE_FOR: Duration = Duration::from_secs(5);

/// A cache's limits on this gateway.
pub struct Bucket {
    /// The rate this gateway may use, in milli-ECPU per second; 0 = unlimited.
    rate: AtomicU64,
    state: Mutex<State>,
}

struct State {
    /// The cache's whole limit in milli-ECPU per second; 0 = unlimited.
    limit: u64,
    /// Milli-ECPU available; negative = debt.
    tokens: i64,
    refilled: Instant,
    /// Since the last report: milli-ECPU taken, and asked for while in debt.
    used: u64,
    refused: u64,
    /// The cache's connection limit, and this gateway's share of it.
    max_connections: Option<u64>,
    connections: Option<u64>,
    /// Clients refused in the last [`REFUSALS_FOR`] (a share grows only while its gateway
    /// has clients waiting), and when the last one was.
    connections_refused: u64,
    refused_at: Option<Instant>,
    /// The last share from the control plane, when, and how many gateways shared it.
    shared_at: Option<Instant>,
    gateways: u32,
}

impl Bucket {
    fn new(ecpu_per_second: Option<u64>, max_connections: Option<u64>, gateways: u32) -> Bucket {
        let bucket = Bucket {
            rate: AtomicU64::new(0),
            state: Mutex::new(State {
                limit: 0,
                tokens: 0,
                refilled: Instant::now(),
                used: 0,
                refused: 0,
                max_connections: None,
                connections: None,
                connections_refused: 0,
                refused_at: None,
                shared_at: None,
                gateways: gateways.max(1),
            }),
        };
        bucket.set_limits(ecpu_per_second, max_connections);
        bucket
    }

    /// Whether the cache has a limit (the hot path checks this and nothing else otherwise).
    pub fn limited(&self) -> bool {
        self.rate.load(Ordering::Relaxed) != 0
    }

    /// Applies the cache's limits (from its route). Until a share comes, this gateway
    /// assumes the cache is shared by as many gateways as the last cache it asked about
    /// was. Whether the ECPU limit changed.
    pub fn set_limits(&self, ecpu_per_second: Option<u64>, max_connections: Option<u64>) -> bool {
        let limit = ecpu_per_second.unwrap_or(0).saturating_mul(1000);
        let mut s = self.state.lock().unwrap();
        s.max_connections = max_connections;
        if s.limit == limit {
            return false;
        }
        s.limit = limit;
        let rate = limit / s.gateways as u64;
        self.apply_rate(&mut s, rate);
        true
    }

    /// This gateway's share; `None`: the control plane could not be asked.
    fn set_share(&self, share: Option<&LimitShare>) {
        let mut s = self.state.lock().unwrap();
        let rate = match share {
            Some(share) => {
                s.shared_at = Some(Instant::now());
                s.gateways = share.gateways.max(1);
                s.connections = share.connections;
                share.ecpu_milli_per_second.unwrap_or(0).min(s.limit)
            }
            None if s.shared_at.is_some_and(|at| at.elapsed() < SHARE_FOR) => return,
            None => {
                s.connections = s.max_connections.map(|max| max / s.gateways as u64);
                s.limit / s.gateways as u64
            }
        };
        let rate = if s.limit == 0 { 0 } else { rate.max(1) };
        self.apply_rate(&mut s, rate);
    }

    fn apply_rate(&self, s: &mut State, rate: u64) {
        let old = self.rate.swap(rate, Ordering::Relaxed);
        if old != rate {
            if old == 0 {
                s.tokens = rate as i64;
            }
            s.tokens = s.tokens.min(rate as i64);
            s.refilled = Instant::now();
        }
    }

    /// The connections this gateway may hold for the cache (`None`: only its own bound).
    pub fn connection_share(&self) -> Option<u64> {
        let s = self.state.lock().unwrap();
        s.max_connections.and(s.connections.or(s.max_connections.map(|m| m / s.gateways as u64)))
    }

    /// A client was refused for want of a connection share.
    pub fn connection_refused(&self) {
        let mut s = self.state.lock().unwrap();
        s.connections_refused += 1;
        s.refused_at = Some(Instant::now());
    }

    /// What to tell the control plane, counted since the last call.
    fn demand(&self, cache: &CacheId, connections: u64, elapsed: Duration) -> LimitDemand {
        let mut s = self.state.lock().unwrap();
        if s.refused_at.is_some_and(|at| at.elapsed() > REFUSALS_FOR) {
            s.connections_refused = 0;
        }
        let per_second = |milli: u64| (milli as u128 * 1000 / elapsed.as_millis().max(1)) as u64;
        let demand = LimitDemand {
            cache: cache.clone(),
            ecpu_per_second: (s.limit > 0).then_some(s.limit / 1000),
            ecpu_demand: per_second(s.used + s.refused),
            ecpu_saturated: s.refused > 0,
            max_connections: s.max_connections,
            connections,
            connections_refused: s.connections_refused,
        };
        (s.used, s.refused) = (0, 0);
        demand
    }

    fn refill(&self, s: &mut State, rate: u64) {
        let now = Instant::now();
        let elapsed = now.duration_since(s.refilled);
        let add = (elapsed.as_nanos() * rate as u128 / 1_000_000_000) as i64;
        if add > 0 {
            s.tokens = (s.tokens + add).min(rate as i64);
            // Keep the remainder of a partial milli-ECPU for the next refill.
            s.refilled += Duration::from_nanos((add as u128 * 1_000_000_000 / rate as u128) as u64);
        }
    }

    /// Takes `cost` milli-ECPU unless the bucket is in debt; then `Err(how long until it is
    /// repaid)`.
    pub fn try_take(&self, cost: u64) -> Result<(), Duration> {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return Ok(());
        }
        let mut s = self.state.lock().unwrap();
        self.refill(&mut s, rate);
        if s.tokens > 0 {
            s.tokens -= cost as i64;
            s.used += cost;
            return Ok(());
        }
        s.refused += cost;
        let missing = (1 - s.tokens) as u128;
        Err(Duration::from_nanos((missing * 1_000_000_000 / rate as u128) as u64 + 1))
    }

    /// Gives back what a command took up front when it was not billed after all.
    pub fn refund(&self, cost: u64) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || cost == 0 {
            return;
        }
        let mut s = self.state.lock().unwrap();
        s.tokens = (s.tokens + cost as i64).min(rate as i64);
        s.used = s.used.saturating_sub(cost);
    }

    /// Charges what a command cost beyond what it took up front.
    pub fn debit(&self, cost: u64) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || cost == 0 {
            return;
        }
        let mut s = self.state.lock().unwrap();
        self.refill(&mut s, rate);
        s.tokens -= cost as i64;
        s.used += cost;
    }
}

/// The buckets of the caches this gateway serves.
#[derive(Default)]
pub struct Buckets {
    map: Mutex<HashMap<CacheId, Arc<Bucket>>>,
    /// Gateways the last cache asked about was shared by: a new bucket's first guess.
    gateways: AtomicU32,
}

impl Buckets {
    /// The cache's bucket (shared by its sessions on this gateway), and whether it is new
    /// (no share asked for yet).
    pub fn get(&self, cache: &CacheId, limits: &shoal_types::CacheLimits) -> (Arc<Bucket>, bool) {
        let mut map = self.map.lock().unwrap();
        let mut new = false;
        let bucket = map
            .entry(cache.clone())
            .or_insert_with(|| {
                new = true;
                let gateways = self.gateways.load(Ordering::Relaxed);
                Arc::new(Bucket::new(limits.ecpu_per_second, limits.max_connections.map(u64::from), gateways))
            })
            .clone();
        (bucket, new)
    }

    /// Caches with sessions; buckets no session holds any more are dropped.
    fn served(&self) -> Vec<(CacheId, Arc<Bucket>)> {
        let mut map = self.map.lock().unwrap();
        map.retain(|_, b| Arc::strong_count(b) > 1);
        map.iter().map(|(id, b)| (id.clone(), b.clone())).collect()
    }
}

/// The first session of a cache on this gateway waits this long at most for its share (an
/// unreachable control plane must not hold logins up).
const ASK_AT_LOGIN: Duration = Duration::from_millis(500);

/// [`ask`] for a cache's first session here, on behalf of its client (who counts as one
/// wanting a connection), waiting at most [`ASK_AT_LOGIN`].
pub async fn ask_at_login(shared: &Shared, cache: &CacheId, bucket: &Arc<Bucket>) {
    bucket.connection_refused();
    let asked = [(cache.clone(), bucket.clone())];
    if tokio::time::timeout(ASK_AT_LOGIN, ask(shared, &asked, REPORT_EVERY, None)).await.is_err() {
        bucket.set_share(None);
    }
}

/// Asks the control plane for this gateway's shares of `caches`' limits and applies them
/// (or, if it cannot be reached, keeps or divides the last ones). `logins` (the failed logins
/// since the last report) go with them, and the lockouts answered are applied.
pub async fn ask(
    shared: &Shared,
    caches: &[(CacheId, Arc<Bucket>)],
    elapsed: Duration,
    logins: Option<LoginReport>,
) {
    let limited = |b: &Bucket| {
        let s = b.state.lock().unwrap();
        s.limit > 0 || s.max_connections.is_some()
    };
    let asked: Vec<&(CacheId, Arc<Bucket>)> = caches.iter().filter(|(_, b)| limited(b)).collect();
    if asked.is_empty() && logins.is_none() {
        return;
    }
    let demands: Vec<LimitDemand> = asked
        .iter()
        .map(|(id, b)| b.demand(id, shared.clients.counts(id).connected as u64, elapsed))
        .collect();
    let with_logins = logins.is_some();
    let report = LimitReport { gateway_id: instance(shared), demands, logins };
    match shared.control_plane.limits(&report).await {
        Ok(answer) => {
            let by_cache: HashMap<&CacheId, &LimitShare> =
                answer.shares.iter().map(|s| (&s.cache, s)).collect();
            for (id, bucket) in asked {
                if let Some(share) = by_cache.get(id) {
                    shared.buckets.gateways.store(share.gateways, Ordering::Relaxed);
                    bucket.set_share(Some(share));
                }
            }
            match answer.logins {
                Some(logins) => shared.throttles.answered(logins),
                None if with_logins => {
                    shared.throttles.unanswered("the control plane predates shared login throttling")
                }
                None => {}
            }
        }
        Err(e) => {
            if !asked.is_empty() {
                tracing::warn!(error = %e, "limit shares not available; the last ones hold");
            }
            for (_, bucket) in asked {
                bucket.set_share(None);
            }
            if with_logins {
                shared.throttles.unanswered(&e.to_string());
            }
        }
    }
}

/// This process among the gateways sharing a limit: its name and a random id of this run,
/// so that gateways behind one advertised address stay apart, and a restarted one is a
/// new gateway (the old one's shares lapse).
fn instance(shared: &Shared) -> String {
    static RUN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(rand::random);
    format!("{}/{run:016x}", shared.gateway_id)
}

/// Every [`REPORT_EVERY`]: applies the limits of the caches with sessions here (their
/// routes are re-read by the router) and asks for this gateway's shares, reporting its
/// failed logins, until `shutdown`.
pub async fn follow(shared: &Shared, mut shutdown: watch::Receiver<bool>) {
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REPORT_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        let served = shared.buckets.served();
        for (id, bucket) in &served {
            if let Some(route) = shared.router.cached(id) {
                if bucket
                    .set_limits(route.limits.ecpu_per_second, route.limits.max_connections.map(u64::from))
                {
                    tracing::info!(cache = %id, ecpu_per_second = ?route.limits.ecpu_per_second, "ECPU limit applied");
                }
            }
        }
        ask(shared, &served, last.elapsed(), shared.throttles.report()).await;
        last = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_its_rate_and_then_asks_to_wait() {
        let b = Bucket::new(Some(10), None, 1); // 10 ECPU/s = 10_000 milli
        for _ in 0..10 {
            assert!(b.try_take(1000).is_ok());
        }
        let wait = b.try_take(1000).unwrap_err();
        assert!(wait > Duration::from_micros(50) && wait <= Duration::from_millis(1), "{wait:?}");
        // Debt from replies (bytes beyond the estimate) delays the next command further.
        b.debit(5000);
        let wait = b.try_take(1000).unwrap_err();
        assert!(wait >= Duration::from_millis(490) && wait <= Duration::from_millis(510), "{wait:?}");
        // Lifting the limit lets everything through; setting one starts full.
        b.set_limits(None, None);
        assert!(b.try_take(1_000_000).is_ok());
        b.set_limits(Some(1), None);
        assert!(b.try_take(1000).is_ok());
        assert!(b.try_take(1).is_err());
    }

    #[test]
    fn unlimited_buckets_never_refuse() {
        let b = Bucket::new(None, None, 1);
        assert!(!b.limited());
        for _ in 0..1000 {
            assert!(b.try_take(u32::MAX as u64).is_ok());
        }
    }
}
