//! Observer connections: one per Valkey node, logged in as the node's read-only observer
//! user, for node-wide views (INFO, PUBSUB CHANNELS …) that the gateway filters down to one
//! cache. Tenants never reach these connections.

use crate::pubsub::NodeChannels;
use crate::resp::{self, reply::ReplyScanner};
use crate::GatewayError;
use bytes::BytesMut;
use shoal_types::TenantRoute;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(2);

type Slot = Arc<tokio::sync::Mutex<Option<TcpStream>>>;

/// Node-wide views that walk the whole node: `INFO keyspace` walks every database it has
/// (4–65 ms at 100,000), `PUBSUB CHANNELS` every channel with subscribers (110 ms at
/// 1,000,000), every cache on the node waiting meanwhile, and each tenant's `INFO` or
/// `PUBSUB CHANNELS` shows its part of one. On a big node a reply is reused until it is this
/// many times as old as it took to get, so tenants hold the node at most 1% of the time per
/// gateway and view; a smaller node is asked every time, as a plain Valkey would answer.
/// The time is the node's: until the reply's first byte (the gateway reading a long reply is
/// its own cost, not the node's).
const REUSE: u32 = 100;
/// Oldest a reused reply may be, however long the node took (then more than 1%).
const MAX_REUSE_AGE: Duration = Duration::from_secs(10);

/// Databases with keys in a node's `INFO keyspace` from which its walk is worth sparing: the
/// platform keeps keys in every 64th database (the engine's cron anchors), so a node
/// lists this many once it has about 4,000 databases, whose walk takes a millisecond or more.
const BIG_KEYSPACE: usize = 64;

/// Channels on a node from which its `PUBSUB CHANNELS` walk is worth sparing (about 0.1 ms).
const BIG_CHANNELS: usize = 1_000;

/// Node address → its last reply to a node-wide view: when it was asked, how long it took.
type Kept<T> = Mutex<HashMap<String, (Instant, Duration, T)>>;

#[derive(Default)]
pub struct Observers {
    by_node: Mutex<HashMap<String, Slot>>,
    keyspaces: Kept<BytesMut>,
    channels: Kept<Arc<NodeChannels>>,
    shard_channels: Kept<Arc<NodeChannels>>,
}

impl Observers {
    /// Sends one command to the route's node as the observer; returns the raw reply.
    pub async fn query(&self, route: &TenantRoute, args: &[&[u8]]) -> Result<BytesMut, GatewayError> {
        self.query_at(&route.node_addr, route, args).await
    }

    /// Sends one command to every node that holds part of the cache: its node, or each
    /// primary of its cluster. Node-wide views (keyspace, channels) are per node.
    pub async fn query_each(
        &self,
        route: &TenantRoute,
        args: &[&[u8]],
    ) -> Result<Vec<BytesMut>, GatewayError> {
        let mut replies = Vec::new();
        for addr in nodes_of(route).await? {
            replies.push(self.query_at(&addr, route, args).await?);
        }
        Ok(replies)
    }

    /// `INFO keyspace` of every node that holds part of the cache, a recent reply reused
    /// ([`REUSE`]).
    pub async fn keyspace_each(&self, route: &TenantRoute) -> Result<Vec<BytesMut>, GatewayError> {
        self.each_reused(route, &self.keyspaces, &[b"INFO", b"keyspace"], |reply| {
            let listed = reply[..].split(|&b| b == b'\n').filter(|l| l.starts_with(b"db")).count();
            Some((reply, listed >= BIG_KEYSPACE))
        })
        .await
    }

    /// The channels with subscribers (`shard`: shard channels) of every node that holds part
    /// of the cache, a recent listing reused ([`REUSE`]).
    pub async fn channels_each(
        &self,
        route: &TenantRoute,
        shard: bool,
    ) -> Result<Vec<Arc<NodeChannels>>, GatewayError> {
        let (kept, verb): (_, &[u8]) =
            if shard { (&self.shard_channels, b"SHARDCHANNELS") } else { (&self.channels, b"CHANNELS") };
        self.each_reused(route, kept, &[b"PUBSUB", verb], |reply| {
            let channels = NodeChannels::parse(&reply)?;
            let big = channels.count() >= BIG_CHANNELS;
            Some((Arc::new(channels), big))
        })
        .await
    }

    /// `args` on every node that holds part of the cache, as `read` makes of the reply (and
    /// whether the node is big enough to reuse it); a reply kept from a big node is reused
    /// until it is [`REUSE`] times as old as it took to get.
    async fn each_reused<T: Clone>(
        &self,
        route: &TenantRoute,
        kept: &Kept<T>,
        args: &[&[u8]],
        read: impl Fn(BytesMut) -> Option<(T, bool)>,
    ) -> Result<Vec<T>, GatewayError> {
        let mut out = Vec::new();
        for addr in nodes_of(route).await? {
            let slot = self.slot(&addr);
            // Under the node's slot: callers that found the reply old wait for one new one.
            let mut conn = slot.lock().await;
            let reused = kept.lock().unwrap().get(&addr).cloned();
            let value = match reused {
                Some((asked, took, value)) if asked.elapsed() < (took * REUSE).min(MAX_REUSE_AGE) => value,
                _ => {
                    let asked = Instant::now();
                    let (reply, answered) = self.query_on(&mut conn, &addr, route, args).await?;
                    let took = answered - asked;
                    let (value, big) = read(reply).ok_or_else(|| {
                        GatewayError::Upstream("unexpected reply to a node-wide view".into())
                    })?;
                    let mut kept = kept.lock().unwrap();
                    if big {
                        kept.insert(addr.clone(), (asked, took, value.clone()));
                    } else {
                        kept.remove(&addr);
                    }
                    value
                }
            };
            out.push(value);
        }
        Ok(out)
    }

    fn slot(&self, addr: &str) -> Slot {
        self.by_node.lock().unwrap().entry(addr.to_string()).or_default().clone()
    }

    async fn query_at(
        &self,
        addr: &str,
        route: &TenantRoute,
        args: &[&[u8]],
    ) -> Result<BytesMut, GatewayError> {
        let slot = self.slot(addr);
        let mut conn = slot.lock().await;
        Ok(self.query_on(&mut conn, addr, route, args).await?.0)
    }

    /// One command on the node's observer connection `conn` (its slot held), connecting first
    /// if it has none: the reply, and when its first byte came.
    async fn query_on(
        &self,
        conn: &mut Option<TcpStream>,
        addr: &str,
        route: &TenantRoute,
        args: &[&[u8]],
    ) -> Result<(BytesMut, Instant), GatewayError> {
        let result = tokio::time::timeout(TIMEOUT, async {
            if conn.is_none() {
                let mut stream = TcpStream::connect(addr).await.map_err(up)?;
                let mut hello = BytesMut::new();
                resp::command(
                    &mut hello,
                    &[b"AUTH", route.observer_user.as_bytes(), route.observer_password.as_bytes()],
                );
                stream.write_all(&hello).await.map_err(up)?;
                let (auth, _) = read_reply(&mut stream).await?;
                if auth.starts_with(b"-") {
                    return Err(GatewayError::Upstream("observer login refused".into()));
                }
                *conn = Some(stream);
            }
            let stream = conn.as_mut().expect("connected above");
            let mut out = BytesMut::new();
            resp::command(&mut out, args);
            stream.write_all(&out).await.map_err(up)?;
            read_reply(stream).await
        })
        .await
        .unwrap_or_else(|_| Err(GatewayError::Upstream("observer timed out".into())));
        if result.is_err() {
            *conn = None;
        }
        result
    }
}

/// The nodes that hold part of a cache: its node, or each primary of its cluster.
async fn nodes_of(route: &TenantRoute) -> Result<Vec<String>, GatewayError> {
    if route.cluster_nodes.is_empty() {
        return Ok(vec![route.node_addr.clone()]);
    }
    let seeds = crate::cluster_link::slot_map::Seeds::new(
        &route.cluster_nodes,
        &route.observer_user,
        &route.observer_password,
    );
    Ok(seeds.map().await?.shards.iter().map(|s| s.primary.clone()).collect())
}

/// `SCRIPT KILL` on the route's node, on a connection of its own (the shared one may wait
/// behind the busy script), as the observer. A node runs it only once the script has run
/// for its `busy-reply-threshold`: the wait is bounded above that.
///
/// On a cluster the script runs on its keys' shard: every primary is asked (the caller
/// knows no other cache of the cluster has a script in flight), and the one that ended it
/// answers.
pub async fn kill_script(route: &TenantRoute) -> Result<BytesMut, GatewayError> {
    let nodes = nodes_of(route).await?;
    let kills = nodes.iter().map(|addr| kill_script_at(addr, route));
    let replies = futures_util::future::join_all(kills).await;
    let mut first = None;
    for reply in replies {
        match reply {
            Ok(r) if r.starts_with(b"+OK") => return Ok(r),
            other => {
                first.get_or_insert(other);
            }
        }
    }
    first.unwrap_or_else(|| Err(GatewayError::Upstream("no primary".into())))
}

async fn kill_script_at(addr: &str, route: &TenantRoute) -> Result<BytesMut, GatewayError> {
    let kill = async {
        let mut stream = TcpStream::connect(addr).await.map_err(up)?;
        // One command at a time: `read_reply` keeps nothing past the reply it returns.
        for args in [
            &[&b"AUTH"[..], route.observer_user.as_bytes(), route.observer_password.as_bytes()][..],
            &[b"SCRIPT", b"KILL"],
        ] {
            let mut out = BytesMut::new();
            resp::command(&mut out, args);
            stream.write_all(&out).await.map_err(up)?;
            let (reply, _) = read_reply(&mut stream).await?;
            if args[0] == b"SCRIPT" {
                return Ok(reply);
            }
            if reply.starts_with(b"-") {
                return Err(GatewayError::Upstream("observer login refused".into()));
            }
        }
        unreachable!("SCRIPT KILL's reply returns")
    };
    tokio::time::timeout(Duration::from_secs(30), kill)
        .await
        .unwrap_or_else(|_| Err(GatewayError::Upstream("SCRIPT KILL timed out".into())))
}

fn up(e: std::io::Error) -> GatewayError {
    GatewayError::Upstream(e.to_string())
}

/// One reply, and when its first byte came.
async fn read_reply(stream: &mut TcpStream) -> Result<(BytesMut, Instant), GatewayError> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut scanner = ReplyScanner::new();
    let mut first = None;
    loop {
        if let Some(reply) = scanner.next(&buf).map_err(|e| GatewayError::Upstream(e.to_string()))? {
            return Ok((buf.split_to(reply.len), first.unwrap_or_else(Instant::now)));
        }
        if stream.read_buf(&mut buf).await.map_err(up)? == 0 {
            return Err(GatewayError::Upstream("observer connection closed".into()));
        }
        first.get_or_insert_with(Instant::now);
    }
}
