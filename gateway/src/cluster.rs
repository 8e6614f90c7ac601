//! Cluster-mode answers: the gateway presents itself as a one-node cluster owning all
//! 16384 slots at its own address, so cluster-mode clients connect and work, as they do on
//! ElastiCache Serverless.

use crate::resp::value::Value;

pub use shoal_commands::{key_slot, SLOTS};

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
