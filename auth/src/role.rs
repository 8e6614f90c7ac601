//! Roles a login can carry (see the README's "Logging in to the REST API"), and the
//! configuration that maps directory groups to them. A REST principal's role
//! (`shoal_control_plane::role::Role`) is made from the first three.

use serde::{Deserialize, Serialize};
use shoal_types::{AccountId, CacheId};

/// What a person may do. Serialized as `{"role": "account-owner", "account": "a…"}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Role {
    /// Everything.
    PlatformAdmin,
    /// One account's caches, users, tokens, usage, invoices and audit.
    AccountOwner { account: AccountId },
    /// Read-only: usage, invoices, audit; of one account, or of every account if none.
    Auditor {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        account: Option<AccountId>,
    },
    /// Data-plane read-write access to one cache.
    CacheReadWrite { cache: CacheId },
    /// Data-plane read-only access to one cache.
    CacheReadOnly { cache: CacheId },
}

/// One line of the group→role configuration: members of `group` (a DN) get `role`.
///
/// In TOML: `{ group = "cn=admins,ou=groups,dc=example,dc=org", role = "platform-admin" }`
/// or `{ group = "cn=shop,ou=groups,dc=example,dc=org", role = "cache-read-write", cache = "c…" }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleMapping {
    pub group: String,
    #[serde(flatten)]
    pub role: Role,
}

/// DNs compare without regard to ASCII case or spaces around `,` and `=`, which is how
/// directories spell the same group differently (`cn=Admins, ou=Groups`).
pub fn same_dn(a: &str, b: &str) -> bool {
    normalize_dn(a) == normalize_dn(b)
}

fn normalize_dn(dn: &str) -> String {
    let mut out = String::with_capacity(dn.len());
    let mut chars = dn.trim().chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            // Keep escapes as they are, including an escaped space.
            out.push(c);
            if let Some(n) = chars.next() {
                out.push(n.to_ascii_lowercase());
            }
            continue;
        }
        if c == ',' || c == '=' {
            while out.ends_with(' ') && !out.ends_with("\\ ") {
                out.pop();
            }
            out.push(c);
            while chars.peek() == Some(&' ') {
                chars.next();
            }
            continue;
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The roles the given groups map to, sorted and without duplicates.
pub fn roles_for_groups(mappings: &[RoleMapping], groups: &[String]) -> Vec<Role> {
    let mut roles: Vec<Role> = mappings
        .iter()
        .filter(|m| groups.iter().any(|g| same_dn(g, &m.group)))
        .map(|m| m.role.clone())
        .collect();
    roles.sort();
    roles.dedup();
    roles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_compare_loosely_but_not_across_values() {
        assert!(same_dn("cn=Admins, ou=Groups,dc=example,dc=org", "CN=admins,OU=groups,DC=Example,DC=org"));
        assert!(!same_dn("cn=admins,ou=groups", "cn=admin,ou=groups"));
        assert!(!same_dn("cn=a\\,b,ou=g", "cn=a,b,ou=g"));
    }

    #[test]
    fn roles_come_from_matching_groups_only() {
        let cache = CacheId::parse("c000000000001").unwrap();
        let mappings = vec![
            RoleMapping { group: "cn=admins,ou=groups".into(), role: Role::PlatformAdmin },
            RoleMapping {
                group: "cn=rw,ou=groups".into(),
                role: Role::CacheReadWrite { cache: cache.clone() },
            },
            RoleMapping { group: "cn=Admins, ou=groups".into(), role: Role::PlatformAdmin },
        ];
        let roles = roles_for_groups(&mappings, &["CN=admins,ou=groups".into(), "cn=rw,ou=groups".into()]);
        assert_eq!(roles, vec![Role::PlatformAdmin, Role::CacheReadWrite { cache }]);
        assert!(roles_for_groups(&mappings, &["cn=other".into()]).is_empty());
    }

    #[test]
    fn mappings_read_from_json_with_typed_ids() {
        let m: RoleMapping = serde_json::from_str(
            r#"{"group": "cn=o,ou=g", "role": "account-owner", "account": "a0000000000ab"}"#,
        )
        .unwrap();
        assert_eq!(m.role, Role::AccountOwner { account: AccountId::parse("a0000000000ab").unwrap() });
        let bad =
            serde_json::from_str::<RoleMapping>(r#"{"group": "g", "role": "cache-read-only", "cache": "x"}"#);
        assert!(bad.is_err());
        let unknown = serde_json::from_str::<RoleMapping>(r#"{"group": "g", "role": "root"}"#);
        assert!(unknown.is_err());
        let auditor: RoleMapping = serde_json::from_str(r#"{"group": "g", "role": "auditor"}"#).unwrap();
        assert_eq!(auditor.role, Role::Auditor { account: None });
        let scoped: RoleMapping =
            serde_json::from_str(r#"{"group": "g", "role": "auditor", "account": "a0000000000ab"}"#).unwrap();
        assert_eq!(scoped.role, Role::Auditor { account: Some(AccountId::parse("a0000000000ab").unwrap()) });
    }
}
