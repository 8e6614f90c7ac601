//! The production processes, each from its own config file: `shoal control-plane` and
//! `shoal gateway` as separate processes.

use crate::support::{free_port, Proc};
use redis::AsyncCommands;

#[tokio::test]
async fn control_plane_and_gateway_run_as_separate_processes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let (rest, resp, node, internal) = (free_port(), free_port(), free_port(), free_port());
    let cp_toml = crate::support::control_plane_toml(
        dir.path(),
        rest,
        node,
        &format!("public_endpoint = \"127.0.0.1:{resp}\"\ninternal_listen = \"127.0.0.1:{internal}\""),
    );
    let gw_toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:{resp}\"\ncontrol_plane_url = \"http://127.0.0.1:{internal}\"\n\
         internal_credential_file = \"{d}/gateway.credential\"\n"
    );
    std::fs::write(dir.path().join("cp.toml"), cp_toml).unwrap();
    std::fs::write(dir.path().join("gw.toml"), gw_toml).unwrap();
    let cp_path = dir.path().join("cp.toml");
    let _cp =
        Proc::spawn(&["control-plane", "--config", cp_path.to_str().unwrap()], &dir.path().join("cp.log"));
    let http = crate::support::http_client();
    crate::support::wait_for_control_plane(&http, rest, dir.path()).await;
    // The gateway's own credential, made on the control plane's machine.
    let credential = crate::support::create_gateway_credential(&cp_path, "gw-1");
    std::fs::write(dir.path().join("gateway.credential"), credential).unwrap();
    let gw_path = dir.path().join("gw.toml");
    let _gw = Proc::spawn(&["gateway", "--config", gw_path.to_str().unwrap()], &dir.path().join("gw.log"));

    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let cache = crate::support::admin_api(
        &http,
        rest,
        &admin,
        reqwest::Method::POST,
        "/v1/caches",
        Some(serde_json::json!({"name": "prod"})),
    )
    .await;
    assert_eq!(cache["endpoint"], format!("127.0.0.1:{resp}"));
    let tokens = format!("/v1/caches/{}/tokens", cache["id"].as_str().unwrap());
    let minted = crate::support::admin_api(&http, rest, &admin, reqwest::Method::POST, &tokens, None).await;
    let gw_log = || std::fs::read_to_string(dir.path().join("gw.log")).unwrap_or_default();
    let mut conn = crate::support::client_when_up(resp, minted["token"].as_str().unwrap(), gw_log).await;
    let _: () = conn.set("k", "v").await.unwrap();
    assert_eq!(conn.get::<_, String>("k").await.unwrap(), "v");

    // The internal API is not on the public port, and refuses callers without a credential.
    let path = format!("/internal/v1/routes/{}", cache["id"].as_str().unwrap());
    let route = http.get(format!("http://127.0.0.1:{rest}{path}")).send().await.unwrap();
    assert_eq!(route.status(), 404);
    let route = http.get(format!("http://127.0.0.1:{internal}{path}")).send().await.unwrap();
    assert_eq!(route.status(), 401);
}

#[test]
fn the_example_configs_in_deploy_parse() {
    #[derive(serde::Deserialize)]
    struct GatewayFile {
        gateway: shoal_gateway::GatewayConfig,
    }
    #[derive(serde::Deserialize)]
    struct ControlPlaneFile {
        control_plane: shoal_control_plane::ControlPlaneConfig,
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    let gw: GatewayFile =
        toml::from_str(&std::fs::read_to_string(format!("{dir}/gateway.toml")).unwrap()).unwrap();
    assert_eq!(gw.gateway.max_connections_per_cache, 1000);
    assert!(gw.gateway.tls_cert.is_some());
    // The internal API over TLS, with this gateway's own credential (in a file).
    assert!(gw.gateway.control_plane_url.starts_with("https://"), "{}", gw.gateway.control_plane_url);
    assert!(gw.gateway.control_plane_ca.is_some() && gw.gateway.internal_credential_file.is_some());
    assert!(gw.gateway.internal_token.is_none() && gw.gateway.internal_credential.is_empty());
    let cp: ControlPlaneFile =
        toml::from_str(&std::fs::read_to_string(format!("{dir}/control-plane.toml")).unwrap()).unwrap();
    assert_eq!(cp.control_plane.token_ttl_default, 900);
    assert_eq!(cp.control_plane.check_internal(), Ok(()), "TLS on, no shared token");
    assert!(cp.control_plane.internal_tls_cert.is_some());
    let plan = shoal_types::AccountId::parse("a0123456789ab").unwrap();
    let rates = cp.control_plane.billing.for_account(&plan).unwrap();
    assert_eq!(rates.per_million_ecpu.to_string(), "0.0018");
    assert_eq!(rates.per_gb_hour.to_string(), "0.084", "what the plan does not set comes from the defaults");
}
