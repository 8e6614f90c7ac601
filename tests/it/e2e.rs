//! End to end: the real `shoal dev` binary, real valkey-server nodes, HTTP with a real
//! client and RESP with redis-rs — the README's quickstart, step by step.

use crate::support::{pid_alive, raw, ShoalDev};
use redis::AsyncCommands;
use reqwest::Method;
use std::time::{Duration, Instant};

#[tokio::test]
async fn quickstart_two_caches_are_isolated_and_delete_removes_everything() {
    let dev = ShoalDev::start().await;

    // Create two caches.
    let a = dev.create_cache("shop").await;
    let b = dev.create_cache("blog").await;
    for cache in [&a, &b] {
        assert_eq!(cache["status"], "available");
        assert_eq!(cache["endpoint"], format!("127.0.0.1:{}", dev.resp_port));
        assert!(cache["created_at"].as_str().unwrap().starts_with("20"));
    }
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    assert_ne!(a_id, b_id);
    let (status, listed) = dev.api(Method::GET, "/v1/caches", None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
    let (status, got) = dev.api(Method::GET, &format!("/v1/caches/{a_id}"), None).await;
    assert_eq!((status, &got["name"]), (200, &serde_json::json!("shop")));

    // Mint tokens and connect through the gateway.
    let (status, minted) = dev
        .api(Method::POST, &format!("/v1/caches/{a_id}/tokens"), Some(serde_json::json!({"ttl_seconds": 60})))
        .await;
    assert_eq!(status, 201);
    assert!(minted["expires_at"].is_string());
    let token_a = minted["token"].as_str().unwrap().to_string();
    let token_b = dev.mint_token(b_id).await;
    let mut ca = dev.client(&token_a).await.unwrap();
    let mut cb = dev.client(&token_b).await.unwrap();

    // Same key names, different caches.
    let _: () = ca.set("user:1", "alice").await.unwrap();
    let _: () = cb.set("user:1", "bob").await.unwrap();
    assert_eq!(ca.get::<_, String>("user:1").await.unwrap(), "alice");
    assert_eq!(cb.get::<_, String>("user:1").await.unwrap(), "bob");
    let keys_b: Vec<String> = cb.keys("*").await.unwrap();
    assert_eq!(keys_b, vec!["user:1".to_string()]);

    // Data types and expiry.
    let _: () = ca.hset_multiple("h", &[("f1", "v1"), ("f2", "v2")]).await.unwrap();
    assert_eq!(ca.hget::<_, _, String>("h", "f2").await.unwrap(), "v2");
    let _: () = ca.rpush("l", &["x", "y", "z"]).await.unwrap();
    assert_eq!(ca.lrange::<_, Vec<String>>("l", 0, -1).await.unwrap(), vec!["x", "y", "z"]);
    let _: () = ca.sadd("s", &["m1", "m2"]).await.unwrap();
    assert_eq!(ca.scard::<_, i64>("s").await.unwrap(), 2);
    let _: () = ca.zadd_multiple("z", &[(1.0, "one"), (2.0, "two")]).await.unwrap();
    assert_eq!(ca.zrange::<_, Vec<String>>("z", 0, -1).await.unwrap(), vec!["one", "two"]);
    let _: () = ca.set_ex("temp", "v", 100).await.unwrap();
    let ttl: i64 = ca.ttl("temp").await.unwrap();
    assert!((1..=100).contains(&ttl), "ttl {ttl}");
    let _: () = ca.pset_ex("short", "v", 50).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(ca.get::<_, Option<String>>("short").await.unwrap(), None);

    // A pipeline of 200 commands comes back complete and in order.
    let mut pipe = redis::pipe();
    for i in 0..200 {
        pipe.cmd("INCR").arg("counter");
        if i % 50 == 0 {
            pipe.cmd("GET").arg("user:1");
        }
    }
    let replies: Vec<redis::Value> = pipe.query_async(&mut ca).await.unwrap();
    assert_eq!(replies.len(), 204);
    assert_eq!(replies[0], redis::Value::Int(1));
    assert_eq!(replies.last().unwrap(), &redis::Value::Int(200));
    assert_eq!(ca.get::<_, i64>("counter").await.unwrap(), 200);
    assert!(cb.get::<_, Option<i64>>("counter").await.unwrap().is_none());

    // Delete cache A: it is gone from the API, its token is refused, its data is flushed.
    let node_of_a = {
        let mut found = None;
        for i in 0..2 {
            let mut admin = dev.node_admin(i).await;
            let users: Vec<String> = redis::cmd("ACL").arg("USERS").query_async(&mut admin).await.unwrap();
            if users.contains(&format!("t{a_id}")) {
                found = Some(i);
            }
        }
        found.expect("cache A has an ACL user on one node")
    };
    let (status, _) = dev.api(Method::DELETE, &format!("/v1/caches/{a_id}"), None).await;
    assert_eq!(status, 204);
    let (status, problem) = dev.api(Method::GET, &format!("/v1/caches/{a_id}"), None).await;
    assert_eq!(status, 404);
    assert_eq!(problem["status"], 404);
    let Err(refused) = dev.client(&token_a).await else { panic!("deleted cache's token accepted") };
    assert_eq!(refused.kind(), redis::ErrorKind::AuthenticationFailed, "{refused}");
    let out = raw(dev.resp_port, &crate::support::auth_command(&token_a)).await;
    assert!(out.starts_with(b"-WRONGPASS"), "{}", String::from_utf8_lossy(&out));
    assert!(ca.get::<_, String>("user:1").await.is_err(), "open connection of a deleted cache still works");
    let mut admin = dev.node_admin(node_of_a).await;
    let mut total_keys = 0;
    let info: String = redis::cmd("INFO").arg("keyspace").query_async(&mut admin).await.unwrap();
    for line in info.lines().filter(|l| l.starts_with("db")) {
        let keys: i64 = line.split("keys=").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
        total_keys += keys;
    }
    let b_on_same_node = {
        let users: Vec<String> = redis::cmd("ACL").arg("USERS").query_async(&mut admin).await.unwrap();
        users.contains(&format!("t{b_id}"))
    };
    assert_eq!(total_keys, if b_on_same_node { 1 } else { 0 }, "cache A's keys survived: {info}");

    // Cache B is untouched.
    assert_eq!(cb.get::<_, String>("user:1").await.unwrap(), "bob");
}

#[tokio::test]
async fn commands_before_auth_get_noauth_and_bad_tokens_get_wrongpass() {
    let dev = ShoalDev::start().await;
    let out = raw(dev.resp_port, b"*2\r\n$3\r\nGET\r\n$1\r\na\r\nPING\r\n").await;
    assert_eq!(out, b"-NOAUTH Authentication required.\r\n-NOAUTH Authentication required.\r\n");
    // What Valkey flags no_auth runs before AUTH, as on a plain Valkey: RESET too.
    let out = raw(dev.resp_port, b"RESET\r\nGET a\r\n").await;
    assert_eq!(out, b"+RESET\r\n-NOAUTH Authentication required.\r\n");

    let out = raw(dev.resp_port, b"*2\r\n$4\r\nAUTH\r\n$13\r\nnot-a-token!!\r\n").await;
    assert!(out.starts_with(b"-WRONGPASS"), "{}", String::from_utf8_lossy(&out));

    // A token whose signature was tampered with.
    let cache = dev.create_cache("c1").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let out =
        raw(dev.resp_port, &crate::support::auth_command(std::str::from_utf8(&tampered).unwrap())).await;
    assert!(out.starts_with(b"-WRONGPASS"), "{}", String::from_utf8_lossy(&out));

    // QUIT and HELLO work before AUTH; HELLO 3 AUTH logs in.
    assert_eq!(raw(dev.resp_port, b"QUIT\r\n").await, b"+OK\r\n");
    let hello = format!(
        "*5\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n${}\r\n{}\r\n",
        token.len(),
        token
    );
    let out = raw(dev.resp_port, format!("{hello}*2\r\n$3\r\nGET\r\n$1\r\nk\r\n").as_bytes()).await;
    assert!(out.starts_with(b"%"), "HELLO 3 answers with a map: {}", String::from_utf8_lossy(&out));
    assert!(out.ends_with(b"_\r\n"), "RESP3 null for a missing key: {}", String::from_utf8_lossy(&out));

    // Unauthenticated clients may not send big commands: Valkey's limits, then the door closes.
    let out = raw(dev.resp_port, b"*11\r\n$3\r\nGET\r\n").await;
    assert_eq!(out, b"-ERR Protocol error: unauthenticated multibulk length\r\n");
}

#[tokio::test]
async fn sigterm_stops_every_node_and_a_restart_keeps_caches_and_data() {
    let mut dev = ShoalDev::start().await;
    let cache = dev.create_cache("persist").await;
    let id = cache["id"].as_str().unwrap().to_string();
    let token = dev.mint_token(&id).await;
    let mut c = dev.client(&token).await.unwrap();
    let _: () = c.set("kept", "yes").await.unwrap();
    drop(c);

    let pids = dev.node_pids();
    assert_eq!(pids.len(), 2);
    let status = dev.stop_with(libc::SIGTERM);
    assert!(status.success(), "exit status {status}");
    for pid in &pids {
        assert!(!pid_alive(*pid), "valkey-server {pid} left behind");
    }

    dev.launch().await;
    let (status, listed) = dev.api(Method::GET, "/v1/caches", None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["items"][0]["id"], id);
    // The signing keys persist too: the token minted before the restart still works.
    let mut c = dev.client(&token).await.unwrap();
    assert_eq!(c.get::<_, String>("kept").await.unwrap(), "yes");
    // A new cache never lands on a database that is already taken.
    let other = dev.create_cache("other").await;
    let mut o = dev.client(&dev.mint_token(other["id"].as_str().unwrap()).await).await.unwrap();
    assert_eq!(o.get::<_, Option<String>>("kept").await.unwrap(), None);

    let pids = dev.node_pids();
    let status = dev.stop_with(libc::SIGINT);
    assert!(status.success(), "exit status {status}");
    for pid in &pids {
        assert!(!pid_alive(*pid), "valkey-server {pid} left behind after Ctrl-C");
    }
}

#[tokio::test]
async fn a_killed_node_recovers_and_its_caches_work_again_through_the_gateway() {
    let dev = ShoalDev::start().await;
    let mut conns = Vec::new();
    // Two caches: one lands on each node.
    for name in ["k1", "k2"] {
        let cache = dev.create_cache(name).await;
        let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
        let mut c = dev.client(&token).await.unwrap();
        let _: () = c.set("v", name).await.unwrap();
        conns.push((name, c));
    }
    let victim = dev.node_pids()[0];
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let killed_at = Instant::now();
    for (name, c) in conns.iter_mut() {
        loop {
            match c.get::<_, String>("v").await {
                Ok(v) => {
                    assert_eq!(v, *name);
                    break;
                }
                Err(_) => {
                    assert!(killed_at.elapsed() < Duration::from_secs(3), "cache {name} did not recover");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    assert_ne!(dev.node_pids()[0], victim);
}

/// Tenant ACL users are saved in the background (`engine/src/acl_save.rs`), not by an
/// `ACL SAVE` per create: a node killed right after a create, before any save, must still
/// let that cache log in once it is back, and must not bring back a user deleted just before.
#[tokio::test]
async fn a_node_killed_before_its_acl_file_was_saved_keeps_new_users_and_drops_deleted_ones() {
    let dev = ShoalDev::start().await;
    let user_of = |cache: &serde_json::Value| format!("t{}", cache["id"].as_str().unwrap());
    let gone = dev.create_cache("gone").await;
    let node = ShoalDev::node_of(&gone);
    let users_acl = dev.node_dirs()[node].join("users.acl");
    let saved = |user: &str| std::fs::read_to_string(&users_acl).unwrap().contains(user);
    // Its user saved first, so only the replay of its deletion keeps it away.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !saved(&user_of(&gone)) {
        assert!(Instant::now() < deadline, "the ACL file never got the user");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) =
        dev.api(Method::DELETE, &format!("/v1/caches/{}", gone["id"].as_str().unwrap()), None).await;
    assert_eq!(status, 204, "{body}");
    let fresh = dev.create_cache("fresh").await;
    assert_eq!(ShoalDev::node_of(&fresh), node, "both caches on the emptiest node");
    let token = dev.mint_token(fresh["id"].as_str().unwrap()).await;
    let victim = dev.node_pid(node).unwrap();
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let killed_at = Instant::now();
    // Usually true: the kill came within the save interval. Logged, since a slow machine
    // may have saved in between (then the file alone would explain the result).
    eprintln!(
        "at the kill: fresh user saved {}, deleted user saved {}",
        saved(&user_of(&fresh)),
        saved(&user_of(&gone))
    );

    loop {
        let answered = async {
            let mut c = dev.client(&token).await?;
            let _: () = c.set("k", "v").await?;
            c.get::<_, String>("k").await
        };
        match answered.await {
            Ok(v) => {
                assert_eq!(v, "v");
                break;
            }
            Err(e) => {
                assert!(
                    killed_at.elapsed() < Duration::from_secs(10),
                    "the new cache never logged in again: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_ne!(dev.node_pid(node), Some(victim), "the node was restarted");
    let mut admin = dev.node_admin(node).await;
    let getuser = |user: String| redis::cmd("ACL").arg("GETUSER").arg(user).clone();
    let deleted: redis::Value = getuser(user_of(&gone)).query_async(&mut admin).await.unwrap();
    assert_eq!(deleted, redis::Value::Nil, "the deleted cache's user came back");
    // Saved again after the replay: the next restart needs no journal.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !saved(&user_of(&fresh)) || saved(&user_of(&gone)) {
        assert!(Instant::now() < deadline, "the ACL file was not saved after the replay");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Cache users' and scoped tokens' upstream ACL users are saved in the background too. A
/// platform killed together with its nodes right after making them (its journal gone with
/// it) makes them again from the store when it starts; a deleted cache's logins stay gone.
#[tokio::test]
async fn logins_made_just_before_the_platform_was_killed_work_after_it_starts_again() {
    let mut dev = ShoalDev::start().await;
    let cache = dev.create_cache("logins").await;
    let gone = dev.create_cache("gone").await;
    let (id, gone_id) = (cache["id"].as_str().unwrap(), gone["id"].as_str().unwrap());
    let node = ShoalDev::node_of(&cache);
    let users_acl = dev.node_dirs()[node].join("users.acl");
    let saved = |user: &str| std::fs::read_to_string(&users_acl).unwrap().contains(&format!("user {user} "));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !saved(&format!("t{id}")) {
        assert!(Instant::now() < deadline, "the ACL file never got the cache's own user");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let password = "correct-horse-battery";
    let user =
        serde_json::json!({"username": "alice", "passwords": [password], "access_string": "on ~* +@all"});
    for cache in [id, gone_id] {
        let (status, body) =
            dev.api(Method::POST, &format!("/v1/caches/{cache}/users"), Some(user.clone())).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, minted) = dev
        .api(
            Method::POST,
            &format!("/v1/caches/{id}/tokens"),
            Some(serde_json::json!({"key_patterns": ["app:*"]})),
        )
        .await;
    assert_eq!(status, 201, "{minted}");
    let token = minted["token"].as_str().unwrap().to_string();
    let (status, body) = dev.api(Method::DELETE, &format!("/v1/caches/{gone_id}"), None).await;
    assert_eq!(status, 204, "{body}");
    // Usually unsaved at the kill (saves come at most once a second); logged, since a slow
    // machine may have saved in between.
    eprintln!("at the kill: cache user saved {}", saved(&format!("t{id}.user.alice")));
    dev.stop_with(libc::SIGKILL);
    dev.launch().await;

    let login = format!("alice@{id}");
    let set = |user: &str| {
        format!("*3\r\n$4\r\nAUTH\r\n${}\r\n{user}\r\n${}\r\n{password}\r\n*3\r\n$3\r\nSET\r\n$5\r\napp:x\r\n$1\r\n1\r\n",
            user.len(), password.len())
    };
    let out = raw(dev.resp_port, set(&login).as_bytes()).await;
    assert_eq!(String::from_utf8_lossy(&out), "+OK\r\n+OK\r\n", "the cache user works again");
    let mut c = dev.client(&token).await.unwrap();
    let _: () = c.set("app:y", "1").await.unwrap();
    let mut admin = dev.node_admin(ShoalDev::node_of(&gone)).await;
    let users: Vec<String> = redis::cmd("ACL").arg("USERS").query_async(&mut admin).await.unwrap();
    assert!(!users.iter().any(|u| u.starts_with(&format!("t{gone_id}"))), "{users:?}");
}
