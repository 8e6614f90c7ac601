//! What a client's `AUTH` names, and the facts about one attempt that go to the audit log.
//!
//! One RESP endpoint serves every cache, so a cache user (or an LDAP user) names the cache
//! in the user name: `AUTH <user>@<cache id> <password>`. Anything else whose password
//! looks like a JWT is a token login (`AUTH <token>`, `AUTH <user> <token>`).

use shoal_types::{AccountId, CacheId, LoginEvent};
use std::net::IpAddr;

/// What an `AUTH` asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// A data-plane JWT; `user` is whatever name came with it.
    Token { user: Option<String> },
    /// A cache user or LDAP user of one cache.
    User { name: String, cache: CacheId },
    /// Neither: refused without asking anyone.
    Invalid,
}

impl Attempt {
    pub fn parse(user: Option<&[u8]>, password: &[u8]) -> Attempt {
        let user = user.map(|u| String::from_utf8_lossy(u).into_owned());
        if let Some((name, cache)) = user.as_deref().and_then(|u| u.rsplit_once('@')) {
            if let (false, Ok(cache)) = (name.is_empty(), CacheId::parse(cache)) {
                return Attempt::User { name: name.to_string(), cache };
            }
        }
        if crate::auth::jwt::looks_like_jwt(password) {
            Attempt::Token { user }
        } else {
            Attempt::Invalid
        }
    }

    /// The user-name key failures are counted under (the throttle folds case and spaces, as
    /// a directory matches LDAP names). Token failures count per source only
    /// (the gateway keeps them in a table of their own, keyed by address), so a flood of bad
    /// tokens cannot lock anyone else out.
    pub fn throttle_key(&self, source: IpAddr) -> String {
        match self {
            Attempt::User { name, cache } => format!("{name}@{cache}"),
            Attempt::Token { .. } | Attempt::Invalid => format!("token-from:{source}"),
        }
    }
}

/// The audit facts of one attempt, filled in as it proceeds.
#[derive(Clone, Debug, Default)]
pub struct LoginNote {
    pub username: String,
    pub cache: Option<CacheId>,
    pub account: Option<AccountId>,
    /// `jwt`, `cache-user`, `ldap`, or `none`.
    pub mechanism: String,
    pub reason: String,
    pub jti: Option<String>,
}

impl LoginNote {
    pub fn for_attempt(attempt: &Attempt, user: Option<&[u8]>) -> LoginNote {
        let shown = |u: &[u8]| String::from_utf8_lossy(u).chars().take(200).collect::<String>();
        match attempt {
            Attempt::Token { .. } => LoginNote {
                username: user.map(shown).unwrap_or_else(|| "default".into()),
                mechanism: "jwt".into(),
                ..Default::default()
            },
            Attempt::User { name, cache } => LoginNote {
                username: name.chars().take(200).collect(),
                cache: Some(cache.clone()),
                mechanism: "cache-user".into(),
                ..Default::default()
            },
            Attempt::Invalid => LoginNote {
                username: user.map(shown).unwrap_or_else(|| "default".into()),
                mechanism: "none".into(),
                reason: "not a token and no <user>@<cache id>".into(),
                ..Default::default()
            },
        }
    }

    pub fn event(&self, gateway_id: &str, source: IpAddr, outcome: &str) -> LoginEvent {
        LoginEvent {
            at: now_rfc3339(),
            gateway_id: gateway_id.to_string(),
            source: source.to_string(),
            username: self.username.clone(),
            cache_id: self.cache.clone(),
            account_id: self.account.clone(),
            mechanism: self.mechanism.clone(),
            outcome: outcome.into(),
            reason: self.reason.clone(),
            jti: self.jti.clone(),
            aggregate: None,
        }
    }
}

/// The time as RFC 3339 UTC with milliseconds, without a date library.
fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (secs, millis) = (now.as_secs() as i64, now.subsec_millis());
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ";

    #[test]
    fn user_at_cache_names_a_cache_user_and_tokens_stay_tokens() {
        let cache = CacheId::parse("c0123456789ab").unwrap();
        assert_eq!(
            Attempt::parse(Some(b"alice@c0123456789ab"), b"a-password-of-16+"),
            Attempt::User { name: "alice".into(), cache: cache.clone() }
        );
        // An LDAP name may hold an `@` itself: the cache is after the last one.
        assert_eq!(
            Attempt::parse(Some(b"bob@example.org@c0123456789ab"), b"x"),
            Attempt::User { name: "bob@example.org".into(), cache }
        );
        assert_eq!(Attempt::parse(None, TOKEN), Attempt::Token { user: None });
        assert_eq!(Attempt::parse(Some(b"default"), TOKEN), Attempt::Token { user: Some("default".into()) });
        assert_eq!(Attempt::parse(Some(b"@c0123456789ab"), b"pw"), Attempt::Invalid);
        assert_eq!(Attempt::parse(Some(b"alice@shop"), b"a-password-of-16+"), Attempt::Invalid);
        assert_eq!(Attempt::parse(None, b"not-a-token"), Attempt::Invalid);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
