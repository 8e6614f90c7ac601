//! Cache users against the real binary: REST CRUD, `AUTH <user>@<cache> <password>` with
//! real clients, access strings enforced by Valkey (also inside EVAL), password rotation,
//! the no-password `default` user, throttling to a lockout, the audit trail of every login,
//! and signing-key rotation.

use crate::support::{auth, auth_from, ShoalDev};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const P1: &str = "first-password-0001";
const P2: &str = "second-password-002";

/// A redis-rs connection logged in as `user` (RESP2 `AUTH user pass`, or RESP3 `HELLO 3 AUTH`).
async fn login(
    dev: &ShoalDev,
    user: &str,
    password: &str,
    resp3: bool,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let proto = if resp3 { "?protocol=resp3" } else { "" };
    let url = format!("redis://{}:{password}@127.0.0.1:{}/{proto}", user.replace('@', "%40"), dev.resp_port);
    redis::Client::open(url)?.get_multiplexed_async_connection().await
}

async fn create_user(dev: &ShoalDev, cache: &str, body: Value) -> (u16, Value) {
    dev.api(Method::POST, &format!("/v1/caches/{cache}/users"), Some(body)).await
}

async fn audit(dev: &ShoalDev, query: &str) -> Vec<Value> {
    let (status, body) = dev.api(Method::GET, &format!("/v1/audit?limit=500&{query}"), None).await;
    assert_eq!(status, 200, "{body}");
    body["items"].as_array().unwrap().clone()
}

/// Waits (up to 5 s) for the gateway's batched login events to reach the audit log.
async fn audited(dev: &ShoalDev, query: &str, wanted: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let items = audit(dev, query).await;
        if wanted(&items) {
            return items;
        }
        assert!(Instant::now() < deadline, "audit records for {query:?} never appeared: {items:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn err(r: redis::RedisResult<impl std::fmt::Debug>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn cache_users_log_in_and_their_access_string_holds_even_in_scripts() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("users").await;
    let id = cache["id"].as_str().unwrap();
    let alice = format!("alice@{id}");

    // Bad input changes nothing and says which rule or field is wrong.
    let (status, body) = create_user(
        &dev,
        id,
        json!({"username": "alice", "passwords": [P1], "access_string": "on ~app:* +frobnicate"}),
    )
    .await;
    assert_eq!((status, body["field"].as_str()), (400, Some("access_string")), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("rule 3 `+frobnicate`"), "{body}");
    for (bad, field) in [
        (json!({"username": "alice", "passwords": ["short"], "access_string": "on ~* +@all"}), "passwords"),
        (json!({"username": "alice", "access_string": "on ~* +@all"}), "passwords"),
        (json!({"username": "al@ce", "passwords": [P1], "access_string": "on ~* +@all"}), "username"),
        (json!({"username": "alice", "passwords": [P1], "access_string": "on ~* nopass"}), "access_string"),
        (
            json!({"username": "alice", "passwords": [P1], "access_string": "on", "no_password_required": true}),
            "no_password_required",
        ),
    ] {
        let (status, body) = create_user(&dev, id, bad.clone()).await;
        assert_eq!((status, body["field"].as_str()), (400, Some(field)), "{bad}: {body}");
    }
    let (status, body) = dev.api(Method::GET, &format!("/v1/caches/{id}/users"), None).await;
    assert_eq!((status, body["items"].as_array().unwrap().len()), (200, 0), "{body}");

    let (status, created) = create_user(
        &dev,
        id,
        json!({"username": "alice", "passwords": [P1], "access_string": "on ~app:* +get +set +eval +del +ping"}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["login"], format!("AUTH alice@{id} <password>"));
    assert_eq!(created["password_count"], 1);
    let text = created.to_string();
    assert!(!text.contains(P1) && !text.contains("argon2"), "no password or hash in {text}");
    let (status, _) = create_user(
        &dev,
        id,
        json!({"username": "alice", "passwords": [P2], "access_string": "on ~* +@all"}),
    )
    .await;
    assert_eq!(status, 409, "the same name twice");

    // Logging in: wrong password, right password (RESP2 and RESP3), unknown user.
    assert!(auth(&dev, &alice, P2).await.starts_with("-WRONGPASS"), "wrong password");
    assert!(auth(&dev, &format!("mallory@{id}"), P1).await.starts_with("-WRONGPASS"), "unknown user");
    assert_eq!(auth(&dev, &alice, P1).await, "+OK\r\n+PONG\r\n");
    let mut c = login(&dev, &alice, P1, false).await.unwrap();
    let mut c3 = login(&dev, &alice, P1, true).await.unwrap();

    // The access string: keys app:*, commands GET SET EVAL DEL — enforced by Valkey itself.
    let _: () = redis::cmd("SET").arg("app:1").arg("v").query_async(&mut c).await.unwrap();
    let v: String = redis::cmd("GET").arg("app:1").query_async(&mut c3).await.unwrap();
    assert_eq!(v, "v");
    let e = err(redis::cmd("SET").arg("other").arg("v").query_async::<()>(&mut c).await);
    assert!(e.contains("NOPERM"), "{e}");
    let e = err(redis::cmd("HSET").arg("app:h").arg("f").arg("v").query_async::<()>(&mut c).await);
    assert!(e.contains("NOPERM"), "{e}");
    let inside: String = redis::cmd("EVAL")
        .arg("return redis.call('get', KEYS[1])")
        .arg(1)
        .arg("app:1")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(inside, "v");
    for script in ["return redis.call('set', 'other', 'x')", "return redis.call('hset', 'app:h', 'f', 'v')"] {
        let e = err(redis::cmd("EVAL").arg(script).arg(0).query_async::<()>(&mut c).await);
        assert!(e.to_lowercase().contains("permission") || e.contains("NOPERM"), "{script}: {e}");
    }
    // The views the gateway answers itself follow the access string too.
    for (cmd, args) in [("CLIENT", vec!["LIST"]), ("INFO", vec![]), ("CLIENT", vec!["KILL", "ID", "1"])] {
        let e = err(redis::cmd(cmd).arg(&args).query_async::<redis::Value>(&mut c).await);
        assert!(e.contains("NOPERM"), "{cmd} {args:?}: {e}");
    }
    let admin_sees: Option<String> = {
        let token = dev.mint_token(id).await;
        let mut owner = dev.client(&token).await.unwrap();
        redis::cmd("GET").arg("other").query_async(&mut owner).await.unwrap()
    };
    assert_eq!(admin_sees, None, "the refused script wrote nothing");

    // Rotation: both passwords work, then only the new one; open connections stay.
    let path = format!("/v1/caches/{id}/users/alice");
    let (status, patched) = dev.api(Method::PATCH, &path, Some(json!({"passwords": [P1, P2]}))).await;
    assert_eq!((status, patched["password_count"].as_u64()), (200, Some(2)), "{patched}");
    assert_eq!(auth(&dev, &alice, P1).await, "+OK\r\n+PONG\r\n");
    assert_eq!(auth(&dev, &alice, P2).await, "+OK\r\n+PONG\r\n");
    let (status, _) = dev.api(Method::PATCH, &path, Some(json!({"passwords": [P2]}))).await;
    assert_eq!(status, 200);
    assert!(auth(&dev, &alice, P1).await.starts_with("-WRONGPASS"), "the old password is gone");
    assert_eq!(auth(&dev, &alice, P2).await, "+OK\r\n+PONG\r\n");
    let v: String = redis::cmd("GET").arg("app:1").query_async(&mut c).await.unwrap();
    assert_eq!(v, "v", "an open connection survives a password change");

    // A new access string applies at once to open connections (same upstream ACL user).
    let (status, body) =
        dev.api(Method::PATCH, &path, Some(json!({"access_string": "on ~app:* +get +ping"}))).await;
    assert_eq!(status, 200, "{body}");
    let e = err(redis::cmd("SET").arg("app:1").arg("w").query_async::<()>(&mut c).await);
    assert!(e.contains("NOPERM"), "{e}");
    let (status, body) = dev.api(Method::PATCH, &path, Some(json!({"access_string": "on ~* +bogus"}))).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("access_string")), "{body}");
    let (_, got) = dev.api(Method::GET, &path, None).await;
    assert_eq!(got["access_string"], "on ~app:* +get +ping", "a refused change changed nothing");

    // Deleting the user closes its connections and refuses new logins.
    let (status, _) = dev.api(Method::DELETE, &path, None).await;
    assert_eq!(status, 204);
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis::cmd("GET").arg("app:1").query_async::<Option<String>>(&mut c3).await.is_ok() {
        assert!(Instant::now() < deadline, "the deleted user's connection stayed usable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(auth(&dev, &alice, P2).await.starts_with("-WRONGPASS"));
    let (status, _) = dev.api(Method::GET, &path, None).await;
    assert_eq!(status, 404);

    // Changes and logins are audited; no secret ever reaches the log.
    let changes = audit(&dev, &format!("cache_id={id}")).await;
    for action in ["cache_user.create", "cache_user.update", "cache_user.delete"] {
        assert!(changes.iter().any(|r| r["action"] == action && r["outcome"] == "success"), "{action}");
    }
    let logins = audited(&dev, &format!("action=data.auth&cache_id={id}"), |items| {
        items.iter().any(|r| r["outcome"] == "success" && r["details"]["mechanism"] == "cache-user")
            && items.iter().any(|r| r["outcome"] == "failure" && r["reason"] == "wrong_password")
    })
    .await;
    let all = serde_json::to_string(&audit(&dev, "").await).unwrap();
    for secret in [P1, P2] {
        assert!(!all.contains(secret), "a password in the audit log");
    }
    let ok = logins.iter().find(|r| r["outcome"] == "success").unwrap();
    assert_eq!(ok["actor"], "cache-user:alice");
    assert_eq!(ok["source"], "127.0.0.1");
    assert_eq!(ok["account_id"], cache["account_id"]);
}

#[tokio::test]
async fn owners_manage_their_caches_users_and_nobody_else_does() {
    let dev = ShoalDev::start().await;
    let (_, owner) = dev.account_with_key("u-owner", "owner").await;
    let (_, other) = dev.account_with_key("u-other", "owner").await;
    let (status, _, cache) =
        dev.call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": "mine"})), &[]).await;
    assert_eq!(status, 201, "{cache}");
    let id = cache["id"].as_str().unwrap();
    let users = format!("/v1/caches/{id}/users");
    let body = json!({"username": "app", "passwords": [P1], "access_string": "on ~* +@all"});
    let (status, _, _) = dev.call(Some(&other), Method::POST, &users, Some(body.clone()), &[]).await;
    assert_eq!(status, 404, "another account's cache does not exist for them");
    let (status, _, _) = dev.call(Some(&owner), Method::POST, &users, Some(body), &[]).await;
    assert_eq!(status, 201);
    let (status, _, _) = dev.call(Some(&other), Method::GET, &format!("{users}/app"), None, &[]).await;
    assert_eq!(status, 404);
    let (status, _, _) = dev.call(Some(&other), Method::DELETE, &format!("{users}/app"), None, &[]).await;
    assert_eq!(status, 404);
    let (status, _, list) = dev.call(Some(&owner), Method::GET, &users, None, &[]).await;
    assert_eq!((status, list["items"].as_array().unwrap().len()), (200, 1));
    assert_eq!(auth(&dev, &format!("app@{id}"), P1).await, "+OK\r\n+PONG\r\n");

    // Deleting the cache deletes its users, upstream too.
    let (status, _, _) = dev.call(Some(&owner), Method::DELETE, &format!("/v1/caches/{id}"), None, &[]).await;
    assert_eq!(status, 204);
    assert!(auth(&dev, &format!("app@{id}"), P1).await.starts_with("-WRONGPASS"));
    let mut found = Vec::new();
    for i in 0..dev.node_ports.len() {
        let mut node = dev.node_admin(i).await;
        let names: Vec<String> = redis::cmd("ACL").arg("USERS").query_async(&mut node).await.unwrap();
        found.extend(names.into_iter().filter(|n| n.contains(id)));
    }
    assert!(found.is_empty(), "ACL users left behind: {found:?}");
    assert!(dev.sql(&format!("SELECT username FROM cache_users WHERE cache_id = '{id}'")).is_empty());
}

#[tokio::test]
async fn the_default_user_without_password_is_off_until_switched_on() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("trusted").await;
    let id = cache["id"].as_str().unwrap();
    let default = format!("default@{id}");
    assert!(auth(&dev, &default, "anything").await.starts_with("-WRONGPASS"), "off by default");

    let (status, body) = create_user(
        &dev,
        id,
        json!({"username": "default", "no_password_required": true, "access_string": "on ~* +@read +@connection"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["no_password_required"], true);
    assert_eq!(auth(&dev, &default, "anything").await, "+OK\r\n+PONG\r\n");
    let mut c = login(&dev, &default, "whatever", true).await.unwrap();
    let v: Option<String> = redis::cmd("GET").arg("k").query_async(&mut c).await.unwrap();
    assert_eq!(v, None);
    let e = err(redis::cmd("SET").arg("k").arg("v").query_async::<()>(&mut c).await);
    assert!(e.contains("NOPERM"), "{e}");

    // Switched off again: it needs a password now.
    let path = format!("/v1/caches/{id}/users/default");
    let (status, body) = dev.api(Method::PATCH, &path, Some(json!({"no_password_required": false}))).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("passwords")), "{body}");
    let (status, _) =
        dev.api(Method::PATCH, &path, Some(json!({"no_password_required": false, "passwords": [P1]}))).await;
    assert_eq!(status, 200);
    assert!(auth(&dev, &default, "anything").await.starts_with("-WRONGPASS"));
    assert_eq!(auth(&dev, &default, P1).await, "+OK\r\n+PONG\r\n");
    // Tokens keep working beside users.
    let token = dev.mint_token(id).await;
    assert_eq!(auth(&dev, "default", &token).await, "+OK\r\n+PONG\r\n");
}

#[tokio::test]
async fn failed_logins_are_throttled_to_a_lockout_and_audited() {
    let policy = "{ per_user = { free_failures = 1, base_delay_ms = 20, max_delay_ms = 40, lockout_after = 3, \
                  lockout_ms = 60000 }, per_source = { free_failures = 50, base_delay_ms = 1, max_delay_ms = 1, \
                  lockout_after = 200, lockout_ms = 60000 } }";
    let dev = ShoalDev::start_with(&["--auth-throttle", policy]).await;
    let cache = dev.create_cache("guarded").await;
    let id = cache["id"].as_str().unwrap();
    for name in ["victim", "bystander"] {
        let (status, _) = create_user(
            &dev,
            id,
            json!({"username": name, "passwords": [P1], "access_string": "on ~* +@all"}),
        )
        .await;
        assert_eq!(status, 201);
    }
    let victim = format!("victim@{id}");
    for _ in 0..3 {
        assert!(auth(&dev, &victim, "wrong-password-guess").await.starts_with("-WRONGPASS invalid"));
    }
    // Locked: even the right password is refused, with a clear reason.
    let locked = auth(&dev, &victim, P1).await;
    assert!(locked.starts_with("-WRONGPASS too many failed attempts"), "{locked}");
    // Other users and tokens are not affected.
    assert_eq!(auth(&dev, &format!("bystander@{id}"), P1).await, "+OK\r\n+PONG\r\n");
    let token = dev.mint_token(id).await;
    assert_eq!(auth(&dev, "default", &token).await, "+OK\r\n+PONG\r\n");

    let records = audited(&dev, &format!("action=data.auth&cache_id={id}"), |items| {
        items.iter().filter(|r| r["outcome"] == "lockout").count() >= 2
            && items.iter().any(|r| r["outcome"] == "success" && r["details"]["mechanism"] == "jwt")
    })
    .await;
    let lockouts: Vec<&Value> = records.iter().filter(|r| r["outcome"] == "lockout").collect();
    assert!(lockouts.iter().all(|r| r["actor"] == "cache-user:victim"), "{lockouts:#?}");
    assert!(records.iter().any(|r| r["outcome"] == "success" && r["actor"] == "cache-user:bystander"));
    // And counted in the metrics.
    let metrics = dev.metrics().await;
    let count = |mechanism: &str, outcome: &str| -> u64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("shoal_gateway_auth_attempts_total{")
                    && l.contains(&format!("mechanism=\"{mechanism}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("cache-user", "lockout"), 2, "{metrics}");
    assert_eq!(count("cache-user", "failure"), 2, "{metrics}");
    assert!(count("jwt", "success") >= 1 && count("cache-user", "success") >= 1, "{metrics}");
}

#[tokio::test]
async fn an_attacker_elsewhere_cannot_lock_the_user_out_of_their_own_address() {
    let policy = "{ per_user = { free_failures = 1, base_delay_ms = 20, max_delay_ms = 40, lockout_after = 3, \
                  lockout_ms = 60000 }, per_source = { free_failures = 50, base_delay_ms = 1, max_delay_ms = 1, \
                  lockout_after = 200, lockout_ms = 60000 } }";
    let dev = ShoalDev::start_with(&["--auth-throttle", policy]).await;
    let cache = dev.create_cache("contested").await;
    let id = cache["id"].as_str().unwrap();
    let (status, _) =
        create_user(&dev, id, json!({"username": "app", "passwords": [P1], "access_string": "on ~* +@all"}))
            .await;
    assert_eq!(status, 201);
    let app = format!("app@{id}");
    let attacker = std::net::IpAddr::from([127, 0, 0, 2]);
    for _ in 0..5 {
        let out = auth_from(&dev, attacker, &app, "wrong-password-guess").await;
        assert!(out.starts_with("-WRONGPASS"), "{out}");
    }
    // The attacker's address is locked out, even with the right password ...
    let out = auth_from(&dev, attacker, &app, P1).await;
    assert!(out.starts_with("-WRONGPASS too many failed attempts"), "{out}");
    // ... but the real user, from their own address, still logs in.
    assert_eq!(auth(&dev, &app, P1).await, "+OK\r\n+PONG\r\n");
}

#[tokio::test]
async fn rotated_signing_keys_keep_verifying_older_tokens() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("rotating").await;
    let id = cache["id"].as_str().unwrap();
    let (_, owner) = dev.account_with_key("rot-owner", "owner").await;
    let old = dev.mint_token(id).await;
    let kid_of = |t: &str| jsonwebtoken::decode_header(t).unwrap().kid.unwrap();

    let (status, _, _) = dev.call(Some(&owner), Method::POST, "/v1/signing-keys/rotate", None, &[]).await;
    assert_eq!(status, 403, "only the platform admin rotates keys");
    let (status, rotated) = dev.api(Method::POST, "/v1/signing-keys/rotate", None).await;
    assert_eq!(status, 200, "{rotated}");
    let new_kid = rotated["kid"].as_str().unwrap();
    assert_ne!(new_kid, kid_of(&old));
    let verifying: Vec<&str> =
        rotated["verifying"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert!(verifying.contains(&new_kid) && verifying.contains(&kid_of(&old).as_str()), "{verifying:?}");

    let new = dev.mint_token(id).await;
    assert_eq!(kid_of(&new), new_kid, "the new key signs");
    let (_, jwks) = dev.api(Method::GET, "/.well-known/jwks.json", None).await;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2, "{jwks}");
    // The gateway learns the new key on first sight of its kid (waiting out its reload
    // interval if it just reloaded); the old one still verifies.
    for token in [&new, &old] {
        let mut c = dev.client(token).await.unwrap();
        let pong: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
        assert_eq!(pong, "PONG");
    }
    let records = audit(&dev, "action=signing_key.rotate").await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["target"], new_kid);
}
