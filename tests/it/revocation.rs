//! Revocation (issue 16, "Least privilege"): platform API keys, the bootstrap admin token
//! and LDAP REST sessions can all be revoked, by whom they should be and by no one else,
//! and a revoked credential answers 401 at once. Through the real binary.

use crate::support::ShoalDev;
use reqwest::Method;
use serde_json::{json, Value};
use shoal_auth::testing::{self, Slapd};
use std::process::Command;

async fn status_as(dev: &ShoalDev, token: &str, method: Method, path: &str) -> u16 {
    dev.call(Some(token), method, path, None, &[]).await.0
}

async fn audit(dev: &ShoalDev, action: &str) -> Vec<Value> {
    let (status, body) = dev.api(Method::GET, &format!("/v1/audit?limit=500&action={action}"), None).await;
    assert_eq!(status, 200, "{body}");
    body["items"].as_array().unwrap().clone()
}

/// A new key of `role` for `account` (created by the admin): (key id, token).
async fn new_account_key(dev: &ShoalDev, account: &str, role: &str) -> (String, String) {
    let (status, key) = dev
        .api(
            Method::POST,
            &format!("/v1/accounts/{account}/api-keys"),
            Some(json!({ "name": format!("{role} key"), "role": role })),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    (key["id"].as_str().unwrap().to_string(), key["token"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn platform_keys_are_revoked_by_the_admin_and_account_keys_only_within_their_account() {
    let dev = ShoalDev::start().await;
    let (status, platform) =
        dev.api(Method::POST, "/v1/api-keys", Some(json!({"name": "ci auditor", "role": "auditor"}))).await;
    assert_eq!(status, 201, "{platform}");
    let platform_id = platform["id"].as_str().unwrap().to_string();
    let platform_token = platform["token"].as_str().unwrap().to_string();
    assert_eq!(status_as(&dev, &platform_token, Method::GET, "/v1/caches").await, 200);

    let (a, a_owner) = dev.account_with_key("acme", "owner").await;
    let (b, _) = dev.account_with_key("globex", "owner").await;
    let (a_auditor_id, a_auditor) = new_account_key(&dev, &a, "auditor").await;
    let (b_key_id, b_key) = new_account_key(&dev, &b, "auditor").await;

    // No BOLA: an account's owner cannot see, let alone delete, platform keys or another
    // account's keys (404, as for anything it cannot see).
    for id in [&platform_id, &b_key_id] {
        let path = format!("/v1/api-keys/{id}");
        assert_eq!(status_as(&dev, &a_owner, Method::DELETE, &path).await, 404, "{id}");
    }
    assert_eq!(status_as(&dev, &platform_token, Method::GET, "/v1/caches").await, 200);
    assert_eq!(status_as(&dev, &b_key, Method::GET, "/v1/caches").await, 200);
    // An auditor changes nothing, revocations included.
    let path = format!("/v1/api-keys/{b_key_id}");
    assert_eq!(status_as(&dev, &a_auditor, Method::DELETE, &path).await, 404);
    assert_eq!(status_as(&dev, &platform_token, Method::DELETE, &path).await, 403);
    assert_eq!(status_as(&dev, &b_key, Method::GET, "/v1/caches").await, 200);

    // The owner revokes its own account's key: it stops working at once.
    let path = format!("/v1/api-keys/{a_auditor_id}");
    assert_eq!(status_as(&dev, &a_owner, Method::DELETE, &path).await, 204);
    assert_eq!(status_as(&dev, &a_auditor, Method::GET, "/v1/caches").await, 401);
    assert_eq!(status_as(&dev, &a_owner, Method::DELETE, &path).await, 404, "already revoked");

    // The platform admin revokes the platform key.
    let (status, _) = dev.api(Method::DELETE, &format!("/v1/api-keys/{platform_id}"), None).await;
    assert_eq!(status, 204);
    assert_eq!(status_as(&dev, &platform_token, Method::GET, "/v1/caches").await, 401);
    let (status, keys) = dev.api(Method::GET, "/v1/api-keys", None).await;
    assert_eq!(status, 200);
    assert!(keys["items"].as_array().unwrap().iter().all(|k| k["id"] != platform_id.as_str()), "{keys}");
    let (status, _) = dev.api(Method::DELETE, "/v1/api-keys/key-nonexistent", None).await;
    assert_eq!(status, 404);
    // The bootstrap admin keys' name is reserved (rotation revokes keys by it).
    let (status, body) = dev
        .api(Method::POST, "/v1/api-keys", Some(json!({"name": "bootstrap admin", "role": "admin"})))
        .await;
    assert_eq!((status, body["field"].as_str()), (400, Some("name")), "{body}");

    // Audited, with the account the key belonged to.
    let records = audit(&dev, "api_key.revoke").await;
    let of = |id: &str| records.iter().find(|r| r["target"] == id && r["outcome"] == "success").cloned();
    let platform_record = of(&platform_id).expect("the platform key's revocation is audited");
    assert!(platform_record["account_id"].is_null(), "{platform_record}");
    let account_record = of(&a_auditor_id).expect("the account key's revocation is audited");
    assert_eq!(account_record["account_id"], a.as_str(), "{account_record}");
}

fn rotate(dev: &ShoalDev) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["admin", "rotate-token", "--data-dir"])
        .arg(dev.dir.join(".shoal"))
        .args(dev.database_url.iter().flat_map(|url| ["--database-url", url]))
        .output()
        .expect("shoal runs")
}

#[tokio::test]
async fn the_bootstrap_admin_token_rotates_and_restarts_leave_no_stale_admin_token() {
    let mut dev = ShoalDev::start().await;
    let first = dev.admin_token();
    assert_eq!(status_as(&dev, &first, Method::GET, "/v1/api-keys").await, 200);

    // Rotation while the server runs: the new token works at once, the old one is 401.
    let out = rotate(&dev);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second = dev.admin_token();
    assert_ne!(first, second);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&second), "the token is not printed");
    assert_eq!(status_as(&dev, &first, Method::GET, "/v1/api-keys").await, 401);
    assert_eq!(status_as(&dev, &second, Method::GET, "/v1/api-keys").await, 200);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dev.admin_token_path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is private");
    let records = audit(&dev, "admin_token.rotate").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["details"]["revoked_bootstrap_keys"], 1, "{records:?}");

    // The same from a `shoal control-plane` config file (its store and token path).
    let config = dev.dir.join("cp.toml");
    let database_url = dev
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dev.dir.join(".shoal/shoal.db").display()));
    std::fs::write(
        &config,
        format!(
            "[control_plane]\ndatabase_url = \"{database_url}\"\nadmin_token_path = \"{}\"\n\n[engine]\ndir = \"/x\"\nnodes = []\n",
            dev.admin_token_path().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["admin", "rotate-token", "--config"])
        .arg(&config)
        .env_remove("SHOAL_DATABASE_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (previous, second) = (second, dev.admin_token());
    assert_ne!(previous, second);
    assert_eq!(status_as(&dev, &previous, Method::GET, "/v1/api-keys").await, 401);
    assert_eq!(status_as(&dev, &second, Method::GET, "/v1/api-keys").await, 200);
    // No store there: refused, nothing written.
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["admin", "rotate-token", "--data-dir"])
        .arg(dev.dir.join("nowhere"))
        .env_remove("SHOAL_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!dev.dir.join("nowhere").exists());

    // A restart reuses the token in the file.
    dev.stop_with(libc::SIGTERM);
    dev.launch().await;
    assert_eq!(dev.admin_token(), second);
    assert_eq!(status_as(&dev, &second, Method::GET, "/v1/api-keys").await, 200);
    assert_eq!(status_as(&dev, &first, Method::GET, "/v1/api-keys").await, 401);

    // A restart without the file writes a new token and revokes the previous one.
    dev.stop_with(libc::SIGTERM);
    std::fs::remove_file(dev.admin_token_path()).unwrap();
    dev.launch().await;
    let third = dev.admin_token();
    assert_ne!(third, second);
    assert_eq!(status_as(&dev, &third, Method::GET, "/v1/api-keys").await, 200);
    assert_eq!(status_as(&dev, &second, Method::GET, "/v1/api-keys").await, 401, "no stale admin hash");
    let (status, keys) = dev.api(Method::GET, "/v1/api-keys", None).await;
    assert_eq!(status, 200);
    let admins = keys["items"].as_array().unwrap().iter().filter(|k| k["role"] == "admin").count();
    assert_eq!(admins, 1, "one live bootstrap admin key: {keys}");
    // Audited: the first start's token and its replacement.
    assert_eq!(audit(&dev, "admin_token.bootstrap").await.len(), 2);
}

fn write_ldap_config(path: &std::path::Path, slapd: &Slapd) {
    let group = |cn: &str| format!("cn={cn},{}", testing::GROUPS_BASE);
    let config = format!(
        r#"url = "{url}"
starttls = true
ca_cert = "{ca}"
groups = "member-of"
mode = {{ search = {{ bind_dn = "{bind_dn}", bind_password = "{bind_pw}", base = "{base}", filter = "(&(objectClass=inetOrgPerson)(uid={{user}}))" }} }}
roles = [
  {{ group = "{admins}", role = "platform-admin" }},
  {{ group = "{auditors}", role = "auditor" }},
  {{ group = "{owners}", role = "account-owner", account = "a000000000000" }},
]
"#,
        url = slapd.url(),
        ca = slapd.ca_path().display(),
        bind_dn = testing::SERVICE_DN,
        bind_pw = testing::SERVICE_PW,
        base = testing::BASE,
        admins = group("admins"),
        auditors = group("auditors"),
        owners = group("owners"),
    );
    std::fs::write(path, config).unwrap();
}

async fn login(dev: &ShoalDev, user: &str, password: &str) -> (String, String) {
    let (status, body) = dev.rest_login(user, password).await;
    assert_eq!(status, 200, "{body}");
    (body["key_id"].as_str().unwrap().to_string(), body["token"].as_str().unwrap().to_string())
}

fn ids(body: &Value) -> Vec<String> {
    body["items"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn ldap_sessions_are_listed_in_scope_and_revoked_at_once() {
    let slapd = Slapd::start();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ldap.toml");
    write_ldap_config(&config, &slapd);
    let dev =
        ShoalDev::start_with(&["--ldap-config", config.to_str().unwrap(), "--auth-throttle", "off"]).await;
    let (alice_id, alice) = login(&dev, "alice", "alice-pw").await; // platform admin
    let (bob_id, bob) = login(&dev, "bob", "bob-pw").await; // platform auditor
    let (smith_id, smith) = login(&dev, "smith, john", "smith-pw").await; // owner of a000000000000

    // Listed for the admin, without their tokens; an owner sees its account's only.
    let (status, all) = dev.api(Method::GET, "/v1/sessions", None).await;
    assert_eq!(status, 200, "{all}");
    let listed = ids(&all);
    for id in [&alice_id, &bob_id, &smith_id] {
        assert!(listed.contains(id), "{id} in {all}");
    }
    assert!(!all.to_string().contains(&alice), "no tokens in the list");
    let alice_row = all["items"].as_array().unwrap().iter().find(|s| s["id"] == alice_id.as_str()).unwrap();
    assert_eq!((alice_row["user"].as_str(), alice_row["role"].as_str()), (Some("alice"), Some("admin")));
    assert!(alice_row["expires_at"].is_string(), "{alice_row}");
    let (status, _, mine) = dev.call(Some(&smith), Method::GET, "/v1/sessions", None, &[]).await;
    assert_eq!(status, 200, "{mine}");
    assert_eq!(ids(&mine), vec![smith_id.clone()]);

    // Nobody revokes what it cannot see or may not change.
    let alice_path = format!("/v1/sessions/{alice_id}");
    assert_eq!(status_as(&dev, &smith, Method::DELETE, &alice_path).await, 404);
    assert_eq!(status_as(&dev, &bob, Method::DELETE, &alice_path).await, 403, "auditors change nothing");
    assert_eq!(status_as(&dev, &alice, Method::GET, "/v1/caches").await, 200);

    // Anyone ends its own session (log out), auditors included.
    assert_eq!(status_as(&dev, &bob, Method::DELETE, &format!("/v1/sessions/{bob_id}")).await, 204);
    assert_eq!(status_as(&dev, &bob, Method::GET, "/v1/caches").await, 401);

    // The admin revokes another's session: its token is 401 at once.
    let (status, _) = dev.api(Method::DELETE, &alice_path, None).await;
    assert_eq!(status, 204);
    assert_eq!(status_as(&dev, &alice, Method::GET, "/v1/caches").await, 401);
    let (status, _) = dev.api(Method::DELETE, &alice_path, None).await;
    assert_eq!(status, 404, "already revoked");
    let (_, all) = dev.api(Method::GET, "/v1/sessions", None).await;
    assert_eq!(ids(&all), vec![smith_id.clone()], "revoked sessions are not listed");

    // Only sessions are sessions: an API key id is not found here.
    let (status, keys) = dev.api(Method::GET, "/v1/api-keys", None).await;
    assert_eq!(status, 200);
    let admin_key = keys["items"][0]["id"].as_str().unwrap().to_string();
    let (status, _) = dev.api(Method::DELETE, &format!("/v1/sessions/{admin_key}"), None).await;
    assert_eq!(status, 404);

    let records = audit(&dev, "session.revoke").await;
    let targets: Vec<&str> = records.iter().filter_map(|r| r["target"].as_str()).collect();
    assert!(targets.contains(&alice_id.as_str()) && targets.contains(&bob_id.as_str()), "{records:?}");
}
