//! Failed-login throttling (issue 4 "Abuse protection"), per source address, per user name
//! and per (user, source): the first few failures are free, then each attempt waits a
//! growing delay, then the key is locked out for a while. A user is locked out only at the
//! source that failed (their failures from everywhere only delay), so nobody can lock a user
//! out of their own address. Pure: the caller passes the time in and holds the lock.
//!
//! Memory is bounded: each table keeps at most `max_entries` keys, dropping forgotten ones
//! first, then the least recently failed (locked-out keys last).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

// The policy is a wire type too: gateways send theirs to the limits coordinator.
pub use shoal_types::throttle::{Limits, ThrottlePolicy};

/// Which key a lockout is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Source,
    /// The user at this source.
    User,
}

/// What to do with a login attempt, asked before checking the credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Wait this long, then check the credentials.
    Delay(Duration),
    /// Refuse without checking the credentials.
    Locked {
        scope: Scope,
        remaining: Duration,
    },
}

/// What a failure led to (for the audit log: a lockout is its own event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureOutcome {
    Counted,
    LockedOut(Scope),
}

/// Which keys a batch of failures locked out: the source, the user at the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewLocks {
    pub source: bool,
    pub user: bool,
}

/// Counters for metrics. The `_total` ones only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleStats {
    pub failures_total: u64,
    pub delayed_total: u64,
    pub lockouts_total: u64,
    pub refused_locked_total: u64,
    pub evicted_total: u64,
    pub tracked_sources: usize,
    pub tracked_users: usize,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    last_failure: Instant,
    locked_until: Option<Instant>,
}

struct Table<K> {
    entries: HashMap<K, Entry>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new() -> Self {
        Table { entries: HashMap::new() }
    }

    /// The entry as it stands at `now`, with an expired lockout or window already applied.
    fn current(&mut self, key: &K, now: Instant, window: Duration) -> Option<&mut Entry> {
        let entry = self.entries.get_mut(key)?;
        if let Some(until) = entry.locked_until {
            if now >= until {
                // The lockout is served: start over.
                entry.locked_until = None;
                entry.failures = 0;
            }
        } else if now.saturating_duration_since(entry.last_failure) > window {
            entry.failures = 0;
        }
        Some(entry)
    }

    fn verdict(
        &mut self,
        key: &K,
        now: Instant,
        limits: &Limits,
        window: Duration,
    ) -> (Option<Duration>, Duration) {
        let Some(entry) = self.current(key, now, window) else { return (None, Duration::ZERO) };
        if let Some(until) = entry.locked_until {
            return (Some(until - now), Duration::ZERO);
        }
        let wait = delay_after(entry.failures, limits)
            .saturating_sub(now.saturating_duration_since(entry.last_failure));
        (None, wait)
    }

    /// Counts `count` failures; true if they locked the key out.
    fn fail(
        &mut self,
        key: &K,
        now: Instant,
        limits: &Limits,
        policy: &ThrottlePolicy,
        count: u32,
    ) -> (bool, u64) {
        let (entry, evicted) = self.entry(key, now, policy);
        if entry.locked_until.is_some() {
            return (false, evicted);
        }
        entry.failures = entry.failures.saturating_add(count);
        entry.last_failure = now;
        let locks = limits.lockout_after > 0 && entry.failures >= limits.lockout_after;
        if locks {
            entry.locked_until = Some(now + limits.lockout);
        }
        (locks, evicted)
    }

    /// Locks the key out until `until` (unless it is locked longer already).
    fn lock(&mut self, key: &K, now: Instant, until: Instant, policy: &ThrottlePolicy) -> u64 {
        let (entry, evicted) = self.entry(key, now, policy);
        entry.locked_until = entry.locked_until.max(Some(until));
        evicted
    }

    /// The key's entry as it stands at `now`, made (room first) if there is none; and how
    /// many entries making room dropped.
    fn entry(&mut self, key: &K, now: Instant, policy: &ThrottlePolicy) -> (&mut Entry, u64) {
        let mut evicted = 0;
        if !self.entries.contains_key(key) && self.entries.len() >= policy.max_entries {
            evicted = self.make_room(now, policy);
        }
        if self.current(key, now, policy.window).is_none() {
            self.entries.insert(key.clone(), Entry { failures: 0, last_failure: now, locked_until: None });
        }
        (self.entries.get_mut(key).expect("inserted above"), evicted)
    }

    /// Drops forgotten entries; if that is not enough, the least recently failed tenth
    /// (locked-out entries only if nothing else is left). Returns how many were dropped.
    fn make_room(&mut self, now: Instant, policy: &ThrottlePolicy) -> u64 {
        let before = self.entries.len();
        self.entries.retain(|_, e| match e.locked_until {
            Some(until) => now < until,
            None => now.saturating_duration_since(e.last_failure) <= policy.window,
        });
        if self.entries.len() >= policy.max_entries {
            let mut order: Vec<(bool, Instant, K)> = self
                .entries
                .iter()
                .map(|(k, e)| (e.locked_until.is_some(), e.last_failure, k.clone()))
                .collect();
            order.sort_by_key(|(locked, last, _)| (*locked, *last));
            let drop = (policy.max_entries / 10).max(1) + self.entries.len() - policy.max_entries;
            for (_, _, key) in order.into_iter().take(drop) {
                self.entries.remove(&key);
            }
        }
        (before - self.entries.len()) as u64
    }
}

/// The delay owed after `failures` failures.
fn delay_after(failures: u32, limits: &Limits) -> Duration {
    if failures <= limits.free_failures {
        return Duration::ZERO;
    }
    let doublings = (failures - limits.free_failures - 1).min(30);
    limits.base_delay.saturating_mul(1 << doublings).min(limits.max_delay)
}

/// The key a source is counted under: IPv6 clients get a /64 each, so one host cannot dodge
/// its counter by changing addresses.
pub fn source_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            IpAddr::V6((u128::from(v6) & !0xffff_ffff_ffff_ffffu128).into())
        }
    }
}

/// User names are counted as a directory matches them (LDAP's caseIgnoreMatch: without
/// case, surrounding or repeated spaces), so `Alice`, `ALICE` and ` alice` are one key, and
/// cut to 256 bytes, so a key costs bounded memory.
pub fn user_key(user: &str) -> String {
    let folded = cut(user, 1024).split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    cut(&folded, 256).to_string()
}

fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Failed-attempt state for one process. Wrap it in a `Mutex`.
pub struct Throttle {
    policy: ThrottlePolicy,
    sources: Table<IpAddr>,
    /// A user's failures from every source: delays only.
    users: Table<String>,
    /// A user's failures from one source: delays and the lockout.
    pairs: Table<(IpAddr, String)>,
    stats: ThrottleStats,
}

impl Throttle {
    pub fn new(policy: ThrottlePolicy) -> Self {
        Throttle {
            policy,
            sources: Table::new(),
            users: Table::new(),
            pairs: Table::new(),
            stats: ThrottleStats::default(),
        }
    }

    pub fn policy(&self) -> &ThrottlePolicy {
        &self.policy
    }

    /// Asked before checking credentials.
    pub fn check(&mut self, now: Instant, source: IpAddr, user: &str) -> Verdict {
        if !self.policy.enabled {
            return Verdict::Allow;
        }
        let window = self.policy.window;
        let source = source_key(source);
        let user = user_key(user);
        let (src_locked, src_wait) = self.sources.verdict(&source, now, &self.policy.per_source, window);
        let (_, user_wait) = self.users.verdict(&user, now, &self.policy.per_user, window);
        let (user_locked, pair_wait) =
            self.pairs.verdict(&(source, user), now, &self.policy.per_user, window);
        let locked = match (src_locked, user_locked) {
            (Some(r), _) => Some((Scope::Source, r)),
            (None, Some(r)) => Some((Scope::User, r)),
            (None, None) => None,
        };
        if let Some((scope, remaining)) = locked {
            self.stats.refused_locked_total += 1;
            return Verdict::Locked { scope, remaining };
        }
        let wait = src_wait.max(user_wait).max(pair_wait);
        if wait.is_zero() {
            Verdict::Allow
        } else {
            self.stats.delayed_total += 1;
            Verdict::Delay(wait)
        }
    }

    /// Records a failed attempt (wrong password, unknown user; not "directory down").
    pub fn failure(&mut self, now: Instant, source: IpAddr, user: &str) -> FailureOutcome {
        match self.failures(now, source, user, 1) {
            NewLocks { source: true, .. } => FailureOutcome::LockedOut(Scope::Source),
            NewLocks { user: true, .. } => FailureOutcome::LockedOut(Scope::User),
            _ => FailureOutcome::Counted,
        }
    }

    /// Records `count` failed attempts at once (other gateways' failures, at the limits
    /// coordinator): which keys they locked out.
    pub fn failures(&mut self, now: Instant, source: IpAddr, user: &str, count: u32) -> NewLocks {
        self.stats.failures_total += u64::from(count);
        if !self.policy.enabled || count == 0 {
            return NewLocks::default();
        }
        let policy = self.policy;
        let source = source_key(source);
        let user = user_key(user);
        let (src_locked, e1) = self.sources.fail(&source, now, &policy.per_source, &policy, count);
        let delay_only = Limits { lockout_after: 0, ..policy.per_user };
        let (_, e2) = self.users.fail(&user, now, &delay_only, &policy, count);
        let (user_locked, e3) = self.pairs.fail(&(source, user), now, &policy.per_user, &policy, count);
        self.stats.evicted_total += e1 + e2 + e3;
        self.stats.lockouts_total += u64::from(src_locked) + u64::from(user_locked);
        NewLocks { source: src_locked, user: user_locked }
    }

    /// Locks a key out for `remaining` as if this process had counted the failures (a
    /// lockout the limits coordinator counted from every gateway's): the source, or with
    /// `user` the user at the source. A longer lockout already there is kept.
    pub fn lock(&mut self, now: Instant, source: IpAddr, user: Option<&str>, remaining: Duration) {
        if !self.policy.enabled {
            return;
        }
        let policy = self.policy;
        let source = source_key(source);
        let until = now + remaining;
        self.stats.evicted_total += match user {
            None => self.sources.lock(&source, now, until, &policy),
            Some(user) => self.pairs.lock(&(source, user_key(user)), now, until, &policy),
        };
    }

    /// Records a successful login: the user's failures are forgotten (those at other
    /// sources only count towards delays). The source's are not, or one valid account would
    /// let a source guess other users' passwords for ever. Whether there were any.
    pub fn success(&mut self, source: IpAddr, user: &str) -> bool {
        let user = user_key(user);
        let pair = self.pairs.entries.remove(&(source_key(source), user.clone()));
        pair.is_some() | self.users.entries.remove(&user).is_some()
    }

    pub fn stats(&self) -> ThrottleStats {
        ThrottleStats {
            tracked_sources: self.sources.entries.len(),
            tracked_users: self.users.entries.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy() -> ThrottlePolicy {
        let limits = |free, lock| Limits {
            free_failures: free,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(800),
            lockout_after: lock,
            lockout: Duration::from_secs(60),
        };
        ThrottlePolicy {
            enabled: true,
            per_user: limits(2, 8),
            per_source: limits(4, 20),
            window: Duration::from_secs(600),
            max_entries: 100,
        }
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn delay_grows_then_the_user_is_locked_out() {
        let mut t = Throttle::new(policy());
        let now = Instant::now();
        let src = ip("10.0.0.1");
        assert_eq!(t.check(now, src, "alice"), Verdict::Allow);
        // Two free failures.
        t.failure(now, src, "alice");
        t.failure(now, src, "alice");
        assert_eq!(t.check(now, src, "alice"), Verdict::Allow);
        // Then 100, 200, 400, 800, 800 ms.
        let mut expected = vec![];
        for _ in 0..5 {
            t.failure(now, src, "alice");
            expected.push(t.check(now, src, "alice"));
        }
        assert_eq!(expected, [100, 200, 400, 800, 800].map(|ms| Verdict::Delay(MS(ms))));
        // The delay runs from the last failure.
        assert_eq!(t.check(now + MS(300), src, "alice"), Verdict::Delay(MS(500)));
        assert_eq!(t.check(now + MS(800), src, "alice"), Verdict::Allow);
        // The 8th failure locks the user out for 60 s.
        assert_eq!(t.failure(now + MS(800), src, "alice"), FailureOutcome::LockedOut(Scope::User));
        let at = now + Duration::from_secs(30);
        assert_eq!(
            t.check(at, src, "alice"),
            Verdict::Locked { scope: Scope::User, remaining: Duration::from_secs(30) + MS(800) }
        );
        // Even the right password does not help while locked (the caller does not check it).
        assert!(matches!(t.check(at, src, " ALICE"), Verdict::Locked { .. }));
        // Other users from the same source are not locked out (the source has 8 of its 20).
        assert_eq!(t.check(at, src, "bob"), Verdict::Allow);
        assert_eq!(t.check(at, ip("10.0.0.2"), "bob"), Verdict::Allow);
        // Nor is alice at her own address: the failures elsewhere only delay her, and
        // only until the delay has run.
        assert_eq!(t.check(now + MS(800), ip("10.0.0.2"), "alice"), Verdict::Delay(MS(800)));
        assert_eq!(t.check(at, ip("10.0.0.2"), "alice"), Verdict::Allow);
        // Her success there does not unlock the source that failed.
        t.success(ip("10.0.0.2"), "alice");
        assert!(matches!(t.check(at, src, "alice"), Verdict::Locked { .. }));
        // After the lockout the user starts over.
        let after = now + Duration::from_secs(61);
        assert_eq!(t.check(after, src, "alice"), Verdict::Allow);
        let stats = t.stats();
        assert_eq!(stats.failures_total, 8);
        assert_eq!(stats.lockouts_total, 1);
        assert_eq!(stats.refused_locked_total, 3);
    }

    #[test]
    fn a_source_guessing_many_users_is_locked_out() {
        let mut t = Throttle::new(policy());
        let now = Instant::now();
        let src = ip("192.0.2.7");
        for i in 0..19 {
            assert_eq!(t.failure(now, src, &format!("user{i}")), FailureOutcome::Counted);
        }
        assert_eq!(t.failure(now, src, "user19"), FailureOutcome::LockedOut(Scope::Source));
        assert!(matches!(t.check(now, src, "fresh"), Verdict::Locked { scope: Scope::Source, .. }));
        // A success for one user does not clear the source.
        t.success(src, "user1");
        assert!(matches!(t.check(now, src, "user1"), Verdict::Locked { scope: Scope::Source, .. }));
    }

    #[test]
    fn ipv6_addresses_in_one_64_share_a_counter() {
        let mut t = Throttle::new(policy());
        let now = Instant::now();
        for i in 0..20 {
            t.failure(now, ip(&format!("2001:db8:1:2::{i:x}")), &format!("u{i}"));
        }
        assert!(matches!(t.check(now, ip("2001:db8:1:2:ffff::1"), "x"), Verdict::Locked { .. }));
        assert_eq!(t.check(now, ip("2001:db8:1:3::1"), "x"), Verdict::Allow);
        // An IPv4-mapped address is the IPv4 address.
        assert_eq!(source_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
    }

    #[test]
    fn failures_are_forgotten_after_the_window_and_on_success() {
        let mut t = Throttle::new(policy());
        let now = Instant::now();
        let src = ip("10.0.0.1");
        for _ in 0..5 {
            t.failure(now, src, "alice");
        }
        assert!(matches!(t.check(now, src, "alice"), Verdict::Delay(_)));
        // 10 minutes later the counters are gone: the next failure is a free one again.
        let later = now + Duration::from_secs(601);
        t.failure(later, src, "alice");
        assert_eq!(t.check(later, src, "alice"), Verdict::Allow);
        // A success clears the user's failures.
        for _ in 0..5 {
            t.failure(later, ip("10.9.9.9"), "bob");
        }
        t.success(ip("10.9.9.9"), "Bob");
        assert_eq!(t.check(later, ip("10.9.9.8"), "bob"), Verdict::Allow);
    }

    #[test]
    fn memory_stays_bounded_and_lockouts_survive_a_flood() {
        let mut t = Throttle::new(policy());
        let now = Instant::now();
        for _ in 0..8 {
            t.failure(now, ip("10.0.0.1"), "victim");
        }
        assert!(matches!(t.check(now, ip("10.0.0.1"), "victim"), Verdict::Locked { .. }));
        for i in 0..1000u32 {
            let [a, b, c, d] = i.to_be_bytes();
            let at = now + MS(u64::from(i));
            t.failure(at, IpAddr::from([11, b ^ a, c, d]), &format!("random-{i}"));
        }
        let stats = t.stats();
        assert!(stats.tracked_users <= 100 && stats.tracked_sources <= 100, "{stats:?}");
        assert!(stats.evicted_total > 0);
        // The flood did not unlock the victim.
        assert!(matches!(t.check(now + MS(1000), ip("10.0.0.1"), "victim"), Verdict::Locked { .. }));
    }

    #[test]
    fn failures_counted_at_once_lock_as_one_by_one_would() {
        let mut t = Throttle::new(policy());
        let now = Instant::now();
        let src = ip("10.0.0.1");
        assert_eq!(t.failures(now, src, "alice", 7), NewLocks::default());
        assert_eq!(t.failures(now, src, "alice", 3), NewLocks { source: false, user: true });
        assert!(matches!(t.check(now, src, "alice"), Verdict::Locked { scope: Scope::User, .. }));
        // Failures past the limits lock the source too, in one go.
        assert_eq!(t.failures(now, src, "bob", u32::MAX), NewLocks { source: true, user: true });
    }

    #[test]
    fn a_lockout_counted_elsewhere_is_refused_like_one_counted_here() {
        let mut t = Throttle::new(policy());
        let now = Instant::now();
        t.lock(now, ip("10.0.0.1"), Some(" Alice"), Duration::from_secs(30));
        t.lock(now, ip("2001:db8::5"), None, Duration::from_secs(10));
        assert_eq!(
            t.check(now, ip("10.0.0.1"), "alice"),
            Verdict::Locked { scope: Scope::User, remaining: Duration::from_secs(30) }
        );
        assert_eq!(t.check(now, ip("10.0.0.1"), "bob"), Verdict::Allow);
        assert!(matches!(
            t.check(now, ip("2001:db8::9"), "bob"),
            Verdict::Locked { scope: Scope::Source, .. }
        ));
        // A shorter lockout does not cut a longer one short; each ends when it says.
        t.lock(now, ip("10.0.0.1"), Some("alice"), Duration::from_secs(1));
        assert!(matches!(
            t.check(now + Duration::from_secs(20), ip("10.0.0.1"), "alice"),
            Verdict::Locked { .. }
        ));
        assert_eq!(t.check(now + Duration::from_secs(31), ip("10.0.0.1"), "alice"), Verdict::Allow);
        // Not while throttling is off.
        let mut off = Throttle::new(ThrottlePolicy::disabled());
        off.lock(now, ip("10.0.0.1"), None, Duration::from_secs(30));
        assert_eq!(off.check(now, ip("10.0.0.1"), "alice"), Verdict::Allow);
    }

    #[test]
    fn disabled_never_delays_but_counts() {
        let mut t = Throttle::new(ThrottlePolicy::disabled());
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(t.failure(now, ip("10.0.0.1"), "alice"), FailureOutcome::Counted);
        }
        assert_eq!(t.check(now, ip("10.0.0.1"), "alice"), Verdict::Allow);
        assert_eq!(t.stats().failures_total, 100);
        assert_eq!(t.stats().tracked_users, 0);
    }

    #[test]
    fn policy_reads_from_configuration_with_defaults() {
        let p: ThrottlePolicy = serde_json::from_str(
            r#"{"window_ms": 60000, "per_user": {"free_failures": 1, "base_delay_ms": 50,
                "max_delay_ms": 1000, "lockout_after": 5, "lockout_ms": 30000}}"#,
        )
        .unwrap();
        assert_eq!(p.window, Duration::from_secs(60));
        assert_eq!(p.per_user.lockout, Duration::from_secs(30));
        assert_eq!(p.per_source, ThrottlePolicy::default().per_source);
        assert!(p.enabled);
        assert!(serde_json::from_str::<ThrottlePolicy>(r#"{"windw_ms": 1}"#).is_err());
    }

    #[test]
    fn long_user_names_cost_bounded_memory() {
        assert_eq!(user_key(&"é".repeat(500)).len(), 256);
        assert_eq!(user_key("Alice"), "alice");
        // Beyond ASCII too, and spaces as a directory ignores them.
        assert_eq!(user_key("  ÅSA   Öberg "), user_key("åsa öberg"));
    }
}
