//! Engine pools over REST, on a real cluster pool (2 shards, no replica) beside the
//! standalone `main`: placement by `"pool"`, `GET /v1/engine/pools`, and adding then
//! removing a shard — admin only, one at a time, audited.

use crate::support::Api;
use actix_web::http::Method;
use serde_json::{json, Value};

/// `notify-keyspace-events` of every node of the cluster pool.
async fn cluster_events(cp: &Api) -> Vec<String> {
    let pool = cp.state.pools.get("cluster").unwrap();
    let mut out = Vec::new();
    for node in pool.cluster().unwrap().nodes() {
        let mut conn = node.admin_client().unwrap().get_multiplexed_async_connection().await.unwrap();
        let (_, flags): (String, String) = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push(flags);
    }
    out
}

fn pool<'a>(pools: &'a Value, name: &str) -> &'a Value {
    pools["items"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{pools}"))
}

fn slot_counts(pool: &Value) -> Vec<u64> {
    pool["shards"].as_array().unwrap().iter().map(|s| s["slot_count"].as_u64().unwrap()).collect()
}

#[actix_web::test]
async fn caches_are_placed_in_named_pools_and_admins_scale_a_cluster_pool_one_shard_at_a_time() {
    let cp = Api::start_with_cluster(2, 0).await;
    let (_, owner) = cp.account_with_key("acme", "owner").await;

    // An unknown pool: 400 naming the field, nothing created.
    let (status, _, body) = cp
        .call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": "x", "pool": "nope"})), &[])
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "pool");
    assert!(body["detail"].as_str().unwrap().contains("cluster, main"), "{body}");
    let (_, listed) = cp.api(Method::GET, "/v1/caches", None).await;
    assert_eq!(listed["items"], json!([]));

    // Placed where asked, or in the default pool; the object says where.
    let (status, _, on_cluster) = cp
        .call(
            Some(&owner),
            Method::POST,
            "/v1/caches",
            Some(json!({"name": "spread", "pool": "cluster", "keyspace_notifications": "Kg$"})),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{on_cluster}");
    assert_eq!(on_cluster["pool"], "cluster");
    let (_, _, on_main) =
        cp.call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": "plain"})), &[]).await;
    assert_eq!(on_main["pool"], "main");
    let (_, got) =
        cp.api(Method::GET, &format!("/v1/caches/{}", on_cluster["id"].as_str().unwrap()), None).await;
    assert_eq!(
        (got["pool"].as_str(), got["allocation"]["node"].as_str()),
        (Some("cluster"), Some("cluster"))
    );
    // The cluster cache's keyspace events are set on every node of the cluster.
    let events = cluster_events(&cp).await;
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.contains('g') && e.contains('$')), "{events:?}");

    // The pools as the admin sees them.
    let (status, pools) = cp.api(Method::GET, "/v1/engine/pools", None).await;
    assert_eq!(status, 200, "{pools}");
    let cluster = pool(&pools, "cluster");
    assert_eq!((cluster["kind"].as_str(), cluster["default"].as_bool()), (Some("cluster"), Some(false)));
    assert_eq!(cluster["caches"], 1);
    assert_eq!(cluster["ok"], true);
    assert_eq!(slot_counts(cluster), vec![8192, 8192]);
    let nodes = cluster["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert!(nodes
        .iter()
        .all(|n| n["role"] == "primary" && n["healthy"] == true && n["used_memory"].is_u64()));
    assert_eq!(cluster["shards"][0]["slots"], json!([[0, 8191]]));
    let main = pool(&pools, "main");
    assert_eq!((main["kind"].as_str(), main["default"].as_bool()), (Some("standalone"), Some(true)));
    assert_eq!((main["caches"].as_u64(), main["shards"].as_array().unwrap().len()), (Some(1), 0));
    assert_eq!(main["nodes"][0]["name"], "n0");

    // Owners may neither read nor scale; nothing changes.
    let (status, _, _) = cp.call(Some(&owner), Method::GET, "/v1/engine/pools", None, &[]).await;
    assert_eq!(status, 403);
    let (status, _, _) =
        cp.call(Some(&owner), Method::POST, "/v1/engine/pools/cluster/shards", None, &[]).await;
    assert_eq!(status, 403);
    let shard0 = cluster["shards"][0]["id"].as_str().unwrap().to_string();
    let (status, _, _) = cp
        .call(Some(&owner), Method::DELETE, &format!("/v1/engine/pools/cluster/shards/{shard0}"), None, &[])
        .await;
    assert_eq!(status, 403);
    let (_, pools) = cp.api(Method::GET, "/v1/engine/pools", None).await;
    assert_eq!(slot_counts(pool(&pools, "cluster")), vec![8192, 8192], "a refused scale changes nothing");

    // Two adds at once: one runs, the other is refused.
    let token = cp.admin_token();
    let add = || cp.call(Some(&token), Method::POST, "/v1/engine/pools/cluster/shards", None, &[]);
    let ((s1, _, b1), (s2, _, b2)) = tokio::join!(add(), add());
    let mut statuses = [s1, s2];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "{b1} {b2}");
    let added = if s1 == 201 { b1 } else { b2 };
    let added_id = added["id"].as_str().unwrap().to_string();
    // Each shard keeps 16384 / 3 slots; the new one takes the rest.
    assert_eq!(added["slot_count"], 16384 - 2 * (16384 / 3), "{added}");
    let (_, pools) = cp.api(Method::GET, "/v1/engine/pools", None).await;
    let counts = slot_counts(pool(&pools, "cluster"));
    assert_eq!((counts.len(), counts.iter().sum::<u64>()), (3, 16384), "{counts:?}");
    // The new shard's node got the keyspace events too.
    let events = cluster_events(&cp).await;
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e.contains('g') && e.contains('$')), "{events:?}");

    // Unknown shard, then the real removal (drained first).
    let (status, _) = cp.api(Method::DELETE, "/v1/engine/pools/cluster/shards/0123abcd", None).await;
    assert_eq!(status, 404);
    let (status, body) =
        cp.api(Method::DELETE, &format!("/v1/engine/pools/cluster/shards/{added_id}"), None).await;
    assert_eq!(status, 204, "{body}");
    let (_, pools) = cp.api(Method::GET, "/v1/engine/pools", None).await;
    let cluster = pool(&pools, "cluster");
    let counts = slot_counts(cluster);
    assert_eq!((counts.len(), counts.iter().sum::<u64>()), (2, 16384), "{counts:?}");
    assert!(cluster["shards"].as_array().unwrap().iter().all(|s| s["id"] != added_id.as_str()));

    // Both changes are on record, with who and what; so are the refusals.
    let (_, adds) = cp.api(Method::GET, "/v1/audit?action=pool.shard.add", None).await;
    let adds = adds["items"].as_array().unwrap().clone();
    assert_eq!(adds.len(), 1, "{adds:?}");
    assert_eq!(
        (adds[0]["target"].as_str(), adds[0]["details"]["shard"].as_str()),
        (Some("cluster"), Some(added_id.as_str()))
    );
    let (_, removes) = cp.api(Method::GET, "/v1/audit?action=pool.shard.remove", None).await;
    assert_eq!(removes["items"].as_array().unwrap().len(), 1, "{removes}");
    let (_, refused) = cp.api(Method::GET, "/v1/audit?outcome=failure", None).await;
    let refused: Vec<&str> =
        refused["items"].as_array().unwrap().iter().filter_map(|r| r["action"].as_str()).collect();
    assert!(refused.contains(&"POST /v1/engine/pools/{pool}/shards"), "{refused:?}");
    assert!(refused.contains(&"DELETE /v1/engine/pools/{pool}/shards/{id}"), "{refused:?}");
}
