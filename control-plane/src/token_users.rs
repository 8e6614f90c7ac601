//! Scoped tokens' upstream ACL users. A token that grants less than everything logs in
//! upstream as an ACL user made for its permission and key patterns (one per distinct set,
//! [`shoal_auth::token::upstream_user`]). A cache may have at most [`MAX_PER_CACHE`] of them
//! in use, and a periodic sweep deletes from the node those that no unexpired, unrevoked
//! token uses any more, so a node's ACL file stays bounded.
//!
//! Minting and sweeping both hold `users_lock`, and a mint keeps it until its token is
//! stored, so the sweep never deletes a user whose token is being minted. That lock is one
//! process's: on PostgreSQL, where another control plane may be minting (its user made, its
//! token not stored yet), a user is deleted only once the sweep has found it unused for
//! [`UNUSED_FOR`]. The sweep runs in one control plane at a time (its lease,
//! [`crate::lease::ACL_SWEEP`]); two at once during a takeover only delete the same users twice.

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{CachePlace, CacheRecord};
use shoal_types::CacheId;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most distinct scopes (permission and key patterns) of live tokens one cache may have.
pub const MAX_PER_CACHE: usize = 100;

/// On PostgreSQL (several control planes), how long a user must have been found unused
/// before the sweep deletes it: far longer than a mint takes from making its user to
/// storing its token.
pub const UNUSED_FOR: Duration = Duration::from_secs(5);

/// Longest between two listings of the nodes' ACL users when none had token users then and
/// this process made none and deleted no cache since: another control plane's mints are
/// found within this.
pub const IDLE_LISTING: Duration = Duration::from_secs(600);

/// The upstream ACL users of a cache's unexpired, unrevoked tokens.
pub async fn in_use(state: &AppState, cache: &CacheId) -> Result<HashSet<String>, ApiError> {
    let cache_user = cache.acl_user();
    let tokens = state.store.active_tokens(cache).await?;
    Ok(tokens
        .iter()
        .filter_map(|t| shoal_auth::token::upstream_user(&cache_user, t.permission, &t.key_patterns))
        .collect())
}

/// Refuses a new scoped user beyond [`MAX_PER_CACHE`] (one already in use is fine).
/// The caller holds `users_lock`.
pub async fn admit(state: &AppState, cache: &CacheRecord, user: &str) -> Result<(), ApiError> {
    let used = in_use(state, &cache.id).await?;
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
///
/// `ACL USERS` walks every user of the node (130–200 ms at 100,000 caches, during which the
/// node answers nobody), so the nodes are listed only when there may be something to sweep:
/// the last listing found token users, this process made some or deleted a cache since (a
/// failed mint's user outlives its cache otherwise), or [`IDLE_LISTING`] has passed.
pub async fn run(state: Arc<AppState>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Users found unused, and since when.
    let mut unused_since: HashMap<String, Instant> = HashMap::new();
    let mut places = crate::places::Places::default();
    // The last listing: when, whether it found token users, this process's changes then.
    let mut listed: Option<(Instant, bool, u64)> = None;
    loop {
        tick.tick().await;
        let changes = state.token_user_changes.load(std::sync::atomic::Ordering::Relaxed);
        if !listing_due(listed, changes) {
            continue;
        }
        // (pool, placement target) → its token ACL users by their cache's own user (`t<id>`);
        // a cluster pool's target lists the users the pool sets on every node of the cluster.
        // Grouped once, so each cache finds its own in O(1) (not by scanning every user).
        let mut users: HashMap<(String, String), HashMap<String, Vec<String>>> = HashMap::new();
        // A node that could not be listed may hold some: look again at the next tick.
        let mut unlisted = false;
        for (pool_name, pool) in state.pools.iter() {
            for target in pool.loads().into_iter().map(|l| l.node) {
                match pool.acl_users_with_prefix(&target, "").await {
                    Ok(on_node) => {
                        let mut by_cache: HashMap<String, Vec<String>> = HashMap::new();
                        for user in on_node {
                            if let Some((cache_user, _)) = user.split_once(".jwt.") {
                                by_cache.entry(cache_user.to_string()).or_default().push(user);
                            }
                        }
                        users.insert((pool_name.to_string(), target), by_cache);
                    }
                    Err(e) => {
                        unlisted = true;
                        tracing::warn!(pool = pool_name, node = target, error = %e, "cannot list token ACL users")
                    }
                }
            }
        }
        let found = users.values().any(|by_cache| !by_cache.is_empty());
        listed = Some((Instant::now(), found || unlisted, changes));
        // No token user on any node (nothing to sweep): every cache need not be read.
        if !found {
            unused_since.clear();
            continue;
        }
        // Where each cache is (what changed since the last sweep).
        if let Err(e) = places.refresh(&state.store, state.pools.iter().map(|(name, _)| name)).await {
            tracing::warn!(error = %e, "cannot sweep token ACL users");
            continue;
        }
        let mut seen = HashSet::new();
        for cache in places.by_node().iter().flat_map(|n| n.caches.by_id.values()) {
            let on_node: Vec<String> = users
                .get_mut(&(cache.pool.clone(), cache.node.clone()))
                .and_then(|u| u.remove(&cache.id.acl_user()))
                .unwrap_or_default();
            if on_node.is_empty() {
                continue;
            }
            seen.extend(on_node.iter().cloned());
            if let Err(e) = sweep(&state, cache, on_node, &mut unused_since).await {
                tracing::warn!(cache = %cache.id, error = %e, "token ACL user sweep failed");
            }
        }
        // What is left belongs to no live cache: a cache deleted while a mint that made its
        // user failed before storing the token (a delete finds token users through the store).
        for ((pool, target), by_cache) in users {
            for (cache_user, orphans) in by_cache {
                seen.extend(orphans.iter().cloned());
                if let Err(e) =
                    sweep_orphans(&state, &pool, &target, &cache_user, orphans, &mut unused_since).await
                {
                    tracing::warn!(pool, node = target, error = %e, "orphaned token ACL user sweep failed");
                }
            }
        }
        unused_since.retain(|user, _| seen.contains(user));
    }
}

/// Whether the nodes' users should be listed now, after the last listing `listed` (when,
/// whether it found token users, [`AppState::token_user_changes`] then), with `changes` now.
fn listing_due(listed: Option<(Instant, bool, u64)>, changes: u64) -> bool {
    match listed {
        None => true,
        Some((at, found, changes_then)) => found || changes != changes_then || at.elapsed() >= IDLE_LISTING,
    }
}

/// Deletes token ACL users of `cache_user`'s cache once it is confirmed deleted (or unknown)
/// under `users_lock` and they were found so for the backend's grace ([`delete_unused`]).
async fn sweep_orphans(
    state: &AppState,
    pool: &str,
    target: &str,
    cache_user: &str,
    orphans: Vec<String>,
    unused_since: &mut HashMap<String, Instant>,
) -> Result<(), ApiError> {
    let _changing = state.users_lock.lock().await;
    let id = cache_user.strip_prefix('t').and_then(|id| shoal_types::CacheId::parse(id).ok());
    if let Some(id) = id {
        if state.store.cache(&id).await?.is_some() {
            return Ok(());
        }
    }
    let deleted = delete_unused(state, pool, target, orphans, &HashSet::new(), unused_since).await?;
    if deleted > 0 {
        tracing::info!(cache_user, deleted, "token ACL users of a deleted cache deleted");
    }
    Ok(())
}

/// Deletes those of the cache's token ACL users `on_node` that no live token uses (on
/// PostgreSQL: found unused for [`UNUSED_FOR`], per `unused_since`); returns how many.
async fn sweep(
    state: &AppState,
    cache: &CachePlace,
    on_node: Vec<String>,
    unused_since: &mut HashMap<String, Instant>,
) -> Result<usize, ApiError> {
    let _changing = state.users_lock.lock().await;
    let used = in_use(state, &cache.id).await?;
    let deleted = delete_unused(state, &cache.pool, &cache.node, on_node, &used, unused_since).await?;
    if deleted > 0 {
        tracing::info!(cache = %cache.id, deleted, "unused token ACL users deleted");
    }
    Ok(deleted)
}

/// Deletes from placement target `target` of `pool` those of `users` not in `used` that
/// were found unused for the backend's grace (none on SQLite, where minting and sweeping
/// share `users_lock`; [`UNUSED_FOR`] on PostgreSQL), per `unused_since`; returns how many.
/// The caller holds `users_lock`.
async fn delete_unused(
    state: &AppState,
    pool: &str,
    target: &str,
    users: Vec<String>,
    used: &HashSet<String>,
    unused_since: &mut HashMap<String, Instant>,
) -> Result<usize, ApiError> {
    let grace = match state.store.backend {
        crate::store::Backend::Postgres => UNUSED_FOR,
        crate::store::Backend::Sqlite => Duration::ZERO,
    };
    let now = Instant::now();
    let mut stale = Vec::new();
    for user in users {
        if used.contains(&user) {
            unused_since.remove(&user);
        } else if now.duration_since(*unused_since.entry(user.clone()).or_insert(now)) >= grace {
            stale.push(user);
        }
    }
    state.pools.of(pool)?.delete_cache_users(target, &stale).await?;
    for user in &stale {
        unused_since.remove(user);
    }
    Ok(stale.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_are_listed_when_there_may_be_token_users_to_sweep() {
        let now = Instant::now();
        assert!(listing_due(None, 0), "the first tick");
        assert!(!listing_due(Some((now, false, 3)), 3), "none found, none made since");
        assert!(listing_due(Some((now, true, 3)), 3), "some found: they may expire");
        assert!(listing_due(Some((now, false, 3)), 4), "one made, or a cache deleted, since");
        if let Some(long_ago) = now.checked_sub(IDLE_LISTING) {
            assert!(listing_due(Some((long_ago, false, 3)), 3), "another control plane's mints");
        }
    }
}
