//! The data_storage_mb limit and per-cache connection limits, end to end through the real
//! binary: keys with a TTL are evicted idlest first, then writes get -OOM while reads and
//! deletes keep working, and writes come back once the cache is under its limit.

use crate::support::{auth_command, raw, ShoalDev};
use std::time::{Duration, Instant};

type Conn = redis::aio::MultiplexedConnection;

async fn create(dev: &ShoalDev, name: &str, limits: serde_json::Value) -> (String, String) {
    let (status, body) = dev
        .api(reqwest::Method::POST, "/v1/caches", Some(serde_json::json!({"name": name, "limits": limits})))
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let token = dev.mint_token(&id).await;
    (id, token)
}

/// Writes `n` keys `prefix:i` of 2000-byte values, with a TTL of an hour if `ttl`.
async fn fill(c: &mut Conn, prefix: &str, range: std::ops::Range<usize>, ttl: bool) {
    let value = "v".repeat(2000);
    let mut pipe = redis::pipe();
    for i in range {
        let cmd = pipe.cmd("SET").arg(format!("{prefix}:{i}")).arg(&value);
        if ttl {
            cmd.arg("EX").arg(3600);
        }
        cmd.ignore();
    }
    pipe.query_async::<()>(c).await.unwrap_or_else(|e| panic!("writing {prefix}: {e}"));
}

async fn count(c: &mut Conn, prefix: &str) -> usize {
    redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async::<Vec<String>>(c).await.unwrap().len()
}

/// Polls `check` every 100 ms until it holds; panics after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn set(c: &mut Conn, key: &str) -> redis::RedisResult<()> {
    redis::cmd("SET").arg(key).arg("x").query_async(c).await
}

const OOM: &str = "cache data storage limit reached";

#[tokio::test]
async fn over_its_storage_limit_a_cache_evicts_idle_volatile_keys_then_refuses_writes() {
    let dev = ShoalDev::start_with(&["--storage-interval", "0.5"]).await;
    // 1 MB = 10^6 bytes; each key below stores about 2.1 kB.
    let (id, token) = create(&dev, "small", serde_json::json!({"data_storage_mb": 1})).await;
    let mut c = dev.client(&token).await.unwrap();

    // 300 keys with a TTL (~640 kB, under the limit); then the "hot" half is read again.
    fill(&mut c, "cold", 0..150, true).await;
    fill(&mut c, "hot", 0..150, true).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for i in 0..150 {
        let _: Option<String> = redis::cmd("GET").arg(format!("hot:{i}")).query_async(&mut c).await.unwrap();
    }
    assert_eq!(
        count(&mut c, "cold").await + count(&mut c, "hot").await,
        300,
        "nothing evicted under the limit"
    );

    // 300 keys without a TTL take the cache ~300 kB over: idle volatile keys make room.
    fill(&mut c, "forever", 0..300, false).await;
    eventually(Duration::from_secs(5), "eviction", || {
        let mut c = c.clone();
        async move { count(&mut c, "cold").await < 150 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (cold, hot, forever) =
        (count(&mut c, "cold").await, count(&mut c, "hot").await, count(&mut c, "forever").await);
    assert!(cold < 50, "the idlest keys go first: {cold} cold keys left");
    assert_eq!((hot, forever), (150, 300), "recently used and TTL-less keys stay");
    set(&mut c, "still-writable").await.unwrap();
    // The usage API shows the evictions and the stored bytes.
    let (status, usage) = dev.api(reqwest::Method::GET, &format!("/v1/caches/{id}/usage"), None).await;
    assert_eq!(status, 200, "{usage}");
    let points = usage["points"].as_array().unwrap();
    let evicted: u64 = points.iter().map(|p| p["evicted_keys"].as_u64().unwrap()).sum();
    assert_eq!(evicted, 150 - cold as u64);
    let stored = points.iter().map(|p| p["storage_bytes"].as_u64().unwrap()).max().unwrap();
    assert!(stored > 0, "{usage}");

    // 300 more keys without a TTL: evicting every volatile key is not enough → writes refused.
    fill(&mut c, "forever", 300..600, false).await;
    eventually(Duration::from_secs(5), "writes refused", || {
        let mut c = c.clone();
        async move { set(&mut c, "probe").await.is_err() }
    })
    .await;
    assert_eq!(count(&mut c, "cold").await + count(&mut c, "hot").await, 0, "every volatile key evicted");
    let err = set(&mut c, "k").await.unwrap_err();
    assert_eq!(err.code(), Some("OOM"), "{err}");
    assert!(err.to_string().contains(OOM), "{err}");
    let err = redis::cmd("LPUSH").arg("l").arg("x").query_async::<i64>(&mut c).await.unwrap_err();
    assert_eq!(err.code(), Some("OOM"), "{err}");
    // Reads, deletes and TTL changes keep working.
    let v: Option<String> = redis::cmd("GET").arg("forever:0").query_async(&mut c).await.unwrap();
    assert_eq!(v.map(|v| v.len()), Some(2000));
    let n: i64 = redis::cmd("EXPIRE").arg("forever:599").arg(3600).query_async(&mut c).await.unwrap();
    assert_eq!(n, 1);
    // Inside MULTI a refused write dooms the transaction, as Valkey does when out of memory.
    let out = raw(
        dev.resp_port,
        &[auth_command(&token), b"MULTI\r\nGET forever:2\r\nSET forever:2 x\r\nEXEC\r\n".to_vec()].concat(),
    )
    .await;
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("+OK\r\n+OK\r\n+QUEUED\r\n-OOM cache data storage limit reached\r\n-EXECABORT"),
        "{out}"
    );

    // Deleting makes room: writes work again within about two seconds.
    let keys: Vec<String> = (0..500).map(|i| format!("forever:{i}")).collect();
    let deleted: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut c).await.unwrap();
    assert_eq!(deleted, 500);
    eventually(Duration::from_secs(4), "writes allowed again", || {
        let mut c = c.clone();
        async move { set(&mut c, "probe").await.is_ok() }
    })
    .await;
    let v: Option<String> = redis::cmd("GET").arg("forever:2").query_async(&mut c).await.unwrap();
    assert!(v.is_none());
}

#[tokio::test]
async fn a_noeviction_cache_refuses_writes_without_evicting() {
    let dev = ShoalDev::start_with(&["--storage-interval", "0.5"]).await;
    let (status, body) = dev
        .api(
            reqwest::Method::POST,
            "/v1/caches",
            Some(serde_json::json!({"name": "strict", "limits": {"data_storage_mb": 1}, "eviction_policy": "noeviction"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let token = dev.mint_token(body["id"].as_str().unwrap()).await;
    let mut c = dev.client(&token).await.unwrap();
    // 600 keys of ~2.1 kB: the writes past the limit are refused at once (the gateway counts
    // what was written since the last sample), before any sample could see them.
    let value = "v".repeat(2000);
    let mut accepted = 0;
    for i in 0..600 {
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("ttl:{i}"))
            .arg(&value)
            .arg("EX")
            .arg(3600)
            .query_async(&mut c)
            .await;
        match r {
            Ok(()) => accepted += 1,
            Err(e) => assert!(e.to_string().contains(OOM), "{e}"),
        }
    }
    assert!((300..=480).contains(&accepted), "{accepted} of 600 writes of 2.1 kB accepted under 1 MB");
    assert!(set(&mut c, "probe").await.is_err());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count(&mut c, "ttl").await, accepted, "noeviction evicts nothing");
}

#[tokio::test]
async fn a_cache_connection_limit_overrides_the_gateway_default() {
    let dev = ShoalDev::start_with(&["--max-connections-per-cache", "3"]).await;
    let (id, token) = create(&dev, "two", serde_json::json!({"max_connections": 2})).await;
    let (_, roomy_token) = create(&dev, "five", serde_json::json!({"max_connections": 5})).await;
    let (_, default_token) = create(&dev, "default", serde_json::json!({})).await;
    const REFUSED: &[u8] = b"-ERR max number of clients reached for this cache\r\n";

    // Its own limit (2) below the gateway's default (3).
    let c1 = dev.client(&token).await.unwrap();
    let c2 = dev.client(&token).await.unwrap();
    assert_eq!(raw(dev.resp_port, &auth_command(&token)).await, REFUSED);
    // Above it: five connections.
    let mut roomy = Vec::new();
    for _ in 0..5 {
        roomy.push(dev.client(&roomy_token).await.unwrap());
    }
    assert_eq!(raw(dev.resp_port, &auth_command(&roomy_token)).await, REFUSED);
    // No limit of its own: the gateway's default.
    let mut plain = Vec::new();
    for _ in 0..3 {
        plain.push(dev.client(&default_token).await.unwrap());
    }
    assert_eq!(raw(dev.resp_port, &auth_command(&default_token)).await, REFUSED);

    // Raising the limit takes effect within about a second, for a cache with clients connected.
    let (status, body) = dev
        .api(
            reqwest::Method::PATCH,
            &format!("/v1/caches/{id}"),
            Some(serde_json::json!({"limits": {"max_connections": 3}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(3), "third connection accepted", || async {
        raw(dev.resp_port, &[auth_command(&token), b"PING\r\n".to_vec()].concat()).await
            == b"+OK\r\n+PONG\r\n"
    })
    .await;
    drop((c1, c2, roomy, plain));
}

#[tokio::test]
async fn a_new_caches_stored_bytes_show_in_its_usage_at_once_per_minute_and_per_hour() {
    let dev = ShoalDev::start_with(&["--storage-interval", "0.5"]).await;
    let (id, token) = create(&dev, "fresh", serde_json::json!({})).await;
    let mut c = dev.client(&token).await.unwrap();
    let value = "v".repeat(100);
    for i in 0..50 {
        let _: () = redis::cmd("SET").arg(format!("k{i}")).arg(&value).query_async(&mut c).await.unwrap();
    }
    // 50 keys of 100 bytes: over 5 kB stored. The running minute and hour are averaged over
    // the seconds the cache existed in them, not diluted to nearly nothing.
    for granularity in ["minute", "hour"] {
        let path = format!("/v1/caches/{id}/usage?granularity={granularity}");
        eventually(Duration::from_secs(10), &format!("{granularity}: the stored bytes"), || async {
            let (_, usage) = dev.api(reqwest::Method::GET, &path, None).await;
            let last = usage["points"]
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .find(|p| p["storage_bytes"].as_u64() > Some(0))
                .cloned();
            last.is_some_and(|p| p["storage_bytes"].as_u64().unwrap() > 3_000)
        })
        .await;
    }
}

/// The sampler does not look at a node's idle caches within an hour (only at those with
/// keys): a cache passed over while empty accrues storage from when it got its keys, not
/// from its creation.
#[tokio::test]
async fn a_cache_passed_over_while_empty_accrues_storage_only_from_its_first_keys() {
    passed_over_while_empty_accrues_from_its_first_keys(&[]).await;
}

/// The same where rounds do not read the node's keyspace after the first (as on a node with
/// 100,000 databases, where `INFO keyspace` walks them all): the cache is looked at once in
/// use at the gateway, asked only its own databases.
#[tokio::test]
async fn between_keyspace_reads_a_cache_passed_over_while_empty_accrues_only_from_its_first_keys() {
    passed_over_while_empty_accrues_from_its_first_keys(&["--storage-keyspace-interval", "3600"]).await;
}

async fn passed_over_while_empty_accrues_from_its_first_keys(extra: &[&str]) {
    let dev = ShoalDev::start_with(&[&["--storage-interval", "0.5"], extra].concat()).await;
    let hour_now =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 3600;
    for attempt in 0..2 {
        let hour = hour_now();
        let (id, token) = create(&dev, &format!("idle-{attempt}"), serde_json::json!({})).await;
        let created = Instant::now();
        tokio::time::sleep(Duration::from_secs(4)).await; // about 8 rounds passed over
        let mut c = dev.client(&token).await.unwrap();
        fill(&mut c, "k", 0..50, false).await; // 50 values of 2,000 bytes
        let filled = Instant::now();
        let used = loop {
            let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await.unwrap();
            let used = info
                .lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if used > 100_000u64 {
                break used;
            }
            assert!(filled.elapsed() < Duration::from_secs(10), "the stored bytes not sampled: {used}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let path = format!("/v1/caches/{id}/usage?granularity=hour");
        let (_, usage) = dev.api(reqwest::Method::GET, &path, None).await;
        if hour_now() != hour {
            continue; // the averages would mix two hours
        }
        let average = usage["points"].as_array().unwrap().last().unwrap()["storage_bytes"].as_u64().unwrap();
        let full_share = filled.elapsed().as_secs_f64() / created.elapsed().as_secs_f64();
        // Stored for the last ~40% of its life: accrued from its creation it would be ~100%.
        assert!(
            average > used / 10 && (average as f64) < used as f64 * (full_share + 0.2),
            "average {average} B over the hour with {used} B stored for {full_share:.2} of the cache's life"
        );
        return;
    }
    panic!("both attempts crossed an hour");
}

/// `INFO keyspace` walks every database of a node and holds all its caches meanwhile
/// (17–65 ms at 100,000 databases): the sampler reads it at most every
/// `storage_keyspace_interval`, and between reads still measures a cache in use at once.
#[tokio::test]
async fn between_keyspace_reads_a_cache_in_use_is_measured_at_once() {
    let dev =
        ShoalDev::start_with(&["--storage-interval", "0.5", "--storage-keyspace-interval", "3600"]).await;
    let (id, token) = create(&dev, "in-use", serde_json::json!({})).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // the sampler's first round read it
    let watched = async {
        let logs = futures_util::future::join_all(
            (0..dev.node_ports.len()).map(|i| dev.monitor(i, Duration::from_secs(5))),
        )
        .await;
        logs.concat().to_lowercase().matches("\"info\" \"keyspace\"").count()
    };
    let measured = async {
        let mut c = dev.client(&token).await.unwrap();
        fill(&mut c, "k", 0..20, false).await;
        let path = format!("/v1/caches/{id}/usage?granularity=minute");
        eventually(Duration::from_secs(10), "the stored bytes", || async {
            let (_, usage) = dev.api(reqwest::Method::GET, &path, None).await;
            usage["points"].as_array().unwrap().iter().any(|p| p["storage_bytes"].as_u64() > Some(3_000))
        })
        .await;
    };
    let (reads, ()) = tokio::join!(watched, measured);
    assert_eq!(reads, 0, "INFO keyspace read in 10 rounds");
}

/// A cache of `data_storage_mb: 1` with eviction policy `policy`.
async fn create_with_policy(dev: &ShoalDev, policy: &str) -> Conn {
    let (status, body) = dev
        .api(
            reqwest::Method::POST,
            "/v1/caches",
            Some(serde_json::json!({"name": policy, "limits": {"data_storage_mb": 1}, "eviction_policy": policy})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["eviction_policy"], policy);
    let token = dev.mint_token(body["id"].as_str().unwrap()).await;
    dev.client(&token).await.unwrap()
}

/// What the sampler counts for the cache: `MEMORY USAGE` of every key plus 12 bytes each.
async fn stored_bytes(c: &mut Conn) -> u64 {
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(c).await.unwrap();
    let mut pipe = redis::pipe();
    for k in &keys {
        pipe.cmd("MEMORY").arg("USAGE").arg(k);
    }
    let sizes: Vec<Option<u64>> = pipe.query_async(c).await.unwrap();
    sizes.into_iter().flatten().map(|s| s + 12).sum()
}

async fn read_all(c: &mut Conn, prefix: &str, range: std::ops::Range<usize>) {
    let mut pipe = redis::pipe();
    for i in range {
        pipe.cmd("GET").arg(format!("{prefix}:{i}")).ignore();
    }
    pipe.query_async::<()>(c).await.unwrap();
}

/// Waits until the cache has evicted something and the sampler has had time to finish (two
/// more samples at 0.5 s), then checks it is under its limit of 10^6 bytes.
async fn settled_under_limit(c: &mut Conn, keys_before: usize) {
    eventually(Duration::from_secs(6), "eviction", || {
        let mut c = c.clone();
        async move { redis::cmd("DBSIZE").query_async::<usize>(&mut c).await.unwrap() < keys_before }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let bytes = stored_bytes(c).await;
    assert!(bytes <= 1_000_000, "{bytes} bytes stored, over the limit of 10^6");
    set(c, "still-writable").await.unwrap();
}

async fn allkeys_lru(dev: &ShoalDev) {
    let mut c = create_with_policy(dev, "allkeys-lru").await;
    // 400 keys without a TTL (~850 kB); after two seconds the "hot" half is read again.
    fill(&mut c, "cold", 0..200, false).await;
    fill(&mut c, "hot", 0..200, false).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    read_all(&mut c, "hot", 0..200).await;
    let idle: i64 = redis::cmd("OBJECT").arg("IDLETIME").arg("cold:0").query_async(&mut c).await.unwrap();
    assert!(idle >= 2, "OBJECT IDLETIME works for an LRU cache: {idle}");
    // 200 more take it ~300 kB over: idle keys go, though none has a TTL.
    fill(&mut c, "new", 0..200, false).await;
    settled_under_limit(&mut c, 600).await;
    let (cold, hot, new) =
        (count(&mut c, "cold").await, count(&mut c, "hot").await, count(&mut c, "new").await);
    assert!(cold < 200, "idle keys without a TTL are evicted: {cold} cold keys left");
    assert_eq!((hot, new), (200, 200), "recently read and written keys stay");
}

async fn volatile_ttl(dev: &ShoalDev) {
    let mut c = create_with_policy(dev, "volatile-ttl").await;
    let value = "v".repeat(2000);
    let mut pipe = redis::pipe();
    for i in 0..120 {
        pipe.cmd("SET").arg(format!("soon:{i}")).arg(&value).arg("EX").arg(600).ignore();
        pipe.cmd("SET").arg(format!("late:{i}")).arg(&value).arg("EX").arg(3600).ignore();
    }
    pipe.query_async::<()>(&mut c).await.unwrap();
    fill(&mut c, "forever", 0..120, false).await;
    // Read the keys expiring soonest, so that recency would keep them: TTL decides here.
    read_all(&mut c, "soon", 0..120).await;
    fill(&mut c, "forever", 120..300, false).await;
    settled_under_limit(&mut c, 540).await;
    let (soon, late, forever) =
        (count(&mut c, "soon").await, count(&mut c, "late").await, count(&mut c, "forever").await);
    assert!(soon < 120, "the keys expiring soonest go first: {soon} left");
    assert_eq!((late, forever), (120, 300), "later-expiring and TTL-less keys stay");
}

async fn volatile_random(dev: &ShoalDev) {
    let mut c = create_with_policy(dev, "volatile-random").await;
    fill(&mut c, "ttl-cold", 0..100, true).await;
    fill(&mut c, "ttl-hot", 0..100, true).await;
    fill(&mut c, "forever", 0..200, false).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    read_all(&mut c, "ttl-hot", 0..100).await;
    fill(&mut c, "forever", 200..350, false).await;
    settled_under_limit(&mut c, 550).await;
    let (cold, hot, forever) =
        (count(&mut c, "ttl-cold").await, count(&mut c, "ttl-hot").await, count(&mut c, "forever").await);
    // ~80 of the 200 keys with a TTL go, whatever their use (LRU would spare the hot half).
    assert!(cold < 100 && hot < 100, "keys with a TTL go at random: {cold} cold, {hot} hot left");
    assert_eq!(forever, 350, "keys without a TTL stay");
}

async fn allkeys_random(dev: &ShoalDev) {
    let mut c = create_with_policy(dev, "allkeys-random").await;
    fill(&mut c, "old", 0..400, false).await;
    fill(&mut c, "new", 0..150, false).await;
    settled_under_limit(&mut c, 550).await;
    let (old, new) = (count(&mut c, "old").await, count(&mut c, "new").await);
    // ~80 of 550 keys go, none with a TTL: from both sets (the newest too).
    assert!(old < 400 && new < 150, "any key goes at random: {old} old, {new} new left");
}

/// Reads every key of `prefix` `times` times: Valkey's LFU counter grows with each read.
async fn read_often(c: &mut Conn, prefix: &str, range: std::ops::Range<usize>, times: usize) {
    for _ in 0..times {
        read_all(c, prefix, range.clone()).await;
    }
}

async fn freq(c: &mut Conn, key: &str) -> i64 {
    redis::cmd("OBJECT").arg("FREQ").arg(key).query_async(c).await.unwrap()
}

async fn allkeys_lfu(dev: &ShoalDev) {
    let mut c = create_with_policy(dev, "allkeys-lfu").await;
    fill(&mut c, "rare", 0..200, false).await;
    fill(&mut c, "often", 0..200, false).await;
    // A sample and the gateways' next route refresh see these writes (see
    // docs/limits.md, "Between samples").
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // 150 reads take Valkey's logarithmic counter from 5 to 6 at the first and, almost surely
    // (p > 1 - 10^-6 per key), past 6 later: above a key read once.
    read_often(&mut c, "often", 0..200, 150).await;
    // OBJECT FREQ means what it does on a Valkey with an LFU policy; idle times are not kept.
    let (rare, often) = (freq(&mut c, "rare:0").await, freq(&mut c, "often:0").await);
    assert!(often > rare, "OBJECT FREQ of a key read 150 times ({often}) above an unread one's ({rare})");
    let idle = redis::cmd("OBJECT").arg("IDLETIME").arg("rare:0").query_async::<i64>(&mut c).await;
    assert!(idle.is_err_and(|e| e.to_string().contains("LFU")), "OBJECT IDLETIME under LFU");
    // Read recently but rarely: recency would keep these, frequency does not.
    read_all(&mut c, "rare", 0..200).await;
    fill(&mut c, "new", 0..200, false).await;
    settled_under_limit(&mut c, 600).await;
    let (rare, often) = (count(&mut c, "rare").await, count(&mut c, "often").await);
    let new = count(&mut c, "new").await;
    assert!(rare + new < 400, "rarely used keys are evicted: {rare} rare, {new} new left");
    assert_eq!(often, 200, "often read keys stay");
}

async fn volatile_lfu(dev: &ShoalDev) {
    let mut c = create_with_policy(dev, "volatile-lfu").await;
    fill(&mut c, "ttl-rare", 0..100, true).await;
    fill(&mut c, "ttl-often", 0..100, true).await;
    fill(&mut c, "forever", 0..200, false).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    read_often(&mut c, "ttl-often", 0..100, 150).await;
    read_all(&mut c, "ttl-rare", 0..100).await;
    fill(&mut c, "forever", 200..350, false).await;
    settled_under_limit(&mut c, 550).await;
    let (rare, often) = (count(&mut c, "ttl-rare").await, count(&mut c, "ttl-often").await);
    let forever = count(&mut c, "forever").await;
    assert!(rare < 100, "rarely used keys with a TTL go first: {rare} left");
    assert_eq!((often, forever), (100, 350), "often used keys and keys without a TTL stay");
}

#[tokio::test]
async fn each_eviction_policy_evicts_its_own_candidates_in_its_own_order() {
    let dev = ShoalDev::start_with(&["--storage-interval", "0.5"]).await;
    // Four caches on one platform, side by side.
    tokio::join!(allkeys_lru(&dev), volatile_ttl(&dev), volatile_random(&dev), allkeys_random(&dev));
}

/// The LFU policies: caches on the node that tracks frequency (`--lfu-nodes`, f0), where
/// `OBJECT FREQ` works and the least used keys go first; their policy changes only to
/// another LFU one.
#[tokio::test]
async fn lfu_caches_evict_their_least_used_keys() {
    let dev = ShoalDev::start_with(&["--storage-interval", "0.5"]).await;
    tokio::join!(allkeys_lfu(&dev), volatile_lfu(&dev));
    let lru = create_with_policy(&dev, "volatile-lru").await;
    drop(lru);
    let (_, list) = dev.api(reqwest::Method::GET, "/v1/caches?limit=100", None).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{list}");
    for cache in items {
        let lfu = cache["eviction_policy"].as_str().unwrap().ends_with("-lfu");
        assert_eq!(cache["allocation"]["node"] == "f0", lfu, "{cache}");
    }
    let (_, pools) = dev.api(reqwest::Method::GET, "/v1/engine/pools", None).await;
    let nodes = pools["items"][0]["nodes"].as_array().unwrap();
    let tracks = |name: &str| nodes.iter().find(|n| n["name"] == name).map(|n| n["key_access"].clone());
    assert_eq!(tracks("n0"), Some("recency".into()), "{pools}");
    assert_eq!(tracks("f0"), Some("frequency".into()), "{pools}");
    let lfu = items.iter().find(|c| c["eviction_policy"] == "allkeys-lfu").unwrap();
    let path = format!("/v1/caches/{}", lfu["id"].as_str().unwrap());
    let patch = |p: &str| Some(serde_json::json!({ "eviction_policy": p }));
    let (status, body) = dev.api(reqwest::Method::PATCH, &path, patch("allkeys-lru")).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("frequency"), "{body}");
    let (status, body) = dev.api(reqwest::Method::PATCH, &path, patch("volatile-lfu")).await;
    assert_eq!(status, 200, "{body}");
}

/// Without a node that tracks frequency, LFU policies are refused with the reason.
#[tokio::test]
async fn lfu_policies_need_a_node_that_tracks_frequency() {
    let dev = ShoalDev::start_with(&["--lfu-nodes", "0"]).await;
    for policy in ["allkeys-lfu", "volatile-lfu"] {
        let (status, body) = dev
            .api(
                reqwest::Method::POST,
                "/v1/caches",
                Some(serde_json::json!({"name": policy, "eviction_policy": policy})),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(body["detail"].as_str().unwrap().contains("--lfu-nodes"), "{body}");
    }
    let lru = serde_json::json!({"name": "lru", "eviction_policy": "allkeys-lru"});
    let (status, body) = dev.api(reqwest::Method::POST, "/v1/caches", Some(lru)).await;
    assert_eq!(status, 201, "{body}");
}
