//! Placement: which node and database a new cache gets.
//!
//! Pure functions over the current allocations (which live in the control plane's store).
//! Database 0 of each node is reserved for the platform; caches get 1..databases.

use std::collections::HashSet;

/// How full one node is.
#[derive(Clone, Debug)]
pub struct NodeLoad {
    pub node: String,
    /// How many databases the node has (`databases` in its config).
    pub databases: u32,
    /// Databases taken by live caches (or waiting to be flushed).
    pub taken: HashSet<u32>,
}

/// A database chosen for a cache: `databases` consecutive numbers from `db`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub node: String,
    pub db: u32,
}

/// Chooses the least loaded node with `count` consecutive free databases, and the lowest such
/// run on it. Ties go to the node listed first. `None` when the pool is full.
pub fn choose(nodes: &[NodeLoad], count: u32) -> Option<Allocation> {
    let count = count.max(1);
    let mut order: Vec<&NodeLoad> = nodes.iter().collect();
    order.sort_by_key(|n| n.taken.len());
    order.into_iter().find_map(|n| first_free_run(n, count).map(|db| Allocation { node: n.node.clone(), db }))
}

fn first_free_run(node: &NodeLoad, count: u32) -> Option<u32> {
    let mut start = 1;
    while start + count <= node.databases {
        match (start..start + count).find(|db| node.taken.contains(db)) {
            Some(busy) => start = busy + 1,
            None => return Some(start),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(node: &str, databases: u32, taken: &[u32]) -> NodeLoad {
        NodeLoad { node: node.into(), databases, taken: taken.iter().copied().collect() }
    }

    #[test]
    fn picks_the_least_loaded_node_and_lowest_free_database() {
        let nodes = [load("n0", 8, &[1, 2]), load("n1", 8, &[1])];
        assert_eq!(choose(&nodes, 1), Some(Allocation { node: "n1".into(), db: 2 }));
    }

    #[test]
    fn never_hands_out_database_zero_and_reuses_holes() {
        let nodes = [load("n0", 4, &[2])];
        assert_eq!(choose(&nodes, 1), Some(Allocation { node: "n0".into(), db: 1 }));
    }

    #[test]
    fn multi_database_caches_get_a_consecutive_run() {
        let nodes = [load("n0", 8, &[2, 5])];
        assert_eq!(choose(&nodes, 2), Some(Allocation { node: "n0".into(), db: 3 }));
        assert_eq!(choose(&nodes, 3), None);
    }

    #[test]
    fn full_pool_gives_none() {
        let nodes = [load("n0", 3, &[1, 2]), load("n1", 2, &[1])];
        assert_eq!(choose(&nodes, 1), None);
    }
}
