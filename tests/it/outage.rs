//! The gateway without its control plane: caches it served lately keep taking new
//! connections and commands (their routes, the token keys and the revocation list are
//! kept); usage waits and is delivered later (see `metering`).

use crate::support::Split;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_to_a_served_cache_work_while_the_control_plane_is_down() {
    let split = Split::new();
    let cp = split.control_plane().await;
    let _gw = split.gateway();
    let mint = |name: &'static str| {
        let split = &split;
        async move {
            let cache =
                split.api(reqwest::Method::POST, "/v1/caches", Some(serde_json::json!({"name": name}))).await;
            let id = cache["id"].as_str().unwrap().to_string();
            split.api(reqwest::Method::POST, &format!("/v1/caches/{id}/tokens"), None).await["token"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let (served, unseen) = (mint("served").await, mint("unseen").await);
    let mut before = split.client(&served).await;
    let _: () = redis::cmd("SET").arg("k").arg("before").query_async(&mut before).await.unwrap();

    // The control plane freezes (SIGSTOP: its Valkey nodes run on) for longer than a
    // route is cached.
    cp.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let url = |token: &str| format!("redis://:{token}@127.0.0.1:{}/", split.resp);
    let started = Instant::now();
    let mut fresh =
        redis::Client::open(url(&served)).unwrap().get_multiplexed_async_connection().await.unwrap();
    let connect_time = started.elapsed();
    let got: String = redis::cmd("GET").arg("k").query_async(&mut fresh).await.unwrap();
    assert_eq!(got, "before");
    let _: () = redis::cmd("SET").arg("k").arg("during").query_async(&mut fresh).await.unwrap();
    let got: String = redis::cmd("GET").arg("k").query_async(&mut before).await.unwrap();
    assert_eq!(got, "during", "the connection made before the outage works too");
    // A cache this gateway never served cannot be found meanwhile: refused, not hung.
    let refused = redis::Client::open(url(&unseen)).unwrap().get_multiplexed_async_connection().await;
    assert!(refused.is_err(), "a cache never served here, while the control plane is down");
    println!("FIGURE a new connection during a control-plane outage took {connect_time:?}");

    cp.signal(libc::SIGCONT);
    let mut after = split.client(&unseen).await;
    let pong: String = redis::cmd("PING").query_async(&mut after).await.unwrap();
    assert_eq!(pong, "PONG");
}
