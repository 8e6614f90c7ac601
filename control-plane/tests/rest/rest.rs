//! REST API behaviour a user notices: bad input gets a clear problem+json error and changes
//! nothing; unknown ids are 404; no token is 401.

use crate::support::Api;
use actix_web::http::Method;
use actix_web::test::TestRequest;
use serde_json::json;

#[actix_web::test]
async fn bad_requests_get_problem_json_and_change_nothing() {
    let cp = Api::start().await;

    let (status, headers, _) = cp.call(None, Method::GET, "/v1/caches", None, &[]).await;
    assert_eq!(status, 401);
    assert_eq!(headers["content-type"], "application/problem+json");
    let (status, _, _) = cp.call(Some("shoal_admin_wrong"), Method::GET, "/v1/caches", None, &[]).await;
    assert_eq!(status, 401);

    let resp = cp
        .send(
            TestRequest::post()
                .uri("/v1/caches")
                .insert_header(("Authorization", format!("Bearer {}", cp.admin_token())))
                .set_payload("{\"name\": "),
        )
        .await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.headers["content-type"], "application/problem+json");
    let problem = resp.json();
    assert!(problem["detail"].as_str().unwrap().contains("JSON"), "{problem}");

    let (status, problem) = cp.api(Method::POST, "/v1/caches", Some(json!({"name": "bad name!"}))).await;
    assert_eq!((status, problem["field"].as_str()), (400, Some("name")));
    let (status, problem) =
        cp.api(Method::POST, "/v1/caches", Some(json!({"name": "ok", "databases": 99}))).await;
    assert_eq!((status, problem["field"].as_str()), (400, Some("databases")));
    let (status, _) = cp.api(Method::POST, "/v1/caches", Some(json!({"name": "ok", "node": "n1"}))).await;
    assert_eq!(status, 400, "unknown fields (like placement) are refused");
    let (status, listed) = cp.api(Method::GET, "/v1/caches", None).await;
    assert_eq!((status, listed["items"].as_array().unwrap().len()), (200, 0), "nothing was created");

    cp.create_cache("dup").await;
    let (status, problem) = cp.api(Method::POST, "/v1/caches", Some(json!({"name": "dup"}))).await;
    assert_eq!(status, 409, "{problem}");

    for path in ["/v1/caches/c000000000000", "/v1/caches/not-an-id", "/v1/caches/c000000000000/tokens"] {
        let method = if path.ends_with("tokens") { Method::POST } else { Method::GET };
        let (status, problem) = cp.api(method, path, None).await;
        assert_eq!((status, problem["status"].as_u64()), (404, Some(404)), "{path}");
    }
    let (status, _) = cp.api(Method::DELETE, "/v1/caches/c000000000000", None).await;
    assert_eq!(status, 404);

    let cache = cp.create_cache("ttl").await;
    let path = format!("/v1/caches/{}/tokens", cache["id"].as_str().unwrap());
    let (status, problem) = cp.api(Method::POST, &path, Some(json!({"ttl_seconds": 0}))).await;
    assert_eq!((status, problem["field"].as_str()), (400, Some("ttl_seconds")));
    let (status, _) = cp.api(Method::POST, &path, Some(json!({"ttl_seconds": 999999999}))).await;
    assert_eq!(status, 400);
}

/// A NUL byte in a query parameter (`%00`) can be neither stored nor matched (PostgreSQL's
/// text refuses it): a clear 400 on every backend, not a 500 from the store (schemathesis
/// found `GET /v1/audit?outcome=…%00…` answering 500 on PostgreSQL).
#[actix_web::test]
async fn a_nul_in_a_query_parameter_is_a_bad_request() {
    let cp = Api::start().await;
    let cache = cp.create_cache("nul").await;
    let id = cache["id"].as_str().unwrap();
    for path in [
        "/v1/audit?outcome=a%00b".to_string(),
        format!("/v1/audit?cache_id={id}&actor=%00"),
        "/v1/snapshots?cache_id=c%00".to_string(),
        "/v1/caches?name=x%00".to_string(),
    ] {
        let (status, problem) = cp.api(Method::GET, &path, None).await;
        assert_eq!((status, problem["field"].as_str()), (400, Some("query")), "{path}: {problem}");
    }
    let (status, _) = cp.api(Method::GET, "/v1/audit?outcome=failure", None).await;
    assert_eq!(status, 200);
}

#[actix_web::test]
async fn openapi_is_served_and_matches_the_checked_in_document() {
    let cp = Api::start().await;
    let (status, _, served) = cp.call(None, Method::GET, "/openapi.json", None, &[]).await;
    assert_eq!(status, 200);
    let checked_in: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        served, checked_in,
        "openapi/openapi.json is stale: regenerate with `cargo run -q -- openapi > openapi/openapi.json`"
    );
    assert!(served["paths"]["/v1/caches"]["post"].is_object());

    // The interactive viewer works offline: its page and scripts come from the binary.
    let page = cp.send(TestRequest::get().uri("/docs/")).await;
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("swagger-ui") && !html.contains("cdn"), "{html}");
    let js = cp.send(TestRequest::get().uri("/docs/swagger-ui-bundle.js")).await;
    assert_eq!(js.status, 200);
    assert!(js.body.len() > 100_000);
    let (_, _, doc) = cp.call(None, Method::GET, "/docs/openapi.json", None, &[]).await;
    assert_eq!(doc, checked_in);
}
