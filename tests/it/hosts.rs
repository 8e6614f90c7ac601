//! Many machines (issue 19): control planes, engine hosts and gateways each in its own
//! network namespace with its own address, on PostgreSQL (`support::hosts`), under a running
//! workload (`support::checker`: known keys written and read back on several caches), while
//! one part fails. Each test prints `FIGURE …` lines (docs/operations.md, "Run it on many
//! machines" quotes them).
//!
//! One control plane, but in the scenario of two (the background jobs' leases, the limits
//! coordinator reached through either, `kill -9` of the one that holds them).

use crate::support::checker::{self, one_pair, Checker, Report, Target};
use crate::support::hosts::{Cache, Deployment, Layout, Net, NodeSeen};
use shoal_types::UsageCounters;
use std::time::{Duration, Instant};

/// A SET and a GET per cache every 10 ms (with four caches, ~700 commands a second).
const PACE: Duration = Duration::from_millis(10);

/// The deployment, or None (the reason printed) where network namespaces cannot be used —
/// unless `SHOAL_TEST_HOSTS=required` (scripts/test.sh), where that fails the test.
async fn deployment(layout: Layout) -> Option<Deployment> {
    Deployment::start(layout).await.map_err(unusable).ok()
}

fn unusable(why: String) {
    if std::env::var("SHOAL_TEST_HOSTS").as_deref() == Ok("required") {
        panic!("SHOAL_TEST_HOSTS=required, but network namespaces are unusable: {why}");
    }
    println!("SKIPPED: network namespaces are unusable here: {why}");
}

/// Cache j's client starts on gateway j mod G.
fn targets(caches: &[Cache], gateways: usize) -> Vec<Target> {
    caches
        .iter()
        .enumerate()
        .map(|(j, c)| Target { name: c.name.clone(), token: c.token.clone(), gateway: j % gateways })
        .collect()
}

fn gateways(dep: &Deployment) -> Vec<std::net::SocketAddr> {
    (0..dep.gateways.len()).map(|g| dep.gateway(g)).collect()
}

/// The usage the control plane stored for a cache (the last hour's minutes, summed).
async fn stored(dep: &Deployment, cache: &Cache) -> UsageCounters {
    let body = dep.api(reqwest::Method::GET, &format!("/v1/caches/{}/usage", cache.id), None).await;
    let mut total = UsageCounters::default();
    for p in body["points"].as_array().unwrap() {
        total.add(&UsageCounters::from_values(UsageCounters::NAMES.map(|k| p[k].as_u64().unwrap())));
    }
    total
}

/// `a - b`, counter by counter; None if any of `b`'s is larger.
fn minus(a: &UsageCounters, b: &UsageCounters) -> Option<UsageCounters> {
    let (a, b) = (a.values(), b.values());
    let mut out = [0u64; 8];
    for i in 0..8 {
        out[i] = a[i].checked_sub(b[i])?;
    }
    Some(UsageCounters::from_values(out))
}

fn at_most(a: &UsageCounters, b: &UsageCounters) -> bool {
    a.values().iter().zip(b.values()).all(|(x, y)| *x <= y)
}

/// What one command of the checker's can cost at most: the most any answered one did, as a
/// hit or a miss.
fn one_command_at_most(r: &Report) -> UsageCounters {
    let mut most = [0u64; 8];
    for a in &r.answered {
        for (m, v) in most.iter_mut().zip(a.usage.values()) {
            *m = (*m).max(v);
        }
    }
    let mut most = UsageCounters::from_values(most);
    (most.hits, most.misses) = (1, 1);
    most
}

/// Waits until the stored usage of `cache` has not changed for 3 s (the gateways send a
/// batch a second) and returns it.
async fn settled(dep: &Deployment, cache: &Cache) -> UsageCounters {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = stored(dep, cache).await;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = stored(dep, cache).await;
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(3) {
            return now;
        }
        assert!(Instant::now() < deadline, "the usage of {} never settled: {now:?}", cache.name);
    }
}

/// Waits until the stored usage of each cache is what the checker computed, then checks that
/// it stays so: when each was first seen.
async fn assert_stored_exactly(dep: &Deployment, wanted: &[(&Cache, UsageCounters)]) -> Vec<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = vec![None; wanted.len()];
    while seen.iter().any(Option::is_none) {
        for (i, (cache, want)) in wanted.iter().enumerate() {
            if seen[i].is_some() {
                continue;
            }
            let got = stored(dep, cache).await;
            if got == *want {
                seen[i] = Some(Instant::now());
                continue;
            }
            assert!(
                Instant::now() < deadline,
                "{}: stored {got:?}\n  the checker's {want:?}\n{}",
                cache.name,
                dep.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (cache, want) in wanted {
        assert_eq!(stored(dep, cache).await, *want, "{}: nothing is counted twice", cache.name);
    }
    seen.into_iter().map(Option::unwrap).collect()
}

/// The ECPU the invoices of `months` bill for `cache`, in milli-ECPU.
async fn invoiced(dep: &Deployment, cache: &Cache, months: &[String]) -> u64 {
    let mut total = 0;
    for month in months {
        let invoice =
            dep.api(reqwest::Method::GET, &format!("/v1/invoices/{}-{month}", cache.account), None).await;
        for line in invoice["lines"].as_array().unwrap() {
            if line["meter"] == "ecpu" && line["cache_id"] == cache.id.as_str() {
                total += crate::support::milli_ecpu(&line["quantity"]) as u64;
            }
        }
    }
    total
}

/// Each gateway's usage batches not yet acknowledged (its `/metrics`).
async fn pending_batches(dep: &Deployment) -> Vec<u64> {
    let mut out = Vec::new();
    for g in 0..dep.gateways.len() {
        let text = dep.gateway_metrics(g).await;
        let n = text
            .lines()
            .find_map(|l| l.strip_prefix("shoal_gateway_usage_batches_pending "))
            .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64);
        out.push(n);
    }
    out
}

fn month_now() -> String {
    chrono::Utc::now().format("%Y-%m").to_string()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

fn valkey_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains("valkey-server"))
}

/// A raw client that waits for its replies (up to a minute).
struct PatientClient(tokio::io::BufReader<tokio::net::TcpStream>);

impl PatientClient {
    async fn connect(gateway: std::net::SocketAddr, token: &str) -> PatientClient {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut s = tokio::io::BufReader::new(tokio::net::TcpStream::connect(gateway).await.unwrap());
        s.get_mut().write_all(&crate::support::auth_command(token)).await.unwrap();
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        assert_eq!(line, "+OK\r\n");
        PatientClient(s)
    }

    /// `GET k`: the reply's first line, and how long it took.
    async fn get(&mut self) -> (String, Duration) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let started = Instant::now();
        self.0.get_mut().write_all(&crate::support::encode(&["GET", "k"])).await.unwrap();
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_secs(60), self.0.read_line(&mut line)).await {
            Ok(Ok(_)) => (line, started.elapsed()),
            Ok(Err(e)) => (format!("connection error: {e}"), started.elapsed()),
            Err(_) => ("no reply in a minute".into(), started.elapsed()),
        }
    }
}

fn figure_line(r: &Report, host: &str) -> String {
    format!(
        "cache {} (engine host {host}): {} commands answered, {} errors over {:.2} s, {} mismatches, {} reconnects",
        r.cache,
        r.ok,
        r.errors,
        r.error_time.as_secs_f64(),
        r.mismatches,
        r.reconnects
    )
}

/// An engine host cut off the network (its link down for 10 s): the caches on its node get
/// errors, those on the other host none — not even new connections; the control plane sees
/// the node go unhealthy and come back; after the heal every cache serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_an_engine_host_off_fails_only_the_caches_on_it() {
    let Some(dep) = deployment(Layout::default()).await else { return };
    let caches = dep.caches_on_every_host("cut", 4).await;
    let checker = Checker::start(&targets(&caches, dep.gateways.len()), gateways(&dep), PACE);
    let all: Vec<usize> = (0..caches.len()).collect();
    checker.progress(&all, 50, Duration::from_secs(20)).await;
    let (on_cut, others): (Vec<usize>, Vec<usize>) =
        all.iter().partition(|&&i| caches[i].engine_host == Some(0));
    let cut_node = &dep.nodes.iter().find(|n| n.engine_host == 0).unwrap().name;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let cut = &dep.engine_hosts[0].host;
    // A client that waits as long as it takes (no timeout of its own), of a cache on the
    // host about to be cut, logged in before.
    let mut patient = PatientClient::connect(dep.gateway(0), &caches[on_cut[0]].token).await;
    let at_cut = checker.counts();
    dep.net.cut(cut);
    let cut_at = Instant::now();
    let patient = tokio::spawn(async move { patient.get().await });
    // The other host's caches carry on, and take new connections on every gateway.
    checker.progress(&others, 100, Duration::from_secs(10)).await;
    for g in 0..dep.gateways.len() {
        for &i in &others {
            let c = &caches[i];
            if let Err(e) = one_pair(dep.gateway(g), &c.token, "fresh", "during-the-cut").await {
                panic!("{} on gateway {g} during the cut: {e}\n{}", c.name, dep.log());
            }
        }
    }
    // The control plane sees the node go down (and only it).
    let detected = loop {
        let seen = dep.nodes_seen().await;
        let state = |name: &str| seen.iter().find(|n| n.name == name).map(|n| n.healthy);
        if state(cut_node) == Some(false) {
            assert!(seen.iter().filter(|n| n.name != *cut_node).all(|n| n.healthy), "{seen:?}");
            break cut_at.elapsed();
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(15),
            "the control plane never saw {cut_node} down: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (reply, waited) = patient.await.unwrap();
    assert!(
        reply.starts_with("-ERR") && waited < Duration::from_secs(10),
        "a GET to the cut host's cache was answered {reply:?} after {waited:?}: it should fail, not hang"
    );
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed())).await;
    let during = checker.counts();
    for &i in &on_cut {
        assert!(during[i].1 > 0, "{} (on the cut host) saw no error", caches[i].name);
    }

    dep.net.heal(cut);
    let healed_at = Instant::now();
    let cut_for = cut_at.elapsed();
    // Every cache serves again: how long after the heal.
    let at_heal: Vec<u64> = checker.counts().iter().map(|c| c.0).collect();
    let recovered = loop {
        let now = checker.counts();
        if on_cut.iter().all(|&i| now[i].0 > at_heal[i] + 10) {
            break healed_at.elapsed();
        }
        assert!(
            healed_at.elapsed() < Duration::from_secs(60),
            "the cut host's caches never served again: {:?}\n{}",
            on_cut.iter().map(|&i| checker.live[i].last_error.lock().unwrap().clone()).collect::<Vec<_>>(),
            dep.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    dep.wait_for_nodes().await;
    checker.progress(&all, 50, Duration::from_secs(20)).await;
    let reports = checker.stop().await;

    println!("FIGURE engine host cut: {} off the network for {:.1} s", cut.name, cut_for.as_secs_f64());
    println!(
        "FIGURE engine host cut: the control plane saw its node unhealthy after {:.2} s",
        detected.as_secs_f64()
    );
    println!(
        "FIGURE engine host cut: a client without a timeout of its own got {:?} after {:.2} s",
        reply.trim(),
        waited.as_secs_f64()
    );
    println!(
        "FIGURE engine host cut: its caches served again {:.2} s after the link came back",
        recovered.as_secs_f64()
    );
    for (i, r) in reports.iter().enumerate() {
        println!(
            "FIGURE engine host cut: {}; answered {} before the cut, {} during it",
            figure_line(r, &dep.engine_hosts[caches[i].engine_host.unwrap()].host.name),
            at_cut[i].0,
            at_heal[i] - at_cut[i].0
        );
    }
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.mismatches, 0, "{}: a read returned another value than written", r.cache);
        if on_cut.contains(&i) {
            assert!(r.errors > 0, "{}", r.cache);
        } else {
            assert_eq!(r.errors, 0, "{} is on the other host: no error, got {r:?}", r.cache);
        }
    }
}

/// A cluster pool over three engine hosts (two members each: 3 shards × 1 replica, each
/// replica on another host than its primary), one host cut off for 10 s under load: its
/// primary's shard fails over to the replica on another host, so the caches (every one has
/// keys on every shard) see errors for about the node timeout, not the whole cut; no read
/// returns another value than written; after the heal the cut host's nodes rejoin as
/// replicas, and the keeper gives that host a primary again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_an_engine_host_off_fails_its_cluster_shards_over_to_the_other_hosts() {
    let layout =
        Layout { engine_hosts: 3, nodes_per_host: 0, cluster_nodes_per_host: 2, ..Layout::default() };
    let Some(dep) = deployment(layout).await else { return };
    let mut caches = Vec::new();
    for i in 1..=4 {
        caches.push(dep.create_cache(&format!("clu-{i}")).await);
    }
    let shards = dep.cluster_shards().await;
    assert_eq!(shards.len(), 3, "{shards:?}");
    for s in &shards {
        assert_eq!((s.len(), s[0].role.as_str()), (2, "primary"), "{s:?}");
        assert_ne!(s[0].engine_host(), s[1].engine_host(), "a replica on its primary's host: {s:?}");
    }
    // Scaling is not supported for it yet, and says so.
    let scale = dep.http.post(dep.rest_url("/v1/engine/pools/big/shards")).bearer_auth(dep.admin_token());
    let refused = scale.send().await.unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::CONFLICT);
    let why = refused.text().await.unwrap();
    assert!(why.contains("not supported yet for a cluster pool run by engine agents"), "{why}");
    let checker = Checker::start(&targets(&caches, dep.gateways.len()), gateways(&dep), PACE);
    let all: Vec<usize> = (0..caches.len()).collect();
    checker.progress(&all, 50, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let cut = &dep.engine_hosts[0].host;
    let cut_primary =
        shards.iter().map(|s| &s[0]).find(|p| p.engine_host() == 0).expect("a primary on e1").clone();
    let witness = dep.nodes.iter().find(|n| n.clustered && n.engine_host == 1).unwrap().clone();
    let at_cut = checker.counts();
    dep.net.cut(cut);
    let cut_at = Instant::now();
    // The failover, as a node of another host sees it, then as the control plane shows it.
    let failed_over = loop {
        let primaries = dep.primaries_seen_by(&witness).await.unwrap_or_default();
        let off_cut =
            |p: &Option<std::net::SocketAddr>| p.is_some_and(|a| a.ip() != std::net::IpAddr::V4(cut.addr));
        if primaries.len() == 3 && primaries.iter().all(off_cut) {
            break cut_at.elapsed();
        }
        assert!(cut_at.elapsed() < Duration::from_secs(30), "never failed over: {primaries:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let promoted = loop {
        let shards = dep.cluster_shards().await;
        let primaries: Vec<&crate::support::hosts::ShardNodeSeen> = shards.iter().map(|s| &s[0]).collect();
        if primaries.iter().all(|p| p.engine_host() != 0 && p.health == "online") {
            break cut_at.elapsed();
        }
        assert!(cut_at.elapsed() < Duration::from_secs(30), "never failed over: {shards:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every cache serves again (its keys on the cut shard included) before the link is back.
    checker.progress(&all, 20, Duration::from_secs(30)).await;
    let served_again = cut_at.elapsed();
    // A cache user made meanwhile: the cut host's nodes get it when they are back.
    let began = Instant::now();
    let user = serde_json::json!({"username": "alice", "passwords": [USER_PASSWORD], "access_string": "on ~* +@all"});
    dep.api(reqwest::Method::POST, &format!("/v1/caches/{}/users", caches[0].id), Some(user)).await;
    let user_made_in = began.elapsed();
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed())).await;
    let at_heal = checker.counts();
    dep.net.heal(cut);
    let healed_at = Instant::now();
    let cut_for = cut_at.elapsed();
    // The cut host's old primary comes back as a replica; then the keeper moves a primary
    // back to that host (which has none), so one host's loss never takes most primaries.
    let mut rejoined = None;
    let spread = loop {
        let shards = dep.cluster_shards().await;
        let nodes: Vec<_> = shards.iter().flatten().collect();
        let old = nodes.iter().find(|n| n.name == cut_primary.name);
        if rejoined.is_none() && old.is_some_and(|n| n.role == "replica" && n.health == "online") {
            rejoined = Some(healed_at.elapsed());
        }
        let primary_hosts: std::collections::BTreeSet<usize> =
            shards.iter().map(|s| s[0].engine_host()).collect();
        let online = nodes.len() == 6 && nodes.iter().all(|n| n.health == "online");
        if rejoined.is_some() && online && primary_hosts.len() == 3 {
            break healed_at.elapsed();
        }
        assert!(
            healed_at.elapsed() < Duration::from_secs(60),
            "{} never rejoined: {shards:?}\n{}",
            cut_primary.name,
            dep.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    dep.wait_for_nodes().await;
    checker.progress(&all, 50, Duration::from_secs(20)).await;
    let reports = checker.stop().await;
    let mut lost = Vec::new();
    for (c, r) in caches.iter().zip(&reports) {
        lost.push(checker::lost_writes(dep.gateway(0), &c.token, r).await.unwrap());
    }
    // The user made during the cut logs in and writes on every shard, the cut host's primary
    // included; a deleted cache's token is refused.
    let alice = format!("alice@{}", caches[0].id);
    if let Err(e) = write_as(dep.gateway(0), &alice, USER_PASSWORD).await {
        panic!("{alice}: {e}\n{}", dep.log());
    }
    let gone = &caches[3];
    dep.api(reqwest::Method::DELETE, &format!("/v1/caches/{}", gone.id), None).await;
    assert!(one_pair(dep.gateway(0), &gone.token, "k", "v").await.is_err(), "a deleted cache still serves");

    let timeout = crate::support::hosts::CLUSTER_NODE_TIMEOUT.as_secs_f64();
    println!(
        "FIGURE cluster host cut: {} off the network for {:.1} s, node timeout {timeout} s",
        cut.name,
        cut_for.as_secs_f64()
    );
    println!(
        "FIGURE cluster host cut: its primary's shard failed over {:.2} s after the cut (CLUSTER SHARDS of {}); every cache served again {:.2} s after the cut; the control plane showed every shard with a primary off {} after {:.2} s",
        failed_over.as_secs_f64(),
        witness.name,
        served_again.as_secs_f64(),
        cut.name,
        promoted.as_secs_f64()
    );
    println!(
        "FIGURE cluster host cut: after the heal, {} back as a replica after {:.2} s, a primary on every host again after {:.2} s",
        cut_primary.name,
        rejoined.unwrap().as_secs_f64(),
        spread.as_secs_f64()
    );
    println!(
        "FIGURE cluster host cut: a cache user created during the cut in {:.2} s",
        user_made_in.as_secs_f64()
    );
    for (i, r) in reports.iter().enumerate() {
        println!(
            "FIGURE cluster host cut: {}; answered {} during the cut; {} acknowledged writes lost",
            figure_line(r, "all three"),
            at_heal[i].0 - at_cut[i].0,
            lost[i]
        );
    }
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.mismatches, 0, "{}: a read returned another value than written", r.cache);
        assert!(
            r.error_time < Duration::from_secs_f64(3.0 * timeout + 4.0),
            "{}: errors for {:?}, not bounded by the failover",
            r.cache,
            r.error_time
        );
        assert!(at_heal[i].0 > at_cut[i].0 + 20, "{} served during the cut", r.cache);
    }
}

/// A cache user's password in the tests.
const USER_PASSWORD: &str = "a-password-of-twenty-chars";

/// Logs in as cache user `user` on `gateway` and writes and reads 30 keys (spread over every
/// shard of a cluster pool).
async fn write_as(gateway: std::net::SocketAddr, user: &str, password: &str) -> redis::RedisResult<()> {
    let url = format!("redis://{}:{password}@{gateway}/", user.replace('@', "%40"));
    let mut conn = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    for i in 0..30 {
        let key = format!("user-key-{i}");
        let () = redis::cmd("SET").arg(&key).arg(i).query_async(&mut conn).await?;
        let got: i64 = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        assert_eq!(got, i, "{key}");
    }
    Ok(())
}

/// `kill -9` of a gateway under load: its clients reconnect to the other and carry on; the
/// usage the control plane stored is what the clients sent — exactly for the caches the
/// dead gateway never served. For the others, once the dead gateway is restarted on its
/// data dir (and sends what its usage journal kept), nothing is lost, and at most the one
/// command in flight at the kill (run, metered, its reply never read) is more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_clients_carry_on_through_another_and_no_usage_is_doubled() {
    let Some(mut dep) = deployment(Layout::default()).await else { return };
    let caches = dep.caches_on_every_host("failover", 4).await;
    let checker = Checker::start(&targets(&caches, dep.gateways.len()), gateways(&dep), PACE);
    let all: Vec<usize> = (0..caches.len()).collect();
    checker.progress(&all, 50, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let killed_at = Instant::now();
    dep.kill_gateway(0);
    checker.progress(&all, 100, Duration::from_secs(20)).await;
    let carried_on = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reports = checker.stop().await;
    dep.start_gateway(0);
    dep.wait_for_gateway(0).await;

    println!("FIGURE gateway kill -9: every client served again within {:.2} s", carried_on.as_secs_f64());
    for (i, r) in reports.iter().enumerate() {
        let c = &caches[i];
        assert_eq!(r.mismatches, 0, "{}: a read returned another value than written", r.cache);
        let on_killed = r.answered.iter().any(|a| a.gateway == 0);
        let got = if on_killed { settled(&dep, c).await } else { stored(&dep, c).await };
        if !on_killed {
            assert_eq!(r.errors, 0, "{} was on the surviving gateway: {r:?}", r.cache);
            assert_stored_exactly(&dep, &[(c, r.want)]).await;
            println!(
                "FIGURE gateway kill -9: {} (surviving gateway): {} commands, {} milli-ECPU stored = sent",
                r.cache, r.want.commands, r.want.ecpu_milli
            );
            continue;
        }
        assert!(r.failovers >= 1 && r.errors >= 1, "{} did not notice the kill: {r:?}", r.cache);
        assert!(r.error_time < Duration::from_secs(5), "{}: {r:?}", r.cache);
        let over = minus(&got, &r.want).unwrap_or_else(|| {
            panic!(
                "{}: stored {got:?} is less than the answered commands cost {:?}: usage lost",
                r.cache, r.want
            )
        });
        let in_flight = one_command_at_most(r);
        assert!(at_most(&over, &in_flight), "{}: {over:?} more than answered, beyond one command", r.cache);
        let last_second = r.usage_on_since(0, killed_at - Duration::from_secs(1));
        println!(
            "FIGURE gateway kill -9: {}: switched gateway after {} errors over {:.2} s; answered {} commands, \
             stored {} (lost 0; {} in flight at the kill), {} milli-ECPU; the dead gateway answered {} in its last second",
            r.cache,
            r.errors,
            r.error_time.as_secs_f64(),
            r.want.commands,
            got.commands,
            over.commands,
            got.ecpu_milli,
            last_second.commands
        );
    }
    // The restarted gateway sent nothing again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, r) in reports.iter().enumerate() {
        assert!(
            at_most(&stored(&dep, &caches[i]).await, &r.want),
            "{}: counted twice after the restart",
            r.cache
        );
    }
}

/// The control plane `kill -9`ed and started again, then `kill -9`ed and started from a
/// copy of the binary (an upgrade): no Valkey process restarts (the same pids and restart
/// counts, as the agents report them) and no client sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_and_upgrading_the_control_plane_restarts_no_valkey_process() {
    let Some(mut dep) = deployment(Layout::default()).await else { return };
    let caches = dep.caches_on_every_host("upgrade", 4).await;
    let checker = Checker::start(&targets(&caches, dep.gateways.len()), gateways(&dep), PACE);
    let all: Vec<usize> = (0..caches.len()).collect();
    checker.progress(&all, 50, Duration::from_secs(20)).await;
    let before: Vec<NodeSeen> = dep.wait_for_nodes().await;

    let shoal = std::path::PathBuf::from(env!("CARGO_BIN_EXE_shoal"));
    let upgraded = dep.dir().join("shoal-upgraded");
    std::fs::copy(&shoal, &upgraded).unwrap();
    let mut down = Vec::new();
    for (what, binary) in [("restart", &shoal), ("upgrade", &upgraded)] {
        dep.kill_control_plane(0);
        let killed = Instant::now();
        // Without it, every cache serves (for longer than a gateway caches a route).
        checker.progress(&all, 50, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_secs(3).saturating_sub(killed.elapsed())).await;
        let started = Instant::now();
        dep.start_control_plane(0, binary).await;
        let after = dep.wait_for_nodes().await;
        down.push((what, started.elapsed()));
        assert_eq!(after, before, "a Valkey node restarted with the control plane's {what}");
        checker.progress(&all, 50, Duration::from_secs(10)).await;
    }
    for n in &before {
        assert!(valkey_alive(n.pid.unwrap()), "{} ({:?}) is gone", n.name, n.pid);
    }
    // The upgraded control plane provisions: a new cache, served through a gateway.
    let fresh = dep.create_cache("after-upgrade").await;
    one_pair(dep.gateway(0), &fresh.token, "k", "v").await.unwrap();
    let reports = checker.stop().await;

    for (what, took) in &down {
        println!(
            "FIGURE control plane {what} (kill -9, 3 s down, then started): serving, every node reported, {:.2} s after its start",
            took.as_secs_f64()
        );
    }
    println!(
        "FIGURE control plane restart and upgrade: Valkey pids unchanged {:?}",
        before.iter().map(|n| (n.name.as_str(), n.pid.unwrap(), n.restarts.unwrap())).collect::<Vec<_>>()
    );
    for (i, r) in reports.iter().enumerate() {
        println!(
            "FIGURE control plane restart and upgrade: {}",
            figure_line(r, &dep.engine_hosts[caches[i].engine_host.unwrap()].host.name)
        );
        assert_eq!((r.errors, r.mismatches, r.reconnects), (0, 0, 0), "{}: {r:?}", r.cache);
    }
    // The usage of the restarts reached the new control plane, once.
    let wanted: Vec<(&Cache, UsageCounters)> =
        caches.iter().zip(&reports).map(|(c, r)| (c, r.want)).collect();
    assert_stored_exactly(&dep, &wanted).await;
    println!("FIGURE control plane restart and upgrade: usage stored = sent, for every cache");
}

/// Every control plane frozen (SIGSTOP) for 60 s under load: existing connections serve
/// reads and writes, new connections with valid tokens log in (the gateways' last routes
/// and keys), and the usage of the outage reaches the invoice exactly once when the control
/// planes are back. The outage is placed so that the workload ends just before a minute
/// does (an invoice bills completed minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_control_plane_down_for_60_s_caches_serve_and_usage_is_invoiced_once() {
    const OUTAGE: Duration = Duration::from_secs(60);
    const AFTER: f64 = 4.0;
    let Some(dep) = deployment(Layout::default()).await else { return };
    let caches = dep.caches_on_every_host("outage", 4).await;
    let months_from = month_now();
    let checker = Checker::start(&targets(&caches, dep.gateways.len()), gateways(&dep), PACE);
    let all: Vec<usize> = (0..caches.len()).collect();
    checker.progress(&all, 50, Duration::from_secs(20)).await;
    // Start the outage so that the workload stops at second 56 of a minute.
    let now = unix_now();
    let end = now + 3.0 + OUTAGE.as_secs_f64() + AFTER;
    let wait = 3.0 + (56.0 - end % 60.0).rem_euclid(60.0);
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;

    for cp in &dep.control_planes {
        cp.proc.as_ref().unwrap().signal(libc::SIGSTOP);
    }
    let stopped_at = Instant::now();
    let before = checker.counts();
    // New connections while the control planes are down (after the gateways' route cache
    // expired), at the start and near the end: each cache on the gateway that served it.
    let mut extra = vec![UsageCounters::default(); caches.len()];
    let mut connect_times = Vec::new();
    for at in [Duration::from_secs(5), OUTAGE - Duration::from_secs(5)] {
        tokio::time::sleep(at.saturating_sub(stopped_at.elapsed())).await;
        for (j, c) in caches.iter().enumerate() {
            let (took, usage) =
                one_pair(dep.gateway(j % dep.gateways.len()), &c.token, "new", "during-the-outage")
                    .await
                    .unwrap_or_else(|e| panic!("a new connection to {} during the outage: {e}", c.name));
            extra[j].add(&usage);
            connect_times.push(took);
        }
    }
    // A cache a gateway never served cannot be looked up meanwhile: refused, not hung.
    let unseen = one_pair(dep.gateway(1), &caches[0].token, "new", "x").await;
    assert!(unseen.is_err(), "gateway 2 never served {}, yet let it in during the outage", caches[0].name);
    tokio::time::sleep(OUTAGE.saturating_sub(stopped_at.elapsed())).await;
    let during = checker.counts();
    let backlog = pending_batches(&dep).await;
    for cp in &dep.control_planes {
        cp.proc.as_ref().unwrap().signal(libc::SIGCONT);
    }
    let resumed_at = Instant::now();
    // The gateways' backlog of usage batches goes (the current second's may be pending).
    let drained = loop {
        if pending_batches(&dep).await.iter().all(|&n| n <= 1) {
            break resumed_at.elapsed();
        }
        assert!(resumed_at.elapsed() < Duration::from_secs(20), "the usage backlog stays\n{}", dep.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs_f64(AFTER).saturating_sub(resumed_at.elapsed())).await;
    let reports = checker.stop().await;
    let stopped_unix = unix_now();
    let months = {
        let mut m = vec![months_from];
        if month_now() != m[0] {
            m.push(month_now());
        }
        m
    };

    println!(
        "FIGURE control planes down: {:.1} s (SIGSTOP)",
        resumed_at.duration_since(stopped_at).as_secs_f64()
    );
    println!(
        "FIGURE control planes down: the gateways' {backlog:?} usage batches of the outage delivered {:.2} s after",
        drained.as_secs_f64()
    );
    println!(
        "FIGURE control planes down: new connections during the outage took {:.2}–{:.2} s",
        connect_times.iter().min().unwrap().as_secs_f64(),
        connect_times.iter().max().unwrap().as_secs_f64()
    );
    let mut wanted = Vec::new();
    for (j, r) in reports.iter().enumerate() {
        assert_eq!((r.errors, r.mismatches), (0, 0), "{}: {r:?}", r.cache);
        let mut want = r.want;
        want.add(&extra[j]);
        wanted.push((&caches[j], want));
    }
    assert_stored_exactly(&dep, &wanted).await;
    for (j, r) in reports.iter().enumerate() {
        let served = during[j].0 - before[j].0;
        assert!(served > 1000, "{} served {served} commands in the outage", r.cache);
        let want = wanted[j].1;
        println!(
            "FIGURE control planes down: {}: {served} commands answered during the outage, 0 errors; \
             usage stored: {} commands, {} milli-ECPU = sent",
            r.cache, want.commands, want.ecpu_milli
        );
    }
    // The invoice bills completed minutes: once the workload's last one is over.
    let minute_over = (stopped_unix / 60.0).floor() * 60.0 + 61.0;
    tokio::time::sleep(Duration::from_secs_f64((minute_over - unix_now()).max(0.0))).await;
    for (j, r) in reports.iter().enumerate() {
        let want = r.want.ecpu_milli + extra[j].ecpu_milli;
        let deadline = Instant::now() + Duration::from_secs(70);
        loop {
            let got = invoiced(&dep, &caches[j], &months).await;
            if got == want {
                break;
            }
            assert!(got < want, "{}: invoiced {got} milli-ECPU, more than the {want} sent", r.cache);
            assert!(Instant::now() < deadline, "{}: invoiced {got} milli-ECPU, sent {want}", r.cache);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        println!("FIGURE control planes down: {}: invoiced {want} milli-ECPU = sent, once", r.cache);
    }
}

/// The harness itself: the next run that takes K removes what a dead run left under it (its
/// processes too), and a test that panics leaves nothing behind.
#[test]
fn the_harness_leaves_nothing_behind_after_a_dead_run_or_a_panic() {
    let net = match Net::new() {
        Ok(net) => net,
        Err(why) => return unusable(why),
    };
    let k = net.k;
    let sleep = std::path::Path::new("/bin/sleep");
    let mut left = net.host("a").command(sleep).arg("600").spawn().unwrap();
    net.abandon();
    assert!(Net::leftovers(k).contains(&format!("shl{k}-a")));
    assert!(left.try_wait().unwrap().is_none(), "the dead run's process runs on");

    let net = Net::claim(k).unwrap().expect("K is free once its run died");
    let status = left.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    assert_eq!(Net::leftovers(k), [format!("shl{k}")], "only the new bridge");

    let mut running = net.host("b").command(sleep).arg("600").spawn().unwrap();
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _net = net;
        panic!("a test fails (this panic is expected)");
    }));
    assert!(failed.is_err());
    assert_eq!(Net::leftovers(k), Vec::<String>::new());
    // Kept for a failed test's post-mortem: this one failed on purpose.
    let _ = std::fs::remove_dir_all(format!("/tmp/shoal-hosts/shl{k}"));
    let status = running.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
}

/// Each lease's `shoal_lease_held` on control plane `i` (its `/metrics`), by name; None if
/// it does not answer.
async fn leases_held(dep: &Deployment, i: usize) -> Option<Vec<(String, f64)>> {
    let resp = dep
        .http
        .get(dep.control_plane_url(i, "/metrics"))
        .bearer_auth(dep.admin_token())
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let text = resp.text().await.ok()?;
    let mut out: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("shoal_lease_held{lease=\""))
        .filter_map(|l| {
            let (name, value) = l.split_once("\"} ")?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Some(out)
}

/// The newest storage sample of any cache, Unix ms (the store, read with psql).
fn newest_storage_sample(dep: &Deployment) -> i64 {
    let out = std::process::Command::new("psql")
        .arg(&dep.database_url)
        .args(["-Atc", "SELECT coalesce(max(sampled_at), 0) FROM cache_storage"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Two control planes on one PostgreSQL (issue 19). The first to start holds the leases of
/// the storage sampler, the sweep of token ACL users and the snapshot schedule; the limits coordinator is in one
/// of the two, once gateways ask, and the other forwards its gateway's limit reports to it,
/// so a cache's connection limit holds across two gateways that ask different control
/// planes. `kill -9` of the holder: the
/// other takes every lease over within 10 s (the sampler runs there), and the caches serve
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_control_planes_jobs_are_taken_over_by_the_other_within_10_s() {
    let Some(mut dep) = deployment(Layout { control_planes: 2, ..Layout::default() }).await else { return };
    let names = ["acl-sweep", "limits", "snapshot-schedule", "storage-sampler"];
    let held = |v: f64| names.iter().map(|n| (n.to_string(), v)).collect::<Vec<_>>();
    let lease = |list: &Option<Vec<(String, f64)>>, name: &str| {
        list.as_ref().and_then(|l| l.iter().find(|(n, _)| n == name).map(|(_, v)| *v))
    };
    // The agents report to the first control plane only; the second shows the same.
    let reported = dep.wait_for_nodes().await;
    let pools_on_second = dep
        .http
        .get(dep.control_plane_url(1, "/v1/engine/pools"))
        .bearer_auth(dep.admin_token())
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    for node in &reported {
        let seen = pools_on_second["items"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["nodes"].as_array().unwrap())
            .find(|n| n["name"] == node.name.as_str())
            .unwrap_or_else(|| panic!("{} not on the second control plane: {pools_on_second}", node.name));
        assert_eq!(seen["engine_host"]["name"].as_str(), node.agent.as_deref(), "{seen}");
        assert_eq!(seen["engine_host"]["pid"].as_u64(), node.pid.map(u64::from), "{seen}");
    }

    let (cp1, cp2) = (leases_held(&dep, 0).await, leases_held(&dep, 1).await);
    for name in ["acl-sweep", "snapshot-schedule", "storage-sampler"] {
        assert_eq!(
            (lease(&cp1, name), lease(&cp2, name)),
            (Some(1.0), Some(0.0)),
            "{name}: the first to start holds it"
        );
    }

    // Gateway 0 asks control plane 1, gateway 1 control plane 2 (which forwards): clients
    // try both in turn; what they hold is the limit, never more.
    let few = dep
        .api(
            reqwest::Method::POST,
            "/v1/caches",
            Some(serde_json::json!({"name": "few", "limits": {"max_connections": 4}})),
        )
        .await;
    let id = few["id"].as_str().unwrap().to_string();
    let token = dep.api(reqwest::Method::POST, &format!("/v1/caches/{id}/tokens"), None).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let connect = |gateway: std::net::SocketAddr| {
        let login = crate::support::auth_command(&token);
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(gateway).await.unwrap();
            s.write_all(&login).await.unwrap();
            let mut buf = vec![0u8; 512];
            let n = match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => 0,
            };
            match String::from_utf8_lossy(&buf[..n]).into_owned() {
                ok if ok == "+OK\r\n" => Ok(s),
                other => Err(other),
            }
        }
    };
    let mut open = Vec::new();
    let mut refusals = 0;
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        for g in 0..dep.gateways.len() {
            match connect(dep.gateway(g)).await {
                Ok(c) => open.push((g, c)),
                Err(e) => {
                    assert!(e.contains("max number of clients"), "{e}");
                    refusals += 1;
                }
            }
            assert!(open.len() <= 4, "{} connections for a limit of 4\n{}", open.len(), dep.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(open.len(), 4, "the limit is reached ({refusals} refusals)");
    assert!(refusals > 0);
    // Both were asked: one coordinates (the other forwards to it).
    let (cp1, cp2) = (leases_held(&dep, 0).await, leases_held(&dep, 1).await);
    assert_eq!(lease(&cp1, "limits").unwrap() + lease(&cp2, "limits").unwrap(), 1.0, "{cp1:?} {cp2:?}");
    // The connections stay open: the gateways go on reporting the cache (to their control
    // planes), so the survivor still takes part in the limits lease after the kill.

    let caches = dep.caches_on_every_host("ha", 2).await;
    let checker = Checker::start(&targets(&caches, dep.gateways.len()), gateways(&dep), PACE);
    let all: Vec<usize> = (0..caches.len()).collect();
    checker.progress(&all, 50, Duration::from_secs(20)).await;

    dep.kill_control_plane(0);
    let killed = Instant::now();
    let killed_ms = chrono::Utc::now().timestamp_millis();
    let took = loop {
        if leases_held(&dep, 1).await == Some(held(1.0)) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the survivor holds {:?} 10 s after the kill\n{}",
            leases_held(&dep, 1).await,
            dep.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Its storage sampler runs (the killed one's cannot).
    let deadline = Instant::now() + Duration::from_secs(15);
    while newest_storage_sample(&dep) <= killed_ms {
        assert!(Instant::now() < deadline, "no storage sample after the takeover\n{}", dep.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let sampled = killed.elapsed();
    checker.progress(&all, 50, Duration::from_secs(20)).await;
    let reports = checker.stop().await;
    drop(open);
    println!(
        "FIGURE control plane kill -9 (two control planes): the other held every lease {:.2} s after, \
         sampled storage {:.2} s after",
        took.as_secs_f64(),
        sampled.as_secs_f64()
    );
    for (i, r) in reports.iter().enumerate() {
        println!(
            "FIGURE control plane kill -9 (two control planes): {}",
            figure_line(r, &dep.engine_hosts[caches[i].engine_host.unwrap()].host.name)
        );
        assert_eq!((r.errors, r.mismatches), (0, 0), "{}: {r:?}", r.cache);
    }
}
