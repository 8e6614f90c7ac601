//! The REST API fuzzed over a real socket (schemathesis is an outside client); the rest of
//! the REST tests run in-process in `control-plane/tests/rest/`.

use crate::support::ShoalDev;
use reqwest::Method;
use serde_json::json;

/// schemathesis (PyPI) against the running control plane: no 5xx, every response matches
/// the OpenAPI document (status, content type, schema), and no route ignores authentication.
#[tokio::test]
async fn schemathesis_finds_no_server_errors_schema_mismatches_or_ignored_auth() {
    let dev = ShoalDev::start().await;
    let (_, owner) = dev.account_with_key("fuzzed", "owner").await;
    let (status, _, _) =
        dev.call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": "fuzz-target"})), &[]).await;
    assert_eq!(status, 201);
    let out = tokio::process::Command::new("schemathesis")
        .arg("run")
        .arg(dev.url("/openapi.json"))
        .args(["-H", &format!("Authorization: Bearer {}", dev.admin_token())])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,ignored_auth",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-examples",
            "25",
            "--seed",
            "20261123",
            "--workers",
            "2",
        ])
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("schemathesis is installed (scripts/setup.sh --test)");
    let report = String::from_utf8_lossy(&out.stdout);
    // A 5xx says only "internal error" to the client; the cause is in the platform's log.
    let log = dev.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}\nthe platform's errors:\n{}",
        String::from_utf8_lossy(&out.stderr),
        errors.join("\n")
    );
    assert!(report.contains("passed"), "{report}");
}
