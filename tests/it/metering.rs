//! Metering end to end: what clients send and receive, metered by the rule, must be what
//! the control plane stores — exactly, to the byte and the milli-ECPU.

use crate::support::{auth_command, encode, ShoalDev, Split};
use shoal_types::UsageCounters as Totals;

/// A command in RESP (byte-string arguments).
fn cmd(args: &[&[u8]]) -> Vec<u8> {
    encode(args)
}
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The counters the usage API reports: each read by its name (`commands`, `ecpu_milli`, …).
fn read_totals(n: impl Fn(&str) -> u64) -> Totals {
    Totals::from_values(Totals::NAMES.map(n))
}

/// Length of the complete RESP2 reply at the front of `buf`, if it is all there.
fn reply_len(buf: &[u8]) -> Option<usize> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let n: i64 = std::str::from_utf8(&buf[1..line_end]).ok()?.parse().unwrap_or(0);
    let head = line_end + 2;
    match buf[0] {
        b'$' if n >= 0 => (buf.len() >= head + n as usize + 2).then_some(head + n as usize + 2),
        b'*' if n > 0 => {
            let mut pos = head;
            for _ in 0..n {
                pos += reply_len(&buf[pos..])?;
            }
            Some(pos)
        }
        _ => Some(head),
    }
}

/// Top-level elements of an array reply and the replies inside it.
fn elements(reply: &[u8]) -> Vec<&[u8]> {
    if reply[0] != b'*' || reply.starts_with(b"*-1") {
        return vec![];
    }
    let mut pos = reply.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    let mut out = vec![];
    while pos < reply.len() {
        let len = reply_len(&reply[pos..]).unwrap();
        out.push(&reply[pos..pos + len]);
        pos += len;
    }
    out
}

/// A raw client: exact bytes out and in, command by command.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(port: u16, token: &str) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut raw = Raw { s, buf: vec![] };
        raw.s.write_all(&auth_command(token)).await.unwrap();
        assert_eq!(raw.reply().await, b"+OK\r\n");
        raw
    }

    async fn reply(&mut self) -> Vec<u8> {
        loop {
            if let Some(n) = (!self.buf.is_empty()).then(|| reply_len(&self.buf)).flatten() {
                return self.buf.drain(..n).collect();
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
                .await
                .expect("reply in time")
                .unwrap();
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The rule, applied by the test on its own: what one command should add.
struct Rule {
    want: Totals,
    /// What scripts may add for their time on the node: the gateway measures it, the test
    /// only bounds it by how long its client waited (more on a loaded machine).
    script_time_slack_milli: u64,
}

impl Rule {
    /// `reply` is what the command's result was (for elements and hits), `delivered` the bytes
    /// the client received for it.
    fn command(&mut self, name: &str, request: usize, reply: &[u8], delivered: usize) {
        use shoal_commands::Hits;
        let spec = shoal_commands::table().get(name);
        let (weight, per_element) = spec.map_or((1000, 0), |s| (s.weight as u64, s.per_element as u64));
        let hits = spec.map_or(Hits::None, |s| s.hits);
        if weight == 0 {
            return;
        }
        let n = match reply.first() {
            Some(b'*') => elements(reply).len() as u64,
            _ => 0,
        };
        let is_nil = |r: &[u8]| r.starts_with(b"$-1") || r.starts_with(b"*-1");
        let error = reply.starts_with(b"-");
        let (h, m) = match hits {
            _ if error || reply.is_empty() => (0, 0),
            Hits::Value if is_nil(reply) => (0, 1),
            Hits::Value => (1, 0),
            Hits::Elements => {
                let e = elements(reply);
                let nil = e.iter().filter(|r| is_nil(r)).count() as u64;
                (e.len() as u64 - nil, nil)
            }
            Hits::None => (0, 0),
        };
        let bytes = (request + delivered) as u64;
        self.want.add(&Totals {
            commands: 1,
            ecpu_milli: (weight + per_element * n).max(bytes * 1000 / 1024),
            bytes_in: request as u64,
            bytes_out: delivered as u64,
            hits: h,
            misses: m,
            throttled: 0,
            errors: error as u64,
        });
    }

    /// Sends one command, reads its reply, and applies the rule to both.
    async fn run(&mut self, c: &mut Raw, args: &[&[u8]]) -> Vec<u8> {
        let req = cmd(args);
        let sent = Instant::now();
        c.s.write_all(&req).await.unwrap();
        let reply = c.reply().await;
        let name = String::from_utf8_lossy(args[0]).to_lowercase();
        if shoal_commands::table().get(&name).is_some_and(|s| s.script) {
            self.script_time_slack_milli += shoal_gateway::metering::ecpu::script_time_milli(sent.elapsed());
        }
        self.command(&name, req.len(), &reply, reply.len());
        reply
    }
}

/// The usage the control plane stored for a cache, summed over the last hour.
async fn stored(dev: &ShoalDev, cache: &str) -> Totals {
    let (status, body) =
        dev.api(reqwest::Method::GET, &format!("/v1/caches/{cache}/usage?granularity=minute"), None).await;
    assert_eq!(status, 200, "{body}");
    sum_points(&body)
}

/// The sum of a usage API answer's points.
fn sum_points(body: &serde_json::Value) -> Totals {
    let mut t = Totals::default();
    for p in body["points"].as_array().unwrap() {
        t.add(&read_totals(|k| p[k].as_u64().unwrap()));
    }
    t
}

/// Waits until the stored usage reaches `want` (batches arrive every second), then checks
/// that it stays there.
async fn assert_stored(dev: &ShoalDev, cache: &str, want: Totals) {
    assert_stored_within(dev, cache, want, 0).await;
}

/// [`assert_stored`], with up to `ecpu_slack_milli` more milli-ECPU allowed (scripts' time);
/// returns what was stored.
async fn assert_stored_within(dev: &ShoalDev, cache: &str, want: Totals, ecpu_slack_milli: u64) -> Totals {
    let fits = |got: &Totals| {
        let ecpu = got.ecpu_milli;
        Totals { ecpu_milli: want.ecpu_milli, ..*got } == want
            && (want.ecpu_milli..=want.ecpu_milli + ecpu_slack_milli).contains(&ecpu)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        let got = stored(dev, cache).await;
        if fits(&got) {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "stored usage {got:?}\n  expected {want:?} (+ up to {ecpu_slack_milli} milli-ECPU)\n{}",
            dev.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(stored(dev, cache).await, got, "nothing is counted twice");
    got
}

/// The gateway's own counters for a cache, from its Prometheus `/metrics`.
async fn gateway_counters(metrics_port: u16, cache: &str) -> Totals {
    let body =
        reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.unwrap().text().await.unwrap();
    let n = |name: &str| -> u64 {
        let prefix = format!("shoal_cache_{name}_total{{cache=\"{cache}\"}} ");
        body.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.parse().unwrap())
    };
    read_totals(n)
}

#[tokio::test]
async fn usage_is_the_rule_applied_to_what_clients_sent_and_received() {
    let metrics_port = crate::support::free_port();
    let dev = ShoalDev::start_with(&["--metrics-port", &metrics_port.to_string()]).await;
    let cache = dev.create_cache("metered").await;
    let id = cache["id"].as_str().unwrap().to_string();
    let token = dev.mint_token(&id).await;
    let mut rule = Rule { want: Totals::default(), script_time_slack_milli: 0 };

    // Pipelined SET/GET of several sizes (on the shared upstream connection).
    let small = b"hello".to_vec();
    let kb10 = vec![b'k'; 10 * 1024];
    let mb1 = vec![b'm'; 1024 * 1024];
    let mut c = Raw::connect(dev.resp_port, &token).await;
    let pipeline: Vec<Vec<&[u8]>> = vec![
        vec![b"SET", b"small", &small],
        vec![b"SET", b"kb10", &kb10],
        vec![b"SET", b"mb1", &mb1],
        vec![b"SET", b"a", b"1"],
        vec![b"SET", b"b", b"2"],
        // A run of like commands, hits and misses (counted together).
        vec![b"GET", b"small"],
        vec![b"GET", b"missing"],
        vec![b"GET", b"a"],
        vec![b"GET", b"nothing"],
        vec![b"GET", b"small"],
        vec![b"GET", b"kb10"],
        vec![b"GET", b"mb1"],
        vec![b"GET", b"missing"],
        vec![b"MGET", b"small", b"missing", b"kb10"],
        vec![b"PING"],
        vec![b"INCR", b"small"],
        vec![b"NOSUCHCOMMAND", b"x"],
        vec![b"LRANGE", b"nolist", b"0", b"-1"],
    ];
    let requests: Vec<Vec<u8>> = pipeline.iter().map(|a| cmd(a)).collect();
    c.s.write_all(&requests.concat()).await.unwrap();
    for (args, req) in pipeline.iter().zip(&requests) {
        let reply = c.reply().await;
        rule.command(&String::from_utf8_lossy(args[0]).to_lowercase(), req.len(), &reply, reply.len());
    }
    assert_eq!(rule.want.hits, 7, "GET small (twice), a, kb10, mb1 and two of MGET's three");
    assert_eq!(rule.want.misses, 4);
    assert_eq!(rule.want.errors, 2, "INCR of a non-number, an unknown command");
    c.s.write_all(&cmd(&[b"INFO", b"commandstats"])).await.unwrap();
    let stats = String::from_utf8(c.reply().await).unwrap();
    for (name, calls) in [("get", 8), ("set", 5), ("mget", 1)] {
        let line = stats.lines().find(|l| l.starts_with(&format!("cmdstat_{name}:"))).unwrap_or_default();
        assert!(line.starts_with(&format!("cmdstat_{name}:calls={calls},")), "{name}: {line:?}\n{stats}");
    }

    // Refused by the gateway itself: not billed.
    let denied = cmd(&[b"CONFIG", b"SET", b"maxmemory", b"1"]);
    c.s.write_all(&denied).await.unwrap();
    assert!(c.reply().await.starts_with(b"-NOPERM"));

    // MULTI/EXEC: each queued command is billed with its `+QUEUED` and its result in EXEC's
    // reply; MULTI and EXEC are free.
    assert_eq!(rule.run(&mut c, &[b"MULTI"]).await, b"+OK\r\n");
    let queued: Vec<Vec<&[u8]>> =
        vec![vec![b"SET", b"n", b"41"], vec![b"INCR", b"n"], vec![b"GET", b"kb10"], vec![b"GET", b"none"]];
    let mut queued_bytes = vec![];
    for args in &queued {
        let req = cmd(args);
        c.s.write_all(&req).await.unwrap();
        let reply = c.reply().await;
        assert_eq!(reply, b"+QUEUED\r\n");
        queued_bytes.push((req.len(), reply.len()));
    }
    let exec = cmd(&[b"EXEC"]);
    c.s.write_all(&exec).await.unwrap();
    let results = c.reply().await;
    let items = elements(&results);
    assert_eq!(items.len(), 4);
    for ((args, (req, queued_reply)), item) in queued.iter().zip(&queued_bytes).zip(&items) {
        let name = String::from_utf8_lossy(args[0]).to_lowercase();
        rule.command(&name, *req, item, queued_reply + item.len());
    }

    // A script, and a command that fails inside it.
    let script: &[u8] = b"return redis.call('GET', KEYS[1])";
    assert!(rule.run(&mut c, &[b"EVAL", script, b"1", b"small"]).await.starts_with(b"$5"));
    assert!(rule
        .run(&mut c, &[b"EVAL", b"return redis.call('INCR', 'small')", b"0"])
        .await
        .starts_with(b"-"));

    // A BLPOP that blocks until another client pushes.
    let mut other = Raw::connect(dev.resp_port, &token).await;
    let blpop = cmd(&[b"BLPOP", b"queue", b"5"]);
    c.s.write_all(&blpop).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    rule.run(&mut other, &[b"RPUSH", b"queue", b"job-1"]).await;
    let popped = c.reply().await;
    assert!(popped.starts_with(b"*2"));
    rule.command("blpop", blpop.len(), &popped, popped.len());

    // Pub/sub: SUBSCRIBE is free, PUBLISH billed, each delivery billed by bytes to the receiver.
    let mut sub = Raw::connect(dev.resp_port, &token).await;
    sub.s.write_all(&cmd(&[b"SUBSCRIBE", b"news"])).await.unwrap();
    assert!(sub.reply().await.starts_with(b"*3"));
    let payload = vec![b'p'; 3000];
    rule.run(&mut other, &[b"PUBLISH", b"news", &payload]).await;
    let message = sub.reply().await;
    assert!(message.ends_with(&[&payload[..], b"\r\n"].concat()));
    rule.want.bytes_out += message.len() as u64;
    rule.want.ecpu_milli += message.len() as u64 * 1000 / 1024;

    let got = assert_stored_within(&dev, &id, rule.want, rule.script_time_slack_milli).await;
    assert_eq!(gateway_counters(metrics_port, &id).await, got, "the gateway's /metrics agree");
    let body =
        reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.unwrap().text().await.unwrap();
    let count =
        format!("shoal_cache_command_duration_seconds_count{{cache=\"{id}\"}} {}", rule.want.commands);
    assert!(body.lines().any(|l| l == count), "one latency sample per metered command: {count}");
}

/// What the control plane of a split deployment stored of a cache's usage, summed.
async fn stored_split(split: &Split, cache: &str) -> Totals {
    let body = split.api(reqwest::Method::GET, &format!("/v1/caches/{cache}/usage"), None).await;
    sum_points(&body)
}

/// SET and GET of 100-byte values until `stop`, with the rule applied to every command.
async fn load(
    mut conn: redis::aio::MultiplexedConnection,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Totals {
    let mut rule = Rule { want: Totals::default(), script_time_slack_milli: 0 };
    let value = vec![b'v'; 100];
    let mut i = 0u64;
    while !*stop.borrow() {
        let key = format!("key{}", i % 16);
        let set = redis::cmd("SET").arg(&key).arg(&value).clone();
        let _: () = set.query_async(&mut conn).await.expect("SET through the gateway");
        rule.command("set", set.get_packed_command().len(), b"+OK\r\n", 5);
        let get = redis::cmd("GET").arg(&key).clone();
        let got: Vec<u8> = get.query_async(&mut conn).await.expect("GET through the gateway");
        assert_eq!(got, value);
        let reply = [&b"$100\r\n"[..], &value, b"\r\n"].concat();
        rule.command("get", get.get_packed_command().len(), &reply, reply.len());
        i += 1;
    }
    rule.want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_survives_a_control_plane_outage_and_a_gateway_restart_exactly() {
    let split = Split::new();
    let cp = split.control_plane().await;
    let mut gw = split.gateway();
    let cache =
        split.api(reqwest::Method::POST, "/v1/caches", Some(serde_json::json!({"name": "outage"}))).await;
    let id = cache["id"].as_str().unwrap().to_string();
    let minted = split.api(reqwest::Method::POST, &format!("/v1/caches/{id}/tokens"), None).await;
    let token = minted["token"].as_str().unwrap().to_string();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(load(split.client(&token).await, stopped));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The control plane stops answering for 30 s (SIGSTOP: it also runs the Valkey pool, which
    // must stay up); clients keep working meanwhile. Requests it took before it froze are
    // answered after it resumes, when the gateway has already given up on them: the resends
    // must not count twice.
    cp.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(30)).await;
    // The gateway stops too, before the control plane is back: what it could not deliver is
    // on disk when it exits.
    stop.send(true).unwrap();
    let mut want = running.await.unwrap();
    assert!(want.commands > 1000, "the load ran: {want:?}");
    assert!(gw.stop(), "the gateway stops");
    let spooled = std::fs::read_dir(split.path("gateway/usage/spool")).unwrap().count();
    assert!(spooled >= 5, "the outage's batches are spooled, found {spooled}");

    // Both come back; the restarted gateway keeps its id, sends the spool, and meters on.
    cp.signal(libc::SIGCONT);
    let _gw = split.gateway();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(load(split.client(&token).await, stopped));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    want.add(&running.await.unwrap());

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = stored_split(&split, &id).await;
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "stored {got:?}\nwanted {want:?}\n{}", split.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(stored_split(&split, &id).await, want, "nothing counted twice");
    assert_eq!(
        std::fs::read_dir(split.path("gateway/usage/spool")).unwrap().count(),
        0,
        "the spool is empty"
    );
}

#[tokio::test]
async fn sigterm_delivers_the_last_usage_before_the_gateway_exits() {
    let mut dev = ShoalDev::start().await;
    let cache = dev.create_cache("last-words").await;
    let id = cache["id"].as_str().unwrap().to_string();
    let token = dev.mint_token(&id).await;
    let mut rule = Rule { want: Totals::default(), script_time_slack_milli: 0 };
    let mut c = Raw::connect(dev.resp_port, &token).await;
    let value = vec![b'x'; 5000];
    for i in 0..50 {
        let key = format!("k{i}");
        rule.run(&mut c, &[b"SET", key.as_bytes(), &value]).await;
        rule.run(&mut c, &[b"GET", key.as_bytes()]).await;
    }
    // Straight after the last reply: the session's counters and the current second's batch
    // exist only in the gateway's memory.
    dev.stop_with(libc::SIGTERM);
    dev.launch().await;
    assert_eq!(stored(&dev, &id).await, rule.want);
}

/// Sends `n` pipelined GETs; how many succeeded and how many were throttled.
async fn pipelined_gets(c: &mut Raw, n: usize, throttled_reply: &[u8]) -> (u64, u64) {
    let get = cmd(&[b"GET", b"k"]);
    c.s.write_all(&get.repeat(n)).await.unwrap();
    let (mut ok, mut throttled) = (0, 0);
    for _ in 0..n {
        let reply = c.reply().await;
        if reply == throttled_reply {
            throttled += 1;
        } else {
            assert_eq!(reply, b"$1\r\nv\r\n");
            ok += 1;
        }
    }
    (ok, throttled)
}

#[tokio::test]
async fn ecpu_per_second_throttles_and_follows_changes_within_a_second() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("limited").await;
    let id = cache["id"].as_str().unwrap().to_string();
    let token = dev.mint_token(&id).await;
    let throttled_reply = b"-THROTTLED ECPU limit of cache limited exceeded\r\n";
    let mut c = Raw::connect(dev.resp_port, &token).await;
    assert_eq!(c.s.write_all(&cmd(&[b"SET", b"k", b"v"])).await.ok(), Some(()));
    assert_eq!(c.reply().await, b"+OK\r\n");

    dev.set_limits(&id, serde_json::json!({"ecpu_per_second": 200})).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // 200 ECPU/s: a full bucket (200 GETs), then 200 more per second.
    let started = Instant::now();
    let (mut ok, mut throttled) = (0, 0);
    while started.elapsed() < Duration::from_secs(3) {
        let (o, t) = pipelined_gets(&mut c, 100, throttled_reply).await;
        ok += o;
        throttled += t;
    }
    let allowed = 200.0 + 200.0 * started.elapsed().as_secs_f64();
    assert!(throttled > 0, "the limit refused some\n{}", dev.log());
    assert!((ok as f64) <= allowed * 1.05 + 1.0, "{ok} GETs passed, the limit allows {allowed}");
    assert!((ok as f64) >= allowed * 0.8, "{ok} GETs passed, the limit allows {allowed}");

    // Lifted: within a second nothing is throttled any more.
    dev.set_limits(&id, serde_json::json!({"ecpu_per_second": null})).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (o, t) = pipelined_gets(&mut c, 2000, throttled_reply).await;
    assert_eq!((o, t), (2000, 0));
    ok += o;

    // Throttled commands are counted, not billed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = stored(&dev, &id).await;
        if got.throttled == throttled && got.commands == ok + 1 {
            assert_eq!(got.ecpu_milli, (ok + 1) * 1000);
            break;
        }
        assert!(Instant::now() < deadline, "stored {got:?}; throttled {throttled}, ok {ok}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn usage_batches_are_stored_once_and_read_per_minute_or_hour() {
    let split = Split::new();
    let _cp = split.control_plane().await;
    let cache =
        split.api(reqwest::Method::POST, "/v1/caches", Some(serde_json::json!({"name": "api"}))).await;
    let id = cache["id"].as_str().unwrap().to_string();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let hour = now - now % 3600 - 3600;
    let usage = |minute: i64, commands: u64| {
        serde_json::json!({"cache_id": id, "minute": minute, "commands": commands, "ecpu_milli": commands * 1000,
            "bytes_in": 10, "bytes_out": 20, "hits": 1, "misses": 2, "throttled": 3, "errors": 4})
    };
    let credential = crate::support::create_gateway_credential(&split.path("cp.toml"), "usage-poster");
    let post = |body: serde_json::Value, token: Option<&str>| {
        let mut req =
            split.http.post(format!("http://127.0.0.1:{}/internal/v1/usage", split.internal)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let batch = serde_json::json!({"gateway_id": "g-test", "seq": 7,
        "usage": [usage(hour + 60, 5), usage(hour + 120, 6)]});
    assert_eq!(post(batch.clone(), None).await.unwrap().status(), 401, "gateways only");
    for _ in 0..3 {
        assert_eq!(post(batch.clone(), Some(&credential)).await.unwrap().status(), 200);
    }
    let bad = serde_json::json!({"gateway_id": "g-test", "seq": 8, "usage": [usage(hour + 61, 1)]});
    assert_eq!(post(bad, Some(&credential)).await.unwrap().status(), 400, "not a minute");

    let from = |t: i64| chrono_text(t);
    let path = format!("/v1/caches/{id}/usage?granularity=hour&from={}&to={}", from(hour), from(hour + 7200));
    let body = split.api(reqwest::Method::GET, &path, None).await;
    let points = body["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{body}");
    assert_eq!(points[0]["start"], from(hour));
    assert_eq!(points[0]["commands"], 11, "both minutes, the batch once");
    assert_eq!(points[0]["ecpu"], 11.0);
    assert_eq!(points[0]["throttled"], 6);
    assert_eq!(points[0]["storage_bytes"], 0);
    assert_eq!(points[1]["commands"], 0);
    let path = format!("/v1/caches/{id}/usage?from={}&to={}", from(hour + 60), from(hour + 180));
    let body = split.api(reqwest::Method::GET, &path, None).await;
    let commands: Vec<u64> =
        body["points"].as_array().unwrap().iter().map(|p| p["commands"].as_u64().unwrap()).collect();
    assert_eq!(commands, vec![5, 6]);

    for query in ["granularity=day", "from=yesterday", "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z"] {
        let url = format!("http://127.0.0.1:{}/v1/caches/{id}/usage?{query}", split.rest);
        let admin = std::fs::read_to_string(split.path("admin.token")).unwrap();
        let resp = split.http.get(url).bearer_auth(admin.trim()).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{query}");
    }
}

/// A Unix time as RFC 3339 UTC (whole seconds), as the usage API writes it.
fn chrono_text(t: i64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{t}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `(start, connections, commands)` of each point of `GET /v1/caches/{id}/usage?{query}`.
async fn connection_points(dev: &ShoalDev, cache: &str, query: &str) -> Vec<(String, u64, u64)> {
    let (status, body) =
        dev.api(reqwest::Method::GET, &format!("/v1/caches/{cache}/usage?{query}"), None).await;
    assert_eq!(status, 200, "{body}");
    body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {p}"));
            (p["start"].as_str().unwrap().to_string(), n("connections"), n("commands"))
        })
        .collect()
}

async fn post_connections_batch(
    dev: &ShoalDev,
    credential: &str,
    gateway: &str,
    seq: u64,
    usage: serde_json::Value,
) -> bool {
    let body = serde_json::json!({"gateway_id": gateway, "seq": seq, "usage": usage});
    let resp = dev
        .http
        .post(dev.internal_url("/internal/v1/usage"))
        .bearer_auth(credential)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json::<serde_json::Value>().await.unwrap()["stored"].as_bool().unwrap()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Real clients held open through the gateway, without a metered command: each minute's point
/// reports how many were open at once, a resent batch changes nothing, and once most of them
/// close the next minute reports the one left.
#[tokio::test(flavor = "multi_thread")]
async fn connections_of_real_clients_are_reported_per_minute() {
    const N: u64 = 4;
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("connected").await;
    let id = cache["id"].as_str().unwrap().to_string();
    let token = dev.mint_token(&id).await;
    let mut conns = Vec::new();
    for _ in 0..N {
        let mut c = dev.client(&token).await.unwrap();
        let pong: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
        assert_eq!(pong, "PONG");
        conns.push(c);
    }

    // Held open across a few batch intervals. PING is free: the points' only source is
    // the connections themselves.
    let deadline = Instant::now() + Duration::from_secs(20);
    let points = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let points = connection_points(&dev, &id, "").await;
        assert!(points.iter().all(|p| p.1 <= N && p.2 == 0), "never more than N, no commands: {points:?}");
        if points.iter().any(|p| p.1 == N) {
            break points;
        }
        assert!(Instant::now() < deadline, "connections never reported: {points:?}");
    };

    // The gateway's first batch again (its credential and id from its files), claiming many
    // more connections: stored once already, so nothing changes.
    let credential = std::fs::read_to_string(dev.dir.join(".shoal/gateway/internal.credential")).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dev.dir.join(".shoal/gateway/usage/state.json")).unwrap())
            .unwrap();
    let gateway = state["gateway_id"].as_str().unwrap();
    let minute = unix_now() - unix_now() % 60;
    let fake = serde_json::json!([{"cache_id": id, "minute": minute, "commands": 0, "ecpu_milli": 0,
        "bytes_in": 0, "bytes_out": 0, "hits": 0, "misses": 0, "throttled": 0, "errors": 0,
        "peak_connections": 1000}]);
    assert!(
        !post_connections_batch(&dev, credential.trim(), gateway, 0, fake.clone()).await,
        "seq 0 was stored before"
    );
    let again = connection_points(&dev, &id, "").await;
    assert!(again.iter().all(|p| p.1 <= N), "a resent batch changed the connections: {again:?}");
    assert!(again.iter().any(|p| p.1 == N), "{again:?} (before: {points:?})");

    // All but one close; the minute after that reports 1.
    conns.truncate(1);
    // The gateway sees the closes a moment later: the minutes checked start 2 s on, so a
    // minute that turns meanwhile is not counted as "after closing".
    let closed = unix_now() + 2;
    let next_minute = closed - closed % 60 + 60;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let points = connection_points(&dev, &id, "").await;
        let later: Vec<_> =
            points.iter().filter(|p| p.0.as_str() >= chrono_text(next_minute).as_str()).collect();
        assert!(later.iter().all(|p| p.1 <= 1), "after closing: {points:?}");
        if later.iter().any(|p| p.1 == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "the remaining connection was never reported: {points:?}");
    }
    let pong: String = redis::cmd("PING").query_async(&mut conns[0]).await.unwrap();
    assert_eq!(pong, "PONG", "the one left still works");
}

/// Batches from two gateways, posted the way gateways post them: a minute's connections are
/// the sum over gateways of each one's largest report, an hour's the largest minute's; a
/// resent batch counts once; an entry with only connections adds no (billable) usage row.
#[tokio::test]
async fn connections_are_the_sum_over_gateways_of_each_ones_peak() {
    let dev = ShoalDev::start().await;
    let id = dev.create_cache("gateways").await["id"].as_str().unwrap().to_string();
    let credential = dev.gateway_credential("connections-test").await;
    let post = |gateway: &'static str, seq: u64, usage: serde_json::Value| {
        let (dev, credential) = (&dev, credential.clone());
        async move { post_connections_batch(dev, &credential, gateway, seq, usage).await }
    };
    let hour = unix_now() - unix_now() % 3600 - 3600;
    let (a, b) = (hour + 60, hour + 120);
    let entry = |minute: i64, commands: u64, peak: u32| {
        serde_json::json!({"cache_id": id, "minute": minute, "commands": commands, "ecpu_milli": commands * 1000,
            "bytes_in": 0, "bytes_out": 0, "hits": 0, "misses": 0, "throttled": 0, "errors": 0,
            "peak_connections": peak})
    };
    // g1 reports 3, 5, 2 connections within minute a (the largest counts), then 1 in b.
    assert!(post("g1", 1, serde_json::json!([entry(a, 5, 3)])).await);
    assert!(post("g1", 2, serde_json::json!([entry(a, 0, 5)])).await);
    assert!(post("g1", 3, serde_json::json!([entry(a, 0, 2)])).await);
    assert!(post("g1", 4, serde_json::json!([entry(b, 0, 1)])).await);
    // g2 has 4 clients of the cache in minute a and 7 in b.
    assert!(post("g2", 1, serde_json::json!([entry(a, 1, 4), entry(b, 0, 7)])).await);
    // Resends, one claiming more: stored once, nothing changes.
    assert!(!post("g1", 2, serde_json::json!([entry(a, 0, 50)])).await);
    assert!(!post("g2", 1, serde_json::json!([entry(a, 1, 4), entry(b, 0, 7)])).await);
    // A batch from an older gateway (no peak_connections field) still counts its commands.
    let old = serde_json::json!([{"cache_id": id, "minute": a, "commands": 2, "ecpu_milli": 2000,
        "bytes_in": 0, "bytes_out": 0, "hits": 0, "misses": 0, "throttled": 0, "errors": 0}]);
    assert!(post("g-old", 1, old).await);

    let minutes =
        connection_points(&dev, &id, &format!("from={}&to={}", chrono_text(hour), chrono_text(hour + 240)))
            .await;
    let want = |m: i64, conns: u64, commands: u64| (chrono_text(m), conns, commands);
    assert_eq!(
        minutes,
        vec![want(hour, 0, 0), want(a, 5 + 4, 8), want(b, 1 + 7, 0), want(hour + 180, 0, 0)],
        "per minute: the sum of each gateway's peak"
    );
    let hours = connection_points(
        &dev,
        &id,
        &format!("granularity=hour&from={}&to={}", chrono_text(hour), chrono_text(hour + 3600)),
    )
    .await;
    assert_eq!(hours, vec![want(hour, 9, 8)], "per hour: the largest minute");

    // Minute b had connections only: no usage row (billing sees only minute a).
    let rows = dev.sql(&format!("SELECT minute FROM usage_minutes WHERE cache_id = '{id}'"));
    assert_eq!(rows, vec![chrono_text(a)]);
    let conn_rows = dev.sql(&format!("SELECT COUNT(*) FROM usage_connections WHERE cache_id = '{id}'"));
    assert_eq!(conn_rows, vec!["4"], "g1 and g2 in minutes a and b");
}

#[tokio::test]
async fn big_free_commands_and_long_scripts_are_billed_for_what_they_cost() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("costly").await;
    let id = cache["id"].as_str().unwrap().to_string();
    let token = dev.mint_token(&id).await;
    let mut c = Raw::connect(dev.resp_port, &token).await;

    // PING with a 1 MiB message: 2 MiB moved, billed by transfer (2048 ECPU), not a command.
    let message = vec![b'p'; 1024 * 1024];
    c.s.write_all(&cmd(&[b"PING", &message])).await.unwrap();
    let reply = c.reply().await;
    assert_eq!(reply.len(), message.len() + 12);
    let ping = (cmd(&[b"PING", &message]).len() + reply.len()) as u64;
    let mut want =
        Totals { ecpu_milli: ping * 1000 / 1024, bytes_in: ping - reply.len() as u64, ..Default::default() };
    want.bytes_out = reply.len() as u64;
    assert_stored(&dev, &id, want).await;

    // A script that runs a few hundred milliseconds costs 1 ECPU per started millisecond
    // after the first, on top of its weight (1 ECPU): about what the client waited.
    let script = b"local i = 0 while i < 20000000 do i = i + 1 end return 1";
    let sent = Instant::now();
    c.s.write_all(&cmd(&[b"EVAL", script, b"0"])).await.unwrap();
    assert_eq!(c.reply().await, b":1\r\n");
    let waited_ms = sent.elapsed().as_millis() as u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = stored(&dev, &id).await;
        if got.commands == 1 {
            let for_time = got.ecpu_milli - want.ecpu_milli - 1000;
            assert!(
                for_time <= waited_ms * 1000 && for_time + 100_000 >= waited_ms * 1000,
                "the script cost {for_time} milli-ECPU for its time; the client waited {waited_ms} ms"
            );
            break;
        }
        assert!(Instant::now() < deadline, "script never billed: {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // AUTH or HELLO with a 100 KiB argument is refused without being looked at.
    let huge = vec![b'a'; 100 * 1024];
    c.s.write_all(&cmd(&[b"AUTH", &huge])).await.unwrap();
    let refusal = String::from_utf8(c.reply().await).unwrap();
    assert!(refusal.starts_with("-ERR request too large") && refusal.contains("AUTH"), "{refusal}");
}
