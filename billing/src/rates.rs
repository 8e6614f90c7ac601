//! The price list. Rates are data; amounts are kept in integer micro-dollars to avoid floats.

use serde::{Deserialize, Serialize};

/// Prices in micro-dollars (1e-6 USD) so that money never touches floating point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rates {
    /// Price of one million ECPU.
    pub per_million_ecpu_micro_usd: u64,
    /// Price of one GB-hour of stored data.
    pub per_gb_hour_micro_usd: u64,
    /// Storage billed at least per cache-hour, in MB.
    pub min_storage_mb: u64,
}

impl Default for Rates {
    /// The Valkey rates of ElastiCache Serverless in us-east-1.
    fn default() -> Self {
        Rates { per_million_ecpu_micro_usd: 2_300, per_gb_hour_micro_usd: 84_000, min_storage_mb: 100 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_elasticache_serverless_valkey_rates() {
        let r = Rates::default();
        assert_eq!(r.per_million_ecpu_micro_usd, 2_300); // $0.0023
        assert_eq!(r.per_gb_hour_micro_usd, 84_000); // $0.084
        assert_eq!(r.min_storage_mb, 100);
    }
}
