//! What a data-plane token may do, as an upstream Valkey ACL user.
//!
//! A token that grants everything (read-write, all keys) logs in upstream as the cache's own
//! ACL user. Any other token maps to an upstream user whose name and password follow from
//! the token's permission and key patterns and the cache's own secret: the control plane
//! creates that user when it mints the token, and the gateway logs in as it without asking
//! anyone. Both call the functions here, so they always agree. Valkey enforces the user's
//! rules itself, also inside Lua scripts and transactions.

use sha2::{Digest, Sha256};
use shoal_types::Permission;

/// Most key patterns a token may carry, and the longest pattern (bytes). With them the
/// largest access string stays within [`crate::access::MAX_LEN`], and the largest token
/// (each `"` or `\` of a pattern doubles in JSON, base64 adds a third) well within the
/// 16 KB an unauthenticated `AUTH` argument may have.
pub const MAX_KEY_PATTERNS: usize = 32;
pub const MAX_KEY_PATTERN_LEN: usize = 100;

/// What read-write and read-only logins (tokens and LDAP roles) may do, before the cache's
/// own rules are applied.
pub const READ_WRITE: &str = "on ~* &* +@all";
pub const READ_ONLY: &str =
    "on ~* &* -@all +@read +@connection +@transaction +@pubsub -@write -publish -spublish";

/// Why a list of key patterns is refused (the message names the pattern).
pub fn check_key_patterns(patterns: &[String]) -> Result<(), String> {
    if patterns.is_empty() {
        return Err("key_patterns must hold at least one pattern (leave it out for all keys)".into());
    }
    if patterns.len() > MAX_KEY_PATTERNS {
        return Err(format!("at most {MAX_KEY_PATTERNS} key patterns"));
    }
    for (i, p) in patterns.iter().enumerate() {
        let shown: String = p.chars().take(64).collect();
        if p.is_empty() {
            return Err(format!("key pattern {} is empty", i + 1));
        }
        if p.len() > MAX_KEY_PATTERN_LEN {
            return Err(format!(
                "key pattern {} {shown:?}… is longer than {MAX_KEY_PATTERN_LEN} bytes",
                i + 1
            ));
        }
        if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("key pattern {} {shown:?} holds whitespace or control characters", i + 1));
        }
    }
    Ok(())
}

/// The key patterns in a canonical order (sorted, no duplicates): the same set always
/// names the same upstream user.
pub fn canonical_patterns(patterns: &[String]) -> Vec<String> {
    let mut out = patterns.to_vec();
    out.sort();
    out.dedup();
    out
}

/// The access string of a token (ElastiCache RBAC syntax): its permission's rules with
/// `~*` narrowed to the key patterns. No patterns: all keys.
pub fn access_string(perm: Permission, patterns: &[String]) -> String {
    let base = match perm {
        Permission::ReadWrite => READ_WRITE,
        Permission::ReadOnly => READ_ONLY,
    };
    if patterns.is_empty() {
        return base.to_string();
    }
    let keys: Vec<String> = canonical_patterns(patterns).iter().map(|p| format!("~{p}")).collect();
    base.replacen("~*", &keys.join(" "), 1)
}

/// The upstream ACL user of a token on a cache whose own ACL user is `cache_user`, or None
/// when the token grants everything (it then uses the cache's own user).
pub fn upstream_user(cache_user: &str, perm: Permission, patterns: &[String]) -> Option<String> {
    if perm == Permission::ReadWrite && patterns.is_empty() {
        return None;
    }
    // Each pattern length-prefixed: no two pattern lists give the same text.
    let mut scope = perm.as_str().to_string();
    for p in canonical_patterns(patterns) {
        scope.push_str(&format!("\n{}:{p}", p.len()));
    }
    let digest = hex::encode(Sha256::digest(scope.as_bytes()));
    Some(format!("{cache_user}.jwt.{}", &digest[..16]))
}

/// The password of a cache's derived upstream user (a token's or an LDAP role's): follows
/// from the cache's own ACL password, so nothing more is stored.
pub fn derived_password(cache_password: &str, upstream_user: &str) -> String {
    hex::encode(Sha256::digest(format!("{cache_password}|{upstream_user}").as_bytes()))
}

/// How a token logs in upstream when it grants less than everything.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenLogin {
    pub user: String,
    pub password: String,
    pub access_string: String,
}

impl std::fmt::Debug for TokenLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenLogin")
            .field("user", &self.user)
            .field("access_string", &self.access_string)
            .finish_non_exhaustive()
    }
}

/// A token's upstream login on a cache (its own ACL user and password), or None for the
/// cache's own user.
pub fn token_login(
    cache_user: &str,
    cache_password: &str,
    perm: Permission,
    patterns: &[String],
) -> Option<TokenLogin> {
    let user = upstream_user(cache_user, perm, patterns)?;
    Some(TokenLogin {
        password: derived_password(cache_password, &user),
        access_string: access_string(perm, patterns),
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AccessString;

    fn pats(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn full_tokens_use_the_cache_user_and_others_a_stable_derived_one() {
        assert_eq!(token_login("tc1", "pw", Permission::ReadWrite, &[]), None);
        let ro = token_login("tc1", "pw", Permission::ReadOnly, &[]).unwrap();
        assert!(ro.user.starts_with("tc1.jwt.") && ro.user.len() == "tc1.jwt.".len() + 16, "{}", ro.user);
        assert_eq!(ro.access_string, READ_ONLY);
        assert_eq!(ro.password, derived_password("pw", &ro.user));
        assert_ne!(ro.password, derived_password("other", &ro.user), "the cache's secret matters");

        // Order and duplicates of patterns do not matter; the permission and patterns do.
        let a = upstream_user("tc1", Permission::ReadWrite, &pats(&["b:*", "a:*", "b:*"]));
        assert_eq!(a, upstream_user("tc1", Permission::ReadWrite, &pats(&["a:*", "b:*"])));
        assert_ne!(a, upstream_user("tc1", Permission::ReadOnly, &pats(&["a:*", "b:*"])));
        assert_ne!(a, upstream_user("tc1", Permission::ReadWrite, &pats(&["a:*"])));
        // No pattern list reads as another.
        assert_ne!(
            upstream_user("tc1", Permission::ReadWrite, &pats(&["a", "b"])),
            upstream_user("tc1", Permission::ReadWrite, &pats(&["a\nb"]))
        );
    }

    #[test]
    fn access_strings_narrow_keys_and_parse() {
        let rw = access_string(Permission::ReadWrite, &pats(&["app:*", "cfg"]));
        assert_eq!(rw, "on ~app:* ~cfg &* +@all");
        let ro = access_string(Permission::ReadOnly, &pats(&["app:*"]));
        assert!(ro.starts_with("on ~app:* &* -@all +@read"), "{ro}");
        // The largest pattern list allowed still makes a valid access string.
        let widest: Vec<String> =
            (0..MAX_KEY_PATTERNS).map(|i| format!("{i:02}{}", "x".repeat(MAX_KEY_PATTERN_LEN - 2))).collect();
        check_key_patterns(&widest).unwrap();
        let widest_ro = access_string(Permission::ReadOnly, &widest);
        for text in [rw, ro, READ_WRITE.into(), READ_ONLY.into(), widest_ro] {
            AccessString::parse(&text).unwrap();
        }
    }

    #[test]
    fn bad_pattern_lists_are_refused_with_the_reason() {
        assert!(check_key_patterns(&[]).unwrap_err().contains("at least one"));
        assert!(check_key_patterns(&pats(&["ok", ""])).unwrap_err().contains("pattern 2 is empty"));
        assert!(check_key_patterns(&pats(&["a b"])).unwrap_err().contains("whitespace"));
        assert!(check_key_patterns(&pats(&["a\u{7}"])).unwrap_err().contains("control"));
        assert!(check_key_patterns(&["x".repeat(MAX_KEY_PATTERN_LEN + 1)]).unwrap_err().contains("longer"));
        let many: Vec<String> = (0..=MAX_KEY_PATTERNS).map(|i| format!("k{i}:*")).collect();
        assert!(check_key_patterns(&many).unwrap_err().contains("at most"));
        assert!(check_key_patterns(&many[..MAX_KEY_PATTERNS]).is_ok());
        assert!(check_key_patterns(&pats(&["app:*", "user:[0-9]*", "ключ:*"])).is_ok());
    }
}
