//! The admin portal end to end: the real `shoal dev`, traffic through the gateway, then
//! headless Chromium (Debian's `chromium`, driven by playwright-core from
//! `tests/portal/node_modules`, installed by `scripts/setup.sh --test`) logs in and uses it.
//! Screenshots are kept in `target/portal-screenshots/`. A second test logs in with a
//! directory account against a real slapd.

use crate::support::ShoalDev;
use redis::AsyncCommands;
use reqwest::Method;
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn screenshot_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp: keep the screenshots beside it.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("portal-screenshots")
}

#[tokio::test(flavor = "multi_thread")]
async fn portal_in_headless_chromium() {
    // With a small cluster pool (the default) beside `main`, for the pools page.
    let dev = ShoalDev::start_cluster(2, 0, &[]).await;

    // An account with an owner (who creates the cache) and an auditor.
    let (account, owner) = dev.account_with_key("acme", "owner").await;
    let auditor = dev.api_key(&account, "auditor").await;
    // On the standalone pool: RESP traffic to cluster caches is the gateway's to route.
    let body = json!({"name": "shop", "pool": "main"});
    let (status, _, cache) = dev.call(Some(&owner), Method::POST, "/v1/caches", Some(body), &[]).await;
    assert_eq!(status, 201, "{cache}");
    let cache_id = cache["id"].as_str().unwrap().to_string();
    // A cache of another account (the platform's), which acme's auditor must not see.
    dev.create_cache("platform-only").await;

    // The portal knows who is logged in.
    let (status, _, me) = dev.call(Some(&auditor), Method::GET, "/v1/me", None, &[]).await;
    assert_eq!(status, 200);
    assert_eq!((me["role"].as_str(), me["can_write"].as_bool()), (Some("auditor"), Some(false)), "{me}");
    assert_eq!(me["account_id"].as_str(), Some(account.as_str()));

    // Traffic through the gateway: writes, hits and misses. The connection stays open until
    // the browser is done (the connections chart plots it).
    let token = dev.mint_token(&cache_id).await;
    let mut conn = dev.client(&token).await.unwrap();
    for i in 0..200 {
        let _: () = conn.set(format!("item:{i}"), "x".repeat(100)).await.unwrap();
    }
    for i in 0..300 {
        let _: Option<String> = conn.get(format!("item:{i}")).await.unwrap();
    }

    // Wait until the gateway's batches have reached the usage API.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, usage) = dev.api(Method::GET, &format!("/v1/caches/{cache_id}/usage"), None).await;
        assert_eq!(status, 200, "{usage}");
        let commands: u64 =
            usage["points"].as_array().unwrap().iter().map(|p| p["commands"].as_u64().unwrap()).sum();
        if commands >= 500 {
            break;
        }
        assert!(Instant::now() < deadline, "usage did not arrive: {usage}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A draft invoice bills the minutes that have ended: let this one end.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    tokio::time::sleep(Duration::from_secs(61 - now % 60)).await;

    let shots = screenshot_dir();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/portal/e2e.mjs");
    let out = Command::new("node")
        .arg(script)
        .arg(dev.url(""))
        .arg(dev.admin_token())
        .arg("shop")
        .arg(&auditor)
        .arg(&shots)
        .arg("platform-only")
        .arg("acme")
        .output()
        .expect("node runs (scripts/setup.sh --test installs it)");
    drop(conn);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser test failed; screenshots in {}", shots.display());
    assert!(stdout.contains("PORTAL E2E PASSED"));
    for name in [
        "01-overview.png",
        "02-cache.png",
        "04-billing.png",
        "05-audit.png",
        "05b-pools.png",
        "06-phone-cache.png",
    ] {
        let len = std::fs::metadata(shots.join(name)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 10_000, "screenshot {name} is missing or empty");
    }
}

/// Logging in with a directory account (search+bind over StartTLS against a real slapd):
/// a wrong password is refused with a message, bob of the auditors group gets in as an
/// auditor.
#[tokio::test(flavor = "multi_thread")]
async fn portal_directory_login_in_headless_chromium() {
    use shoal_auth::testing::{self, Slapd};
    let slapd = Slapd::start();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ldap.toml");
    std::fs::write(
        &config,
        format!(
            r#"url = "{url}"
starttls = true
ca_cert = "{ca}"
groups = "member-of"
mode = {{ search = {{ bind_dn = "{bind_dn}", bind_password = "{bind_pw}", base = "{base}", filter = "(&(objectClass=inetOrgPerson)(uid={{user}}))" }} }}
roles = [ {{ group = "cn=auditors,{groups}", role = "auditor" }} ]
"#,
            url = slapd.url(),
            ca = slapd.ca_path().display(),
            bind_dn = testing::SERVICE_DN,
            bind_pw = testing::SERVICE_PW,
            base = testing::BASE,
            groups = testing::GROUPS_BASE,
        ),
    )
    .unwrap();
    let dev = ShoalDev::start_with(&["--ldap-config", config.to_str().unwrap()]).await;
    let shots = screenshot_dir();
    let out = Command::new("node")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/portal/login.mjs"))
        .arg(dev.url(""))
        .args(["bob", "bob-pw", "auditor"])
        .arg(&shots)
        .output()
        .expect("node runs (scripts/setup.sh --test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("PORTAL LOGIN PASSED"),
        "the directory login test failed"
    );
}
