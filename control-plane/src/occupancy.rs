//! What each engine pool's nodes hold — databases taken, MB of storage limits — for
//! placement, kept in memory so a create does not read every cache from the store.
//!
//! The store stays the source of truth: every create, delete and storage-limit change bumps
//! the pool's placement version in its own transaction ([`crate::store::bump_placement`]). A
//! placement reads that version (one row) and reloads the pool from `caches` only when it is
//! not the one this process last saw, so other control planes' changes are seen too. Used
//! under `AppState::placement_lock`.

use crate::state::AppState;
use crate::store::{CacheRecord, StoreError};
use shoal_engine::placement::Taken;
use shoal_engine::NodeLoad;
use std::collections::HashMap;

#[derive(Default)]
pub struct Occupancy {
    pools: std::sync::Mutex<HashMap<String, PoolOccupancy>>,
}

#[derive(Clone, Default)]
struct PoolOccupancy {
    /// The placement version this view is of (`None`: stale, reload).
    version: Option<i64>,
    nodes: HashMap<String, NodeOccupancy>,
}

#[derive(Clone, Default)]
struct NodeOccupancy {
    taken: Taken,
    reserved_mb: u64,
}

impl Occupancy {
    /// Fills in `loads` (databases taken, MB reserved) for pool `pool`.
    pub async fn fill(&self, state: &AppState, pool: &str, loads: &mut [NodeLoad]) -> Result<(), StoreError> {
        let version = state.store.placement_version(pool).await?;
        let current = self.pools.lock().unwrap().get(pool).filter(|p| p.version == Some(version)).cloned();
        let occupancy = match current {
            Some(p) => p,
            None => {
                // Read after the version: a change in between makes the next fill reload.
                let mut p = PoolOccupancy { version: Some(version), nodes: HashMap::new() };
                for (node, db, databases, mb) in state.store.placements(pool).await? {
                    let n = p.nodes.entry(node).or_default();
                    (db..db + databases.max(1)).for_each(|d| {
                        n.taken.insert(d);
                    });
                    n.reserved_mb += mb.unwrap_or(state.config.default_data_storage_mb);
                }
                self.pools.lock().unwrap().insert(pool.to_string(), p.clone());
                p
            }
        };
        for load in loads {
            if let Some(n) = occupancy.nodes.get(&load.node) {
                load.taken = n.taken.clone();
                load.reserved_mb = n.reserved_mb;
            }
        }
        Ok(())
    }

    /// Records this process's change of `cache` (with `mb` of storage limit), committed with
    /// placement version `version`: its databases taken (`took`) or freed. A version that is
    /// not the next one means another control plane changed the pool meanwhile: the view is
    /// reloaded at the next fill.
    pub fn changed(&self, cache: &CacheRecord, mb: u64, took: bool, version: i64) {
        let mut pools = self.pools.lock().unwrap();
        let Some(p) = pools.get_mut(&cache.pool) else { return };
        if p.version != Some(version - 1) {
            p.version = None;
            return;
        }
        p.version = Some(version);
        let n = p.nodes.entry(cache.node.clone()).or_default();
        for d in cache.db..cache.db + cache.databases.max(1) {
            match took {
                true => n.taken.insert(d),
                false => n.taken.remove(d),
            };
        }
        n.reserved_mb = match took {
            true => n.reserved_mb + mb,
            false => n.reserved_mb.saturating_sub(mb),
        };
    }

    /// Drops pool `pool`'s view (a change this module does not follow step by step).
    pub fn forget(&self, pool: &str) {
        self.pools.lock().unwrap().remove(pool);
    }
}
