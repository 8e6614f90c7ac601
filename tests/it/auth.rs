//! Data-plane tokens the gateway must refuse, each with `-WRONGPASS` and nothing opened:
//! forged algorithms, bad claims, tampering, and a token for one cache used on another.

use crate::support::{raw, ShoalDev};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use shoal_types::{CacheId, DataClaims, Permission, DATA_AUDIENCE, TOKEN_ISSUER};

/// The control plane's newest signing key (kid, PKCS#8 private key, raw public key).
fn signing_key(dev: &ShoalDev) -> (String, Vec<u8>, Vec<u8>) {
    let row = dev.sql(&format!(
        "SELECT kid, {}, {} FROM signing_keys ORDER BY created_at DESC LIMIT 1",
        dev.sql_hex("private_der"),
        dev.sql_hex("public_raw")
    ));
    let parts: Vec<&str> = row[0].split('|').collect();
    (parts[0].to_string(), hex::decode(parts[1]).unwrap(), hex::decode(parts[2]).unwrap())
}

fn claims(cache: &CacheId) -> DataClaims {
    let now = chrono_now();
    DataClaims {
        iss: TOKEN_ISSUER.into(),
        aud: DATA_AUDIENCE.into(),
        sub: "test".into(),
        iat: now,
        exp: now + 600,
        nbf: None,
        jti: "jti-test".into(),
        cache: cache.clone(),
        perm: Permission::ReadWrite,
        key_patterns: Vec::new(),
    }
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn sign(kid: &str, der: &[u8], c: &DataClaims) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, c, &EncodingKey::from_ed_der(der)).unwrap()
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

async fn auth(dev: &ShoalDev, user: Option<&str>, token: &str) -> String {
    let cmd = match user {
        Some(u) => format!("*3\r\n$4\r\nAUTH\r\n${}\r\n{u}\r\n${}\r\n{token}\r\n", u.len(), token.len()),
        None => format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{token}\r\n", token.len()),
    };
    let out = raw(dev.resp_port, format!("{cmd}*1\r\n$4\r\nPING\r\n").as_bytes()).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn forged_expired_misdirected_and_tampered_tokens_are_refused() {
    let dev = ShoalDev::start().await;
    let a = dev.create_cache("token-a").await;
    let b = dev.create_cache("token-b").await;
    let a_id = CacheId::parse(a["id"].as_str().unwrap()).unwrap();
    let b_id = b["id"].as_str().unwrap();
    let (kid, der, public) = signing_key(&dev);

    // The genuine article works, with any of the names of its own cache.
    let good = sign(&kid, &der, &claims(&a_id));
    for user in [None, Some("default"), Some(a_id.as_str()), Some("token-a")] {
        assert_eq!(auth(&dev, user, &good).await, "+OK\r\n+PONG\r\n", "user {user:?}");
    }

    let mut cases: Vec<(&str, Option<String>, String)> = Vec::new();
    let header = |alg: &str| serde_json::json!({"alg": alg, "typ": "JWT", "kid": kid});
    let payload = serde_json::to_value(claims(&a_id)).unwrap();
    cases.push(("alg none", None, format!("{}.{}.", b64(&header("none")), b64(&payload))));
    let hs = jsonwebtoken::encode(
        &Header { kid: Some(kid.clone()), ..Header::new(Algorithm::HS256) },
        &claims(&a_id),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    cases.push(("HS256 signed with the public key", None, hs));
    let mut c = claims(&a_id);
    c.exp = chrono_now() - 120;
    c.iat = chrono_now() - 1000;
    cases.push(("expired", None, sign(&kid, &der, &c)));
    let mut c = claims(&a_id);
    c.nbf = Some(chrono_now() + 600);
    cases.push(("not yet valid", None, sign(&kid, &der, &c)));
    let mut c = claims(&a_id);
    c.aud = "someone-else".into();
    cases.push(("wrong audience", None, sign(&kid, &der, &c)));
    let mut c = claims(&a_id);
    c.iss = "evil".into();
    cases.push(("wrong issuer", None, sign(&kid, &der, &c)));
    cases.push(("unknown kid", None, sign("k-unknown", &der, &claims(&a_id))));
    // Tampering: cache B's id swapped into a token signed for A.
    let parts: Vec<&str> = good.split('.').collect();
    let mut forged = payload.clone();
    forged["cache"] = serde_json::json!(b_id);
    cases.push(("tampered payload", None, format!("{}.{}.{}", parts[0], b64(&forged), parts[2])));
    // A's token presented as cache B.
    cases.push(("A's token for cache B (by id)", Some(b_id.to_string()), good.clone()));
    cases.push(("A's token for cache B (by name)", Some("token-b".to_string()), good.clone()));

    for (what, user, token) in &cases {
        let out = auth(&dev, user.as_deref(), token).await;
        assert!(
            out.starts_with("-WRONGPASS invalid username-password pair or user is disabled.\r\n-NOAUTH"),
            "{what}: {out}"
        );
    }

    // Each refusal is an audit record (batched by the gateway), without the token.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let failures = loop {
        let (_, body) =
            dev.api(reqwest::Method::GET, "/v1/audit?action=data.auth&outcome=failure&limit=500", None).await;
        let items = body["items"].as_array().unwrap().clone();
        if items.len() >= cases.len() || std::time::Instant::now() > deadline {
            break items;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(failures.len(), cases.len(), "{failures:#?}");
    assert!(failures.iter().all(|r| r["details"]["mechanism"] == "jwt" && r["source"] == "127.0.0.1"));
    assert!(
        failures.iter().any(|r| r["reason"].as_str().unwrap().contains("ExpiredSignature")),
        "{failures:#?}"
    );
    let text = serde_json::to_string(&failures).unwrap();
    assert!(!text.contains(&good[good.len() - 20..]), "a token's signature in the audit log");
}

#[tokio::test]
async fn a_revoked_token_is_refused_and_its_connections_closed_within_seconds() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("revocable").await;
    let id = cache["id"].as_str().unwrap();
    let (status, minted) = dev.api(reqwest::Method::POST, &format!("/v1/caches/{id}/tokens"), None).await;
    assert_eq!(status, 201);
    let (token, jti) = (minted["token"].as_str().unwrap(), minted["jti"].as_str().unwrap());
    let keep = dev.mint_token(id).await;

    let (status, listed) = dev.api(reqwest::Method::GET, &format!("/v1/caches/{id}/tokens"), None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
    assert!(listed["items"][0].get("token").is_none(), "tokens are shown only when minted");

    let mut open = dev.client(token).await.unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut open).await.unwrap();
    let (status, _) = dev.api(reqwest::Method::DELETE, &format!("/v1/caches/{id}/tokens/{jti}"), None).await;
    assert_eq!(status, 204);
    let (status, _) = dev.api(reqwest::Method::DELETE, &format!("/v1/caches/{id}/tokens/{jti}"), None).await;
    assert_eq!(status, 404, "revoking twice");
    let revoked_at = std::time::Instant::now();

    // Within 5 s: new logins with it are refused and the open connection is closed.
    loop {
        let refused = auth(&dev, None, token).await.starts_with("-WRONGPASS");
        let closed = redis::cmd("PING").query_async::<String>(&mut open).await.is_err();
        if refused && closed {
            break;
        }
        assert!(revoked_at.elapsed() < std::time::Duration::from_secs(5), "revocation too slow");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(auth(&dev, None, &keep).await, "+OK\r\n+PONG\r\n", "other tokens keep working");
    let (_, listed) = dev.api(reqwest::Method::GET, &format!("/v1/caches/{id}/tokens"), None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_connection_must_reauthenticate_when_its_token_expires() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dev = ShoalDev::start_with(&["--token-grace", "1"]).await;
    let cache = dev.create_cache("expiring").await;
    let id = cache["id"].as_str().unwrap();
    let path = format!("/v1/caches/{id}/tokens");
    let short = || async {
        let (_, minted) =
            dev.api(reqwest::Method::POST, &path, Some(serde_json::json!({"ttl_seconds": 2}))).await;
        minted["token"].as_str().unwrap().to_string()
    };
    let connect = |token: String| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
        s.write_all(&crate::support::auth_command(&token)).await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"+OK\r\n");
        s
    };
    let mut lapsing = connect(short().await).await;
    let mut renewed = connect(short().await).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let fresh = dev.mint_token(id).await;
    renewed.write_all(&crate::support::auth_command(&fresh)).await.unwrap();

    let mut out = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(6), lapsing.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the lapsed connection stayed open");
    assert_eq!(
        String::from_utf8_lossy(&out),
        "-ERR token expired: AUTH with a fresh token to stay connected\r\n"
    );
    renewed.write_all(b"PING\r\n").await.unwrap();
    let mut buf = vec![0u8; 12];
    renewed.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"+OK\r\n+PONG\r\n", "the re-authenticated connection lives on");
}

/// `POST /v1/caches/{id}/tokens` with `body`: (status, body).
async fn mint(dev: &ShoalDev, cache: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    dev.api(reqwest::Method::POST, &format!("/v1/caches/{cache}/tokens"), Some(body)).await
}

async fn minted(dev: &ShoalDev, cache: &str, body: serde_json::Value) -> String {
    let (status, minted) = mint(dev, cache, body).await;
    assert_eq!(status, 201, "{minted}");
    minted["token"].as_str().unwrap().to_string()
}

/// A token's claims, decoded without checking anything.
fn payload(token: &str) -> serde_json::Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

/// The error text of a command that must fail.
fn refusal<T: std::fmt::Debug>(r: redis::RedisResult<T>) -> String {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// Names of the ACL users on every node whose name contains `part`.
async fn acl_users(dev: &ShoalDev, part: &str) -> Vec<String> {
    let mut found = Vec::new();
    for i in 0..dev.node_ports.len() {
        let mut node = dev.node_admin(i).await;
        let names: Vec<String> = redis::cmd("ACL").arg("USERS").query_async(&mut node).await.unwrap();
        found.extend(names.into_iter().filter(|n| n.contains(part)));
    }
    found.sort();
    found
}

async fn get(c: &mut redis::aio::MultiplexedConnection, key: &str) -> redis::RedisResult<Option<String>> {
    redis::cmd("GET").arg(key).query_async(c).await
}

async fn set(c: &mut redis::aio::MultiplexedConnection, key: &str, value: &str) -> redis::RedisResult<()> {
    redis::cmd("SET").arg(key).arg(value).query_async(c).await
}

#[tokio::test]
async fn read_only_and_key_pattern_tokens_hold_in_scripts_and_transactions() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("scoped").await;
    let id = cache["id"].as_str().unwrap();
    let mut owner = dev.client(&dev.mint_token(id).await).await.unwrap();
    set(&mut owner, "app:x", "1").await.unwrap();
    set(&mut owner, "other", "1").await.unwrap();

    // Read-only: reads and SCAN work; writes, deletes and writing scripts get -NOPERM (also
    // logged in with RESP3's HELLO 3 AUTH).
    let (status, ro) = mint(&dev, id, serde_json::json!({"permission": "read-only"})).await;
    assert_eq!(status, 201, "{ro}");
    assert_eq!((ro["permission"].as_str(), ro.get("key_patterns")), (Some("read-only"), None), "{ro}");
    let ro = ro["token"].as_str().unwrap().to_string();
    let url = format!("redis://:{ro}@127.0.0.1:{}/?protocol=resp3", dev.resp_port);
    let resp3 = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    for mut c in [dev.client(&ro).await.unwrap(), resp3] {
        assert_eq!(get(&mut c, "other").await.unwrap().as_deref(), Some("1"));
        let (_, keys): (String, Vec<String>) =
            redis::cmd("SCAN").arg(0).arg("COUNT").arg(100).query_async(&mut c).await.unwrap();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(refusal(set(&mut c, "other", "2").await).contains("NOPERM"));
        let e = refusal(redis::cmd("DEL").arg("other").query_async::<i64>(&mut c).await);
        assert!(e.contains("NOPERM"), "{e}");
        let e = refusal(
            redis::cmd("EVAL")
                .arg("return redis.call('SET', 'other', '3')")
                .arg(0)
                .query_async::<()>(&mut c)
                .await,
        );
        assert!(e.contains("NOPERM"), "{e}");
        // Like LDAP's read-only role, no scripts at all (EVAL_RO is no @read command either).
        let e = refusal(
            redis::cmd("EVAL_RO")
                .arg("return redis.call('GET', 'app:x')")
                .arg(0)
                .query_async::<String>(&mut c)
                .await,
        );
        assert!(e.contains("NOPERM"), "{e}");
        let e = refusal(redis::cmd("PUBLISH").arg("news").arg("hi").query_async::<i64>(&mut c).await);
        assert!(e.contains("NOPERM"), "{e}");
    }
    assert_eq!(get(&mut owner, "other").await.unwrap().as_deref(), Some("1"), "nothing was written");

    // Key patterns: app:* can be read and written, other keys not — at top level, inside
    // MULTI (the transaction is refused whole) and inside EVAL.
    let scoped = minted(&dev, id, serde_json::json!({"key_patterns": ["app:*"]})).await;
    let mut c = dev.client(&scoped).await.unwrap();
    set(&mut c, "app:x", "2").await.unwrap();
    assert_eq!(get(&mut c, "app:x").await.unwrap().as_deref(), Some("2"));
    assert!(refusal(get(&mut c, "other").await).contains("NOPERM"));
    assert!(refusal(set(&mut c, "other", "2").await).contains("NOPERM"));
    // Listing every key name is refused (tests/scoped.rs has the whole-keyspace commands).
    let e = refusal(redis::cmd("SCAN").arg(0).query_async::<(String, Vec<String>)>(&mut c).await);
    assert!(e.contains("NOPERM"), "SCAN of a key-limited token: {e}");
    let (v,): (String,) =
        redis::pipe().atomic().set("app:y", "y").ignore().get("app:y").query_async(&mut c).await.unwrap();
    assert_eq!(v, "y", "a transaction on the token's keys runs");
    let e = refusal(
        redis::pipe()
            .atomic()
            .set("app:z", "z")
            .ignore()
            .set("other", "z")
            .ignore()
            .query_async::<()>(&mut c)
            .await,
    );
    assert!(e.contains("EXECABORT") || e.contains("NOPERM"), "{e}");
    assert_eq!(get(&mut owner, "app:z").await.unwrap(), None, "a refused transaction ran nothing");
    let e = refusal(
        redis::cmd("EVAL")
            .arg("return redis.call('SET', 'other', 'e')")
            .arg(0)
            .query_async::<()>(&mut c)
            .await,
    );
    assert!(e.contains("NOPERM") || e.to_lowercase().contains("permission"), "{e}");
    let _: () = redis::cmd("EVAL")
        .arg("return redis.call('SET', KEYS[1], 'e')")
        .arg(1)
        .arg("app:e")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(get(&mut owner, "app:e").await.unwrap().as_deref(), Some("e"));
    assert_eq!(get(&mut owner, "other").await.unwrap().as_deref(), Some("1"), "other was never written");

    // Both at once: read-only on app:*.
    let both =
        minted(&dev, id, serde_json::json!({"permission": "read-only", "key_patterns": ["app:*"]})).await;
    let mut c = dev.client(&both).await.unwrap();
    assert_eq!(get(&mut c, "app:x").await.unwrap().as_deref(), Some("2"));
    assert!(refusal(get(&mut c, "other").await).contains("NOPERM"));
    assert!(refusal(set(&mut c, "app:x", "3").await).contains("NOPERM"));

    // The largest token there can be (32 patterns of 100 bytes, nearly each byte doubled by
    // JSON escaping) still fits an unauthenticated AUTH.
    let widest: Vec<String> = (0..32).map(|i| format!("{i:02}{}*", "\"\\".repeat(48))).collect();
    assert!(widest.iter().all(|p| p.len() == 99), "{widest:?}");
    let big = minted(&dev, id, serde_json::json!({"key_patterns": widest})).await;
    assert!(big.len() > 8_000, "{}", big.len());
    let mut c = dev.client(&big).await.unwrap();
    assert!(refusal(get(&mut c, "app:x").await).contains("NOPERM"));

    // Re-authenticating an open connection with a narrower token narrows it at once.
    let mut switching = dev.client(&dev.mint_token(id).await).await.unwrap();
    set(&mut switching, "other", "1").await.unwrap();
    let _: () = redis::cmd("AUTH").arg(&ro).query_async(&mut switching).await.unwrap();
    assert!(refusal(set(&mut switching, "other", "2").await).contains("NOPERM"));

    // Limited tokens say so in the claims, with an audience of their own: a gateway that
    // predates permissions refuses them instead of letting them do everything.
    let said = payload(&both);
    assert_eq!(said["aud"], "shoal-data-limited", "{said}");
    assert_eq!((&said["perm"], &said["key_patterns"]), (&"read-only".into(), &serde_json::json!(["app:*"])));

    // The default token is unchanged: all keys, writes, on the cache's own ACL user.
    let full = dev.mint_token(id).await;
    let said = payload(&full);
    assert_eq!((&said["aud"], &said["perm"]), (&"shoal-data".into(), &"read-write".into()), "{said}");
    assert!(said.get("key_patterns").is_none(), "{said}");
    let mut c = dev.client(&full).await.unwrap();
    set(&mut c, "other", "4").await.unwrap();
    let _: () = redis::cmd("EVAL")
        .arg("return redis.call('SET', 'other', '5')")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(get(&mut c, "other").await.unwrap().as_deref(), Some("5"));
    // So is a token minted before permissions existed (no `perm`, no `key_patterns`).
    let (kid, der, _) = signing_key(&dev);
    let mut old = serde_json::to_value(claims(&CacheId::parse(id).unwrap())).unwrap();
    old.as_object_mut().unwrap().remove("perm");
    assert!(old.get("key_patterns").is_none(), "{old}");
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid);
    let old = jsonwebtoken::encode(&header, &old, &EncodingKey::from_ed_der(&der)).unwrap();
    let mut c = dev.client(&old).await.unwrap();
    set(&mut c, "other", "6").await.unwrap();
    let _: () = redis::cmd("DEL").arg("app:e").query_async(&mut c).await.unwrap();

    // One upstream user per permission set, however often it is minted.
    minted(&dev, id, serde_json::json!({"permission": "read-only"})).await;
    let users = acl_users(&dev, &format!("t{id}.jwt.")).await;
    assert_eq!(users.len(), 4, "{users:?}");

    // The list and the audit log show what each token may do.
    let (status, listed) = dev.api(reqwest::Method::GET, &format!("/v1/caches/{id}/tokens"), None).await;
    assert_eq!(status, 200);
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.iter().filter(|t| t["permission"] == "read-only").count(), 3, "{listed}");
    assert_eq!(
        items.iter().filter(|t| t["key_patterns"] == serde_json::json!(["app:*"])).count(),
        2,
        "{listed}"
    );
    let (_, audit) = dev
        .api(reqwest::Method::GET, &format!("/v1/audit?action=token.mint&cache_id={id}&limit=100"), None)
        .await;
    let details: Vec<&serde_json::Value> =
        audit["items"].as_array().unwrap().iter().map(|r| &r["details"]).collect();
    assert!(
        details
            .iter()
            .any(|d| d["permission"] == "read-only" && d["key_patterns"] == serde_json::json!(["app:*"])),
        "{details:#?}"
    );
    assert!(details
        .iter()
        .any(|d| d["permission"] == "read-write" && d["key_patterns"] == serde_json::json!([])));
}

#[tokio::test]
async fn bad_token_permissions_are_refused_naming_the_field_and_store_nothing() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("picky").await;
    let id = cache["id"].as_str().unwrap();
    let many: Vec<String> = (0..33).map(|i| format!("k{i}:*")).collect();
    for (body, field, says) in [
        (serde_json::json!({"permission": "admin"}), "permission", "read-write, read-only"),
        (serde_json::json!({"permission": "READ-ONLY"}), "permission", "read-write, read-only"),
        (serde_json::json!({"key_patterns": []}), "key_patterns", "at least one"),
        (serde_json::json!({"key_patterns": ["app:*", ""]}), "key_patterns", "pattern 2 is empty"),
        (serde_json::json!({"key_patterns": ["app *"]}), "key_patterns", "whitespace"),
        (serde_json::json!({"key_patterns": ["app:\n*"]}), "key_patterns", "whitespace or control"),
        (serde_json::json!({"key_patterns": ["x".repeat(101)]}), "key_patterns", "longer than 100"),
        (serde_json::json!({"key_patterns": many}), "key_patterns", "at most 32"),
        (serde_json::json!({"permission": "read-only", "ttl_seconds": 0}), "ttl_seconds", "between"),
    ] {
        let (status, problem) = mint(&dev, id, body.clone()).await;
        assert_eq!((status, problem["field"].as_str()), (400, Some(field)), "{body}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains(says), "{body}: {problem}");
    }
    assert!(dev.sql(&format!("SELECT jti FROM tokens WHERE cache_id = '{id}'")).is_empty());
    assert!(acl_users(&dev, ".jwt.").await.is_empty(), "no upstream user was made");
}

#[tokio::test]
async fn limited_tokens_survive_a_restart_and_their_users_go_with_the_cache() {
    let mut dev = ShoalDev::start().await;
    let cache = dev.create_cache("lasting").await;
    let id = cache["id"].as_str().unwrap().to_string();
    let mut owner = dev.client(&dev.mint_token(&id).await).await.unwrap();
    set(&mut owner, "app:x", "1").await.unwrap();
    drop(owner);
    let ro = minted(&dev, &id, serde_json::json!({"permission": "read-only"})).await;
    let scoped = minted(&dev, &id, serde_json::json!({"key_patterns": ["app:*"]})).await;

    // The whole platform restarts (every node with it): the tokens log in as before.
    assert!(dev.stop_with(libc::SIGTERM).success());
    dev.launch().await;
    let mut c = dev.client(&ro).await.unwrap();
    assert_eq!(get(&mut c, "app:x").await.unwrap().as_deref(), Some("1"));
    assert!(refusal(set(&mut c, "app:x", "2").await).contains("NOPERM"));
    let mut c = dev.client(&scoped).await.unwrap();
    set(&mut c, "app:x", "3").await.unwrap();
    assert!(refusal(set(&mut c, "other", "3").await).contains("NOPERM"));

    // The cache's node alone crashes and is restarted by the engine: the same again.
    let node: usize = cache["allocation"]["node"].as_str().unwrap()[1..].parse().unwrap();
    let victim = dev.node_pids()[node];
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut c = loop {
        if let Ok(mut c) = dev.client(&ro).await {
            if get(&mut c, "app:x").await.is_ok() {
                break c;
            }
        }
        assert!(std::time::Instant::now() < deadline, "the read-only token never worked again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_ne!(dev.node_pids()[node], victim);
    // (The value itself may be a second old: AOF syncs every second.)
    assert!(refusal(set(&mut c, "app:x", "4").await).contains("NOPERM"));

    // Deleting the cache deletes the tokens' upstream users too.
    assert_eq!(acl_users(&dev, &format!("t{id}.jwt.")).await.len(), 2);
    let (status, _) = dev.api(reqwest::Method::DELETE, &format!("/v1/caches/{id}"), None).await;
    assert_eq!(status, 204);
    assert_eq!(acl_users(&dev, &id).await, Vec::<String>::new(), "ACL users left behind");
}

/// How many times the nodes ran `ACL <subcommand>` (`users` and `save` walk every ACL user:
/// 130–200 ms and 0.1–3 s at 100,000).
async fn acl_calls(dev: &ShoalDev, subcommand: &str) -> u64 {
    let prefix = format!("cmdstat_acl|{subcommand}:calls=");
    let mut calls = 0;
    for i in 0..dev.node_ports.len() {
        let mut node = dev.node_admin(i).await;
        let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut node).await.unwrap();
        calls += info
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str())?.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    calls
}

async fn acl_users_calls(dev: &ShoalDev) -> u64 {
    acl_calls(dev, "users").await
}

/// Whether some node's `users.acl` names `user`.
fn saved_on_disk(dev: &ShoalDev, user: &str) -> bool {
    dev.node_dirs()
        .iter()
        .any(|d| std::fs::read_to_string(d.join("users.acl")).unwrap_or_default().contains(user))
}

/// An `ACL SAVE` rewrites the node's whole `users.acl` and holds every cache on the node
/// meanwhile (0.1–3 s at 100,000 users). Scoped tokens' and cache users' upstream users are
/// saved like caches' own, paced in the background, so a tenant minting tokens or making
/// users in a loop cannot keep the node saving.
#[tokio::test]
async fn minting_tokens_and_making_cache_users_does_not_save_the_acl_file_each_time() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("mints").await;
    let id = cache["id"].as_str().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !saved_on_disk(&dev, &format!("t{id} ")) {
        assert!(std::time::Instant::now() < deadline, "the cache's own user was never saved");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let before = acl_calls(&dev, "save").await;
    let started = std::time::Instant::now();
    let mut tokens = Vec::new();
    for i in 0..20 {
        tokens.push(minted(&dev, id, serde_json::json!({"key_patterns": [format!("k{i}:*")]})).await);
    }
    for name in ["u1", "u2", "u3", "u4", "u5"] {
        let user = serde_json::json!({"username": name, "passwords": ["a-long-enough-password"],
                                      "access_string": "on ~* +@all"});
        let (status, body) =
            dev.api(reqwest::Method::POST, &format!("/v1/caches/{id}/users"), Some(user)).await;
        assert_eq!(status, 201, "{body}");
    }
    let saves = acl_calls(&dev, "save").await - before;
    let paced = 1 + started.elapsed().as_secs();
    assert!(saves <= paced, "{saves} ACL SAVEs for 25 users made in {:?}", started.elapsed());

    // Saved all the same, soon after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while acl_users(&dev, &format!("t{id}.jwt.")).await.iter().any(|u| !saved_on_disk(&dev, &format!("{u} ")))
        || !saved_on_disk(&dev, &format!("t{id}.user.u5 "))
    {
        assert!(std::time::Instant::now() < deadline, "the new users were not saved");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut c = dev.client(&tokens[19]).await.unwrap();
    let _: () = redis::cmd("SET").arg("k19:x").arg("1").query_async(&mut c).await.unwrap();
}

/// The sweep of scoped tokens' upstream users lists the nodes' users only when there may be
/// some to sweep, not at every tick: each listing holds the node for a walk of every user.
#[tokio::test]
async fn the_token_sweep_lists_the_nodes_users_only_when_scoped_tokens_were_minted() {
    let dev = ShoalDev::start_with(&["--acl-sweep-interval", "0.2"]).await;
    let cache = dev.create_cache("swept").await;
    let id = cache["id"].as_str().unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let before = acl_users_calls(&dev).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(acl_users_calls(&dev).await, before, "15 idle sweeps listed nothing");

    let (status, token) = mint(&dev, id, serde_json::json!({"permission": "read-only"})).await;
    assert_eq!(status, 201, "{token}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while acl_users_calls(&dev).await == before {
        assert!(std::time::Instant::now() < deadline, "the mint made the sweep list the nodes");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Revoked, its user goes at the next sweeps, as before (on PostgreSQL once found unused
    // for 5 s: `token_users::UNUSED_FOR`).
    let jti = token["jti"].as_str().unwrap();
    let (status, _) = dev.api(reqwest::Method::DELETE, &format!("/v1/caches/{id}/tokens/{jti}"), None).await;
    assert_eq!(status, 204);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !acl_users(&dev, &format!("t{id}.jwt.")).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the revoked token's user was not swept");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
