//! Leases: the background jobs that one control plane at a time may run (the storage
//! sampler, the sweep of token ACL users, the limits coordinator), when several control
//! planes share one PostgreSQL store.
//!
//! A lease is a session-level advisory lock (`pg_try_advisory_lock`, its key derived from the
//! lease's name, [`key`]) on a connection of its own, kept for as long as the lease is held:
//! PostgreSQL frees the lock when that session ends, so when the holder dies (its TCP
//! connection closes with the process) another control plane takes it at its next try.
//!
//! - The holder checks its connection every [`CHECK_EVERY`] (it writes its heartbeat in the
//!   `leases` row on it); a failed or slow check ([`CHECK_TIMEOUT`]) means it may no longer
//!   hold the lock: its job is cancelled at once, then it tries again like the others.
//! - The others try every [`RETRY_EVERY`], so a dead holder's lease is taken within about
//!   that (PostgreSQL ends a killed process's session as soon as its socket closes; on a
//!   network cut, after the TCP keepalives set on the lease's session, and for a frozen
//!   process after `idle_session_timeout`: about 5 s).
//! - The holder writes who it is (`host/pid/random`, [`instance_id`]), since when, its
//!   heartbeat and (the `limits` lease) its internal URL in `leases` ([`crate::store::leases`]).
//! - A stopped control plane ([`Lease::stop`]) cancels its job and unlocks: another takes
//!   over at its next try.
//!
//! On SQLite (one process) a lease is always held. `shoal_lease_held{lease}` is 1 while held.
//! A job may overlap briefly with the previous holder's (up to [`CHECK_EVERY`] +
//! [`CHECK_TIMEOUT`] after the lock changed hands): each job is safe to run twice at once.

use crate::store::leases::{self, LeaseRecord};
use crate::store::{Backend, Store, StoreError};
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Connection, Row};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How often the holder checks its lease's connection (and writes its heartbeat).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A check that takes longer counts as a lost connection.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a control plane that does not hold a lease tries to take it.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);
/// Longest wait for a lease's connection to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// [`Lease::run`] returns after its first try, or after this.
const FIRST_TRY: Duration = Duration::from_secs(5);

/// The storage sampler ([`crate::storage::run`]).
pub const STORAGE_SAMPLER: &str = "storage-sampler";
/// The sweep of scoped tokens' ACL users ([`crate::token_users::run`]).
pub const ACL_SWEEP: &str = "acl-sweep";
/// The daily snapshots and their retention ([`crate::snapshots::schedule::run`]).
pub const SNAPSHOT_SCHEDULE: &str = "snapshot-schedule";
/// The limits coordinator ([`crate::limits::Coordinator::serve`]).
pub const LIMITS: &str = "limits";

/// This control plane process among the others: `host/pid/random` (the random part keeps a
/// restarted process with a recycled pid apart).
pub fn instance_id() -> String {
    format!("{}/{}/{:08x}", hostname(), std::process::id(), rand::random::<u32>())
}

/// This machine's host name ("unknown" if it has none).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The advisory lock key of lease `name`: the first 8 bytes of SHA-256("shoal lease <name>"),
/// the same in every version and process.
pub fn key(name: &str) -> i64 {
    let digest = Sha256::digest(format!("shoal lease {name}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// A lease's job: runs until cancelled.
pub type Job = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What a new holder's job is told.
#[derive(Clone, Debug, Default)]
pub struct Acquired {
    /// The row the previous holder left (who, and its last heartbeat); None on SQLite.
    pub previous: Option<LeaseRecord>,
}

/// A lease this process takes part in; its job runs while it holds it.
pub struct Lease {
    name: String,
    held: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Lease {
    /// Takes part in lease `name` as `holder` (an [`instance_id`]): `job` makes the job to run
    /// each time the lease is taken, cancelled when it is lost. `url` is written in the
    /// lease's row (where this process's internal API is reached). Returns after the first
    /// try, so a lone control plane holds its leases when this returns.
    pub async fn run<F>(store: Store, name: &str, holder: &str, url: Option<String>, job: F) -> Lease
    where
        F: Fn(Acquired) -> Job + Send + Sync + 'static,
    {
        Lease::run_while(store, name, holder, url, || true, Default::default(), job).await
    }

    /// [`Lease::run`] for a process that takes part only while `willing` says so (it is
    /// asked at each try and each check): unwilling, it does not try, and a holder gives the
    /// lease up (its job cancelled, the lock released). `wake` makes a process that does not
    /// hold the lease try at once rather than at its next try. On SQLite the lease is held
    /// anyway.
    pub async fn run_while<W, F>(
        store: Store,
        name: &str,
        holder: &str,
        url: Option<String>,
        willing: W,
        wake: std::sync::Arc<tokio::sync::Notify>,
        job: F,
    ) -> Lease
    where
        W: Fn() -> bool + Send + Sync + 'static,
        F: Fn(Acquired) -> Job + Send + Sync + 'static,
    {
        let (held_tx, held) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        // 0 until held: a control plane that holds nothing shows it.
        metrics::gauge!("shoal_lease_held", "lease" => name.to_string()).set(0.0);
        let (first_tx, first_rx) = oneshot::channel();
        let runner = Runner {
            store,
            name: name.to_string(),
            key: key(name),
            holder: holder.to_string(),
            url,
            job: Box::new(job),
            willing: Box::new(willing),
            wake,
            held: held_tx,
            stop: stop_rx,
        };
        let task = tokio::spawn(runner.run(first_tx));
        let _ = tokio::time::timeout(FIRST_TRY, first_rx).await;
        Lease { name: name.to_string(), held, stop, task: std::sync::Mutex::new(Some(task)) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this process holds the lease now.
    pub fn held(&self) -> bool {
        *self.held.borrow()
    }

    /// Follows [`Lease::held`]. Let each borrow go at once: the lease's task waits for it.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.held.clone()
    }

    /// Cancels the job and gives the lease up (another control plane takes it at its next
    /// try); returns when done.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Lease {
    /// Without [`Lease::stop`]: the job is cancelled and the connection dropped (PostgreSQL
    /// frees the lock when it sees the session end).
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().unwrap().take() {
            task.abort();
        }
    }
}

/// Why a holder stopped holding.
enum End {
    /// Its connection failed: it may no longer hold the lock.
    Lost(String),
    /// [`Lease::stop`].
    Stopped,
    /// `willing` said no.
    Unwilling,
}

/// A running job: cancelled when dropped.
struct JobTask(JoinHandle<()>);

impl JobTask {
    /// Cancels the job and waits until it is gone.
    async fn cancel(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for JobTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Runner {
    store: Store,
    name: String,
    key: i64,
    holder: String,
    url: Option<String>,
    job: Box<dyn Fn(Acquired) -> Job + Send + Sync>,
    willing: Box<dyn Fn() -> bool + Send + Sync>,
    wake: std::sync::Arc<tokio::sync::Notify>,
    held: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
}

impl Runner {
    async fn run(mut self, first: oneshot::Sender<()>) {
        if self.store.backend == Backend::Sqlite {
            return self.run_alone(first).await;
        }
        let mut first = Some(first);
        let mut conn: Option<AnyConnection> = None;
        // Failures are logged when they start and then once a minute.
        let mut failing = 0u32;
        while !*self.stop.borrow() {
            if !(self.willing)() {
                // No connection kept meanwhile (PostgreSQL would end an idle one anyway).
                if let Some(c) = conn.take() {
                    let _ = tokio::time::timeout(CHECK_TIMEOUT, c.close()).await;
                }
                if let Some(f) = first.take() {
                    let _ = f.send(());
                }
                if self.pause(RETRY_EVERY).await {
                    break;
                }
                continue;
            }
            let attempt = match conn.take() {
                Some(c) => Ok(c),
                None => self.connect().await,
            };
            let tried = match attempt {
                Ok(mut c) => match tokio::time::timeout(CHECK_TIMEOUT, try_lock(&mut c, self.key)).await {
                    Ok(Ok(true)) => {
                        failing = 0;
                        conn = self.hold(c, &mut first).await;
                        Ok(())
                    }
                    Ok(Ok(false)) => {
                        failing = 0;
                        conn = Some(c);
                        Ok(())
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
                },
                Err(e) => Err(e),
            };
            if let Err(error) = tried {
                if failing.is_multiple_of(30) {
                    tracing::warn!(lease = %self.name, holder = %self.holder, %error, "cannot try to take the lease");
                }
                failing += 1;
            }
            if let Some(f) = first.take() {
                let _ = f.send(());
            }
            if self.pause(RETRY_EVERY).await {
                break;
            }
        }
        if let Some(c) = conn {
            let _ = tokio::time::timeout(CHECK_TIMEOUT, c.close()).await;
        }
    }

    /// One process (SQLite): the lease is its own until stopped.
    async fn run_alone(mut self, first: oneshot::Sender<()>) {
        match self.store.pool.acquire().await {
            Ok(mut c) => {
                if let Err(e) = leases::claim(&mut c, &self.name, &self.holder, self.url.as_deref()).await {
                    tracing::warn!(lease = %self.name, error = %e, "cannot record the lease's holder");
                }
            }
            Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot record the lease's holder"),
        }
        self.set_held(true, None);
        let _ = first.send(());
        let mut job = self.spawn_job(Acquired::default());
        loop {
            tokio::select! {
                _ = self.stop.changed() => break,
                _ = &mut job.0 => job = self.restart_job().await,
            }
        }
        job.cancel().await;
        self.set_held(false, None);
    }

    /// A connection of the lease's own, named (`application_name` = `shoal <lease> <holder>`,
    /// in `pg_stat_activity`), whose session PostgreSQL ends within about 5 s of the network
    /// or the process going quiet (TCP keepalives and user timeout, `idle_session_timeout`;
    /// each ignored where unsupported).
    async fn connect(&self) -> Result<AnyConnection, String> {
        let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, self.store.dedicated_connection()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no connection within {CONNECT_TIMEOUT:?}")),
        };
        let app: String = format!("shoal {} {}", self.name, self.holder).chars().take(63).collect();
        let settings = [
            ("application_name", app.as_str()),
            ("tcp_keepalives_idle", "2"),
            ("tcp_keepalives_interval", "1"),
            ("tcp_keepalives_count", "3"),
            ("tcp_user_timeout", "5000"),
            // A holder that stops sending its heartbeat (a frozen process, whose socket
            // stays open) loses its session, and the lock, after 5 s (PostgreSQL 14 on).
            ("idle_session_timeout", "5000"),
        ];
        for (setting, value) in settings {
            let set = sqlx::query("SELECT set_config($1, $2, false)").bind(setting).bind(value);
            match tokio::time::timeout(CHECK_TIMEOUT, set.execute(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(lease = %self.name, setting, error = %e, "lease session setting refused")
                }
                Err(_) => return Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            }
        }
        Ok(conn)
    }

    /// Holds the lease taken on `conn` until the connection fails (None: dropped, so that
    /// PostgreSQL ends the session), the lease is stopped or this process is no longer
    /// willing (the connection, unlocked).
    async fn hold(
        &mut self,
        mut conn: AnyConnection,
        first: &mut Option<oneshot::Sender<()>>,
    ) -> Option<AnyConnection> {
        let claimed = leases::claim(&mut conn, &self.name, &self.holder, self.url.as_deref());
        let previous = match tokio::time::timeout(CHECK_TIMEOUT, claimed).await {
            Ok(Ok(previous)) => previous,
            Ok(Err(e)) => return self.lost(e.to_string()),
            Err(_) => return self.lost(format!("no answer within {CHECK_TIMEOUT:?}")),
        };
        self.set_held(true, previous.as_ref());
        if let Some(f) = first.take() {
            let _ = f.send(());
        }
        let mut job = self.spawn_job(Acquired { previous });
        let end = loop {
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = self.stop.changed() => break End::Stopped,
                _ = &mut job.0 => job = self.restart_job().await,
            }
            match tokio::time::timeout(CHECK_TIMEOUT, self.check(&mut conn)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => break End::Lost(e.to_string()),
                Err(_) => break End::Lost(format!("no answer within {CHECK_TIMEOUT:?}")),
            }
            if !(self.willing)() {
                break End::Unwilling;
            }
        };
        job.cancel().await;
        self.set_held(false, None);
        let why = match end {
            End::Lost(why) => return self.lost(why),
            End::Stopped => "stopped",
            End::Unwilling => "this process no longer takes part",
        };
        let unlock = sqlx::query("SELECT pg_advisory_unlock($1)").bind(self.key);
        match tokio::time::timeout(CHECK_TIMEOUT, unlock.execute(&mut conn)).await {
            Ok(Ok(_)) => {
                tracing::info!(lease = %self.name, holder = %self.holder, why, "lease released");
                Some(conn)
            }
            // Dropped: its session's end frees the lock.
            _ => None,
        }
    }

    fn lost(&self, why: String) -> Option<AnyConnection> {
        tracing::warn!(lease = %self.name, holder = %self.holder, why, "lease lost (its connection failed): its job is stopped");
        None
    }

    /// The holder's check: its heartbeat, written on the lease's own connection.
    async fn check(&self, conn: &mut AnyConnection) -> Result<(), StoreError> {
        if !leases::heartbeat(conn, &self.name, &self.holder).await? {
            // The row was changed by hand: it names the holder again.
            leases::claim(conn, &self.name, &self.holder, self.url.as_deref()).await?;
        }
        Ok(())
    }

    fn spawn_job(&self, acquired: Acquired) -> JobTask {
        JobTask(tokio::spawn((self.job)(acquired)))
    }

    /// A job ended by itself (it should not: it failed): it starts again after a pause.
    async fn restart_job(&self) -> JobTask {
        tracing::error!(lease = %self.name, "the lease's job ended; starting it again");
        tokio::time::sleep(CHECK_EVERY).await;
        self.spawn_job(Acquired::default())
    }

    fn set_held(&self, held: bool, previous: Option<&LeaseRecord>) {
        self.held.send_replace(held);
        metrics::gauge!("shoal_lease_held", "lease" => self.name.clone()).set(if held { 1.0 } else { 0.0 });
        if held {
            tracing::info!(
                lease = %self.name,
                holder = %self.holder,
                previous_holder = previous.map(|p| p.holder.as_str()).unwrap_or("none"),
                previous_heartbeat = previous.map(|p| p.heartbeat.as_str()).unwrap_or("none"),
                "lease taken: its job runs here"
            );
        }
    }

    /// Waits `d` (less if woken); true if the lease is stopped meanwhile.
    async fn pause(&mut self, d: Duration) -> bool {
        // Stopped already (a change `changed` saw before).
        if *self.stop.borrow() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => *self.stop.borrow(),
            _ = self.wake.notified() => *self.stop.borrow(),
            _ = self.stop.changed() => true,
        }
    }
}

async fn try_lock(conn: &mut AnyConnection, key: i64) -> Result<bool, StoreError> {
    let row = sqlx::query("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(conn).await?;
    row.try_get::<bool, _>(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    /// A new database on the Postgres lane's server; None (the test says it did not run)
    /// without one.
    fn postgres_database() -> Option<String> {
        let url = crate::store::fresh_postgres_database("lease");
        if url.is_none() {
            println!("SKIPPED: no SHOAL_TEST_POSTGRES_URL (the Postgres lane of scripts/test.sh runs this)");
        }
        url
    }

    /// What a test job did: how often it ran, and whether it was cancelled.
    #[derive(Default)]
    struct Runs {
        count: AtomicU64,
        cancelled: AtomicBool,
    }

    /// A job that records a run (in `lease_runs`, as `holder`, and in `runs`) every `period`
    /// until cancelled.
    fn counting_job(
        store: Store,
        holder: &'static str,
        runs: Arc<Runs>,
        period: Duration,
    ) -> impl Fn(Acquired) -> Job + Send + Sync + 'static {
        move |_| {
            let (store, runs) = (store.clone(), runs.clone());
            Box::pin(async move {
                struct Cancelled(Arc<Runs>);
                impl Drop for Cancelled {
                    fn drop(&mut self) {
                        self.0.cancelled.store(true, Ordering::SeqCst);
                    }
                }
                let _cancelled = Cancelled(runs.clone());
                runs.cancelled.store(false, Ordering::SeqCst);
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    let at = chrono::Utc::now().timestamp_millis();
                    sqlx::query("INSERT INTO lease_runs (holder, at) VALUES ($1, $2)")
                        .bind(holder)
                        .bind(at)
                        .execute(&store.pool)
                        .await
                        .unwrap();
                    runs.count.fetch_add(1, Ordering::SeqCst);
                }
            })
        }
    }

    /// The runs recorded in `lease_runs`: (holder, at ms), oldest first.
    async fn recorded(store: &Store) -> Vec<(String, i64)> {
        let rows = sqlx::query("SELECT holder, at FROM lease_runs ORDER BY at")
            .fetch_all(&store.pool)
            .await
            .unwrap();
        rows.iter().map(|r| (r.get("holder"), r.get("at"))).collect()
    }

    async fn two_stores(url: &str) -> (Store, Store) {
        // Two pools, as two control-plane processes have.
        let a = Store::open(url).await.unwrap();
        let b = Store::open(url).await.unwrap();
        sqlx::query("CREATE TABLE lease_runs (holder TEXT NOT NULL, at BIGINT NOT NULL)")
            .execute(&a.pool)
            .await
            .unwrap();
        (a, b)
    }

    /// Waits up to `limit` for `lease` to be held (or not); how long that took.
    async fn until_held(lease: &Lease, held: bool, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut watch = lease.watch();
        tokio::time::timeout(limit, watch.wait_for(|h| *h == held)).await.ok()?.ok()?;
        Some(started.elapsed())
    }

    /// The sessions that hold lease `name`'s advisory lock in this database, by
    /// `application_name`.
    async fn lock_holders(store: &Store, name: &str) -> Vec<String> {
        let k = key(name) as u64;
        let rows = sqlx::query(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.classid::bigint = $1 AND l.objid::bigint = $2",
        )
        .bind((k >> 32) as i64)
        .bind((k & 0xffff_ffff) as i64)
        .fetch_all(&store.pool)
        .await
        .unwrap();
        rows.iter().map(|r| r.get::<String, _>(0)).collect()
    }

    #[test]
    fn keys_are_stable() {
        // The same in every version: two versions running side by side (an upgrade) must
        // contend for the same lock.
        assert_eq!(key("limits"), key("limits"));
        assert_ne!(key(LIMITS), key(STORAGE_SAMPLER));
        assert_eq!(key("storage-sampler"), 8_822_313_808_025_741_741);
    }

    /// Two contenders on their own connections: one holds, and its job runs; when its
    /// session dies (`pg_terminate_backend`, what a killed process looks like to
    /// PostgreSQL) its job is cancelled and the other takes over well within 10 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_other_contender_takes_over_when_the_holders_session_dies() {
        let Some(url) = postgres_database() else { return };
        crate::metrics::handle(None);
        let (store_a, store_b) = two_stores(&url).await;
        let (runs_a, runs_b) = (Arc::new(Runs::default()), Arc::new(Runs::default()));
        let period = Duration::from_millis(100);
        let a = Lease::run(store_a.clone(), "test-job", "a", Some("http://a".into()), {
            counting_job(store_a.clone(), "a", runs_a.clone(), period)
        })
        .await;
        let b = Lease::run(
            store_b.clone(),
            "test-job",
            "b",
            None,
            counting_job(store_b.clone(), "b", runs_b.clone(), period),
        )
        .await;
        // The first to try holds it; the other does not, then or after its retries.
        assert!(a.held() && !b.held());
        tokio::time::sleep(RETRY_EVERY + Duration::from_millis(500)).await;
        assert!(a.held() && !b.held());
        assert_eq!(lock_holders(&store_a, "test-job").await, ["shoal test-job a"]);
        assert!(runs_a.count.load(Ordering::SeqCst) >= 10, "a's job runs");
        assert_eq!(runs_b.count.load(Ordering::SeqCst), 0, "b's job does not");
        let row = store_b.lease("test-job").await.unwrap().expect("the holder's row");
        assert_eq!((row.holder.as_str(), row.url.as_deref()), ("a", Some("http://a")));
        assert!(row.heartbeat_age().unwrap() < Duration::from_secs(3), "{row:?}");

        // a's session ends, as when its process dies.
        let killed = Instant::now();
        let n: i64 = sqlx::query(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'shoal test-job a'",
        )
        .fetch_one(&store_b.pool)
        .await
        .unwrap()
        .get(0);
        assert_eq!(n, 1);
        let lost = until_held(&a, false, Duration::from_secs(10)).await.expect("a sees its lease lost");
        assert!(runs_a.cancelled.load(Ordering::SeqCst), "a's job is cancelled once a lost the lease");
        let took = until_held(&b, true, Duration::from_secs(10)).await.map(|_| killed.elapsed());
        let took = took.expect("b takes the lease over within 10 s");
        println!("FIGURE lease takeover: the holder's session killed, the other held it after {took:.2?}; the holder stopped its job after {lost:.2?}");
        assert!(lost <= CHECK_EVERY + CHECK_TIMEOUT + Duration::from_millis(500), "{lost:?}");
        assert!(took <= RETRY_EVERY + Duration::from_secs(2), "{took:?}");
        let after = runs_a.count.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(runs_a.count.load(Ordering::SeqCst), after, "a's job stays stopped");
        assert!(runs_b.count.load(Ordering::SeqCst) >= 10, "b's job runs");
        assert_eq!(store_a.lease("test-job").await.unwrap().unwrap().holder, "b");
        // a keeps trying, and does not get it while b holds it.
        tokio::time::sleep(RETRY_EVERY + Duration::from_millis(500)).await;
        assert!(!a.held() && b.held());
        assert_eq!(lock_holders(&store_a, "test-job").await, ["shoal test-job b"]);

        // b stops (a graceful stop): a takes over at its next try, and the two jobs never
        // ran at once.
        b.stop().await;
        assert!(runs_b.cancelled.load(Ordering::SeqCst));
        let handed = until_held(&a, true, Duration::from_secs(10)).await.expect("a takes it back");
        assert!(handed <= RETRY_EVERY + Duration::from_secs(1), "{handed:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let runs = recorded(&store_a).await;
        let last_b = runs.iter().filter(|r| r.0 == "b").map(|r| r.1).max().unwrap();
        let a_again = runs.iter().filter(|r| r.0 == "a" && r.1 > last_b).count();
        assert!(a_again >= 3, "a runs again after b: {runs:?}");
        assert_eq!(metric_held("test-job"), Some(1.0));
        a.stop().await;
        assert_eq!(metric_held("test-job"), Some(0.0));
    }

    /// A holder that freezes (its process stopped: its socket stays open, nothing is sent)
    /// loses the lease after `idle_session_timeout`: the other takes it within 10 s, and the
    /// frozen one, once it runs again, finds its session gone and cancels its job.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frozen_holder_loses_the_lease_to_the_other() {
        let Some(url) = postgres_database() else { return };
        let (store_b, _) = two_stores(&url).await;
        let (runs_a, runs_b) = (Arc::new(Runs::default()), Arc::new(Runs::default()));
        let period = Duration::from_millis(100);
        // a runs on a runtime of its own, on one thread, which the test blocks.
        let (freeze, frozen) = oneshot::channel::<Duration>();
        let (held_tx, mut held_a) = watch::channel(false);
        let thread_runs = runs_a.clone();
        let thread_url = url.clone();
        let a = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let store = Store::open(&thread_url).await.unwrap();
                let job = counting_job(store.clone(), "a", thread_runs, period);
                let lease = Lease::run(store, "frozen", "a", None, job).await;
                let mut watch = lease.watch();
                held_tx.send_replace(lease.held());
                let pause = frozen.await.unwrap();
                // Frozen: nothing on this thread runs, the sockets stay open.
                std::thread::sleep(pause);
                // Running again: a finds out.
                loop {
                    held_tx.send_replace(*watch.borrow_and_update());
                    if watch.changed().await.is_err() {
                        break;
                    }
                }
            })
        });
        tokio::time::timeout(Duration::from_secs(10), held_a.wait_for(|h| *h)).await.unwrap().unwrap();
        let b = Lease::run(
            store_b.clone(),
            "frozen",
            "b",
            None,
            counting_job(store_b.clone(), "b", runs_b.clone(), period),
        )
        .await;
        assert!(!b.held());
        let freeze_for = Duration::from_secs(12);
        let frozen_at = Instant::now();
        freeze.send(freeze_for).unwrap();
        let took = until_held(&b, true, Duration::from_secs(10)).await.expect("b takes over within 10 s");
        println!("FIGURE lease takeover from a frozen holder: {took:.2?}");
        // a wakes up: it sees its session gone within a check, and stops its job.
        let woke = freeze_for.saturating_sub(frozen_at.elapsed());
        let lost = tokio::time::timeout(
            woke + CHECK_EVERY + CHECK_TIMEOUT + Duration::from_secs(1),
            held_a.wait_for(|h| !*h),
        )
        .await
        .map(|r| r.is_ok());
        assert_eq!(lost, Ok(true), "a sees its lease lost once it runs again");
        assert!(runs_a.cancelled.load(Ordering::SeqCst));
        let after = runs_a.count.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(runs_a.count.load(Ordering::SeqCst), after);
        assert!(b.held());
        drop(a);
    }

    /// A process takes part only while willing: unwilling, it does not take a free lease, and
    /// a holder that becomes unwilling gives it up (its job cancelled, then the lock
    /// released) to a willing one, their jobs never at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_willing_processes_take_part() {
        let Some(url) = postgres_database() else { return };
        let (store_a, store_b) = two_stores(&url).await;
        let (will_a, will_b) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (runs_a, runs_b) = (Arc::new(Runs::default()), Arc::new(Runs::default()));
        let period = Duration::from_millis(100);
        let willing = |w: &Arc<AtomicBool>| {
            let w = w.clone();
            move || w.load(Ordering::SeqCst)
        };
        let a = Lease::run_while(
            store_a.clone(),
            "willing",
            "a",
            None,
            willing(&will_a),
            Default::default(),
            counting_job(store_a.clone(), "a", runs_a.clone(), period),
        )
        .await;
        let b = Lease::run_while(
            store_b.clone(),
            "willing",
            "b",
            None,
            willing(&will_b),
            Default::default(),
            counting_job(store_b.clone(), "b", runs_b.clone(), period),
        )
        .await;
        tokio::time::sleep(RETRY_EVERY + Duration::from_millis(500)).await;
        assert!(!a.held() && !b.held(), "nobody willing, nobody holds");
        assert!(lock_holders(&store_a, "willing").await.is_empty());
        will_a.store(true, Ordering::SeqCst);
        until_held(&a, true, RETRY_EVERY * 2).await.expect("a takes it once willing");
        will_b.store(true, Ordering::SeqCst);
        tokio::time::sleep(RETRY_EVERY + Duration::from_millis(500)).await;
        assert!(a.held() && !b.held());
        will_a.store(false, Ordering::SeqCst);
        until_held(&a, false, CHECK_EVERY * 3).await.expect("a gives it up");
        assert!(runs_a.cancelled.load(Ordering::SeqCst));
        until_held(&b, true, RETRY_EVERY * 2).await.expect("b takes it");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let runs = recorded(&store_a).await;
        let last_a = runs.iter().filter(|r| r.0 == "a").map(|r| r.1).max().unwrap();
        let first_b = runs.iter().filter(|r| r.0 == "b").map(|r| r.1).min().unwrap();
        assert!(last_a < first_b, "{runs:?}");
        a.stop().await;
        b.stop().await;
    }

    /// The gauge `shoal_lease_held{lease}`, read from a recorder this test installs.
    fn metric_held(lease: &str) -> Option<f64> {
        let handle = crate::metrics::handle(None);
        let text = handle.render();
        let line = text.lines().find(|l| l.starts_with(&format!("shoal_lease_held{{lease=\"{lease}\"}}")))?;
        line.rsplit_once(' ')?.1.parse().ok()
    }

    /// Two control planes contending for a periodic job: it runs once per period, not twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_runs_once_per_period_across_two_holders() {
        let Some(url) = postgres_database() else { return };
        let (store_a, store_b) = two_stores(&url).await;
        let period = Duration::from_millis(100);
        let (runs_a, runs_b) = (Arc::new(Runs::default()), Arc::new(Runs::default()));
        let started = Instant::now();
        let a = Lease::run(
            store_a.clone(),
            "periodic",
            "a",
            None,
            counting_job(store_a.clone(), "a", runs_a, period),
        )
        .await;
        let b = Lease::run(
            store_b.clone(),
            "periodic",
            "b",
            None,
            counting_job(store_b.clone(), "b", runs_b, period),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (a_held, b_held) = (a.held(), b.held());
        a.stop().await;
        b.stop().await;
        let elapsed = started.elapsed();
        let runs = recorded(&store_a).await;
        let periods = (elapsed.as_millis() / period.as_millis()) as usize + 1;
        assert!(a_held != b_held, "exactly one holds");
        // Each period ran once: by one holder (both would make twice as many).
        assert!(
            runs.len() <= periods && runs.len() + 5 >= periods,
            "{} runs in {periods} periods",
            runs.len()
        );
        let holders: std::collections::HashSet<&str> = runs.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(holders.len(), 1, "{runs:?}");
    }

    /// SQLite is one process: the lease is held at once, and the job runs until stopped.
    #[tokio::test]
    async fn on_sqlite_the_lease_is_held_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("s.db").display())).await.unwrap();
        sqlx::query("CREATE TABLE lease_runs (holder TEXT NOT NULL, at BIGINT NOT NULL)")
            .execute(&store.pool)
            .await
            .unwrap();
        let runs = Arc::new(Runs::default());
        let started = Instant::now();
        let lease = Lease::run(
            store.clone(),
            "alone",
            "me",
            None,
            counting_job(store.clone(), "me", runs.clone(), Duration::from_millis(50)),
        )
        .await;
        assert!(lease.held());
        assert!(started.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(runs.count.load(Ordering::SeqCst) >= 3);
        assert_eq!(store.lease("alone").await.unwrap().unwrap().holder, "me");
        lease.stop().await;
        assert!(!lease.held());
        assert!(runs.cancelled.load(Ordering::SeqCst));
        let after = runs.count.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(runs.count.load(Ordering::SeqCst), after);
    }
}
