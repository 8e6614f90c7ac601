//! Failed data-plane logins counted for every gateway together, so that a lockout holds
//! whichever gateways an attacker spreads guesses over. Each limits report carries the
//! gateway's failures since its last one ([`LoginReport`]); they are counted here in one
//! `shoal_auth::Throttle` (per policy: gateways configured alike count together), and the
//! answer names the lockouts the gateway has not been told of yet ([`LoginAnswer`]), which
//! it then enforces as if it had counted the failures itself (gateway/src/auth/throttle.rs).
//!
//! Kept by the limits coordinator ([`crate::limits::Coordinator`]) in memory: a new
//! coordinator starts from nothing, and gateways keep the lockouts they were told of.

use shoal_auth::throttle::{source_key, user_key, NewLocks};
use shoal_auth::{Throttle, ThrottlePolicy};
use shoal_types::throttle::{LockCursor, LoginAnswer, LoginKind, LoginLock, LoginReport, MAX_LOGIN_KEYS};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Instant;

/// Most policies counted apart (gateways configured differently, e.g. during a change of
/// `auth_throttle`); a new one beyond them replaces the one reported least recently.
pub const MAX_POLICIES: usize = 4;
/// Most keys each table of a policy's throttles remembers, whatever a gateway's
/// `max_entries` says.
pub const MAX_ENTRIES: usize = 100_000;
/// Most lockouts remembered for gateways that have not been told yet (oldest dropped first).
pub const MAX_LOCKS_KEPT: usize = 10 * MAX_LOGIN_KEYS;
/// The longest user key a gateway sends (the throttle cuts folded names to this).
const MAX_USER_BYTES: usize = 256;

/// Every policy's throttles and lockouts.
#[derive(Default)]
pub struct LoginLocks {
    pools: Vec<Pool>,
}

/// The gateways of one policy.
struct Pool {
    policy: ThrottlePolicy,
    /// When a gateway of this policy last reported.
    seen: Instant,
    /// This list's id in cursors (a new pool, or a new coordinator, starts a new list).
    term: u64,
    /// The last lockout's number.
    seq: u64,
    users: Throttle,
    tokens: Throttle,
    /// Lockouts not over yet, in the order they were made.
    locks: VecDeque<Logged>,
}

struct Logged {
    seq: u64,
    until: Instant,
    kind: LoginKind,
    source: IpAddr,
    user: Option<String>,
}

/// Checks a report before anything is counted: a bad one changes nothing.
pub fn validate(report: &LoginReport) -> Result<(), String> {
    if report.keys.len() > MAX_LOGIN_KEYS {
        return Err(format!("at most {MAX_LOGIN_KEYS} keys per report"));
    }
    if let Some(i) = report.keys.iter().position(|k| k.user.len() > MAX_USER_BYTES) {
        return Err(format!("keys[{i}].user: at most {MAX_USER_BYTES} bytes"));
    }
    Ok(())
}

impl Pool {
    fn new(policy: ThrottlePolicy, now: Instant) -> Pool {
        let policy_here = ThrottlePolicy { max_entries: policy.max_entries.min(MAX_ENTRIES), ..policy };
        Pool {
            policy,
            seen: now,
            term: rand::random(),
            seq: 0,
            users: Throttle::new(policy_here),
            tokens: Throttle::new(policy_here.for_tokens()),
            locks: VecDeque::new(),
        }
    }

    fn count(&mut self, now: Instant, report: &LoginReport) {
        for key in &report.keys {
            let throttle = match key.kind {
                LoginKind::User => &mut self.users,
                LoginKind::Token => &mut self.tokens,
            };
            if key.succeeded {
                throttle.success(key.source, &key.user);
            }
            let locked: NewLocks = throttle.failures(now, key.source, &key.user, key.failures);
            let p = throttle.policy();
            let (source_until, user_until) = (now + p.per_source.lockout, now + p.per_user.lockout);
            let source = source_key(key.source);
            if locked.source {
                self.log(source_until, key.kind, source, None);
            }
            if locked.user {
                self.log(user_until, key.kind, source, Some(user_key(&key.user)));
            }
        }
    }

    fn log(&mut self, until: Instant, kind: LoginKind, source: IpAddr, user: Option<String>) {
        self.seq += 1;
        self.locks.push_back(Logged { seq: self.seq, until, kind, source, user });
        if self.locks.len() > MAX_LOCKS_KEPT {
            self.locks.pop_front();
        }
    }

    /// The lockouts after `since` (all of them for another list's cursor), oldest first, at
    /// most [`MAX_LOGIN_KEYS`]: the cursor of the last one answered, so the rest come next time.
    fn answer(&mut self, now: Instant, since: Option<LockCursor>) -> LoginAnswer {
        self.locks.retain(|l| l.until > now);
        let after = since.filter(|c| c.term == self.term).map_or(0, |c| c.seq);
        let locks: Vec<&Logged> = self.locks.iter().filter(|l| l.seq > after).take(MAX_LOGIN_KEYS).collect();
        let seq = if locks.len() == MAX_LOGIN_KEYS { locks[locks.len() - 1].seq } else { self.seq };
        LoginAnswer {
            locks: locks
                .into_iter()
                .map(|l| LoginLock {
                    kind: l.kind,
                    source: l.source,
                    user: l.user.clone(),
                    remaining_ms: l.until.duration_since(now).as_millis() as u64,
                })
                .collect(),
            cursor: LockCursor { term: self.term, seq },
        }
    }
}

impl LoginLocks {
    /// Counts a gateway's failures (a [`validate`]d report); the lockouts it has not been
    /// told of.
    pub fn report(&mut self, now: Instant, report: &LoginReport) -> LoginAnswer {
        let pool = self.pool(now, report.policy);
        pool.count(now, report);
        pool.answer(now, report.since)
    }

    /// The pool of `policy`, made if need be.
    fn pool(&mut self, now: Instant, policy: ThrottlePolicy) -> &mut Pool {
        let i = match self.pools.iter().position(|p| p.policy == policy) {
            Some(i) => i,
            None => {
                if self.pools.len() >= MAX_POLICIES {
                    let stalest =
                        (0..self.pools.len()).min_by_key(|&i| self.pools[i].seen).expect("not empty");
                    self.pools.swap_remove(stalest);
                }
                self.pools.push(Pool::new(policy, now));
                self.pools.len() - 1
            }
        };
        let pool = &mut self.pools[i];
        pool.seen = now;
        pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_types::throttle::LoginCount;
    use std::time::Duration;

    fn policy() -> ThrottlePolicy {
        let mut p = ThrottlePolicy::default();
        p.per_user.lockout_after = 6;
        p.per_source.lockout_after = 9;
        p
    }

    fn count(kind: LoginKind, source: &str, user: &str, failures: u32) -> LoginCount {
        LoginCount { kind, source: source.parse().unwrap(), user: user.into(), failures, succeeded: false }
    }

    fn report(keys: Vec<LoginCount>, since: Option<LockCursor>) -> LoginReport {
        LoginReport { policy: policy(), keys, since }
    }

    #[test]
    fn failures_from_three_gateways_lock_out_once_their_sum_reaches_the_limit() {
        let mut c = LoginLocks::default();
        let now = Instant::now();
        let alice = |n| count(LoginKind::User, "10.0.0.1", "Alice@c0123456789ab", n);
        // Two failures on each of three gateways: 6 in all, the user limit.
        let a = c.report(now, &report(vec![alice(2)], None));
        let b = c.report(now, &report(vec![alice(2)], None));
        assert!(a.locks.is_empty() && b.locks.is_empty());
        let third = c.report(now, &report(vec![alice(2)], None));
        assert_eq!(
            third.locks,
            [LoginLock {
                kind: LoginKind::User,
                source: "10.0.0.1".parse().unwrap(),
                user: Some("alice@c0123456789ab".into()),
                remaining_ms: 300_000,
            }]
        );
        // A gateway that failed nothing hears of it too, once: its cursor moves past it.
        let quiet = c.report(now, &report(vec![], None));
        assert_eq!(quiet.locks, third.locks);
        let later = now + Duration::from_secs(100);
        let again = c.report(later, &report(vec![], Some(quiet.cursor)));
        assert!(again.locks.is_empty());
        // A cursor of another list (a new coordinator) gets every lockout not over, with
        // what is left of it; none once it is over.
        let other = LockCursor { term: quiet.cursor.term.wrapping_add(1), seq: 99 };
        assert_eq!(c.report(later, &report(vec![], Some(other))).locks[0].remaining_ms, 200_000);
        assert!(c.report(now + Duration::from_secs(301), &report(vec![], None)).locks.is_empty());
    }

    #[test]
    fn sources_lock_on_their_total_and_tokens_count_apart() {
        let mut c = LoginLocks::default();
        let now = Instant::now();
        // 9 failures from one source over many users lock the source (no user has 6).
        let keys = (0..9).map(|i| count(LoginKind::User, "10.0.0.2", &format!("u{i}@c0123456789ab"), 1));
        let answer = c.report(now, &report(keys.collect(), None));
        assert_eq!(answer.locks.len(), 1);
        assert_eq!(answer.locks[0].user, None);
        // Bad tokens from another source: counted per source with the source limits.
        let token = count(LoginKind::Token, "2001:db8::7", "token-from:2001:db8::7", 8);
        let answer = c.report(now, &report(vec![token.clone()], Some(answer.cursor)));
        assert!(answer.locks.is_empty());
        let answer = c.report(now, &report(vec![LoginCount { failures: 1, ..token }], Some(answer.cursor)));
        assert!(answer.locks.iter().all(|l| l.kind == LoginKind::Token), "{answer:?}");
        assert_eq!(answer.locks[0].source, "2001:db8::".parse::<IpAddr>().unwrap(), "the /64");
    }

    #[test]
    fn a_success_forgets_the_failures_before_it() {
        let mut c = LoginLocks::default();
        let now = Instant::now();
        // 4 failures, a success, 4 more: 4 count (8 would lock the user out at 6).
        c.report(now, &report(vec![count(LoginKind::User, "10.0.0.3", "bob@c0123456789ab", 4)], None));
        let mut ok = count(LoginKind::User, "10.0.0.3", "bob@c0123456789ab", 4);
        ok.succeeded = true;
        assert!(c.report(now, &report(vec![ok], None)).locks.is_empty());
    }

    #[test]
    fn gateways_of_another_policy_count_apart_and_policies_are_bounded() {
        let mut c = LoginLocks::default();
        let now = Instant::now();
        let key = || vec![count(LoginKind::User, "10.0.0.4", "carol@c0123456789ab", 5)];
        c.report(now, &report(key(), None));
        let mut other = report(key(), None);
        other.policy.per_user.lockout_after = 7;
        assert!(c.report(now, &other).locks.is_empty());
        for n in 0..10 {
            other.policy.per_user.lockout = Duration::from_secs(n);
            c.report(now + Duration::from_secs(n), &other);
        }
        assert_eq!(c.pools.len(), MAX_POLICIES);
    }

    #[test]
    fn answers_are_bounded_and_page_by_cursor() {
        let mut c = LoginLocks::default();
        let now = Instant::now();
        for round in 0..2 {
            let keys = (0..MAX_LOGIN_KEYS)
                .map(|i| {
                    count(
                        LoginKind::User,
                        &format!("10.{round}.{}.{}", i / 256, i % 256),
                        "x@c0123456789ab",
                        6,
                    )
                })
                .collect();
            c.report(now, &report(keys, None));
        }
        // 2 × MAX_LOGIN_KEYS lockouts: a gateway new to them gets them in two answers.
        let first = c.report(now, &report(vec![], None));
        assert_eq!(first.locks.len(), MAX_LOGIN_KEYS);
        let next = c.report(now, &report(vec![], Some(first.cursor)));
        assert_eq!(next.locks.len(), MAX_LOGIN_KEYS);
        assert_ne!(first.locks[0], next.locks[0]);
        assert!(c.report(now, &report(vec![], Some(next.cursor))).locks.is_empty());
    }

    #[test]
    fn bad_reports_are_refused_whole() {
        let long = count(LoginKind::User, "10.0.0.5", &"x".repeat(300), 1);
        assert!(validate(&report(vec![long], None)).unwrap_err().contains("keys[0].user"));
        let many = vec![count(LoginKind::User, "10.0.0.5", "x", 1); MAX_LOGIN_KEYS + 1];
        assert!(validate(&report(many, None)).is_err());
        assert!(validate(&report(vec![count(LoginKind::Token, "10.0.0.5", "y", u32::MAX)], None)).is_ok());
    }
}
