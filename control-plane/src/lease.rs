//! Leases: background jobs that must run once across every control plane on one database.
//!
//! On PostgreSQL a lease is a session-level advisory lock (`pg_try_advisory_lock`, key
//! [`key`]) taken on a connection of its own (not one of the store's pool). The holder
//! checks that connection every [`HEARTBEAT`] (`SELECT 1`); the moment it fails the job is
//! cancelled and the control plane goes back to contending (after 2 × [`RETRY`], so that the
//! others, whose connections work, try first). The others try every [`RETRY`].
//! When the holder's process dies, PostgreSQL ends its session and frees the lock, so
//! another control plane holds the lease, and runs the job, within [`RETRY`] (plus a connect).
//!
//! On SQLite (one process, the embedded default) a lease is always held.
//!
//! The job is started each time the lease is (re)acquired; while the lease is held and the
//! job ends by itself (they loop forever; a panic), the lease is given up and contended again.

use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often the holder checks its lock's connection.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often a control plane that does not hold a lease tries to take it.
pub const RETRY: Duration = Duration::from_secs(2);
/// Longest one check or try may take before the connection counts as lost.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// The advisory-lock key of the lease `name`: the first 8 bytes of SHA-256("shoal:" + name).
pub fn key(name: &str) -> i64 {
    let digest = Sha256::digest(format!("shoal:{name}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// This control plane, in the lease logs: `hostname:pid`.
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into());
    format!("{host}:{}", std::process::id())
}

/// Runs `job()` under the lease `name` on the database at `database_url` (the store's
/// `database_url`: `postgres://…` contends, `sqlite:…` always holds), until the returned
/// task is aborted (which also cancels the job and, by closing the lock's connection,
/// frees the lease).
pub fn run<F, Fut>(database_url: &str, name: impl Into<String>, job: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let name = name.into();
    let postgres = database_url.starts_with("postgres:") || database_url.starts_with("postgresql:");
    let url = database_url.to_owned();
    tokio::spawn(async move {
        let instance = instance_id();
        if postgres {
            contend(&url, &name, &instance, job).await
        } else {
            // One process on SQLite: held for good.
            held(&name, &instance, true);
            let _job = Job(tokio::spawn(job()));
            std::future::pending::<()>().await
        }
    })
}

/// The job's task, cancelled when dropped (also when the lease's own task is aborted).
struct Job(JoinHandle<()>);

impl Drop for Job {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn held(name: &str, instance: &str, held: bool) {
    metrics::gauge!("shoal_lease_held", "lease" => name.to_owned()).set(if held { 1.0 } else { 0.0 });
    if held {
        tracing::info!(lease = name, instance, "lease held");
    } else {
        tracing::warn!(lease = name, instance, "lease lost");
    }
}

async fn contend<F, Fut>(url: &str, name: &str, instance: &str, job: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let key = key(name);
    metrics::gauge!("shoal_lease_held", "lease" => name.to_owned()).set(0.0);
    let mut conn: Option<PgConnection> = None;
    loop {
        if conn.is_none() {
            match connect(url).await {
                Ok(c) => conn = Some(c),
                Err(e) => tracing::warn!(lease = name, instance, error = %e, "lease: cannot connect"),
            }
        }
        let Some(c) = conn.as_mut() else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        let taken = tokio::time::timeout(
            QUERY_TIMEOUT,
            sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut *c),
        )
        .await;
        match taken {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Ok(Err(e)) => {
                tracing::warn!(lease = name, instance, error = %e, "lease: cannot try the lock");
                conn = None;
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Err(_) => {
                tracing::warn!(lease = name, instance, "lease: trying the lock timed out");
                conn = None;
                tokio::time::sleep(RETRY).await;
                continue;
            }
        }
        held(name, instance, true);
        let mut running = Job(tokio::spawn(job()));
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.tick().await;
        let lost = loop {
            tokio::select! {
                _ = &mut running.0 => break false,
                _ = beat.tick() => {}
            }
            let alive = tokio::time::timeout(QUERY_TIMEOUT, sqlx::query("SELECT 1").execute(&mut *c)).await;
            match alive {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(lease = name, instance, error = %e, "lease: its connection failed");
                    break true;
                }
                Err(_) => {
                    tracing::warn!(lease = name, instance, "lease: its connection stopped answering");
                    break true;
                }
            }
        };
        if lost {
            // Cancel the job at once, and wait for it to be gone before anything else.
            running.0.abort();
            let _ = (&mut running.0).await;
        }
        held(name, instance, false);
        if lost {
            // The session (and the lock with it) is gone, or soon will be: a new connection,
            // after giving the other control planes (whose connections work) the first try.
            conn = None;
            tokio::time::sleep(RETRY).await;
        } else {
            tracing::warn!(lease = name, instance, "lease: its job ended; giving the lease up");
            let unlocked = tokio::time::timeout(
                QUERY_TIMEOUT,
                sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut *c),
            )
            .await;
            if !matches!(unlocked, Ok(Ok(_))) {
                conn = None;
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn connect(url: &str) -> Result<PgConnection, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?.application_name("shoal-lease");
    tokio::time::timeout(QUERY_TIMEOUT * 2, PgConnection::connect_with(&options))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    /// What one contender's job does: started, running now, cancelled.
    #[derive(Default)]
    struct Seen {
        started: AtomicUsize,
        running: AtomicBool,
        cancelled: AtomicBool,
    }

    /// Marks the job stopped when its future is dropped (cancelled).
    struct Stopped(Arc<Seen>);

    impl Drop for Stopped {
        fn drop(&mut self) {
            self.0.running.store(false, Ordering::SeqCst);
            self.0.cancelled.store(true, Ordering::SeqCst);
        }
    }

    /// A job that runs until cancelled, recording it in `seen`.
    fn forever(
        seen: Arc<Seen>,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + 'static {
        move || {
            let seen = seen.clone();
            Box::pin(async move {
                seen.started.fetch_add(1, Ordering::SeqCst);
                seen.running.store(true, Ordering::SeqCst);
                let _stopped = Stopped(seen);
                std::future::pending::<()>().await
            })
        }
    }

    async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if done() {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done().then(|| start.elapsed())
    }

    /// The backends holding the lease `name`'s advisory lock.
    async fn holders(conn: &mut PgConnection, name: &str) -> Vec<i32> {
        let k = key(name) as u64;
        sqlx::query_scalar(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1",
        )
        .bind((k >> 32) as i64)
        .bind((k & 0xffff_ffff) as i64)
        .fetch_all(conn)
        .await
        .unwrap()
    }

    #[test]
    fn keys_are_stable_and_differ_by_name() {
        assert_eq!(key("storage-sampler"), key("storage-sampler"));
        assert_ne!(key("storage-sampler"), key("acl-sweeper"));
        // SHA-256("shoal:storage-sampler"), first 8 bytes: must not change between releases
        // (control planes of two versions would both run the job).
        let digest = Sha256::digest(b"shoal:storage-sampler");
        assert_eq!(key("storage-sampler").to_be_bytes(), digest[..8]);
    }

    #[tokio::test]
    async fn on_sqlite_the_lease_is_held_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let seen = Arc::new(Seen::default());
        let lease = run(&url, "sqlite-job", forever(seen.clone()));
        let took = wait_for(Duration::from_secs(2), || seen.running.load(Ordering::SeqCst)).await;
        assert!(took.is_some_and(|t| t < Duration::from_millis(500)), "not held at once: {took:?}");
        lease.abort();
        let _ = lease.await;
        assert!(
            wait_for(Duration::from_secs(2), || seen.cancelled.load(Ordering::SeqCst)).await.is_some(),
            "aborting the lease cancels its job"
        );
        assert_eq!(seen.started.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_of_two_control_planes_runs_the_job_and_the_other_takes_over_when_the_holder_dies() {
        let Some(url) = crate::store::fresh_postgres_database("lease") else { return };
        let name = "takeover-job";
        let seen = [Arc::new(Seen::default()), Arc::new(Seen::default())];
        let leases = [run(&url, name, forever(seen[0].clone())), run(&url, name, forever(seen[1].clone()))];
        let running = |i: usize| seen[i].running.load(Ordering::SeqCst);
        assert!(
            wait_for(Duration::from_secs(10), || running(0) || running(1)).await.is_some(),
            "neither contender took the lease"
        );
        // Both have tried more than once by now (every 2 s): still only one runs the job.
        tokio::time::sleep(RETRY * 2).await;
        let holder = if running(0) { 0 } else { 1 };
        let other = 1 - holder;
        assert!(running(holder) && !running(other), "exactly one runs the job");
        assert_eq!(seen[other].started.load(Ordering::SeqCst), 0, "the other never started it");
        assert_eq!(seen[holder].started.load(Ordering::SeqCst), 1);

        // What PostgreSQL sees when the holder's process dies: its session ends.
        let mut admin = PgConnection::connect(&url).await.unwrap();
        let pids = holders(&mut admin, name).await;
        assert_eq!(pids.len(), 1, "one backend holds the lock: {pids:?}");
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pids[0])
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert!(terminated);
        let killed = Instant::now();
        let took = wait_for(Duration::from_secs(10), || running(other)).await;
        let Some(took) = took else { panic!("the other control plane did not take over within 10 s") };
        eprintln!("takeover after the holder's session ended: {took:?}");
        assert!(
            wait_for(Duration::from_secs(2), || seen[holder].cancelled.load(Ordering::SeqCst))
                .await
                .is_some(),
            "the first holder's job was not cancelled once its lock's connection failed"
        );
        assert!(!running(holder));
        // The first goes back to contending, and does not get it while the other holds it.
        tokio::time::sleep(RETRY * 2).await;
        assert!(running(other) && !running(holder), "only the new holder runs the job");
        assert_eq!(seen[holder].started.load(Ordering::SeqCst), 1);
        let pids = holders(&mut admin, name).await;
        assert_eq!(pids.len(), 1, "one backend holds the lock again: {pids:?}");
        assert!(killed.elapsed() < Duration::from_secs(20));
        for lease in leases {
            lease.abort();
            let _ = lease.await;
        }
        // Aborted: both jobs cancelled, the lock's connections closed, the lease free.
        assert!(wait_for(Duration::from_secs(2), || !running(0) && !running(1)).await.is_some());
        let freed = async {
            loop {
                if holders(&mut admin, name).await.is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), freed).await.expect("stopping frees the lease");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ticking_job_ticks_once_per_tick_across_two_control_planes() {
        let Some(url) = crate::store::fresh_postgres_database("lease") else { return };
        let tick = Duration::from_millis(100);
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE ticks (n BIGINT NOT NULL)").execute(&pool).await.unwrap();
        sqlx::query("INSERT INTO ticks VALUES (0)").execute(&pool).await.unwrap();
        let counted = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
        let contender = |mine: Arc<AtomicUsize>| {
            let pool = pool.clone();
            run(&url, "ticking-job", move || {
                let (pool, mine) = (pool.clone(), mine.clone());
                async move {
                    let mut every = tokio::time::interval(tick);
                    loop {
                        every.tick().await;
                        sqlx::query("UPDATE ticks SET n = n + 1").execute(&pool).await.unwrap();
                        mine.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        };
        let leases = [contender(counted[0].clone()), contender(counted[1].clone())];
        let total = || counted[0].load(Ordering::SeqCst) + counted[1].load(Ordering::SeqCst);
        assert!(wait_for(Duration::from_secs(10), || total() > 0).await.is_some(), "nobody ticks");
        let (from, start) = (total(), Instant::now());
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (ticks, window) = (total() - from, start.elapsed());
        for lease in leases {
            lease.abort();
            let _ = lease.await;
        }
        tokio::time::sleep(tick * 3).await;
        let n: i64 = sqlx::query_scalar("SELECT n FROM ticks").fetch_one(&pool).await.unwrap();
        let (a, b) = (counted[0].load(Ordering::SeqCst), counted[1].load(Ordering::SeqCst));
        assert_eq!(n as usize, a + b, "every tick is one row increment");
        assert!(a == 0 || b == 0, "only one control plane ticked: {a} and {b}");
        let expected = (window.as_millis() / tick.as_millis()) as usize;
        assert!(
            ticks <= expected + 2 && ticks * 2 >= expected,
            "{ticks} ticks in {window:?}: once per {tick:?} tick, not once per contender"
        );
    }
}
