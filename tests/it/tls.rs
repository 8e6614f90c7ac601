//! The RESP endpoint over TLS: a verifying client, and certificate reload on SIGHUP.

use crate::support::ShoalDev;
use std::process::Command;

fn tls_session(dev: &ShoalDev, token: &str, cafile: &std::path::Path) -> i32 {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/tls.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(dev.tls_port.to_string())
        .arg(token)
        .arg(cafile)
        .output()
        .unwrap();
    if !matches!(out.status.code(), Some(0) | Some(3)) {
        panic!("{}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.code().unwrap()
}

#[tokio::test]
async fn tls_clients_verify_the_certificate_and_sighup_reloads_it() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("secure").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let tls_dir = dev.dir.join(".shoal/tls");
    let original = dev.dir.join("original-cert.pem");
    std::fs::copy(tls_dir.join("cert.pem"), &original).unwrap();
    assert_eq!(tls_session(&dev, &token, &original), 0, "TLS session with the dev certificate");

    // Replace the certificate and reload: new connections get the new one.
    std::fs::remove_file(tls_dir.join("cert.pem")).unwrap();
    std::fs::remove_file(tls_dir.join("key.pem")).unwrap();
    let renewed = tempfile::tempdir().unwrap();
    let (cert, key) = shoal_gateway::tls::ensure_self_signed(renewed.path()).unwrap();
    std::fs::copy(&cert, tls_dir.join("cert.pem")).unwrap();
    std::fs::copy(&key, tls_dir.join("key.pem")).unwrap();
    dev.signal(libc::SIGHUP);
    let mut reloaded = false;
    for _ in 0..50 {
        if tls_session(&dev, &token, &cert) == 0 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(reloaded, "the renewed certificate was not served after SIGHUP");
    assert_eq!(tls_session(&dev, &token, &original), 3, "the old certificate is no longer served");
}
