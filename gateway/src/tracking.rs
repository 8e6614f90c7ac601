//! Client-side caching (`CLIENT TRACKING`), built by the gateway.
//!
//! Valkey's own tracking table is keyed by key name across all databases, so on a shared
//! node it would tell one cache about another cache's writes. Instead, the gateway follows
//! each tracked cache's databases through keyspace events (an observer connection per node,
//! `PSUBSCRIBE __keyspace@<db>__:*`) and sends the invalidations itself: to clients that read
//! a key (default mode), or whose prefixes match (BCAST), possibly redirected to another
//! connection of the same cache. Events and writes seen on other gateways arrive through
//! the node's events, so a fleet of gateways stays coherent.
//!
//! As Valkey does: default mode gets one message per key, as each event arrives; BCAST gets
//! one message per prefix with its keys sorted and deduplicated, for each read of the
//! node's events (Valkey: per event-loop iteration). A session that tracks itself asks for
//! a [`Tracker::sync`] after each of its writes: a `PING` on the observer connections, whose
//! `PONG` comes once every event published before it has been turned into invalidations, so
//! the session can send the write's invalidations after its reply and before the next one.

use crate::clients::{Invalidation, Registry, Tracking};
use crate::control_plane::ControlPlane;
use crate::resp::{self, reply::ReplyScanner, value};
use crate::GatewayError;
use bytes::BytesMut;
use shoal_types::{CacheId, TenantRoute};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// How often a cluster node's role is asked (a promoted replica's events count from then).
const ROLE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a NOLOOP client's own write suppresses the invalidation it causes, at most
/// (a sync after the write ends it sooner).
const OWN_WRITE_WINDOW: Duration = Duration::from_secs(2);
/// How long a session waits for a sync (the node's events lost: its clients were told to
/// drop everything anyway).
const SYNC_TIMEOUT: Duration = Duration::from_secs(1);

/// A session's wait for the node's events to be followed up to now.
pub type Sync = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Default)]
pub struct Tracker {
    nodes: Mutex<HashMap<String, NodeWatch>>,
    /// Caches whose node was asked to publish keyspace events.
    enabled: tokio::sync::Mutex<HashSet<CacheId>>,
}

struct NodeWatch {
    dbs: Arc<Mutex<HashMap<u32, CacheId>>>,
    subscribe: mpsc::UnboundedSender<u32>,
    sync: mpsc::UnboundedSender<oneshot::Sender<()>>,
    ready: Arc<Ready>,
}

/// Databases whose keyspace subscription Valkey has confirmed on the current connection.
#[derive(Default)]
struct Ready {
    dbs: Mutex<HashSet<u32>>,
    changed: tokio::sync::Notify,
}

/// How long `CLIENT TRACKING ON` waits for the node's events to be followed.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

impl Tracker {
    /// Makes sure the cache's databases are followed on its node.
    pub async fn watch(
        &self,
        control_plane: &ControlPlane,
        clients: &Arc<Registry>,
        route: &TenantRoute,
    ) -> Result<(), GatewayError> {
        {
            let mut enabled = self.enabled.lock().await;
            if !enabled.contains(&route.cache_id) {
                control_plane.enable_client_tracking(&route.cache_id).await?;
                enabled.insert(route.cache_id.clone());
            }
        }
        // On a cluster every node is followed, replicas too: events are local to the node
        // that holds the key, and a replica promoted by a failover is already followed.
        let addrs = match route.cluster_nodes.is_empty() {
            true => vec![route.node_addr.clone()],
            false => route.cluster_nodes.clone(),
        };
        for addr in addrs {
            let node_route = TenantRoute { node_addr: addr, ..route.clone() };
            self.watch_node(clients, &node_route).await?;
        }
        Ok(())
    }

    async fn watch_node(&self, clients: &Arc<Registry>, route: &TenantRoute) -> Result<(), GatewayError> {
        let ready = {
            let mut nodes = self.nodes.lock().unwrap();
            let watch = nodes.entry(route.node_addr.clone()).or_insert_with(|| {
                let dbs = Arc::new(Mutex::new(HashMap::new()));
                let ready = Arc::new(Ready::default());
                let (subscribe, rx) = mpsc::unbounded_channel();
                let (sync, syncs) = mpsc::unbounded_channel();
                let links = Links { subscribe: rx, syncs };
                tokio::spawn(follow_node(clients.clone(), route.clone(), dbs.clone(), ready.clone(), links));
                NodeWatch { dbs, subscribe, sync, ready }
            });
            let mut dbs = watch.dbs.lock().unwrap();
            for db in route.db..route.db + route.databases {
                if dbs.insert(db, route.cache_id.clone()).is_none() {
                    let _ = watch.subscribe.send(db);
                }
            }
            watch.ready.clone()
        };
        // Only answer once the node's events are followed, so no write slips through.
        let wait = async {
            loop {
                let changed = ready.changed.notified();
                let all = {
                    let subscribed = ready.dbs.lock().unwrap();
                    (route.db..route.db + route.databases).all(|db| subscribed.contains(&db))
                };
                if all {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(READY_TIMEOUT, wait)
            .await
            .map_err(|_| GatewayError::Upstream("keyspace events not followed in time".into()))
    }

    /// Completes once the events the cache's nodes published until now have been turned
    /// into invalidations (delivered to the sessions' inboxes): after a write's reply, the
    /// write's own invalidations are there. At most `SYNC_TIMEOUT`.
    pub fn sync(&self, cache: &CacheId) -> Sync {
        let mut waits = Vec::new();
        for watch in self.nodes.lock().unwrap().values() {
            if watch.dbs.lock().unwrap().values().any(|c| c == cache) {
                let (tx, rx) = oneshot::channel();
                if watch.sync.send(tx).is_ok() {
                    waits.push(rx);
                }
            }
        }
        Box::pin(async move {
            let all = async {
                for rx in waits {
                    let _ = rx.await;
                }
            };
            let _ = tokio::time::timeout(SYNC_TIMEOUT, all).await;
        })
    }
}

/// What a node's follower is asked, kept across its reconnections.
struct Links {
    subscribe: mpsc::UnboundedReceiver<u32>,
    syncs: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
}

/// BCAST invalidations gathered over one read of a node's events: per client (registry
/// key), per prefix, the keys (sorted, each once), as Valkey sends them.
#[derive(Default)]
pub struct Gathered {
    clients: BTreeMap<u64, (CacheId, PrefixKeys)>,
}

/// A BCAST client's keys per prefix.
type PrefixKeys = BTreeMap<Vec<u8>, BTreeSet<Vec<u8>>>;

impl Gathered {
    /// Sends what was gathered.
    pub fn flush(&mut self, clients: &Registry) {
        for (key, (cache, prefixes)) in std::mem::take(&mut self.clients) {
            let entries = clients.list(&cache);
            let Some(entry) = entries.iter().find(|e| e.key == key) else { continue };
            let tracking = entry.tracking.lock().unwrap();
            let Some(t) = tracking.as_ref().filter(|t| t.bcast) else { continue };
            for keys in prefixes.into_values() {
                deliver(&entries, key, t, Invalidation::Keys(keys.into_iter().collect()));
            }
        }
    }
}

/// Follows one node's keyspace events for the databases in `dbs`, reconnecting as needed.
/// While disconnected, events may be missed: every tracking client of the node's caches is
/// told to drop everything.
async fn follow_node(
    clients: Arc<Registry>,
    route: TenantRoute,
    dbs: Arc<Mutex<HashMap<u32, CacheId>>>,
    ready: Arc<Ready>,
    mut links: Links,
) {
    loop {
        ready.dbs.lock().unwrap().clear();
        if let Err(e) = follow_once(&clients, &route, &dbs, &ready, &mut links).await {
            tracing::warn!(node = %route.node_addr, error = %e, "keyspace events lost; invalidating tracked clients");
        }
        let caches: HashSet<CacheId> = dbs.lock().unwrap().values().cloned().collect();
        for cache in caches {
            invalidate_all(&clients, &cache);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn follow_once(
    clients: &Registry,
    route: &TenantRoute,
    dbs: &Mutex<HashMap<u32, CacheId>>,
    ready: &Ready,
    links: &mut Links,
) -> Result<(), GatewayError> {
    let up = |e: std::io::Error| GatewayError::Upstream(e.to_string());
    let mut stream = TcpStream::connect(&route.node_addr).await.map_err(up)?;
    let mut out = BytesMut::new();
    resp::command(&mut out, &[b"AUTH", route.observer_user.as_bytes(), route.observer_password.as_bytes()]);
    // A cluster's nodes are all followed (a replica promoted by a failover already is), but
    // only a primary's events count: a replica tells of the same writes again. RESP3 lets
    // the subscribed connection ask ROLE.
    let cluster = !route.cluster_nodes.is_empty();
    let mut role_every = tokio::time::interval(ROLE_INTERVAL);
    let mut primary: Option<bool> = None;
    if cluster {
        resp::command(&mut out, &[b"HELLO", b"3"]);
        resp::command(&mut out, &[b"ROLE"]);
    }
    let known: Vec<u32> = dbs.lock().unwrap().keys().copied().collect();
    for db in known {
        resp::command(&mut out, &[b"PSUBSCRIBE", format!("__keyspace@{db}__:*").as_bytes()]);
    }
    stream.write_all(&out).await.map_err(up)?;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut scanner = ReplyScanner::new();
    let mut gathered = Gathered::default();
    // Syncs waiting for their PING's answer, in order (dropped with the connection: their
    // sessions stop waiting, and every tracking client was told to drop everything).
    let mut pings: VecDeque<Vec<oneshot::Sender<()>>> = VecDeque::new();
    loop {
        tokio::select! {
            _ = role_every.tick(), if cluster => {
                let mut out = BytesMut::new();
                resp::command(&mut out, &[b"ROLE"]);
                stream.write_all(&out).await.map_err(up)?;
            }
            sync = links.syncs.recv() => {
                let Some(sync) = sync else { return Ok(()) };
                let mut batch = vec![sync];
                while let Ok(more) = links.syncs.try_recv() {
                    batch.push(more);
                }
                let mut out = BytesMut::new();
                resp::command(&mut out, &[b"PING"]);
                stream.write_all(&out).await.map_err(up)?;
                pings.push_back(batch);
            }
            db = links.subscribe.recv() => {
                let Some(db) = db else { return Ok(()) };
                let mut out = BytesMut::new();
                resp::command(&mut out, &[b"PSUBSCRIBE", format!("__keyspace@{db}__:*").as_bytes()]);
                stream.write_all(&out).await.map_err(up)?;
            }
            n = stream.read_buf(&mut buf) => {
                if n.map_err(up)? == 0 {
                    return Err(GatewayError::Upstream("observer connection closed".into()));
                }
                while let Some(reply) = scanner.next(&buf).map_err(|e| GatewayError::Upstream(e.to_string()))? {
                    let frame = buf.split_to(reply.len);
                    if reply.error {
                        return Err(GatewayError::Upstream(String::from_utf8_lossy(&frame).trim().to_string()));
                    }
                    if is_pong(&frame) {
                        // Every event before it is handled: the syncs that wait for it are done.
                        gathered.flush(clients);
                        for done in pings.pop_front().unwrap_or_default() {
                            let _ = done.send(());
                        }
                        continue;
                    }
                    if cluster {
                        if let Some((value::Value::Array(items), _)) = value::decode(&frame) {
                            // A ROLE reply (events are pushes in RESP3).
                            let now_primary = items.first().and_then(value::Value::as_bytes) == Some(b"master");
                            if primary == Some(false) && now_primary {
                                // Promoted: what it applied before this was seen was not
                                // followed; its caches' clients drop everything.
                                let caches: HashSet<CacheId> = dbs.lock().unwrap().values().cloned().collect();
                                for cache in caches {
                                    invalidate_all(clients, &cache);
                                }
                            }
                            primary = Some(now_primary);
                            continue;
                        }
                        if primary != Some(true) && is_keyspace_message(&frame) {
                            continue;
                        }
                    }
                    on_event(clients, dbs, ready, &frame, &mut gathered);
                }
                gathered.flush(clients);
            }
        }
    }
}

/// The answer to a sync's `PING`: `pong` in RESP2 (subscribed), `+PONG` in RESP3.
fn is_pong(frame: &[u8]) -> bool {
    frame == b"+PONG\r\n" || frame.starts_with(b"*2\r\n$4\r\npong\r\n")
}

/// A keyspace event (not a confirmation), RESP2 or RESP3.
fn is_keyspace_message(frame: &[u8]) -> bool {
    matches!(value::decode(frame), Some((value::Value::Array(items) | value::Value::Push(items), _))
        if items.first().and_then(value::Value::as_bytes) == Some(b"pmessage"))
}

/// `pmessage <pattern> __keyspace@<db>__:<key> <event>` → invalidations;
/// `psubscribe __keyspace@<db>__:* <n>` → the database is followed.
fn on_event(
    clients: &Registry,
    dbs: &Mutex<HashMap<u32, CacheId>>,
    ready: &Ready,
    frame: &[u8],
    gathered: &mut Gathered,
) {
    let Some((value::Value::Array(items) | value::Value::Push(items), _)) = value::decode(frame) else {
        return;
    };
    let kind = items.first().and_then(value::Value::as_bytes);
    if kind == Some(b"psubscribe") {
        let pattern = items.get(1).and_then(value::Value::as_bytes).unwrap_or_default();
        let db = pattern.strip_prefix(b"__keyspace@").and_then(|r| r.strip_suffix(b"__:*"));
        if let Some(db) = db.and_then(|d| std::str::from_utf8(d).ok()).and_then(|d| d.parse().ok()) {
            ready.dbs.lock().unwrap().insert(db);
            ready.changed.notify_waiters();
        }
        return;
    }
    if kind != Some(b"pmessage") {
        return;
    }
    let Some(channel) = items.get(2).and_then(value::Value::as_bytes) else { return };
    let Some(rest) = channel.strip_prefix(b"__keyspace@") else { return };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let Some(key) = rest[digits..].strip_prefix(b"__:") else { return };
    let Some(db) = std::str::from_utf8(&rest[..digits]).ok().and_then(|d| d.parse::<u32>().ok()) else {
        return;
    };
    let cache = dbs.lock().unwrap().get(&db).cloned();
    let event = items.get(3).and_then(value::Value::as_bytes).unwrap_or_default();
    if let Some(cache) = cache {
        if event == b"flushdb" {
            gathered.flush(clients);
            invalidate_all(clients, &cache);
        } else {
            key_changed(clients, &cache, key, gathered);
        }
    }
}

/// A key of `cache` changed: tell every client that tracks it (BCAST clients once the
/// read of events it came in is handled, see [`Gathered`]).
pub fn key_changed(clients: &Registry, cache: &CacheId, key: &[u8], gathered: &mut Gathered) {
    let entries = clients.list(cache);
    for entry in &entries {
        let mut tracking = entry.tracking.lock().unwrap();
        let Some(t) = tracking.as_mut() else { continue };
        // The key stops being tracked, whoever wrote it (as in Valkey, NOLOOP's own writes too).
        let tracked = !t.bcast && t.keys.remove(key);
        if t.noloop {
            if let Some(at) = t.own_writes.remove(key) {
                if at.elapsed() < OWN_WRITE_WINDOW {
                    continue;
                }
            }
        }
        if t.bcast {
            let matching = t.prefixes.iter().filter(|p| key.starts_with(p));
            let prefixes: Vec<&[u8]> = match t.prefixes.is_empty() {
                true => vec![&b""[..]],
                false => matching.map(Vec::as_slice).collect(),
            };
            if prefixes.is_empty() {
                continue;
            }
            let (_, groups) =
                gathered.clients.entry(entry.key).or_insert_with(|| (cache.clone(), BTreeMap::new()));
            for p in prefixes {
                groups.entry(p.to_vec()).or_default().insert(key.to_vec());
            }
        } else if tracked {
            deliver(&entries, entry.key, t, Invalidation::Keys(vec![key.to_vec()]));
        }
    }
}

/// Every tracking client of `cache` drops everything (flush, or events lost).
pub fn invalidate_all(clients: &Registry, cache: &CacheId) {
    let entries = clients.list(cache);
    for entry in &entries {
        let mut tracking = entry.tracking.lock().unwrap();
        if let Some(t) = tracking.as_mut() {
            t.keys.clear();
            deliver(&entries, entry.key, t, Invalidation::All);
        }
    }
}

fn deliver(entries: &[Arc<crate::clients::ClientEntry>], own: u64, t: &Tracking, msg: Invalidation) {
    let target = t.redirect.unwrap_or(own);
    if let Some(e) = entries.iter().find(|e| e.key == target) {
        let _ = e.inbox.send(msg);
    }
}

/// The session's writes have been synced: their events are all seen, so a NOLOOP client's
/// note of them is done.
pub fn own_writes_seen(t: &mut Tracking, keys: &[Vec<u8>]) {
    for k in keys {
        t.own_writes.remove(k);
    }
}

/// Records what a forwarded command means for the client's tracking state.
pub fn note_command(t: &mut Tracking, spec: &shoal_commands::CommandSpec, keys: &[Vec<u8>]) {
    let caching = t.caching.take();
    if spec.readonly && !t.bcast {
        let cache_it = if t.optin {
            caching == Some(true)
        } else if t.optout {
            caching != Some(false)
        } else {
            true
        };
        if cache_it {
            t.keys.extend(keys.iter().cloned());
        }
    }
    if t.noloop && spec.write {
        let now = Instant::now();
        t.own_writes.retain(|_, at| at.elapsed() < OWN_WRITE_WINDOW);
        t.own_writes.extend(keys.iter().map(|k| (k.clone(), now)));
    }
}

/// The frame a client gets for an invalidation, in its protocol.
pub fn encode(msg: &Invalidation, proto: u8, out: &mut BytesMut) {
    let keys = match msg {
        Invalidation::Keys(keys) => value::Value::Array(keys.iter().map(value::Value::bulk).collect()),
        Invalidation::All => value::Value::Null,
    };
    let frame = if proto >= 3 {
        value::Value::Push(vec![value::Value::bulk("invalidate"), keys])
    } else {
        value::Value::Array(vec![
            value::Value::bulk("message"),
            value::Value::bulk("__redis__:invalidate"),
            keys,
        ])
    };
    value::encode(&frame, proto, out);
}
