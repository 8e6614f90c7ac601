//! The REST API as operators and tenants use it: accounts, API keys and roles, caches with
//! limits, pagination, idempotent creates, ETags, and the authorization matrix of every route.
//! Runs on SQLite and (in the Postgres lane) on PostgreSQL.

use crate::support::Api;
use actix_web::http::Method;
use serde_json::{json, Value};

/// The principals of the matrix.
struct Who {
    admin: String,
    owner: String,
    other: String,
    auditor: String,
}

impl Who {
    fn all(&self) -> [(&'static str, Option<&str>); 5] {
        [
            ("admin", Some(self.admin.as_str())),
            ("owner", Some(self.owner.as_str())),
            ("other", Some(self.other.as_str())),
            ("auditor", Some(self.auditor.as_str())),
            ("none", None),
        ]
    }
}

async fn setup(cp: &Api) -> (Who, String, String) {
    let (account, owner) = cp.account_with_key("acme", "owner").await;
    let (_, other) = cp.account_with_key("globex", "owner").await;
    let auditor = cp.api_key(&account, "auditor").await;
    let who = Who { admin: cp.admin_token(), owner, other, auditor };
    let (status, _, cache) =
        cp.call(Some(&who.owner), Method::POST, "/v1/caches", Some(json!({"name": "orders"})), &[]).await;
    assert_eq!(status, 201, "{cache}");
    assert_eq!(cache["account_id"], account.as_str(), "a cache created with an account's key belongs to it");
    (who, account, cache["id"].as_str().unwrap().to_string())
}

#[actix_web::test]
async fn every_route_answers_each_role_as_documented() {
    let cp = Api::start().await;
    let (who, account, cache) = setup(&cp).await;
    let a = account.as_str();
    let c = cache.as_str();
    // (method, path, body, expected status for admin, owner, other owner, auditor, no token)
    let matrix: Vec<(Method, String, Option<Value>, [u16; 5])> = vec![
        (Method::GET, "/v1/accounts".into(), None, [200, 200, 200, 200, 401]),
        (Method::POST, "/v1/accounts".into(), Some(json!({"name": "new-acct"})), [201, 403, 403, 403, 401]),
        (Method::GET, format!("/v1/accounts/{a}"), None, [200, 200, 404, 200, 401]),
        (
            Method::PATCH,
            format!("/v1/accounts/{a}"),
            Some(json!({"email": "ops@acme.example"})),
            [200, 200, 404, 403, 401],
        ),
        (Method::DELETE, format!("/v1/accounts/{a}"), None, [409, 403, 404, 403, 401]),
        (
            Method::POST,
            format!("/v1/accounts/{a}/api-keys"),
            Some(json!({"name": "ci", "role": "auditor"})),
            [201, 201, 404, 403, 401],
        ),
        (Method::GET, format!("/v1/accounts/{a}/api-keys"), None, [200, 200, 404, 403, 401]),
        (
            Method::POST,
            "/v1/api-keys".into(),
            Some(json!({"name": "ops", "role": "auditor"})),
            [201, 403, 403, 403, 401],
        ),
        (Method::GET, "/v1/api-keys".into(), None, [200, 403, 403, 403, 401]),
        (Method::POST, "/v1/caches".into(), Some(json!({"name": "fresh"})), [201, 201, 201, 403, 401]),
        (Method::GET, "/v1/caches".into(), None, [200, 200, 200, 200, 401]),
        (Method::GET, format!("/v1/caches/{c}"), None, [200, 200, 404, 200, 401]),
        (
            Method::PATCH,
            format!("/v1/caches/{c}"),
            Some(json!({"description": "orders cache"})),
            [200, 200, 404, 403, 401],
        ),
        (Method::POST, format!("/v1/caches/{c}/tokens"), None, [201, 201, 404, 403, 401]),
        (Method::GET, format!("/v1/caches/{c}/tokens"), None, [200, 200, 404, 200, 401]),
        (Method::GET, format!("/v1/caches/{c}/usage"), None, [200, 200, 404, 200, 401]),
        (Method::GET, "/v1/invoices".into(), None, [200, 200, 200, 200, 401]),
        (
            Method::GET,
            format!("/v1/invoices/{a}-{}", chrono::Utc::now().format("%Y-%m")),
            None,
            [200, 200, 404, 200, 401],
        ),
        (
            Method::POST,
            "/v1/estimate".into(),
            Some(
                json!({"requests_per_second": 10, "avg_request_bytes": 100, "avg_reply_bytes": 100, "stored_gb": 1}),
            ),
            [200, 200, 200, 200, 401],
        ),
        (Method::GET, "/v1/audit".into(), None, [200, 200, 200, 200, 401]),
        (Method::GET, "/v1/audit/verify".into(), None, [200, 403, 403, 403, 401]),
        (Method::GET, "/v1/me".into(), None, [200, 200, 200, 200, 401]),
        (Method::GET, "/v1/engine/pools".into(), None, [200, 403, 403, 403, 401]),
        // The one pool here is standalone: no shards to add (409), and only admins may try.
        (Method::POST, "/v1/engine/pools/main/shards".into(), None, [409, 403, 403, 403, 401]),
        (Method::POST, "/v1/engine/pools/nope/shards".into(), None, [404, 403, 403, 403, 401]),
        (Method::DELETE, "/v1/engine/pools/main/shards/abc".into(), None, [409, 403, 403, 403, 401]),
    ];
    for (method, path, body, expected) in &matrix {
        for ((name, token), want) in who.all().iter().zip(expected) {
            // Creates of named things need a fresh name per principal.
            let body = body.clone().map(|mut b| {
                if let Some(n) = b.get("name").and_then(Value::as_str) {
                    b["name"] = json!(format!("{n}-{name}"));
                }
                b
            });
            let (status, _, answer) = cp.call(*token, method.clone(), path, body, &[]).await;
            assert_eq!(status, *want, "{method} {path} as {name}: {answer}");
            if status >= 400 {
                assert!(answer["detail"].is_string(), "{method} {path} as {name}: errors are problem+json");
            }
        }
    }

    // Per-object deletes and revokes, on a fresh object for each principal.
    for ((name, token), want) in who.all().iter().zip([204, 204, 404, 403, 401]) {
        let (_, _, fresh) = cp
            .call(
                Some(&who.owner),
                Method::POST,
                "/v1/caches",
                Some(json!({"name": format!("del-{name}")})),
                &[],
            )
            .await;
        let id = fresh["id"].as_str().unwrap();
        let (status, _, _) = cp.call(*token, Method::DELETE, &format!("/v1/caches/{id}"), None, &[]).await;
        assert_eq!(status, want, "DELETE cache as {name}");
        let (exists, _, _) =
            cp.call(Some(&who.admin), Method::GET, &format!("/v1/caches/{id}"), None, &[]).await;
        assert_eq!(exists, if want == 204 { 404 } else { 200 }, "a refused delete changes nothing ({name})");

        let (_, _, minted) =
            cp.call(Some(&who.owner), Method::POST, &format!("/v1/caches/{c}/tokens"), None, &[]).await;
        let jti = minted["jti"].as_str().unwrap();
        let (status, _, _) =
            cp.call(*token, Method::DELETE, &format!("/v1/caches/{c}/tokens/{jti}"), None, &[]).await;
        assert_eq!(status, want, "DELETE token as {name}");

        let (_, _, key) = cp
            .call(
                Some(&who.owner),
                Method::POST,
                &format!("/v1/accounts/{a}/api-keys"),
                Some(json!({"name": "tmp", "role": "auditor"})),
                &[],
            )
            .await;
        let key_id = key["id"].as_str().unwrap();
        let (status, _, _) =
            cp.call(*token, Method::DELETE, &format!("/v1/accounts/{a}/api-keys/{key_id}"), None, &[]).await;
        assert_eq!(status, want, "DELETE api key as {name}");
        let key_works = cp.call(key["token"].as_str(), Method::GET, "/v1/caches", None, &[]).await.0;
        assert_eq!(
            key_works,
            if want == 204 { 401 } else { 200 },
            "a revoked key stops working at once ({name})"
        );
    }

    // Lists never show another account's objects.
    let (_, _, theirs) = cp.call(Some(&who.other), Method::GET, "/v1/caches", None, &[]).await;
    assert!(theirs["items"].as_array().unwrap().iter().all(|x| x["account_id"] != a), "{theirs}");
    let (_, _, theirs) = cp.call(Some(&who.other), Method::GET, "/v1/accounts", None, &[]).await;
    assert!(theirs["items"].as_array().unwrap().iter().all(|x| x["id"] != a), "{theirs}");
    let (_, _, theirs) =
        cp.call(Some(&who.other), Method::GET, &format!("/v1/caches?account_id={a}"), None, &[]).await;
    assert_eq!(theirs["items"], json!([]));
    let (_, _, theirs) =
        cp.call(Some(&who.other), Method::GET, &format!("/v1/audit?cache_id={c}"), None, &[]).await;
    assert_eq!(theirs["items"], json!([]), "another account's audit records stay hidden");
    let (_, _, mine) =
        cp.call(Some(&who.auditor), Method::GET, &format!("/v1/audit?cache_id={c}"), None, &[]).await;
    assert!(!mine["items"].as_array().unwrap().is_empty(), "the account's auditor reads its audit records");
}

#[actix_web::test]
async fn creates_refuse_fields_the_platform_owns_and_patch_changes_many_fields_at_once() {
    let cp = Api::start().await;
    let (who, account, cache) = setup(&cp).await;
    for field in ["id", "account_id", "node", "db", "allocation", "status"] {
        let body = json!({"name": format!("x-{field}"), field: "a000000000001"});
        let (status, _, answer) =
            cp.call(Some(&who.owner), Method::POST, "/v1/caches", Some(body), &[]).await;
        assert_eq!((status, answer["field"].as_str()), (400, Some(field)), "{answer}");
        let (status, _, answer) = cp
            .call(
                Some(&who.owner),
                Method::PATCH,
                &format!("/v1/caches/{cache}"),
                Some(json!({field: "x"})),
                &[],
            )
            .await;
        assert_eq!((status, answer["field"].as_str()), (400, Some(field)), "{answer}");
    }
    let (status, _, answer) = cp
        .call(
            Some(&who.owner),
            Method::PATCH,
            &format!("/v1/caches/{cache}"),
            Some(json!({"databases": 4})),
            &[],
        )
        .await;
    assert_eq!((status, answer["field"].as_str()), (400, Some("databases")), "{answer}");

    // Several fields in one PATCH, guarded by the ETag.
    let (_, headers, before) =
        cp.call(Some(&who.owner), Method::GET, &format!("/v1/caches/{cache}"), None, &[]).await;
    let etag = headers["etag"].clone();
    assert_eq!(before["etag"], etag.as_str());
    let patch = json!({
        "description": "order lookups",
        "limits": {"ecpu_per_second": 5000, "data_storage_mb": 512, "max_connections": 100},
        "eviction_policy": "noeviction",
        "tags": {"team": "checkout"},
        "keyspace_notifications": "Kx"
    });
    let (status, headers, after) = cp
        .call(
            Some(&who.owner),
            Method::PATCH,
            &format!("/v1/caches/{cache}"),
            Some(patch.clone()),
            &[("If-Match", &etag)],
        )
        .await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["description"], "order lookups");
    assert_eq!(
        after["limits"],
        json!({"ecpu_per_second": 5000, "data_storage_mb": 512, "max_connections": 100})
    );
    assert_eq!(after["eviction_policy"], "noeviction");
    assert_eq!(after["tags"], json!({"team": "checkout"}));
    assert_eq!(after["keyspace_notifications"], "Kx");
    assert_eq!(after["account_id"], account.as_str());
    assert_ne!(headers["etag"], etag);
    // The old ETag is stale now: the write is refused and nothing changes.
    let (status, _, answer) = cp
        .call(
            Some(&who.owner),
            Method::PATCH,
            &format!("/v1/caches/{cache}"),
            Some(json!({"description": "lost update"})),
            &[("If-Match", &etag)],
        )
        .await;
    assert_eq!(status, 412, "{answer}");
    // null removes one limit, the others stay.
    let (_, _, after) = cp
        .call(
            Some(&who.owner),
            Method::PATCH,
            &format!("/v1/caches/{cache}"),
            Some(json!({"limits": {"max_connections": null}})),
            &[],
        )
        .await;
    assert_eq!(after["description"], "order lookups");
    assert_eq!(after["limits"], json!({"ecpu_per_second": 5000, "data_storage_mb": 512}));
    // Bad values name their field and change nothing.
    for (body, field) in [
        (json!({"limits": {"ecpu_per_second": 0}}), "limits.ecpu_per_second"),
        (json!({"limits": {"bogus": 1}}), "limits.bogus"),
        (json!({"eviction_policy": "allkeys-mru"}), "eviction_policy"),
        (json!({"name": "no spaces allowed"}), "name"),
        (json!({"tags": {"": "x"}}), "tags"),
    ] {
        let (status, _, answer) =
            cp.call(Some(&who.owner), Method::PATCH, &format!("/v1/caches/{cache}"), Some(body), &[]).await;
        assert_eq!((status, answer["field"].as_str()), (400, Some(field)), "{answer}");
    }
    let (_, _, unchanged) =
        cp.call(Some(&who.owner), Method::GET, &format!("/v1/caches/{cache}"), None, &[]).await;
    assert_eq!(unchanged["limits"], json!({"ecpu_per_second": 5000, "data_storage_mb": 512}));
    assert_eq!(unchanged["name"], "orders");
}

#[actix_web::test]
async fn lists_paginate_and_creates_are_idempotent() {
    let cp = Api::start().await;
    let (account, owner) = cp.account_with_key("pager", "owner").await;
    for i in 0..5 {
        let (status, _, _) = cp
            .call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": format!("c{i}")})), &[])
            .await;
        assert_eq!(status, 201);
    }
    let mut seen = Vec::new();
    let mut path = "/v1/caches?limit=2".to_string();
    loop {
        let (status, _, page) = cp.call(Some(&owner), Method::GET, &path, None, &[]).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|c| c["name"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/caches?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["c0", "c1", "c2", "c3", "c4"]);
    // Found by the start of their names (the portal's search), a page at a time too.
    let (status, _, other) =
        cp.call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": "d0"})), &[]).await;
    assert_eq!(status, 201, "{other}");
    let (_, _, page) =
        cp.call(Some(&owner), Method::GET, "/v1/caches?name_prefix=c&limit=3", None, &[]).await;
    let names: Vec<&str> =
        page["items"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["c0", "c1", "c2"], "{page}");
    let next = format!("/v1/caches?name_prefix=c&limit=3&cursor={}", page["next_cursor"].as_str().unwrap());
    let (_, _, page) = cp.call(Some(&owner), Method::GET, &next, None, &[]).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    let (_, _, page) = cp.call(Some(&owner), Method::GET, "/v1/caches?name_prefix=d0", None, &[]).await;
    assert_eq!(page["items"][0]["name"], "d0", "{page}");
    for bad in [
        "/v1/caches?name_prefix=c%25",
        "/v1/caches?name_prefix=",
        "/v1/caches?limit=0",
        "/v1/caches?limit=5000",
        "/v1/caches?cursor=garbage",
        "/v1/audit?cursor=eyJ4Ijp9",
    ] {
        let (status, _, answer) = cp.call(Some(&owner), Method::GET, bad, None, &[]).await;
        assert_eq!(status, 400, "{bad}: {answer}");
    }

    // The same Idempotency-Key and body: one cache, the same answer twice.
    let body = json!({"name": "once"});
    let key = [("Idempotency-Key", "create-once-1")];
    let (s1, _, first) = cp.call(Some(&owner), Method::POST, "/v1/caches", Some(body.clone()), &key).await;
    let (s2, headers, second) = cp.call(Some(&owner), Method::POST, "/v1/caches", Some(body), &key).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(first, second);
    assert_eq!(headers["idempotent-replayed"], "true");
    let (s3, _, conflict) =
        cp.call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": "other"})), &key).await;
    assert_eq!((s3, conflict["field"].as_str()), (422, Some("Idempotency-Key")), "{conflict}");
    let (_, _, named) = cp.call(Some(&owner), Method::GET, "/v1/caches?name=once", None, &[]).await;
    assert_eq!(named["items"].as_array().unwrap().len(), 1);
    let (_, _, named) = cp.call(Some(&owner), Method::GET, "/v1/caches?name=other", None, &[]).await;
    assert_eq!(named["items"], json!([]));
    // A failed create does not burn its key.
    let key = [("Idempotency-Key", "retry-after-fix")];
    let (s, _, _) =
        cp.call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": "bad name"})), &key).await;
    assert_eq!(s, 400);
    let (s, _, _) =
        cp.call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": "bad name"})), &key).await;
    assert_eq!(s, 400);
    let _ = account;
}

#[actix_web::test]
async fn the_audit_log_records_changes_and_refusals_and_detects_tampering() {
    let cp = Api::start().await;
    let (who, account, cache) = setup(&cp).await;
    let request_id = "req-from-client-42";
    let (status, headers, _) = cp
        .call(
            Some(&who.owner),
            Method::PATCH,
            &format!("/v1/caches/{cache}"),
            Some(json!({"description": "x"})),
            &[("X-Request-Id", request_id)],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-request-id"], request_id);
    let (status, _, _) =
        cp.call(Some(&who.other), Method::DELETE, &format!("/v1/caches/{cache}"), None, &[]).await;
    assert_eq!(status, 404);
    let (status, _, _) = cp.call(Some("wrong-token"), Method::GET, "/v1/caches", None, &[]).await;
    assert_eq!(status, 401);

    let (_, _, log) =
        cp.call(Some(&who.admin), Method::GET, &format!("/v1/audit?cache_id={cache}"), None, &[]).await;
    let actions: Vec<&str> =
        log["items"].as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["cache.create", "cache.update"], "{log}");
    let update = &log["items"][1];
    assert_eq!(update["request_id"], request_id);
    assert_eq!(update["account_id"], account.as_str());
    assert_eq!(update["outcome"], "success");
    assert_eq!(update["source"], "127.0.0.1");
    assert_eq!(update["details"]["fields"], json!(["description"]));

    let (_, _, failures) =
        cp.call(Some(&who.admin), Method::GET, "/v1/audit?outcome=failure", None, &[]).await;
    let failures = failures["items"].as_array().unwrap();
    assert!(
        failures.iter().any(|r| r["action"] == "DELETE /v1/caches/{id}" && r["reason"] == "HTTP 404"),
        "{failures:?}"
    );
    assert!(failures.iter().any(|r| r["actor"] == "anonymous" && r["reason"] == "HTTP 401"), "{failures:?}");
    assert!(failures.iter().all(|r| !r.to_string().contains("wrong-token")), "secrets never reach the log");

    // Time range and JSON lines export.
    let (_, _, none) =
        cp.call(Some(&who.admin), Method::GET, "/v1/audit?to=2000-01-01T00:00:00Z", None, &[]).await;
    assert_eq!(none["items"], json!([]));
    let resp = cp
        .send(
            actix_web::test::TestRequest::get()
                .uri("/v1/audit?format=jsonl&action=cache.create")
                .insert_header(("Authorization", format!("Bearer {}", who.admin))),
        )
        .await;
    assert_eq!(resp.headers["content-type"], "application/jsonl");
    let text = String::from_utf8(resp.body).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!lines.is_empty() && lines.iter().all(|r| r["action"] == "cache.create"), "{text}");

    let (_, _, report) = cp.call(Some(&who.admin), Method::GET, "/v1/audit/verify", None, &[]).await;
    assert_eq!(report["ok"], true, "{report}");
    let total = report["records"].as_i64().unwrap();
    assert!(total >= 8, "{report}");

    // The database refuses edits and deletes of the log...
    let err = cp.sql_err("UPDATE audit_log SET outcome = 'success' WHERE seq = 3").await;
    assert!(err.contains("append-only"), "{err}");
    let err = cp.sql_err("DELETE FROM audit_log WHERE seq = 3").await;
    assert!(err.contains("append-only"), "{err}");
    // ...and when someone with the database drops the guard and edits a record, verify
    // points at it.
    let drop = if cp.postgres {
        "DROP TRIGGER audit_log_no_update ON audit_log"
    } else {
        "DROP TRIGGER audit_log_no_update"
    };
    cp.sql(drop).await;
    cp.sql("UPDATE audit_log SET actor = 'key:someone-else' WHERE seq = 3").await;
    let (_, _, report) = cp.call(Some(&who.admin), Method::GET, "/v1/audit/verify", None, &[]).await;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["first_broken_seq"], 3, "{report}");
}

#[actix_web::test]
async fn metrics_name_every_cache_so_only_platform_admins_read_them() {
    let cp = Api::start().await;
    cp.create_cache("listed").await;
    let (_, account_owner) = cp.account_with_key("tenant", "owner").await;
    let get = |token: Option<String>| {
        let cp = &cp;
        async move { cp.call(token.as_deref(), Method::GET, "/metrics", None, &[]).await.0 }
    };
    assert_eq!(get(None).await, 401, "anonymous");
    assert_eq!(get(Some(account_owner)).await, 403, "an account's owner");
    assert_eq!(get(Some(cp.admin_token())).await, 200, "the platform admin");
}
