//! Placement: which node and database a new cache gets.
//!
//! Pure functions over the current allocations (which live in the control plane's store).
//! Database 0 of each shared node is reserved for the platform; caches get 1..databases. A
//! dedicated node holds one cache, from database 0 (where Search indexes work).
//! A node is chosen only if it is healthy (it answered its last health check) and the storage
//! limits of its caches, the new one's included, fit in its capacity.

use std::collections::BTreeMap;

/// How full one node is.
#[derive(Clone, Debug)]
pub struct NodeLoad {
    pub node: String,
    /// How many databases the node has (`databases` in its config).
    pub databases: u32,
    /// Databases taken by live caches (or waiting to be flushed).
    pub taken: Taken,
    /// It answered its last health check ([`crate::node::Node::healthy`]).
    pub healthy: bool,
    /// MB of storage limits the node may hold ([`crate::node::Node::storage_capacity_mb`]).
    pub capacity_mb: u64,
    /// MB of storage limits its caches hold already.
    pub reserved_mb: u64,
    /// What it tracks of keys' use: only caches whose eviction policy needs that go there.
    pub key_access: crate::KeyAccess,
    /// Shared caches go to shared nodes, dedicated ones to dedicated nodes.
    pub placement: crate::Placement,
}

impl NodeLoad {
    /// MB of storage limits still free on the node.
    pub fn free_mb(&self) -> u64 {
        self.capacity_mb.saturating_sub(self.reserved_mb)
    }
}

/// Why no node could take a cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoPlacement {
    /// No healthy node has `count` consecutive free databases.
    Full,
    /// Every node that could take it is unhealthy.
    NoHealthyNode,
    /// No healthy node has room for the cache's storage limit; the most any has left.
    NoRoom { largest_free_mb: u64 },
}

/// A database chosen for a cache: `databases` consecutive numbers from `db`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub node: String,
    pub db: u32,
}

/// Chooses a free healthy dedicated node (no database taken) with `count` databases and room
/// for `storage_mb`; the cache gets its databases from 0. Nodes listed first go first.
pub fn choose_dedicated(nodes: &[NodeLoad], count: u32, storage_mb: u64) -> Result<Allocation, NoPlacement> {
    let free: Vec<&NodeLoad> =
        nodes.iter().filter(|n| n.taken.is_empty() && count.max(1) <= n.databases).collect();
    let healthy: Vec<&&NodeLoad> = free.iter().filter(|n| n.healthy).collect();
    if healthy.is_empty() {
        return Err(if free.is_empty() { NoPlacement::Full } else { NoPlacement::NoHealthyNode });
    }
    healthy
        .iter()
        .find(|n| n.free_mb() >= storage_mb)
        .map(|n| Allocation { node: n.node.clone(), db: 0 })
        .ok_or_else(|| NoPlacement::NoRoom {
            largest_free_mb: healthy.iter().map(|n| n.free_mb()).max().unwrap_or(0),
        })
}

/// Chooses the least loaded healthy node with `count` consecutive free databases and room for
/// `storage_mb` more of storage limits, and the lowest such run on it. Ties go to the node
/// listed first.
pub fn choose(nodes: &[NodeLoad], count: u32, storage_mb: u64) -> Result<Allocation, NoPlacement> {
    let count = count.max(1);
    let mut order: Vec<&NodeLoad> = nodes.iter().collect();
    order.sort_by_key(|n| n.taken.len());
    let with_dbs: Vec<(&NodeLoad, u32)> =
        order.into_iter().filter_map(|n| first_free_run(n, count).map(|db| (n, db))).collect();
    let healthy: Vec<&(&NodeLoad, u32)> = with_dbs.iter().filter(|(n, _)| n.healthy).collect();
    if healthy.is_empty() {
        return Err(if with_dbs.is_empty() { NoPlacement::Full } else { NoPlacement::NoHealthyNode });
    }
    healthy
        .iter()
        .find(|(n, _)| n.free_mb() >= storage_mb)
        .map(|(n, db)| Allocation { node: n.node.clone(), db: *db })
        .ok_or_else(|| NoPlacement::NoRoom {
            largest_free_mb: healthy.iter().map(|(n, _)| n.free_mb()).max().unwrap_or(0),
        })
}

fn first_free_run(node: &NodeLoad, count: u32) -> Option<u32> {
    node.taken.first_free_run(count, node.databases)
}

/// Databases in use on a node, kept as runs of consecutive numbers (`start → end`, end
/// excluded): caches are handed the lowest free numbers, so a full node is a handful of runs
/// and finding a free one does not walk every cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    runs: BTreeMap<u32, u32>,
    count: usize,
}

impl Taken {
    /// How many databases are taken.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn contains(&self, db: &u32) -> bool {
        self.runs.range(..=*db).next_back().is_some_and(|(_, end)| *db < *end)
    }

    /// Marks `db` taken; false if it was already.
    pub fn insert(&mut self, db: u32) -> bool {
        if self.contains(&db) {
            return false;
        }
        let mut start = db;
        let mut end = db + 1;
        if let Some((&s, _)) = self.runs.range(..db).next_back().filter(|(_, e)| **e == db) {
            start = s;
        }
        if let Some(e) = self.runs.remove(&end) {
            end = e;
        }
        self.runs.insert(start, end);
        self.count += 1;
        true
    }

    /// Marks `db` free; false if it was not taken.
    pub fn remove(&mut self, db: u32) -> bool {
        let Some((&start, &end)) = self.runs.range(..=db).next_back().filter(|(_, e)| db < **e) else {
            return false;
        };
        self.runs.remove(&start);
        if start < db {
            self.runs.insert(start, db);
        }
        if db + 1 < end {
            self.runs.insert(db + 1, end);
        }
        self.count -= 1;
        true
    }

    /// The lowest `count` consecutive free databases from 1, all below `databases`; none of
    /// them the platform's (0, and the cron's anchors: [`crate::cron`]).
    fn first_free_run(&self, count: u32, databases: u32) -> Option<u32> {
        let mut start = 1;
        let mut runs = self.runs.iter().peekable();
        loop {
            if let Some(anchor) =
                (start..start + count).find(|&db| crate::cron::is_anchor(db) && db < databases)
            {
                start = anchor + 1;
                continue;
            }
            match runs.peek() {
                Some(&(_, &e)) if e <= start => {}
                Some(&(&s, &e)) if s < start + count => start = e,
                _ => break,
            }
            runs.next();
        }
        (start + count <= databases).then_some(start)
    }
}

impl FromIterator<u32> for Taken {
    fn from_iter<I: IntoIterator<Item = u32>>(dbs: I) -> Taken {
        let mut taken = Taken::default();
        for db in dbs {
            taken.insert(db);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(node: &str, databases: u32, taken: &[u32]) -> NodeLoad {
        NodeLoad {
            node: node.into(),
            databases,
            taken: taken.iter().copied().collect(),
            healthy: true,
            capacity_mb: 1000,
            reserved_mb: 0,
            key_access: Default::default(),
            placement: Default::default(),
        }
    }

    #[test]
    fn picks_the_least_loaded_node_and_lowest_free_database() {
        let nodes = [load("n0", 8, &[1, 2]), load("n1", 8, &[1])];
        assert_eq!(choose(&nodes, 1, 0), Ok(Allocation { node: "n1".into(), db: 2 }));
    }

    #[test]
    fn never_hands_out_database_zero_and_reuses_holes() {
        let nodes = [load("n0", 4, &[2])];
        assert_eq!(choose(&nodes, 1, 0), Ok(Allocation { node: "n0".into(), db: 1 }));
    }

    #[test]
    fn multi_database_caches_get_a_consecutive_run() {
        let nodes = [load("n0", 8, &[2, 5])];
        assert_eq!(choose(&nodes, 2, 0), Ok(Allocation { node: "n0".into(), db: 3 }));
        assert_eq!(choose(&nodes, 3, 0), Err(NoPlacement::Full));
    }

    #[test]
    fn caches_never_get_the_crons_anchors() {
        // Every 64th database is an anchor.
        let taken: Vec<u32> = (1..64).collect();
        assert_eq!(choose(&[load("n0", 4096, &taken)], 1, 1), Ok(Allocation { node: "n0".into(), db: 65 }));
        // 1024 is one: a run of 4 that would cross it starts after it.
        let taken: Vec<u32> = (1..1022).collect();
        let nodes = [load("n0", 4096, &taken)];
        assert_eq!(choose(&nodes, 1, 1), Ok(Allocation { node: "n0".into(), db: 1022 }));
        assert_eq!(choose(&nodes, 4, 1), Ok(Allocation { node: "n0".into(), db: 1025 }));
        let taken: Vec<u32> = (1..1024).collect();
        assert_eq!(choose(&[load("n0", 4096, &taken)], 1, 1), Ok(Allocation { node: "n0".into(), db: 1025 }));
        // Every database but the anchors taken: full.
        let taken: Vec<u32> = (1..2049).filter(|&db| !crate::cron::is_anchor(db)).collect();
        assert_eq!(choose(&[load("n0", 2049, &taken)], 1, 1), Err(NoPlacement::Full));
        // A hole after taken runs, and one before.
        let nodes = [load("n0", 4096, &[1, 2, 5, 6])];
        assert_eq!(choose(&nodes, 2, 1), Ok(Allocation { node: "n0".into(), db: 3 }));
        assert_eq!(choose(&nodes, 3, 1), Ok(Allocation { node: "n0".into(), db: 7 }));
    }

    #[test]
    fn full_pool_gives_none() {
        let nodes = [load("n0", 3, &[1, 2]), load("n1", 2, &[1])];
        assert_eq!(choose(&nodes, 1, 0), Err(NoPlacement::Full));
    }

    #[test]
    fn unhealthy_nodes_are_skipped() {
        let mut n0 = load("n0", 8, &[]);
        n0.healthy = false;
        let nodes = [n0.clone(), load("n1", 8, &[1, 2, 3])];
        assert_eq!(choose(&nodes, 1, 0), Ok(Allocation { node: "n1".into(), db: 4 }));
        assert_eq!(choose(&[n0], 1, 0), Err(NoPlacement::NoHealthyNode));
    }

    #[test]
    fn a_dedicated_cache_takes_a_whole_free_node_from_database_0() {
        let nodes = [load("d0", 16, &[0]), load("d1", 16, &[]), load("d2", 16, &[])];
        assert_eq!(choose_dedicated(&nodes, 2, 0), Ok(Allocation { node: "d1".into(), db: 0 }));
        assert_eq!(choose_dedicated(&nodes, 17, 0), Err(NoPlacement::Full));
        assert_eq!(choose_dedicated(&nodes[..1], 1, 0), Err(NoPlacement::Full));
        let mut d1 = load("d1", 16, &[]);
        d1.healthy = false;
        assert_eq!(choose_dedicated(&[d1], 1, 0), Err(NoPlacement::NoHealthyNode));
        assert_eq!(choose_dedicated(&nodes, 1, 1001), Err(NoPlacement::NoRoom { largest_free_mb: 1000 }));
    }

    #[test]
    fn storage_limits_must_fit_the_node() {
        let mut n0 = load("n0", 8, &[]);
        n0.reserved_mb = 950;
        let mut n1 = load("n1", 8, &[1]);
        n1.reserved_mb = 800;
        let nodes = [n0, n1];
        assert_eq!(choose(&nodes, 1, 100), Ok(Allocation { node: "n1".into(), db: 2 }));
        assert_eq!(choose(&nodes, 1, 201), Err(NoPlacement::NoRoom { largest_free_mb: 200 }));
    }

    #[test]
    fn taken_databases_merge_into_runs_and_split_again() {
        let mut t: Taken = [1, 2, 4].into_iter().collect();
        assert_eq!((t.len(), t.runs.len()), (3, 2));
        assert!(t.insert(3) && !t.insert(3));
        assert_eq!(t.runs, BTreeMap::from([(1, 5)]));
        assert_eq!(t.first_free_run(1, 8), Some(5));
        assert!(t.remove(2) && !t.remove(2) && !t.remove(9));
        assert_eq!(t.runs, BTreeMap::from([(1, 2), (3, 5)]));
        assert_eq!(
            (t.first_free_run(1, 8), t.first_free_run(2, 8), t.first_free_run(4, 8)),
            (Some(2), Some(5), None)
        );
        assert!(t.contains(&1) && !t.contains(&2) && t.contains(&4) && !t.contains(&5));
        assert_eq!(t.len(), 3);
    }
}
