//! # Engine: the pool of Valkey nodes
//!
//! Caches are tenants; each lives in a numbered database of one pool member, guarded by its
//! own Valkey ACL user.
//!
//! ## Layout
//! - [`node`]: one `valkey-server` child — config, start, supervision (restart on crash), stop.
//! - [`pool`]: the set of nodes, started together and stopped together; admin operations.
//! - [`placement`]: which node and database a new cache gets (least loaded).
//! - [`tenant`]: the ACL rules that fence a cache into its database and channels.
//! - [`error`]: typed errors.

pub mod error;
pub mod node;
pub mod placement;
pub mod pool;
pub mod storage;
pub mod tenant;

pub use error::EngineError;
pub use node::{find_valkey_server, NodeSpec};
pub use placement::{Allocation, NodeLoad};
pub use pool::{Pool, PoolConfig};
pub use storage::{CacheDbs, Eviction, StorageProbe, StorageSample};
pub use tenant::TenantAcl;
