//! A gateway in-process in front of a real Valkey cluster pool (3 shards × 1 replica, 1 s
//! node timeout) and the fake control plane: a cache's keys spread over the shards while its
//! clients see one plain Valkey — commands routed by slot, multi-key commands split or
//! refused with `-CROSSSLOT`, whole-cache commands over every shard, transactions, pub/sub,
//! the reader endpoint, and slots moving under load.

use redis::aio::MultiplexedConnection;
use redis::Value;
use shoal_engine::{find_valkey_server, ClusterConfig, Pool, TenantAcl, CLUSTER_TARGET};
use shoal_gateway::control_plane::fake::FakeControlPlane;
use shoal_gateway::control_plane::ControlPlane;
use shoal_gateway::{Gateway, GatewayConfig};
use shoal_types::{CacheId, TenantRoute};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

struct Setup {
    fake: Arc<FakeControlPlane>,
    addr: SocketAddr,
    reader_addr: SocketAddr,
    pool: Pool,
    _dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
}

/// A base port with the next 8 ports and their cluster-bus ports (+10000) free, below the
/// ephemeral range other tests' ports come from.
fn free_base_port() -> u16 {
    loop {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let base = 10000 + ((nanos ^ std::process::id().wrapping_mul(2654435761)) % 1000) as u16 * 10;
        let free = (0..8).all(|i| {
            std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + i + 10000)).is_ok()
        });
        if free {
            return base;
        }
    }
}

impl Setup {
    async fn start() -> Setup {
        Setup::with_node_timeout(Duration::from_millis(1000)).await
    }

    /// `node_timeout`: how long a primary may not answer before it is failed over.
    async fn with_node_timeout(node_timeout: Duration) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::start_cluster(ClusterConfig {
            valkey_server: find_valkey_server().expect("valkey-server (SHOAL_VALKEY_SERVER)"),
            dir: dir.path().to_path_buf(),
            host: "127.0.0.1".into(),
            base_port: free_base_port(),
            shards: 3,
            replicas: 1,
            databases: ClusterConfig::databases_for(10, 1),
            maxmemory_mb: Some(64),
            script_time_limit: shoal_engine::DEFAULT_SCRIPT_TIME_LIMIT,
            modules: Vec::new(),
            node_timeout,
            agents: None,
        })
        .await
        .expect("cluster pool starts");
        let fake = FakeControlPlane::new();
        let config = GatewayConfig {
            listen: "127.0.0.1:0".into(),
            reader_listen: Some("127.0.0.1:0".into()),
            threads: 1,
            ..Default::default()
        };
        let gateway = Gateway::bind_with(config, ControlPlane::Fake(fake.clone())).await.unwrap();
        let addr = gateway.local_addr().unwrap();
        let reader_addr = gateway.reader_addr().expect("a reader endpoint");
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(gateway.run(stopped));
        Setup { fake, addr, reader_addr, pool, _dir: dir, _stop: stop }
    }

    /// A cache at database `db` of the cluster, as the control plane makes one.
    async fn cache(&self, db: u32) -> CacheId {
        self.cache_with_events(db, "").await
    }

    /// … with keyspace notifications (`notify-keyspace-events` flags).
    async fn cache_with_events(&self, db: u32, events: &str) -> CacheId {
        let id = CacheId::generate();
        let acl = TenantAcl {
            user: id.acl_user(),
            password: format!("pw-{id}"),
            db,
            databases: 1,
            placement: Default::default(),
        };
        self.pool.create_tenant(CLUSTER_TARGET, &acl).await.unwrap();
        let nodes = self.pool.cluster().unwrap().nodes();
        self.fake.add_route(TenantRoute {
            cache_id: id.clone(),
            cache_name: format!("c{db}"),
            node_addr: nodes[0].addr(),
            cluster_nodes: nodes.iter().map(|n| n.addr()).collect(),
            db,
            databases: 1,
            acl_user: acl.user,
            acl_password: acl.password,
            observer_user: shoal_engine::node::OBSERVER_USER.into(),
            observer_password: nodes[0].observer_password().into(),
            keyspace_events: events.into(),
            limits: Default::default(),
            storage_full: false,
            storage_bytes: 0,
            storage_sampled_at_ms: 0,
            eviction_policy: "noeviction".into(),
            dedicated: false,
        });
        id
    }

    async fn client(&self, cache: &CacheId) -> MultiplexedConnection {
        connect(&format!("redis://default:{}@{}/", self.fake.token(cache), self.addr)).await
    }

    async fn reader(&self, cache: &CacheId) -> MultiplexedConnection {
        connect(&format!("redis://default:{}@{}/", self.fake.token(cache), self.reader_addr)).await
    }

    /// Keys of database `db` on each primary, straight from the nodes.
    async fn keys_per_primary(&self, db: u32) -> Vec<u64> {
        let status = self.pool.cluster_status().await.unwrap();
        let mut out = Vec::new();
        for shard in status.shards.iter().filter(|s| s.slot_count() > 0) {
            let name = shard.primary.as_ref().unwrap().name.clone().unwrap();
            let node = self.pool.cluster().unwrap().node(&name).unwrap();
            let mut c = node.admin_client().unwrap().get_multiplexed_async_connection().await.unwrap();
            let _: () = redis::cmd("SELECT").arg(db).query_async(&mut c).await.unwrap();
            out.push(redis::cmd("DBSIZE").query_async(&mut c).await.unwrap());
        }
        out
    }
}

async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn q<T: redis::FromRedisValue>(c: &mut MultiplexedConnection, args: &[&str]) -> redis::RedisResult<T> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(c).await
}

fn code(e: redis::RedisError) -> String {
    e.code().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_caches_keys_spread_over_the_shards_and_read_back_through_one_endpoint() {
    let s = Setup::start().await;
    let cache = s.cache(1).await;
    let other = s.cache(2).await;
    let mut c = s.client(&cache).await;
    let mut pipe = redis::pipe();
    for i in 0..300 {
        pipe.cmd("SET").arg(format!("key:{i}")).arg(i).ignore();
    }
    let _: () = pipe.query_async(&mut c).await.unwrap();
    let mut pipe = redis::pipe();
    for i in 0..300 {
        pipe.cmd("GET").arg(format!("key:{i}"));
    }
    let values: Vec<u32> = pipe.query_async(&mut c).await.unwrap();
    assert_eq!(values, (0..300).collect::<Vec<_>>(), "a pipeline over every shard comes back in order");
    let per_primary = s.keys_per_primary(1).await;
    assert_eq!(per_primary.len(), 3);
    assert!(per_primary.iter().all(|&n| n > 50), "keys spread over the shards: {per_primary:?}");
    assert_eq!(q::<u64>(&mut c, &["DBSIZE"]).await.unwrap(), 300, "DBSIZE counts every shard");
    let mut keys: Vec<String> = q(&mut c, &["KEYS", "*"]).await.unwrap();
    keys.sort();
    assert_eq!(keys.len(), 300);
    let mut scanned = std::collections::HashSet::new();
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("COUNT").arg(50).query_async(&mut c).await.unwrap();
        scanned.extend(page);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    assert_eq!(scanned.len(), 300, "SCAN walks every shard");
    let random: Option<String> = q(&mut c, &["RANDOMKEY"]).await.unwrap();
    assert!(random.is_some_and(|k| k.starts_with("key:")));

    // The other cache sees none of it, on any shard.
    let mut o = s.client(&other).await;
    assert_eq!(q::<u64>(&mut o, &["DBSIZE"]).await.unwrap(), 0);
    assert_eq!(q::<Option<String>>(&mut o, &["GET", "key:1"]).await.unwrap(), None);

    let _: () = q(&mut c, &["FLUSHDB"]).await.unwrap();
    assert_eq!(s.keys_per_primary(1).await, vec![0, 0, 0], "FLUSHDB empties every shard");
}

#[tokio::test]
async fn multi_key_commands_are_split_or_refused_as_elasticache_serverless_does() {
    let s = Setup::start().await;
    let cache = s.cache(1).await;
    let mut c = s.client(&cache).await;
    let _: () = q(&mut c, &["MSET", "a", "1", "b", "2", "c", "3", "{a}x", "4"]).await.unwrap();
    let got: Vec<Option<String>> = q(&mut c, &["MGET", "c", "nope", "a", "{a}x", "b"]).await.unwrap();
    assert_eq!(got, [Some("3".into()), None, Some("1".into()), Some("4".into()), Some("2".into())]);
    assert_eq!(q::<u32>(&mut c, &["EXISTS", "a", "b", "a", "nope"]).await.unwrap(), 3);
    assert_eq!(q::<u32>(&mut c, &["TOUCH", "a", "b", "c"]).await.unwrap(), 3);
    assert_eq!(q::<u32>(&mut c, &["DEL", "a", "b"]).await.unwrap(), 2);
    assert_eq!(q::<u32>(&mut c, &["UNLINK", "c", "{a}x", "gone"]).await.unwrap(), 2);

    // Anything else over several slots is refused, and changes nothing.
    let _: () = q(&mut c, &["SADD", "s1", "x"]).await.unwrap();
    let _: () = q(&mut c, &["SADD", "s2", "y"]).await.unwrap();
    let err = q::<u32>(&mut c, &["SUNIONSTORE", "dest", "s1", "s2"]).await.unwrap_err();
    assert_eq!(code(err), "CROSSSLOT");
    assert_eq!(q::<u32>(&mut c, &["EXISTS", "dest"]).await.unwrap(), 0);
    let err = q::<u32>(&mut c, &["EVAL", "return 1", "2", "s1", "s2"]).await.unwrap_err();
    assert_eq!(code(err), "CROSSSLOT");
    // Hash tags put keys in one slot, as usual.
    let _: () = q(&mut c, &["SADD", "{u}1", "x"]).await.unwrap();
    let _: () = q(&mut c, &["SADD", "{u}2", "y"]).await.unwrap();
    assert_eq!(q::<u32>(&mut c, &["SUNIONSTORE", "{u}d", "{u}1", "{u}2"]).await.unwrap(), 2);
    let n: u32 = q(&mut c, &["EVAL", "return redis.call('SCARD', KEYS[1])", "1", "{u}d"]).await.unwrap();
    assert_eq!(n, 2);
}

#[tokio::test]
async fn transactions_run_on_one_shard_and_refuse_keys_of_another() {
    let s = Setup::start().await;
    let cache = s.cache(1).await;
    let mut c = s.client(&cache).await;
    let (a, b): (String, u32) = redis::pipe()
        .atomic()
        .cmd("PING")
        .cmd("SET")
        .arg("{t}a")
        .arg("1")
        .ignore()
        .cmd("INCR")
        .arg("{t}b")
        .cmd("GET")
        .arg("{t}a")
        .ignore()
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((a.as_str(), b), ("PONG", 1));
    // Raw, to see each reply: a key of another slot is refused at once, then EXEC aborts.
    let mut raw = redis::Client::open(format!("redis://default:{}@{}/", s.fake.token(&cache), s.addr))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let replies: Vec<redis::RedisResult<Value>> = {
        let mut out = Vec::new();
        for args in [vec!["MULTI"], vec!["SET", "x1", "1"], vec!["SET", "y2", "2"], vec!["EXEC"]] {
            out.push(q::<Value>(&mut raw, &args).await);
        }
        out
    };
    assert!(matches!(replies[1], Ok(Value::SimpleString(ref s)) if s == "QUEUED"), "{replies:?}");
    let crossslot = replies[2].as_ref().unwrap_err();
    assert_eq!(crossslot.code(), Some("CROSSSLOT"));
    assert_eq!(replies[3].as_ref().unwrap_err().code(), Some("EXECABORT"));
    assert_eq!(q::<Option<String>>(&mut c, &["GET", "x1"]).await.unwrap(), None, "nothing ran");
    // A nested MULTI is refused and the transaction goes on, as on Valkey.
    assert_eq!(q::<String>(&mut raw, &["MULTI"]).await.unwrap(), "OK");
    let nested = q::<Value>(&mut raw, &["MULTI"]).await.unwrap_err();
    assert!(nested.to_string().contains("can not be nested"), "{nested}");
    let _: Value = q(&mut raw, &["SET", "{n}1", "1"]).await.unwrap();
    let done: Vec<String> = q(&mut raw, &["EXEC"]).await.unwrap();
    assert_eq!(done, ["OK"]);
}

#[tokio::test]
async fn pub_sub_reaches_subscribers_whatever_node_they_are_on() {
    let s = Setup::start().await;
    let cache = s.cache(1).await;
    let client =
        redis::Client::open(format!("redis://default:{}@{}/", s.fake.token(&cache), s.addr)).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe("news").await.unwrap();
    sub.psubscribe("n*").await.unwrap();
    let mut c = s.client(&cache).await;
    let receivers: u32 = q(&mut c, &["PUBLISH", "news", "hello"]).await.unwrap();
    assert!(receivers >= 1);
    use futures_util::StreamExt;
    let mut messages = sub.on_message();
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.next()).await.unwrap().unwrap();
        got.push((m.get_channel_name().to_string(), m.get_payload::<String>().unwrap()));
    }
    got.sort();
    assert_eq!(got, [("news".to_string(), "hello".to_string()), ("news".into(), "hello".into())]);

    // Sharded pub/sub: each channel on its shard (names go upstream in the cache's namespace,
    // so six of them land on more than one shard).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let token = s.fake.token(&cache);
    for channel in ["orders", "stock", "alerts", "news", "prices", "users"] {
        let mut raw = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let auth = format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{token}\r\n", token.len());
        let ssub = format!("*2\r\n$10\r\nSSUBSCRIBE\r\n${}\r\n{channel}\r\n", channel.len());
        raw.write_all(format!("{auth}{ssub}").as_bytes()).await.unwrap();
        let confirmed =
            format!("+OK\r\n*3\r\n$10\r\nssubscribe\r\n${}\r\n{channel}\r\n:1\r\n", channel.len());
        let mut buf = vec![0u8; 256];
        let mut got = Vec::new();
        while got.len() < confirmed.len() {
            let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(String::from_utf8_lossy(&got), confirmed);
        let receivers: u32 = q(&mut c, &["SPUBLISH", channel, "hi"]).await.unwrap();
        assert_eq!(receivers, 1, "{channel}");
        let message = format!("*3\r\n$8\r\nsmessage\r\n${}\r\n{channel}\r\n$2\r\nhi\r\n", channel.len());
        let mut got = Vec::new();
        while got.len() < message.len() {
            let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(String::from_utf8_lossy(&got), message);
    }
}

#[tokio::test]
async fn the_reader_endpoint_reads_from_replicas_and_refuses_writes() {
    let s = Setup::start().await;
    let cache = s.cache(1).await;
    let mut c = s.client(&cache).await;
    for i in 0..30 {
        let _: () = q(&mut c, &["SET", &format!("k{i}"), "v"]).await.unwrap();
    }
    let _: u32 = q(&mut c, &["WAIT", "1", "1000"]).await.unwrap();
    let mut r = s.reader(&cache).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg((0..30).map(|i| format!("k{i}")).collect::<Vec<_>>())
            .query_async(&mut r)
            .await
            .unwrap();
        if values.iter().all(|v| v.as_deref() == Some("v")) {
            break;
        }
        assert!(Instant::now() < deadline, "replicas never caught up: {values:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = q::<()>(&mut r, &["SET", "k1", "w"]).await.unwrap_err();
    assert_eq!(code(err), "READONLY");
    assert_eq!(q::<String>(&mut c, &["GET", "k1"]).await.unwrap(), "v");
}

/// The rebalance checker: writers keep rewriting known keys (each with a version) and
/// reading them back through the gateway while a shard is added (slots move onto it) and
/// then drained and removed. Every reply is checked: no error, no lost write, no stale read.
#[tokio::test]
async fn slots_move_under_load_without_an_error_or_a_lost_write() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const KEYS: usize = 100_000;
    const VALUE: usize = 200;
    const WRITERS: usize = 4;
    // Long enough that no primary is failed over by a loaded machine: this is about moves.
    let s = Setup::with_node_timeout(Duration::from_secs(5)).await;
    let cache = s.cache(1).await;
    let key = |i: usize| format!("k:{i}");
    let value = |i: usize, version: u64| format!("{version}:{}", "x".repeat(VALUE - 12 + (i % 10)));
    let mut c = s.client(&cache).await;
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(2000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("SET").arg(key(i)).arg(value(i, 0)).ignore();
        }
        let _: () = pipe.query_async(&mut c).await.unwrap();
    }
    let versions: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (versions, stop) = (versions.clone(), stop.clone());
        let mut conn = s.client(&cache).await;
        writers.push(tokio::spawn(async move {
            let (mut ops, mut errors, mut stale) = (0u64, Vec::new(), 0u64);
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let version = versions[i].load(Ordering::Relaxed) + 1;
                match q::<()>(&mut conn, &["SET", &key(i), &value(i, version)]).await {
                    Ok(()) => versions[i].store(version, Ordering::Relaxed),
                    Err(e) => errors.push(e.to_string()),
                }
                let j = (i * 7919 + 13) % KEYS / WRITERS * WRITERS + w;
                match q::<String>(&mut conn, &["GET", &key(j)]).await {
                    Ok(v) if v == value(j, versions[j].load(Ordering::Relaxed)) => {}
                    Ok(_) => stale += 1,
                    Err(e) => errors.push(e.to_string()),
                }
                ops += 2;
                i = (i + WRITERS * 101) % KEYS;
            }
            (ops, errors, stale)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let began = Instant::now();
    let shard = s.pool.add_shard().await.expect("a shard is added");
    let added = began.elapsed();
    assert_eq!(s.keys_per_primary(1).await.len(), 4, "the new shard took slots");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let began = Instant::now();
    s.pool.remove_shard(&shard).await.expect("the shard is drained and removed");
    let drained = began.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ops, mut errors, mut stale) = (0, Vec::new(), 0);
    for w in writers {
        let (o, e, st) = w.await.unwrap();
        ops += o;
        errors.extend(e);
        stale += st;
    }
    // Every key holds its last acknowledged version (read back with split MGETs).
    let mut lost = 0;
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(1000) {
        let got: Vec<Option<String>> = redis::cmd("MGET")
            .arg(chunk.iter().map(|&i| key(i)).collect::<Vec<_>>())
            .query_async(&mut c)
            .await
            .unwrap();
        for (&i, v) in chunk.iter().zip(got) {
            if v.as_deref() != Some(value(i, versions[i].load(Ordering::Relaxed)).as_str()) {
                lost += 1;
            }
        }
    }
    let bytes = KEYS * (VALUE + 8);
    println!(
        "FIGURE rebalance under load: {ops} checked requests; shard added in {added:?} (2 nodes started and joined, \
         then a quarter of ~{} MB moved onto it), drained in {drained:?}; {} errors, {stale} stale reads, {lost} lost writes",
        bytes / 1_000_000,
        errors.len()
    );
    println!(
        "FIGURE time per GB moved (debug build, 2 cores): add {:.0} s/GB (joining included), drain {:.0} s/GB",
        added.as_secs_f64() / (bytes as f64 / 4.0 / 1e9),
        drained.as_secs_f64() / (bytes as f64 / 4.0 / 1e9)
    );
    assert!(errors.is_empty(), "errors: {:?}", &errors[..errors.len().min(5)]);
    assert_eq!((stale, lost), (0, 0));
    assert!(ops > 100, "the checker ran during the moves: {ops}");
}

/// Failover under load: writers keep writing known keys through the gateway while the
/// primary of one shard is killed with SIGKILL. The cache survives (its replica is promoted,
/// writes succeed again, the killed node comes back as a replica); how long clients saw
/// errors and how many acknowledged writes were lost is printed (replication is
/// asynchronous: a write acknowledged just before the kill may not have reached the replica).
#[tokio::test]
async fn a_primary_killed_under_load_costs_seconds_of_errors_and_the_cache_lives_on() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    let node_timeout = Duration::from_secs(2);
    let s = Setup::with_node_timeout(node_timeout).await;
    let cache = s.cache(1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let errors = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (stop, acked, errors) = (stop.clone(), acked.clone(), errors.clone());
        let url = format!("redis://default:{}@{}/", s.fake.token(&cache), s.addr);
        writers.push(tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let mut conn = None;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if conn.is_none() {
                    conn = client.get_multiplexed_async_connection().await.ok();
                }
                let key = format!("w{w}:{i}");
                let result = match conn.as_mut() {
                    Some(c) => q::<()>(c, &["SET", &key, "v"]).await,
                    None => Err(redis::RedisError::from((redis::ErrorKind::IoError, "no connection"))),
                };
                match result {
                    Ok(()) => acked.lock().unwrap().push(key),
                    Err(e) => {
                        errors.lock().unwrap().push(Instant::now());
                        if e.is_connection_dropped() || e.is_io_error() {
                            conn = None;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                i += 1;
            }
        }));
    }
    // A subscriber whose subscriptions live on the shard that owns slot 0 (the one killed).
    use tokio::io::AsyncWriteExt;
    let token = s.fake.token(&cache);
    let mut sub = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    let auth = format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{token}\r\n", token.len());
    sub.write_all(format!("{auth}*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nnews\r\n").as_bytes()).await.unwrap();
    read_until(&mut sub, ":1\r\n").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = s.pool.cluster_status().await.unwrap();
    let first = status.shards.iter().find(|sh| sh.slots.iter().any(|&(a, _)| a == 0)).unwrap();
    let victim = first.primary.as_ref().unwrap().name.clone().unwrap();
    let pid = s.pool.cluster().unwrap().node(&victim).unwrap().pid().unwrap();
    let killed = Instant::now();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // Until writes have gone through for a while after the last error.
    let deadline = killed + 10 * node_timeout;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let last = errors.lock().unwrap().last().copied();
        if last.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            break;
        }
        assert!(Instant::now() < deadline, "writes still fail {:?} after the kill", killed.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    let window = match (errors.first(), errors.last()) {
        (Some(first), Some(last)) => *last - *first,
        _ => Duration::ZERO,
    };
    let acked = acked.lock().unwrap().clone();
    let mut c = s.client(&cache).await;
    let mut lost = 0;
    for chunk in acked.chunks(1000) {
        let n: usize = redis::cmd("EXISTS").arg(chunk).query_async(&mut c).await.unwrap();
        lost += chunk.len() - n;
    }
    println!(
        "FIGURE failover through the gateway (node timeout {node_timeout:?}, debug build): errors for {window:?} \
         ({} failed requests), {lost} of {} acknowledged writes lost",
        errors.len(),
        acked.len()
    );
    // The killed node is back, as a replica of the promoted one.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = s.pool.cluster_status().await.unwrap();
        let back = status.shards.iter().flat_map(|s| &s.replicas).any(|n| {
            n.name.as_deref() == Some(victim.as_str())
                && n.health == "online"
                && n.role == shoal_engine::Role::Replica
        });
        if back {
            break;
        }
        assert!(Instant::now() < deadline, "{victim} did not come back as a replica: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(window < 5 * node_timeout, "errors for {window:?}");

    // The subscriber's connection lived through it: its subscription moved to the promoted
    // replica, where PUBLISH finds it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut published = 0;
    while published != 1 {
        assert!(Instant::now() < deadline, "PUBLISH still reaches {published} subscribers");
        published = q(&mut c, &["PUBLISH", "news", "after the failover"]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    read_until(&mut sub, "after the failover\r\n").await;
}

/// What a node sees of its own keys only — INFO keyspace, keyspace notifications,
/// client-side caching invalidations — is gathered from every shard.
#[tokio::test]
async fn node_local_views_are_gathered_from_every_shard() {
    use futures_util::StreamExt;
    let s = Setup::start().await;
    for node in s.pool.cluster().unwrap().nodes() {
        let mut c = node.admin_client().unwrap().get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg("KEA")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let cache = s.cache_with_events(1, "KEA").await;
    let mut c = s.client(&cache).await;
    // Keys on each of the three shards: slots 3300 and 3168, 7365, 15495 11298 and 15363.
    let keys = ["a", "b", "c", "d", "e", "f"];
    let client =
        redis::Client::open(format!("redis://default:{}@{}/", s.fake.token(&cache), s.addr)).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.psubscribe("__keyspace@0__:*").await.unwrap();
    // Keyspace channels subscribed by name hear every shard too.
    let mut named = client.get_async_pubsub().await.unwrap();
    named.subscribe(&["__keyspace@0__:f", "__keyevent@0__:set"]).await.unwrap();
    for k in keys {
        let _: () = q(&mut c, &["SET", k, "v"]).await.unwrap();
    }
    let _: () = q(&mut c, &["EXPIRE", "a", "100"]).await.unwrap();
    let mut events = sub.on_message();
    let mut got = Vec::new();
    while got.len() < keys.len() {
        let m = tokio::time::timeout(Duration::from_secs(5), events.next()).await.expect("an event").unwrap();
        let channel = m.get_channel_name().to_string();
        if m.get_payload::<String>().unwrap() == "set" {
            got.push(channel);
        }
    }
    got.sort();
    assert_eq!(got, keys.map(|k| format!("__keyspace@0__:{k}")));
    let mut events = named.on_message();
    let mut heard = Vec::new();
    while heard.len() < keys.len() + 1 {
        let m = tokio::time::timeout(Duration::from_secs(5), events.next()).await.expect("an event").unwrap();
        heard.push(format!("{} {}", m.get_channel_name(), m.get_payload::<String>().unwrap()));
    }
    drop(events);
    heard.sort();
    let mut want: Vec<String> = keys.iter().map(|k| format!("__keyevent@0__:set {k}")).collect();
    want.push("__keyspace@0__:f set".into());
    assert_eq!(heard, want, "SUBSCRIBE to keyspace channels by name");
    let info: String = q(&mut c, &["INFO", "keyspace"]).await.unwrap();
    assert!(info.contains("db0:keys=6,expires=1,"), "{info}");

    // A key read with tracking on is invalidated when it changes, whatever its shard.
    let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let mut tracked =
        redis::Client::open(format!("redis://default:{}@{}/?protocol=resp3", s.fake.token(&cache), s.addr))
            .unwrap()
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new().set_push_sender(tx),
            )
            .await
            .unwrap();
    let _: () = q(&mut tracked, &["CLIENT", "TRACKING", "ON"]).await.unwrap();
    for k in keys {
        let _: String = q(&mut tracked, &["GET", k]).await.unwrap();
    }
    for k in keys {
        let _: () = q(&mut c, &["SET", k, "w"]).await.unwrap();
    }
    let mut invalidated = Vec::new();
    while invalidated.len() < keys.len() {
        let push = tokio::time::timeout(Duration::from_secs(5), pushes.recv())
            .await
            .expect("an invalidation")
            .unwrap();
        if let Some(Value::Array(ks)) = push.data.first() {
            for k in ks {
                if let Value::BulkString(b) = k {
                    invalidated.push(String::from_utf8_lossy(b).into_owned());
                }
            }
        }
    }
    invalidated.sort();
    invalidated.dedup();
    assert_eq!(invalidated, keys);
}

/// The keys the gateway routes a command by are the keys Valkey finds in it
/// (`COMMAND GETKEYS`), for every command whose keys move.
#[tokio::test]
async fn commands_are_routed_by_the_keys_valkey_finds_in_them() {
    let s = Setup::start().await;
    let node = &s.pool.cluster().unwrap().nodes()[0];
    let mut admin = node.admin_client().unwrap().get_multiplexed_async_connection().await.unwrap();
    let cases: &[&[&str]] = &[
        &["EVAL", "return 1", "2", "k1", "k2", "arg"],
        &["EVALSHA_RO", "abc", "1", "k1", "arg"],
        &["SINTERCARD", "2", "k1", "k2", "LIMIT", "1"],
        &["ZUNION", "2", "k1", "k2", "WEIGHTS", "1", "2"],
        &["ZUNIONSTORE", "d", "2", "k1", "k2"],
        &["ZDIFFSTORE", "d", "1", "k1"],
        &["LMPOP", "2", "k1", "k2", "LEFT"],
        &["BLMPOP", "0", "2", "k1", "k2", "LEFT"],
        &["BZMPOP", "1", "1", "k1", "MIN"],
        &["MSETEX", "2", "k1", "v1", "k2", "v2", "EX", "10"],
        &["SORT", "k1", "LIMIT", "0", "1", "STORE", "d"],
        &["SORT_RO", "k1"],
        &["GEORADIUS", "k1", "0", "0", "1", "km", "STORE", "d"],
        &["GEORADIUSBYMEMBER", "k1", "m", "1", "km", "STOREDIST", "d"],
        &["XREAD", "COUNT", "1", "STREAMS", "k1", "k2", "0", "0"],
        &["XREADGROUP", "GROUP", "g", "c", "STREAMS", "k1", "k2", ">", ">"],
    ];
    let table = shoal_commands::table();
    for args in cases {
        let found: Vec<String> =
            redis::cmd("COMMAND").arg("GETKEYS").arg(*args).query_async(&mut admin).await.unwrap();
        let argv: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let spec = table.get(&args[0].to_lowercase()).unwrap();
        let routed: Vec<String> =
            spec.routing_keys(&argv).into_iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
        let (mut a, mut b) = (found.clone(), routed.clone());
        a.sort();
        b.sort();
        assert_eq!(a, b, "{args:?}");
    }
}

/// A command split over shards, or sent to every shard, is one command to the cache's
/// usage: billed once, as on a standalone pool.
#[tokio::test]
async fn a_split_command_is_metered_once() {
    let s = Setup::start().await;
    let cache = s.cache(1).await;
    let mut c = s.client(&cache).await;
    let _: () = q(&mut c, &["MSET", "a", "1", "b", "2", "c", "3"]).await.unwrap();
    let _: Vec<Option<String>> = q(&mut c, &["MGET", "a", "b", "c", "d"]).await.unwrap();
    let _: u32 = q(&mut c, &["DEL", "a", "b", "c"]).await.unwrap();
    let _: u32 = q(&mut c, &["DBSIZE"]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let commands = loop {
        let batches = s.fake.usage();
        let commands: u64 = batches
            .iter()
            .flat_map(|b| &b.usage)
            .filter(|u| u.cache_id == cache)
            .map(|u| u.counters.commands)
            .sum();
        if commands >= 4 || Instant::now() > deadline {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let batches = s.fake.usage();
            break batches
                .iter()
                .flat_map(|b| &b.usage)
                .filter(|u| u.cache_id == cache)
                .map(|u| u.counters.commands)
                .sum::<u64>();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(commands, 4, "MSET, MGET, DEL over three shards and DBSIZE: four commands");
}

/// Reads from `raw` until what came ends with `end` (5 s at most), and what came.
async fn read_until(raw: &mut tokio::net::TcpStream, end: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1024];
    while !got.ends_with(end.as_bytes()) {
        let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads from `raw` until `want` bytes came (5 s at most), and what came.
async fn read_exactly(raw: &mut tokio::net::TcpStream, want: usize) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1024];
    while got.len() < want {
        let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_graceful_failover_and_restart_of_a_primary_is_invisible_to_sessions() {
    use tokio::io::AsyncWriteExt;
    let s = Setup::start().await;
    let cache = s.cache(1).await;
    let token = s.fake.token(&cache);
    // A RESP2 subscriber, whose subscriptions live on the primary of slot 0.
    let mut raw = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let auth = format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{token}\r\n", token.len());
    raw.write_all(format!("{auth}*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nnews\r\n").as_bytes()).await.unwrap();
    let confirmed = "+OK\r\n*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n";
    assert_eq!(read_exactly(&mut raw, confirmed.len()).await, confirmed);
    let mut c = s.client(&cache).await;
    let _: () = q(&mut c, &["CLIENT", "SETNAME", "survivor"]).await.unwrap();
    for i in 0..20 {
        let _: () = q(&mut c, &["SET", &format!("k{i}"), "v"]).await.unwrap();
    }
    let receivers: u32 = q(&mut c, &["PUBLISH", "news", "before"]).await.unwrap();
    assert_eq!(receivers, 1);
    let message = |m: &str| format!("*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n${}\r\n{m}\r\n", m.len());
    assert_eq!(read_exactly(&mut raw, message("before").len()).await, message("before"));

    // The shard of slot 0 fails over to its replica (as the engine's heal does), then its old
    // primary restarts.
    let status = s.pool.cluster_status().await.unwrap();
    let shard = status.shards.iter().find(|s| s.slots.iter().any(|&(a, _)| a == 0)).unwrap();
    let cluster = s.pool.cluster().unwrap();
    let old = cluster.node(shard.primary.as_ref().unwrap().name.as_ref().unwrap()).unwrap();
    let new = cluster.node(shard.replicas[0].name.as_ref().unwrap()).unwrap();
    let role = |node: Arc<shoal_engine::node::Node>| async move {
        let mut admin = node.admin_client().unwrap().get_multiplexed_async_connection().await.unwrap();
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut admin).await.unwrap();
        matches!(&role[0], Value::BulkString(r) if r == b"master")
    };
    let mut admin = new.admin_client().unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLUSTER").arg("FAILOVER").query_async(&mut admin).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Until the replica says it is the primary and the old primary says it is not.
    while !role(new.clone()).await || role(old.clone()).await {
        assert!(Instant::now() < deadline, "the failover did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = old.pid().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    while old.pid() == Some(pid) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The same connections carry on: no error, the subscription followed the shard (one
    // receiver where the publish goes, no confirmation repeated), the connection's name kept.
    for i in 0..20 {
        let got: String = q(&mut c, &["GET", &format!("k{i}")]).await.unwrap();
        assert_eq!(got, "v");
    }
    let _: () = q(&mut c, &["SET", "after", "v"]).await.unwrap();
    let dbsize: u64 = q(&mut c, &["DBSIZE"]).await.unwrap();
    assert_eq!(dbsize, 21);
    let name: String = q(&mut c, &["CLIENT", "GETNAME"]).await.unwrap();
    assert_eq!(name, "survivor");
    let receivers: u32 = q(&mut c, &["PUBLISH", "news", "after"]).await.unwrap();
    assert_eq!(receivers, 1, "the subscription is on the shard's new primary");
    assert_eq!(read_exactly(&mut raw, message("after").len()).await, message("after"));
}

#[tokio::test]
async fn a_neighbours_poisoning_script_and_its_heal_leave_a_caches_pub_sub_as_it_was() {
    use shoal_gateway::cluster::key_slot;
    use tokio::io::AsyncWriteExt;
    let s = Setup::start().await;
    // The victim has keyspace notifications on: its `*` pattern covers them too.
    let (attacker, victim) = (s.cache(1).await, s.cache_with_events(2, "KEA").await);
    let token = s.fake.token(&victim);
    // A RESP3 subscriber to a channel and to every channel.
    let mut raw = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let hello = format!(
        "*5\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n${}\r\n{token}\r\n",
        token.len()
    );
    let subscribe = "*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nnews\r\n*2\r\n$10\r\nPSUBSCRIBE\r\n$1\r\n*\r\n";
    raw.write_all(format!("{hello}{subscribe}").as_bytes()).await.unwrap();
    let confirmed = ">3\r\n$10\r\npsubscribe\r\n$1\r\n*\r\n:2\r\n";
    assert!(read_until(&mut raw, confirmed).await.ends_with(confirmed));
    let mut c = s.client(&victim).await;
    let message = |m: &str| {
        format!(
            ">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n${n}\r\n{m}\r\n>4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$4\r\nnews\r\n${n}\r\n{m}\r\n",
            n = m.len()
        )
    };
    let receivers: u32 = q(&mut c, &["PUBLISH", "news", "before"]).await.unwrap();
    assert_eq!(receivers, 2);
    assert_eq!(read_exactly(&mut raw, message("before").len()).await, message("before"));

    // The attacker poisons each shard's primary in turn (a key of that shard declared, two
    // keys of two slots read inside), and the engine heals each.
    let status = s.pool.cluster_status().await.unwrap();
    let mut a = s.client(&attacker).await;
    for shard in status.shards.iter().filter(|s| s.slot_count() > 0) {
        let (first, last) = shard.slots[0];
        let key = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| (first..=last).contains(&key_slot(k.as_bytes())))
            .unwrap();
        let poison = "return redis.pcall('MGET', 'x1', 'x2', 'x3', 'x4')";
        let _: redis::RedisResult<Value> = q(&mut a, &["EVAL", poison, "1", &key]).await;
        // Healed by a failover (the shard has another primary), and a keyed script on that
        // shard works again for the victim.
        let old = shard.primary.as_ref().and_then(|p| p.name.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = s.pool.cluster_status().await.unwrap();
            let moved = now
                .shards
                .iter()
                .any(|n| n.id == shard.id && n.primary.as_ref().and_then(|p| p.name.clone()) != old);
            let r: redis::RedisResult<i64> = q(&mut c, &["EVAL", "return 1", "1", &key]).await;
            if moved && r.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "not healed: {r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let numsub: Vec<Value> = q(&mut c, &["PUBSUB", "NUMSUB", "news"]).await.unwrap();
    assert_eq!(numsub[1], Value::Int(1), "the channel's subscription is still there");
    let receivers: u32 = q(&mut c, &["PUBLISH", "news", "after"]).await.unwrap();
    assert_eq!(receivers, 2, "the victim's subscriptions are where its publishes go");
    assert_eq!(read_exactly(&mut raw, message("after").len()).await, message("after"));
}
