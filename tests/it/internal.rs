//! The internal API between gateways and the control plane (issue 16, "Internal API"): its
//! own listener, TLS, one credential per gateway, a throttled password check.

use crate::support::{auth, control_plane_toml, free_port, Proc, ShoalDev};
use redis::AsyncCommands;
use reqwest::Method;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `shoal <args>` to completion: (exit success, stdout, stderr).
fn run_shoal(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal")).args(args).stdin(Stdio::null()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a process from a config file that must refuse to start: its error output.
fn refused(kind: &str, toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([kind, "--config", path.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{kind} started with\n{toml}\n{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "refused only after {:?}", started.elapsed());
    stderr
}

/// A well-formed credential that no control plane issued.
const WELL_FORMED: &str = "sgw_edge-1_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn the_internal_api_is_not_served_on_the_public_port() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("hidden").await;
    let id = cache["id"].as_str().unwrap();
    let credential = dev.gateway_credential("probe").await;
    for (method, path, body) in [
        (Method::GET, format!("/internal/v1/routes/{id}"), None),
        (Method::POST, "/internal/v1/routes".to_string(), Some(json!({"ids": [id]}))),
        (Method::GET, "/internal/v1/revocations".to_string(), None),
        (
            Method::POST,
            format!("/internal/v1/caches/{id}/users/verify"),
            Some(json!({"username": "default", "password": "x", "source": "127.0.0.1"})),
        ),
        (
            Method::POST,
            "/internal/v1/usage".to_string(),
            Some(json!({"gateway_id": "g", "seq": 1, "usage": []})),
        ),
        (Method::POST, "/internal/v1/audit".to_string(), Some(json!([]))),
    ] {
        let (status, _, _) = dev.call(Some(&credential), method.clone(), &path, body.clone(), &[]).await;
        assert_eq!(status, 404, "{method} {path} on the public port");
        // The same call on the internal listener is served (the password check refuses the
        // unknown user; everything else succeeds).
        let mut req = dev.http.request(method.clone(), dev.internal_url(&path)).bearer_auth(&credential);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let served = status.is_success() || (path.ends_with("/verify") && text.contains("\"mechanism\""));
        assert!(served, "{method} {path} on the internal listener: {status} {text}");
    }
    // The signing keys are public: on both.
    let (status, jwks) = dev.api(Method::GET, "/.well-known/jwks.json", None).await;
    assert_eq!(status, 200, "{jwks}");
    let internal: Value =
        dev.http.get(dev.internal_url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(internal, jwks);
}

#[test]
fn placeholder_short_and_shared_secrets_are_refused_at_start() {
    // The gateway: a placeholder, a short secret, no credential at all.
    let gateway = |credential: &str| {
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{}\"\ncontrol_plane_url = \"http://127.0.0.1:{}\"\n{credential}\n",
            free_port(),
            free_port()
        )
    };
    let err = refused("gateway", &gateway("internal_credential = \"change-me\""));
    assert!(err.contains("placeholder") && err.contains("shoal admin gateway create"), "{err}");
    let err = refused("gateway", &gateway("internal_credential = \"sgw_edge-1_0123456789abcdef\""));
    assert!(err.contains("too short") && err.contains("shoal admin gateway create"), "{err}");
    let err = refused("gateway", &gateway(""));
    assert!(err.contains("internal_credential") && err.contains("shoal admin gateway create"), "{err}");
    // The one shared token of old is gone, whatever its value.
    let err = refused(
        "gateway",
        &gateway(&format!("internal_token = \"change-me\"\ninternal_credential = \"{WELL_FORMED}\"")),
    );
    assert!(err.contains("internal_token") && err.contains("shoal admin gateway create"), "{err}");
    // From a file too.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credential");
    std::fs::write(&file, "changeme\n").unwrap();
    let err = refused("gateway", &gateway(&format!("internal_credential_file = \"{}\"", file.display())));
    assert!(err.contains("placeholder"), "{err}");

    // The control plane: the shipped `internal_token = "change-me"` (or any shared token).
    let dir = tempfile::tempdir().unwrap();
    let err = refused(
        "control-plane",
        &control_plane_toml(dir.path(), free_port(), free_port(), "internal_token = \"change-me\""),
    );
    assert!(err.contains("internal_token") && err.contains("shoal admin gateway create"), "{err}");
}

#[test]
fn plain_http_for_the_internal_api_is_refused_off_loopback() {
    // A control plane whose internal listener is reachable from other machines needs TLS.
    let dir = tempfile::tempdir().unwrap();
    let err = refused(
        "control-plane",
        &control_plane_toml(
            dir.path(),
            free_port(),
            free_port(),
            &format!("internal_listen = \"0.0.0.0:{}\"", free_port()),
        ),
    );
    assert!(err.contains("internal_tls_cert") && err.contains("loopback"), "{err}");
    // A gateway talking plain HTTP to another machine (refused before it sends anything).
    let toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:{}\"\ncontrol_plane_url = \"http://10.11.12.13:8081\"\n\
         internal_credential = \"{WELL_FORMED}\"\n",
        free_port()
    );
    let err = refused("gateway", &toml);
    assert!(err.contains("https://") && err.contains("loopback"), "{err}");
}

/// `shoal control-plane` with its internal API over TLS and a `shoal gateway` that trusts
/// its certificate: a client's SET/GET works through them; plain HTTP to the internal port
/// gets no answer.
#[tokio::test]
async fn gateway_and_control_plane_talk_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (cert, key) = shoal_gateway::tls::ensure_self_signed(&d.join("tls")).unwrap();
    let (rest, internal, resp) = (free_port(), free_port(), free_port());
    let cp_toml = control_plane_toml(
        d,
        rest,
        free_port(),
        &format!(
            "public_endpoint = \"127.0.0.1:{resp}\"\ninternal_listen = \"127.0.0.1:{internal}\"\n\
             internal_tls_cert = \"{}\"\ninternal_tls_key = \"{}\"",
            cert.display(),
            key.display()
        ),
    );
    std::fs::write(d.join("cp.toml"), &cp_toml).unwrap();
    let cp_path = d.join("cp.toml");
    let cp_path = cp_path.to_str().unwrap();
    let _cp = Proc::spawn(&["control-plane", "--config", cp_path], &d.join("cp.log"));
    let http = crate::support::http_client();
    crate::support::wait_for_control_plane(&http, rest, d).await;
    // The operator makes the gateway's credential on the control plane's machine.
    let (ok, credential, err) = run_shoal(&["admin", "gateway", "create", "edge-1", "--config", cp_path]);
    assert!(ok, "{err}");
    let credential = credential.trim();
    std::fs::write(d.join("gateway.credential"), format!("{credential}\n")).unwrap();
    let gw_toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:{resp}\"\ncontrol_plane_url = \"https://localhost:{internal}\"\n\
         control_plane_ca = \"{}\"\ninternal_credential_file = \"{}\"\n",
        cert.display(),
        d.join("gateway.credential").display()
    );
    std::fs::write(d.join("gw.toml"), gw_toml).unwrap();
    let _gw = Proc::spawn(&["gateway", "--config", d.join("gw.toml").to_str().unwrap()], &d.join("gw.log"));

    let admin = std::fs::read_to_string(d.join("admin.token")).unwrap();
    let cache = crate::support::admin_api(
        &http,
        rest,
        &admin,
        Method::POST,
        "/v1/caches",
        Some(json!({"name": "over-tls"})),
    )
    .await;
    let tokens = format!("/v1/caches/{}/tokens", cache["id"].as_str().unwrap());
    let minted = crate::support::admin_api(&http, rest, &admin, Method::POST, &tokens, None).await;
    let gw_log = || std::fs::read_to_string(d.join("gw.log")).unwrap_or_default();
    let mut conn = crate::support::client_when_up(resp, minted["token"].as_str().unwrap(), gw_log).await;
    let _: () = conn.set("k", "over tls").await.unwrap();
    assert_eq!(conn.get::<_, String>("k").await.unwrap(), "over tls");

    // Plain HTTP to the internal port: no answer (the listener speaks TLS only).
    let plain = http
        .get(format!("http://127.0.0.1:{internal}/internal/v1/revocations"))
        .bearer_auth(credential)
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    // Over TLS, with the credential: served.
    let tls = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://localhost:{internal}/internal/v1/revocations");
    assert_eq!(tls.get(&url).bearer_auth(credential).send().await.unwrap().status(), 200);
    assert_eq!(tls.get(&url).send().await.unwrap().status(), 401);
}

#[tokio::test]
async fn gateway_credentials_are_listed_audited_and_stop_working_once_deleted() {
    let dev = ShoalDev::start().await;
    let credential = dev.gateway_credential("edge-2").await;
    let revocations = |credential: Option<String>| {
        let mut req = dev.http.get(dev.internal_url("/internal/v1/revocations"));
        if let Some(c) = credential {
            req = req.bearer_auth(c);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(revocations(Some(credential.clone())).await, 200);
    assert_eq!(revocations(None).await, 401);
    // Another gateway's name with this secret is no credential.
    let renamed = credential.replacen("edge-2", "edge-3", 1);
    assert_eq!(revocations(Some(renamed)).await, 401);
    // The name is taken; names are checked.
    let (status, _) = dev.api(Method::POST, "/v1/gateways", Some(json!({"name": "edge-2"}))).await;
    assert_eq!(status, 409);
    let (status, _) = dev.api(Method::POST, "/v1/gateways", Some(json!({"name": "Edge_2!"}))).await;
    assert_eq!(status, 400);
    // Listed without the secret.
    let (status, list) = dev.api(Method::GET, "/v1/gateways", None).await;
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> =
        list["items"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"edge-2"), "{list}");
    assert!(!list.to_string().contains(&credential[credential.len() - 64..]), "{list}");
    // Owners may not make gateways.
    let (_, owner) = dev.account_with_key("tenant", "owner").await;
    let (status, _, _) =
        dev.call(Some(&owner), Method::POST, "/v1/gateways", Some(json!({"name": "rogue"})), &[]).await;
    assert_eq!(status, 403);

    let (status, _) = dev.api(Method::DELETE, "/v1/gateways/edge-2", None).await;
    assert_eq!(status, 204);
    assert_eq!(revocations(Some(credential)).await, 401, "a deleted credential stops working at once");
    let (status, _) = dev.api(Method::DELETE, "/v1/gateways/edge-2", None).await;
    assert_eq!(status, 404);
    let (status, audit) = dev.api(Method::GET, "/v1/audit?limit=500&target=edge-2", None).await;
    assert_eq!(status, 200, "{audit}");
    let actions: Vec<&str> =
        audit["items"].as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert!(actions.contains(&"gateway.create") && actions.contains(&"gateway.delete"), "{audit}");
    // The embedded gateway of `shoal dev` has its own credential and keeps working.
    let cache = dev.create_cache("still-served").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let mut conn = dev.client(&token).await.unwrap();
    let _: () = conn.set("k", "v").await.unwrap();
}

/// What the control plane stores for one gateway cannot be written by another: usage batches
/// and login events carry the name of the credential that posted them, and two gateways'
/// batches with the same `(gateway_id, seq)` are two batches.
#[tokio::test]
async fn a_gateway_cannot_post_usage_or_audit_records_as_another() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("metered").await;
    let id = cache["id"].as_str().unwrap();
    let honest = dev.gateway_credential("honest").await;
    let forger = dev.gateway_credential("forger").await;
    let minute = {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        now - now % 60 - 3600
    };
    let batch = |commands: u64| {
        json!({"gateway_id": "honest-instance", "seq": 1, "usage": [{"cache_id": id, "minute": minute,
            "commands": commands, "ecpu_milli": commands * 1000, "bytes_in": 1, "bytes_out": 1, "hits": 0,
            "misses": 0, "throttled": 0, "errors": 0}]})
    };
    let post = |credential: &str, path: &str, body: Value| {
        dev.http.post(dev.internal_url(path)).bearer_auth(credential).json(&body).send()
    };
    let stored = |resp: reqwest::Response| async move {
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap()["stored"].as_bool().unwrap()
    };
    // The forger posts first, naming the honest gateway's instance and sequence number.
    assert!(stored(post(&forger, "/internal/v1/usage", batch(7)).await.unwrap()).await);
    // The honest gateway's own batch is still stored (not a "duplicate" of the forged one).
    assert!(stored(post(&honest, "/internal/v1/usage", batch(5)).await.unwrap()).await);
    assert!(
        !stored(post(&honest, "/internal/v1/usage", batch(5)).await.unwrap()).await,
        "a resend counts once"
    );
    let batches = dev.sql("SELECT gateway_id FROM usage_batches ORDER BY gateway_id");
    assert_eq!(batches, vec!["forger/honest-instance", "honest/honest-instance"]);

    // Login events: stamped with the poster's name, whatever the body says.
    let event = json!([{"at": "2026-01-01T00:00:00Z", "gateway_id": "honest", "source": "192.0.2.9",
        "username": "forged-user", "cache_id": id, "mechanism": "cache-user", "outcome": "success",
        "reason": ""}]);
    let resp = post(&forger, "/internal/v1/audit", event).await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let (status, audit) = dev.api(Method::GET, "/v1/audit?limit=500&action=data.auth", None).await;
    assert_eq!(status, 200);
    let forged: Vec<&Value> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["actor"] == "cache-user:forged-user")
        .collect();
    assert_eq!(forged.len(), 1, "{audit}");
    assert_eq!(forged[0]["details"]["gateway"], "forger", "{}", forged[0]);
}

/// The password check gateways ask for is throttled per (user, source): a flood of wrong
/// passwords from one source is locked out (429), the same user from another source still
/// logs in, and the gateway turns the control plane's lockout into its own refusal.
#[tokio::test]
async fn the_password_check_is_throttled_per_user_and_source() {
    let policy = "{ per_user = { free_failures = 1, base_delay_ms = 1, max_delay_ms = 1, lockout_after = 3, \
                  lockout_ms = 60000 }, per_source = { free_failures = 100, base_delay_ms = 1, max_delay_ms = 1, \
                  lockout_after = 1000, lockout_ms = 60000 } }";
    let dev = ShoalDev::start_with(&["--auth-throttle", policy]).await;
    let cache = dev.create_cache("guarded").await;
    let id = cache["id"].as_str().unwrap();
    let password = "Correct-Horse-Battery-9";
    let (status, body) = dev
        .api(
            Method::POST,
            &format!("/v1/caches/{id}/users"),
            Some(json!({"username": "alice", "passwords": [password], "access_string": "on ~* +@all"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let credential = dev.gateway_credential("checker").await;
    let verify = |password: &str, source: &str| {
        dev.http
            .post(dev.internal_url(&format!("/internal/v1/caches/{id}/users/verify")))
            .bearer_auth(&credential)
            .json(&json!({"username": "alice", "password": password, "source": source}))
            .send()
    };
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(verify("guess", "192.0.2.1").await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, vec![401, 401, 401, 429, 429]);
    let locked = verify(password, "192.0.2.1").await.unwrap();
    assert_eq!(locked.status(), 429, "even the right password, from the flooding source");
    let retry: u64 = locked.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(verify(password, "192.0.2.2").await.unwrap().status(), 200, "another source still logs in");
    // Without a source the check is refused.
    let resp = dev
        .http
        .post(dev.internal_url(&format!("/internal/v1/caches/{id}/users/verify")))
        .bearer_auth(&credential)
        .json(&json!({"username": "alice", "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // A local client's source is 127.0.0.1: locked at the control plane, the gateway (whose
    // own counts are clean) refuses the login as locked out.
    for _ in 0..3 {
        verify("guess", "127.0.0.1").await.unwrap();
    }
    let answer = auth(&dev, &format!("alice@{id}"), password).await;
    assert!(answer.starts_with("-WRONGPASS too many failed attempts"), "{answer}");
}

#[tokio::test]
async fn the_terminal_shows_no_internal_polling_but_shows_refused_internal_requests() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("quiet").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let mut c = dev.client(&token).await.unwrap();
    let _: () = c.set("k", "v").await.unwrap();
    // Several seconds of the gateway polling revocations, limits and posting usage.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = dev.log();
    // (A refused or failed internal request is logged at warn; only successes are quiet.)
    let succeeded = |l: &&str| {
        let status = l.split("\" ").nth(1).and_then(|rest| rest.split(' ').next());
        status.is_some_and(|s| s.starts_with('2') || s.starts_with('3'))
    };
    let internal: Vec<&str> =
        log.lines().filter(|l| l.contains("/internal/v1/") || l.contains("jwks")).filter(succeeded).collect();
    assert!(internal.is_empty(), "internal polling in the default log:\n{}", internal.join("\n"));
    assert!(log.contains("\"POST /v1/caches"), "the public API's requests are still logged");
    // A refused internal request is logged.
    let refused = reqwest::Client::new()
        .get(dev.internal_url("/internal/v1/revocations"))
        .bearer_auth(WELL_FORMED)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let log = dev.log();
    assert!(log.lines().any(|l| l.contains("GET /internal/v1/revocations") && l.contains("401")), "{log}");
}
