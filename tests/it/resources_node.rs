//! One tenant cannot hurt another through the node they share: runaway scripts, frozen nodes
//! and placement, node memory and storage limits, write bursts, Lua memory and the script
//! cache. Every test runs the real `shoal dev` with real Valkey nodes.

use crate::support::ShoalDev;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Creates three caches; the first and third share a node (placement alternates between the
/// two nodes, ties going to the first). Returns (attacker, victim, node index).
async fn neighbours(dev: &ShoalDev) -> (Value, Value, usize) {
    let a = dev.create_cache("attacker").await;
    let _filler = dev.create_cache("filler").await;
    let b = dev.create_cache("victim").await;
    let node = a["allocation"]["node"].as_str().unwrap().to_string();
    assert_eq!(b["allocation"]["node"].as_str().unwrap(), node, "{a} {b}");
    (a, b, node.trim_start_matches('n').parse().unwrap())
}

async fn connect(dev: &ShoalDev, cache: &Value) -> redis::aio::MultiplexedConnection {
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    dev.client(&token).await.unwrap()
}

/// Runs `EVAL script 0` on its own connection in the background; its outcome.
fn spawn_eval(
    conn: redis::aio::MultiplexedConnection,
    script: &'static str,
    keys: &'static [&'static str],
) -> tokio::task::JoinHandle<redis::RedisResult<redis::Value>> {
    tokio::spawn(async move {
        let mut conn = conn;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(keys.len()).arg(keys);
        cmd.query_async(&mut conn).await
    })
}

/// Asks `GET key` through the gateway (new connections when needed) until it answers
/// `expected`; how long that took.
async fn until_answers(dev: &ShoalDev, token: &str, key: &str, expected: &str, within: Duration) -> Duration {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        if let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(2), dev.client(token)).await {
            let got = tokio::time::timeout(
                Duration::from_secs(2),
                redis::cmd("GET").arg(key).query_async::<Option<String>>(&mut c),
            )
            .await;
            match got {
                Ok(Ok(Some(v))) if v == expected => return started.elapsed(),
                other => last = format!("{other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("GET {key} did not answer {expected:?} within {within:?}; last: {last}\n{}", dev.log());
}

async fn node_pid(dev: &ShoalDev, node: usize) -> i32 {
    let p = dev.dir.join(format!(".shoal/valkey/n{node}/valkey.pid"));
    std::fs::read_to_string(p).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

async fn config_get(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> String {
    let v: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query_async(conn).await.unwrap();
    v.get(1).cloned().unwrap_or_default()
}

async fn count(dev: &ShoalDev) -> usize {
    dev.api(Method::GET, "/v1/caches", None).await.1["items"].as_array().unwrap().len()
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < within {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_runaway_script_is_killed_within_the_limit_and_neighbours_recover() {
    let dev = ShoalDev::start_with(&["--script-time-limit", "1", "--script-pause", "0"]).await;
    let (a, b, node) = neighbours(&dev).await;
    let b_token = dev.mint_token(b["id"].as_str().unwrap()).await;
    let mut victim = dev.client(&b_token).await.unwrap();
    let _: () = redis::cmd("SET").arg("kept").arg("before").query_async(&mut victim).await.unwrap();
    let mut admin = dev.node_admin(node).await;
    assert_eq!(config_get(&mut admin, "busy-reply-threshold").await, "1000");

    // A script that loops without writing: SCRIPT KILL by the platform after the limit.
    let pid = node_pid(&dev, node).await;
    let started = Instant::now();
    let runaway = spawn_eval(connect(&dev, &a).await, "while true do end", &[]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = until_answers(&dev, &b_token, "kept", "before", Duration::from_secs(20)).await;
    let frozen = started.elapsed();
    let err = runaway.await.unwrap().expect_err("the runaway script fails");
    eprintln!("runaway script: victim answered again after {frozen:?} (waited {took:?}); the script's client got: {err}");
    assert!(frozen < Duration::from_secs(1 + 4), "victim frozen for {frozen:?}");
    assert!(err.to_string().contains("Script killed"), "{err}");
    assert_eq!(node_pid(&dev, node).await, pid, "a killable script does not cost a restart");
    assert!(dev.log().contains("script ran past the time limit: killed"), "{}", dev.log());
    let mut a_conn = connect(&dev, &a).await;
    let one: i64 = redis::cmd("EVAL").arg("return 1").arg(0).query_async(&mut a_conn).await.unwrap();
    assert_eq!(one, 1, "the attacker's cache works again too");

    // A script that wrote first cannot be killed: the node is restarted from its AOF, and
    // the script's write is not kept (scripts are atomic).
    let started = Instant::now();
    let runaway = spawn_eval(
        connect(&dev, &a).await,
        "redis.call('SET', KEYS[1], 'partial') while true do end",
        &["partial"],
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = until_answers(&dev, &b_token, "kept", "before", Duration::from_secs(30)).await;
    let frozen = started.elapsed();
    let err = runaway.await.unwrap().expect_err("the unkillable script fails");
    eprintln!("unkillable script: victim answered again after {frozen:?} (waited {took:?}); the script's client got: {err}");
    assert!(frozen < Duration::from_secs(1 + 10), "victim frozen for {frozen:?}");
    wait_for("the restarted node's pid", Duration::from_secs(10), async || {
        let now = node_pid(&dev, node).await;
        now != 0 && now != pid
    })
    .await;
    assert!(dev.log().contains("could not be killed"), "{}", dev.log());
    let mut a_conn = connect(&dev, &a).await;
    let partial: Option<String> = redis::cmd("GET").arg("partial").query_async(&mut a_conn).await.unwrap();
    assert_eq!(partial, None, "nothing of the killed script is kept");
    let m = dev.metrics().await;
    assert!(m.contains("shoal_node_script_kills_total"), "{m}");
}

#[tokio::test]
async fn while_a_node_is_frozen_new_caches_go_to_the_other_node() {
    let dev = ShoalDev::start_with(&["--script-time-limit", "8"]).await;
    let a = dev.create_cache("freezer").await;
    let other = dev.create_cache("other").await;
    let frozen = a["allocation"]["node"].as_str().unwrap().to_string();
    assert_ne!(other["allocation"]["node"].as_str().unwrap(), frozen);
    let started = Instant::now();
    let runaway = spawn_eval(connect(&dev, &a).await, "while true do end", &[]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Straight away, before the health loop noticed: the frozen node (first of two equally
    // loaded ones) does not answer the provisioning in time, and the next node gets it.
    let (status, body) = dev.api(Method::POST, "/v1/caches", Some(json!({ "name": "during-0" }))).await;
    assert_eq!(status, 201, "{body}");
    assert_ne!(body["allocation"]["node"].as_str().unwrap(), frozen, "{body}");
    eprintln!("created during-0 on the healthy node after {:?}", started.elapsed());
    // Once the health loop has noticed, placement skips the node without trying it.
    wait_for("the frozen node marked unhealthy", Duration::from_secs(5), async || {
        dev.metrics().await.contains(&format!("shoal_node_healthy{{node=\"{frozen}\"}} 0"))
    })
    .await;
    for name in ["during-1", "during-2"] {
        let t = Instant::now();
        let (status, body) = dev.api(Method::POST, "/v1/caches", Some(json!({ "name": name }))).await;
        assert_eq!(status, 201, "{body}");
        assert_ne!(body["allocation"]["node"].as_str().unwrap(), frozen, "{body}");
        eprintln!("created {name} on the healthy node in {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(2), "placement did not wait for the frozen node");
    }
    assert!(started.elapsed() < Duration::from_secs(8), "created while the node was frozen");
    // The watchdog ends the script and the node takes caches again.
    assert!(runaway.await.unwrap().is_err());
    wait_for("the node healthy again", Duration::from_secs(10), async || {
        dev.metrics().await.contains(&format!("shoal_node_healthy{{node=\"{frozen}\"}} 1"))
    })
    .await;
    let after = dev.create_cache("after").await;
    assert_eq!(after["allocation"]["node"].as_str().unwrap(), frozen, "{after}");
}

#[tokio::test]
async fn nodes_have_memory_limits_and_storage_limits_fit_their_node() {
    let dev = ShoalDev::start_with(&["--node-maxmemory-mb", "100", "--default-storage-mb", "20"]).await;
    let mut n0 = dev.node_admin(0).await;
    assert_eq!(config_get(&mut n0, "maxmemory").await, "100000000");
    assert_eq!(config_get(&mut n0, "maxmemory-policy").await, "volatile-lru");
    assert_eq!(config_get(&mut n0, "busy-reply-threshold").await, "5000");
    let obl = config_get(&mut n0, "client-output-buffer-limit").await;
    assert!(obl.contains("normal 537919488 67108864 60"), "{obl}");

    // No limit given: the default one.
    let c1 = dev.create_cache("plain").await;
    assert_eq!(c1["limits"]["data_storage_mb"], 20, "{c1}");
    assert_eq!(c1["allocation"]["node"], "n0");
    // Each node takes 75 MB of limits (75% of 100 MB).
    let (status, big) = dev
        .api(Method::POST, "/v1/caches", Some(json!({"name": "big", "limits": {"data_storage_mb": 70}})))
        .await;
    assert_eq!(status, 201, "{big}");
    assert_eq!(big["allocation"]["node"], "n1");
    let before = count(&dev).await;
    let (status, refused) = dev
        .api(Method::POST, "/v1/caches", Some(json!({"name": "huge", "limits": {"data_storage_mb": 60}})))
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["field"], "limits.data_storage_mb", "{refused}");
    let detail = refused["detail"].as_str().unwrap();
    assert!(detail.contains("55 MB") && detail.contains("75%"), "{detail}");
    assert_eq!(count(&dev).await, before, "nothing was created");
    let (status, _) = dev.api(Method::GET, "/v1/caches?name=huge", None).await;
    assert_eq!(status, 200);

    // Raising a limit past what the node holds is refused too; within it, accepted.
    let id = c1["id"].as_str().unwrap();
    let (status, refused) = dev
        .api(Method::PATCH, &format!("/v1/caches/{id}"), Some(json!({"limits": {"data_storage_mb": 76}})))
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["field"], "limits.data_storage_mb");
    let (_, unchanged) = dev.api(Method::GET, &format!("/v1/caches/{id}"), None).await;
    assert_eq!(unchanged["limits"]["data_storage_mb"], 20);
    let (status, ok) = dev
        .api(Method::PATCH, &format!("/v1/caches/{id}"), Some(json!({"limits": {"data_storage_mb": 75}})))
        .await;
    assert_eq!(status, 200, "{ok}");
    // null brings the default back.
    let (status, ok) = dev
        .api(Method::PATCH, &format!("/v1/caches/{id}"), Some(json!({"limits": {"data_storage_mb": null}})))
        .await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["limits"]["data_storage_mb"], 20);

    // A runtime CONFIG SET (keyspace events) and a restart keep the memory settings.
    let (status, _) = dev
        .api(Method::POST, "/v1/caches", Some(json!({"name": "events", "keyspace_notifications": "KEA"})))
        .await;
    assert_eq!(status, 201);
    let pid = node_pid(&dev, 0).await;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("node n0 restarted", Duration::from_secs(15), async || {
        let now = node_pid(&dev, 0).await;
        now != 0 && now != pid
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut n0 = dev.node_admin(0).await;
    assert_eq!(config_get(&mut n0, "maxmemory").await, "100000000");
    assert_eq!(config_get(&mut n0, "maxmemory-policy").await, "volatile-lru");
    assert!(config_get(&mut n0, "client-output-buffer-limit").await.contains("normal 537919488 67108864 60"));
}

#[tokio::test]
async fn a_write_burst_cannot_outrun_the_storage_limit() {
    let dev = ShoalDev::start().await;
    let (status, cache) = dev
        .api(
            Method::POST,
            "/v1/caches",
            Some(
                json!({"name": "burst", "limits": {"data_storage_mb": 10}, "eviction_policy": "noeviction"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{cache}");
    let mut conn = connect(&dev, &cache).await;
    let value = vec![b'v'; 100_000];
    let started = Instant::now();
    let (mut refused, mut i) = (0u64, 0u64);
    // As fast as possible: pipelines of 20 SETs, for 4 s (the sampler's interval is 5 s).
    while started.elapsed() < Duration::from_secs(4) {
        let mut pipe = redis::pipe();
        for _ in 0..20 {
            pipe.cmd("SET").arg(format!("k{i}")).arg(&value);
            i += 1;
        }
        let replies: Vec<redis::RedisResult<()>> = pipe
            .query_async::<Vec<redis::Value>>(&mut conn)
            .await
            .map(|vs| {
                vs.into_iter()
                    .map(|v| match v {
                        redis::Value::ServerError(e) => Err(redis::RedisError::from(e)),
                        _ => Ok(()),
                    })
                    .collect()
            })
            .unwrap_or_else(|e| vec![Err(e)]);
        for r in replies {
            match r {
                Ok(()) => {}
                Err(e) => {
                    assert!(e.to_string().contains("storage limit"), "{e}");
                    refused += 1;
                }
            }
        }
    }
    // What the cache holds, measured on its node.
    let db = dev.sql(&format!("SELECT db FROM caches WHERE id = '{}'", cache["id"].as_str().unwrap()))[0]
        .parse::<u32>()
        .unwrap();
    let node: usize = cache["allocation"]["node"].as_str().unwrap().trim_start_matches('n').parse().unwrap();
    let mut admin = dev.node_admin(node).await;
    let _: () = redis::cmd("SELECT").arg(db).query_async(&mut admin).await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut admin).await.unwrap();
    let mut bytes = 0u64;
    for k in &keys {
        let n: u64 = redis::cmd("MEMORY").arg("USAGE").arg(k).query_async(&mut admin).await.unwrap();
        bytes += n + 12;
    }
    let limit = 10_000_000u64;
    let over = bytes as f64 / limit as f64 - 1.0;
    eprintln!(
        "burst: {i} SETs of 100 KB sent in {:?} ({refused} pipelines or commands refused); the cache holds {} keys, \
         {bytes} bytes: {} bytes ({:.1}%) {} its 10 MB limit",
        started.elapsed(),
        keys.len(),
        bytes.abs_diff(limit),
        over.abs() * 100.0,
        if bytes > limit { "over" } else { "under" }
    );
    assert!(refused > 0, "writes were refused");
    assert!(bytes <= limit + limit / 10, "{bytes} bytes stored against a limit of {limit}");
}

#[tokio::test]
async fn lua_memory_cannot_get_a_node_oom_killed() {
    let dev = ShoalDev::start_with(&[
        "--node-maxmemory-mb",
        "128",
        "--script-time-limit",
        "2",
        "--default-storage-mb",
        "10",
        // Several attacks from one cache: no pause for scripts ended by force.
        "--script-pause",
        "0",
    ])
    .await;
    let (a, b, node) = neighbours(&dev).await;
    let b_token = dev.mint_token(b["id"].as_str().unwrap()).await;
    let mut victim = dev.client(&b_token).await.unwrap();
    let _: () = redis::cmd("SET").arg("kept").arg("before").query_async(&mut victim).await.unwrap();

    // Lua's memory counts against no maxmemory: a 1 GiB string.rep grows the node by
    // several GB; many 10 MB strings as much as the loop wants. The memory guard restarts
    // the node (a 128 MB node is guarded at 256 MB resident) long before the kernel would.
    for (attack, script) in [
        ("string.rep 1 GiB", "local s = string.rep('x', 1024*1024*1024) return #s"),
        // Lua 5.1 interns every string: each one must differ to take memory of its own.
        (
            "many strings",
            "local t = {} for i = 1, 400 do t[i] = string.rep('x', 10*1024*1024) .. i end return #t",
        ),
    ] {
        let pid = node_pid(&dev, node).await;
        let guarded = dev.log().matches("memory over its guard").count();
        let started = Instant::now();
        let outcome = spawn_eval(connect(&dev, &a).await, script, &[]);
        let result =
            tokio::time::timeout(Duration::from_secs(30), outcome).await.expect("the attack ends").unwrap();
        let err = result.expect_err("the attack fails");
        eprintln!("{attack}: the attacker got {err:?} after {:?}", started.elapsed());
        let took = until_answers(&dev, &b_token, "kept", "before", Duration::from_secs(30)).await;
        eprintln!("{attack}: victim answered after {:?} more", took);
        let now = node_pid(&dev, node).await;
        assert_ne!(now, pid, "the node was restarted");
        let log = dev.log();
        assert!(log.matches("memory over its guard").count() > guarded, "{log}");
        let line = log.lines().rfind(|l| l.contains("memory over its guard")).unwrap();
        eprintln!("{attack}: {line}");
    }
    let m = dev.metrics().await;
    assert!(m.contains("shoal_node_memory_kills_total"), "{m}");

    // The script cache counts against no cache either: past its budget (16 MB on this node)
    // the engine flushes it.
    let mut a_conn = connect(&dev, &a).await;
    let mut first = String::new();
    for i in 0..40 {
        let body = format!("return '{}{i}'", "x".repeat(1_000_000));
        let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(body).query_async(&mut a_conn).await.unwrap();
        if i == 0 {
            first = sha;
        }
    }
    // (Checked every 10 s: `SCRIPT_MEMORY_INTERVAL`.)
    wait_for("the script cache flushed", Duration::from_secs(25), async || {
        let exists: Vec<i64> =
            redis::cmd("SCRIPT").arg("EXISTS").arg(&first).query_async(&mut a_conn).await.unwrap();
        exists == [0]
    })
    .await;
    // The engine logs the flush just after it: give the line a moment to reach the log.
    wait_for("the flush logged", Duration::from_secs(5), async || dev.log().contains("script cache flushed"))
        .await;
}

/// Valkey's cron walks every database looking for keys with a TTL when few have one, holding
/// a node with many databases for milliseconds on every tick. A node holds anchors (a key and
/// a hash field with a TTL of about a century) in databases 64, 128, … where no cache goes,
/// puts them back when they are gone (evicted under memory pressure, say), and keeps
/// Valkey's `hz` where the walk stays cheap.
#[tokio::test]
async fn a_node_with_many_databases_holds_anchors_that_keep_its_cron_short() {
    let dev = ShoalDev::start_with(&["--databases", "2100"]).await;
    let mut n0 = dev.node_admin(0).await;
    assert_eq!(config_get(&mut n0, "hz").await, "10");
    let keyspace = || async {
        let mut n0 = dev.node_admin(0).await;
        redis::cmd("INFO").arg("keyspace").query_async::<String>(&mut n0).await.unwrap()
    };
    let info = keyspace().await;
    for db in [64, 1024, 2048] {
        assert!(info.contains(&format!("db{db}:keys=2,expires=1,")), "{info}");
        assert!(info.contains("keys_with_volatile_items=1"), "{info}");
    }
    let ttl: i64 = redis::pipe()
        .cmd("SELECT")
        .arg(1024)
        .ignore()
        .cmd("TTL")
        .arg("shoal:cron-anchor")
        .cmd("SELECT")
        .arg(0)
        .ignore()
        .query_async::<(i64,)>(&mut n0)
        .await
        .unwrap()
        .0;
    assert!(ttl > 2_000_000_000, "about a century: {ttl}");

    // Gone: back within the health loop's next round of checks (every 10 s).
    let _: () = redis::pipe()
        .cmd("SELECT")
        .arg(2048)
        .ignore()
        .cmd("DEL")
        .arg("shoal:cron-anchor")
        .arg("shoal:cron-anchor-fields")
        .ignore()
        .cmd("SELECT")
        .arg(0)
        .ignore()
        .query_async(&mut n0)
        .await
        .unwrap();
    assert!(!keyspace().await.contains("db2048:"));
    let deadline = Instant::now() + Duration::from_secs(25);
    while !keyspace().await.contains("db2048:keys=2,expires=1,") {
        assert!(Instant::now() < deadline, "the anchor did not come back: {}", keyspace().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `INFO memory` walks every database of a node (tens of milliseconds at 100,000, during
/// which every cache on it waits), so the engine asks for Lua's memory only when a script
/// ran since it last looked; a script makes it look again within the check's 10 s.
#[tokio::test]
async fn lua_memory_is_read_only_when_scripts_ran() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("scripts").await;
    let node = ShoalDev::node_of(&cache);
    // The first look, at most 10 s after the start, reads it: from then on, no script ran.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = dev.monitor(node, Duration::from_secs(11)).await;
    assert!(idle.contains(r#""INFO" "commandstats""#), "the engine looked at the calls: {idle}");
    assert!(!idle.contains(r#""INFO" "memory""#), "no script ran: {idle}");

    let mut conn = connect(&dev, &cache).await;
    let _: i64 = redis::cmd("EVAL").arg("return 1").arg(0).query_async(&mut conn).await.unwrap();
    let after = dev.monitor(node, Duration::from_secs(11)).await;
    assert!(after.contains(r#""INFO" "memory""#), "a script ran: {after}");
}

/// Microseconds the node spent in `command` (as `INFO commandstats` names it: `info`,
/// `pubsub|channels`), all callers together.
async fn command_usec(admin: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(admin).await.unwrap();
    let prefix = format!("cmdstat_{command}:");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.split(',').find_map(|f| f.strip_prefix("usec=")?.parse().ok()))
        .unwrap_or(0)
}

/// `INFO keyspace` walks every database of a node (4–65 ms at 100,000 selected ones, every
/// cache on the node waiting meanwhile), and a tenant's `INFO` shows its own keyspace: a
/// tenant calling `INFO` in a loop must not keep its node walking.
#[tokio::test]
async fn a_tenant_calling_info_in_a_loop_does_not_keep_its_node_walking_every_database() {
    let dev = ShoalDev::start_with(&["--databases", "100000"]).await;
    let cache = dev.create_cache("curious").await;
    let node = ShoalDev::node_of(&cache);
    let mut admin = dev.node_admin(node).await;
    // Every database selected once, as on a node full of caches.
    for from in (0..100_000).step_by(10_000) {
        let mut pipe = redis::pipe();
        for db in from..from + 10_000 {
            pipe.cmd("SELECT").arg(db).ignore();
        }
        pipe.cmd("SELECT").arg(0).ignore();
        pipe.query_async::<()>(&mut admin).await.unwrap();
    }
    let mut c = connect(&dev, &cache).await;
    let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut c).await.unwrap();
    let before = command_usec(&mut admin, "info").await;
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let info: String = redis::cmd("INFO").query_async(&mut c).await.unwrap();
        assert!(info.contains("db0:keys=1,expires=0,"), "{info}");
        calls += 1;
    }
    let spent = Duration::from_micros(command_usec(&mut admin, "info").await - before);
    let elapsed = started.elapsed();
    eprintln!("{calls} tenant INFO calls: the node spent {spent:?} in INFO of {elapsed:?}");
    assert!(spent < elapsed / 20, "{calls} tenant INFO calls held the node {spent:?} of {elapsed:?}");
}

/// `PUBSUB CHANNELS` walks every channel of a node with subscribers, whatever the pattern
/// (110 ms at 1,000,000), every cache on the node waiting meanwhile, and a tenant's shows its
/// own channels: a tenant listing its channels in a loop must not keep its node walking.
#[tokio::test]
async fn a_tenant_listing_its_channels_in_a_loop_does_not_keep_its_node_walking_every_channel() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("listener").await;
    let node = ShoalDev::node_of(&cache);
    let mut admin = dev.node_admin(node).await;
    // The node's other tenants' subscribers: 300,000 channels.
    let mut others = redis::Client::open(dev.node_admin_url(node)).unwrap().get_async_pubsub().await.unwrap();
    for from in (0..300_000).step_by(50_000) {
        let names: Vec<String> =
            (from..from + 50_000).map(|i| format!("tother{}:news:{i}", i % 100)).collect();
        others.subscribe(names).await.unwrap();
    }
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let mut mine = redis::Client::open(format!("redis://:{token}@127.0.0.1:{}/", dev.resp_port))
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    mine.subscribe(&["news:1", "news:2", "sport"]).await.unwrap();
    let mut c = connect(&dev, &cache).await;
    // The first listing walks the node; the loop is what reuse must keep cheap.
    let _: Vec<String> = redis::cmd("PUBSUB").arg("CHANNELS").query_async(&mut c).await.unwrap();
    let before = command_usec(&mut admin, "pubsub|channels").await;
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let mut all: Vec<String> = redis::cmd("PUBSUB").arg("CHANNELS").query_async(&mut c).await.unwrap();
        all.sort();
        assert_eq!(all, ["news:1", "news:2", "sport"]);
        let news: Vec<String> =
            redis::cmd("PUBSUB").arg("CHANNELS").arg("news:*").query_async(&mut c).await.unwrap();
        assert_eq!(news.len(), 2, "{news:?}");
        calls += 2;
    }
    let spent = Duration::from_micros(command_usec(&mut admin, "pubsub|channels").await - before);
    let elapsed = started.elapsed();
    eprintln!(
        "{calls} tenant PUBSUB CHANNELS calls: the node spent {spent:?} listing channels of {elapsed:?}"
    );
    assert!(
        spent < elapsed / 20,
        "{calls} tenant PUBSUB CHANNELS calls held the node {spent:?} of {elapsed:?}"
    );
    // A listing is reused a moment only (10 s at most): a new channel shows within seconds.
    mine.subscribe("weather").await.unwrap();
    wait_for("the new channel to be listed", Duration::from_secs(15), async || {
        let all: Vec<String> = redis::cmd("PUBSUB").arg("CHANNELS").query_async(&mut c).await.unwrap();
        all.contains(&"weather".to_string())
    })
    .await;
}

/// Reads confirmations on a raw connection until `count` more of `kind` came (or an error):
/// what was read.
async fn confirmations(s: &mut tokio::net::TcpStream, kind: &str, count: usize) -> String {
    use tokio::io::AsyncReadExt;
    let needle = format!("\r\n{kind}\r\n");
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        let from = out.len().saturating_sub(needle.len());
        out.extend_from_slice(&buf[..n]);
        seen += out[from..].windows(needle.len()).filter(|w| *w == needle.as_bytes()).count();
        if out.starts_with(b"-") || out.windows(3).any(|w| w == b"\n-E") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw connection to the gateway, logged in to a cache, subscribed to `count` channels
/// named `<name>:<i>`; the confirmations' text.
async fn subscribed(
    dev: &ShoalDev,
    token: &str,
    name: &str,
    count: usize,
) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    s.write_all(&crate::support::auth_command(token)).await.unwrap();
    let mut got = String::new();
    for from in (0..count).step_by(2_000) {
        let mut args = vec!["SUBSCRIBE".to_string()];
        args.extend((from..(from + 2_000).min(count)).map(|i| format!("{name}:{i}")));
        s.write_all(&crate::support::encode(&args)).await.unwrap();
        got = confirmations(&mut s, "subscribe", args.len() - 1).await;
    }
    (s, got)
}

/// Each channel subscription costs its node about 230 bytes that no cache's storage counts,
/// and `PUBSUB CHANNELS` walks them all: a tenant cannot subscribe its node full.
#[tokio::test]
async fn a_tenant_cannot_fill_its_node_with_channel_subscriptions() {
    use tokio::io::AsyncWriteExt;
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("subscriber").await;
    let node = ShoalDev::node_of(&cache);
    let mut admin = dev.node_admin(node).await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let node_channels = async |admin: &mut redis::aio::MultiplexedConnection| -> u64 {
        let stats: String = redis::cmd("INFO").arg("stats").query_async(admin).await.unwrap();
        stats.lines().find_map(|l| l.strip_prefix("pubsub_channels:")?.trim().parse().ok()).unwrap()
    };

    // 10,000 channels on one connection; one more is refused, and the connection goes on.
    let (mut first, _) = subscribed(&dev, &token, "c0", 10_000).await;
    first.write_all(&crate::support::encode(&["SUBSCRIBE", "one-too-many"])).await.unwrap();
    let refused = confirmations(&mut first, "subscribe", 1).await;
    assert!(
        refused.contains("-ERR too many channel subscriptions on one connection (max 10000)"),
        "{refused}"
    );
    first.write_all(&crate::support::encode(&["UNSUBSCRIBE", "c0:0"])).await.unwrap();
    confirmations(&mut first, "unsubscribe", 1).await;
    first.write_all(&crate::support::encode(&["SUBSCRIBE", "instead"])).await.unwrap();
    let taken = confirmations(&mut first, "subscribe", 1).await;
    assert!(taken.contains("instead") && !taken.contains("-ERR"), "{taken}");

    // 100,000 over the cache's connections on this gateway; one more is refused.
    let mut held = vec![first];
    for i in 1..10 {
        let (s, got) = subscribed(&dev, &token, &format!("c{i}"), 10_000).await;
        assert!(!got.contains("-ERR"), "connection {i}: {}", &got[got.len().saturating_sub(200)..]);
        held.push(s);
    }
    let (mut eleventh, got) = subscribed(&dev, &token, "late", 1).await;
    assert!(
        got.contains("-ERR too many channel subscriptions for this cache (max 100000 per gateway)"),
        "{got}"
    );
    let on_node = node_channels(&mut admin).await;
    assert!((100_000..=100_010).contains(&on_node), "{on_node} channels on the node");

    // Another cache on the gateway subscribes as it likes.
    let other = dev.create_cache("neighbour").await;
    let other_token = dev.mint_token(other["id"].as_str().unwrap()).await;
    let (_neighbour, got) = subscribed(&dev, &other_token, "n", 10).await;
    assert!(!got.contains("-ERR") && got.matches("\r\nsubscribe\r\n").count() == 10, "{got}");

    // A connection that goes gives its share back.
    drop(held.pop());
    let mut taken = String::new();
    for _ in 0..100 {
        eleventh.write_all(&crate::support::encode(&["SUBSCRIBE", "late:1"])).await.unwrap();
        taken = confirmations(&mut eleventh, "subscribe", 1).await;
        if !taken.contains("-ERR") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(taken.contains("late:1") && !taken.contains("-ERR"), "{taken}");
}

/// `SRANDMEMBER`, `HRANDFIELD` and `ZRANDMEMBER` with a negative count repeat members as
/// often as asked: from a one-member key Valkey made replies until the connection's output
/// limit (513 MB), holding the node some 6 s, every cache on it waiting.
#[tokio::test]
async fn a_huge_count_of_random_members_does_not_hold_the_node() {
    let dev = ShoalDev::start().await;
    let (a, b, _) = neighbours(&dev).await;
    let mut ca = connect(&dev, &a).await;
    let mut cb = connect(&dev, &b).await;
    let _: () = redis::pipe()
        .cmd("SADD")
        .arg("s")
        .arg("m")
        .ignore()
        .cmd("HSET")
        .arg("h")
        .arg("f")
        .arg("v")
        .ignore()
        .cmd("ZADD")
        .arg("z")
        .arg(1)
        .arg("m")
        .ignore()
        .query_async(&mut ca)
        .await
        .unwrap();
    // At the bound: as many as asked.
    let members: Vec<String> =
        redis::cmd("SRANDMEMBER").arg("s").arg(-100_000).query_async(&mut ca).await.unwrap();
    assert_eq!(members.len(), 100_000);
    for (name, key, extra) in [
        ("SRANDMEMBER", "s", None),
        ("HRANDFIELD", "h", Some("WITHVALUES")),
        ("ZRANDMEMBER", "z", Some("WITHSCORES")),
    ] {
        let mut huge = redis::cmd(name);
        huge.arg(key).arg(-70_000_000);
        if let Some(extra) = extra {
            huge.arg(extra);
        }
        let mut attacker = connect(&dev, &a).await;
        let asked = tokio::spawn(async move { huge.query_async::<redis::Value>(&mut attacker).await });
        // Meanwhile B's commands on the same node are answered at once.
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        while started.elapsed() < Duration::from_secs(2) {
            let sent = Instant::now();
            let _: String = redis::cmd("PING").query_async(&mut cb).await.unwrap();
            slowest = slowest.max(sent.elapsed());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reply = tokio::time::timeout(Duration::from_secs(30), asked).await.expect("answered").unwrap();
        let refused = reply.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
        eprintln!("{name} {key} -70000000: B's slowest PING meanwhile {slowest:?}");
        assert!(refused.contains("count is out of range"), "{name}: {:?}", reply.map(|_| "a reply"));
        assert!(slowest < Duration::from_millis(500), "{name}: B waited {slowest:?}");
    }
}
