//! The gateway as an application sees it: a faithful Valkey 9 where allowed, a clear error
//! where isolation forbids. Real clients, the real binary, real Valkey nodes.

use crate::support::{raw, shared, ShoalDev};
use redis::{AsyncCommands, Value};
use reqwest::Method;
use std::time::Duration;

async fn query(c: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> redis::RedisResult<Value> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(c).await
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => s.clone(),
        other => format!("{other:?}"),
    }
}

async fn cache_with_token(dev: &ShoalDev, name: &str, databases: u32) -> (String, String) {
    let (status, cache) = dev
        .api(Method::POST, "/v1/caches", Some(serde_json::json!({"name": name, "databases": databases})))
        .await;
    assert_eq!(status, 201, "{cache}");
    let id = cache["id"].as_str().unwrap().to_string();
    let token = dev.mint_token(&id).await;
    (id, token)
}

#[tokio::test]
async fn denied_commands_get_noperm_naming_the_command_and_abort_transactions() {
    let dev = shared().await;
    let (_, token) = cache_with_token(&dev, "deny", 1).await;
    let mut c = dev.client(&token).await.unwrap();
    for args in [
        &["CONFIG", "RESETSTAT"][..],
        &["config", "set", "maxmemory", "1"],
        &["DEBUG", "SLEEP", "0"],
        &["SHUTDOWN"],
        &["MONITOR"],
        &["SAVE"],
        &["BGSAVE"],
        &["REPLICAOF", "127.0.0.1", "1"],
        &["ACL", "SETUSER", "x", "on"],
        &["ACL", "LIST"],
        &["FUNCTION", "FLUSH"],
        &["SCRIPT", "FLUSH"],
        &["SWAPDB", "0", "1"],
        &["CLIENT", "PAUSE", "100"],
        &["SLOWLOG", "GET"],
        &["MEMORY", "DOCTOR"],
        &["MIGRATE", "127.0.0.1", "1", "k", "0", "1"],
    ] {
        let err = query(&mut c, args).await.unwrap_err();
        assert_eq!(err.code(), Some("NOPERM"), "{args:?}: {err}");
        let shown = if args[0].eq_ignore_ascii_case("config") || args[0].eq_ignore_ascii_case("acl") {
            format!("{} {}", args[0], args[1]).to_uppercase()
        } else {
            args[0].to_uppercase()
        };
        assert!(err.to_string().contains(&shown), "{args:?}: {err}");
    }
    // Inline and mixed case are the same commands.
    let out = raw(dev.resp_port, format!("AUTH {token}\r\ncOnFiG sEt maxmemory 1\r\n").as_bytes()).await;
    assert!(
        String::from_utf8_lossy(&out).contains("-NOPERM the CONFIG SET command"),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // Inside MULTI, a refused command dooms the transaction, as in Valkey.
    let mut pipe = redis::pipe();
    pipe.cmd("MULTI").cmd("SET").arg("t").arg("1").cmd("CONFIG").arg("SET").arg("x").arg("1").cmd("EXEC");
    let err = pipe.query_async::<Value>(&mut c).await.unwrap_err();
    assert!(err.to_string().contains("EXECABORT") || err.to_string().contains("NOPERM"), "{err}");
    assert_eq!(c.get::<_, Option<String>>("t").await.unwrap(), None, "the aborted transaction ran");
    // And the connection still works.
    assert_eq!(query(&mut c, &["PING"]).await.unwrap(), Value::SimpleString("PONG".into()));
}

#[tokio::test]
async fn databases_are_virtual_and_flushall_stays_inside_the_cache() {
    let dev = shared().await;
    let (_, token_a) = cache_with_token(&dev, "multi-db", 2).await;
    let (_, token_b) = cache_with_token(&dev, "neighbour", 1).await;
    let mut a = dev.client(&token_a).await.unwrap();
    let mut b = dev.client(&token_b).await.unwrap();
    let _: () = b.set("canary", "b").await.unwrap();

    // Keys of one slot (`{k}`): COPY takes two keys, which a cluster pool wants in one slot.
    let _: () = a.set("{k}", "db0").await.unwrap();
    assert_eq!(query(&mut a, &["MOVE", "{k}", "1"]).await.unwrap(), Value::Int(1));
    assert_eq!(query(&mut a, &["SELECT", "1"]).await.unwrap(), Value::Okay);
    assert_eq!(a.get::<_, String>("{k}").await.unwrap(), "db0");
    assert_eq!(query(&mut a, &["DBSIZE"]).await.unwrap(), Value::Int(1));
    assert_eq!(query(&mut a, &["COPY", "{k}", "{k}2", "DB", "0"]).await.unwrap(), Value::Int(1));
    let err = query(&mut a, &["SELECT", "2"]).await.unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    let err = query(&mut a, &["MOVE", "{k}", "5"]).await.unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");

    // INFO keyspace shows the cache's own databases, numbered from 0.
    let info = text(&query(&mut a, &["INFO", "keyspace"]).await.unwrap());
    assert!(info.contains("db0:keys=1") && info.contains("db1:keys=1"), "{info}");
    assert!(!info.contains("db2:"), "{info}");
    let info = text(&query(&mut a, &["INFO"]).await.unwrap());
    assert!(info.contains("valkey_version:9."), "{info}");
    assert!(info.contains("connected_clients:1"), "{info}");

    // FLUSHALL empties both of the cache's databases and nothing else.
    assert_eq!(query(&mut a, &["FLUSHALL"]).await.unwrap(), Value::Okay);
    assert_eq!(query(&mut a, &["DBSIZE"]).await.unwrap(), Value::Int(0));
    assert_eq!(query(&mut a, &["SELECT", "0"]).await.unwrap(), Value::Okay);
    assert_eq!(query(&mut a, &["DBSIZE"]).await.unwrap(), Value::Int(0));
    assert_eq!(b.get::<_, String>("canary").await.unwrap(), "b");
}

#[tokio::test]
async fn transactions_scripts_blocking_and_valkey_9_commands_work() {
    let dev = shared().await;
    let (_, token) = cache_with_token(&dev, "app", 1).await;
    let mut c = dev.client(&token).await.unwrap();

    // A transaction's keys share a slot (`{app}`), as a cluster pool requires.
    let (n, v): (i64, String) = redis::pipe()
        .atomic()
        .incr("{app}counter", 5)
        .set("{app}s", "x")
        .ignore()
        .get("{app}s")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((n, v.as_str()), (5, "x"));

    // A Lua token bucket (HMGET, TIME, HSET, EXPIRE).
    let bucket = r#"
        local tokens, ts = unpack(redis.call('HMGET', KEYS[1], 'tokens', 'ts'))
        local now = tonumber(redis.call('TIME')[1])
        tokens = tonumber(tokens) or tonumber(ARGV[1])
        ts = tonumber(ts) or now
        tokens = math.min(tonumber(ARGV[1]), tokens + (now - ts) * tonumber(ARGV[2]))
        local allowed = 0
        if tokens >= 1 then tokens = tokens - 1; allowed = 1 end
        redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
        redis.call('EXPIRE', KEYS[1], 60)
        return allowed"#;
    let script = redis::Script::new(bucket);
    let mut allowed = 0;
    for _ in 0..5 {
        allowed += script.key("bucket").arg(3).arg(0).invoke_async::<i64>(&mut c).await.unwrap();
    }
    assert_eq!(allowed, 3, "a bucket of 3 allows 3 of 5");

    // Blocking commands honour their timeouts and wake up on data.
    let started = std::time::Instant::now();
    let popped: Option<(String, String)> = c.blpop("empty", 0.2).await.unwrap();
    assert!(popped.is_none() && started.elapsed() >= Duration::from_millis(150));
    let mut waiter = dev.client(&token).await.unwrap();
    let wait = tokio::spawn(async move { waiter.brpop::<_, Option<(String, String)>>("jobs", 5.0).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _: () = c.lpush("jobs", "job-1").await.unwrap();
    assert_eq!(wait.await.unwrap().unwrap(), Some(("jobs".to_string(), "job-1".to_string())));

    // Valkey 9: hash field expiration, DELIFEQ.
    assert_eq!(
        query(&mut c, &["HSETEX", "h", "EX", "100", "FIELDS", "2", "f1", "a", "f2", "b"]).await.unwrap(),
        Value::Int(1)
    );
    let ttl = query(&mut c, &["HTTL", "h", "FIELDS", "1", "f1"]).await.unwrap();
    assert!(matches!(&ttl, Value::Array(v) if matches!(v[0], Value::Int(t) if t > 0 && t <= 100)), "{ttl:?}");
    let _: () = c.set("lock", "owner-1").await.unwrap();
    assert_eq!(query(&mut c, &["DELIFEQ", "lock", "owner-2"]).await.unwrap(), Value::Int(0));
    assert_eq!(query(&mut c, &["DELIFEQ", "lock", "owner-1"]).await.unwrap(), Value::Int(1));

    // A large value in one piece.
    let big = vec![b'x'; 8 * 1024 * 1024];
    let _: () = c.set("big", &big).await.unwrap();
    assert_eq!(c.get::<_, Vec<u8>>("big").await.unwrap().len(), big.len());
}

#[tokio::test]
async fn pubsub_is_namespaced_per_cache() {
    let dev = shared().await;
    let (_, token_a) = cache_with_token(&dev, "pub-a", 1).await;
    let (_, token_b) = cache_with_token(&dev, "pub-b", 1).await;

    let client_a = redis::Client::open(format!("redis://:{}@127.0.0.1:{}/", token_a, dev.resp_port)).unwrap();
    let mut sub_a = client_a.get_async_pubsub().await.unwrap();
    sub_a.psubscribe("*").await.unwrap();
    sub_a.subscribe("news").await.unwrap();

    let mut a = dev.client(&token_a).await.unwrap();
    let mut b = dev.client(&token_b).await.unwrap();
    let receivers: i64 = b.publish("news", "from-b").await.unwrap();
    assert_eq!(receivers, 0, "cache B's publish reaches nobody in cache A");
    let receivers: i64 = a.publish("news", "from-a").await.unwrap();
    assert_eq!(receivers, 2, "the pattern and the channel subscription of cache A");

    let mut stream = sub_a.on_message();
    use futures_util::StreamExt;
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(2), stream.next()).await.unwrap().unwrap();
        assert_eq!(msg.get_channel_name(), "news");
        assert_eq!(msg.get_payload::<String>().unwrap(), "from-a");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next()).await.is_err(),
        "B's message leaked"
    );
    drop(stream);

    let channels: Vec<String> = redis::cmd("PUBSUB").arg("CHANNELS").query_async(&mut a).await.unwrap();
    assert_eq!(channels, vec!["news".to_string()]);
    let channels: Vec<String> = redis::cmd("PUBSUB").arg("CHANNELS").query_async(&mut b).await.unwrap();
    assert!(channels.is_empty(), "{channels:?}");
    let numsub: Vec<(String, i64)> =
        redis::cmd("PUBSUB").arg("NUMSUB").arg("news").query_async(&mut a).await.unwrap();
    assert_eq!(numsub, vec![("news".to_string(), 1)]);
}

/// `PUBSUB NUMSUB` is asked of every node that holds the cache (each primary of a cluster) and
/// a channel's counts added up: asking for many channels is answered at once, its counts
/// exact.
#[tokio::test]
async fn pubsub_numsub_of_many_channels_is_answered_at_once() {
    let dev = shared().await;
    let (_, token) = cache_with_token(&dev, "numsub-many", 1).await;
    let client = redis::Client::open(format!("redis://:{}@127.0.0.1:{}/", token, dev.resp_port)).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe(&["ch7", "ch199999"]).await.unwrap();
    let mut c = dev.client(&token).await.unwrap();
    let channels: Vec<String> = (0..200_000).map(|i| format!("ch{i}")).collect();
    let started = std::time::Instant::now();
    let mut numsub = redis::cmd("PUBSUB");
    numsub.arg("NUMSUB").arg(&channels);
    let reply = tokio::time::timeout(Duration::from_secs(30), numsub.query_async::<Value>(&mut c))
        .await
        .expect("answered")
        .unwrap();
    eprintln!("PUBSUB NUMSUB of 200,000 channels answered in {:?}", started.elapsed());
    let counts: Vec<(String, i64)> = redis::from_redis_value(&reply).unwrap();
    assert_eq!(counts.len(), 200_000);
    assert_eq!(counts[7], ("ch7".to_string(), 1));
    assert_eq!(counts[199_999], ("ch199999".to_string(), 1));
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<i64>(), 2);
}

#[tokio::test]
async fn cluster_command_client_and_info_commands_are_scoped_to_the_cache() {
    let dev = shared().await;
    let (_, token_a) = cache_with_token(&dev, "scoped-a", 1).await;
    let (_, token_b) = cache_with_token(&dev, "scoped-b", 1).await;
    let mut a = dev.client(&token_a).await.unwrap();
    let mut a2 = dev.client(&token_a).await.unwrap();
    let mut b = dev.client(&token_b).await.unwrap();

    // CLUSTER answers as one node at the gateway's own address, owning every slot.
    let slots = query(&mut a, &["CLUSTER", "SLOTS"]).await.unwrap();
    let Value::Array(ranges) = &slots else { panic!("{slots:?}") };
    let Value::Array(range) = &ranges[0] else { panic!("{slots:?}") };
    assert_eq!((&range[0], &range[1]), (&Value::Int(0), &Value::Int(16383)));
    let Value::Array(node) = &range[2] else { panic!("{slots:?}") };
    assert_eq!(text(&node[0]), "127.0.0.1");
    assert_eq!(node[1], Value::Int(dev.resp_port as i64));
    assert_eq!(query(&mut a, &["CLUSTER", "KEYSLOT", "foo"]).await.unwrap(), Value::Int(12182));
    assert!(text(&query(&mut a, &["CLUSTER", "INFO"]).await.unwrap()).contains("cluster_state:ok"));

    // COMMAND hides what a cache may not run.
    let count = query(&mut a, &["COMMAND", "COUNT"]).await.unwrap();
    let Value::Int(count) = count else { panic!("{count:?}") };
    let all = query(&mut a, &["COMMAND"]).await.unwrap();
    let Value::Array(entries) = all else { panic!() };
    assert_eq!(entries.len() as i64, count);
    let names: Vec<String> = entries
        .iter()
        .filter_map(|e| if let Value::Array(f) = e { Some(text(&f[0])) } else { None })
        .collect();
    assert!(names.contains(&"get".to_string()) && !names.contains(&"config".to_string()), "{names:?}");
    let info = query(&mut a, &["COMMAND", "INFO", "get", "shutdown"]).await.unwrap();
    assert!(matches!(&info, Value::Array(v) if v[1] == Value::Nil), "{info:?}");

    // CLIENT LIST shows this cache's connections only; CLIENT KILL cannot reach another cache.
    let list = text(&query(&mut a, &["CLIENT", "LIST"]).await.unwrap());
    assert_eq!(list.lines().count(), 2, "{list}");
    let addr_of = |info: &str| info.split(' ').find_map(|f| f.strip_prefix("addr=")).unwrap().to_string();
    let b_addr = addr_of(&text(&query(&mut b, &["CLIENT", "INFO"]).await.unwrap()));
    assert!(!list.contains(&format!("addr={b_addr} ")), "{list}");
    assert_eq!(query(&mut a, &["CLIENT", "KILL", "ADDR", &b_addr]).await.unwrap(), Value::Int(0));
    assert!(query(&mut a, &["CLIENT", "KILL", &b_addr]).await.is_err(), "old form: no such client");
    assert_eq!(query(&mut b, &["PING"]).await.unwrap(), Value::SimpleString("PONG".into()));
    let a2_id = query(&mut a2, &["CLIENT", "ID"]).await.unwrap();
    let Value::Int(a2_id) = a2_id else { panic!() };
    assert!(list.contains(&format!("id={a2_id} ")), "{list}");
    assert_eq!(query(&mut a, &["CLIENT", "KILL", "ID", &a2_id.to_string()]).await.unwrap(), Value::Int(1));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(query(&mut a2, &["PING"]).await.is_err(), "a killed connection is closed");
    assert_eq!(text(&query(&mut a, &["ACL", "WHOAMI"]).await.unwrap()), "default");
    assert_eq!(query(&mut a, &["READONLY"]).await.unwrap(), Value::Okay);
}

#[tokio::test]
async fn real_cluster_mode_and_resp3_clients_work() {
    let dev = shared().await;
    let (_, token) = cache_with_token(&dev, "cluster-client", 1).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/cluster_and_pubsub.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(dev.resp_port.to_string())
        .arg(&token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn keyspace_notifications_reach_only_the_cache_that_enabled_them() {
    let dev = shared().await;
    let (status, problem) = dev
        .api(
            Method::POST,
            "/v1/caches",
            Some(serde_json::json!({"name": "bad", "keyspace_notifications": "Kq"})),
        )
        .await;
    assert_eq!((status, problem["field"].as_str()), (400, Some("keyspace_notifications")));
    let (status, cache) = dev
        .api(
            Method::POST,
            "/v1/caches",
            Some(serde_json::json!({"name": "events", "keyspace_notifications": "KEA"})),
        )
        .await;
    assert_eq!(status, 201, "{cache}");
    assert_eq!(cache["keyspace_notifications"], "KEA");
    let token_a = dev.mint_token(cache["id"].as_str().unwrap()).await;
    // B lands on the other node or the same one; either way it must see nothing of A.
    let (_, token_b) = cache_with_token(&dev, "no-events", 1).await;
    let (_, token_c) = cache_with_token(&dev, "neighbour-of-events", 1).await;

    let sub = |token: &str| {
        let client = redis::Client::open(format!("redis://:{}@127.0.0.1:{}/", token, dev.resp_port)).unwrap();
        async move { client.get_async_pubsub().await.unwrap() }
    };
    let mut sub_a = sub(&token_a).await;
    sub_a.psubscribe("__keyspace@0__:*").await.unwrap();
    sub_a.subscribe("__keyevent@0__:set").await.unwrap();
    let mut sub_b = sub(&token_b).await;
    sub_b.psubscribe("__keyspace@0__:*").await.unwrap();

    for token in [&token_b, &token_c] {
        let mut other = dev.client(token).await.unwrap();
        let _: () = other.set("shared-name", "other cache").await.unwrap();
    }
    let mut a = dev.client(&token_a).await.unwrap();
    let _: () = a.set("shared-name", "a").await.unwrap();

    use futures_util::StreamExt;
    let mut stream_a = sub_a.on_message();
    let mut got = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(2), stream_a.next()).await.unwrap().unwrap();
        got.push((msg.get_channel_name().to_string(), msg.get_payload::<String>().unwrap()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("__keyevent@0__:set".to_string(), "shared-name".to_string()),
            ("__keyspace@0__:shared-name".to_string(), "set".to_string())
        ]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream_a.next()).await.is_err(),
        "other caches' events leaked"
    );
    let mut stream_b = sub_b.on_message();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream_b.next()).await.is_err(),
        "a cache without keyspace notifications received events"
    );
}

/// A raw connection that logs in with `HELLO <proto> AUTH` and collects what arrives.
struct RawConn(tokio::net::TcpStream);

impl RawConn {
    async fn open(port: u16, token: &str, proto: u8) -> RawConn {
        let mut c = RawConn(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        let hello = format!("HELLO {proto} AUTH default {token}\r\n");
        let out = c.send(hello.as_bytes()).await;
        assert!(out.starts_with(if proto == 3 { "%" } else { "*" }), "{out}");
        c
    }

    /// Writes `bytes` and collects the answer (its first byte may take a few seconds on a
    /// loaded machine; the rest is what arrives until 300 ms pass quietly).
    async fn send(&mut self, bytes: &[u8]) -> String {
        use tokio::io::AsyncWriteExt;
        self.0.write_all(bytes).await.unwrap();
        self.read_within(Duration::from_secs(5)).await
    }

    /// What arrives until 300 ms pass quietly.
    async fn read(&mut self) -> String {
        self.read_within(Duration::from_millis(300)).await
    }

    async fn read_within(&mut self, first: Duration) -> String {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let mut wait = first;
        while let Ok(Ok(n)) = tokio::time::timeout(wait, self.0.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            wait = Duration::from_millis(300);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[tokio::test]
async fn client_side_caching_invalidates_only_for_the_cache() {
    let dev = shared().await;
    let (_, token) = cache_with_token(&dev, "csc", 1).await;
    let (_, other_token) = cache_with_token(&dev, "csc-other", 1).await;
    let mut writer = dev.client(&token).await.unwrap();
    let mut other = dev.client(&other_token).await.unwrap();

    // Default mode: a key the client read is invalidated once when it changes.
    let mut reader = RawConn::open(dev.resp_port, &token, 3).await;
    assert_eq!(reader.send(b"CLIENT TRACKING ON\r\n").await, "+OK\r\n");
    assert_eq!(reader.send(b"GET user:1\r\n").await, "_\r\n");
    let _: () = other.set("user:1", "another cache").await.unwrap();
    assert_eq!(reader.read().await, "", "another cache's write invalidated a key");
    let _: () = writer.set("user:1", "ada").await.unwrap();
    assert_eq!(reader.read().await, ">2\r\n$10\r\ninvalidate\r\n*1\r\n$6\r\nuser:1\r\n");
    let _: () = writer.set("user:1", "bob").await.unwrap();
    assert_eq!(reader.read().await, "", "invalidated once until read again");
    let info = reader.send(b"CLIENT TRACKINGINFO\r\n").await;
    assert!(info.contains("on"), "{info}");

    // BCAST with a prefix; NOLOOP skips the client's own writes.
    let mut bcast = RawConn::open(dev.resp_port, &token, 3).await;
    assert_eq!(bcast.send(b"CLIENT TRACKING ON BCAST PREFIX order: NOLOOP\r\n").await, "+OK\r\n");
    assert_eq!(bcast.send(b"SET order:mine 1\r\n").await, "+OK\r\n", "no invalidation for its own write");
    let _: () = writer.set("order:7", "x").await.unwrap();
    let _: () = writer.set("invoice:7", "x").await.unwrap();
    assert_eq!(bcast.read().await, ">2\r\n$10\r\ninvalidate\r\n*1\r\n$7\r\norder:7\r\n");

    // OPTIN: only keys read right after CLIENT CACHING yes are tracked.
    let mut optin = RawConn::open(dev.resp_port, &token, 3).await;
    assert_eq!(optin.send(b"CLIENT TRACKING ON OPTIN\r\n").await, "+OK\r\n");
    optin.send(b"GET a\r\n").await;
    assert_eq!(optin.send(b"CLIENT CACHING yes\r\n").await, "+OK\r\n");
    optin.send(b"GET b\r\n").await;
    let _: () = writer.set("a", "1").await.unwrap();
    let _: () = writer.set("b", "1").await.unwrap();
    assert_eq!(optin.read().await, ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nb\r\n");

    // REDIRECT to a RESP2 connection of the same cache subscribed to __redis__:invalidate.
    let mut sink = RawConn::open(dev.resp_port, &token, 2).await;
    let id = sink.send(b"CLIENT ID\r\n").await;
    let id = id.trim_start_matches(':').trim();
    let sub = sink.send(b"SUBSCRIBE __redis__:invalidate\r\n").await;
    assert!(sub.contains("__redis__:invalidate"), "{sub}");
    let mut redirected = RawConn::open(dev.resp_port, &token, 2).await;
    let cmd = format!("CLIENT TRACKING ON REDIRECT {id}\r\n");
    assert_eq!(redirected.send(cmd.as_bytes()).await, "+OK\r\n");
    assert_eq!(redirected.send(b"CLIENT GETREDIR\r\n").await, format!(":{id}\r\n"));
    redirected.send(b"GET z\r\n").await;
    let _: () = writer.set("z", "1").await.unwrap();
    assert_eq!(sink.read().await, "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$1\r\nz\r\n");
    assert_eq!(redirected.read().await, "");

    // A client of another cache is not a valid redirect target.
    let mut stranger = RawConn::open(dev.resp_port, &other_token, 3).await;
    let err = stranger.send(cmd.as_bytes()).await;
    assert!(err.starts_with("-ERR The client ID you want redirect to does not exist"), "{err}");

    // Flushing the cache invalidates everything its tracking clients hold.
    reader.send(b"GET user:1\r\n").await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut writer).await.unwrap();
    assert_eq!(reader.read().await, ">2\r\n$10\r\ninvalidate\r\n_\r\n");
}

/// Stateless commands of many connections share one upstream connection per cache (the
/// mux): replies stay in order and within their cache, connection-bound commands move a
/// session to its own connection without reordering, and a lost connection is reopened.
#[tokio::test]
async fn stateless_commands_share_an_upstream_per_cache_in_order() {
    let dev = shared().await;
    let (a_id, token_a) = cache_with_token(&dev, "mux-a", 1).await;
    let (_, token_b) = cache_with_token(&dev, "mux-b", 1).await;
    let mut tasks = Vec::new();
    for (cache, token) in [("a", &token_a), ("b", &token_b)] {
        for n in 0..6 {
            let mut c = dev.client(token).await.unwrap();
            let cache = cache.to_string();
            tasks.push(tokio::spawn(async move {
                for round in 0..20 {
                    let mut pipe = redis::pipe();
                    for i in 0..50 {
                        pipe.set(format!("k{n}:{i}"), format!("{cache}{round}:{i}")).ignore();
                        pipe.get(format!("k{n}:{i}"));
                    }
                    let got: Vec<String> = pipe.query_async(&mut c).await.unwrap();
                    let want: Vec<String> = (0..50).map(|i| format!("{cache}{round}:{i}")).collect();
                    assert_eq!(got, want);
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // One node connection of cache A ran (nearly) all of those commands. (Not on a cluster
    // pool: there each session has its own link to the shards.)
    if dev.cluster.is_none() {
        let mut busiest = 0;
        for mut admin in dev.node_admins().await {
            let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut admin).await.unwrap();
            for line in list.lines().filter(|l| l.contains(&format!(" user=t{a_id} "))) {
                let cmds = line.split(" tot-cmds=").nth(1).and_then(|r| r.split(' ').next());
                busiest = busiest.max(cmds.and_then(|c| c.parse::<u64>().ok()).unwrap_or(0));
            }
        }
        assert!(busiest >= 6 * 20 * 100, "no shared connection did the work: {busiest}");
    }

    // Local replies, muxed replies and a transaction on the session's own connection, in order.
    let mut input = crate::support::auth_command(&token_a);
    input.extend_from_slice(
        b"SET x 1\r\nACL WHOAMI\r\nGET x\r\nMULTI\r\nINCR x\r\nEXEC\r\nGET x\r\nECHO e\r\n",
    );
    let out = raw(dev.resp_port, &input).await;
    let want =
        "+OK\r\n+OK\r\n$7\r\ndefault\r\n$1\r\n1\r\n+OK\r\n+QUEUED\r\n*1\r\n:2\r\n$1\r\n2\r\n$1\r\ne\r\n";
    assert_eq!(String::from_utf8_lossy(&out), want);

    // The node drops every connection of cache A: the next commands reconnect.
    let mut c = dev.client(&token_a).await.unwrap();
    assert_eq!(c.get::<_, String>("x").await.unwrap(), "2");
    for mut admin in dev.node_admins().await {
        let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("USER")
            .arg(format!("t{a_id}"))
            .query_async(&mut admin)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut recovered = false;
    for _ in 0..3 {
        match c.get::<_, String>("x").await {
            Ok(v) => {
                assert_eq!(v, "2");
                recovered = true;
                break;
            }
            Err(e) => assert!(e.to_string().contains("cache connection lost"), "{e}"),
        }
    }
    assert!(recovered);
}

/// Requests as RESP arrays.
fn resp(commands: &[&[&str]]) -> Vec<u8> {
    commands.iter().flat_map(|c| crate::support::encode(c)).collect()
}

#[tokio::test]
async fn a_list_that_looks_like_a_pubsub_frame_is_still_a_reply() {
    let dev = shared().await;
    let (_, token) = cache_with_token(&dev, "lookalike", 1).await;

    // RESP2: the list's reply comes before SUBSCRIBE's confirmation, on the session's own
    // connection (MULTI moved it off the shared one).
    let mut c = RawConn::open(dev.resp_port, &token, 2).await;
    let out = c.send(&resp(&[&["RPUSH", "l", "unsubscribe", "x"], &["MULTI"], &["EXEC"]])).await;
    assert_eq!(out, ":2\r\n+OK\r\n*0\r\n");
    let out = c.send(&resp(&[&["LRANGE", "l", "0", "-1"], &["SUBSCRIBE", "c"]])).await;
    assert_eq!(out, "*2\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n");
    // The session is alive and subscribed: a message arrives, PING answers.
    let mut publisher = dev.client(&token).await.unwrap();
    let receivers: i64 = redis::cmd("PUBLISH").arg("c").arg("hi").query_async(&mut publisher).await.unwrap();
    assert_eq!(receivers, 1);
    assert_eq!(c.read().await, "*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n");
    assert_eq!(c.send(&resp(&[&["PING"]])).await, "*2\r\n$4\r\npong\r\n$0\r\n\r\n");

    // RESP3: only pushes are pub/sub; an array reply in between keeps its place.
    let mut c = RawConn::open(dev.resp_port, &token, 3).await;
    let out = c.send(&resp(&[&["SUBSCRIBE", "c"], &["LRANGE", "l", "0", "-1"], &["PING"]])).await;
    assert_eq!(
        out,
        ">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n*2\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n+PONG\r\n"
    );
}

/// Latencies of a victim's SET+GET round trips while `attack` runs; returns the p99.
async fn victim_p99_during(dev: &ShoalDev, victim_token: &str, seconds: f64) -> Duration {
    let mut c = dev.client(victim_token).await.unwrap();
    let mut took = Vec::new();
    let end = std::time::Instant::now() + Duration::from_secs_f64(seconds);
    let mut i = 0u64;
    while std::time::Instant::now() < end {
        let started = std::time::Instant::now();
        let _: () = c.set(format!("k{}", i % 100), i).await.unwrap();
        let v: u64 = c.get(format!("k{}", i % 100)).await.unwrap();
        assert_eq!(v, i);
        took.push(started.elapsed());
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    took.sort();
    took[took.len() * 99 / 100]
}

#[tokio::test]
async fn a_client_that_never_reads_big_replies_cannot_grow_the_gateway() {
    use tokio::io::AsyncWriteExt;
    let dev = ShoalDev::start().await;
    let (_, attacker) = cache_with_token(&dev, "hog", 1).await;
    let (_, victim) = cache_with_token(&dev, "victim", 1).await;
    let big = "x".repeat(4 * 1024 * 1024);
    let mut a = dev.client(&attacker).await.unwrap();
    let _: () = a.set("big", &big).await.unwrap();
    let before = crate::support::rss_mib(dev.pid());

    // Three ways to ask for about a gigabyte and never read it: pipelined GETs on the shared
    // connection, the same on the session's own connection, and one huge MGET.
    let get = "*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n".repeat(250);
    let mget = format!("*251\r\n$4\r\nMGET\r\n{}", "$3\r\nbig\r\n".repeat(250));
    let mut hogs = Vec::new();
    for input in [get.clone(), format!("*1\r\n$5\r\nMULTI\r\n*1\r\n$4\r\nEXEC\r\n{get}"), mget] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
        s.write_all(&crate::support::auth_command(&attacker)).await.unwrap();
        s.write_all(input.as_bytes()).await.unwrap();
        hogs.push(s);
    }
    let sampler = {
        let pid = dev.pid();
        tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..40 {
                peak = peak.max(crate::support::rss_mib(pid));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        })
    };
    let p99 = victim_p99_during(&dev, &victim, 4.0).await;
    let peak = sampler.await.unwrap();
    assert!(peak < before + 150, "gateway RSS went from {before} MiB to {peak} MiB");
    assert!(p99 < Duration::from_millis(50), "victim p99 {p99:?}");
    drop(hogs);

    // Big replies still arrive whole for clients that read them, on either connection. (The
    // hog held up its own cache's shared connection, which Valkey's output-buffer limit may
    // have closed: a request that was on it when it closed gets `connection lost, try
    // again`, and the next one a new connection.)
    let mut c = dev.client(&attacker).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let got: String = loop {
        match c.get("big").await {
            Err(e) if e.to_string().contains("connection lost") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => break other.unwrap(),
        }
    };
    assert_eq!(got.len(), big.len());
    let (one, two): (String, Vec<String>) =
        redis::pipe().get("big").mget(&["big", "big"]).query_async(&mut c).await.unwrap();
    assert!(one == big && two.len() == 2 && two.iter().all(|v| *v == big));
    // (A transaction's keys share a slot, as a cluster pool requires: `{big}…`.)
    let (one, _, three): (String, String, Vec<Option<String>>) = redis::pipe()
        .atomic()
        .get("big")
        .set("{big}small", "1")
        .mget(&["big", "{big}small", "{big}nope"])
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(one == big, "GET in MULTI");
    assert!(three == vec![Some(big.clone()), Some("1".to_string()), None], "MGET in MULTI");
}

#[tokio::test]
async fn big_requests_go_upstream_as_they_come() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dev = ShoalDev::start().await;
    // Room for the 200 MB value: past the default 100 MB of storage, the next storage
    // sample would refuse the writes that follow its deletion until the one after.
    let (status, cache) = dev
        .api(
            Method::POST,
            "/v1/caches",
            Some(serde_json::json!({"name": "bigreq", "limits": {"data_storage_mb": 1024}})),
        )
        .await;
    assert_eq!(status, 201, "{cache}");
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let before = crate::support::rss_mib(dev.pid());

    // A 200 MB SET, sent in 1 MB writes: the gateway never holds it whole.
    let size = 200 * 1024 * 1024;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    s.write_all(&crate::support::auth_command(&token)).await.unwrap();
    s.write_all(format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${size}\r\n").as_bytes()).await.unwrap();
    let chunk = vec![b'v'; 1024 * 1024];
    let mut peak = 0;
    for i in 0..size / chunk.len() {
        s.write_all(&chunk).await.unwrap();
        if i % 10 == 0 {
            peak = peak.max(crate::support::rss_mib(dev.pid()));
        }
    }
    s.write_all(b"\r\n*1\r\n$4\r\nPING\r\n").await.unwrap();
    let mut out = [0u8; 64];
    let mut got = 0;
    while !out[..got].ends_with(b"+PONG\r\n") {
        let n =
            tokio::time::timeout(Duration::from_secs(30), s.read(&mut out[got..])).await.unwrap().unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&out[..got]));
        got += n;
    }
    assert_eq!(&out[..got], b"+OK\r\n+OK\r\n+PONG\r\n");
    assert!(peak < before + 120, "gateway RSS went from {before} MiB to {peak} MiB during a 200 MB SET");
    let mut c = dev.client(&token).await.unwrap();
    let len: u64 = redis::cmd("STRLEN").arg("big").query_async(&mut c).await.unwrap();
    assert_eq!(len, size as u64);
    let _: () = redis::cmd("DEL").arg("big").query_async(&mut c).await.unwrap();

    // Big requests inside MULTI, and through a client library.
    let value = "m".repeat(3 * 1024 * 1024);
    let (set, got): (String, String) =
        redis::pipe().atomic().set("m", &value).get("m").query_async(&mut c).await.unwrap();
    assert!(set == "OK" && got == value);
    let _: () =
        redis::cmd("MSET").arg("a").arg(&value).arg("b").arg(&value).query_async(&mut c).await.unwrap();
    let both: Vec<String> = redis::cmd("MGET").arg("a").arg("b").query_async(&mut c).await.unwrap();
    assert!(both == vec![value.clone(), value.clone()]);

    // A command the gateway rewrites is held whole only up to a bound: bigger is refused,
    // and the connection goes on.
    let message = "p".repeat(65 * 1024 * 1024);
    let err = redis::cmd("PUBLISH").arg("ch").arg(&message).query_async::<i64>(&mut c).await.unwrap_err();
    assert!(err.to_string().contains("request too large"), "{err}");
    let pong: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
    assert_eq!(pong, "PONG");
}

#[tokio::test]
async fn a_cache_may_kill_its_own_running_script_but_not_anothers() {
    let dev = ShoalDev::start().await;
    // Placement alternates: a and c share a node, b has the other one. On a cluster pool
    // every cache is on every shard: b is a neighbour too.
    let (a_id, a) = cache_with_token(&dev, "runner", 1).await;
    let (b_id, b) = cache_with_token(&dev, "elsewhere", 1).await;
    let (c_id, c) = cache_with_token(&dev, "neighbour", 1).await;
    let node = |id: &str| {
        let dev = &dev;
        let id = id.to_string();
        async move {
            dev.api(Method::GET, &format!("/v1/caches/{id}"), None).await.1["allocation"]["node"].clone()
        }
    };
    let clustered = dev.cluster.is_some();
    assert_eq!(node(&a_id).await, node(&c_id).await);
    assert_eq!(node(&a_id).await == node(&b_id).await, clustered);

    // (Connected before: while the script runs, the node takes no new logins.)
    let mut neighbour = dev.client(&c).await.unwrap();
    let mut other = dev.client(&b).await.unwrap();
    let mut killer = dev.client(&a).await.unwrap();
    let mut runner = dev.client(&a).await.unwrap();
    let script = tokio::spawn(async move {
        redis::cmd("EVAL").arg("while true do end").arg(0).query_async::<()>(&mut runner).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another cache cannot end it, on the same node or elsewhere.
    let err = query(&mut neighbour, &["SCRIPT", "KILL"]).await.unwrap_err();
    assert!(err.to_string().contains("another cache's"), "{err}");
    let err = query(&mut other, &["SCRIPT", "KILL"]).await.unwrap_err();
    if clustered {
        assert!(err.to_string().contains("another cache's"), "{err}");
    } else {
        assert_eq!(err.code(), Some("NOTBUSY"), "{err}");
    }
    // The cache itself can (the node takes SCRIPT KILL once the script is busy).
    match query(&mut killer, &["SCRIPT", "KILL"]).await {
        Ok(v) => assert_eq!(text(&v).to_uppercase(), "OK"),
        Err(e) => assert_eq!(e.code(), Some("NOTBUSY"), "killed by the platform first: {e}\n{}", dev.log()),
    }
    let err = tokio::time::timeout(Duration::from_secs(30), script).await.unwrap().unwrap().unwrap_err();
    assert!(err.to_string().to_lowercase().contains("kill"), "{err}");
    // Everything answers again.
    let pong: String = redis::cmd("PING").query_async(&mut neighbour).await.unwrap();
    assert_eq!(pong, "PONG");
    let err = query(&mut killer, &["SCRIPT", "KILL"]).await.unwrap_err();
    assert_eq!(err.code(), Some("NOTBUSY"), "{err}");
    // A script ended by force pauses the cache's scripts for a while (10 s by default), so
    // that one runaway script after another cannot hold the node; other caches' run.
    let err = query(&mut killer, &["EVAL", "return 1", "0"]).await.unwrap_err();
    assert!(err.to_string().contains("scripts of this cache are paused"), "{err}");
    let one = query(&mut neighbour, &["EVAL", "return 1", "0"]).await.unwrap();
    assert_eq!(one, Value::Int(1));
}

/// A cache with its own storage limit and eviction policy, and a second cache on the same
/// node (or cluster), with a token each.
async fn neighbours_on_one_node(dev: &ShoalDev, prefix: &str) -> ((String, String), (String, String)) {
    let (status, a) = dev
        .api(
            Method::POST,
            "/v1/caches",
            Some(serde_json::json!({
                "name": format!("{prefix}-a"), "limits": {"data_storage_mb": 100}, "eviction_policy": "noeviction"
            })),
        )
        .await;
    assert_eq!(status, 201, "{a}");
    for i in 0..12 {
        let b = dev.create_cache(&format!("{prefix}-b{i}")).await;
        if b["allocation"]["node"] == a["allocation"]["node"] {
            let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
            let (ta, tb) = (dev.mint_token(a_id).await, dev.mint_token(b_id).await);
            return ((a_id.to_string(), ta), (b_id.to_string(), tb));
        }
    }
    panic!("no cache landed on the node of {a}");
}

/// `name:value` of an INFO text.
fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).map(|v| v.trim().to_string())
}

async fn info(c: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> String {
    let mut argv = vec!["INFO"];
    argv.extend_from_slice(args);
    text(&query(c, &argv).await.unwrap())
}

async fn blocked(c: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info = info(c, &["clients"]).await;
    info_field(&info, "blocked_clients").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{info}"))
}

/// Waits until `c`'s cache shows `want` blocked clients, while `other`'s shows none.
async fn wait_blocked(
    a: &mut redis::aio::MultiplexedConnection,
    b: &mut redis::aio::MultiplexedConnection,
    want: i64,
) {
    let started = std::time::Instant::now();
    loop {
        assert_eq!(blocked(b).await, 0, "the neighbour sees another cache's blocked client");
        let n = blocked(a).await;
        if n == want {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "blocked_clients:{n}, not {want}, after 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw connection through the gateway, logged in, that sends `command` and does not wait.
async fn send_raw(dev: &ShoalDev, token: &str, command: &[&str]) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    s.write_all(&crate::support::auth_command(token)).await.unwrap();
    let mut ok = [0u8; 5];
    s.read_exact(&mut ok).await.unwrap();
    assert_eq!(&ok, b"+OK\r\n");
    let mut out = format!("*{}\r\n", command.len());
    for a in command {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(out.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn info_counts_the_caches_own_blocked_clients() {
    let dev = shared().await;
    let ((_, token_a), (_, token_b)) = neighbours_on_one_node(&dev, "blocked").await;
    let mut a = dev.client(&token_a).await.unwrap();
    let mut b = dev.client(&token_b).await.unwrap();
    wait_blocked(&mut a, &mut b, 0).await;

    // One client blocks in BLPOP: another connection of the cache sees it, the neighbour not.
    let mut waiting = send_raw(&dev, &token_a, &["BLPOP", "info-q", "0"]).await;
    wait_blocked(&mut a, &mut b, 1).await;
    // Served: no longer blocked.
    let _: i64 = a.lpush("info-q", "job").await.unwrap();
    let mut reply = vec![0u8; 64];
    let n =
        tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut waiting, &mut reply))
            .await
            .expect("BLPOP is served")
            .unwrap();
    assert!(String::from_utf8_lossy(&reply[..n]).contains("job"), "{}", String::from_utf8_lossy(&reply[..n]));
    wait_blocked(&mut a, &mut b, 0).await;

    // Two blocked (BLPOP, XREAD BLOCK), then both clients leave while blocked.
    let first = send_raw(&dev, &token_a, &["BLPOP", "info-q", "0"]).await;
    let second = send_raw(&dev, &token_a, &["XREAD", "BLOCK", "0", "STREAMS", "info-s", "$"]).await;
    wait_blocked(&mut a, &mut b, 2).await;
    drop(first);
    wait_blocked(&mut a, &mut b, 1).await;
    drop(second);
    wait_blocked(&mut a, &mut b, 0).await;
    // A stream read without BLOCK never counts.
    let _: Value = query(&mut a, &["XREAD", "STREAMS", "info-s", "0"]).await.unwrap();
    assert_eq!(blocked(&mut a).await, 0);
}

#[tokio::test]
async fn info_tells_the_caches_memory_commands_errors_cpu_and_build() {
    let dev = shared().await;
    let ((_, token_a), (_, token_b)) = neighbours_on_one_node(&dev, "infostats").await;
    let mut a = dev.client(&token_a).await.unwrap();
    let mut b = dev.client(&token_b).await.unwrap();

    // Memory: the cache's limit and policy, its measured bytes; nothing of the node.
    let memory = info(&mut a, &["memory"]).await;
    let lines: Vec<&str> = memory.lines().collect();
    assert_eq!(lines.len(), 6, "{memory}");
    assert_eq!(lines[0], "# Memory");
    assert!(info_field(&memory, "used_memory").unwrap().parse::<u64>().is_ok(), "{memory}");
    assert!(info_field(&memory, "used_memory_human").is_some(), "{memory}");
    assert_eq!(info_field(&memory, "maxmemory").as_deref(), Some("100000000"), "{memory}");
    assert_eq!(info_field(&memory, "maxmemory_human").as_deref(), Some("95.37M"), "{memory}");
    assert_eq!(info_field(&memory, "maxmemory_policy").as_deref(), Some("noeviction"), "{memory}");
    let memory_b = info(&mut b, &["memory"]).await;
    assert_eq!(info_field(&memory_b, "maxmemory_policy").as_deref(), Some("volatile-lru"), "{memory_b}");

    // Commandstats: a GET and a SET once they ran; errorstats: the errors the client got.
    let _: () = a.set("info-k", "v").await.unwrap();
    let _: String = a.get("info-k").await.unwrap();
    let err = query(&mut a, &["INCR", "info-k"]).await.unwrap_err();
    assert_eq!(err.code(), Some("ERR"), "{err}");
    let err = query(&mut a, &["LPUSH", "info-k", "x"]).await.unwrap_err();
    assert_eq!(err.code(), Some("WRONGTYPE"), "{err}");
    let err = query(&mut a, &["CONFIG", "SET", "maxmemory", "1"]).await.unwrap_err();
    assert_eq!(err.code(), Some("NOPERM"), "{err}");
    let stats = info(&mut a, &["commandstats"]).await;
    let cmdstat =
        |name: &str| info_field(&stats, &format!("cmdstat_{name}")).unwrap_or_else(|| panic!("{stats}"));
    for (name, calls, rejected, failed) in
        [("set", 1, 0, 0), ("get", 1, 0, 0), ("incr", 1, 0, 1), ("lpush", 1, 0, 1), ("config|set", 0, 1, 0)]
    {
        let line = cmdstat(name);
        let fields: Vec<(&str, &str)> = line.split(',').filter_map(|f| f.split_once('=')).collect();
        let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["calls", "usec", "usec_per_call", "rejected_calls", "failed_calls"], "{line}");
        assert_eq!(fields[0].1, calls.to_string(), "{name}: {line}");
        assert!(fields[1].1.parse::<u64>().is_ok(), "{line}");
        let per_call = fields[2].1;
        assert!(per_call.split_once('.').is_some_and(|(_, d)| d.len() == 2), "{line}");
        assert_eq!(fields[3].1, rejected.to_string(), "{name}: {line}");
        assert_eq!(fields[4].1, failed.to_string(), "{name}: {line}");
    }
    assert!(!stats.contains("# Errorstats"), "{stats}");
    let errors = info(&mut a, &["errorstats"]).await;
    assert_eq!(info_field(&errors, "errorstat_ERR").as_deref(), Some("count=1"), "{errors}");
    assert_eq!(info_field(&errors, "errorstat_WRONGTYPE").as_deref(), Some("count=1"), "{errors}");
    assert_eq!(info_field(&errors, "errorstat_NOPERM").as_deref(), Some("count=1"), "{errors}");
    // The neighbour's counters are its own.
    let neighbour = info(&mut b, &["everything"]).await;
    assert!(!neighbour.contains("cmdstat_incr") && !neighbour.contains("errorstat_"), "{neighbour}");

    // CPU: the cache's metered ECPU as CPU seconds, in Valkey's format.
    let cpu = info(&mut a, &["cpu"]).await;
    assert_eq!(info_field(&cpu, "used_cpu_sys").as_deref(), Some("0.000000"), "{cpu}");
    let user = info_field(&cpu, "used_cpu_user").unwrap();
    assert!(user.split_once('.').is_some_and(|(_, d)| d.len() == 6), "{cpu}");
    assert!(user.parse::<f64>().unwrap() > 0.0, "{cpu}");
    assert_eq!(info_field(&cpu, "used_cpu_sys_children").as_deref(), Some("0.000000"), "{cpu}");
    assert_eq!(info_field(&cpu, "used_cpu_user_children").as_deref(), Some("0.000000"), "{cpu}");

    // Server: the fields tools parse, no host paths.
    let server = info(&mut a, &["server"]).await;
    assert_eq!(info_field(&server, "redis_git_sha1").map(|s| s.len()), Some(8), "{server}");
    assert!(matches!(info_field(&server, "redis_git_dirty").as_deref(), Some("0" | "1")), "{server}");
    assert!(info_field(&server, "redis_build_id").is_some_and(|id| !id.is_empty()), "{server}");
    assert_eq!(info_field(&server, "valkey_release_stage").as_deref(), Some("ga"), "{server}");
    assert_eq!(info_field(&server, "server_mode").as_deref(), Some("standalone"), "{server}");
    assert!(info_field(&server, "valkey_version").is_some_and(|v| v.starts_with("9.")), "{server}");
    for hidden in ["executable", "config_file", "process_id", "run_id"] {
        assert!(info_field(&server, hidden).is_none(), "{hidden}: {server}");
    }
    assert!(!server.contains('/'), "a path: {server}");
    let again = info(&mut a, &["server"]).await;
    assert_eq!(info_field(&server, "redis_build_id"), info_field(&again, "redis_build_id"));

    // Which sections each form shows, as Valkey.
    let headers = |t: &str| t.lines().filter(|l| l.starts_with("# ")).map(str::to_string).collect::<Vec<_>>();
    let default = ["# Server", "# Clients", "# Memory", "# Stats", "# CPU", "# Errorstats", "# Keyspace"];
    assert_eq!(headers(&info(&mut a, &[]).await), default);
    assert_eq!(headers(&info(&mut a, &["default"]).await), default);
    let all = [
        "# Server",
        "# Clients",
        "# Memory",
        "# Stats",
        "# CPU",
        "# Commandstats",
        "# Errorstats",
        "# Keyspace",
    ];
    assert_eq!(headers(&info(&mut a, &["all"]).await), all);
    assert_eq!(headers(&info(&mut a, &["everything"]).await), all);
    assert_eq!(headers(&info(&mut a, &["CPU", "memory"]).await), ["# Memory", "# CPU"]);
    assert_eq!(info(&mut a, &["nosuchsection"]).await, "");
}

/// A client that idles gives its session's buffers back (half a second after its last
/// command; see docs/performance.md, "Idle clients"): its next burst, big values included,
/// is served as before, as often as it idles.
#[tokio::test]
async fn a_client_that_idled_is_served_as_before_after_its_buffers_are_given_back() {
    let dev = shared().await;
    let (_, token) = cache_with_token(&dev, "idler", 1).await;
    let mut c = dev.client(&token).await.unwrap();
    let big = "v".repeat(1 << 20);
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut pipe = redis::pipe();
        for i in 0..200 {
            pipe.set(format!("k{i}"), format!("{round}:{i}")).ignore();
            pipe.get(format!("k{i}"));
        }
        let got: Vec<String> = pipe.query_async(&mut c).await.unwrap();
        assert_eq!(got, (0..200).map(|i| format!("{round}:{i}")).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let _: () = c.set("big", &big).await.unwrap();
        assert_eq!(c.get::<_, String>("big").await.unwrap().len(), big.len());
        let (n,): (i64,) = redis::pipe().atomic().incr("n", 1).query_async(&mut c).await.unwrap();
        assert_eq!(n, round + 1);
    }
}
