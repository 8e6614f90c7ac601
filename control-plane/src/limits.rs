//! Limits shared by every gateway: a cache's ECPU/s and connection limits hold for the
//! cache as a whole, whichever gateways its clients use.
//!
//! Each gateway reports, every few hundred milliseconds, what it used of each cache's limits
//! and what it was refused ([`LimitDemand`]); the control plane answers with the gateway's
//! share until the next report ([`LimitShare`]), split among the gateways that reported in
//! the last [`FORGET_AFTER`] by their demand (max-min fair: a gateway that needs less than
//! an equal part gets what it needs plus headroom, the busy ones split the rest). The shares
//! of a cache never add up to more than its limit, so the gateways together keep it; a
//! gateway that stops reporting (it died) has its share handed to the others after
//! [`FORGET_AFTER`]. Connection shares are promises: a gateway may fill its share until its
//! next report, so the others' shares count in full when one gateway's is worked out, and
//! only its own report makes a share smaller.
//!
//! The reports live in one process's memory: with several control planes, the one holding
//! the `limits` lease ([`crate::lease`]) coordinates ([`Coordinator::serve`]) and the others
//! forward the reports they get to it ([`Forwarder`]), so every gateway's report meets the
//! others' wherever it arrives. Only control planes that gateways ask directly take part in
//! the lease ([`ASKED_WITHIN`]). A new coordinator that takes over from one that answered
//! recently first listens for [`WARM_UP`] before it answers (see [`Coordinator::serve`]).
//! When no coordinator answers, gateways get 503 and keep their last shares for 5 s, then
//! divide each limit by the number of gateways that shared it (gateway/src/metering/limit.rs).
//! docs/control-plane-ha.md has the design and its failure modes.
//!
//! The coordinator also counts the gateways' failed logins together ([`crate::login_locks`]),
//! the report and its answer carrying them.

use crate::store::leases::LeaseRecord;
use shoal_types::throttle::{LoginAnswer, LoginReport};
use shoal_types::{CacheId, LimitDemand, LimitReport, LimitShare};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A gateway silent this long no longer holds a share.
pub const FORGET_AFTER: Duration = Duration::from_secs(2);

/// A coordinator that takes over from one whose heartbeat is younger than [`RECENT`] learns
/// the gateways' demands for this long before it answers (gateways report every 250 ms):
/// meanwhile the gateways keep the shares the previous one gave, which hold 5 s.
pub const WARM_UP: Duration = Duration::from_secs(1);
/// The previous coordinator's shares may still be held by gateways (5 s, plus margin).
pub const RECENT: Duration = Duration::from_secs(10);
/// A control plane takes part in the `limits` lease while gateways ask it directly (not
/// through another control plane), and for this long after: the coordinator goes where the
/// reports arrive. With one internal endpoint for every gateway, nothing is forwarded.
pub const ASKED_WITHIN: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Coordinator {
    state: Mutex<State>,
    /// Every gateway's failed logins, while this process coordinates.
    logins: Mutex<crate::login_locks::LoginLocks>,
    /// While this process coordinates ([`Coordinator::serve`]): when it answers from.
    term: Mutex<Option<Instant>>,
    /// When a gateway last asked this process directly.
    asked: Mutex<Option<Instant>>,
    /// Wakes the `limits` lease of this process: to try at once ([`Coordinator::offer`]).
    wake: std::sync::Arc<tokio::sync::Notify>,
}

/// What this process does with a gateway's report now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// It coordinates: it answers the shares.
    Serving,
    /// It has just taken over: it records the demand and answers 503.
    WarmingUp,
    /// Another control plane coordinates (or none): forward the report.
    Elsewhere,
}

#[derive(Default)]
struct State {
    /// Each cache's gateways, by name.
    caches: HashMap<CacheId, HashMap<String, Reported>>,
    /// When caches nobody reports any more were last forgotten.
    swept: Option<Instant>,
}

struct Reported {
    demand: LimitDemand,
    /// The connections it was last allowed.
    granted: u64,
    at: Instant,
}

impl Coordinator {
    /// Coordinates for as long as the returned future runs (the `limits` lease's job: it is
    /// cancelled when the lease is lost), starting from nothing. After a takeover from a
    /// coordinator that answered within [`RECENT`], the first [`WARM_UP`] only records the
    /// reports: the first shares then count every gateway, not only the first to report
    /// (which would otherwise be given the whole of a limit others hold shares of).
    pub async fn serve(&self, acquired: crate::lease::Acquired) {
        let previous = acquired.previous.as_ref();
        let warm = previous.and_then(LeaseRecord::heartbeat_age).is_some_and(|age| age < RECENT);
        let from = Instant::now() + if warm { WARM_UP } else { Duration::ZERO };
        *self.state.lock().unwrap() = State::default();
        *self.logins.lock().unwrap() = Default::default();
        *self.term.lock().unwrap() = Some(from);
        tracing::info!(warm_up = ?(warm.then_some(WARM_UP)), "coordinating the gateways' limit shares here");
        struct Term<'a>(&'a Coordinator);
        impl Drop for Term<'_> {
            fn drop(&mut self) {
                *self.0.term.lock().unwrap() = None;
                *self.0.state.lock().unwrap() = State::default();
                *self.0.logins.lock().unwrap() = Default::default();
                tracing::info!("no longer coordinating the gateways' limit shares");
            }
        }
        let _term = Term(self);
        std::future::pending::<()>().await
    }

    /// A gateway asked this process directly (not through another control plane).
    pub fn asked(&self) {
        *self.asked.lock().unwrap() = Some(Instant::now());
    }

    /// Whether a gateway asked this process directly in the last [`ASKED_WITHIN`]: then it
    /// takes part in the `limits` lease.
    pub fn asked_recently(&self) -> bool {
        self.asked.lock().unwrap().is_some_and(|at| at.elapsed() < ASKED_WITHIN)
    }

    /// What wakes this process's `limits` lease (given to [`crate::lease::Lease::run_while`]).
    pub fn wake(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.wake.clone()
    }

    /// No coordinator could be reached: this process (asked by a gateway) offers to be it —
    /// its lease tries at once — and waits up to `within` for the outcome.
    pub async fn offer(&self, within: Duration) -> Phase {
        self.wake.notify_one();
        let deadline = Instant::now() + within;
        loop {
            let phase = self.phase();
            if phase != Phase::Elsewhere || Instant::now() >= deadline {
                return phase;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What to do with a report now.
    pub fn phase(&self) -> Phase {
        match *self.term.lock().unwrap() {
            None => Phase::Elsewhere,
            Some(from) if Instant::now() < from => Phase::WarmingUp,
            Some(_) => Phase::Serving,
        }
    }

    /// Records `gateway`'s demands without answering (a coordinator warming up): each holds
    /// what it reports it holds.
    pub fn observe(&self, gateway: &str, demands: Vec<LimitDemand>) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        for demand in demands {
            let granted = demand.connections;
            let gateways = state.caches.entry(demand.cache.clone()).or_default();
            gateways.insert(gateway.to_string(), Reported { demand, granted, at: now });
        }
    }

    /// Counts a gateway's failed logins (also while warming up: the answer is then dropped,
    /// and the gateway hears of the lockouts with its next report); the lockouts it has not
    /// been told of.
    pub fn logins(&self, report: &LoginReport) -> LoginAnswer {
        self.logins.lock().unwrap().report(Instant::now(), report)
    }

    /// Records `gateway`'s demands and answers its shares.
    pub fn report(&self, gateway: &str, demands: Vec<LimitDemand>) -> Vec<LimitShare> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let caches = &mut state.caches;
        let mut shares = Vec::with_capacity(demands.len());
        for demand in demands {
            let cache = demand.cache.clone();
            let gateways = caches.entry(cache.clone()).or_default();
            gateways.retain(|_, r| now.duration_since(r.at) < FORGET_AFTER);
            let others: Vec<(u64, u64)> = gateways
                .iter()
                .filter(|(name, _)| *name != gateway)
                .map(|(_, r)| (r.granted.max(r.demand.connections), r.demand.connections_refused))
                .collect();
            let connections = demand
                .max_connections
                .map(|max| connection_grant(max, (demand.connections, demand.connections_refused), &others));
            let granted = connections.unwrap_or(0);
            gateways.insert(gateway.to_string(), Reported { demand, granted, at: now });
            let mut names: Vec<&String> = gateways.keys().collect();
            names.sort();
            let me = names.iter().position(|n| *n == gateway).expect("inserted above");
            let all: Vec<&LimitDemand> = names.iter().map(|n| &gateways[*n].demand).collect();
            let ecpu = all[me].ecpu_per_second.map(|limit| {
                let wants: Vec<Option<u64>> =
                    all.iter().map(|d| (!d.ecpu_saturated).then_some(d.ecpu_demand)).collect();
                ecpu_shares(limit.saturating_mul(1000), &wants)[me]
            });
            shares.push(LimitShare {
                cache,
                ecpu_milli_per_second: ecpu,
                connections,
                gateways: all.len() as u32,
            });
        }
        // Caches nobody reported for a while are forgotten: a sweep of them all, so at most
        // once per FORGET_AFTER, not on every report.
        if state.swept.is_none_or(|at| now.duration_since(at) >= FORGET_AFTER) {
            state.caches.retain(|_, g| g.values().any(|r| now.duration_since(r.at) < FORGET_AFTER));
            state.swept = Some(now);
        }
        shares
    }
}

/// Splits `limit` among gateways that want `Some(rate)` (they used that much and were
/// refused nothing) or `None` (they were throttled: as much as they can get). Max-min fair:
/// a gateway's share is what it wants plus a quarter, or an equal part of what is left,
/// whichever is smaller; what nobody wants is split equally. The sum is `limit`.
pub fn ecpu_shares(limit: u64, wants: &[Option<u64>]) -> Vec<u64> {
    let n = wants.len() as u64;
    if n == 0 {
        return Vec::new();
    }
    // Headroom: a quiet gateway's next burst is not refused at once.
    let wanted = |w: Option<u64>| w.map_or(u64::MAX, |w| w.saturating_add(w / 4).max(limit / (10 * n)));
    let mut order: Vec<usize> = (0..wants.len()).collect();
    order.sort_by_key(|&i| wanted(wants[i]));
    let mut shares = vec![0; wants.len()];
    let mut left = limit;
    for (k, &i) in order.iter().enumerate() {
        let part = left / (n - k as u64);
        shares[i] = wanted(wants[i]).min(part);
        left -= shares[i];
    }
    // What is left over goes to everyone alike (the first ones take the remainder).
    for (k, share) in shares.iter_mut().enumerate() {
        *share += left / n + u64::from((k as u64) < left % n);
    }
    shares
}

/// The connections a gateway holding `mine = (open, refused)` may hold until its next
/// report, when the others hold `(share, refused)` each (their shares count in full: they
/// may fill them meanwhile). What nobody holds is shared with the others that had to
/// refuse clients, in proportion to `1 + refused` for this one and `refused` for them, and
/// rounded up for this one (a lone asker gets one); a gateway that refused nobody keeps
/// only what it holds while others refuse clients. The shares never add up to more than
/// `max` unless the gateways already hold more (a limit lowered): then nobody gets a new one.
pub fn connection_grant(max: u64, mine: (u64, u64), others: &[(u64, u64)]) -> u64 {
    let reserved: u64 = others.iter().map(|o| o.0).sum();
    let free = max.saturating_sub(reserved).saturating_sub(mine.0) as u128;
    let others_refusing = others.iter().map(|o| o.1 as u128).sum::<u128>();
    // A gateway that refused nobody keeps no spare room while others refuse clients.
    let me = if mine.1 > 0 || others_refusing == 0 { 1 + mine.1 as u128 } else { 0 };
    if me == 0 {
        return mine.0;
    }
    mine.0 + free.saturating_mul(me).div_ceil(me + others_refusing).min(free) as u64
}

/// The header a forwarded report carries (the forwarding control plane's instance): the
/// receiver answers it itself or refuses it, never forwards it again.
pub const FORWARDED_BY: &str = "x-shoal-forwarded-by";
/// Longest wait for the coordinator's answer to a forwarded report (a gateway asks four
/// times a second, and waits at most 0.5 s for a new cache's first share).
pub const FORWARD_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a control plane that found no coordinator waits for its own lease
/// ([`Coordinator::offer`]).
pub const OFFER_WAIT: Duration = Duration::from_millis(250);
/// How long the coordinator's row is trusted before it is read again.
const HOLDER_FOR: Duration = Duration::from_secs(1);

/// Sends the reports of a control plane that does not coordinate to the one that does (the
/// holder of the `limits` lease, at the internal URL it wrote in the lease's row), with the
/// gateway's own credential: the coordinator authenticates the gateway itself.
pub struct Forwarder {
    http: reqwest::Client,
    /// The lease's row, and when it was read.
    holder: tokio::sync::Mutex<Option<(Instant, Option<LeaseRecord>)>>,
    /// When a failure was last logged (one line per 10 s at most).
    logged: Mutex<Option<Instant>>,
}

/// Why a report could not be forwarded: the gateway gets 503 and falls back.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no control plane coordinates the limits now")]
    NoCoordinator,
    #[error("the limits coordinator ({holder}) advertises no internal URL (set internal_advertise)")]
    NoUrl { holder: String },
    #[error("the limits coordinator ({holder}) at {url} cannot be reached: {error}")]
    Unreachable { holder: String, url: String, error: String },
    #[error("the control plane at {url} no longer coordinates the limits")]
    Moved { url: String },
    #[error("store: {0}")]
    Store(#[from] sqlx::Error),
}

impl ForwardError {
    /// The coordinator could not be asked (as opposed to: there is none now, or it moved).
    fn coordinator_unreachable(&self) -> bool {
        matches!(self, ForwardError::Unreachable { .. } | ForwardError::NoUrl { .. } | ForwardError::Store(_))
    }
}

/// The coordinator's answer, as it is passed on to the gateway.
pub struct Forwarded {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Forwarder {
    /// The client for other control planes' internal APIs: it trusts `internal_peer_ca`, else
    /// the certificates of `internal_tls_cert` (control planes that share the internal
    /// certificate, or whose file holds the chain up to their common CA).
    pub fn new(config: &crate::config::ControlPlaneConfig) -> Result<Forwarder, String> {
        let mut http = reqwest::Client::builder().timeout(FORWARD_TIMEOUT).no_proxy();
        let trusted = config
            .internal_peer_ca
            .as_ref()
            .map(|p| ("internal_peer_ca", p))
            .or(config.internal_tls_cert.as_ref().map(|p| ("internal_tls_cert", p)));
        if let Some((option, path)) = trusted {
            let pem = std::fs::read(path).map_err(|e| format!("reading {option} {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{option} {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{option} {} holds no PEM certificate", path.display()));
            }
            http = http.tls_built_in_root_certs(false);
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http.build().map_err(|e| format!("the client of other control planes: {e}"))?;
        Ok(Forwarder { http, holder: Default::default(), logged: Default::default() })
    }

    /// Forwards `report`, which came with `authorization` (the gateway's credential), to the
    /// coordinator, unless `me` is named as the holder (it has just lost the lease).
    pub async fn forward(
        &self,
        store: &crate::store::Store,
        me: &str,
        authorization: &str,
        report: &LimitReport,
    ) -> Result<Forwarded, ForwardError> {
        let result = self.try_forward(store, me, authorization, report).await;
        let outcome = match &result {
            Ok(_) => "forwarded",
            Err(e) if e.coordinator_unreachable() => "unreachable",
            Err(_) => "no_coordinator",
        };
        metrics::counter!("shoal_limits_reports_forwarded_total", "outcome" => outcome).increment(1);
        // No coordinator, or one that has just moved, is a moment of a takeover: not logged.
        if let Some(e) = result.as_ref().err().filter(|e| e.coordinator_unreachable()) {
            let mut logged = self.logged.lock().unwrap();
            if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                *logged = Some(Instant::now());
                tracing::warn!(error = %e, "a gateway's limit report could not be forwarded; it falls back");
            }
        }
        result
    }

    async fn try_forward(
        &self,
        store: &crate::store::Store,
        me: &str,
        authorization: &str,
        report: &LimitReport,
    ) -> Result<Forwarded, ForwardError> {
        let holder = self.holder(store).await?.ok_or(ForwardError::NoCoordinator)?;
        if holder.holder == me {
            return Err(ForwardError::NoCoordinator);
        }
        let url = holder.url.clone().ok_or_else(|| ForwardError::NoUrl { holder: holder.holder.clone() })?;
        let unreachable = |error: String| ForwardError::Unreachable {
            holder: holder.holder.clone(),
            url: url.clone(),
            error,
        };
        let resp = self
            .http
            .post(format!("{}/internal/v1/limits", url.trim_end_matches('/')))
            .header("Authorization", authorization)
            .header(FORWARDED_BY, me)
            .json(report)
            .send()
            .await
            .map_err(|e| {
                // The row may be stale (a new holder): read it again next time.
                self.invalidate();
                unreachable(crate::error::chain(&e))
            })?;
        let status = resp.status().as_u16();
        if status == 421 {
            // It lost the lease since it wrote the row: read it again next time.
            self.invalidate();
            return Err(ForwardError::Moved { url });
        }
        let content_type =
            resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = resp.bytes().await.map_err(|e| unreachable(crate::error::chain(&e)))?.to_vec();
        Ok(Forwarded { status, content_type, body })
    }

    /// Forgets the `limits` lease's row: the next report reads it again.
    pub fn invalidate(&self) {
        if let Ok(mut h) = self.holder.try_lock() {
            *h = None;
        }
    }

    /// The `limits` lease's row (read at most once per [`HOLDER_FOR`]).
    async fn holder(&self, store: &crate::store::Store) -> Result<Option<LeaseRecord>, sqlx::Error> {
        let mut cached = self.holder.lock().await;
        if let Some((at, row)) = cached.as_ref() {
            if at.elapsed() < HOLDER_FOR {
                return Ok(row.clone());
            }
        }
        let row = store.lease(crate::lease::LIMITS).await?;
        *cached = Some((Instant::now(), row.clone()));
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_gateways_split_the_limit_and_quiet_ones_keep_what_they_use() {
        // Three throttled gateways: a third each, the whole limit.
        assert_eq!(ecpu_shares(5_000_000, &[None, None, None]), [1_666_666, 1_666_667, 1_666_667]);
        // One uses 400 ECPU/s: it keeps that and a quarter more; the busy two split the rest.
        let s = ecpu_shares(5_000_000, &[Some(400_000), None, None]);
        assert_eq!(s[0], 500_000);
        assert_eq!(s[1] + s[2], 4_500_000);
        // Nobody busy: the unused part is split alike, still the whole limit.
        let s = ecpu_shares(3_000_000, &[Some(100_000), Some(200_000)]);
        assert_eq!(s.iter().sum::<u64>(), 3_000_000);
        assert!(s[1] > s[0]);
        // Alone: everything.
        assert_eq!(ecpu_shares(7_000, &[Some(0)]), [7_000]);
    }

    #[test]
    fn connection_shares_never_exceed_the_limit() {
        // Alone: everything free.
        assert_eq!(connection_grant(10, (0, 0), &[]), 10);
        // The other holds a share of 6: 4 are left.
        assert_eq!(connection_grant(10, (0, 1), &[(6, 0)]), 4);
        // The other refuses clients and this one does not: it keeps what it holds.
        assert_eq!(connection_grant(10, (1, 0), &[(6, 3)]), 1);
        // Both refuse: the 3 free are shared by refusals, this one's part rounded up.
        assert_eq!(connection_grant(10, (1, 1), &[(6, 3)]), 1 + 2);
        // A lowered limit: keep what is held, no more.
        assert_eq!(connection_grant(3, (2, 5), &[(2, 0)]), 2);
        // Gateways reporting in turn, each filling its share before its next report: the
        // connections held never exceed the limit, and all of it ends up used.
        let max = 7;
        let mut held = [0u64; 3];
        let mut granted = [0u64; 3];
        for round in 0..30 {
            let g = round % 3;
            let others: Vec<(u64, u64)> =
                (0..3).filter(|&h| h != g).map(|h| (granted[h].max(held[h]), 1)).collect();
            granted[g] = connection_grant(max, (held[g], 1), &others);
            held[g] = granted[g];
            assert!(held.iter().sum::<u64>() <= max, "{held:?}");
        }
        assert_eq!(held.iter().sum::<u64>(), max, "{held:?}");
    }

    #[test]
    fn a_silent_gateway_gives_its_share_back() {
        let c = Coordinator::default();
        let id = CacheId::generate();
        let demand = |saturated| LimitDemand {
            cache: id.clone(),
            ecpu_per_second: Some(900),
            ecpu_demand: 0,
            ecpu_saturated: saturated,
            max_connections: Some(6),
            connections: 0,
            connections_refused: 0,
        };
        c.report("a", vec![demand(true)]);
        let b = c.report("b", vec![demand(true)]);
        assert_eq!((b[0].ecpu_milli_per_second, b[0].gateways), (Some(450_000), 2));
        assert_eq!(b[0].connections, Some(0), "a's share of 6 holds until it reports again");
        // "a" stops reporting.
        c.state.lock().unwrap().caches.get_mut(&id).unwrap().get_mut("a").unwrap().at -= FORGET_AFTER;
        let b = c.report("b", vec![demand(true)]);
        assert_eq!(
            (b[0].ecpu_milli_per_second, b[0].gateways, b[0].connections),
            (Some(900_000), 1, Some(6))
        );
    }
}
