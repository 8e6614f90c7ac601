//! How many bytes a cache stores, and evicting its keys when it stores too many.
//!
//! Valkey keeps no per-database memory counter, so a cache's size is estimated from
//! `MEMORY USAGE` (the key, its value and their allocation overhead, as the allocator sees it):
//! - up to [`EXACT_KEYS`] keys per database: every key is measured (a full `SCAN`), the sum is
//!   exact up to `MEMORY USAGE`'s own sampling of big collections;
//! - above: [`SAMPLE_KEYS`] `RANDOMKEY`s are measured and their mean is scaled by `DBSIZE`.
//!
//! Each key also counts [`TABLE_BYTES_PER_KEY`] for its slot in the database's hash table.
//! In a cluster pool a cache's storage is the sum of these over every shard's primary.
//!
//! Everything is pipelined in chunks of [`CHUNK`] cheap commands, so the node never runs more
//! than a few hundred microseconds of our work at once and other clients interleave.
//! Eviction imitates Valkey's `maxmemory-policy`s ([`EvictionPolicy`]): among the candidates
//! (every key, or only those with a TTL) the first in the policy's order go (idlest by
//! `OBJECT IDLETIME`, least frequently used by `OBJECT FREQ`, soonest to expire by `PTTL`, or
//! at random) — all keys compared in small databases, pools of samples in big ones.

use crate::node::Node;
use crate::{EngineError, Pool};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Databases up to this many keys are measured key by key (no dearer than a sample).
pub const EXACT_KEYS: u64 = 1_000;
/// Keys measured to estimate a bigger database. The node spends about 1.5 µs of CPU per
/// command, so one cache costs it at most ~2 ms per sample, however big the cache.
pub const SAMPLE_KEYS: usize = 500;
/// What each key costs beyond its `MEMORY USAGE`: its slot in the database's hash table
/// (buckets of 7 entries, kept under full). Measured against `used_memory` on Valkey 9.1
/// (engine/tests/storage.rs): 12–14 bytes per key.
pub const TABLE_BYTES_PER_KEY: u64 = 12;
/// Keys asked for by the first `SCAN` of a database.
const FIRST_PAGE: usize = 100;
/// Commands per pipelined round trip.
const CHUNK: usize = 500;
/// Keys sampled per eviction round in a big database, and how many of them go per round (the
/// first in the policy's order).
const EVICTION_SAMPLE: usize = 256;
const EVICT_PER_ROUND: usize = 32;
/// One eviction call stops after this long (the next sampling round continues).
const EVICTION_BUDGET: Duration = Duration::from_secs(2);

/// A cache's numbered databases on its node: `db .. db + databases`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheDbs {
    pub db: u32,
    pub databases: u32,
}

impl CacheDbs {
    pub fn iter(self) -> impl Iterator<Item = u32> {
        self.db..self.db + self.databases.max(1)
    }
}

/// An estimate of what a cache stores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageSample {
    pub bytes: u64,
    pub keys: u64,
    /// Every key was measured (no extrapolation from a sample).
    pub exact: bool,
}

/// What an eviction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Eviction {
    pub keys: u64,
    /// What the evicted keys counted for in [`StorageProbe::measure`] before they went.
    pub bytes: u64,
    /// Fewer bytes than asked were freed because no (findable) candidate is left (a key with a
    /// TTL, or any key for an `allkeys-*` policy) — not because the time budget ran out.
    pub exhausted: bool,
}

/// A `SCAN` reply: the next cursor and a page of keys.
type ScanPage = (u64, Vec<Vec<u8>>);

/// A key that may be evicted.
struct Candidate {
    key: Vec<u8>,
    /// Higher goes first.
    rank: u64,
    bytes: u64,
}

/// Which keys go first when a cache is over its storage limit: Valkey's evicting
/// `maxmemory-policy`s (`noeviction` evicts nothing and has no value here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionPolicy {
    VolatileLru,
    AllkeysLru,
    VolatileLfu,
    AllkeysLfu,
    VolatileRandom,
    AllkeysRandom,
    VolatileTtl,
}

/// In what order candidates go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// Idlest first (`OBJECT IDLETIME`).
    Idle,
    /// Least frequently used first (`OBJECT FREQ`: needs an LFU `maxmemory-policy` on the
    /// node, which answers it with an error otherwise, failing the eviction).
    Frequency,
    /// Soonest to expire first (`PTTL`).
    Ttl,
    Random,
}

impl EvictionPolicy {
    /// The policy of a `maxmemory-policy` name; `None` for `noeviction` (or an unknown name).
    pub fn parse(name: &str) -> Option<EvictionPolicy> {
        Some(match name {
            "volatile-lru" => EvictionPolicy::VolatileLru,
            "allkeys-lru" => EvictionPolicy::AllkeysLru,
            "volatile-lfu" => EvictionPolicy::VolatileLfu,
            "allkeys-lfu" => EvictionPolicy::AllkeysLfu,
            "volatile-random" => EvictionPolicy::VolatileRandom,
            "allkeys-random" => EvictionPolicy::AllkeysRandom,
            "volatile-ttl" => EvictionPolicy::VolatileTtl,
            _ => return None,
        })
    }

    /// Every key is a candidate (else only keys with a TTL).
    pub fn all_keys(self) -> bool {
        matches!(
            self,
            EvictionPolicy::AllkeysLru | EvictionPolicy::AllkeysLfu | EvictionPolicy::AllkeysRandom
        )
    }

    fn order(self) -> Order {
        match self {
            EvictionPolicy::VolatileLru | EvictionPolicy::AllkeysLru => Order::Idle,
            EvictionPolicy::VolatileLfu | EvictionPolicy::AllkeysLfu => Order::Frequency,
            EvictionPolicy::VolatileRandom | EvictionPolicy::AllkeysRandom => Order::Random,
            EvictionPolicy::VolatileTtl => Order::Ttl,
        }
    }
}

/// Connections for measuring and evicting a placement target's caches: one node's, or in a
/// cluster pool one per shard's primary (a cache's keys are spread over the shards, so its
/// storage is the sum, and its limit applies to the whole).
pub struct StorageProbe {
    parts: Vec<NodeProbe>,
}

/// One connection to a node, as the admin user. Not shared: it `SELECT`s databases.
struct NodeProbe {
    node: Arc<Node>,
    conn: redis::aio::MultiplexedConnection,
}

impl Pool {
    /// Opens a probe on `node` (a node name, or [`crate::CLUSTER_TARGET`]: every shard's
    /// current primary).
    pub async fn storage_probe(&self, node: &str) -> Result<StorageProbe, EngineError> {
        let nodes = match self.cluster() {
            Some(cluster) => cluster.primaries().await?,
            None => vec![self.node(node)?.clone()],
        };
        let mut parts = Vec::with_capacity(nodes.len());
        for node in nodes {
            let conn = crate::pool::admin_conn(&node).await?;
            parts.push(NodeProbe { node, conn });
        }
        Ok(StorageProbe { parts })
    }
}

impl StorageProbe {
    /// Estimates the bytes stored in a cache's databases (see the module docs), summed over
    /// the probe's nodes.
    pub async fn measure(&mut self, dbs: CacheDbs) -> Result<StorageSample, EngineError> {
        let mut total = StorageSample { exact: true, ..Default::default() };
        for part in &mut self.parts {
            let s = part.measure(dbs).await?;
            total = StorageSample {
                bytes: total.bytes + s.bytes,
                keys: total.keys + s.keys,
                exact: total.exact && s.exact,
            };
        }
        Ok(total)
    }

    /// The databases holding at least one key on any of the probe's nodes, from one
    /// `INFO keyspace` each (which lists only those): a cache none of whose databases is
    /// among them stores nothing, and needs no [`StorageProbe::measure`].
    pub async fn nonempty_dbs(&mut self) -> Result<HashSet<u32>, EngineError> {
        let mut dbs = HashSet::new();
        for part in &mut self.parts {
            let info: String = redis::cmd("INFO")
                .arg("keyspace")
                .query_async(&mut part.conn)
                .await
                .map_err(|e| part.node.valkey_err(e))?;
            dbs.extend(keyspace_dbs(&info));
        }
        Ok(dbs)
    }

    /// Those of `dbs` that hold at least one key on any of the probe's nodes, from `SELECT`
    /// and `DBSIZE` in pipelines of [`CHUNK`] commands: what [`StorageProbe::nonempty_dbs`]
    /// tells for a few databases, without a walk of every database of the node.
    pub async fn nonempty_among(&mut self, dbs: &[u32]) -> Result<HashSet<u32>, EngineError> {
        let mut found = HashSet::new();
        for part in &mut self.parts {
            for chunk in dbs.chunks(CHUNK / 2) {
                let mut pipe = redis::pipe();
                for db in chunk {
                    pipe.cmd("SELECT").arg(db).ignore().cmd("DBSIZE");
                }
                let sizes: Vec<u64> =
                    pipe.query_async(&mut part.conn).await.map_err(|e| part.node.valkey_err(e))?;
                found.extend(chunk.iter().zip(sizes).filter(|(_, keys)| *keys > 0).map(|(db, _)| *db));
            }
        }
        Ok(found)
    }

    /// Deletes `policy`'s candidates (every key, or only keys with a TTL), first in its order
    /// first, until about `bytes` are freed or none is left; in a cluster shard after shard
    /// (in order within each), until enough is freed.
    pub async fn evict(
        &mut self,
        dbs: CacheDbs,
        policy: EvictionPolicy,
        bytes: u64,
    ) -> Result<Eviction, EngineError> {
        let mut done = Eviction { exhausted: true, ..Default::default() };
        for part in &mut self.parts {
            if done.bytes >= bytes {
                break;
            }
            let e = part.evict(dbs, policy, bytes - done.bytes).await?;
            done = Eviction {
                keys: done.keys + e.keys,
                bytes: done.bytes + e.bytes,
                exhausted: done.exhausted && e.exhausted,
            };
        }
        if done.bytes >= bytes {
            done.exhausted = false;
        }
        Ok(done)
    }

    /// [`StorageProbe::evict`] with `volatile-lru`: keys with a TTL, idlest first.
    pub async fn evict_volatile_lru(&mut self, dbs: CacheDbs, bytes: u64) -> Result<Eviction, EngineError> {
        self.evict(dbs, EvictionPolicy::VolatileLru, bytes).await
    }
}

/// The databases an `INFO keyspace` reply lists with keys (`db12:keys=3,expires=0,…`).
fn keyspace_dbs(info: &str) -> impl Iterator<Item = u32> + '_ {
    info.lines().filter_map(|l| {
        let (db, rest) = l.strip_prefix("db")?.split_once(':')?;
        let keys: u64 = rest.strip_prefix("keys=")?.split(',').next()?.trim().parse().ok()?;
        (keys > 0).then(|| db.parse().ok()).flatten()
    })
}

impl CacheDbs {
    /// One of the cache's databases is among `nonempty` ([`StorageProbe::nonempty_dbs`]).
    pub fn any_in(self, nonempty: &HashSet<u32>) -> bool {
        self.iter().any(|db| nonempty.contains(&db))
    }
}

impl NodeProbe {
    async fn measure(&mut self, dbs: CacheDbs) -> Result<StorageSample, EngineError> {
        let mut total = StorageSample { exact: true, ..Default::default() };
        for db in dbs.iter() {
            let (keys, first_page) = self.open_db(db).await?;
            if keys == 0 {
                continue;
            }
            let bytes = if keys <= EXACT_KEYS {
                let all = self.scan_rest(db, first_page).await?;
                self.memory_usage(db, &all).await?.into_iter().sum()
            } else {
                total.exact = false;
                let sample = self.random_keys(db, SAMPLE_KEYS).await?;
                let sizes = self.memory_usage(db, &sample).await?;
                // Keys that expired between RANDOMKEY and MEMORY USAGE count as size 0: they are gone.
                let mean = sizes.iter().sum::<u64>() as f64 / sizes.len().max(1) as f64;
                (mean * keys as f64).round() as u64
            };
            total.bytes += bytes + keys * TABLE_BYTES_PER_KEY;
            total.keys += keys;
        }
        Ok(total)
    }

    async fn evict(
        &mut self,
        dbs: CacheDbs,
        policy: EvictionPolicy,
        bytes: u64,
    ) -> Result<Eviction, EngineError> {
        let started = Instant::now();
        let mut done = Eviction::default();
        // Small databases: every candidate key compared; one sorted pass.
        let mut small = Vec::new();
        let mut big = Vec::new();
        for db in dbs.iter() {
            let (keys, first_page) = self.open_db(db).await?;
            if keys > EXACT_KEYS {
                big.push(db);
            } else if keys > 0 {
                let all = self.scan_rest(db, first_page).await?;
                small.extend(self.candidates(db, policy, all).await?.into_iter().map(|c| (db, c)));
            }
        }
        small.sort_by_key(|c| std::cmp::Reverse(c.1.rank));
        let mut victims: Vec<(u32, Candidate)> = Vec::new();
        let mut planned = 0;
        for (db, c) in small {
            if planned >= bytes {
                break;
            }
            planned += c.bytes;
            victims.push((db, c));
        }
        done = add(done, self.unlink(victims).await?);
        // Big databases: rounds of samples, the first few of each in the policy's order go
        // (Valkey's own approach).
        let mut empty_rounds = 0;
        // Without big databases, the pass above had every candidate to choose from.
        let mut exhausted = big.is_empty();
        while done.bytes < bytes && !big.is_empty() {
            if started.elapsed() >= EVICTION_BUDGET {
                break;
            }
            let mut round = Vec::new();
            for &db in &big {
                let sample = self.random_keys(db, EVICTION_SAMPLE).await?;
                let unique: HashSet<Vec<u8>> = sample.into_iter().collect();
                round.extend(
                    self.candidates(db, policy, unique.into_iter().collect())
                        .await?
                        .into_iter()
                        .map(|c| (db, c)),
                );
            }
            if round.is_empty() {
                // Few or no candidates: give up after a few tries rather than spin.
                empty_rounds += 1;
                if empty_rounds >= 4 {
                    exhausted = true;
                    break;
                }
                continue;
            }
            round.sort_by_key(|c| std::cmp::Reverse(c.1.rank));
            let mut victims = Vec::new();
            let mut planned = done.bytes;
            for (db, c) in round.into_iter().take(EVICT_PER_ROUND) {
                if planned >= bytes {
                    break;
                }
                planned += c.bytes;
                victims.push((db, c));
            }
            done = add(done, self.unlink(victims).await?);
        }
        done.exhausted = exhausted && done.bytes < bytes;
        Ok(done)
    }

    /// `DBSIZE` and a first small `SCAN` page, in one round trip: enough for most small
    /// caches, little wasted work for big ones.
    async fn open_db(&mut self, db: u32) -> Result<(u64, ScanPage), EngineError> {
        let (keys, page): (u64, ScanPage) = redis::pipe()
            .cmd("SELECT")
            .arg(db)
            .ignore()
            .cmd("DBSIZE")
            .cmd("SCAN")
            .arg(0)
            .arg("COUNT")
            .arg(FIRST_PAGE)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| self.node.valkey_err(e))?;
        Ok((keys, page))
    }

    /// Every key of a database (small databases only), without duplicates, continuing a scan.
    async fn scan_rest(
        &mut self,
        db: u32,
        (mut cursor, first): ScanPage,
    ) -> Result<Vec<Vec<u8>>, EngineError> {
        let mut seen: HashSet<Vec<u8>> = first.into_iter().collect();
        while cursor != 0 {
            let ((next, keys),): (ScanPage,) = redis::pipe()
                .cmd("SELECT")
                .arg(db)
                .ignore()
                .cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(CHUNK)
                .query_async(&mut self.conn)
                .await
                .map_err(|e| self.node.valkey_err(e))?;
            seen.extend(keys);
            cursor = next;
        }
        Ok(seen.into_iter().collect())
    }

    /// `n` random keys (with repetitions; fewer if the database empties meanwhile).
    async fn random_keys(&mut self, db: u32, n: usize) -> Result<Vec<Vec<u8>>, EngineError> {
        let mut keys = Vec::with_capacity(n);
        let mut left = n;
        while left > 0 {
            let take = left.min(CHUNK);
            let mut pipe = redis::pipe();
            pipe.cmd("SELECT").arg(db).ignore();
            for _ in 0..take {
                pipe.cmd("RANDOMKEY");
            }
            let got: Vec<Option<Vec<u8>>> =
                pipe.query_async(&mut self.conn).await.map_err(|e| self.node.valkey_err(e))?;
            keys.extend(got.into_iter().flatten());
            left -= take;
        }
        Ok(keys)
    }

    /// `MEMORY USAGE` of each key (0 for keys gone meanwhile).
    async fn memory_usage(&mut self, db: u32, keys: &[Vec<u8>]) -> Result<Vec<u64>, EngineError> {
        let mut sizes = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            pipe.cmd("SELECT").arg(db).ignore();
            for key in chunk {
                pipe.cmd("MEMORY").arg("USAGE").arg(key);
            }
            let got: Vec<Option<u64>> =
                pipe.query_async(&mut self.conn).await.map_err(|e| self.node.valkey_err(e))?;
            sizes.extend(got.into_iter().map(Option::unwrap_or_default));
        }
        Ok(sizes)
    }

    /// The keys among `keys` that `policy` may evict (those with a TTL, or every key still
    /// there), with their rank in its order and their size. None of the commands used touches
    /// a key's access time or frequency.
    async fn candidates(
        &mut self,
        db: u32,
        policy: EvictionPolicy,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<Candidate>, EngineError> {
        let order = policy.order();
        // PTTL and MEMORY USAGE for every order; OBJECT IDLETIME or FREQ for LRU and LFU.
        let probe = match order {
            Order::Idle => Some("IDLETIME"),
            Order::Frequency => Some("FREQ"),
            Order::Ttl | Order::Random => None,
        };
        let per_key = if probe.is_some() { 3 } else { 2 };
        let random = std::collections::hash_map::RandomState::new();
        let mut out = Vec::new();
        for chunk in keys.chunks(CHUNK / 3) {
            let mut pipe = redis::pipe();
            pipe.cmd("SELECT").arg(db).ignore();
            for key in chunk {
                pipe.cmd("PTTL").arg(key);
                if let Some(sub) = probe {
                    pipe.cmd("OBJECT").arg(sub).arg(key);
                }
                pipe.cmd("MEMORY").arg("USAGE").arg(key);
            }
            let got: Vec<redis::Value> =
                pipe.query_async(&mut self.conn).await.map_err(|e| self.node.valkey_err(e))?;
            for (key, facts) in chunk.iter().zip(got.chunks(per_key)) {
                let int = |v: &redis::Value| match v {
                    redis::Value::Int(n) => Some(*n),
                    _ => None,
                };
                let (ttl, size) = (int(&facts[0]), int(&facts[per_key - 1]));
                // PTTL: -1 = no TTL, -2 = gone.
                let wanted = match ttl {
                    Some(t) if t > 0 => true,
                    Some(-1) => policy.all_keys(),
                    _ => false,
                };
                if !wanted {
                    continue;
                }
                let probed = || int(&facts[1]).unwrap_or(0).max(0) as u64;
                let rank = match order {
                    Order::Idle => probed(),
                    // Valkey's LFU counter is 0..=255: the lowest goes first.
                    Order::Frequency => u64::MAX - probed(),
                    Order::Ttl => u64::MAX - ttl.unwrap_or(0).max(0) as u64,
                    Order::Random => {
                        use std::hash::BuildHasher;
                        random.hash_one(key)
                    }
                };
                out.push(Candidate {
                    key: key.clone(),
                    rank,
                    bytes: size.unwrap_or(0).max(0) as u64 + TABLE_BYTES_PER_KEY,
                });
            }
        }
        Ok(out)
    }

    /// Deletes the victims; counts only those that still existed.
    async fn unlink(&mut self, victims: Vec<(u32, Candidate)>) -> Result<Eviction, EngineError> {
        let mut done = Eviction::default();
        for chunk in victims.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            for (db, c) in chunk {
                pipe.cmd("SELECT").arg(*db).ignore();
                pipe.cmd("UNLINK").arg(&c.key);
            }
            let got: Vec<u64> =
                pipe.query_async(&mut self.conn).await.map_err(|e| self.node.valkey_err(e))?;
            for ((_, c), n) in chunk.iter().zip(got) {
                if n > 0 {
                    done.keys += 1;
                    done.bytes += c.bytes;
                }
            }
        }
        Ok(done)
    }
}

fn add(a: Eviction, b: Eviction) -> Eviction {
    Eviction { keys: a.keys + b.keys, bytes: a.bytes + b.bytes, exhausted: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_keyspace_lists_the_databases_with_keys() {
        let info = "# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\ndb17:keys=30,expires=2,avg_ttl=5\r\n\
                    db18:keys=0,expires=0,avg_ttl=0\r\n";
        let dbs: HashSet<u32> = keyspace_dbs(info).collect();
        assert_eq!(dbs, HashSet::from([0, 17]));
        assert!(CacheDbs { db: 16, databases: 2 }.any_in(&dbs));
        assert!(!CacheDbs { db: 18, databases: 1 }.any_in(&dbs));
        assert!(!CacheDbs { db: 5, databases: 0 }.any_in(&dbs));
    }
}
