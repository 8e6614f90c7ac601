//! Which node owns which slot: read with `CLUSTER SHARDS` (as the observer user) from any
//! node of the cluster, shared by every session of this gateway on that cluster, and read
//! again when a node answers `MOVED` or goes away.

use crate::cluster::SLOTS;
use crate::resp::value::{self, Value};
use crate::GatewayError;
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// A map younger than this is not read again (many sessions see the same `MOVED`).
const MIN_AGE: Duration = Duration::from_millis(100);
/// For this long after a topology change, maps are read again every [`UNSETTLED_AGE`] even
/// without a reason: the nodes' views of a failover converge by gossip, and a map read
/// from a node that had not heard yet would otherwise send keyless requests to a replica.
const SETTLE: Duration = Duration::from_secs(5);
pub const UNSETTLED_AGE: Duration = Duration::from_millis(250);

/// One shard: its primary and its healthy replicas (`host:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub primary: String,
    pub replicas: Vec<String>,
}

#[derive(Debug)]
pub struct SlotMap {
    /// The shard of each slot (`u16::MAX`: no owner).
    owner: Vec<u16>,
    /// Ordered by their first slot, so indexes are stable while slots stay put.
    pub shards: Vec<Shard>,
    /// Every node the cluster lists, in any state: one missing was removed from it.
    members: Vec<String>,
    /// Changed by a `MOVED` since it was read: right for that slot, but its shards may be
    /// wrong (a promoted replica appears as a shard of its own beside its old primary).
    pub patched: bool,
    read_at: Instant,
}

impl SlotMap {
    /// The primary that owns `slot` (the first shard's while the slot has no owner).
    pub fn primary(&self, slot: u16) -> &str {
        &self.shard(slot).primary
    }

    pub fn shard(&self, slot: u16) -> &Shard {
        let i = self.owner[slot as usize];
        &self.shards[if i == u16::MAX { 0 } else { i as usize }]
    }

    /// The index of the shard that owns `slot`.
    pub fn shard_index(&self, slot: u16) -> usize {
        let i = self.owner[slot as usize];
        if i == u16::MAX {
            0
        } else {
            i as usize
        }
    }

    /// Whether the cluster lists the node at `addr` (failed, empty or serving).
    pub fn lists(&self, addr: &str) -> bool {
        self.members.iter().any(|m| m == addr)
    }

    /// When it was read.
    pub fn read_at(&self) -> Instant {
        self.read_at
    }

    /// Whether the node at `addr` is a primary that owns a slot: one that does not (a
    /// replica now, or drained) runs no write, and answers keyed commands with a redirect.
    pub fn serves(&self, addr: &str) -> bool {
        self.shards.iter().position(|s| s.primary == addr).is_some_and(|i| self.owner.contains(&(i as u16)))
    }

    /// The first slot shard `i` owns, if any.
    pub fn first_slot(&self, i: usize) -> Option<u16> {
        self.owner.iter().position(|&o| o as usize == i).map(|s| s as u16)
    }

    /// A copy with `slot` owned by the node at `addr` (what a `MOVED` says), until the next
    /// read.
    pub fn moved(&self, slot: u16, addr: &str) -> SlotMap {
        let mut shards = self.shards.clone();
        let i = match shards.iter().position(|s| s.primary == addr) {
            Some(i) => i,
            None => {
                shards.push(Shard { primary: addr.to_string(), replicas: Vec::new() });
                shards.len() - 1
            }
        };
        let mut owner = self.owner.clone();
        owner[slot as usize] = i as u16;
        SlotMap { owner, shards, members: self.members.clone(), patched: true, read_at: self.read_at }
    }

    /// Parses a `CLUSTER SHARDS` reply (RESP2 or RESP3) from the node at `asked`.
    fn parse(reply: &Value, asked: &str) -> Option<SlotMap> {
        // A node that never met a peer does not know its own IP (a one-node cluster).
        let asked_host = asked.rsplit_once(':').map_or(asked, |(host, _)| host);
        // (first slot, shard, its slot ranges)
        type Found = (u16, Shard, Vec<(u16, u16)>);
        let mut shards: Vec<Found> = Vec::new();
        let mut members = Vec::new();
        for shard in list(reply)? {
            let fields = pairs(shard)?;
            let mut ranges = Vec::new();
            let slots = list(fields.get("slots")?)?;
            for pair in slots.chunks(2) {
                let (Value::Int(a), Some(Value::Int(b))) = (&pair[0], pair.get(1)) else { return None };
                ranges.push((*a as u16, *b as u16));
            }
            let mut primary = None;
            let mut replicas = Vec::new();
            for node in list(fields.get("nodes")?)? {
                let node = pairs(node)?;
                let text = |k: &str| {
                    node.get(k).and_then(|v| v.as_bytes()).map(|b| String::from_utf8_lossy(b).into_owned())
                };
                let port = match node.get("port") {
                    Some(Value::Int(p)) => *p,
                    _ => continue,
                };
                let known = |k: &str| text(k).filter(|v| !v.is_empty() && v != "?");
                let ip = known("ip").or_else(|| known("endpoint")).unwrap_or_else(|| asked_host.to_string());
                let addr = format!("{ip}:{port}");
                let healthy = text("health").is_none_or(|h| h == "online");
                members.push(addr.clone());
                match text("role").as_deref() {
                    // A failed primary stays the owner until a replica takes over.
                    Some("master" | "primary") => primary = Some(addr),
                    Some("replica" | "slave") if healthy => replicas.push(addr),
                    _ => {}
                }
            }
            if ranges.is_empty() {
                continue; // an empty shard (being added or drained) owns nothing
            }
            let Some(primary) = primary else { continue };
            let first = ranges.iter().map(|r| r.0).min().unwrap_or(0);
            shards.push((first, Shard { primary, replicas }, ranges));
        }
        shards.sort_by_key(|s| s.0);
        let mut owner = vec![u16::MAX; SLOTS as usize];
        for (i, (_, _, ranges)) in shards.iter().enumerate() {
            for &(a, b) in ranges {
                for slot in a..=b.min(SLOTS - 1) {
                    owner[slot as usize] = i as u16;
                }
            }
        }
        if shards.is_empty() {
            return None;
        }
        Some(SlotMap {
            owner,
            shards: shards.into_iter().map(|s| s.1).collect(),
            members,
            patched: false,
            read_at: Instant::now(),
        })
    }
}

fn list(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

/// A RESP3 map or a RESP2 flat key/value array, by key.
fn pairs(v: &Value) -> Option<HashMap<String, &Value>> {
    let mut out = HashMap::new();
    match v {
        Value::Map(m) => {
            for (k, v) in m {
                out.insert(String::from_utf8_lossy(k.as_bytes()?).into_owned(), v);
            }
        }
        Value::Array(items) => {
            for kv in items.chunks(2) {
                out.insert(String::from_utf8_lossy(kv[0].as_bytes()?).into_owned(), kv.get(1)?);
            }
        }
        _ => return None,
    }
    Some(out)
}

/// Sends one command as `user` and decodes the reply.
pub(crate) async fn query(
    addr: &str,
    user: &str,
    password: &str,
    args: &[&[u8]],
) -> Result<Value, GatewayError> {
    let ask = async {
        let err = |e: std::io::Error| GatewayError::Upstream(format!("{addr}: {e}"));
        let mut stream = TcpStream::connect(addr).await.map_err(err)?;
        let mut out = BytesMut::new();
        crate::resp::command(&mut out, &[b"AUTH", user.as_bytes(), password.as_bytes()]);
        crate::resp::command(&mut out, args);
        stream.write_all(&out).await.map_err(err)?;
        let mut buf = BytesMut::with_capacity(4096);
        let mut replies = Vec::new();
        while replies.len() < 2 {
            match value::decode(&buf) {
                Some((v, n)) => {
                    let _ = buf.split_to(n);
                    replies.push(v);
                }
                None => {
                    if stream.read_buf(&mut buf).await.map_err(err)? == 0 {
                        return Err(GatewayError::Upstream(format!("{addr}: closed")));
                    }
                }
            }
        }
        match replies.pop() {
            Some(Value::Error(e)) => Err(GatewayError::Upstream(String::from_utf8_lossy(&e).into_owned())),
            Some(v) => Ok(v),
            None => unreachable!(),
        }
    };
    tokio::time::timeout(QUERY_TIMEOUT, ask)
        .await
        .map_err(|_| GatewayError::Upstream(format!("{addr}: timed out")))?
}

/// The gateway's slot maps, one per cluster (keyed by its node list).
fn maps() -> &'static Mutex<HashMap<String, Arc<SlotMap>>> {
    static MAPS: OnceLock<Mutex<HashMap<String, Arc<SlotMap>>>> = OnceLock::new();
    MAPS.get_or_init(Default::default)
}

/// When a session last saw each cluster's topology change (a node went away, a primary
/// refused a write as a replica), in [`millis`] (0: never): maps read before that are not
/// reused, however young. An atomic per cluster, read on every request without a lock.
fn changes() -> &'static Mutex<HashMap<String, Arc<AtomicU64>>> {
    static AT: OnceLock<Mutex<HashMap<String, Arc<AtomicU64>>>> = OnceLock::new();
    AT.get_or_init(Default::default)
}

/// Milliseconds since the first call, at least 1.
fn millis(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| Instant::now() - Duration::from_millis(1));
    t.saturating_duration_since(epoch).as_millis() as u64
}

/// Where a cluster is and how to read its map.
#[derive(Clone, Debug)]
pub struct Seeds {
    key: String,
    nodes: Vec<String>,
    user: String,
    password: String,
    /// The cluster's last topology change (see [`changes`]).
    changed: Arc<AtomicU64>,
}

impl Seeds {
    pub fn new(nodes: &[String], user: &str, password: &str) -> Seeds {
        let key = nodes.join(",");
        let changed = changes().lock().unwrap().entry(key.clone()).or_default().clone();
        Seeds { key, nodes: nodes.to_vec(), user: user.into(), password: password.into(), changed }
    }

    /// The current map: the shared one, read first if there is none.
    pub async fn map(&self) -> Result<Arc<SlotMap>, GatewayError> {
        if let Some(map) = maps().lock().unwrap().get(&self.key) {
            return Ok(map.clone());
        }
        self.refresh(None).await
    }

    /// The shared map, if it was read after `seen` (another session followed a `MOVED`).
    pub fn newer_than(&self, seen: &Arc<SlotMap>) -> Option<Arc<SlotMap>> {
        let current = maps().lock().unwrap().get(&self.key).cloned()?;
        (current.read_at > seen.read_at).then_some(current)
    }

    /// Whether `map` was read well after the last topology change ([`SETTLE`]).
    pub fn settled(&self, map: &SlotMap) -> bool {
        let at = self.changed.load(Ordering::Relaxed);
        at == 0 || millis(map.read_at) > at + SETTLE.as_millis() as u64
    }

    /// The topology changed (see [`changes`]): the next [`Seeds::refresh`] reads the map,
    /// once for every session.
    pub fn invalidate(&self) {
        self.changed.store(millis(Instant::now()), Ordering::Relaxed);
    }

    /// Reads the map again (unless `seen` is already older than the shared one or the
    /// shared one is very young, and either was read after the last [`Seeds::invalidate`]),
    /// asking the nodes in turn, the last map's first.
    pub async fn refresh(&self, seen: Option<&Arc<SlotMap>>) -> Result<Arc<SlotMap>, GatewayError> {
        let current = maps().lock().unwrap().get(&self.key).cloned();
        let changed = self.changed.load(Ordering::Relaxed);
        if let Some(current) = current.filter(|c| millis(c.read_at) > changed) {
            let newer = seen.is_some_and(|s| !Arc::ptr_eq(s, &current) && s.read_at <= current.read_at);
            if newer || current.read_at.elapsed() < MIN_AGE {
                return Ok(current);
            }
        }
        self.reread().await
    }

    /// Reads the map now, asking the nodes in turn, the last map's primaries first; then
    /// checks it with its primaries ([`Seeds::checked`]).
    pub async fn reread(&self) -> Result<Arc<SlotMap>, GatewayError> {
        let current = maps().lock().unwrap().get(&self.key).cloned();
        let mut order: Vec<&String> = Vec::new();
        if let Some(c) = &current {
            order.extend(c.shards.iter().map(|s| &s.primary));
        }
        order.extend(self.nodes.iter());
        let mut last = GatewayError::Upstream("no cluster node answered".into());
        for addr in order {
            match self.read_at(addr).await {
                Ok(map) => {
                    let map = Arc::new(self.checked(map).await);
                    maps().lock().unwrap().insert(self.key.clone(), map.clone());
                    return Ok(map);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn read_at(&self, addr: &str) -> Result<SlotMap, GatewayError> {
        let reply = query(addr, &self.user, &self.password, &[b"CLUSTER", b"SHARDS"]).await?;
        SlotMap::parse(&reply, addr)
            .ok_or_else(|| GatewayError::Upstream(format!("{addr}: unreadable CLUSTER SHARDS")))
    }

    /// `map` as its primaries see it: a node's view of others lags a failover (gossip), its
    /// own role does not. A primary of `map` that says it is not one now (`ROLE`: a replica,
    /// or restarting, or loading) is asked for its view, or one of its shard's replicas that
    /// says it is the primary; that view is taken instead and checked the same way (a few
    /// times at most). Where nobody says otherwise, `map` stands.
    async fn checked(&self, mut map: SlotMap) -> SlotMap {
        for _ in 0..3 {
            let mut better = None;
            'shards: for shard in &map.shards {
                match self.role(&shard.primary).await.as_deref() {
                    Some("master") => continue,
                    Some("slave") => {
                        better = Some(shard.primary.clone());
                        break;
                    }
                    _ => {}
                }
                for replica in &shard.replicas {
                    if self.role(replica).await.as_deref() == Some("master") {
                        better = Some(replica.clone());
                        break 'shards;
                    }
                }
            }
            let Some(addr) = better else { return map };
            match self.read_at(&addr).await {
                Ok(newer) => map = newer,
                Err(_) => return map,
            }
        }
        map
    }

    /// What the node at `addr` says it is (`master`, `slave`); None if it does not say.
    async fn role(&self, addr: &str) -> Option<String> {
        match query(addr, &self.user, &self.password, &[b"ROLE"]).await {
            Ok(Value::Array(items)) => {
                items.first().and_then(|v| v.as_bytes()).map(|r| String::from_utf8_lossy(r).into_owned())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::bulk(s)
    }

    fn node(port: i64, role: &str, health: &str) -> Value {
        Value::Array(vec![
            b("id"),
            b("x"),
            b("port"),
            Value::Int(port),
            b("ip"),
            b("127.0.0.1"),
            b("role"),
            b(role),
            b("health"),
            b(health),
        ])
    }

    #[test]
    fn a_shards_reply_gives_each_slot_its_primary() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                b("slots"),
                Value::Array(vec![Value::Int(8192), Value::Int(16383)]),
                b("nodes"),
                Value::Array(vec![node(7001, "master", "online"), node(7004, "replica", "online")]),
            ]),
            Value::Array(vec![
                b("slots"),
                Value::Array(vec![Value::Int(0), Value::Int(8191)]),
                b("nodes"),
                Value::Array(vec![node(7002, "replica", "failed"), node(7000, "master", "online")]),
            ]),
            // An empty shard owns nothing.
            Value::Array(vec![
                b("slots"),
                Value::Array(vec![]),
                b("nodes"),
                Value::Array(vec![node(7009, "master", "online")]),
            ]),
        ]);
        let map = SlotMap::parse(&reply, "127.0.0.1:7000").unwrap();
        assert_eq!(map.shards.len(), 2);
        assert_eq!(map.primary(0), "127.0.0.1:7000");
        assert_eq!(map.primary(8191), "127.0.0.1:7000");
        assert_eq!(map.primary(8192), "127.0.0.1:7001");
        assert_eq!(map.shard(0).replicas, Vec::<String>::new(), "a failed replica is not offered");
        assert_eq!(map.shard(9000).replicas, vec!["127.0.0.1:7004".to_string()]);
        assert!(
            map.lists("127.0.0.1:7002") && map.lists("127.0.0.1:7009"),
            "failed and empty nodes are listed"
        );
        assert!(!map.lists("127.0.0.1:7003"));
        let moved = map.moved(5, "127.0.0.1:7001");
        assert_eq!(moved.primary(5), "127.0.0.1:7001");
        assert_eq!(moved.primary(6), "127.0.0.1:7000");
    }

    #[test]
    fn a_node_that_does_not_know_its_ip_is_where_it_was_asked() {
        let lonely = Value::Array(vec![b("port"), Value::Int(7005), b("ip"), b(""), b("role"), b("master")]);
        let reply = Value::Array(vec![Value::Array(vec![
            b("slots"),
            Value::Array(vec![Value::Int(0), Value::Int(16383)]),
            b("nodes"),
            Value::Array(vec![lonely]),
        ])]);
        assert_eq!(SlotMap::parse(&reply, "10.0.0.9:7005").unwrap().primary(42), "10.0.0.9:7005");
    }
}
