//! The upstream ACL users of logins to a cache (cache users, LDAP roles, limited tokens):
//! their names, their rules (the access string within the cache's own fences) and making
//! them on the cache's node.

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::CacheRecord;
use shoal_auth::AccessString;

/// 1–64 letters, digits, `-` and `_`.
pub fn is_valid_username(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The name of a cache user's upstream ACL user.
pub fn upstream_user(cache: &CacheRecord, username: &str) -> String {
    format!("{}.user.{username}", cache.id.acl_user())
}

/// Every name an upstream ACL user of the cache's logins may have, from the store (shared by
/// every control plane): its cache users' (`.user.`), both LDAP roles' (`.ldap.rw`,
/// `.ldap.ro`: fixed names) and the scopes of every token ever minted for it (`.jwt.`,
/// revoked and expired tokens included, since their users may not have been swept yet).
/// A cache's delete looks these up one by one (`ACL GETUSER`) instead of listing every user
/// of the node.
pub async fn possible_upstream_users(state: &AppState, cache: &CacheRecord) -> Result<Vec<String>, ApiError> {
    let own = cache.id.acl_user();
    let mut names: Vec<String> =
        state.store.cache_users(&cache.id).await?.iter().map(|u| upstream_user(cache, &u.username)).collect();
    names.extend(["rw", "ro"].map(|role| format!("{own}.ldap.{role}")));
    for (perm, patterns) in state.store.token_scopes(&cache.id).await? {
        names.extend(shoal_auth::token::upstream_user(&own, perm, &patterns));
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// The cache's own ACL rules (what a cache user's rules are intersected with).
pub fn tenant_rules(cache: &CacheRecord) -> Vec<String> {
    cache.tenant_acl().setuser_rules()
}

/// `ACL SETUSER` rules for an access string on this cache, with the upstream password.
pub fn upstream_rules(
    cache: &CacheRecord,
    access: &AccessString,
    secret: &str,
) -> Result<Vec<String>, ApiError> {
    let mut rules = shoal_auth::intersect_with_tenant(access, &tenant_rules(cache)).map_err(|e| match e {
        shoal_auth::AccessError::Tenant(t) => ApiError::Internal(t),
        other => ApiError::field("access_string", other.to_string()),
    })?;
    rules.push(format!(">{secret}"));
    Ok(rules)
}

/// Makes (or remakes, which changes nothing) an upstream ACL user of `cache` for a login
/// that stores no user of its own (an LDAP role, a limited token): under the users lock and
/// only while the cache is live, since deleting a cache removes its users' ACL users under
/// the same lock.
pub async fn ensure_login_user(
    state: &AppState,
    cache: &CacheRecord,
    name: &str,
    access: &AccessString,
    password: &str,
) -> Result<(), ApiError> {
    let _changing = state.users_lock.lock().await;
    set_login_user(state, cache, name, access, password).await
}

/// [`ensure_login_user`] for a caller that holds `users_lock` (a token's mint holds it until
/// the token is stored, so the sweep of unused token users cannot take its user meanwhile).
pub async fn set_login_user(
    state: &AppState,
    cache: &CacheRecord,
    name: &str,
    access: &AccessString,
    password: &str,
) -> Result<(), ApiError> {
    let rules = upstream_rules(cache, access, password)?;
    if state.store.cache(&cache.id).await?.is_none() {
        return Err(ApiError::NotFound("cache"));
    }
    state.pools.of(&cache.pool)?.set_cache_user(&cache.node, name, &rules).await?;
    Ok(())
}

/// Remakes on a standalone node the upstream ACL users of its live caches' cache users and
/// scoped tokens from the store. Their changes are saved to the node's ACL file in the
/// background (`shoal_engine::acl_save`), so a node that went down with this control plane
/// (both killed at once) may have lost the newest. A user as it was changes nothing. Returns
/// how many users it made or changed.
pub async fn restore_login_users(state: &AppState, pool_name: &str, node: &str) -> Result<usize, ApiError> {
    let pool = state.pools.of(pool_name)?;
    let users = state.store.cache_users_on(pool_name, node).await?;
    let scopes = state.store.active_token_scopes_on(pool_name, node).await?;
    let ids: std::collections::BTreeSet<&shoal_types::CacheId> =
        users.iter().map(|u| &u.cache_id).chain(scopes.iter().map(|(id, _, _)| id)).collect();
    let mut caches = std::collections::HashMap::new();
    for id in ids {
        if let Some(cache) = state.store.cache(id).await? {
            caches.insert(id.clone(), cache);
        }
    }
    let mut logins = Vec::new();
    for user in &users {
        if let Some(cache) = caches.get(&user.cache_id) {
            let access =
                AccessString::parse(&user.access_string).map_err(|e| ApiError::Internal(e.to_string()))?;
            logins.push((
                upstream_user(cache, &user.username),
                upstream_rules(cache, &access, &user.upstream_secret)?,
            ));
        }
    }
    for (id, perm, patterns) in &scopes {
        let Some(cache) = caches.get(id) else { continue };
        if let Some(login) =
            shoal_auth::token::token_login(&id.acl_user(), &cache.acl_password, *perm, patterns)
        {
            let access =
                AccessString::parse(&login.access_string).map_err(|e| ApiError::Internal(e.to_string()))?;
            logins.push((login.user, upstream_rules(cache, &access, &login.password)?));
        }
    }
    Ok(pool.set_cache_users(node, &logins).await?)
}
