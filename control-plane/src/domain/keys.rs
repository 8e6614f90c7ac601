//! API keys and LDAP sessions: who may revoke which.

use crate::auth::Principal;
use crate::error::ApiError;
use crate::store::accounts::LiveKey;
use shoal_types::AccountId;

/// Who may revoke `key` (an API key or an LDAP session): keys of an account, that account's
/// admins and owners (404 for anyone who cannot see the account, 403 for its auditors);
/// platform-wide keys, the platform admin only (404 for account principals, who cannot see
/// them; 403 for platform auditors).
pub fn may_revoke(who: &Principal, key: &LiveKey, what: &'static str) -> Result<(), ApiError> {
    match key.account_id.as_deref() {
        Some(account) => who.write(&AccountId::parse(account).map_err(|_| ApiError::NotFound(what))?, what),
        None if who.scope().is_some() => Err(ApiError::NotFound(what)),
        None => who.admin(),
    }
}
