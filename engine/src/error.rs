//! Engine errors. The text is for operators' logs, never for tenants.

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("valkey-server binary not found: {0}")]
    BinaryNotFound(String),
    #[error("i/o error on node {node}: {source}")]
    Io { node: String, source: std::io::Error },
    #[error("node {0} did not become ready in time")]
    NotReady(String),
    /// valkey-server exited before it was ready (a module that failed to load, a port in
    /// use, a config it refused): `reason` is what it logged.
    #[error("node {node}: valkey-server exited at start ({status}): {reason} (its log: {})", log.display())]
    Exited { node: String, status: String, reason: String, log: std::path::PathBuf },
    #[error("node {node}: valkey error: {source}")]
    Valkey { node: String, source: redis::RedisError },
    #[error("unknown node {0}")]
    UnknownNode(String),
    #[error("no free database on any node")]
    Full,
    #[error("no healthy node can take a new cache")]
    NoHealthyNode,
    /// A cluster shard had no reachable primary within the failover wait; nothing was done.
    #[error("cluster shard {0} has no reachable primary (a failover not finished?)")]
    NoPrimary(String),
    /// A node's files or settings do not fit what it is asked to be.
    #[error("{0}")]
    Config(String),
    /// Reading a node's data for a snapshot, or writing a snapshot's keys, failed.
    #[error("snapshot: {0}")]
    Snapshot(String),
}

impl EngineError {
    /// A short, stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::BinaryNotFound(_) => "binary_not_found",
            EngineError::Io { .. } => "io",
            EngineError::NotReady(_) => "not_ready",
            EngineError::Exited { .. } => "exited",
            EngineError::Valkey { .. } => "valkey",
            EngineError::UnknownNode(_) => "unknown_node",
            EngineError::Full => "full",
            EngineError::NoHealthyNode => "no_healthy_node",
            EngineError::NoPrimary(_) => "no_primary",
            EngineError::Config(_) => "config",
            EngineError::Snapshot(_) => "snapshot",
        }
    }
}
