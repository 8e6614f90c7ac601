//! Secrets at rest (issue 16, "Least privilege"): an `Idempotency-Key` replay never keeps
//! a secret and idempotency rows expire after 24 h; the store, the ACL files and every key
//! file are private to the platform's user (0600, folders 0700), also after an ACL SAVE
//! and on every start. Through the real binary.

use crate::support::ShoalDev;
use reqwest::Method;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

fn idempotency_bodies(dev: &ShoalDev) -> String {
    dev.sql("SELECT body FROM idempotency_keys").join("\n")
}

#[tokio::test]
async fn an_idempotent_api_key_create_keeps_no_token_and_its_replay_says_so() {
    let dev = ShoalDev::start().await;
    let (status, account) = dev.api(Method::POST, "/v1/accounts", Some(json!({"name": "acme"}))).await;
    assert_eq!(status, 201, "{account}");
    let account = account["id"].as_str().unwrap().to_string();
    let admin = dev.admin_token();

    for (path, role) in
        [(format!("/v1/accounts/{account}/api-keys"), "owner"), ("/v1/api-keys".into(), "auditor")]
    {
        let body = json!({"name": "ci", "role": role});
        let idempotency_key = format!("key-once-{role}");
        let key = [("Idempotency-Key", idempotency_key.as_str())];
        let (s1, _, first) = dev.call(Some(&admin), Method::POST, &path, Some(body.clone()), &key).await;
        assert_eq!(s1, 201, "{first}");
        let token = first["token"].as_str().expect("the first answer has the token").to_string();
        // The token works.
        let (s, _, _) = dev.call(Some(&token), Method::GET, "/v1/caches", None, &[]).await;
        assert_eq!(s, 200);

        // Nothing in the store holds it.
        let stored = idempotency_bodies(&dev);
        assert!(!stored.contains(&token), "the idempotency row keeps the token: {stored}");

        // The replay: same status and key id, no token, and says why.
        let (s2, headers, second) = dev.call(Some(&admin), Method::POST, &path, Some(body), &key).await;
        assert_eq!(s2, 201, "{second}");
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(second["id"], first["id"]);
        assert!(second.get("token").is_none(), "a replay repeats the token: {second}");
        assert!(second["token_note"].as_str().unwrap().contains("only once"), "{second}");
        assert_eq!(headers["idempotent-redacted"], "token");
        // Still one key of that name.
        let list =
            if role == "owner" { format!("/v1/accounts/{account}/api-keys") } else { "/v1/api-keys".into() };
        let (_, keys) = dev.api(Method::GET, &list, None).await;
        let named = keys["items"].as_array().unwrap().iter().filter(|k| k["name"] == "ci").count();
        assert_eq!(named, 1, "{keys}");
    }
}

#[tokio::test]
async fn idempotency_keys_expire_after_24_hours() {
    let dev = ShoalDev::start().await;
    let admin = dev.admin_token();
    let key = [("Idempotency-Key", "acct-1")];
    let (s, _, first) =
        dev.call(Some(&admin), Method::POST, "/v1/accounts", Some(json!({"name": "one"})), &key).await;
    assert_eq!(s, 201, "{first}");
    // Within 24 h another body with the key is refused.
    let (s, _, _) =
        dev.call(Some(&admin), Method::POST, "/v1/accounts", Some(json!({"name": "two"})), &key).await;
    assert_eq!(s, 422);
    // 25 hours later the key is free again.
    dev.sql("UPDATE idempotency_keys SET created_at = '2000-01-01T00:00:00.000Z'");
    let (s, headers, second) =
        dev.call(Some(&admin), Method::POST, "/v1/accounts", Some(json!({"name": "two"})), &key).await;
    assert_eq!(s, 201, "{second}");
    assert!(headers.get("idempotent-replayed").is_none());
    assert_ne!(second["id"], first["id"]);

    // Expired rows are purged, not just ignored: back-date this one, use another key.
    dev.sql("UPDATE idempotency_keys SET created_at = '2000-01-01T00:00:00.000Z'");
    let other = [("Idempotency-Key", "acct-2")];
    let (s, _, _) =
        dev.call(Some(&admin), Method::POST, "/v1/accounts", Some(json!({"name": "three"})), &other).await;
    assert_eq!(s, 201);
    assert_eq!(dev.sql("SELECT key FROM idempotency_keys"), vec!["acct-2".to_string()]);
}

/// Everything under the data directory that holds a secret, and the folders.
fn check_private(dev: &ShoalDev) {
    let root = dev.dir.join(".shoal");
    let mut dirs = vec![root.clone(), root.join("valkey"), root.join("tls")];
    let mut files = vec![root.join("admin.token"), root.join("tls/key.pem")];
    if dev.database_url.is_none() {
        files.push(root.join("shoal.db"));
        for extra in ["shoal.db-wal", "shoal.db-shm"] {
            if root.join(extra).exists() {
                files.push(root.join(extra));
            }
        }
    }
    for n in 0..dev.node_ports.len() {
        let node = root.join(format!("valkey/n{n}"));
        files.extend(["users.acl", "admin.secret", "observer.secret"].map(|f| node.join(f)));
        dirs.push(node);
    }
    if root.join("gateway").exists() {
        dirs.push(root.join("gateway"));
    }
    for d in &dirs {
        assert_eq!(mode(d), 0o700, "{} is {:o}", d.display(), mode(d));
    }
    for f in &files {
        assert_eq!(mode(f), 0o600, "{} is {:o}", f.display(), mode(f));
    }
}

#[tokio::test]
async fn the_store_acl_files_and_keys_are_private_on_create_after_acl_save_and_on_restart() {
    let mut dev = ShoalDev::start().await;
    check_private(&dev);

    // A cache's ACL user makes Valkey rewrite users.acl; so does an explicit ACL SAVE.
    dev.create_cache("private").await;
    for n in 0..dev.node_ports.len() {
        let mut admin = dev.node_admin(n).await;
        let _: () = redis::cmd("ACL").arg("SAVE").query_async(&mut admin).await.unwrap();
    }
    check_private(&dev);

    // An install made before this fix: everything world-readable. A restart repairs it.
    dev.stop_with(libc::SIGTERM);
    let root = dev.dir.join(".shoal");
    let mut stack = vec![root.clone()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    dev.launch().await;
    check_private(&dev);
}

/// Two control planes over one store: a rotation made through one is what the other signs
/// with and publishes at once (the rotation state is the store's, not a process's).
#[tokio::test]
async fn a_signing_key_rotation_is_shared_by_every_control_plane_over_the_store() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("rotated").await;
    let cache_id = cache["id"].as_str().unwrap();

    // A second control plane (its own Valkey node) over the same store.
    let (rest, node, internal) =
        (crate::support::free_port(), crate::support::free_port(), crate::support::free_port());
    let database_url = dev
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dev.dir.join(".shoal/shoal.db").display()));
    let d = dev.dir.display();
    let toml = format!(
        "[control_plane]\nlisten = \"127.0.0.1:{rest}\"\ndatabase_url = \"{database_url}\"\n\
         admin_token_path = \"{token}\"\npublic_endpoint = \"127.0.0.1:{resp}\"\n\
         internal_listen = \"127.0.0.1:{internal}\"\n\n[engine]\ndir = \"{d}/second\"\ndatabases = 8\n\n\
         [[engine.nodes]]\nname = \"b0\"\nport = {node}\n",
        token = dev.admin_token_path().display(),
        resp = dev.resp_port,
    );
    std::fs::write(dev.dir.join("second.toml"), toml).unwrap();
    let log = std::fs::File::create(dev.dir.join("second.log")).unwrap();
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["control-plane", "--config"])
        .arg(dev.dir.join("second.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{rest}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !dev.http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(
            std::time::Instant::now() < deadline && second.try_wait().unwrap().is_none(),
            "{}",
            std::fs::read_to_string(dev.dir.join("second.log")).unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let jwks = |url: String| {
        let http = dev.http.clone();
        async move {
            let body: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
            body["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["kid"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let before = jwks(format!("{base}/.well-known/jwks.json")).await;
    assert_eq!(before, jwks(dev.url("/.well-known/jwks.json")).await);

    // Rotate through the first one.
    let (status, rotated) = dev.api(Method::POST, "/v1/signing-keys/rotate", None).await;
    assert_eq!(status, 200, "{rotated}");
    let kid = rotated["kid"].as_str().unwrap().to_string();

    // The second publishes the new key and signs with it; the token works on the gateway.
    let after = jwks(format!("{base}/.well-known/jwks.json")).await;
    assert!(after.contains(&kid), "{after:?} lacks {kid}");
    let path = format!("/v1/caches/{cache_id}/tokens");
    let minted =
        crate::support::admin_api(&dev.http, rest, &dev.admin_token(), reqwest::Method::POST, &path, None)
            .await;
    let token = minted["token"].as_str().unwrap_or_else(|| panic!("{minted}"));
    let header = token.split('.').next().unwrap();
    use base64::Engine;
    let header: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap())
            .unwrap();
    assert_eq!(header["kid"], kid.as_str(), "the second control plane signs with a retired key");
    let mut conn = dev.client(token).await.expect("the gateway accepts it");
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();

    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    let _ = second.wait();
}
