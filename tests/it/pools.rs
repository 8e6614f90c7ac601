//! `shoal dev --engine cluster`: the cluster pool is the default beside the standalone
//! `main`; caches are placed in either, `GET /v1/engine/pools` shows the cluster's shards,
//! roles and slots, a cluster cache's route names every node of the cluster, and the sweep
//! of scoped tokens' ACL users covers the cluster's nodes. (RESP traffic to cluster caches
//! is the gateway's, tested there.)

use crate::support::ShoalDev;
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test]
async fn dev_with_a_cluster_engine_places_caches_in_it_by_default_and_lists_its_shards() {
    let dev = ShoalDev::start_cluster(2, 1, &["--acl-sweep-interval", "0.2"]).await;
    let base = dev.cluster.unwrap().base_port;

    let (status, spread) = dev.api(Method::POST, "/v1/caches", Some(json!({"name": "spread"}))).await;
    assert_eq!(status, 201, "{spread}");
    assert_eq!(spread["pool"], "cluster", "the cluster is dev's default pool");
    let (status, plain) =
        dev.api(Method::POST, "/v1/caches", Some(json!({"name": "plain", "pool": "main"}))).await;
    assert_eq!(status, 201, "{plain}");
    assert_eq!(plain["pool"], "main");
    let (status, refused) =
        dev.api(Method::POST, "/v1/caches", Some(json!({"name": "lost", "pool": "elsewhere"}))).await;
    assert_eq!((status, refused["field"].as_str()), (400, Some("pool")), "{refused}");

    let (status, pools) = dev.api(Method::GET, "/v1/engine/pools", None).await;
    assert_eq!(status, 200, "{pools}");
    let find = |name: &str| -> Value {
        pools["items"].as_array().unwrap().iter().find(|p| p["name"] == name).cloned().expect("pool listed")
    };
    let cluster = find("cluster");
    assert_eq!((cluster["kind"].as_str(), cluster["default"].as_bool()), (Some("cluster"), Some(true)));
    assert_eq!((cluster["caches"].as_u64(), cluster["ok"].as_bool()), (Some(1), Some(true)));
    let shards = cluster["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2, "{cluster}");
    assert_eq!(shards.iter().map(|s| s["slot_count"].as_u64().unwrap()).sum::<u64>(), 16384);
    for shard in shards {
        let roles: Vec<&str> =
            shard["nodes"].as_array().unwrap().iter().map(|n| n["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["primary", "replica"], "{shard}");
    }
    let mut addrs: Vec<String> = cluster["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["addr"].as_str().unwrap().to_string())
        .collect();
    addrs.sort();
    let mut expected: Vec<String> = (0..4).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    expected.sort();
    assert_eq!(addrs, expected, "the cluster runs on --cluster-base-port");
    assert!(cluster["nodes"].as_array().unwrap().iter().all(|n| n["healthy"] == true));
    assert!(cluster["nodes"].as_array().unwrap().iter().all(|n| n["modules"] == json!([])), "no --module");
    let main = find("main");
    assert_eq!((main["kind"].as_str(), main["caches"].as_u64()), (Some("standalone"), Some(1)));
    // n0 and n1, f0 for LFU caches (`--lfu-nodes 1`), d0 for a dedicated cache
    // (`--dedicated-nodes 1`).
    let names: Vec<&str> =
        main["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["n0", "n1", "f0", "d0"]);
    let placements: Vec<&str> =
        main["nodes"].as_array().unwrap().iter().map(|n| n["placement"].as_str().unwrap()).collect();
    assert_eq!(placements, ["shared", "shared", "shared", "dedicated"]);

    // What a gateway gets for the cluster cache: every node, and a primary to start from.
    let credential = dev.gateway_credential("probe").await;
    let id = spread["id"].as_str().unwrap();
    let route: Value = dev
        .http
        .get(dev.internal_url(&format!("/internal/v1/routes/{id}")))
        .bearer_auth(&credential)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut nodes: Vec<String> =
        route["cluster_nodes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
    nodes.sort();
    assert_eq!(nodes, expected, "{route}");
    let primaries: Vec<&str> = shards.iter().map(|s| s["nodes"][0]["addr"].as_str().unwrap()).collect();
    assert!(primaries.contains(&route["node_addr"].as_str().unwrap()), "{route}");
    assert!(route["observer_password"].as_str().is_some_and(|p| !p.is_empty()));

    // A scoped token's ACL user is on every node of the cluster, replicas included, and the
    // sweep takes it from every node once no live token uses it.
    let (status, token) = dev
        .api(Method::POST, &format!("/v1/caches/{id}/tokens"), Some(json!({"permission": "read-only"})))
        .await;
    assert_eq!(status, 201, "{token}");
    let prefix = format!("t{id}.jwt.");
    let on_nodes = cluster_users(&dev, base, &prefix).await;
    assert!(on_nodes.iter().all(|u| u.len() == 1), "{on_nodes:?}");
    let jti = token["jti"].as_str().unwrap();
    let (status, _) = dev.api(Method::DELETE, &format!("/v1/caches/{id}/tokens/{jti}"), None).await;
    assert_eq!(status, 204);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = cluster_users(&dev, base, &prefix).await;
        if left.iter().all(|u| u.is_empty()) {
            break;
        }
        if std::time::Instant::now() > deadline {
            let log = dev.log();
            let acl_lines: Vec<&str> =
                log.lines().filter(|l| l.contains("ACL") || l.contains("acl")).collect();
            panic!(
                "the sweep left the token's ACL user on cluster nodes: {left:?}\n{}",
                acl_lines.join("\n")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Readiness covers the cluster's nodes too.
    let ready: Value = dev.http.get(dev.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["nodes"].as_object().unwrap().len(), 4 + 4, "{ready}");
}

/// ACL users starting with `prefix` on each of the dev cluster's 4 nodes.
async fn cluster_users(dev: &ShoalDev, base: u16, prefix: &str) -> Vec<Vec<String>> {
    let secret = std::fs::read_to_string(dev.dir.join(".shoal/valkey-cluster/admin.secret")).unwrap();
    let mut out = Vec::new();
    for port in base..base + 4 {
        let url = format!("redis://shoal:{}@127.0.0.1:{port}/", secret.trim());
        let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
        let users: Vec<String> = redis::cmd("ACL").arg("USERS").query_async(&mut conn).await.unwrap();
        out.push(users.into_iter().filter(|u| u.starts_with(prefix)).collect());
    }
    out
}
