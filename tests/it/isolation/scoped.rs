//! Scoped credentials stay in scope (issue 16, "Least privilege"): a token or cache user
//! limited to some keys runs no command that reaches every key (FLUSHDB/FLUSHALL, KEYS,
//! SCAN, RANDOMKEY, DBSIZE — also not inside a script), read-only logins cannot see or kill
//! the cache's other connections, and every cell of the README's permissions table
//! (`shoal_auth::grants`) holds against the real gateway and Valkey.

use crate::support::{auth_command, raw, shared, ShoalDev};
use redis::Value;
use shoal_auth::grants::{self, Kind};

async fn mint(dev: &ShoalDev, id: &str, body: serde_json::Value) -> String {
    let (status, v) = dev.api(reqwest::Method::POST, &format!("/v1/caches/{id}/tokens"), Some(body)).await;
    assert_eq!(status, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

async fn seed(owner: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::pipe()
        .set("app:1", "a")
        .ignore()
        .set("billing:1", "b")
        .ignore()
        .query_async(owner)
        .await
        .unwrap();
}

async fn exists(owner: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query_async::<i64>(owner).await.unwrap() == 1
}

/// The reply to `argv`, as text ("ERR…"/"NOPERM…" for errors).
async fn run(c: &mut redis::aio::MultiplexedConnection, argv: &[&str]) -> Result<String, String> {
    let mut cmd = redis::cmd(argv[0]);
    for a in &argv[1..] {
        cmd.arg(*a);
    }
    match cmd.query_async::<Value>(c).await {
        Ok(v) => Ok(format!("{v:?}")),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn key_limited_tokens_cannot_empty_or_list_the_whole_cache() {
    let dev = shared().await;
    let cache = dev.create_cache("scoped-keys").await;
    let id = cache["id"].as_str().unwrap();
    let mut owner = dev.client(&dev.mint_token(id).await).await.unwrap();
    seed(&mut owner).await;
    let app = mint(&dev, id, serde_json::json!({"key_patterns": ["app:*"]})).await;
    let mut c = dev.client(&app).await.unwrap();

    assert!(run(&mut c, &["GET", "billing:1"]).await.unwrap_err().contains("NOPERM"));
    for argv in [
        &["FLUSHALL"][..],
        &["FLUSHALL", "ASYNC"],
        &["FLUSHDB"],
        &["SWAPDB", "0", "0"],
        &["RANDOMKEY"],
        &["KEYS", "*"],
        &["SCAN", "0"],
        &["DBSIZE"],
        &["EVAL", "return redis.call('flushdb')", "0"],
        &["EVAL", "return redis.call('keys', '*')", "0"],
        &["EVAL", "return redis.call('scan', '0')", "0"],
    ] {
        let e = run(&mut c, argv).await.expect_err(&format!("{argv:?} must be refused"));
        assert!(e.contains("NOPERM") || e.to_lowercase().contains("permission"), "{argv:?}: {e}");
    }
    assert!(exists(&mut owner, "billing:1").await, "billing:1 survived");
    // Inside MULTI: the transaction is refused, nothing flushed.
    let e = redis::pipe().atomic().cmd("FLUSHDB").query_async::<()>(&mut c).await.unwrap_err().to_string();
    assert!(e.contains("NOPERM") || e.contains("EXECABORT"), "{e}");
    assert!(exists(&mut owner, "billing:1").await);
    // MOVE and COPY within the patterns still work; outside them not.
    // (`app:{app:1}` is in app:1's slot, as COPY on a cluster pool needs.)
    assert_eq!(run(&mut c, &["COPY", "app:1", "app:{app:1}", "DB", "0"]).await.unwrap(), "int(1)");
    assert!(run(&mut c, &["COPY", "billing:1", "app:3", "DB", "0"]).await.unwrap_err().contains("NOPERM"));
    assert!(run(&mut c, &["MOVE", "billing:1", "0"]).await.unwrap_err().contains("NOPERM"));
    // INFO answers, without key counts.
    let info = run(&mut c, &["INFO", "keyspace"]).await.unwrap();
    assert!(!info.contains("keys="), "{info}");
    assert!(run(&mut owner, &["INFO", "keyspace"]).await.unwrap().contains("db0:keys="));
    // The owner (all keys) may still empty the cache.
    assert_eq!(run(&mut owner, &["FLUSHALL"]).await.unwrap(), "ok");
    assert!(!exists(&mut owner, "billing:1").await);
}

#[tokio::test]
async fn read_only_tokens_cannot_list_or_kill_other_connections() {
    let dev = shared().await;
    let cache = dev.create_cache("scoped-clients").await;
    let id = cache["id"].as_str().unwrap();
    let mut owner = dev.client(&dev.mint_token(id).await).await.unwrap();
    let ro = mint(&dev, id, serde_json::json!({"permission": "read-only"})).await;
    let mut c = dev.client(&ro).await.unwrap();
    for argv in [
        &["CLIENT", "KILL", "TYPE", "normal"][..],
        &["CLIENT", "KILL", "SKIPME", "yes"],
        &["CLIENT", "LIST"],
        &["CLIENT", "NO-EVICT", "on"],
        &["CLIENT", "PAUSE", "100"],
        &["CLIENT", "UNPAUSE"],
    ] {
        let e = run(&mut c, argv).await.expect_err(&format!("{argv:?} must be refused"));
        assert!(e.contains("NOPERM"), "{argv:?}: {e}");
    }
    // The owner's connection is alive.
    assert!(run(&mut owner, &["PING"]).await.unwrap().contains("PONG"));
    let out = raw(dev.resp_port, &[auth_command(&ro), b"*1\r\n$4\r\nPING\r\n".to_vec()].concat()).await;
    assert!(String::from_utf8_lossy(&out).contains("PONG"));
    // Its own connection: ID, INFO, SETNAME, GETNAME.
    assert!(run(&mut c, &["CLIENT", "ID"]).await.unwrap().starts_with("int("));
    assert!(run(&mut c, &["CLIENT", "SETNAME", "reader"]).await.is_ok());
    let info = run(&mut c, &["CLIENT", "INFO"]).await.unwrap();
    assert!(info.contains("name=reader"), "{info}");
    assert!(run(&mut c, &["CLIENT", "GETNAME"]).await.unwrap().contains("reader"));
    // The read-write owner may still list and kill.
    assert!(run(&mut owner, &["CLIENT", "LIST"]).await.unwrap().contains("name=reader"));
    assert!(run(&mut owner, &["CLIENT", "KILL", "TYPE", "normal"]).await.is_ok());
    let e = run(&mut c, &["PING"]).await;
    assert!(e.is_err() || run(&mut c, &["CLIENT", "GETNAME"]).await.is_ok_and(|n| !n.contains("reader")));
}

/// Every cell of the README's table, with a real credential of each kind.
#[tokio::test]
async fn every_cell_of_the_permissions_table_holds() {
    let dev = shared().await;
    let cache = dev.create_cache("scoped-table").await;
    let id = cache["id"].as_str().unwrap().to_string();
    let mut owner = dev.client(&dev.mint_token(&id).await).await.unwrap();
    // The cache's own ACL rules, as the engine made them (read from the node).
    let tenant_rules: Vec<String> = {
        let mut admin = dev.admins_of(&cache).await.remove(0);
        let user = format!("t{id}");
        let text: Vec<String> = redis::cmd("ACL").arg("LIST").query_async(&mut admin).await.unwrap();
        let line =
            text.iter().find(|l| l.starts_with(&format!("user {user} "))).expect("the cache's ACL user");
        line.split(' ').skip(2).map(str::to_string).collect()
    };
    let mut failures = Vec::new();
    for (i, cred) in grants::credentials().into_iter().enumerate() {
        let access = shoal_auth::AccessString::parse(&cred.access).unwrap();
        let url = match &cred.kind {
            Kind::Token { perm, key_patterns } => {
                let mut body = serde_json::json!({"permission": perm.as_str()});
                if !key_patterns.is_empty() {
                    body["key_patterns"] = serde_json::json!(key_patterns);
                }
                let token = mint(&dev, &id, body).await;
                (format!("redis://:{token}@127.0.0.1:{}/", dev.resp_port), "default".to_string(), token)
            }
            Kind::CacheUser => {
                let name = format!("user{i}");
                let password = "correct-horse-battery-1";
                let body = serde_json::json!({"username": name, "passwords": [password], "access_string": cred.access});
                let (status, v) =
                    dev.api(reqwest::Method::POST, &format!("/v1/caches/{id}/users"), Some(body)).await;
                assert_eq!(status, 201, "{v}");
                let url = format!("redis://{name}%40{id}:{password}@127.0.0.1:{}/", dev.resp_port);
                (url, format!("{name}@{id}"), password.to_string())
            }
        };
        let (url, user, password) = url;
        let client = redis::Client::open(url).unwrap();
        for probe in grants::probes() {
            let _: () = redis::cmd("DEL").arg("app:2").query_async(&mut owner).await.unwrap();
            seed(&mut owner).await;
            let expected = grants::granted(&access, &tenant_rules, &probe);
            // A fresh connection for each (MULTI, SUBSCRIBE and CLIENT change it).
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let got = if probe.argv[0] == "SUBSCRIBE" {
                // Raw RESP: a subscribing client's library may not surface the refusal.
                let login = format!(
                    "*3\r\n$4\r\nAUTH\r\n${}\r\n{user}\r\n${}\r\n{password}\r\n",
                    user.len(),
                    password.len()
                );
                let out =
                    raw(dev.resp_port, format!("{login}*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nnews\r\n").as_bytes())
                        .await;
                let out = String::from_utf8_lossy(&out).into_owned();
                assert!(out.starts_with("+OK"), "{out}");
                if out.contains("\r\n*3\r\n$9\r\nsubscribe\r\n") {
                    Ok(())
                } else {
                    Err(out)
                }
            } else {
                run(&mut c, probe.argv).await.map(|_| ())
            };
            let reply = got.clone();
            let mut actual = match got {
                Ok(()) => true,
                Err(e) => !(e.contains("NOPERM") || e.to_lowercase().contains("permission")),
            };
            if probe.argv == ["INFO", "keyspace"] {
                actual = run(&mut c, probe.argv).await.is_ok_and(|r| r.contains("keys="));
            }
            if actual != expected {
                failures.push(format!(
                    "{} ({}) `{}`: table says {expected}, got {reply:?}",
                    cred.column,
                    cred.access,
                    probe.argv.join(" ")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} cells differ:\n{}", failures.len(), failures.join("\n"));
}

/// The ACL users of a cache's scoped tokens, on whichever nodes hold it (every node of a
/// cluster has them all: counted once).
async fn token_acl_users(dev: &ShoalDev, id: &str) -> Vec<String> {
    let prefix = format!("{}.jwt.", shoal_types::CacheId::parse(id).unwrap().acl_user());
    let mut found = Vec::new();
    for mut admin in dev.node_admins().await {
        let users: Vec<String> = redis::cmd("ACL").arg("USERS").query_async(&mut admin).await.unwrap();
        found.extend(users.into_iter().filter(|u| u.starts_with(&prefix)));
    }
    found.sort();
    found.dedup();
    found
}

#[tokio::test]
async fn a_cache_has_a_bounded_number_of_token_acl_users() {
    let dev = shared().await;
    let id = dev.create_cache("bounded").await["id"].as_str().unwrap().to_string();
    for i in 0..100 {
        mint(&dev, &id, serde_json::json!({"key_patterns": [format!("p{i}:*")]})).await;
    }
    let before = token_acl_users(&dev, &id).await;
    assert_eq!(before.len(), 100);
    // One more distinct set is refused, clearly, and changes nothing.
    let (status, body) = dev
        .api(
            reqwest::Method::POST,
            &format!("/v1/caches/{id}/tokens"),
            Some(serde_json::json!({"key_patterns": ["one-too-many:*"]})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("100 distinct token scopes"), "{body}");
    assert_eq!(token_acl_users(&dev, &id).await, before);
    // A set already in use still mints (it reuses its user), and rewrites no ACL file.
    // Every node's ACL file, a cluster's too.
    let acl_files = || -> Vec<std::time::SystemTime> {
        let mut files = Vec::new();
        for pool in ["valkey", "valkey-cluster"] {
            for node in std::fs::read_dir(dev.dir.join(".shoal").join(pool)).into_iter().flatten().flatten() {
                if let Ok(meta) = std::fs::metadata(node.path().join("users.acl")) {
                    files.push(meta.modified().unwrap());
                }
            }
        }
        files
    };
    // Other tests on the shared platform save ACL files too (a cluster's on every node), so
    // one quiet mint out of five proves it; a mint that always saves fails all five.
    let mut quiet = false;
    for _ in 0..5 {
        let saved = acl_files();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        mint(&dev, &id, serde_json::json!({"key_patterns": ["p7:*"]})).await;
        assert_eq!(token_acl_users(&dev, &id).await, before);
        if acl_files() == saved {
            quiet = true;
            break;
        }
    }
    assert!(quiet, "an unchanged ACL user is not saved again");
}

#[tokio::test]
async fn token_acl_users_go_when_no_live_token_uses_them() {
    let dev = ShoalDev::start_with(&["--acl-sweep-interval", "0.3"]).await;
    let id = dev.create_cache("swept").await["id"].as_str().unwrap().to_string();
    mint(&dev, &id, serde_json::json!({"key_patterns": ["short:*"], "ttl_seconds": 1})).await;
    let long = mint(&dev, &id, serde_json::json!({"key_patterns": ["long:*"], "ttl_seconds": 600})).await;
    let (status, revoked) = dev
        .api(
            reqwest::Method::POST,
            &format!("/v1/caches/{id}/tokens"),
            Some(serde_json::json!({"key_patterns": ["gone:*"], "ttl_seconds": 600})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(token_acl_users(&dev, &id).await.len(), 3);
    let jti = revoked["jti"].as_str().unwrap();
    let (status, body) =
        dev.api(reqwest::Method::DELETE, &format!("/v1/caches/{id}/tokens/{jti}"), None).await;
    assert!(status < 300, "{status} {body}");
    let cache_user = shoal_types::CacheId::parse(&id).unwrap().acl_user();
    let user_of = |p: &str| {
        shoal_auth::token::upstream_user(&cache_user, shoal_types::Permission::ReadWrite, &[p.to_string()])
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while token_acl_users(&dev, &id).await != [user_of("long:*")] {
        assert!(std::time::Instant::now() < deadline, "{:?}", token_acl_users(&dev, &id).await);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The token still in use works as before.
    let out = raw(
        dev.resp_port,
        &[auth_command(&long), b"*3\r\n$3\r\nSET\r\n$6\r\nlong:1\r\n$1\r\nv\r\n".to_vec()].concat(),
    )
    .await;
    assert_eq!(out, b"+OK\r\n+OK\r\n");
}

/// A token ACL user the store has no token for (a mint that made its user and then failed to
/// store the token) goes too once its cache is deleted: a delete finds token users through
/// the store, and the sweep takes what is left of caches that are gone.
#[tokio::test]
async fn a_deleted_caches_token_user_unknown_to_the_store_is_swept() {
    // Sweeps 2 s apart: the stray user is made and its cache deleted between two of them.
    let dev = ShoalDev::start_with(&["--acl-sweep-interval", "2"]).await;
    // On a standalone node, where the stray user is made by hand (a cluster pool keeps its own
    // record of the users it sets, which a hand-made one is not in).
    let body = serde_json::json!({"name": "half-minted", "pool": "main"});
    let (status, cache) = dev.api(reqwest::Method::POST, "/v1/caches", Some(body)).await;
    assert_eq!(status, 201, "{cache}");
    let id = cache["id"].as_str().unwrap().to_string();
    let stray = format!("{}.jwt.stray", shoal_types::CacheId::parse(&id).unwrap().acl_user());
    let mut node = dev.admins_of(&cache).await.remove(0);
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&stray)
        .arg("on")
        .arg(">pw-of-a-failed-mint")
        .query_async(&mut node)
        .await
        .unwrap();
    assert_eq!(token_acl_users(&dev, &id).await, [stray.as_str()]);
    let (status, _) = dev.api(reqwest::Method::DELETE, &format!("/v1/caches/{id}"), None).await;
    assert_eq!(status, 204);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !token_acl_users(&dev, &id).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?} outlived its cache",
            token_acl_users(&dev, &id).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
