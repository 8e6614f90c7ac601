//! Failed-login throttling as the processes exchange it: the policy (`shoal_auth::Throttle`
//! applies it), and what gateways and the limits coordinator tell each other in the limits
//! report, so that a lockout holds whichever gateways an attacker uses.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::time::Duration;

/// How one key (a source, or a user at a source) is throttled. In configuration files durations are
/// milliseconds: `{ free_failures = 3, base_delay_ms = 250, max_delay_ms = 5000,
/// lockout_after = 10, lockout_ms = 300000 }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Failures allowed without any delay.
    pub free_failures: u32,
    /// The delay after the first failure past `free_failures`; it doubles with each one.
    #[serde(rename = "base_delay_ms", with = "millis")]
    pub base_delay: Duration,
    #[serde(rename = "max_delay_ms", with = "millis")]
    pub max_delay: Duration,
    /// Failures (within `window`) that lock the key out; 0 never locks.
    pub lockout_after: u32,
    #[serde(rename = "lockout_ms", with = "millis")]
    pub lockout: Duration,
}

/// Throttling parameters; every field may be left out of a configuration file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottlePolicy {
    pub enabled: bool,
    pub per_source: Limits,
    /// A user at one source; the same delays (never the lockout) apply to the user's failures
    /// from all sources together.
    pub per_user: Limits,
    /// A key's failures are forgotten this long after its last failure.
    #[serde(rename = "window_ms", with = "millis")]
    pub window: Duration,
    /// Most keys remembered per table (sources, users, users at a source).
    pub max_entries: usize,
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u64::MAX as u128) as u64)
    }
}

impl Default for ThrottlePolicy {
    /// 3 free failures per user, then 0.25 s doubling to 5 s, locked for 5 min after 10;
    /// a source (which may be a NAT of many people) gets 4× the allowance.
    fn default() -> Self {
        ThrottlePolicy {
            enabled: true,
            per_user: Limits {
                free_failures: 3,
                base_delay: Duration::from_millis(250),
                max_delay: Duration::from_secs(5),
                lockout_after: 10,
                lockout: Duration::from_secs(300),
            },
            per_source: Limits {
                free_failures: 12,
                base_delay: Duration::from_millis(250),
                max_delay: Duration::from_secs(5),
                lockout_after: 40,
                lockout: Duration::from_secs(300),
            },
            window: Duration::from_secs(900),
            max_entries: 100_000,
        }
    }
}

impl ThrottlePolicy {
    /// Never delays or locks anything (tests, `shoal dev`); still counts failures.
    pub fn disabled() -> Self {
        ThrottlePolicy { enabled: false, ..Self::default() }
    }

    /// The policy of token logins: they are counted per source only (a signature cannot be
    /// guessed, and a per-user count would let anyone lock a cache's token users out), so
    /// their one key, the source, gets the source limits.
    pub fn for_tokens(&self) -> ThrottlePolicy {
        ThrottlePolicy { per_user: self.per_source, ..*self }
    }
}

/// Most keys one limits report carries (keys with failures beyond these in one report
/// interval are throttled by their gateway alone), and most lockouts one answer carries.
pub const MAX_LOGIN_KEYS: usize = 10_000;

/// Which of a gateway's two throttles a key is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginKind {
    /// Cache users and LDAP users (`AUTH <user>@<cache> <password>`).
    User,
    /// Data-plane tokens (the policy's [`ThrottlePolicy::for_tokens`]).
    Token,
}

/// The failed logins a gateway counted since its last answered limits report: the
/// coordinator counts every gateway's in one throttle and answers the lockouts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoginReport {
    /// The gateway's `auth_throttle` (the coordinator counts gateways of one policy together).
    pub policy: ThrottlePolicy,
    /// At most [`MAX_LOGIN_KEYS`].
    pub keys: Vec<LoginCount>,
    /// The last [`LoginAnswer::cursor`] this gateway got: only newer lockouts are answered.
    pub since: Option<LockCursor>,
}

/// One throttle key's logins since the last report: `(source, user)` as the throttle keys
/// them (the source's /64 for IPv6, the user name folded), which also names the source's key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoginCount {
    pub kind: LoginKind,
    pub source: IpAddr,
    pub user: String,
    /// Failures since the last report (after the success, if there was one).
    pub failures: u32,
    /// A login succeeded: the failures before it are forgotten.
    pub succeeded: bool,
}

/// Where a gateway is in a coordinator's list of lockouts.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockCursor {
    /// Which coordinator's list (a new one starts a new list: everything is answered again).
    pub term: u64,
    pub seq: u64,
}

/// The lockouts a gateway has not been told of yet.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoginAnswer {
    /// At most [`MAX_LOGIN_KEYS`].
    pub locks: Vec<LoginLock>,
    pub cursor: LockCursor,
}

/// A key locked out by every gateway's failures together.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoginLock {
    pub kind: LoginKind,
    pub source: IpAddr,
    /// The user at `source`; None: the source itself, for every user.
    pub user: Option<String>,
    pub remaining_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_goes_over_the_wire_as_it_is_configured() {
        let policy = ThrottlePolicy::default();
        let json = serde_json::to_value(policy).unwrap();
        assert_eq!(json["per_user"]["lockout_ms"], 300_000);
        assert_eq!(serde_json::from_value::<ThrottlePolicy>(json).unwrap(), policy);
        assert_eq!(policy.for_tokens().per_user, policy.per_source);
    }
}
