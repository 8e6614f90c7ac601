//! The reader endpoint (`--reader-port`): reads answer, writes get `-READONLY`, and a
//! cache's object names it. On the cluster lane the reads come from replicas.

use crate::support::shared;
use reqwest::Method;
use std::time::{Duration, Instant};

#[tokio::test]
async fn the_reader_endpoint_serves_reads_and_refuses_writes() {
    let dev = shared().await;
    let (status, cache) =
        dev.api(Method::POST, "/v1/caches", Some(serde_json::json!({"name": "reads"}))).await;
    assert_eq!(status, 201, "{cache}");
    assert_eq!(cache["reader_endpoint"], format!("127.0.0.1:{}", dev.reader_port));
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let mut writer = dev.client(&token).await.unwrap();
    let _: () = redis::cmd("SET").arg("greeting").arg("hello").query_async(&mut writer).await.unwrap();
    let url = format!("redis://:{token}@127.0.0.1:{}/", dev.reader_port);
    let mut reader = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    // A replica may lag a moment behind.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got: Option<String> = redis::cmd("GET").arg("greeting").query_async(&mut reader).await.unwrap();
        if got.as_deref() == Some("hello") {
            break;
        }
        assert!(Instant::now() < deadline, "the reader endpoint never saw the write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for write in
        [&["SET", "greeting", "bye"][..], &["DEL", "greeting"], &["EVAL", "return 1", "0"], &["FLUSHALL"]]
    {
        let mut cmd = redis::cmd(write[0]);
        for a in &write[1..] {
            cmd.arg(*a);
        }
        let err = cmd.query_async::<redis::Value>(&mut reader).await.unwrap_err();
        assert_eq!(err.code(), Some("READONLY"), "{write:?}: {err}");
    }
    let read_only: i64 = redis::cmd("EVAL_RO").arg("return 7").arg(0).query_async(&mut reader).await.unwrap();
    assert_eq!(read_only, 7);
    let still: String = redis::cmd("GET").arg("greeting").query_async(&mut writer).await.unwrap();
    assert_eq!(still, "hello", "nothing the reader endpoint refused ran");
}
