//! The failover checker: writers `SET` known keys (`w<t>:<i>` = `v<i>`) into a tenant's
//! database across every shard, as a cluster client would (routed by slot, following `MOVED`,
//! the slot map refreshed with `CLUSTER SLOTS` after a connection error; asked as the admin
//! user, since tenants may not, as the gateway will ask with its own user), while one shard's
//! primary is killed with SIGKILL. Every write the node acknowledged is recorded; afterwards
//! every acknowledged key is read back.
//!
//! With [`Options::wait`], each `SET` is followed on the same connection by `WAIT 1 <ms>`: a
//! write counts as acknowledged only once a replica has it too.

use super::key_slot;
use redis::aio::MultiplexedConnection;
use redis::Value;
use shoal_engine::{Pool, TenantAcl};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one request may take before it counts as failed (and its connection is dropped).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// Slot map refreshes at most this often.
const REFRESH_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct Options {
    /// Concurrent writers, each with its own connections.
    pub writers: usize,
    /// `WAIT 1 <this>` after each `SET`.
    pub wait: Option<Duration>,
    /// Writing before the kill.
    pub before: Duration,
    /// Writing after the kill.
    pub after: Duration,
    /// The shard (in slot order) whose primary is killed.
    pub shard: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub attempted: u64,
    /// Acknowledged: `OK` (and, with `WAIT`, at least one replica).
    pub acknowledged: u64,
    /// With `WAIT`: `OK` but no replica within the wait (not counted as acknowledged).
    pub unreplicated: u64,
    pub failed: u64,
    /// Acknowledged writes per second before the kill.
    pub rate_before: f64,
    /// Acknowledged keys missing or different when read back.
    pub lost: u64,
    pub lost_sample: Vec<String>,
    /// Writes to the dead shard's slots: first failure after the kill to the first success
    /// after it (a plain `OK`, whether or not a replica had it).
    pub outage: Option<Duration>,
    /// The same, counting only acknowledged writes as successes (differs with `WAIT`: a
    /// promoted replica has no replica of its own until the old primary is back).
    pub ack_outage: Option<Duration>,
    /// A write to the dead shard's slots succeeded after the kill.
    pub recovered: bool,
}

impl Figures {
    pub fn print(&self, label: &str) {
        let secs =
            |d: Option<Duration>| d.map_or("none".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
        println!(
            "FIGURE failover [{label}]: writes attempted {}, acknowledged {}, unreplicated {}, failed {}; \
             {:.0} acked writes/s before the kill; dead shard's slots: errors for {} (until an acknowledged \
             write: {}), recovered {}; acknowledged writes lost: {}{}",
            self.attempted,
            self.acknowledged,
            self.unreplicated,
            self.failed,
            self.rate_before,
            secs(self.outage),
            secs(self.ack_outage),
            self.recovered,
            self.lost,
            if self.lost_sample.is_empty() {
                String::new()
            } else {
                format!(" (e.g. {:?})", self.lost_sample)
            },
        );
    }
}

/// A cluster client of one tenant.
struct Router {
    acl: TenantAcl,
    /// Inclusive slot range → the address of its primary.
    slots: Vec<(u16, u16, String)>,
    /// Every node (as the admin user), to ask for the slot map.
    seeds: Vec<redis::Client>,
    admin: HashMap<usize, MultiplexedConnection>,
    conns: HashMap<String, MultiplexedConnection>,
    refreshed: Option<Instant>,
}

impl Router {
    async fn new(pool: &Pool, acl: &TenantAcl) -> Router {
        let seeds = pool.cluster().unwrap().nodes().iter().map(|n| n.admin_client().unwrap()).collect();
        let mut r = Router {
            acl: acl.clone(),
            slots: Vec::new(),
            seeds,
            admin: HashMap::new(),
            conns: HashMap::new(),
            refreshed: None,
        };
        assert!(r.refresh().await, "slot map");
        r
    }

    /// `CLUSTER SLOTS` from the first node that answers; false if none did.
    async fn refresh(&mut self) -> bool {
        if self.refreshed.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return false;
        }
        self.refreshed = Some(Instant::now());
        for k in 0..self.seeds.len() {
            let mut c = match self.admin.get(&k) {
                Some(c) => c.clone(),
                None => {
                    let connect = self.seeds[k].get_multiplexed_async_connection();
                    let Ok(Ok(c)) = tokio::time::timeout(REQUEST_TIMEOUT, connect).await else { continue };
                    self.admin.insert(k, c.clone());
                    c
                }
            };
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SLOTS");
            let asked = tokio::time::timeout(REQUEST_TIMEOUT, cmd.query_async::<Value>(&mut c)).await;
            let Ok(Ok(Value::Array(ranges))) = asked else {
                self.admin.remove(&k);
                continue;
            };
            let slots: Vec<(u16, u16, String)> = ranges.iter().filter_map(parse_range).collect();
            if !slots.is_empty() {
                self.slots = slots;
                return true;
            }
        }
        false
    }

    fn addr(&self, slot: u16) -> Option<String> {
        self.slots.iter().find(|s| s.0 <= slot && slot <= s.1).map(|s| s.2.clone())
    }

    /// `MOVED slot addr`: every range of the slot's old primary goes to `addr` (a failover
    /// moves a whole shard).
    fn moved(&mut self, slot: u16, addr: &str) {
        match self.addr(slot) {
            Some(old) => {
                for s in self.slots.iter_mut().filter(|s| s.2 == old) {
                    s.2 = addr.to_string();
                }
            }
            None => self.slots.push((slot, slot, addr.to_string())),
        }
    }

    async fn conn(&mut self, addr: &str) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(c) = self.conns.get(addr) {
            return Ok(c.clone());
        }
        let url = format!("redis://{}:{}@{}/{}", self.acl.user, self.acl.password, addr, self.acl.db);
        let client = redis::Client::open(url)?;
        let c = tokio::time::timeout(REQUEST_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::IoError, "connect timed out")))??;
        self.conns.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Runs `pipe` for `key`'s slot, following up to two `MOVED`s; a connection error drops
    /// the connection and refreshes the slot map.
    async fn run(
        &mut self,
        key: &str,
        pipe: &redis::Pipeline,
        limit: Duration,
    ) -> redis::RedisResult<Vec<Value>> {
        let slot = key_slot(key);
        let mut last = None;
        for _ in 0..3 {
            let Some(addr) = self.addr(slot) else {
                self.refresh().await;
                return Err((redis::ErrorKind::ClusterDown, "slot not served").into());
            };
            let answered = match self.conn(&addr).await {
                Ok(mut c) => tokio::time::timeout(limit, pipe.query_async::<Vec<Value>>(&mut c))
                    .await
                    .unwrap_or_else(|_| Err((redis::ErrorKind::IoError, "timed out").into())),
                Err(e) => Err(e),
            };
            match answered {
                Err(e) if e.kind() == redis::ErrorKind::Moved => {
                    let Some((to, _)) = e.redirect_node() else { return Err(e) };
                    let to = to.to_string();
                    self.moved(slot, &to);
                    last = Some(e);
                }
                Err(e)
                    if e.is_io_error()
                        || e.is_connection_dropped()
                        || e.is_connection_refusal()
                        || e.is_timeout() =>
                {
                    self.conns.remove(&addr);
                    self.refresh().await;
                    return Err(e);
                }
                other => return other,
            }
        }
        Err(last.expect("tried"))
    }
}

/// One `CLUSTER SLOTS` entry: `[start, end, [ip, port, id, ...], replicas...]`.
fn parse_range(v: &Value) -> Option<(u16, u16, String)> {
    let Value::Array(f) = v else { return None };
    let int = |v: &Value| match v {
        Value::Int(i) => Some(*i),
        _ => None,
    };
    let Value::Array(primary) = f.get(2)? else { return None };
    let ip = match primary.first()? {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => return None,
    };
    Some((int(&f[0])? as u16, int(&f[1])? as u16, format!("{ip}:{}", int(primary.get(1)?)?)))
}

/// What one writer saw.
#[derive(Default)]
struct Log {
    attempted: u64,
    unreplicated: u64,
    failed: u64,
    /// Indexes of acknowledged writes.
    acked: Vec<u64>,
    acked_before_kill: u64,
    /// Writes to the victim's slots after the kill: (when, OK, acknowledged).
    victim: Vec<(Instant, bool, bool)>,
}

async fn write(
    mut router: Router,
    t: usize,
    opts: Options,
    victim: Arc<Vec<(u16, u16)>>,
    stop: Arc<AtomicBool>,
    killed: Arc<std::sync::OnceLock<Instant>>,
) -> Log {
    let mut log = Log::default();
    let limit = REQUEST_TIMEOUT + opts.wait.unwrap_or_default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("w{t}:{i}");
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&key).arg(format!("v{i}"));
        if let Some(wait) = opts.wait {
            pipe.cmd("WAIT").arg(1).arg(wait.as_millis() as u64);
        }
        log.attempted += 1;
        let (ok, acked) = match router.run(&key, &pipe, limit).await {
            Ok(replies) => {
                let replicated =
                    opts.wait.is_none() || matches!(replies.get(1), Some(Value::Int(n)) if *n >= 1);
                (true, replicated)
            }
            Err(_) => (false, false),
        };
        match (ok, acked) {
            (true, true) => {
                log.acked.push(i);
                if killed.get().is_none() {
                    log.acked_before_kill += 1;
                }
            }
            (true, false) => log.unreplicated += 1,
            _ => log.failed += 1,
        }
        if killed.get().is_some() {
            let slot = key_slot(&key);
            if victim.iter().any(|&(a, b)| a <= slot && slot <= b) {
                log.victim.push((Instant::now(), ok, acked));
            }
        }
        if !ok {
            // A dead node refuses at once: do not spin.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        i += 1;
    }
    log
}

/// From the first failure (by `failed`) to the first success after it.
fn outage(events: &[(Instant, bool)]) -> (Option<Duration>, bool) {
    let Some(first) = events.iter().filter(|e| !e.1).map(|e| e.0).min() else {
        return (None, events.iter().any(|e| e.1));
    };
    match events.iter().filter(|e| e.1 && e.0 > first).map(|e| e.0).min() {
        Some(back) => (Some(back - first), true),
        None => (None, false),
    }
}

/// Writes for `before`, kills the primary of `opts.shard`, writes for `after`, waits for the
/// cluster to be whole again, then reads every acknowledged key back.
pub async fn run(pool: &Pool, acl: &TenantAcl, opts: &Options) -> Figures {
    let status = pool.cluster_status().await.unwrap();
    let shard = &status.shards[opts.shard];
    let victim = Arc::new(shard.slots.clone());
    let victim_node =
        pool.cluster().unwrap().node(shard.primary.as_ref().unwrap().name.as_deref().unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(std::sync::OnceLock::new());
    let mut writers = Vec::new();
    for t in 0..opts.writers {
        let router = Router::new(pool, acl).await;
        writers.push(tokio::spawn(write(
            router,
            t,
            opts.clone(),
            Arc::clone(&victim),
            Arc::clone(&stop),
            Arc::clone(&killed),
        )));
    }
    tokio::time::sleep(opts.before).await;
    unsafe { libc::kill(victim_node.pid().unwrap() as i32, libc::SIGKILL) };
    killed.set(Instant::now()).unwrap();
    tokio::time::sleep(opts.after).await;
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for w in writers {
        logs.push(w.await.unwrap());
    }

    let mut f = Figures::default();
    for log in &logs {
        f.attempted += log.attempted;
        f.acknowledged += log.acked.len() as u64;
        f.unreplicated += log.unreplicated;
        f.failed += log.failed;
    }
    f.rate_before = logs.iter().map(|l| l.acked_before_kill).sum::<u64>() as f64 / opts.before.as_secs_f64();
    let events: Vec<_> = logs.iter().flat_map(|l| l.victim.iter().copied()).collect();
    let (o, recovered) = outage(&events.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>());
    f.outage = o;
    f.recovered = recovered;
    f.ack_outage = outage(&events.iter().map(|e| (e.0, e.2)).collect::<Vec<_>>()).0;

    // Read back once every shard has an answering primary again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pool.cluster_status().await.is_ok_and(|s| {
        s.ok && s
            .shards
            .iter()
            .all(|sh| sh.primary.as_ref().is_some_and(|p| p.health == "online" && p.healthy))
    }) {
        assert!(Instant::now() < deadline, "cluster whole again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut router = Router::new(pool, acl).await;
    let mut by_addr: HashMap<String, Vec<(String, Vec<u8>)>> = HashMap::new();
    for (t, log) in logs.iter().enumerate() {
        for &i in &log.acked {
            let key = format!("w{t}:{i}");
            let addr = router.addr(key_slot(&key)).expect("slot served");
            by_addr.entry(addr).or_default().push((key, format!("v{i}").into_bytes()));
        }
    }
    for (addr, keys) in by_addr {
        for chunk in keys.chunks(1000) {
            let mut pipe = redis::pipe();
            for (key, _) in chunk {
                pipe.cmd("GET").arg(key);
            }
            let mut c = router.conn(&addr).await.unwrap();
            let got: Vec<Option<Vec<u8>>> = pipe.query_async(&mut c).await.expect("read back");
            for ((key, want), got) in chunk.iter().zip(got) {
                if got.as_ref() != Some(want) {
                    f.lost += 1;
                    if f.lost_sample.len() < 5 {
                        f.lost_sample.push(key.clone());
                    }
                }
            }
        }
    }
    f
}
