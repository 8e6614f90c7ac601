//! Where one command goes on a cluster, from its row in the command table and its
//! arguments: pure, so every rule is tested without a cluster.

use crate::cluster::key_slot;
use shoal_commands::CommandSpec;

/// How the replies of a command sent to several nodes become one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Every node must agree; the first reply (or the first error).
    First,
    /// `+OK` once every part said so (MSET, FLUSHDB, SCRIPT FLUSH).
    AllOk,
    /// Integers added up (DEL, UNLINK, EXISTS, TOUCH, DBSIZE).
    Sum,
    /// Arrays joined (KEYS).
    Concat,
    /// A random non-null reply (RANDOMKEY).
    AnyNonNull,
    /// Arrays of 0/1 combined with AND (SCRIPT EXISTS: loaded on every node).
    AllTrue,
    /// MGET: part `i` holds the values of the keys at `positions[i]`.
    Values { positions: Vec<Vec<usize>>, keys: usize },
    /// SCAN on shard `shard` of `shards`: the cursor says which shard comes next.
    Scan { shard: usize, shards: usize },
}

/// What a split command does per slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// MGET: keys → values, in order.
    Values,
    /// MSET: key/value pairs → OK.
    Pairs,
    /// DEL, UNLINK, EXISTS, TOUCH: keys → a count.
    Count,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The node that owns this slot.
    Slot(u16),
    /// Keys in several slots, split per slot and merged (as Envoy's redis_proxy does).
    Split(Split),
    /// Keys in several slots of a command that cannot be split: sent to the first key's
    /// node anyway, which refuses it — after its ACL check, so a login that may not run it
    /// hears `-NOPERM` first, as from Valkey itself.
    CrossSlot(u16),
    /// No key: one node, any.
    Any,
    /// The last node written to (WAIT, WAITAOF ask about its replicas).
    LastWritten,
    /// Every shard, replies merged.
    Fanout(Merge),
    /// Connection state (SELECT, HELLO, AUTH, CLIENT SETNAME …): every connection, and
    /// every one opened later.
    Setup,
    Scan,
    Multi,
    Exec,
    Discard,
    /// WATCH: its keys' slot.
    Watch(Option<u16>),
    Unwatch,
    /// (P)(UN)SUBSCRIBE: the session's subscriber connection (a cluster delivers every
    /// PUBLISH to every node).
    Subscribe,
    /// S(UN)SUBSCRIBE: the subscriber connection at the channel's shard (`None`: every one).
    ShardSubscribe(Option<u16>),
    /// A write on the reader endpoint.
    ReadOnly,
}

pub const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";
pub const READONLY: &[u8] = b"-READONLY You can't write against a read only replica.\r\n";

/// Keys that hash to several slots.
#[derive(Debug, PartialEq, Eq)]
pub struct SeveralSlots;

/// The one slot of `keys` (`None` without keys).
pub fn one_slot(keys: &[&[u8]]) -> Result<Option<u16>, SeveralSlots> {
    let mut slot = None;
    for key in keys {
        let s = key_slot(key);
        match slot {
            None => slot = Some(s),
            Some(prev) if prev != s => return Err(SeveralSlots),
            _ => {}
        }
    }
    Ok(slot)
}

/// Where `argv` (a command the session forwards) goes; `reader`: on the reader endpoint.
pub fn plan(spec: &CommandSpec, argv: &[&[u8]], reader: bool) -> Plan {
    let name = spec.name.as_str();
    if reader && spec.writes() {
        return Plan::ReadOnly;
    }
    match name {
        "select" | "hello" | "auth" | "readonly" | "readwrite" | "client|setname" | "client|setinfo"
        | "client|no-evict" | "client|no-touch" | "client|capa" => return Plan::Setup,
        "multi" => return Plan::Multi,
        "exec" => return Plan::Exec,
        "discard" => return Plan::Discard,
        "unwatch" => return Plan::Unwatch,
        "watch" => return Plan::Watch(one_slot(&spec.routing_keys(argv)).unwrap_or(None)),
        "subscribe" | "psubscribe" | "unsubscribe" | "punsubscribe" => return Plan::Subscribe,
        "ssubscribe" | "sunsubscribe" => {
            return match one_slot(&argv[1..]) {
                Ok(slot) => Plan::ShardSubscribe(slot),
                Err(SeveralSlots) => Plan::CrossSlot(key_slot(argv[1])),
            }
        }
        "scan" => return Plan::Scan,
        "dbsize" => return Plan::Fanout(Merge::Sum),
        "keys" => return Plan::Fanout(Merge::Concat),
        "randomkey" => return Plan::Fanout(Merge::AnyNonNull),
        "flushdb" | "script|flush" => return Plan::Fanout(Merge::AllOk),
        "script|load" => return Plan::Fanout(Merge::First),
        "script|exists" => return Plan::Fanout(Merge::AllTrue),
        "wait" | "waitaof" => return Plan::LastWritten,
        _ => {}
    }
    let keys = if name == "spublish" {
        argv.get(1).map(|c| vec![*c]).unwrap_or_default()
    } else {
        spec.routing_keys(argv)
    };
    match one_slot(&keys) {
        Ok(Some(slot)) => Plan::Slot(slot),
        Ok(None) => Plan::Any,
        Err(SeveralSlots) => match name {
            "mget" => Plan::Split(Split::Values),
            "mset" => Plan::Split(Split::Pairs),
            "del" | "unlink" | "exists" | "touch" => Plan::Split(Split::Count),
            _ => Plan::CrossSlot(key_slot(keys[0])),
        },
    }
}

/// The per-slot commands of a split one, and the positions (in the reply) of each's keys.
pub fn split(kind: Split, argv: &[&[u8]]) -> Vec<(u16, Vec<Vec<u8>>, Vec<usize>)> {
    let stride = if kind == Split::Pairs { 2 } else { 1 };
    let mut groups: Vec<(u16, Vec<Vec<u8>>, Vec<usize>)> = Vec::new();
    for (i, chunk) in argv[1..].chunks(stride).enumerate() {
        let slot = key_slot(chunk[0]);
        let at = match groups.iter().position(|g| g.0 == slot) {
            Some(at) => at,
            None => {
                groups.push((slot, vec![argv[0].to_vec()], Vec::new()));
                groups.len() - 1
            }
        };
        groups[at].1.extend(chunk.iter().map(|a| a.to_vec()));
        groups[at].2.push(i);
    }
    groups
}

/// A client's SCAN cursor holds the node's cursor and the shard it is on.
const SHARD_BITS: u32 = 10;

pub fn scan_cursor(client: u64) -> (u64, usize) {
    (client >> SHARD_BITS, (client & ((1 << SHARD_BITS) - 1)) as usize)
}

/// The client's cursor after a node answered `node` on shard `shard` of `shards`.
pub fn next_scan_cursor(node: u64, shard: usize, shards: usize) -> u64 {
    if node != 0 {
        (node << SHARD_BITS) | shard as u64
    } else if shard + 1 < shards {
        (shard + 1) as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(args: &[&str]) -> Plan {
        let argv: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let table = shoal_commands::table();
        let spec = table.lookup(argv[0], argv.get(1).copied()).unwrap();
        plan(spec, &argv, false)
    }

    #[test]
    fn commands_go_by_their_keys_slot() {
        assert_eq!(plan_of(&["get", "foo"]), Plan::Slot(key_slot(b"foo")));
        assert_eq!(plan_of(&["mget", "{u}a", "{u}b"]), Plan::Slot(key_slot(b"u")));
        assert_eq!(plan_of(&["mget", "a", "b"]), Plan::Split(Split::Values));
        assert_eq!(plan_of(&["mset", "a", "1", "b", "2"]), Plan::Split(Split::Pairs));
        assert_eq!(plan_of(&["del", "a", "b"]), Plan::Split(Split::Count));
        assert_eq!(plan_of(&["sunionstore", "d", "a", "b"]), Plan::CrossSlot(key_slot(b"d")));
        assert_eq!(plan_of(&["eval", "return 1", "2", "a", "b"]), Plan::CrossSlot(key_slot(b"a")));
        assert_eq!(plan_of(&["eval", "return 1", "0"]), Plan::Any);
        assert_eq!(plan_of(&["xread", "streams", "{s}1", "{s}2", "0", "0"]), Plan::Slot(key_slot(b"s")));
        assert_eq!(plan_of(&["zunionstore", "{z}d", "2", "{z}a", "{z}b"]), Plan::Slot(key_slot(b"z")));
        assert_eq!(plan_of(&["zunionstore", "d", "2", "{z}a", "{z}b"]), Plan::CrossSlot(key_slot(b"d")));
        assert_eq!(plan_of(&["ping"]), Plan::Any);
        assert_eq!(plan_of(&["dbsize"]), Plan::Fanout(Merge::Sum));
        assert_eq!(plan_of(&["spublish", "ch", "m"]), Plan::Slot(key_slot(b"ch")));
    }

    #[test]
    fn the_reader_endpoint_refuses_writes() {
        let table = shoal_commands::table();
        let set: Vec<&[u8]> = vec![b"set", b"k", b"v"];
        assert_eq!(plan(table.get("set").unwrap(), &set, true), Plan::ReadOnly);
        let get: Vec<&[u8]> = vec![b"get", b"k"];
        assert_eq!(plan(table.get("get").unwrap(), &get, true), Plan::Slot(key_slot(b"k")));
    }

    #[test]
    fn a_split_keeps_each_keys_place() {
        let argv: Vec<&[u8]> = vec![b"mset", b"a", b"1", b"b", b"2", b"{a}x", b"3"];
        let groups = split(Split::Pairs, &argv);
        assert_eq!(groups.len(), 2);
        assert_eq!(
            groups[0].1,
            vec![b"mset".to_vec(), b"a".to_vec(), b"1".to_vec(), b"{a}x".to_vec(), b"3".to_vec()]
        );
        assert_eq!(groups[0].2, vec![0, 2]);
        assert_eq!(groups[1].2, vec![1]);
    }

    #[test]
    fn scan_cursors_walk_every_shard_in_turn() {
        assert_eq!(scan_cursor(0), (0, 0));
        assert_eq!(next_scan_cursor(17, 0, 3), 17 << 10);
        assert_eq!(scan_cursor(17 << 10), (17, 0));
        assert_eq!(next_scan_cursor(0, 0, 3), 1);
        assert_eq!(scan_cursor(1), (0, 1));
        assert_eq!(next_scan_cursor(0, 2, 3), 0);
    }
}
