//! A one-node cluster at the gateway's address: CLUSTER INFO, SLOTS, SHARDS, NODES …

use super::wrong_args;
use crate::resp::value::Value;
use crate::session::Session;

pub(super) fn cluster(s: &mut Session, name: &str, argv: &[&[u8]]) {
    let id = &s.shared.identity;
    let v = match name {
        "cluster|slots" => id.slots(),
        "cluster|shards" => id.shards(),
        "cluster|nodes" => id.nodes(),
        "cluster|info" => id.info(),
        "cluster|myid" | "cluster|myshardid" => Value::bulk(&id.node_id),
        "cluster|keyslot" if argv.len() == 3 => Value::Int(crate::cluster::key_slot(argv[2]) as i64),
        "cluster|keyslot" => return wrong_args(s, "cluster|keyslot"),
        _ => return s.refuse("ERR unknown subcommand"),
    };
    s.reply_value(&v);
}
