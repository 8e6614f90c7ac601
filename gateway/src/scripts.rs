//! Scripts in flight on each node through this gateway, per cache: a tenant's `SCRIPT KILL`
//! may end only its own cache's script, and Valkey's own SCRIPT KILL cannot tell whose
//! script runs. The session counts a script from when it is sent until its reply (or its
//! connection) is gone.

use shoal_types::CacheId;
use std::collections::HashMap;
use std::sync::Mutex;

/// Whose script may be running on a node.
#[derive(Debug, PartialEq, Eq)]
pub enum Owner {
    /// No script of any cache is in flight there through this gateway.
    Nobody,
    /// Only scripts of the asking cache.
    Asker,
    /// Another cache has one in flight too: the running one may be its.
    Another,
}

#[derive(Default)]
pub struct Running {
    by_node: Mutex<HashMap<String, HashMap<CacheId, u32>>>,
}

impl Running {
    pub fn started(&self, node: &str, cache: &CacheId) {
        let mut nodes = self.by_node.lock().unwrap();
        *nodes.entry(node.to_string()).or_default().entry(cache.clone()).or_default() += 1;
    }

    /// `n` scripts of the cache are over (answered, or their connection is gone).
    pub fn ended(&self, node: &str, cache: &CacheId, n: u32) {
        if n == 0 {
            return;
        }
        let mut nodes = self.by_node.lock().unwrap();
        if let Some(caches) = nodes.get_mut(node) {
            if let Some(count) = caches.get_mut(cache) {
                *count = count.saturating_sub(n);
                if *count == 0 {
                    caches.remove(cache);
                }
            }
            if caches.is_empty() {
                nodes.remove(node);
            }
        }
    }

    pub fn owner(&self, node: &str, cache: &CacheId) -> Owner {
        let nodes = self.by_node.lock().unwrap();
        match nodes.get(node) {
            None => Owner::Nobody,
            Some(caches) if caches.keys().all(|c| c == cache) => Owner::Asker,
            Some(_) => Owner::Another,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_is_the_askers_only_while_no_other_cache_has_one_on_the_node() {
        let r = Running::default();
        let (a, b) = (CacheId::generate(), CacheId::generate());
        assert_eq!(r.owner("n0", &a), Owner::Nobody);
        r.started("n0", &a);
        r.started("n1", &b);
        assert_eq!(r.owner("n0", &a), Owner::Asker);
        assert_eq!(r.owner("n0", &b), Owner::Another);
        r.started("n0", &b);
        assert_eq!(r.owner("n0", &a), Owner::Another);
        r.ended("n0", &b, 1);
        r.ended("n0", &a, 5);
        assert_eq!(r.owner("n0", &a), Owner::Nobody);
    }
}
