//! Which clients each cache has on this gateway: for `CLIENT LIST`, `CLIENT KILL`,
//! `INFO clients` and the per-cache connection limit. In memory only.

use shoal_types::CacheId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, Notify};

/// An invalidation for a client that uses client-side caching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    Keys(Vec<Vec<u8>>),
    /// Everything (a flush, or the gateway lost track of the node's events).
    All,
}

/// A client's `CLIENT TRACKING` state.
#[derive(Debug, Default)]
pub struct Tracking {
    pub bcast: bool,
    pub prefixes: Vec<Vec<u8>>,
    pub optin: bool,
    pub optout: bool,
    pub noloop: bool,
    /// Registry key of the client that receives the invalidations instead.
    pub redirect: Option<u64>,
    /// Keys the client read (default mode): each is invalidated once.
    pub keys: std::collections::HashSet<Vec<u8>>,
    /// `CLIENT CACHING yes|no` for the next command.
    pub caching: Option<bool>,
    /// Keys this client wrote recently (NOLOOP), with when.
    pub own_writes: HashMap<Vec<u8>, Instant>,
}

/// One authenticated client connection.
pub struct ClientEntry {
    /// Gateway-local key.
    pub key: u64,
    /// What `CLIENT ID` answers: numbered per cache on this gateway, so that ids reveal
    /// nothing about other caches' connections (Valkey's own ids count the whole node's).
    pub id: AtomicI64,
    pub addr: String,
    pub laddr: String,
    pub created: Instant,
    pub name: Mutex<Vec<u8>>,
    /// The id of the token the client logged in with (revocation closes the connection).
    pub jti: Mutex<String>,
    /// `CLIENT SETINFO LIB-NAME` / `LIB-VER`.
    pub lib: Mutex<(Vec<u8>, Vec<u8>)>,
    /// The cache's database (0-based) the client has selected.
    pub db: AtomicU32,
    pub proto: AtomicU8,
    /// Seconds since `created` of the last command.
    pub last_active: AtomicU64,
    pub commands: AtomicU64,
    /// The client's pub/sub patterns (matched by the gateway), for PUBLISH's receiver count.
    pub patterns: Mutex<Vec<Arc<crate::pubsub::Glob>>>,
    /// Notified by `CLIENT KILL` from another connection of the same cache.
    pub kill: Arc<Notify>,
    pub tracking: Mutex<Option<Tracking>>,
    /// Invalidations for this client's connection.
    pub inbox: mpsc::UnboundedSender<Invalidation>,
}

impl ClientEntry {
    /// A `CLIENT LIST` line (fields as Valkey prints them; memory fields are not tracked).
    pub fn list_line(&self) -> String {
        let age = self.created.elapsed().as_secs();
        let (lib_name, lib_ver) = self.lib.lock().unwrap().clone();
        let idle = age.saturating_sub(self.last_active.load(Ordering::Relaxed));
        format!(
            "id={} addr={} laddr={} fd=-1 name={} age={} idle={} flags=N db={} sub=0 psub=0 ssub=0 multi=-1 \
             watch=0 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 tot-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 \
             events=r cmd=NULL user=default redir=-1 resp={} lib-name={} lib-ver={}\n",
            self.id.load(Ordering::Relaxed),
            self.addr,
            self.laddr,
            String::from_utf8_lossy(&self.name.lock().unwrap()),
            age,
            idle,
            self.db.load(Ordering::Relaxed),
            self.proto.load(Ordering::Relaxed),
            String::from_utf8_lossy(&lib_name),
            String::from_utf8_lossy(&lib_ver),
        )
    }
}

#[derive(Default)]
struct CacheClients {
    live: HashMap<u64, Arc<ClientEntry>>,
    connections_received: u64,
    last_id: i64,
    /// Commands of clients that have left.
    commands_done: u64,
    /// Most clients `live` held at once since the last usage batch (see [`Registry::take_peaks`]).
    peak: usize,
    /// Blocked clients, commandstats, errorstats, ECPU (kept while the gateway runs).
    stats: Arc<crate::cache_stats::CacheStats>,
    /// The clients' upstream subscriptions (see [`crate::pubsub::ChannelShare`]).
    channels: Arc<AtomicI64>,
}

type Caches = Mutex<HashMap<CacheId, CacheClients>>;

#[derive(Default)]
pub struct Registry {
    caches: Arc<Caches>,
    next_key: AtomicU64,
}

/// The registry's lock. Nothing slow runs under it, but a panic elsewhere must not turn
/// every later login on the gateway into one: a poisoned lock is used as it is.
fn lock(caches: &Caches) -> std::sync::MutexGuard<'_, HashMap<CacheId, CacheClients>> {
    caches.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A client's place in the registry (one of its cache's connection slots on this gateway).
/// Dropping it gives the slot back, so it is released however the session ends: normally,
/// with a cancelled login, or by a panic.
pub struct Registration {
    caches: Arc<Caches>,
    cache: CacheId,
    entry: Arc<ClientEntry>,
}

impl Registration {
    pub fn entry(&self) -> &Arc<ClientEntry> {
        &self.entry
    }

    /// The cache's `INFO` counters on this gateway.
    pub fn stats(&self) -> Arc<crate::cache_stats::CacheStats> {
        lock(&self.caches).get(&self.cache).map(|c| c.stats.clone()).unwrap_or_default()
    }

    /// The cache's count of upstream subscriptions on this gateway, for a session's share.
    pub fn channels(&self) -> crate::pubsub::ChannelShare {
        let total = lock(&self.caches).get(&self.cache).map(|c| c.channels.clone()).unwrap_or_default();
        crate::pubsub::ChannelShare::new(total)
    }
}

impl std::ops::Deref for Registration {
    type Target = ClientEntry;
    fn deref(&self) -> &ClientEntry {
        &self.entry
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        remove(&self.caches, &self.cache, &self.entry);
    }
}

fn remove(caches: &Caches, cache: &CacheId, entry: &ClientEntry) {
    let mut caches = lock(caches);
    if let Some(clients) = caches.get_mut(cache) {
        if clients.live.remove(&entry.key).is_some() {
            crate::metrics::connection_closed(cache);
            clients.commands_done += entry.commands.load(Ordering::Relaxed);
        }
    }
}

/// What `INFO` shows of one cache's clients on this gateway.
pub struct CacheCounts {
    pub connected: usize,
    pub connections_received: u64,
    pub commands: u64,
    /// Clients waiting in a blocking command (BLPOP, XREAD … BLOCK, WAIT …).
    pub blocked: u64,
}

impl Registry {
    /// Adds a client unless the cache already has `max` on this gateway; the client stays
    /// until its [`Registration`] is dropped (or [`Registry::unregister`]).
    pub fn register(
        &self,
        cache: &CacheId,
        max: usize,
        addr: String,
        laddr: String,
    ) -> Option<(Registration, mpsc::UnboundedReceiver<Invalidation>)> {
        let mut caches = lock(&self.caches);
        let clients = caches.entry(cache.clone()).or_default();
        if clients.live.len() >= max {
            return None;
        }
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        clients.last_id += 1;
        let entry = Arc::new(ClientEntry {
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
            id: AtomicI64::new(clients.last_id),
            addr,
            laddr,
            created: Instant::now(),
            name: Mutex::new(Vec::new()),
            jti: Mutex::new(String::new()),
            lib: Mutex::new((Vec::new(), Vec::new())),
            db: AtomicU32::new(0),
            proto: AtomicU8::new(2),
            last_active: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            patterns: Mutex::new(Vec::new()),
            kill: Arc::default(),
            tracking: Mutex::new(None),
            inbox,
        });
        clients.live.insert(entry.key, entry.clone());
        clients.peak = clients.peak.max(clients.live.len());
        clients.connections_received += 1;
        crate::metrics::connection_opened(cache);
        let registration = Registration { caches: self.caches.clone(), cache: cache.clone(), entry };
        Some((registration, inbox_rx))
    }

    pub fn unregister(&self, cache: &CacheId, entry: &ClientEntry) {
        remove(&self.caches, cache, entry);
    }

    /// Closes every connection that logged in with one of these token ids.
    pub fn kill_by_token(&self, jtis: &[String]) -> usize {
        let caches = lock(&self.caches);
        let mut killed = 0;
        for entry in caches.values().flat_map(|c| c.live.values()) {
            if jtis.contains(&entry.jti.lock().unwrap()) {
                entry.kill.notify_one();
                killed += 1;
            }
        }
        killed
    }

    /// Closes every authenticated connection (at shutdown); how many there were.
    pub fn kill_all(&self) -> usize {
        let caches = lock(&self.caches);
        let mut killed = 0;
        for entry in caches.values().flat_map(|c| c.live.values()) {
            entry.kill.notify_one();
            killed += 1;
        }
        killed
    }

    /// Authenticated connections on this gateway.
    pub fn live(&self) -> usize {
        lock(&self.caches).values().map(|c| c.live.len()).sum()
    }

    pub fn list(&self, cache: &CacheId) -> Vec<Arc<ClientEntry>> {
        let caches = lock(&self.caches);
        let mut list: Vec<_> =
            caches.get(cache).map(|c| c.live.values().cloned().collect()).unwrap_or_default();
        list.sort_by_key(|e| e.key);
        list
    }

    /// How PUBLISH's receiver count from Valkey must change for `channel`: each client with
    /// patterns holds one catch-all subscription upstream, but Valkey would have counted each
    /// matching pattern. Exact for the clients of this gateway, as far as
    /// [`crate::pubsub::MATCH_BUDGET`] goes (clients past it are counted once). The patterns
    /// are matched outside the registry's lock: other caches' logins never wait for them.
    pub fn pattern_receivers_correction(&self, cache: &CacheId, channel: &[u8]) -> i64 {
        let clients = self.list(cache);
        let mut budget = crate::pubsub::MATCH_BUDGET;
        let mut correction = 0;
        for c in clients {
            let patterns = c.patterns.lock().unwrap().clone();
            if patterns.is_empty() {
                continue;
            }
            let mut matching = 0;
            for p in &patterns {
                match p.matches_within(channel, &mut budget) {
                    Some(true) => matching += 1,
                    Some(false) => {}
                    None => return correction,
                }
            }
            correction += matching - 1;
        }
        correction
    }

    /// For the usage batch: each cache's most concurrent clients since the last call (caches
    /// that had none are left out); the next interval starts from the clients open now.
    pub fn take_peaks(&self) -> Vec<(CacheId, u32)> {
        let mut caches = lock(&self.caches);
        let mut peaks = Vec::new();
        for (cache, clients) in caches.iter_mut() {
            let peak = std::mem::replace(&mut clients.peak, clients.live.len());
            if peak > 0 {
                peaks.push((cache.clone(), u32::try_from(peak).unwrap_or(u32::MAX)));
            }
        }
        peaks
    }

    pub fn counts(&self, cache: &CacheId) -> CacheCounts {
        let caches = lock(&self.caches);
        match caches.get(cache) {
            Some(c) => CacheCounts {
                connected: c.live.len(),
                connections_received: c.connections_received,
                commands: c.commands_done
                    + c.live.values().map(|e| e.commands.load(Ordering::Relaxed)).sum::<u64>(),
                blocked: c.stats.blocked(),
            },
            None => CacheCounts { connected: 0, connections_received: 0, commands: 0, blocked: 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_session_gives_its_connection_slot_back() {
        let registry = Arc::new(Registry::default());
        let cache = CacheId::generate();
        for _ in 0..3 {
            let (r, c) = (registry.clone(), cache.clone());
            let panicked = std::thread::spawn(move || {
                let _held = r.register(&c, 1, "a".into(), "b".into()).expect("the one slot is free");
                // Even with the registry's lock poisoned by the panic elsewhere.
                let _guard = r.caches.lock().unwrap();
                panic!("session bug");
            })
            .join();
            assert!(panicked.is_err());
            assert_eq!(registry.live(), 0, "the slot came back");
        }
        let held = registry.register(&cache, 1, "a".into(), "b".into()).expect("free again");
        assert!(registry.register(&cache, 1, "a".into(), "b".into()).is_none(), "max 1");
        drop(held);
        assert_eq!(registry.counts(&cache).connected, 0);
    }

    #[tokio::test]
    async fn a_cancelled_login_gives_its_connection_slot_back() {
        let registry = Arc::new(Registry::default());
        let cache = CacheId::generate();
        let (r, c) = (registry.clone(), cache.clone());
        let login = tokio::spawn(async move {
            let _registration = r.register(&c, 1, "a".into(), "b".into());
            std::future::pending::<()>().await;
        });
        while registry.live() == 0 {
            tokio::task::yield_now().await;
        }
        login.abort();
        let _ = login.await;
        assert_eq!(registry.live(), 0);
    }
}
