//! `shoal engine`, the node agent of a host: it runs the Valkey nodes, the control plane only
//! connects to them. Restarting or upgrading the control plane restarts no node; stopping the
//! agent stops them.

use crate::support::Split;
use std::time::{Duration, Instant};

/// The pool's node `n0` once the agent reported it and it is healthy: its pid and restarts.
async fn reported_node(split: &Split) -> (u32, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pools = split.api(reqwest::Method::GET, "/v1/engine/pools", None).await;
        let node = &pools["items"][0]["nodes"][0];
        if node["healthy"] == true && node["engine_host"]["pid"].is_u64() {
            assert_eq!(node["engine_host"]["name"], "e1", "{node}");
            return (
                node["engine_host"]["pid"].as_u64().unwrap() as u32,
                node["engine_host"]["restarts"].as_u64().unwrap(),
            );
        }
        assert!(Instant::now() < deadline, "the agent's node never showed: {pools}\n{}", split.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains("valkey-server"))
}

async fn token_for_new_cache(split: &Split, name: &str) -> String {
    let cache = split.api(reqwest::Method::POST, "/v1/caches", Some(serde_json::json!({"name": name}))).await;
    let id = cache["id"].as_str().unwrap_or_else(|| panic!("{cache}")).to_string();
    split.api(reqwest::Method::POST, &format!("/v1/caches/{id}/tokens"), None).await["token"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restarts_and_upgrades_restart_no_valkey_node() {
    let split = Split::with_engine_agent();
    let mut cp = split.control_plane().await;
    let mut agent = split.engine_agent();
    let _gw = split.gateway();
    let (pid, restarts) = reported_node(&split).await;
    let token = token_for_new_cache(&split, "kept-cache").await;
    let mut client = split.client(&token).await;
    let _: () = redis::cmd("SET").arg("k").arg("before").query_async(&mut client).await.unwrap();

    // kill -9 of the control plane: the node runs on, the cache serves.
    cp.kill();
    let _: () = redis::cmd("SET").arg("k").arg("during").query_async(&mut client).await.unwrap();
    assert!(alive(pid), "the control plane's death ended the node");

    // Back as a new binary (an upgrade): the same node, same process, its data intact.
    let upgraded = split.path("shoal-upgraded");
    std::fs::copy(env!("CARGO_BIN_EXE_shoal"), &upgraded).unwrap();
    cp = split.control_plane_from(&upgraded).await;
    assert_eq!(reported_node(&split).await, (pid, restarts), "the node was restarted");
    let got: String = redis::cmd("GET").arg("k").query_async(&mut client).await.unwrap();
    assert_eq!(got, "during");
    // The new control plane provisions on the agent's node.
    let second = token_for_new_cache(&split, "after-upgrade").await;
    let mut other = split.client(&second).await;
    let got: Option<String> = redis::cmd("GET").arg("k").query_async(&mut other).await.unwrap();
    assert_eq!(got, None, "a new cache is empty");

    // A clean stop of the control plane leaves the node too; the agent's stop ends it.
    assert!(cp.stop());
    assert!(alive(pid), "the control plane's stop ended the node");
    assert!(agent.stop());
    assert!(!alive(pid), "the agent's stop left the node running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_restarts_a_node_that_dies_and_the_control_plane_sees_it() {
    let split = Split::with_engine_agent();
    let _cp = split.control_plane().await;
    let _agent = split.engine_agent();
    let _gw = split.gateway();
    let (pid, restarts) = reported_node(&split).await;
    let token = token_for_new_cache(&split, "crash").await;
    let mut client = split.client(&token).await;
    let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut client).await.unwrap();
    // Keyspace notifications the control plane set survive the agent's restart of the node.
    let id = split.api(reqwest::Method::GET, "/v1/caches", None).await["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let patched = split
        .api(
            reqwest::Method::PATCH,
            &format!("/v1/caches/{id}"),
            Some(serde_json::json!({"keyspace_notifications": "KEA"})),
        )
        .await;
    assert!(!patched["keyspace_notifications"].as_str().unwrap_or_default().is_empty(), "{patched}");
    tokio::time::sleep(Duration::from_secs(1)).await; // the AOF's everysec fsync
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (new_pid, new_restarts) = loop {
        let (p, r) = reported_node(&split).await;
        if p != pid {
            break (p, r);
        }
        assert!(Instant::now() < deadline, "the agent did not restart the node\n{}", split.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(new_restarts, restarts + 1);
    assert!(alive(new_pid));
    let mut client = split.client(&token).await;
    let got: String = redis::cmd("GET").arg("k").query_async(&mut client).await.unwrap();
    assert_eq!(got, "v", "the node came back from its AOF");
    let metrics =
        split.http.get(format!("http://127.0.0.1:{}/metrics", split.agent_metrics)).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("shoal_node_restarts_total{node=\"n0\",reason=\"exited\"} 1"),
        "the agent's /metrics counts the restart:\n{metrics}"
    );
    let conf = std::fs::read_to_string(split.path("valkey/n0/valkey.conf")).unwrap();
    let events =
        conf.lines().find(|l| l.starts_with("notify-keyspace-events")).unwrap_or_default().to_string();
    assert!(events.contains('K') && events.contains('E'), "keyspace events lost in the restart: {events:?}");
}
