//! REST API behaviour a user notices: bad input gets a clear problem+json error and changes
//! nothing; unknown ids are 404; no token is 401.

use crate::support::ShoalDev;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn bad_requests_get_problem_json_and_change_nothing() {
    let dev = ShoalDev::start().await;

    let resp = dev.http.get(dev.url("/v1/caches")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let resp = dev.http.get(dev.url("/v1/caches")).bearer_auth("shoal_admin_wrong").send().await.unwrap();
    assert_eq!(resp.status(), 401);

    let resp = dev
        .http
        .post(dev.url("/v1/caches"))
        .bearer_auth(dev.admin_token())
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value = resp.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("JSON"), "{problem}");

    let (status, problem) = dev.api(Method::POST, "/v1/caches", Some(json!({"name": "bad name!"}))).await;
    assert_eq!((status, problem["field"].as_str()), (400, Some("name")));
    let (status, problem) =
        dev.api(Method::POST, "/v1/caches", Some(json!({"name": "ok", "databases": 99}))).await;
    assert_eq!((status, problem["field"].as_str()), (400, Some("databases")));
    let (status, _) = dev.api(Method::POST, "/v1/caches", Some(json!({"name": "ok", "node": "n1"}))).await;
    assert_eq!(status, 400, "unknown fields (like placement) are refused");
    let (status, listed) = dev.api(Method::GET, "/v1/caches", None).await;
    assert_eq!((status, listed["items"].as_array().unwrap().len()), (200, 0), "nothing was created");

    dev.create_cache("dup").await;
    let (status, problem) = dev.api(Method::POST, "/v1/caches", Some(json!({"name": "dup"}))).await;
    assert_eq!(status, 409, "{problem}");

    for path in ["/v1/caches/c000000000000", "/v1/caches/not-an-id", "/v1/caches/c000000000000/tokens"] {
        let method = if path.ends_with("tokens") { Method::POST } else { Method::GET };
        let (status, problem) = dev.api(method, path, None).await;
        assert_eq!((status, problem["status"].as_u64()), (404, Some(404)), "{path}");
    }
    let (status, _) = dev.api(Method::DELETE, "/v1/caches/c000000000000", None).await;
    assert_eq!(status, 404);

    let cache = dev.create_cache("ttl").await;
    let path = format!("/v1/caches/{}/tokens", cache["id"].as_str().unwrap());
    let (status, problem) = dev.api(Method::POST, &path, Some(json!({"ttl_seconds": 0}))).await;
    assert_eq!((status, problem["field"].as_str()), (400, Some("ttl_seconds")));
    let (status, _) = dev.api(Method::POST, &path, Some(json!({"ttl_seconds": 999999999}))).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn openapi_is_served_and_matches_the_checked_in_document() {
    let dev = ShoalDev::start().await;
    let served: serde_json::Value =
        dev.http.get(dev.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let checked_in: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        served, checked_in,
        "openapi/openapi.json is stale: regenerate with `cargo run -q -- openapi > openapi/openapi.json`"
    );
    assert!(served["paths"]["/v1/caches"]["post"].is_object());

    // The interactive viewer works offline: its page and scripts come from the binary.
    let page = dev.http.get(dev.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui") && !html.contains("cdn"), "{html}");
    let js = dev.http.get(dev.url("/docs/swagger-ui-bundle.js")).send().await.unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.bytes().await.unwrap().len() > 100_000);
    let doc: serde_json::Value =
        dev.http.get(dev.url("/docs/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc, checked_in);
}
