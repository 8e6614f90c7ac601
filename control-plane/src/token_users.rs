//! Scoped tokens' upstream ACL users. A token that grants less than everything logs in
//! upstream as an ACL user made for its permission and key patterns (one per distinct set,
//! [`shoal_auth::token::upstream_user`]). A cache may have at most [`MAX_PER_CACHE`] of them
//! in use, and a periodic sweep deletes from the node those that no unexpired, unrevoked
//! token uses any more, so a node's ACL file stays bounded.
//!
//! Minting and sweeping both hold `users_lock`, and a mint keeps it until its token is
//! stored, so the sweep never deletes a user whose token is being minted.

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::CacheRecord;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Most distinct scopes (permission and key patterns) of live tokens one cache may have.
pub const MAX_PER_CACHE: usize = 100;

/// The upstream ACL users of a cache's unexpired, unrevoked tokens.
pub async fn in_use(state: &AppState, cache: &CacheRecord) -> Result<HashSet<String>, ApiError> {
    let cache_user = cache.id.acl_user();
    let tokens = state.store.active_tokens(&cache.id).await?;
    Ok(tokens
        .iter()
        .filter_map(|t| shoal_auth::token::upstream_user(&cache_user, t.permission, &t.key_patterns))
        .collect())
}

/// Refuses a new scoped user beyond [`MAX_PER_CACHE`] (one already in use is fine).
/// The caller holds `users_lock`.
pub async fn admit(state: &AppState, cache: &CacheRecord, user: &str) -> Result<(), ApiError> {
    let used = in_use(state, cache).await?;
    if used.contains(user) || used.len() < MAX_PER_CACHE {
        return Ok(());
    }
    Err(ApiError::Conflict(format!(
        "cache {} already has {MAX_PER_CACHE} distinct token scopes (permission and key_patterns) \
         in use, the most a cache may have; reuse one of them, or revoke tokens or let them expire",
        cache.id
    )))
}

/// Sweeps every cache every `interval`, for as long as the control plane runs: one
/// `ACL USERS` per node, then only the caches that have token users on it.
pub async fn run(state: Arc<AppState>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let caches = match state.store.caches(None).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sweep token ACL users");
                continue;
            }
        };
        // (pool, placement target) → its ACL users; a cluster pool's target lists the users
        // the pool sets on every node of the cluster.
        let mut users: HashMap<(String, String), Vec<String>> = HashMap::new();
        for (pool_name, pool) in state.pools.iter() {
            for target in pool.loads().into_iter().map(|l| l.node) {
                match pool.acl_users_with_prefix(&target, "").await {
                    Ok(on_node) => {
                        users.insert((pool_name.to_string(), target), on_node);
                    }
                    Err(e) => {
                        tracing::warn!(pool = pool_name, node = target, error = %e, "cannot list token ACL users")
                    }
                }
            }
        }
        for cache in caches {
            let prefix = format!("{}.jwt.", cache.id.acl_user());
            let on_node: Vec<String> = users
                .get(&(cache.pool.clone(), cache.node.clone()))
                .map(|u| u.iter().filter(|u| u.starts_with(&prefix)).cloned().collect())
                .unwrap_or_default();
            if on_node.is_empty() {
                continue;
            }
            if let Err(e) = sweep(&state, &cache, on_node).await {
                tracing::warn!(cache = %cache.id, error = %e, "token ACL user sweep failed");
            }
        }
    }
}

/// Deletes those of the cache's token ACL users `on_node` that no live token uses; returns
/// how many.
async fn sweep(state: &AppState, cache: &CacheRecord, on_node: Vec<String>) -> Result<usize, ApiError> {
    let _changing = state.users_lock.lock().await;
    let used = in_use(state, cache).await?;
    let stale: Vec<String> = on_node.into_iter().filter(|u| !used.contains(u)).collect();
    state.pools.of(&cache.pool)?.delete_cache_users(&cache.node, &stale).await?;
    if !stale.is_empty() {
        tracing::info!(cache = %cache.id, deleted = stale.len(), "unused token ACL users deleted");
    }
    Ok(stale.len())
}
