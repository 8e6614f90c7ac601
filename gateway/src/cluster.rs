//! Cluster-mode answers: the gateway presents itself as a one-node cluster owning all
//! 16384 slots at its own address, so cluster-mode clients connect and work, as they do on
//! ElastiCache Serverless.

use crate::resp::value::Value;

pub const SLOTS: u16 = 16384;

/// The slot of a key: CRC16 (XMODEM) of the key or its `{hash tag}`, mod 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let key = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(key) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// What the gateway says about itself as a cluster node.
pub struct Identity {
    pub host: String,
    pub port: u16,
    pub node_id: String,
}

impl Identity {
    pub fn new(advertise: &str) -> Identity {
        let (host, port) = advertise.rsplit_once(':').unwrap_or((advertise, "6380"));
        let mut id = String::new();
        for salt in 0u8..3 {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (salt, advertise).hash(&mut h);
            id.push_str(&format!("{:016x}", h.finish()));
        }
        id.truncate(40);
        Identity { host: host.to_string(), port: port.parse().unwrap_or(6380), node_id: id }
    }

    pub fn slots(&self) -> Value {
        Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(SLOTS as i64 - 1),
            Value::Array(vec![
                Value::bulk(&self.host),
                Value::Int(self.port as i64),
                Value::bulk(&self.node_id),
                Value::Map(vec![]),
            ]),
        ])])
    }

    pub fn shards(&self) -> Value {
        let node = Value::Map(vec![
            (Value::bulk("id"), Value::bulk(&self.node_id)),
            (Value::bulk("port"), Value::Int(self.port as i64)),
            (Value::bulk("ip"), Value::bulk(&self.host)),
            (Value::bulk("endpoint"), Value::bulk(&self.host)),
            (Value::bulk("role"), Value::bulk("master")),
            (Value::bulk("replication-offset"), Value::Int(0)),
            (Value::bulk("health"), Value::bulk("online")),
        ]);
        Value::Array(vec![Value::Map(vec![
            (Value::bulk("slots"), Value::Array(vec![Value::Int(0), Value::Int(SLOTS as i64 - 1)])),
            (Value::bulk("nodes"), Value::Array(vec![node])),
        ])])
    }

    pub fn nodes(&self) -> Value {
        Value::bulk(format!(
            "{} {}:{}@{} myself,master - 0 0 1 connected 0-{}\n",
            self.node_id,
            self.host,
            self.port,
            self.port as u32 + 10000,
            SLOTS - 1
        ))
    }

    pub fn info(&self) -> Value {
        Value::bulk(
            "cluster_enabled:1\r\ncluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n\
             cluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:1\r\ncluster_size:1\r\n\
             cluster_current_epoch:1\r\ncluster_my_epoch:1\r\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_valkey() {
        // Values from CLUSTER KEYSLOT on a real Valkey.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(
            key_slot(b"foo{}{bar}"),
            crc16(b"foo{}{bar}") % SLOTS,
            "an empty tag hashes the whole key"
        );
        assert_eq!(key_slot(b"123456789"), 0x31C3, "the CRC16 check value");
    }
}
