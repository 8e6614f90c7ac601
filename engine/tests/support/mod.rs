//! What the cluster tests share with the failover bench (`bench/failover.sh`).

pub mod checker;

/// Valkey's key slot of `key`.
pub fn key_slot(key: &str) -> u16 {
    shoal_commands::key_slot(key.as_bytes())
}
