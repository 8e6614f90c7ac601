//! Caches as the routes see them: found by id, visible or changeable by a principal, and
//! their node's keyspace-notification settings.

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::CacheRecord;
use shoal_types::CacheId;

/// The account that owns what the platform admin creates (an admin's key has no account).
pub const PLATFORM_ACCOUNT: &str = "a000000000000";

/// Parses a cache id from the path; malformed ids are simply not found.
pub fn parse_id(raw: &str) -> Result<CacheId, ApiError> {
    CacheId::parse(raw).map_err(|_| ApiError::NotFound("cache"))
}

/// A live cache the caller may see (404 otherwise, whether or not it exists).
pub async fn visible_cache(state: &AppState, who: &Principal, raw_id: &str) -> Result<CacheRecord, ApiError> {
    let cache = state.store.cache(&parse_id(raw_id)?).await?.ok_or(ApiError::NotFound("cache"))?;
    who.read(&cache.account_id, "cache")?;
    Ok(cache)
}

/// A live cache the caller may change.
pub async fn changeable_cache(
    state: &AppState,
    who: &Principal,
    raw_id: &str,
) -> Result<CacheRecord, ApiError> {
    let cache = visible_cache(state, who, raw_id).await?;
    who.writer()?;
    Ok(cache)
}

/// Sets a node's `notify-keyspace-events` to the union of its live caches' flags (a
/// cluster pool's target: on every node of the cluster).
pub async fn apply_keyspace_events(state: &AppState, pool: &str, node: &str) -> Result<(), ApiError> {
    let flags = state.store.keyspace_events_on(pool, node).await?;
    let union = shoal_engine::tenant::union_keyspace_events(flags.iter().map(String::as_str));
    state.pools.of(pool)?.set_keyspace_events(node, &union).await?;
    Ok(())
}
