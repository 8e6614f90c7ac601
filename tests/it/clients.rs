//! Real third-party clients through the gateway: redis-py (RESP2 and RESP3) and redis-cli.

use crate::support::shared;
use std::process::Command;

#[tokio::test]
async fn redis_py_and_redis_cli_sessions_work() {
    let dev = shared().await;
    let cache = dev.create_cache("py").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/quickstart.py");
    let out =
        Command::new("python3").arg(script).arg(dev.resp_port.to_string()).arg(&token).output().unwrap();
    assert!(out.status.success(), "redis-py session failed:\n{}", String::from_utf8_lossy(&out.stderr));

    // redis-cli, as in the README: AUTH with the token, then commands.
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-p", &dev.resp_port.to_string(), "--no-auth-warning", "-a", &token])
            .args(args)
            .output()
            .expect("redis-cli (Debian: redis-tools) is installed by scripts/setup.sh --test");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["SET", "cli-key", "from redis-cli"]), "OK");
    assert_eq!(cli(&["GET", "cli-key"]), "from redis-cli");
    assert_eq!(
        cli(&["GET", "greeting"]),
        "hello",
        "redis-py's key is visible to redis-cli in the same cache"
    );
}
