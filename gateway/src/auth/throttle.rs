//! Failed-login throttling that holds across gateways. This gateway throttles on its own
//! (`shoal_auth::Throttle`: one for cache and LDAP users, one for tokens), and with every
//! limits report (`crate::metering::limit`) tells the limits coordinator — the control plane
//! holding the `limits` lease — the logins it counted since the last one. The coordinator
//! counts every gateway's together and answers the lockouts; they are put into the local
//! throttles, so such a key is refused here exactly as if this gateway had counted the
//! failures itself.
//!
//! While the coordinator does not answer, each gateway throttles alone (K gateways allow up
//! to K× the attempts), and failures made meanwhile count only at their gateway.

use shoal_auth::throttle::{source_key, user_key, FailureOutcome, Verdict};
use shoal_auth::{Throttle, ThrottlePolicy};
use shoal_types::throttle::{LockCursor, LoginAnswer, LoginCount, LoginKind, LoginReport, MAX_LOGIN_KEYS};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// This gateway's throttles, and what the coordinator has not heard of yet.
pub struct Throttles {
    policy: ThrottlePolicy,
    users: Mutex<Throttle>,
    /// Token failures, per source only ([`ThrottlePolicy::for_tokens`]).
    tokens: Mutex<Throttle>,
    /// Logins since the last report, by key; at most [`MAX_LOGIN_KEYS`] (the rest count here only).
    unreported: Mutex<HashMap<(LoginKind, IpAddr, String), Counted>>,
    /// Where this gateway is in the coordinator's list of lockouts.
    cursor: Mutex<Option<LockCursor>>,
    /// The coordinator answered the last report (a change is logged).
    shared: AtomicBool,
}

#[derive(Clone, Copy, Default)]
struct Counted {
    failures: u32,
    succeeded: bool,
}

impl Throttles {
    pub fn new(policy: ThrottlePolicy) -> Throttles {
        Throttles {
            policy,
            users: Mutex::new(Throttle::new(policy)),
            tokens: Mutex::new(Throttle::new(policy.for_tokens())),
            unreported: Default::default(),
            cursor: Default::default(),
            shared: AtomicBool::new(true),
        }
    }

    fn throttle(&self, kind: LoginKind) -> &Mutex<Throttle> {
        match kind {
            LoginKind::User => &self.users,
            LoginKind::Token => &self.tokens,
        }
    }

    /// Asked before checking credentials: `user` is the attempt's throttle key.
    pub fn check(&self, kind: LoginKind, source: IpAddr, user: &str) -> Verdict {
        self.throttle(kind).lock().unwrap().check(Instant::now(), source, user)
    }

    /// Counts a failed attempt here, and for the coordinator.
    pub fn failure(&self, kind: LoginKind, source: IpAddr, user: &str) -> FailureOutcome {
        let outcome = self.throttle(kind).lock().unwrap().failure(Instant::now(), source, user);
        self.note(kind, source, user, |c| c.failures = c.failures.saturating_add(1));
        outcome
    }

    /// A successful login: the key's failures are forgotten, here and by the coordinator.
    /// Only a success that forgot failures here is reported, so a storm of good logins cannot
    /// crowd failures out of the report.
    pub fn success(&self, kind: LoginKind, source: IpAddr, user: &str) {
        if self.throttle(kind).lock().unwrap().success(source, user) {
            self.note(kind, source, user, |c| *c = Counted { failures: 0, succeeded: true });
        }
    }

    fn note(&self, kind: LoginKind, source: IpAddr, user: &str, update: impl FnOnce(&mut Counted)) {
        if !self.policy.enabled {
            return;
        }
        let key = (kind, source_key(source), user_key(user));
        let mut unreported = self.unreported.lock().unwrap();
        let len = unreported.len();
        match unreported.get_mut(&key) {
            Some(counted) => update(counted),
            None if len < MAX_LOGIN_KEYS => update(unreported.entry(key).or_default()),
            None => crate::metrics::login_key_unreported(),
        }
    }

    /// What the next limits report carries (the logins since the last one, which are then
    /// forgotten whether or not it is answered); None while throttling is off.
    pub fn report(&self) -> Option<LoginReport> {
        if !self.policy.enabled {
            return None;
        }
        let unreported = std::mem::take(&mut *self.unreported.lock().unwrap());
        let keys = unreported
            .into_iter()
            .map(|((kind, source, user), c)| LoginCount {
                kind,
                source,
                user,
                failures: c.failures,
                succeeded: c.succeeded,
            })
            .collect();
        Some(LoginReport { policy: self.policy, keys, since: *self.cursor.lock().unwrap() })
    }

    /// The coordinator's answer: its lockouts hold here from now on.
    pub fn answered(&self, answer: LoginAnswer) {
        let now = Instant::now();
        for lock in &answer.locks {
            let remaining = Duration::from_millis(lock.remaining_ms);
            self.throttle(lock.kind).lock().unwrap().lock(now, lock.source, lock.user.as_deref(), remaining);
        }
        *self.cursor.lock().unwrap() = Some(answer.cursor);
        if !self.shared.swap(true, Ordering::Relaxed) {
            tracing::info!("failed logins are counted with the other gateways' again");
        }
    }

    /// A report carrying logins went unanswered (or a control plane too old to count them
    /// answered it).
    pub fn unanswered(&self, why: &str) {
        if self.shared.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                why,
                "the limits coordinator does not count this gateway's failed logins: it throttles logins \
                 alone until it does"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_types::throttle::LoginLock;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy() -> ThrottlePolicy {
        let mut p = ThrottlePolicy::default();
        (p.per_user.free_failures, p.per_user.lockout_after) = (10, 6);
        p
    }

    #[test]
    fn a_report_carries_each_key_once_folded_and_then_starts_over() {
        let t = Throttles::new(policy());
        for user in ["Alice@c0123456789ab", " alice@c0123456789ab", "ALICE@c0123456789ab"] {
            t.failure(LoginKind::User, ip("10.0.0.1"), user);
        }
        t.failure(LoginKind::Token, ip("2001:db8::1"), "token-from:2001:db8::1");
        t.failure(LoginKind::User, ip("10.0.0.2"), "bob@c0123456789ab");
        t.success(LoginKind::User, ip("10.0.0.2"), "bob@c0123456789ab");
        t.failure(LoginKind::User, ip("10.0.0.2"), "bob@c0123456789ab");
        // A success with no failures to forget is not worth a key.
        t.success(LoginKind::User, ip("10.0.0.3"), "carol@c0123456789ab");
        let mut keys = t.report().unwrap().keys;
        keys.sort_by(|a, b| a.user.cmp(&b.user));
        let summary: Vec<_> =
            keys.iter().map(|k| (k.kind, k.source, k.user.as_str(), k.failures, k.succeeded)).collect();
        assert_eq!(
            summary,
            [
                (LoginKind::User, ip("10.0.0.1"), "alice@c0123456789ab", 3, false),
                // After the success, one failure.
                (LoginKind::User, ip("10.0.0.2"), "bob@c0123456789ab", 1, true),
                (LoginKind::Token, ip("2001:db8::"), "token-from:2001:db8::1", 1, false),
            ]
        );
        assert!(t.report().unwrap().keys.is_empty());
    }

    #[test]
    fn the_coordinators_lockouts_are_refused_like_local_ones() {
        let t = Throttles::new(policy());
        let src = ip("10.0.0.1");
        assert_eq!(t.check(LoginKind::User, src, "alice@c0123456789ab"), Verdict::Allow);
        let lock = |user: Option<&str>, source: &str| LoginLock {
            kind: LoginKind::User,
            source: ip(source),
            user: user.map(str::to_string),
            remaining_ms: 60_000,
        };
        let cursor = LockCursor { term: 7, seq: 2 };
        t.answered(LoginAnswer {
            locks: vec![lock(Some("alice@c0123456789ab"), "10.0.0.1"), lock(None, "10.9.9.9")],
            cursor,
        });
        assert!(matches!(
            t.check(LoginKind::User, src, "Alice@c0123456789ab"),
            Verdict::Locked { scope: shoal_auth::throttle::Scope::User, .. }
        ));
        // The user elsewhere is not locked; the locked source is, for everyone.
        assert_eq!(t.check(LoginKind::User, ip("10.0.0.2"), "alice@c0123456789ab"), Verdict::Allow);
        assert!(matches!(
            t.check(LoginKind::User, ip("10.9.9.9"), "x@c0123456789ab"),
            Verdict::Locked { .. }
        ));
        // Tokens are another throttle.
        assert_eq!(t.check(LoginKind::Token, ip("10.9.9.9"), "token-from:10.9.9.9"), Verdict::Allow);
        // The next report asks only for newer lockouts.
        assert_eq!(t.report().unwrap().since, Some(cursor));
    }

    #[test]
    fn reports_are_bounded_and_off_when_throttling_is() {
        let t = Throttles::new(policy());
        for i in 0..MAX_LOGIN_KEYS + 50 {
            t.failure(LoginKind::User, ip("10.0.0.1"), &format!("user{i}@c0123456789ab"));
        }
        assert_eq!(t.report().unwrap().keys.len(), MAX_LOGIN_KEYS);
        let off = Throttles::new(ThrottlePolicy::disabled());
        off.failure(LoginKind::User, ip("10.0.0.1"), "x@c0123456789ab");
        assert!(off.report().is_none());
    }
}
