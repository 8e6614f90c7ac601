//! Limits and bad input at the RESP endpoint: each refused with a clear error, nothing else
//! disturbed.

use crate::support::{auth_command, encode, raw, Proc, ShoalDev, Split};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn read_some(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[tokio::test]
async fn connection_limits_and_timeouts() {
    let dev = ShoalDev::start_with(&[
        "--max-connections-per-cache",
        "2",
        "--max-unauthenticated",
        "3",
        "--auth-timeout",
        "1",
        "--idle-timeout",
        "1",
        "--max-bulk-bytes",
        "1048576",
    ])
    .await;
    let cache = dev.create_cache("limited").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;

    // Per-cache connection cap: the third connection of the cache is refused.
    let c1 = dev.client(&token).await.unwrap();
    let c2 = dev.client(&token).await.unwrap();
    let out = raw(dev.resp_port, &auth_command(&token)).await;
    assert_eq!(out, b"-ERR max number of clients reached for this cache\r\n");
    drop((c1, c2));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Unauthenticated connections: at most 3 at once; a fourth is refused at the door.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = raw(dev.resp_port, b"PING\r\n").await;
    assert_eq!(out, b"-ERR max number of unauthenticated clients reached\r\n");
    // ...and they are closed when they do not authenticate in time.
    let out = read_some(&mut idle[0]).await;
    let out = if out.is_empty() { read_some(&mut idle[0]).await } else { out };
    assert_eq!(out, b"-ERR authentication timed out\r\n");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Idle timeout: an authenticated connection that sends nothing is closed.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    s.write_all(&auth_command(&token)).await.unwrap();
    assert_eq!(read_some(&mut s).await, b"+OK\r\n");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "idle connection still open");

    // A bulk string above the configured maximum is a protocol error, checked before the
    // payload arrives; the connection closes and nothing is stored.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    s.write_all(&auth_command(&token)).await.unwrap();
    s.write_all(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$2097152\r\n").await.unwrap();
    let out = read_some(&mut s).await;
    assert_eq!(out, b"+OK\r\n-ERR Protocol error: invalid bulk length\r\n");
    let mut c = dev.client(&token).await.unwrap();
    let got: Option<String> = redis::cmd("GET").arg("big").query_async(&mut c).await.unwrap();
    assert_eq!(got, None);
}

#[tokio::test]
async fn malformed_resp_gets_valkeys_protocol_error_and_the_connection_closes() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("bad-input").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let auth = auth_command(&token);
    for (input, expected) in [
        (&b"*1\r\n+PING\r\n"[..], "-ERR Protocol error: expected '$', got '+'\r\n"),
        (b"*2\r\n$3\r\nGET\r\n$-7\r\n", "-ERR Protocol error: invalid bulk length\r\n"),
        (b"*abc\r\n", "-ERR Protocol error: invalid multibulk length\r\n"),
        (b"*1\r\n$4\r\nPINGxx\r\n", "-ERR Protocol error: invalid bulk format\r\n"),
        (b"SET k \"unterminated\r\n", "-ERR Protocol error: unbalanced quotes in request\r\n"),
    ] {
        let out = raw(dev.resp_port, &[auth.as_slice(), input, b"PING\r\n"].concat()).await;
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("+OK\r\n{expected}"),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
    // Inline commands with quotes and escapes work like valkey-cli's.
    let out = raw(dev.resp_port, &[auth.as_slice(), b"SET q \"a\\x41 b\"\r\nGET q\r\n"].concat()).await;
    assert_eq!(out, b"+OK\r\n+OK\r\n$4\r\naA b\r\n");
}

/// The first gateway and two more, each with its port (three `shoal gateway` processes).
fn three_gateways(split: &Split) -> Vec<(Proc, u16)> {
    let mut gateways = vec![(split.gateway(), split.resp)];
    gateways.extend((1..3).map(|n| split.another_gateway(n)));
    gateways
}

/// A cache made with `body`, and a token for it.
async fn cache_and_token(split: &Split, body: serde_json::Value) -> (String, String) {
    let cache = split.api(reqwest::Method::POST, "/v1/caches", Some(body)).await;
    let id = cache["id"].as_str().unwrap().to_string();
    let minted = split.api(reqwest::Method::POST, &format!("/v1/caches/{id}/tokens"), None).await;
    (id, minted["token"].as_str().unwrap().to_string())
}

/// A cache's limits hold for the cache as a whole across gateways: three `shoal gateway`s
/// in front of one control plane, driven flat out, get the cache's ECPU/s between them
/// (`SHOAL_SHARED_LIMIT=<ECPU/s>,<seconds>` for the figure in docs/limits.md, from `bench/`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ecpu_limit_holds_across_three_gateways() {
    let (limit, seconds): (u64, u64) = match std::env::var("SHOAL_SHARED_LIMIT") {
        Ok(v) => {
            let (l, s) = v.split_once(',').expect("<ECPU/s>,<seconds>");
            (l.parse().unwrap(), s.parse().unwrap())
        }
        Err(_) => (300, 8),
    };
    // No waiting for the bucket: a command over the limit is refused at once, so the
    // refusals show the clients asked for more than the limit.
    let split = Split::with_config("", "throttle_wait = 0\n");
    let _cp = split.control_plane().await;
    let gateways = three_gateways(&split);
    let (_, token) =
        cache_and_token(&split, serde_json::json!({"name": "shared", "limits": {"ecpu_per_second": limit}}))
            .await;

    // Two clients per gateway, each sending GETs (1 ECPU each) as fast as answers come.
    let (ok, throttled) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut per_gateway_throttled = Vec::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (_, port) in &gateways {
        let here = Arc::new(AtomicU64::new(0));
        per_gateway_throttled.push(here.clone());
        for _ in 0..2 {
            let mut c = split.client_at(*port, &token).await;
            let (ok, throttled, here, stopped) =
                (ok.clone(), throttled.clone(), here.clone(), stopped.clone());
            tasks.push(tokio::spawn(async move {
                while !*stopped.borrow() {
                    match redis::cmd("GET").arg("k").query_async::<Option<String>>(&mut c).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) if e.code() == Some("THROTTLED") => {
                            here.fetch_add(1, Ordering::Relaxed);
                            throttled.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => panic!("{e}"),
                    };
                }
            }));
        }
    }
    // Shares settle within a few reports; then the window is measured.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok0, started) = (ok.load(Ordering::Relaxed), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let rate = (ok.load(Ordering::Relaxed) - ok0) as f64 / started.elapsed().as_secs_f64();
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let busy = per_gateway_throttled.iter().filter(|n| n.load(Ordering::Relaxed) > 0).count();
    println!(
        "FIGURE shared limit: a cache limited to {limit} ECPU/s, driven flat out through 3 gateways, \
         got {rate:.0} ECPU/s over {seconds} s ({:.3} × the limit; {} commands throttled)",
        rate / limit as f64,
        throttled.load(Ordering::Relaxed)
    );
    assert_eq!(busy, 3, "every gateway was asked for more than it could give");
    assert!(
        (0.9..=1.1).contains(&(rate / limit as f64)),
        "{rate:.0} ECPU/s for a limit of {limit}\n{}",
        split.log()
    );
}

/// Connections over a cache's `max_connections` are refused on whichever gateway, and the
/// limit is reached whichever gateways the clients use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_limit_holds_across_three_gateways() {
    let split = Split::new();
    let _cp = split.control_plane().await;
    let gateways = three_gateways(&split);
    let (_, token) =
        cache_and_token(&split, serde_json::json!({"name": "few", "limits": {"max_connections": 4}})).await;
    for (_, port) in &gateways {
        // Every gateway is up (and has served the cache once).
        drop(split.client_at(*port, &token).await);
    }
    // Clients keep trying every gateway in turn for a while; what they hold in the end is
    // the limit, however the gateways' shares moved meanwhile.
    // A connection is a logged-in socket (raw, to read the gateway's refusal).
    let connect = |port: u16| {
        let login = auth_command(&token);
        async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            s.write_all(&login).await.unwrap();
            let reply = String::from_utf8_lossy(&read_some(&mut s).await).into_owned();
            match reply.as_str() {
                "+OK\r\n" => Ok(s),
                _ => Err(reply),
            }
        }
    };
    let mut held = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    let mut refusals = 0;
    while std::time::Instant::now() < deadline {
        for (_, port) in &gateways {
            match connect(*port).await {
                Ok(c) => held.push((*port, c)),
                Err(e) => {
                    assert!(e.contains("max number of clients"), "{e}");
                    refusals += 1;
                }
            }
            assert!(held.len() <= 4, "{} connections held for a limit of 4\n{}", held.len(), split.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(held.len(), 4, "the limit is reached ({refusals} refusals)");
    assert!(refusals > 0);
    // Two go; the next two connect, on whichever gateway.
    let freed_on = held[0].0;
    held.drain(..2);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while held.len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "freed connections were never given again\n{}",
            split.log()
        );
        for (_, port) in gateways.iter().filter(|g| g.1 != freed_on) {
            if let Ok(c) = connect(*port).await {
                held.push((*port, c));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    for (_, port) in &gateways {
        assert!(connect(*port).await.is_err(), "a fifth connection on port {port}");
    }
}

/// Failed password logins count for a user wherever they are tried: the control plane
/// checks passwords for every gateway and throttles per (user, source), so failures spread
/// over three gateways lock the user out on all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_on_three_gateways_lock_a_user_out_on_all() {
    // Only the control plane's throttle: 4 failures lock a (user, source) out.
    let split = Split::with_config(
        "verify_throttle = { per_user = { free_failures = 10, base_delay_ms = 0, max_delay_ms = 0, lockout_after = 4, lockout_ms = 60000 } }",
        "auth_throttle = { enabled = false }\n",
    );
    let _cp = split.control_plane().await;
    let gateways = three_gateways(&split);
    let (id, _) = cache_and_token(&split, serde_json::json!({"name": "guarded"})).await;
    let user = serde_json::json!({"username": "app", "passwords": ["correct-horse-battery-1"], "access_string": "on ~* +@all"});
    split.api(reqwest::Method::POST, &format!("/v1/caches/{id}/users"), Some(user)).await;
    let login = |port: u16, password: &str| {
        let cmd = encode(&["AUTH", &format!("app@{id}"), password]);
        async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            s.write_all(&cmd).await.unwrap();
            String::from_utf8_lossy(&read_some(&mut s).await).into_owned()
        }
    };
    let ports: Vec<u16> = gateways.iter().map(|g| g.1).collect();
    each_takes_the_right_password(&split, &ports, |port| login(port, "correct-horse-battery-1")).await;
    // Two wrong passwords on each of two gateways: 4 failures in all, none twice the limit
    // on one gateway.
    for &port in &ports[..2] {
        for _ in 0..2 {
            let wrong = login(port, "wrong-password").await;
            assert!(wrong.starts_with("-WRONGPASS"), "{wrong}");
        }
    }
    // Locked out on every gateway, the third included, even with the right password.
    for &port in &ports {
        let locked = login(port, "correct-horse-battery-1").await;
        assert!(locked.contains("too many failed attempts"), "port {port}: {locked}");
    }
}

/// Waits until every gateway on `ports` is up and `login` (with the right password) works.
async fn each_takes_the_right_password<F, Fut>(split: &Split, ports: &[u16], login: F)
where
    F: Fn(u16) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    for &port in ports {
        let mut ok = String::new();
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                ok = login(port).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(ok, "+OK\r\n", "port {port}\n{}", split.log());
    }
}

/// The gateways' own login throttles count together: each reports its failed logins to the
/// limits coordinator, which answers the lockouts every gateway's failures led to. Wrong
/// passwords of one cache user, and bad tokens from one source, spread over three gateways
/// lock out on all of them once their total reaches the policy's limit (no gateway saw
/// more than a third of it), even for the right password, until the lockout ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_count_failed_logins_together() {
    use crate::support::raw_from;
    // The gateways' throttle only (the control plane's password-check throttle is off): a
    // user at a source is locked out after 6 failures, a source (and bad tokens) after 9.
    let split = Split::with_config(
        "verify_throttle = { enabled = false }",
        "auth_throttle = { per_user = { free_failures = 10, base_delay_ms = 0, max_delay_ms = 0, lockout_after = 6, lockout_ms = 6000 }, \
         per_source = { free_failures = 10, base_delay_ms = 0, max_delay_ms = 0, lockout_after = 9, lockout_ms = 6000 } }\n",
    );
    let _cp = split.control_plane().await;
    let gateways = three_gateways(&split);
    let ports: Vec<u16> = gateways.iter().map(|g| g.1).collect();
    let (id, token) = cache_and_token(&split, serde_json::json!({"name": "guarded"})).await;
    let user = serde_json::json!({"username": "app", "passwords": ["correct-horse-battery-1"], "access_string": "on ~* +@all"});
    split.api(reqwest::Method::POST, &format!("/v1/caches/{id}/users"), Some(user)).await;
    let (users_from, tokens_from) = ([127, 0, 0, 2].into(), [127, 0, 0, 3].into());
    let login = |port: u16, password: &str| {
        let cmd = encode(&["AUTH", &format!("app@{id}"), password]);
        async move { String::from_utf8_lossy(&raw_from(users_from, port, &cmd).await).into_owned() }
    };
    let token_login = |port: u16, token: &str| {
        let cmd = auth_command(token);
        async move { String::from_utf8_lossy(&raw_from(tokens_from, port, &cmd).await).into_owned() }
    };
    each_takes_the_right_password(&split, &ports, |port| login(port, "correct-horse-battery-1")).await;
    const LOCKED: &str = "too many failed attempts";

    // Wrong passwords round the three gateways: the first 5 (each answered in about 0.5 s,
    // so every report is in) lock nothing, and nor does the 6th, checked before it counts.
    let mut sixth = std::time::Instant::now();
    for n in 0..6 {
        sixth = std::time::Instant::now();
        let wrong = login(ports[n % 3], "wrong-password").await;
        assert_eq!(
            wrong, "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
            "attempt {n}"
        );
    }
    // Locked out on every gateway, although none saw more than 2 of the 6: even the right
    // password is refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for &port in &ports {
        let locked = login(port, "correct-horse-battery-1").await;
        assert!(locked.contains(LOCKED), "port {port}: {locked}\n{}", split.log());
    }
    // Until the lockout ends.
    tokio::time::sleep(
        (sixth + Duration::from_millis(7500)).saturating_duration_since(std::time::Instant::now()),
    )
    .await;
    for &port in &ports {
        assert_eq!(login(port, "correct-horse-battery-1").await, "+OK\r\n", "port {port}");
    }

    // Bad tokens (a valid one with its signature changed) from one source: counted per
    // source, locked out after 9 in all, 3 on each gateway.
    let (head, signature) = token.rsplit_once('.').unwrap();
    let flipped = if signature.as_bytes()[10] == b'A' { "B" } else { "A" };
    let bad = format!("{head}.{}{flipped}{}", &signature[..10], &signature[11..]);
    for n in 0..9 {
        let refused = token_login(ports[n % 3], &bad).await;
        assert_eq!(
            refused, "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
            "token {n}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for &port in &ports {
        let locked = token_login(port, &token).await;
        assert!(locked.contains(LOCKED), "port {port}: {locked}");
    }
    // Another source is not locked out.
    assert_eq!(String::from_utf8_lossy(&raw(ports[0], &auth_command(&token)).await), "+OK\r\n");
}
