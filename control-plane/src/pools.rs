//! The engine pools the control plane places caches in, by name: standalone nodes or a
//! Valkey cluster each ([`shoal_engine::Pool`]), one of them the default for creates that
//! name none. A cache row keeps its pool's name (`caches.pool`); every engine operation on
//! a cache goes to that pool ([`Pools::of`]).
//!
//! Also here: one scale operation (adding or removing a shard) at a time per pool, refused
//! rather than queued ([`Pools::scaling`]).

use shoal_engine::{EngineError, Pool};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

/// The name of the pool an `[engine]` section without pools describes, and of the pool every
/// cache stored before pools existed is in.
pub const MAIN_POOL: &str = "main";

/// The engine pools, by name.
pub struct Pools {
    pools: BTreeMap<String, Arc<Pool>>,
    default: String,
    scaling: Mutex<HashSet<String>>,
}

impl Pools {
    /// `pools` by name; `default` must be one of them.
    pub fn new(pools: impl IntoIterator<Item = (String, Arc<Pool>)>, default: &str) -> Result<Pools, String> {
        let pools: BTreeMap<String, Arc<Pool>> = pools.into_iter().collect();
        if !pools.contains_key(default) {
            return Err(format!(
                "the default pool {default:?} is not one of the pools ({})",
                pools.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(Pools { pools, default: default.to_string(), scaling: Mutex::new(HashSet::new()) })
    }

    /// One pool named [`MAIN_POOL`], the default (what a single `[engine]` section is).
    pub fn single(pool: Arc<Pool>) -> Pools {
        Pools::new([(MAIN_POOL.to_string(), pool)], MAIN_POOL).expect("the one pool is the default")
    }

    /// The pool of caches created without `"pool"`.
    pub fn default_name(&self) -> &str {
        &self.default
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    /// The pool a stored cache is in. A name no pool has (a pool removed from the config
    /// while caches were in it) is an engine error: the cache's node is unknown.
    pub fn of(&self, pool: &str) -> Result<&Arc<Pool>, EngineError> {
        self.pools.get(pool).ok_or_else(|| EngineError::UnknownNode(format!("pool {pool}")))
    }

    /// Every pool, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<Pool>)> {
        self.pools.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// Stops every pool.
    pub async fn stop(&self) {
        for pool in self.pools.values() {
            pool.stop().await;
        }
    }

    /// Marks a scale operation on `pool` as running until the guard drops; `None` if one
    /// already is.
    pub fn scaling(self: &Arc<Self>, pool: &str) -> Option<ScaleGuard> {
        self.scaling
            .lock()
            .unwrap()
            .insert(pool.to_string())
            .then(|| ScaleGuard { pools: Arc::clone(self), pool: pool.to_string() })
    }
}

/// A running scale operation ([`Pools::scaling`]).
pub struct ScaleGuard {
    pools: Arc<Pools>,
    pool: String,
}

impl Drop for ScaleGuard {
    fn drop(&mut self) {
        self.pools.scaling.lock().unwrap().remove(&self.pool);
    }
}
