//! Issue 15, "One tenant cannot hurt another", at the gateway: pattern subscriptions,
//! deeply nested replies, inline pipelines and connection slots cost one tenant what it
//! uses, and never stall or lock out another tenant on the same gateway.

use crate::support::{auth_command, encode, ShoalDev};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A connection to the gateway from `source` (any 127/8 address works on Linux).
async fn connect_from(source: &str, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap()
}

/// Reads until `out` ends with `end` (or holds `count` of it), the connection closes, or
/// `wait` passes; what was read.
async fn read_until(s: &mut TcpStream, end: &[u8], count: usize, wait: Duration) -> Vec<u8> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut seen = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                // Count occurrences in the new bytes (and across the seam).
                let from = out.len().saturating_sub(end.len() - 1);
                out.extend_from_slice(&buf[..n]);
                seen += out[from..].windows(end.len()).filter(|w| *w == end).count();
                if seen >= count {
                    return out;
                }
            }
            _ => return out,
        }
    }
}

/// A cache and an authenticated raw connection to it.
async fn tenant(dev: &ShoalDev, name: &str) -> (String, TcpStream) {
    let cache = dev.create_cache(name).await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let mut s = TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    s.write_all(&auth_command(&token)).await.unwrap();
    assert_eq!(read_until(&mut s, b"\r\n", 1, Duration::from_secs(10)).await, b"+OK\r\n");
    (token, s)
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// The victim's login (connect, AUTH, PING) and command latencies for `run`, while
/// `publisher` publishes `channel` every 40 ms.
async fn victim_under_storm(
    dev: &ShoalDev,
    victim_token: &str,
    victim: &mut TcpStream,
    publisher: &mut TcpStream,
    channel: Vec<u8>,
    run: Duration,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publish = encode(&[&b"PUBLISH"[..], &channel, b"x"]);
    let storm = async {
        let mut published = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            publisher.write_all(&publish).await.unwrap();
            read_until(publisher, b"\r\n", 1, Duration::from_secs(60)).await;
            published += 1;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        published
    };
    let measure = async {
        let (mut logins, mut commands) = (Vec::new(), Vec::new());
        let started = Instant::now();
        while started.elapsed() < run {
            let t = Instant::now();
            let mut s = TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
            s.write_all(&[auth_command(victim_token), encode(&["PING"])].concat()).await.unwrap();
            let answer = read_until(&mut s, b"\r\n", 2, Duration::from_secs(10)).await;
            assert_eq!(answer, b"+OK\r\n+PONG\r\n");
            logins.push(t.elapsed());
            let t = Instant::now();
            victim.write_all(&encode(&["SET", "k", "v"])).await.unwrap();
            assert_eq!(read_until(victim, b"\r\n", 1, Duration::from_secs(10)).await, b"+OK\r\n");
            commands.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (logins, commands)
    };
    let (published, (logins, commands)) = tokio::join!(storm, measure);
    (logins, commands, published)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pattern_storm_does_not_stall_another_caches_logins_or_commands() {
    let dev = ShoalDev::start_with(&["--gateway-threads", "2"]).await;
    let (victim_token, mut victim) = tenant(&dev, "victim").await;
    let (attacker_token, mut publisher) = tenant(&dev, "attacker").await;
    let attacker = || async {
        let mut s = TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
        s.write_all(&auth_command(&attacker_token)).await.unwrap();
        s
    };
    // What a login and a command take here without a storm: the bound is p99 < 100 ms, or
    // 3× that when a debug build on a loaded machine is slower than that already (the stall
    // this guards against took seconds; once, under the full suite, a login p99 of 71 ms
    // missed a 50 ms floor by 0.2 ms).
    let (base_logins, base_commands, _) = victim_under_storm(
        &dev,
        &victim_token,
        &mut victim,
        &mut publisher,
        b"quiet".to_vec(),
        Duration::from_secs(1),
    )
    .await;
    let bound = |base: Vec<Duration>| (p99(base) * 3).max(Duration::from_millis(100));
    let (login_bound, command_bound) = (bound(base_logins), bound(base_commands));

    // The reported storm: a multi-megabyte glob against long channels (it used to be matched
    // in pattern × channel steps under the gateway-wide client registry's lock). Refused.
    let mut huge = attacker().await;
    let huge_pattern = [b"*".to_vec(), b"a".repeat(2 << 20), b"b".to_vec()].concat();
    huge.write_all(&encode(&[&b"PSUBSCRIBE"[..], &huge_pattern])).await.unwrap();
    let answer = read_until(&mut huge, b"\r\n", 2, Duration::from_secs(20)).await;
    // (Refused by size before its pattern is even looked at: PSUBSCRIBE is a free command the
    // gateway answers itself, held up to 64 KiB.)
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("ERR request too large") || answer.contains("ERR pattern longer"), "{answer}");
    let (logins, commands, published) = victim_under_storm(
        &dev,
        &victim_token,
        &mut victim,
        &mut publisher,
        b"a".repeat(64 * 1024),
        Duration::from_secs(2),
    )
    .await;
    eprintln!("long channels: {published} published; victim p99 login {:?}, command {:?} (bounds {login_bound:?}, {command_bound:?})", p99(logins.clone()), p99(commands.clone()));
    assert!(p99(logins) < login_bound && p99(commands) < command_bound);

    // At most 1,024 patterns per connection.
    let mut capped = attacker().await;
    let mut args = vec![b"PSUBSCRIBE".to_vec()];
    args.extend((0..1024).map(|i| format!("zz{i}").into_bytes()));
    capped.write_all(&[encode(&args), encode(&["PSUBSCRIBE", "one-too-many"])].concat()).await.unwrap();
    let refused = read_until(&mut capped, b"(max 1024)\r\n", 1, Duration::from_secs(30)).await;
    assert!(String::from_utf8_lossy(&refused).contains("too many pattern subscriptions"));

    // The costliest patterns allowed, just under the matching budget per message: a middle
    // segment of wildcards that almost matches at every position of a channel of `a`s.
    let mut subscribers = Vec::new();
    for _ in 0..4 {
        let mut s = attacker().await;
        let mut args = vec![b"PSUBSCRIBE".to_vec()];
        args.extend((0..256).map(|i| format!("*??b*{i}*").into_bytes()));
        s.write_all(&encode(&args)).await.unwrap();
        let confirmed = read_until(&mut s, b"psubscribe", 256, Duration::from_secs(30)).await;
        assert_eq!(confirmed.windows(10).filter(|w| w == b"psubscribe").count(), 256);
        subscribers.push(s);
    }
    // And one whose patterns cost more than the budget for one message.
    let mut over_budget = attacker().await;
    let mut args = vec![b"PSUBSCRIBE".to_vec()];
    args.extend((0..1000).map(|i| format!("*{}b*{i}*", "?".repeat(40)).into_bytes()));
    over_budget.write_all(&encode(&args)).await.unwrap();
    read_until(&mut over_budget, b"psubscribe", 1000, Duration::from_secs(30)).await;
    let (logins, commands, published) = victim_under_storm(
        &dev,
        &victim_token,
        &mut victim,
        &mut publisher,
        b"a".repeat(64),
        Duration::from_secs(3),
    )
    .await;
    let mut slowest = logins.clone();
    slowest.sort();
    eprintln!(
        "costly patterns: {published} published; victim {} logins p99 {:?} (slowest {:?}), {} commands p99 {:?}",
        logins.len(),
        p99(logins.clone()),
        &slowest[slowest.len().saturating_sub(3)..],
        commands.len(),
        p99(commands.clone())
    );
    assert!(published >= 10, "the storm ran");
    assert!(p99(logins.clone()) < login_bound, "login p99 {:?} ≥ {login_bound:?}", p99(logins));
    assert!(p99(commands.clone()) < command_bound, "command p99 {:?} ≥ {command_bound:?}", p99(commands));
    // The subscribers within the budget are still there.
    for s in &mut subscribers {
        s.write_all(&encode(&["PING"])).await.unwrap();
        let pong = read_until(s, b"pong\r\n", 1, Duration::from_secs(10)).await;
        assert!(pong.windows(6).any(|w| w == b"pong\r\n"), "{}", String::from_utf8_lossy(&pong));
    }
    // The one over it was told so and closed.
    let end = read_until(&mut over_budget, b"closing the connection\r\n", 1, Duration::from_secs(10)).await;
    assert!(String::from_utf8_lossy(&end).contains("pattern matching limit reached"), "{end:?}");
}

#[tokio::test]
async fn a_deeply_nested_script_reply_reaches_a_subscribed_client_and_the_gateway_lives_on() {
    let dev = ShoalDev::start().await;
    let (token, _) = tenant(&dev, "nested").await;
    let mut s = TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    s.write_all(&encode(&["HELLO", "3", "AUTH", "default", &token])).await.unwrap();
    read_until(&mut s, b"proto", 1, Duration::from_secs(10)).await;
    // While subscribed, every reply is decoded to tell it from pub/sub messages. Valkey
    // nests a script's table up to ~8000 deep.
    s.write_all(&encode(&["SUBSCRIBE", "ch"])).await.unwrap();
    read_until(&mut s, b":1\r\n", 1, Duration::from_secs(10)).await;
    let script = "local t = 1 for i = 1, tonumber(ARGV[1]) do t = {t} end return t";
    s.write_all(&encode(&["EVAL", script, "0", "100000"])).await.unwrap();
    s.write_all(&encode(&["PING", "after"])).await.unwrap();
    let reply = read_until(&mut s, b"after\r\n", 1, Duration::from_secs(20)).await;
    let depth = reply.windows(4).filter(|w| w == b"*1\r\n").count();
    assert!(
        depth > 7000,
        "the nested reply came through ({depth} levels): {:?}",
        &reply[..reply.len().min(80)]
    );
    // The gateway is alive for everyone.
    let (_, mut other) = tenant(&dev, "other").await;
    other.write_all(&encode(&["PING"])).await.unwrap();
    assert_eq!(read_until(&mut other, b"\r\n", 1, Duration::from_secs(10)).await, b"+PONG\r\n");
}

/// Megabytes of inline commands: held behind a barrier (INFO waits for a blocked BLPOP), the
/// whole buffer is in the gateway at once; each command used to cost a copy of the rest.
async fn inline_pings_behind_a_barrier(dev: &ShoalDev, token: &str, bytes: usize) -> Duration {
    let mut s = TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    s.write_all(&auth_command(token)).await.unwrap();
    read_until(&mut s, b"\r\n", 1, Duration::from_secs(10)).await;
    let pings = bytes / 6;
    let input = [b"BLPOP nothing 1\r\nINFO keyspace\r\n".to_vec(), b"PING\r\n".repeat(pings)].concat();
    let started = Instant::now();
    let (mut read, mut write) = s.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&input).await.unwrap();
        write
    });
    let mut seen = 0;
    let mut buf = vec![0u8; 1 << 16];
    let mut tail = Vec::new();
    while seen < pings {
        let n = tokio::time::timeout(Duration::from_secs(120), read.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed after {seen} PONGs");
        tail.extend_from_slice(&buf[..n]);
        seen += tail.windows(7).filter(|w| w == b"+PONG\r\n").count();
        let keep = tail.len().min(6);
        tail.drain(..tail.len() - keep);
    }
    let _ = writer.await;
    started.elapsed()
}

#[tokio::test]
async fn megabytes_of_inline_commands_are_answered_in_linear_time() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("inline").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    // Before AUTH: each gets NOAUTH, quickly.
    let mut s = TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    let started = Instant::now();
    let (mut read, mut write) = s.split();
    let pings = (1 << 20) / 6;
    let (_, answers) =
        tokio::join!(async { write.write_all(&b"PING\r\n".repeat(pings)).await.unwrap() }, async {
            let mut seen = 0;
            let mut buf = vec![0u8; 1 << 16];
            while seen < pings {
                let n = read.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                seen += buf[..n].iter().filter(|&&b| b == b'\n').count();
            }
            seen
        });
    assert_eq!(answers, pings);
    eprintln!("1 MB of inline PINGs before AUTH: {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(60));

    let one = inline_pings_behind_a_barrier(&dev, &token, 1 << 20).await;
    let four = inline_pings_behind_a_barrier(&dev, &token, 4 << 20).await;
    eprintln!("inline PINGs behind a barrier: 1 MB {one:?}, 4 MB {four:?}");
    // Linear: 4 MB costs about 4× 1 MB (plus BLPOP's second each); quadratic would be 16×
    // and minutes.
    assert!(four < one * 10 + Duration::from_secs(5), "1 MB {one:?}, 4 MB {four:?}");
}

#[tokio::test]
async fn one_source_cannot_take_every_unauthenticated_slot() {
    let dev = ShoalDev::start_with(&["--max-unauthenticated-per-source", "5"]).await;
    let cache = dev.create_cache("victim").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    // 127.0.0.2 opens connections and never authenticates.
    let mut flood = Vec::new();
    for _ in 0..5 {
        flood.push(connect_from("127.0.0.2", dev.resp_port).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = connect_from("127.0.0.2", dev.resp_port).await;
    let refused = read_until(&mut over, b"\r\n", 1, Duration::from_secs(10)).await;
    assert_eq!(refused, b"-ERR max number of unauthenticated clients reached for this address\r\n");
    assert_eq!(read_until(&mut over, b"\r\n", 1, Duration::from_secs(5)).await, b"", "closed");
    // Another source connects and logs in.
    let mut victim = connect_from("127.0.0.1", dev.resp_port).await;
    victim.write_all(&[auth_command(&token), encode(&["PING"])].concat()).await.unwrap();
    assert_eq!(read_until(&mut victim, b"\r\n", 2, Duration::from_secs(10)).await, b"+OK\r\n+PONG\r\n");
    // A flooding connection that authenticates gives its slot back.
    flood[0].write_all(&auth_command(&token)).await.unwrap();
    assert_eq!(read_until(&mut flood[0], b"\r\n", 1, Duration::from_secs(10)).await, b"+OK\r\n");
    let mut again = connect_from("127.0.0.2", dev.resp_port).await;
    again.write_all(&encode(&["PING"])).await.unwrap();
    let answer = read_until(&mut again, b"\r\n", 1, Duration::from_secs(10)).await;
    assert!(answer.starts_with(b"-NOAUTH"), "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn a_stalled_tls_handshake_holds_its_slot_only_until_the_handshake_timeout() {
    let dev = ShoalDev::start_with(&[
        "--tls-handshake-timeout",
        "1",
        "--max-unauthenticated-per-source",
        "2",
        "--max-tls-handshakes-per-source",
        "2",
    ])
    .await;
    let cache = dev.create_cache("tls").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    // Two TLS connections that never say hello: they count as unauthenticated.
    let started = Instant::now();
    let mut stalled =
        vec![connect_from("127.0.0.2", dev.tls_port).await, connect_from("127.0.0.2", dev.tls_port).await];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = connect_from("127.0.0.2", dev.resp_port).await;
    let refused = read_until(&mut over, b"\r\n", 1, Duration::from_secs(10)).await;
    assert_eq!(refused, b"-ERR max number of unauthenticated clients reached for this address\r\n");
    // After the handshake timeout they are closed, and the source may connect again.
    for s in &mut stalled {
        assert_eq!(read_until(s, b"\r\n", 1, Duration::from_secs(10)).await, b"", "closed");
    }
    let closed_after = started.elapsed();
    assert!(closed_after < Duration::from_secs(4), "{closed_after:?}");
    let mut again = connect_from("127.0.0.2", dev.resp_port).await;
    again.write_all(&[auth_command(&token), encode(&["PING"])].concat()).await.unwrap();
    assert_eq!(read_until(&mut again, b"\r\n", 2, Duration::from_secs(10)).await, b"+OK\r\n+PONG\r\n");
}

#[tokio::test]
async fn a_slow_auth_ends_at_the_auth_timeout() {
    // Every failed token AUTH from a source delays its next attempt by 4 s.
    let throttle = "{ per_source = { free_failures = 0, base_delay_ms = 4000, max_delay_ms = 4000, \
                    lockout_after = 0, lockout_ms = 0 } }";
    let dev = ShoalDev::start_with(&["--auth-timeout", "1", "--auth-throttle", throttle]).await;
    let cache = dev.create_cache("slow").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let mut wrong = TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    let forged = format!("{}AAAA", &token[..token.len() - 4]);
    wrong.write_all(&auth_command(&forged)).await.unwrap();
    read_until(&mut wrong, b"\r\n", 1, Duration::from_secs(10)).await;
    // The next AUTH waits 4 s for the throttle: longer than the connection's 1 s to log in.
    let started = Instant::now();
    let mut slow = TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    slow.write_all(&auth_command(&token)).await.unwrap();
    let answer = read_until(&mut slow, b"\r\n", 3, Duration::from_secs(10)).await;
    assert_eq!(answer, b"-ERR authentication timed out\r\n", "{}", String::from_utf8_lossy(&answer));
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    // Before AUTH as well: a connection that says nothing is closed after 1 s.
    let mut quiet = TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    let answer = read_until(&mut quiet, b"\r\n", 2, Duration::from_secs(10)).await;
    assert_eq!(answer, b"-ERR authentication timed out\r\n");
}

#[tokio::test]
async fn a_caches_max_connections_cannot_exceed_the_gateways() {
    let dev = ShoalDev::start_with(&["--max-connections", "50"]).await;
    let (status, body) = dev
        .api(
            reqwest::Method::POST,
            "/v1/caches",
            Some(serde_json::json!({"name": "big", "limits": {"max_connections": 51}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "limits.max_connections", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("between 1 and 50"), "{body}");
    let (status, list) = dev.api(reqwest::Method::GET, "/v1/caches", None).await;
    assert_eq!(status, 200);
    assert!(!list.to_string().contains("\"big\""), "nothing was created: {list}");

    let cache = dev.create_cache("fits").await;
    let id = cache["id"].as_str().unwrap();
    let path = format!("/v1/caches/{id}");
    let (status, body) = dev
        .api(reqwest::Method::PATCH, &path, Some(serde_json::json!({"limits": {"max_connections": 51}})))
        .await;
    assert_eq!(status, 400, "{body}");
    let (_, unchanged) = dev.api(reqwest::Method::GET, &path, None).await;
    assert!(unchanged["limits"].get("max_connections").is_none(), "{unchanged}");
    dev.set_limits(id, serde_json::json!({"max_connections": 50})).await;
}

/// A JWT-shaped token signed by nobody, naming a key id the control plane never issued.
fn forged_token(kid: &str) -> String {
    use base64::Engine;
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header = b64(&format!(r#"{{"alg":"EdDSA","typ":"JWT","kid":"{kid}"}}"#));
    let claims = b64(r#"{"sub":"x","exp":4102444800,"iat":1700000000,"iss":"shoal","aud":"shoal-data"}"#);
    format!("{header}.{claims}.{}", b64("not a signature"))
}

#[tokio::test]
async fn unknown_key_ids_right_after_a_reload_are_refused_without_waiting_or_fetching() {
    let dev = ShoalDev::start().await;
    // Past the startup load, which does not count.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reloads_before = dev.log().matches("GET /.well-known/jwks.json").count();
    let started = Instant::now();
    for i in 0..10 {
        let mut s = connect_from(&format!("127.0.4.{}", i + 1), dev.resp_port).await;
        s.write_all(&auth_command(&forged_token(&format!("made-up-{i}")))).await.unwrap();
        let answer = read_until(&mut s, b"\r\n", 1, Duration::from_secs(60)).await;
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("-WRONGPASS"), "{answer}");
    }
    let took = started.elapsed();
    let reloads = dev.log().matches("GET /.well-known/jwks.json").count() - reloads_before;
    // One reload for the first; the nine after it within a second are refused at once.
    assert!(took < Duration::from_millis(900), "10 unknown kids one after the other took {took:?}");
    assert!(reloads <= 1, "{reloads} reloads of the key set");
}

#[tokio::test]
async fn a_flood_of_unknown_key_ids_reloads_the_key_set_once_a_second_not_once_a_token() {
    let dev = ShoalDev::start().await;
    let (_, token) = {
        let cache = dev.create_cache("genuine").await;
        let id = cache["id"].as_str().unwrap().to_string();
        let token = dev.mint_token(&id).await;
        (id, token)
    };
    let reloads_before = dev.log().matches("GET /.well-known/jwks.json").count();
    // 40 logins with made-up key ids at once, each from its own address (so that the
    // per-source login throttle stays out of the way): each used to wait its own turn for a
    // reload of the key set, one a second.
    let started = Instant::now();
    let mut logins = Vec::new();
    for i in 0..40 {
        let port = dev.resp_port;
        logins.push(tokio::spawn(async move {
            let mut s = connect_from(&format!("127.0.3.{}", i + 1), port).await;
            s.write_all(&auth_command(&forged_token(&format!("made-up-{i}")))).await.unwrap();
            read_until(&mut s, b"\r\n", 1, Duration::from_secs(60)).await
        }));
    }
    for login in logins {
        let answer = String::from_utf8(login.await.unwrap()).unwrap();
        assert!(answer.starts_with("-WRONGPASS") || answer.starts_with("-ERR"), "{answer}");
    }
    let took = started.elapsed();
    let reloads = dev.log().matches("GET /.well-known/jwks.json").count() - reloads_before;
    eprintln!("40 unknown kids answered in {took:?} with {reloads} reloads of the key set");
    assert!(took < Duration::from_secs(8), "40 unknown kids took {took:?}");
    assert!(reloads <= 8, "{reloads} reloads of the key set");
    // A genuine token still logs in at once.
    let mut c = dev.client(&token).await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
    assert_eq!(pong, "PONG");
}
