//! What a REST principal may do: [`Role`], with the account inside the variant so an owner
//! without an account or an admin with one cannot be built, and [`RoleName`], how the API's
//! JSON and the `api_keys` table spell it (`admin`, `owner`, `auditor`). LDAP logins get
//! theirs from `shoal_auth::Role`'s first three variants ([`Role::strongest_of`]).

use shoal_types::AccountId;

/// A REST principal's role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// One account's caches, users, tokens, keys, usage, invoices and audit.
    Owner(AccountId),
    /// Reads (caches, usage, invoices, audit) of one account, or of every account when
    /// None; changes nothing.
    Auditor(Option<AccountId>),
}

// A role's name in the API and in the store (no doc comment: it would change the OpenAPI document).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
#[schema(as = Role)]
pub enum RoleName {
    Admin,
    Owner,
    Auditor,
}

impl RoleName {
    pub fn parse(s: &str) -> Option<RoleName> {
        match s {
            "admin" => Some(RoleName::Admin),
            "owner" => Some(RoleName::Owner),
            "auditor" => Some(RoleName::Auditor),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RoleName::Admin => "admin",
            RoleName::Owner => "owner",
            RoleName::Auditor => "auditor",
        }
    }
}

impl Role {
    /// The role `name` on `account` (None = a platform key); None when that cannot be: an
    /// owner needs an account, an admin has none.
    pub fn new(name: RoleName, account: Option<AccountId>) -> Option<Role> {
        match (name, account) {
            (RoleName::Admin, None) => Some(Role::Admin),
            (RoleName::Admin, Some(_)) | (RoleName::Owner, None) => None,
            (RoleName::Owner, Some(a)) => Some(Role::Owner(a)),
            (RoleName::Auditor, a) => Some(Role::Auditor(a)),
        }
    }

    /// An `api_keys` row's `role` and `account_id`; None when they make no role.
    pub fn from_store(role: &str, account_id: Option<&str>) -> Option<Role> {
        let account = account_id.map(AccountId::parse).transpose().ok()?;
        Role::new(RoleName::parse(role)?, account)
    }

    pub fn name(&self) -> RoleName {
        match self {
            Role::Admin => RoleName::Admin,
            Role::Owner(_) => RoleName::Owner,
            Role::Auditor(_) => RoleName::Auditor,
        }
    }

    /// The account the role is on; None for admins and platform auditors.
    pub fn account(&self) -> Option<&AccountId> {
        match self {
            Role::Admin | Role::Auditor(None) => None,
            Role::Owner(a) | Role::Auditor(Some(a)) => Some(a),
        }
    }

    /// The strongest REST role among LDAP roles: platform admin, then account owner, then
    /// auditor (data-plane roles give none).
    pub fn strongest_of(roles: &[shoal_auth::Role]) -> Option<Role> {
        use shoal_auth::Role as Ldap;
        let rest = |r: &Ldap| match r {
            Ldap::PlatformAdmin => Some(Role::Admin),
            Ldap::AccountOwner { account } => Some(Role::Owner(account.clone())),
            Ldap::Auditor { account } => Some(Role::Auditor(account.clone())),
            Ldap::CacheReadWrite { .. } | Ldap::CacheReadOnly { .. } => None,
        };
        // RoleName's order is the strength: the first strongest wins.
        roles.iter().filter_map(rest).min_by_key(|r| r.name() as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_rows_make_a_role_only_when_name_and_account_fit() {
        let a = "a0000000000ab";
        let account = AccountId::parse(a).unwrap();
        assert_eq!(Role::from_store("admin", None), Some(Role::Admin));
        assert_eq!(Role::from_store("admin", Some(a)), None);
        assert_eq!(Role::from_store("owner", Some(a)), Some(Role::Owner(account.clone())));
        assert_eq!(Role::from_store("owner", None), None);
        assert_eq!(Role::from_store("owner", Some("not-an-id")), None);
        assert_eq!(Role::from_store("auditor", None), Some(Role::Auditor(None)));
        assert_eq!(Role::from_store("auditor", Some(a)), Some(Role::Auditor(Some(account))));
        assert_eq!(Role::from_store("root", None), None);
        for name in [RoleName::Admin, RoleName::Owner, RoleName::Auditor] {
            assert_eq!(RoleName::parse(name.as_str()), Some(name));
            assert_eq!(serde_json::to_value(name).unwrap(), name.as_str());
        }
    }

    #[test]
    fn the_strongest_rest_role_wins_and_data_roles_give_none() {
        use shoal_auth::Role as Ldap;
        let account = AccountId::parse("a0000000000ab").unwrap();
        let cache = shoal_types::CacheId::parse("c0000000000ab").unwrap();
        let owner = Ldap::AccountOwner { account: account.clone() };
        let auditor = Ldap::Auditor { account: None };
        assert_eq!(Role::strongest_of(&[auditor.clone(), Ldap::PlatformAdmin]), Some(Role::Admin));
        assert_eq!(Role::strongest_of(&[auditor.clone(), owner]), Some(Role::Owner(account)));
        assert_eq!(Role::strongest_of(&[auditor]), Some(Role::Auditor(None)));
        assert_eq!(
            Role::strongest_of(&[
                Ldap::CacheReadWrite { cache: cache.clone() },
                Ldap::CacheReadOnly { cache }
            ]),
            None
        );
        assert_eq!(Role::strongest_of(&[]), None);
    }
}
