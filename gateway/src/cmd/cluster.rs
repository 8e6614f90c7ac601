//! A one-node cluster at the gateway's address: CLUSTER INFO, SLOTS, SHARDS, NODES …

use super::wrong_args;
use super::Ctx;
use crate::resp::value::Value;

pub(super) fn cluster(cx: &mut Ctx<'_>, name: &str, argv: &[&[u8]]) {
    let id = &cx.shared().identity;
    let v = match name {
        "cluster|slots" => id.slots(),
        "cluster|shards" => id.shards(),
        "cluster|nodes" => id.nodes(),
        "cluster|info" => id.info(),
        "cluster|myid" | "cluster|myshardid" => Value::bulk(&id.node_id),
        "cluster|keyslot" if argv.len() == 3 => Value::Int(crate::cluster::key_slot(argv[2]) as i64),
        "cluster|keyslot" => return wrong_args(cx, "cluster|keyslot"),
        _ => return cx.refuse("ERR unknown subcommand"),
    };
    cx.reply_value(&v);
}
