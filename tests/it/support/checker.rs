//! A checker: one client per cache writing and reading known keys through the gateways
//! (`SET chk:<i mod 64> <cache>-<i>`, then `GET` of it, which must return that value), as a
//! tenant's application would, counting per cache what was answered, what failed and what
//! read back wrong. A client whose gateway goes away (refused, reset) reconnects to the next
//! gateway; a command that fails or takes over a second is an error, and the client makes a
//! new connection to the same gateway. A failed pair is retried as it was (the same key and
//! value), so a late write can never be mistaken for a lost one.
//!
//! The usage the answered commands should have cost is computed by the metering rule
//! (README, "Metering"): a small GET or SET is its weight, 1000 milli-ECPU.

use shoal_types::UsageCounters;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a command (or a connection's setup) may take before it counts as failed.
pub const TIMEOUT: Duration = Duration::from_secs(1);

/// A cache to check, its token, and the gateway its client starts on.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    pub token: String,
    pub gateway: usize,
}

/// What a cache's client saw so far (read while it runs).
#[derive(Default, Debug)]
pub struct Live {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub mismatches: AtomicU64,
    /// The gateway it uses now.
    pub gateway: AtomicU64,
    /// The last error, for messages.
    pub last_error: Mutex<String>,
}

/// One answered command: when, on which gateway, and what the rule says it costs.
#[derive(Clone, Copy, Debug)]
pub struct Answered {
    pub at: Instant,
    pub gateway: usize,
    pub usage: UsageCounters,
}

/// What a cache's client saw, at the end.
#[derive(Debug, Default)]
pub struct Report {
    pub cache: String,
    /// Commands answered (SET and GET).
    pub ok: u64,
    /// Failed commands and failed connection attempts.
    pub errors: u64,
    /// GETs that returned something other than the value just written.
    pub mismatches: u64,
    /// Connections made after the first, and how many of them went to another gateway.
    pub reconnects: u64,
    pub failovers: u64,
    pub first_error: Option<Instant>,
    pub last_error: Option<Instant>,
    /// Time spent failing: from the start of each failed attempt after a success to the
    /// next success.
    pub error_time: Duration,
    /// The usage the answered commands cost by the rule.
    pub want: UsageCounters,
    pub answered: Vec<Answered>,
    /// Per key, the value of its last acknowledged SET, and of a later SET that failed (it
    /// may have run): what the key must hold at the end (see [`lost_writes`]).
    pub acked: HashMap<String, String>,
    pub unacked: HashMap<String, String>,
}

impl Report {
    /// The usage of the commands answered by `gateway` after `since`.
    pub fn usage_on_since(&self, gateway: usize, since: Instant) -> UsageCounters {
        let mut out = UsageCounters::default();
        for a in self.answered.iter().filter(|a| a.gateway == gateway && a.at >= since) {
            out.add(&a.usage);
        }
        out
    }
}

pub struct Checker {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Report>>,
    pub live: Vec<Arc<Live>>,
    pub names: Vec<String>,
}

impl Checker {
    /// Starts a client per target on `gateways` (their RESP addresses), a SET and a GET
    /// every `pace`.
    pub fn start(targets: &[Target], gateways: Vec<SocketAddr>, pace: Duration) -> Checker {
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut live = Vec::new();
        for t in targets {
            let l = Arc::new(Live::default());
            l.gateway.store(t.gateway as u64, Ordering::Relaxed);
            live.push(l.clone());
            tasks.push(tokio::spawn(run(t.clone(), gateways.clone(), pace, l, stopped.clone())));
        }
        Checker { stop, tasks, live, names: targets.iter().map(|t| t.name.clone()).collect() }
    }

    /// (ok, errors, mismatches) of each cache so far.
    pub fn counts(&self) -> Vec<(u64, u64, u64)> {
        self.live
            .iter()
            .map(|l| {
                (
                    l.ok.load(Ordering::Relaxed),
                    l.errors.load(Ordering::Relaxed),
                    l.mismatches.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Waits until every cache in `which` answered `n` more commands than now (within
    /// `within`; the message says which did not).
    pub async fn progress(&self, which: &[usize], n: u64, within: Duration) {
        let start: Vec<u64> = self.counts().iter().map(|c| c.0).collect();
        let deadline = Instant::now() + within;
        loop {
            let now = self.counts();
            if which.iter().all(|&i| now[i].0 >= start[i] + n) {
                return;
            }
            if Instant::now() > deadline {
                let stuck: Vec<String> = which
                    .iter()
                    .filter(|&&i| now[i].0 < start[i] + n)
                    .map(|&i| format!("{}: {}", self.names[i], self.live[i].last_error.lock().unwrap()))
                    .collect();
                panic!("no progress in {within:?}: {stuck:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every client (each finishes its pair) and returns what each saw.
    pub async fn stop(self) -> Vec<Report> {
        self.stop.send(true).unwrap();
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.expect("a checker task panicked"));
        }
        out
    }
}

/// What `cmd`, answered `reply_len` bytes, costs by the rule (a small GET or SET: weight
/// 1000; the bytes term wins only past 1 KiB).
fn cost(cmd: &redis::Cmd, reply_len: usize, hit: bool, get: bool) -> UsageCounters {
    let request = cmd.get_packed_command().len() as u64;
    let bytes = request + reply_len as u64;
    UsageCounters {
        commands: 1,
        ecpu_milli: 1000u64.max(bytes * 1000 / 1024),
        bytes_in: request,
        bytes_out: reply_len as u64,
        hits: (get && hit) as u64,
        misses: (get && !hit) as u64,
        throttled: 0,
        errors: 0,
    }
}

async fn connect(addr: SocketAddr, token: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(format!("redis://:{token}@{addr}/")).map_err(|e| e.to_string())?;
    match tokio::time::timeout(TIMEOUT * 2, client.get_multiplexed_async_connection()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
        Err(_) => Err(format!("connect {addr}: timed out")),
    }
}

/// A command's reply within [`TIMEOUT`]; Err says why not, and whether the connection itself
/// broke (refused, reset, closed: time to try another gateway).
async fn query<T: redis::FromRedisValue>(
    conn: &mut redis::aio::MultiplexedConnection,
    cmd: &redis::Cmd,
) -> Result<T, (String, bool)> {
    match tokio::time::timeout(TIMEOUT, cmd.query_async::<T>(conn)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let broken = e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal();
            Err((e.to_string(), broken))
        }
        Err(_) => Err(("timed out".into(), false)),
    }
}

async fn run(
    target: Target,
    gateways: Vec<SocketAddr>,
    pace: Duration,
    live: Arc<Live>,
    stop: watch::Receiver<bool>,
) -> Report {
    let mut report = Report { cache: target.name.clone(), ..Default::default() };
    let mut gateway = target.gateway;
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut connected_once = false;
    // When the current run of failures began (None while things work).
    let mut failing_since: Option<Instant> = None;
    let mut i: u64 = 0;
    let fail = |report: &mut Report, failing_since: &mut Option<Instant>, began: Instant, why: String| {
        let now = Instant::now();
        report.errors += 1;
        report.first_error.get_or_insert(now);
        report.last_error = Some(now);
        failing_since.get_or_insert(began);
        live.errors.fetch_add(1, Ordering::Relaxed);
        *live.last_error.lock().unwrap() = why;
    };
    while !*stop.borrow() {
        let began = Instant::now();
        let c = match &mut conn {
            Some(c) => c,
            None => match connect(gateways[gateway], &target.token).await {
                Ok(c) => {
                    if connected_once {
                        report.reconnects += 1;
                    }
                    connected_once = true;
                    conn.insert(c)
                }
                Err(why) => {
                    fail(&mut report, &mut failing_since, began, why);
                    // Refused or unreachable: the next gateway (a load balancer's job).
                    gateway = (gateway + 1) % gateways.len();
                    report.failovers += 1;
                    live.gateway.store(gateway as u64, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let key = format!("chk:{}", i % 64);
        let value = format!("{}-{i}", target.name);
        let set = redis::cmd("SET").arg(&key).arg(&value).clone();
        let get = redis::cmd("GET").arg(&key).clone();
        let mut failed = match query::<()>(c, &set).await {
            Ok(()) => {
                report.unacked.remove(&key);
                report.acked.insert(key.clone(), value.clone());
                record(
                    &mut report,
                    &live,
                    Answered { at: Instant::now(), gateway, usage: cost(&set, 5, false, false) },
                );
                None
            }
            Err(e) => {
                report.unacked.insert(key.clone(), value.clone());
                Some(e)
            }
        };
        if failed.is_none() {
            match query::<Option<String>>(c, &get).await {
                Ok(got) => {
                    let reply_len =
                        got.as_ref().map_or(5, |v| format!("${}\r\n", v.len()).len() + v.len() + 2);
                    let usage = cost(&get, reply_len, got.is_some(), true);
                    record(&mut report, &live, Answered { at: Instant::now(), gateway, usage });
                    if got.as_deref() != Some(value.as_str()) {
                        report.mismatches += 1;
                        live.mismatches.fetch_add(1, Ordering::Relaxed);
                        *live.last_error.lock().unwrap() = format!("GET {key}: {got:?}, wrote {value:?}");
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            None => {
                if let Some(since) = failing_since.take() {
                    report.error_time += since.elapsed();
                }
                i += 1;
                tokio::time::sleep(pace).await;
            }
            Some((why, broken)) => {
                fail(&mut report, &mut failing_since, began, why);
                conn = None;
                if broken {
                    gateway = (gateway + 1) % gateways.len();
                    report.failovers += 1;
                    live.gateway.store(gateway as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    if let Some(since) = failing_since {
        report.error_time += since.elapsed();
    }
    report
}

fn record(report: &mut Report, live: &Live, a: Answered) {
    report.ok += 1;
    report.want.add(&a.usage);
    report.answered.push(a);
    live.ok.fetch_add(1, Ordering::Relaxed);
}

/// A new connection to `addr` with `token`, then a SET and a GET of `key`: how long the
/// connection took to be usable, and what the two commands cost by the rule.
pub async fn one_pair(
    addr: SocketAddr,
    token: &str,
    key: &str,
    value: &str,
) -> Result<(Duration, UsageCounters), String> {
    let started = Instant::now();
    let mut conn = connect(addr, token).await?;
    let took = started.elapsed();
    let set = redis::cmd("SET").arg(key).arg(value).clone();
    let get = redis::cmd("GET").arg(key).clone();
    query::<()>(&mut conn, &set).await.map_err(|e| format!("SET: {}", e.0))?;
    let got: Option<String> = query(&mut conn, &get).await.map_err(|e| format!("GET: {}", e.0))?;
    if got.as_deref() != Some(value) {
        return Err(format!("GET {key}: {got:?}, wrote {value:?}"));
    }
    let mut usage = cost(&set, 5, false, false);
    usage.add(&cost(&get, format!("${}\r\n", value.len()).len() + value.len() + 2, true, true));
    Ok((took, usage))
}

/// How many keys of `report`'s cache hold neither their last acknowledged value nor that of a
/// later SET that failed: acknowledged writes lost (read through the gateway at `addr`).
pub async fn lost_writes(addr: SocketAddr, token: &str, report: &Report) -> Result<u64, String> {
    let mut conn = connect(addr, token).await?;
    let mut lost = 0;
    for (key, acked) in &report.acked {
        let got: Option<String> =
            query(&mut conn, redis::cmd("GET").arg(key)).await.map_err(|e| format!("GET {key}: {}", e.0))?;
        if got.as_ref() != Some(acked) && got.as_ref() != report.unacked.get(key) {
            lost += 1;
        }
    }
    Ok(lost)
}
