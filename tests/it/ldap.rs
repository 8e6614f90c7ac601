//! LDAP logins against a real OpenLDAP `slapd` (StartTLS with a test CA), through the real
//! binary: `POST /v1/auth/login` for the REST API and `AUTH <user>@<cache> <password>` at
//! the gateway, with injection attempts, empty passwords, throttling, a directory that goes
//! down mid-test (fail closed; tokens and cache users unaffected), a CA that does not verify
//! the server, and the audit records of it all.

use crate::support::{auth, ShoalDev};
use reqwest::Method;
use serde_json::{json, Value};
use shoal_auth::testing::{self, Slapd};
use std::path::Path;
use std::time::{Duration, Instant};

const INJECTIONS: &[&str] =
    &["*)(uid=*))(|(uid=*", "admin)(|(objectClass=*)", "*", "alice)(uid=*", "alice\0"];
const CACHE_PW: &str = "cache-user-password1";

fn group(cn: &str) -> String {
    format!("cn={cn},{}", testing::GROUPS_BASE)
}

/// The `--ldap-config` file: search+bind over StartTLS, verified with `ca`; cache roles on
/// `cache` when given.
fn write_config(path: &Path, slapd: &Slapd, ca: &Path, cache: Option<&str>) {
    write_config_owning(path, slapd, ca, cache, "a000000000000")
}

/// The same, the `owners` group owning `account`.
fn write_config_owning(path: &Path, slapd: &Slapd, ca: &Path, cache: Option<&str>, account: &str) {
    let mut roles = vec![
        format!(r#"{{ group = "{}", role = "platform-admin" }}"#, group("admins")),
        format!(r#"{{ group = "{}", role = "auditor" }}"#, group("auditors")),
        format!(r#"{{ group = "{}", role = "account-owner", account = "{account}" }}"#, group("owners")),
    ];
    if let Some(cache) = cache {
        roles.push(format!(
            r#"{{ group = "{}", role = "cache-read-write", cache = "{cache}" }}"#,
            group("cache-rw")
        ));
        roles.push(format!(
            r#"{{ group = "{}", role = "cache-read-only", cache = "{cache}" }}"#,
            group("cache-ro")
        ));
    }
    let config = format!(
        r#"url = "{url}"
starttls = true
ca_cert = "{ca}"
connect_timeout_ms = 1000
operation_timeout_ms = 2000
groups = "member-of"
mode = {{ search = {{ bind_dn = "{bind_dn}", bind_password = "{bind_pw}", base = "{base}", filter = "(&(objectClass=inetOrgPerson)(uid={{user}}))" }} }}
roles = [
  {roles}
]
"#,
        url = slapd.url(),
        ca = ca.display(),
        bind_dn = testing::SERVICE_DN,
        bind_pw = testing::SERVICE_PW,
        base = testing::BASE,
        roles = roles.join(",\n  "),
    );
    std::fs::write(path, config).unwrap();
}

async fn audit(dev: &ShoalDev, query: &str) -> Vec<Value> {
    let (status, body) = dev.api(Method::GET, &format!("/v1/audit?limit=500&{query}"), None).await;
    assert_eq!(status, 200, "{body}");
    body["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn ldap_users_log_in_to_the_api_and_the_gateway_and_fail_closed() {
    let mut slapd = Slapd::start();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ldap.toml");
    write_config(&config, &slapd, &slapd.ca_path(), None);
    let login_throttle = "{ per_user = { free_failures = 2, base_delay_ms = 10, max_delay_ms = 20, lockout_after = 4, \
                          lockout_ms = 60000 }, per_source = { free_failures = 100, base_delay_ms = 1, max_delay_ms = 1, \
                          lockout_after = 1000, lockout_ms = 60000 } }";
    let config_arg = config.to_str().unwrap();
    let mut dev = ShoalDev::start_with(&[
        "--ldap-config",
        config_arg,
        "--login-throttle",
        login_throttle,
        "--auth-throttle",
        "off",
        "--session-ttl",
        "600",
    ])
    .await;

    // REST: each group's role, usable at once as a bearer token.
    let (status, alice) = dev.rest_login("alice", "alice-pw").await;
    assert_eq!((status, alice["role"].as_str()), (200, Some("admin")), "{alice}");
    let admin = alice["token"].as_str().unwrap().to_string();
    let (status, _, _) =
        dev.call(Some(&admin), Method::POST, "/v1/caches", Some(json!({"name": "ldap"})), &[]).await;
    assert_eq!(status, 201, "an LDAP admin creates caches");
    let (status, bob) = dev.rest_login("bob", "bob-pw").await;
    assert_eq!((status, bob["role"].as_str()), (200, Some("auditor")), "{bob}");
    let auditor = bob["token"].as_str().unwrap();
    let (status, _, _) = dev.call(Some(auditor), Method::GET, "/v1/audit", None, &[]).await;
    assert_eq!(status, 200);
    let (status, _, _) =
        dev.call(Some(auditor), Method::POST, "/v1/caches", Some(json!({"name": "no"})), &[]).await;
    assert_eq!(status, 403, "an auditor changes nothing");
    let (status, smith) = dev.rest_login("smith, john", "smith-pw").await;
    assert_eq!(
        (status, smith["role"].as_str(), smith["account_id"].as_str()),
        (200, Some("owner"), Some("a000000000000"))
    );
    let (status, _) = dev.rest_login("carol", "carol-pw").await;
    assert_eq!(status, 403, "no group, no REST role");

    // Refusals: wrong and empty passwords, unknown users, injection attempts.
    for (user, password) in [("alice", "bob-pw"), ("alice", ""), ("mallory", "x"), ("dup", "dup-pw")] {
        let (status, body) = dev.rest_login(user, password).await;
        assert_eq!(status, 401, "{user:?}/{password:?}: {body}");
        assert_eq!(body["detail"], "invalid username-password pair or user is disabled");
    }
    for user in INJECTIONS {
        for password in ["alice-pw", "*"] {
            let (status, body) = dev.rest_login(user, password).await;
            assert_eq!(status, 401, "{user:?}: {body}");
        }
    }

    // The gateway: cache roles come from groups on this cache (restart with them).
    let (_, cache) = dev.api(Method::POST, "/v1/caches", Some(json!({"name": "shop"}))).await;
    let id = cache["id"].as_str().unwrap().to_string();
    let (status, _) = dev
        .api(
            Method::POST,
            &format!("/v1/caches/{id}/users"),
            Some(json!({"username": "app", "passwords": [CACHE_PW], "access_string": "on ~* +@all"})),
        )
        .await;
    assert_eq!(status, 201);
    write_config(&config, &slapd, &slapd.ca_path(), Some(&id));
    dev.stop_with(libc::SIGTERM);
    dev.launch().await;
    let token = dev.mint_token(&id).await;

    assert_eq!(auth(&dev, &format!("alice@{id}"), "alice-pw").await, "+OK\r\n+PONG\r\n");
    let url = |user: &str, pw: &str| {
        format!("redis://{}%40{id}:{pw}@127.0.0.1:{}/", user.replace(' ', "%20"), dev.resp_port)
    };
    let mut rw = redis::Client::open(url("alice", "alice-pw"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut rw).await.unwrap();
    let mut ro =
        redis::Client::open(url("bob", "bob-pw")).unwrap().get_multiplexed_async_connection().await.unwrap();
    let v: String = redis::cmd("GET").arg("k").query_async(&mut ro).await.unwrap();
    assert_eq!(v, "v");
    let e = redis::cmd("SET").arg("k").arg("w").query_async::<()>(&mut ro).await.unwrap_err().to_string();
    assert!(e.contains("NOPERM"), "read-only: {e}");
    let e = redis::cmd("EVAL")
        .arg("return redis.call('set', 'k', 'w')")
        .arg(0)
        .query_async::<()>(&mut ro)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("NOPERM") || e.contains("EVAL"), "read-only inside a script: {e}");
    let v: String = redis::cmd("GET").arg("k").query_async(&mut rw).await.unwrap();
    assert_eq!(v, "v", "the read-only user wrote nothing");
    for (user, password) in
        [("carol", "carol-pw"), ("alice", "wrong"), ("alice", ""), ("smith, john", "smith-pw")]
    {
        let out = auth(&dev, &format!("{user}@{id}"), password).await;
        assert!(out.starts_with("-WRONGPASS invalid"), "{user:?}/{password:?}: {out}");
    }
    for user in INJECTIONS {
        let out = auth(&dev, &format!("{user}@{id}"), "alice-pw").await;
        assert!(out.starts_with("-WRONGPASS invalid"), "{user:?}: {out}");
    }

    // The directory goes down: LDAP logins fail closed with a clear error, the rest works.
    slapd.stop();
    let out = auth(&dev, &format!("alice@{id}"), "alice-pw").await;
    assert!(out.starts_with("-ERR the login directory (LDAP) is unavailable"), "{out}");
    let (status, body) = dev.rest_login("alice", "alice-pw").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("unavailable"), "{body}");
    assert_eq!(auth(&dev, "default", &token).await, "+OK\r\n+PONG\r\n", "tokens unaffected");
    assert_eq!(
        auth(&dev, &format!("app@{id}"), CACHE_PW).await,
        "+OK\r\n+PONG\r\n",
        "cache users unaffected"
    );
    let v: String = redis::cmd("GET").arg("k").query_async(&mut rw).await.unwrap();
    assert_eq!(v, "v", "open LDAP connections stay open");
    slapd.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while auth(&dev, &format!("alice@{id}"), "alice-pw").await != "+OK\r\n+PONG\r\n" {
        assert!(Instant::now() < deadline, "LDAP logins did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = dev.rest_login("alice", "alice-pw").await;
    assert_eq!(status, 200);

    // Throttling of REST logins: a lockout (429) even for the right password.
    for _ in 0..4 {
        let (status, _) = dev.rest_login("bob", "guess").await;
        assert_eq!(status, 401);
    }
    let (status, body) = dev.rest_login("bob", "bob-pw").await;
    assert_eq!(status, 429, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("too many failed attempts"), "{body}");

    // The audit trail: REST logins and data-plane logins, successes, failures, lockouts.
    let rest = audit(&dev, "action=auth.login").await;
    assert!(rest.iter().any(|r| r["actor"] == "ldap:alice" && r["outcome"] == "success"));
    assert!(rest.iter().any(|r| r["actor"] == "ldap:alice" && r["reason"] == "invalid_credentials"));
    assert!(rest.iter().any(|r| r["actor"] == "ldap:alice" && r["reason"] == "empty_password"));
    assert!(rest.iter().any(|r| r["reason"] == "unavailable"));
    assert!(rest.iter().any(|r| r["actor"] == "ldap:bob" && r["outcome"] == "lockout"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let data = audit(&dev, &format!("action=data.auth&cache_id={id}")).await;
        let found = data.iter().any(|r| r["actor"] == "ldap:alice" && r["outcome"] == "success")
            && data.iter().any(|r| r["actor"] == "ldap:carol" && r["reason"] == "no_role_on_cache")
            && data.iter().any(|r| r["details"]["mechanism"] == "ldap" && r["reason"] == "unavailable")
            // A NUL byte in a name is recorded, escaped (PostgreSQL stores no NUL in text).
            && data.iter().any(|r| r["actor"] == "ldap:alice\\u{0}" && r["reason"] == "invalid_input");
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "data-plane LDAP logins not audited: {data:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all = serde_json::to_string(&audit(&dev, "").await).unwrap();
    for secret in ["alice-pw", "bob-pw", CACHE_PW, testing::SERVICE_PW] {
        assert!(!all.contains(secret), "{secret} in the audit log");
    }

    // A CA that did not sign the server's certificate: nobody logs in (fail closed).
    write_config(&config, &slapd, &slapd.wrong_ca_path(), Some(&id));
    dev.stop_with(libc::SIGTERM);
    dev.launch().await;
    let (status, _) = dev.rest_login("alice", "alice-pw").await;
    assert_eq!(status, 503);
    let out = auth(&dev, &format!("alice@{id}"), "alice-pw").await;
    assert!(out.starts_with("-ERR the login directory (LDAP) is unavailable"), "{out}");

    // Deleting the cache leaves none of its ACL users: its own, its cache user's, the LDAP
    // roles' (found by name, not by listing every user on the node).
    let acl_users = || async {
        let mut all = Vec::new();
        for mut admin in dev.node_admins().await {
            let users: Vec<String> = redis::cmd("ACL").arg("USERS").query_async(&mut admin).await.unwrap();
            all.extend(users.into_iter().filter(|u| u.starts_with(&format!("t{id}"))));
        }
        all
    };
    assert!(acl_users().await.iter().any(|u| u.contains(".ldap.")), "{:?}", acl_users().await);
    let (status, _) = dev.api(Method::DELETE, &format!("/v1/caches/{id}"), None).await;
    assert_eq!(status, 204);
    assert_eq!(acl_users().await, Vec::<String>::new());
}

#[tokio::test]
async fn ldap_names_differing_only_in_case_are_counted_as_one() {
    let slapd = Slapd::start();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ldap.toml");
    write_config(&config, &slapd, &slapd.ca_path(), None);
    let throttle = "{ per_user = { free_failures = 1, base_delay_ms = 10, max_delay_ms = 20, lockout_after = 4, \
                    lockout_ms = 60000 }, per_source = { free_failures = 100, base_delay_ms = 1, max_delay_ms = 1, \
                    lockout_after = 1000, lockout_ms = 60000 } }";
    let dev = ShoalDev::start_with(&[
        "--ldap-config",
        config.to_str().unwrap(),
        "--login-throttle",
        throttle,
        "--auth-throttle",
        throttle,
    ])
    .await;
    // A directory matches names without case (and without surrounding spaces): these are
    // four guesses at one account, not one guess each at four.
    let variants = ["Zoë", "ZOË", " zoë ", "zOË"];
    for user in variants {
        let (status, body) = dev.rest_login(user, "guess").await;
        assert_eq!(status, 401, "{user:?}: {body}");
    }
    let (status, body) = dev.rest_login("ZoË", "guess").await;
    assert_eq!(status, 429, "{body}");
    // The same at the gateway.
    let (_, cache) = dev.api(Method::POST, "/v1/caches", Some(json!({"name": "cased"}))).await;
    let id = cache["id"].as_str().unwrap();
    for user in variants {
        let out = auth(&dev, &format!("{}@{id}", user.trim()), "guess").await;
        assert!(out.starts_with("-WRONGPASS invalid"), "{user:?}: {out}");
    }
    let out = auth(&dev, &format!("ZoË@{id}"), "guess").await;
    assert!(out.starts_with("-WRONGPASS too many failed attempts"), "{out}");
}

async fn create(dev: &ShoalDev, token: &str, name: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    dev.call(Some(token), Method::POST, "/v1/caches", Some(json!({"name": name})), &[]).await
}

#[tokio::test]
async fn owners_of_a_deleted_account_create_nothing() {
    let slapd = Slapd::start();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ldap.toml");
    write_config(&config, &slapd, &slapd.ca_path(), None);
    let mut dev = ShoalDev::start_with(&["--ldap-config", config.to_str().unwrap()]).await;
    let (status, account) = dev.api(Method::POST, "/v1/accounts", Some(json!({"name": "smiths"}))).await;
    assert_eq!(status, 201, "{account}");
    let account = account["id"].as_str().unwrap().to_string();
    write_config_owning(&config, &slapd, &slapd.ca_path(), None, &account);
    dev.stop_with(libc::SIGTERM);
    dev.launch().await;
    let key = dev.api_key(&account, "owner").await;
    let (status, smith) = dev.rest_login("smith, john", "smith-pw").await;
    assert_eq!(status, 200, "{smith}");
    let session = smith["token"].as_str().unwrap();
    let (status, _, cache) = create(&dev, session, "before").await;
    assert_eq!(status, 201, "{cache}");
    let cache_id = cache["id"].as_str().unwrap();
    let (status, _) = dev.api(Method::DELETE, &format!("/v1/caches/{cache_id}"), None).await;
    assert!(status < 300, "{status}");
    let (status, body) = dev.api(Method::DELETE, &format!("/v1/accounts/{account}"), None).await;
    assert_eq!(status, 204, "{body}");

    // The account's API keys and sessions stop working.
    for token in [session, key.as_str()] {
        let (status, _, body) = create(&dev, token, "after").await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, body) = dev
        .api(
            Method::POST,
            &format!("/v1/accounts/{account}/api-keys"),
            Some(json!({"name": "k", "role": "owner"})),
        )
        .await;
    assert_eq!(status, 404, "no new keys for a deleted account: {body}");
    // A new LDAP login as its owner is refused, saying why.
    let (status, body) = dev.rest_login("smith, john", "smith-pw").await;
    assert_eq!(status, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("was deleted"), "{body}");
    let (status, body) = dev.api(Method::GET, "/v1/caches", None).await;
    assert_eq!(status, 200);
    assert!(!body.to_string().contains("\"after\""), "{body}");
}

#[tokio::test]
async fn ldap_sessions_expire_and_without_ldap_the_login_route_says_so() {
    let slapd = Slapd::start();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ldap.toml");
    write_config(&config, &slapd, &slapd.ca_path(), None);
    let dev = ShoalDev::start_with(&["--ldap-config", config.to_str().unwrap(), "--session-ttl", "2"]).await;
    let (status, alice) = dev.rest_login("alice", "alice-pw").await;
    assert_eq!(status, 200, "{alice}");
    let token = alice["token"].as_str().unwrap();
    let (status, _, _) = dev.call(Some(token), Method::GET, "/v1/caches", None, &[]).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let (status, _, _) = dev.call(Some(token), Method::GET, "/v1/caches", None, &[]).await;
    assert_eq!(status, 401, "the session expired");

    let plain = ShoalDev::start().await;
    let (status, body) = plain.rest_login("alice", "alice-pw").await;
    assert_eq!(status, 404, "{body}");
}
