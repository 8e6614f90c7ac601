//! # Engine: the pool of Valkey nodes
//!
//! Caches are tenants; each lives in a numbered database of one pool member (or, in a cluster
//! pool, one database number across every shard), guarded by its own Valkey ACL user.
//!
//! ## Layout
//! - [`node`]: one `valkey-server` child — config, start, supervision (restart on crash), stop,
//!   health checks, the script watchdog and the memory guard.
//! - [`pool`]: the set of nodes, started together and stopped together; admin operations.
//! - [`acl_save`]: tenant ACL users saved in the background, replayed on a restarted node.
//! - [`cluster`]: a pool run as one Valkey cluster — forming it, ACL users on every node,
//!   rejoining restarted and replaced nodes, topology, adding and removing shards.
//! - [`placement`]: which node and database a new cache gets (least loaded).
//! - [`tenant`]: the ACL rules that fence a cache into its database and channels.
//! - [`snapshot`]: a cache's databases read from a node's replication stream as an RDB;
//!   keys written back with `RESTORE`.
//! - [`private`]: secret files 0600, folders 0700 (umask and repair).
//! - [`error`]: typed errors.

pub mod acl_save;
pub mod cluster;
pub mod cron;
pub mod error;
pub mod node;
pub mod placement;
pub mod pool;
pub mod private;
pub mod snapshot;
pub mod storage;
pub mod tenant;

pub use cluster::{AgentNodes, ClusterConfig, ClusterStatus, NodeStatus, Role, ShardStatus};
pub use error::EngineError;
pub use node::{
    find_valkey_server, ClusterMode, Health, KeyAccess, ModuleInfo, ModuleSpec, NodeBudget, NodeSecrets,
    NodeSpec,
};
pub use placement::{Allocation, NoPlacement, NodeLoad};
pub use pool::{
    ClusterMembers, Pool, PoolConfig, Supervisor, CLUSTER_TARGET, DEFAULT_SCRIPT_TIME_LIMIT,
    RESERVED_MEMORY_PERCENT,
};
pub use shoal_commands::Placement;
pub use snapshot::{RestoreKey, SnapshotFile};
pub use storage::{CacheDbs, Eviction, EvictionPolicy, StorageProbe, StorageSample};
pub use tenant::TenantAcl;
