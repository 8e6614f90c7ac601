//! Many machines on one: each "host" is a network namespace with its own address on a
//! bridge, so control planes, engine hosts and gateways talk over a network as they would
//! between machines (and a host can be cut off by taking its link down). The test process
//! stays in the root namespace and is the client.
//!
//! - [`Net`]: bridge `shlK` with 10.77.K.1/24 in the root namespace, and per host a namespace
//!   `shlK-<name>` whose `eth0` (10.77.K.N/24) is one end of a veth pair, the other end
//!   (`shlK-hN`) on the bridge. K is the first number whose lock file
//!   (`/tmp/shoal-hosts/shlK.lock`, `flock`) no live process holds, so concurrent tests
//!   (nextest runs each in its own process) never share one; taking K first removes what a
//!   dead run left under it. Dropping the `Net` kills every process in its namespaces and
//!   deletes them, their links and the bridge (during a panic too).
//! - [`Deployment`]: on a `Net`, PostgreSQL on host `db`, N control planes (`cp1`…, the
//!   store on that PostgreSQL, `supervisor = "agents"`, internal API over TLS with a
//!   certificate made for their addresses), M engine hosts (`e1`…, each running
//!   `shoal engine` with its Valkey nodes bound to its own address: `e1n0`… of the standalone
//!   pool, `e1c0`… its share of the cluster pool) and G gateways (`gw1`…).

use super::Proc;
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

const LOCKS: &str = "/tmp/shoal-hosts";

/// Runs `ip args…`: its stdout, or why it failed.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn must(result: Result<String, String>) -> String {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// The network namespaces named `shlK-…`.
fn namespaces(k: u8) -> Vec<String> {
    let prefix = format!("shl{k}-");
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// The pids of the processes in namespace `netns`.
fn pids_in(netns: &str) -> Vec<i32> {
    ip(&["netns", "pids", netns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills every process in the namespaces of K (SIGKILL, until none is left).
fn kill_all(k: u8) {
    for netns in namespaces(k) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = pids_in(&netns);
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Removes everything of K: processes, namespaces, links, the bridge.
fn teardown(k: u8) {
    kill_all(k);
    for netns in namespaces(k) {
        let _ = ip(&["netns", "del", &netns]);
    }
    // Bridge ports whose namespace end was never moved (a run that died while creating).
    let (bridge, port) = (format!("shl{k}"), format!("shl{k}-h"));
    for name in links() {
        if name.starts_with(&port) || name == bridge {
            let _ = ip(&["link", "del", &name]);
        }
    }
}

/// The root namespace's network interfaces.
fn links() -> Vec<String> {
    ip(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// A bridge and the hosts on it (see the module's doc).
pub struct Net {
    pub k: u8,
    /// 10.77.K.1, the root namespace's (the test process's) address on the bridge.
    pub root_addr: Ipv4Addr,
    /// Where the hosts' files go (`/tmp/shoal-hosts/shlK`): configs, data, logs. Removed
    /// when the `Net` is dropped, unless a panic is unwinding (then the next run of K does).
    pub dir: PathBuf,
    next: AtomicU8,
    /// Held (flock) while the net lives; None once abandoned.
    lock: Option<std::fs::File>,
}

/// A network namespace with its own address.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    /// The bridge end of its link.
    veth: String,
}

impl Net {
    /// A fresh bridge; Err (why) when network namespaces cannot be made here (not root, no
    /// `ip`, no bridge support): the caller skips, saying so.
    pub fn new() -> Result<Net, String> {
        if unsafe { libc::geteuid() } != 0 {
            return Err(
                "not running as root: network namespaces, veths and bridges need CAP_NET_ADMIN".into()
            );
        }
        ip(&["-V"]).map_err(|e| format!("iproute2 is missing: {e}"))?;
        std::fs::create_dir_all(LOCKS).map_err(|e| format!("{LOCKS}: {e}"))?;
        for k in 1..=250u8 {
            if let Some(net) = Net::claim(k)? {
                return Ok(net);
            }
        }
        Err(format!("no free shlK: 250 locks in {LOCKS} are held"))
    }

    /// Net K, unless a live process holds it (Ok(None)); what a dead run left under K is
    /// removed first.
    pub fn claim(k: u8) -> Result<Option<Net>, String> {
        let path = Path::new(LOCKS).join(format!("shl{k}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        use std::os::fd::AsRawFd;
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(None); // a live test has K
        }
        // K is ours: whatever is left under it is a dead run's.
        teardown(k);
        let dir = Path::new(LOCKS).join(format!("shl{k}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let bridge = format!("shl{k}");
        ip(&["link", "add", &bridge, "type", "bridge"])
            .map_err(|e| format!("cannot make a bridge (network namespaces unusable here): {e}"))?;
        let net =
            Net { k, root_addr: Ipv4Addr::new(10, 77, k, 1), dir, next: AtomicU8::new(2), lock: Some(lock) };
        ip(&["addr", "add", &format!("10.77.{k}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        // A namespace can be made (then so can the hosts').
        ip(&["netns", "add", &format!("shl{k}-probe")])
            .map_err(|e| format!("cannot make a network namespace: {e}"))?;
        let _ = ip(&["netns", "del", &format!("shl{k}-probe")]);
        Ok(Some(net))
    }

    /// Lets go of K as a test process that dies does: its lock is released, nothing removed.
    pub fn abandon(mut self) {
        self.lock = None;
    }

    /// The namespaces, links and bridge K has now (for checks).
    pub fn leftovers(k: u8) -> Vec<String> {
        let mut out = namespaces(k);
        let (bridge, port) = (format!("shl{k}"), format!("shl{k}-h"));
        for name in links() {
            if name.starts_with(&port) || name == bridge {
                out.push(name);
            }
        }
        out
    }

    /// A new host `name` (a-z, 0-9; short): its namespace, link and address 10.77.K.N.
    pub fn host(&self, name: &str) -> Host {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        assert!(n < 255, "at most 253 hosts");
        let k = self.k;
        let host = Host {
            name: name.into(),
            netns: format!("shl{k}-{name}"),
            addr: Ipv4Addr::new(10, 77, k, n),
            veth: format!("shl{k}-h{n}"),
        };
        let inner = format!("{}i", host.veth);
        let ns = host.netns.as_str();
        must(ip(&["netns", "add", ns]));
        must(ip(&["link", "add", &host.veth, "type", "veth", "peer", "name", &inner]));
        must(ip(&["link", "set", &inner, "netns", ns]));
        must(ip(&["-n", ns, "link", "set", &inner, "name", "eth0"]));
        must(ip(&["-n", ns, "addr", "add", &format!("{}/24", host.addr), "dev", "eth0"]));
        must(ip(&["-n", ns, "link", "set", "eth0", "up"]));
        must(ip(&["-n", ns, "link", "set", "lo", "up"]));
        must(ip(&["link", "set", &host.veth, "master", &format!("shl{k}")]));
        must(ip(&["link", "set", &host.veth, "up"]));
        host
    }

    /// Cuts `host` off the network: its link's bridge end goes down (its processes run on,
    /// their packets go nowhere).
    pub fn cut(&self, host: &Host) {
        must(ip(&["link", "set", &host.veth, "down"]));
    }

    /// Puts `host` back on the network.
    pub fn heal(&self, host: &Host) {
        must(ip(&["link", "set", &host.veth, "up"]));
    }

    /// SIGKILL to every process in every namespace of this net.
    pub fn kill_all(&self) {
        kill_all(self.k);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if self.lock.is_none() {
            return; // abandoned
        }
        teardown(self.k);
        if std::thread::panicking() {
            eprintln!("hosts: files of the failed run kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Host {
    /// `program args…` inside this host's namespace (`ip netns exec`, which execs it: the
    /// child's pid is the program's). It gets SIGKILL if the test process dies.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd
    }

    /// The shoal binary `binary` with `args` in this host, its stderr appended to `log`.
    pub fn spawn_binary(&self, binary: &Path, args: &[&str], log: &Path) -> Proc {
        let mut cmd = self.command(binary);
        cmd.args(args);
        Proc::from_command(cmd, log)
    }

    /// `shoal args…` (the binary under test) in this host.
    pub fn spawn(&self, args: &[&str], log: &Path) -> Proc {
        self.spawn_binary(Path::new(env!("CARGO_BIN_EXE_shoal")), args, log)
    }

    pub fn at(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.addr, port))
    }
}

fn postgres_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh")
}

// --- A deployment on many hosts ---

/// How many of each role a [`Deployment`] has.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Control planes, all on the one PostgreSQL (one runs each background job at a time,
    /// under its lease; gateway g asks control plane g mod N, the engine agents the first).
    pub control_planes: usize,
    /// Engine hosts, each an agent (`shoal engine`) with its own Valkey nodes.
    pub engine_hosts: usize,
    /// Valkey nodes per engine host (the standalone pool `main`).
    pub nodes_per_host: usize,
    /// Members per engine host of the cluster pool [`CLUSTER_POOL`] (0: none), one replica
    /// per shard, [`CLUSTER_NODE_TIMEOUT`]; with no standalone nodes it is the default pool.
    pub cluster_nodes_per_host: usize,
    pub gateways: usize,
}

impl Default for Layout {
    fn default() -> Layout {
        Layout {
            control_planes: 1,
            engine_hosts: 2,
            nodes_per_host: 1,
            cluster_nodes_per_host: 0,
            gateways: 2,
        }
    }
}

/// The cluster pool's name (see [`Layout::cluster_nodes_per_host`]).
pub const CLUSTER_POOL: &str = "big";
/// Its `node_timeout` (the default is 5 s; shorter keeps the tests short).
pub const CLUSTER_NODE_TIMEOUT: Duration = Duration::from_secs(2);

const REST_PORT: u16 = 8080;
const INTERNAL_PORT: u16 = 8081;
const RESP_PORT: u16 = 6380;
const GATEWAY_METRICS_PORT: u16 = 9100;
const NODE_PORT: u16 = 6400;
const CLUSTER_PORT: u16 = 7000;

/// One process of a role on its host.
pub struct Member {
    pub host: Host,
    pub proc: Option<Proc>,
    pub config: PathBuf,
    pub log: PathBuf,
}

/// A Valkey node of an engine host.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    /// Index into [`Deployment::engine_hosts`].
    pub engine_host: usize,
    pub addr: SocketAddr,
    /// A member of the cluster pool (else a node of `main`).
    pub clustered: bool,
}

/// A node as the control plane shows it (`GET /v1/engine/pools`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSeen {
    pub name: String,
    pub healthy: bool,
    /// The reporting agent's name, the valkey-server's pid and its restarts.
    pub agent: Option<String>,
    pub pid: Option<u32>,
    pub restarts: Option<u64>,
}

/// A node of a cluster shard as the control plane shows it.
#[derive(Clone, Debug)]
pub struct ShardNodeSeen {
    pub name: String,
    /// `primary` or `replica`.
    pub role: String,
    /// The cluster's view: `online`, `failed`, `loading`.
    pub health: String,
}

impl ShardNodeSeen {
    /// Index into [`Deployment::engine_hosts`] of the host that runs it (`e<h>c<n>`).
    pub fn engine_host(&self) -> usize {
        self.name[1..].split('c').next().and_then(|h| h.parse::<usize>().ok()).expect("e<h>c<n>") - 1
    }
}

/// A cache made for a test, with a token for it.
#[derive(Clone, Debug)]
pub struct Cache {
    pub id: String,
    pub name: String,
    pub account: String,
    pub token: String,
    /// Its node's name (`cluster` in a cluster pool), and the engine host that runs it
    /// (None in a cluster pool: every host has a share).
    pub node: String,
    pub engine_host: Option<usize>,
}

/// Control planes, engine hosts and gateways, each on its own host (see the module's doc).
pub struct Deployment {
    pub layout: Layout,
    pub db: Host,
    pub database_url: String,
    pub control_planes: Vec<Member>,
    pub engine_hosts: Vec<Member>,
    pub gateways: Vec<Member>,
    pub nodes: Vec<Node>,
    pub http: reqwest::Client,
    /// The last field: dropped after the processes (see `Drop`).
    pub net: Net,
}

impl Deployment {
    /// Brings up `layout` and waits until every node is healthy and every gateway accepts;
    /// Err (why) only when network namespaces cannot be used here.
    pub async fn start(layout: Layout) -> Result<Deployment, String> {
        let net = Net::new()?;
        let dir = net.dir.clone();
        let d = dir.display();

        // PostgreSQL on its own host (scripts/postgres.sh, on that host's address).
        let db = net.host("db");
        let out = db
            .command(&postgres_script())
            .arg("start")
            .arg(dir.join("db"))
            .arg(db.addr.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PostgreSQL did not start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("db/server.log")).unwrap_or_default()
        );
        let database_url = String::from_utf8(out.stdout).unwrap().trim().to_string();

        let cp_hosts: Vec<Host> = (1..=layout.control_planes).map(|i| net.host(&format!("cp{i}"))).collect();
        let engine_hosts: Vec<Host> = (1..=layout.engine_hosts).map(|i| net.host(&format!("e{i}"))).collect();
        let gateway_hosts: Vec<Host> = (1..=layout.gateways).map(|i| net.host(&format!("gw{i}"))).collect();

        // The internal API's certificate, for every control plane's address; gateways and
        // agents trust it (control_plane_ca).
        let names: Vec<String> = cp_hosts.iter().map(|h| h.addr.to_string()).collect();
        let cert = rcgen::generate_simple_self_signed(names).unwrap();
        std::fs::write(dir.join("internal.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("internal.key"), cert.signing_key.serialize_pem()).unwrap();
        let mut random = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut random).unwrap();
        std::fs::write(dir.join("node.secret"), hex::encode(random)).unwrap();

        let mut nodes = Vec::new();
        for (e, host) in engine_hosts.iter().enumerate() {
            for n in 0..layout.nodes_per_host {
                let name = format!("e{}n{n}", e + 1);
                nodes.push(Node {
                    name,
                    engine_host: e,
                    addr: host.at(NODE_PORT + n as u16),
                    clustered: false,
                });
            }
            for n in 0..layout.cluster_nodes_per_host {
                let name = format!("e{}c{n}", e + 1);
                nodes.push(Node {
                    name,
                    engine_host: e,
                    addr: host.at(CLUSTER_PORT + n as u16),
                    clustered: true,
                });
            }
        }
        // The nodes of engine host `of` (None: every host's), standalone then the cluster's.
        let node_tables = |of: Option<usize>| -> String {
            let table = |clustered: bool| -> String {
                let header = if clustered {
                    format!("engine.clusters.{CLUSTER_POOL}.nodes")
                } else {
                    "engine.nodes".into()
                };
                nodes
                    .iter()
                    .filter(|n| n.clustered == clustered && of.is_none_or(|e| e == n.engine_host))
                    .map(|n| {
                        format!(
                            "\n[[{header}]]\nname = \"{}\"\nhost = \"{}\"\nport = {}\n",
                            n.name,
                            n.addr.ip(),
                            n.addr.port()
                        )
                    })
                    .collect()
            };
            let cluster = match layout.cluster_nodes_per_host {
                0 => String::new(),
                _ => format!(
                    "\n[engine.clusters.{CLUSTER_POOL}]\nreplicas = 1\nnode_timeout = {}\n{}",
                    CLUSTER_NODE_TIMEOUT.as_secs_f64(),
                    table(true)
                ),
            };
            format!("{}{cluster}", table(false))
        };
        let engine = format!(
            "supervisor = \"agents\"\nnode_secret_file = \"{d}/node.secret\"\nmaxmemory_mb = 1000\ndatabases = 64\n"
        );
        // Control planes: the admin token and audit key are shared (as an operator gives every
        // control plane the same secrets); each has its own config and log.
        std::fs::create_dir_all(dir.join("cp")).unwrap();
        let first_gateway = gateway_hosts[0].at(RESP_PORT);
        let mut control_planes = Vec::new();
        for (i, host) in cp_hosts.iter().enumerate() {
            let name = format!("cp{}", i + 1);
            let config = dir.join(format!("{name}.toml"));
            let toml = format!(
                "[control_plane]\nlisten = \"{rest}\"\ninternal_listen = \"{internal}\"\n\
                 internal_tls_cert = \"{d}/internal.pem\"\ninternal_tls_key = \"{d}/internal.key\"\n\
                 database_url = \"{database_url}\"\nadmin_token_path = \"{d}/cp/admin.token\"\n\
                 public_endpoint = \"{first_gateway}\"\n\n\
                 [engine]\ndir = \"{d}/{name}-valkey\"\n{engine}{nodes}",
                rest = host.at(REST_PORT),
                internal = host.at(INTERNAL_PORT),
                nodes = node_tables(None),
            );
            std::fs::write(&config, toml).unwrap();
            control_planes.push(Member {
                host: host.clone(),
                proc: None,
                config,
                log: dir.join(format!("{name}.log")),
            });
        }
        let cp_url = format!("https://{}", cp_hosts[0].at(INTERNAL_PORT));
        let mut agents = Vec::new();
        for (e, host) in engine_hosts.iter().enumerate() {
            let name = &host.name;
            let config = dir.join(format!("{name}.toml"));
            let toml = format!(
                "[agent]\nname = \"{name}\"\ncontrol_plane_url = \"{cp_url}\"\ncontrol_plane_ca = \"{d}/internal.pem\"\n\
                 internal_credential_file = \"{d}/{name}.credential\"\nreport_interval = 0.5\n\n\
                 [engine]\ndir = \"{d}/{name}-valkey\"\n{engine}{nodes}",
                nodes = node_tables(Some(e)),
            );
            std::fs::write(&config, toml).unwrap();
            agents.push(Member {
                host: host.clone(),
                proc: None,
                config,
                log: dir.join(format!("{name}.log")),
            });
        }
        let mut gateways = Vec::new();
        for (g, host) in gateway_hosts.iter().enumerate() {
            let name = &host.name;
            let config = dir.join(format!("{name}.toml"));
            // Gateway g asks control plane g mod N.
            let cp = format!("https://{}", cp_hosts[g % cp_hosts.len()].at(INTERNAL_PORT));
            let toml = format!(
                "[gateway]\nlisten = \"{listen}\"\ncontrol_plane_url = \"{cp}\"\ncontrol_plane_ca = \"{d}/internal.pem\"\n\
                 internal_credential_file = \"{d}/{name}.credential\"\ndata_dir = \"{d}/{name}\"\n\
                 gateway_id = \"{name}\"\nmetrics_listen = \"{metrics}\"\n",
                listen = host.at(RESP_PORT),
                metrics = host.at(GATEWAY_METRICS_PORT),
            );
            std::fs::write(&config, toml).unwrap();
            gateways.push(Member {
                host: host.clone(),
                proc: None,
                config,
                log: dir.join(format!("{name}.log")),
            });
        }
        let mut deployment = Deployment {
            layout,
            db,
            database_url,
            control_planes,
            engine_hosts: agents,
            gateways,
            nodes,
            http: super::http_client(),
            net,
        };
        let shoal = Path::new(env!("CARGO_BIN_EXE_shoal"));
        // Credentials, as an operator makes them on a control plane's machine.
        for m in deployment.engine_hosts.iter().chain(&deployment.gateways) {
            let credential =
                super::create_gateway_credential(&deployment.control_planes[0].config, &m.host.name);
            std::fs::write(dir.join(format!("{}.credential", m.host.name)), credential).unwrap();
        }
        // The agents first: a control plane forms a cluster pool over their nodes as it starts.
        for e in 0..layout.engine_hosts {
            deployment.start_engine_host(e);
        }
        for i in 0..layout.control_planes {
            deployment.start_control_plane(i, shoal).await;
        }
        for g in 0..layout.gateways {
            deployment.start_gateway(g);
        }
        deployment.wait_for_nodes().await;
        for g in 0..layout.gateways {
            deployment.wait_for_gateway(g).await;
        }
        Ok(deployment)
    }

    pub fn dir(&self) -> &Path {
        &self.net.dir
    }

    /// Starts control plane `i` from `binary` (the one under test, or a copy: an upgrade) and
    /// waits until its REST API answers.
    pub async fn start_control_plane(&mut self, i: usize, binary: &Path) {
        let m = &mut self.control_planes[i];
        assert!(m.proc.is_none(), "control plane {i} runs already");
        let config = m.config.to_str().unwrap().to_string();
        m.proc = Some(m.host.spawn_binary(binary, &["control-plane", "--config", &config], &m.log));
        let url = format!("http://{}/healthz", m.host.at(REST_PORT));
        let token = self.net.dir.join("cp/admin.token");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = self.http.get(&url).send().await;
            if token.exists() && up.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(Instant::now() < deadline, "control plane {i} did not start\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL to control plane `i`.
    pub fn kill_control_plane(&mut self, i: usize) {
        self.control_planes[i].proc.take().expect("running").kill();
    }

    pub fn start_engine_host(&mut self, e: usize) {
        let m = &mut self.engine_hosts[e];
        let config = m.config.to_str().unwrap().to_string();
        m.proc = Some(m.host.spawn(&["engine", "--config", &config], &m.log));
    }

    pub fn start_gateway(&mut self, g: usize) {
        let m = &mut self.gateways[g];
        assert!(m.proc.is_none(), "gateway {g} runs already");
        let config = m.config.to_str().unwrap().to_string();
        m.proc = Some(m.host.spawn(&["gateway", "--config", &config], &m.log));
    }

    /// SIGKILL to gateway `g`.
    pub fn kill_gateway(&mut self, g: usize) {
        self.gateways[g].proc.take().expect("running").kill();
    }

    /// Waits until gateway `g` accepts connections.
    pub async fn wait_for_gateway(&self, g: usize) {
        let addr = self.gateway(g);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "gateway {g} never listened\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Gateway `g`'s RESP address.
    pub fn gateway(&self, g: usize) -> SocketAddr {
        self.gateways[g].host.at(RESP_PORT)
    }

    /// Gateway `g`'s Prometheus text.
    pub async fn gateway_metrics(&self, g: usize) -> String {
        let url = format!("http://{}/metrics", self.gateways[g].host.at(GATEWAY_METRICS_PORT));
        self.http.get(url).send().await.unwrap().text().await.unwrap()
    }

    /// The REST URL of the first running control plane.
    pub fn rest_url(&self, path: &str) -> String {
        let m = self.control_planes.iter().find(|m| m.proc.is_some()).expect("a control plane runs");
        format!("http://{}{path}", m.host.at(REST_PORT))
    }

    /// The REST URL of control plane `i` (running or not).
    pub fn control_plane_url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.control_planes[i].host.at(REST_PORT))
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.net.dir.join("cp/admin.token")).unwrap().trim().to_string()
    }

    /// `method path` as the admin on the first running control plane: the JSON answer, which
    /// must be a success.
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, self.rest_url(path)).bearer_auth(self.admin_token());
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}\n{}", self.log()));
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// The nodes as the control plane shows them.
    pub async fn nodes_seen(&self) -> Vec<NodeSeen> {
        let pools = self.api(reqwest::Method::GET, "/v1/engine/pools", None).await;
        let mut out = Vec::new();
        for pool in pools["items"].as_array().unwrap() {
            for n in pool["nodes"].as_array().unwrap() {
                let host = &n["engine_host"];
                out.push(NodeSeen {
                    name: n["name"].as_str().unwrap_or_default().to_string(),
                    healthy: n["healthy"] == true,
                    agent: host["name"].as_str().map(str::to_owned),
                    pid: host["pid"].as_u64().map(|p| p as u32),
                    restarts: host["restarts"].as_u64(),
                });
            }
        }
        out
    }

    /// The cluster pool's shards as the control plane shows them: each one's nodes, primary
    /// first (named ones only: a node it does not know yet is left out).
    pub async fn cluster_shards(&self) -> Vec<Vec<ShardNodeSeen>> {
        let pools = self.api(reqwest::Method::GET, "/v1/engine/pools", None).await;
        let pool = pools["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == CLUSTER_POOL)
            .expect("the cluster pool");
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        pool["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|shard| {
                shard["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|n| n["name"].is_string())
                    .map(|n| ShardNodeSeen {
                        name: text(&n["name"]),
                        role: text(&n["role"]),
                        health: text(&n["health"]),
                    })
                    .collect()
            })
            .collect()
    }

    /// The address of each shard's online primary (None: it has none), as cluster node
    /// `node` sees it (`CLUSTER SHARDS`, as the observer user); None if it does not answer
    /// within a second.
    pub async fn primaries_seen_by(&self, node: &Node) -> Option<Vec<Option<SocketAddr>>> {
        let secret = std::fs::read_to_string(self.net.dir.join("node.secret")).unwrap();
        let password = shoal_engine::NodeSecrets::for_cluster(secret.trim(), CLUSTER_POOL).observer;
        let url = format!("redis://shoal-observer:{password}@{}/", node.addr);
        let ask = async {
            let mut conn = redis::Client::open(url).ok()?.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("CLUSTER").arg("SHARDS").query_async::<redis::Value>(&mut conn).await.ok()
        };
        let shards = tokio::time::timeout(Duration::from_secs(1), ask).await.ok()??;
        // RESP2: each shard and each node a flat [key, value, …] array.
        let fields = |v: &redis::Value| -> Vec<(String, redis::Value)> {
            let redis::Value::Array(items) = v else { return Vec::new() };
            items
                .chunks(2)
                .filter_map(|c| Some((redis::from_redis_value::<String>(&c[0]).ok()?, c.get(1)?.clone())))
                .collect()
        };
        let redis::Value::Array(shards) = shards else { return None };
        let mut out = Vec::new();
        for shard in &shards {
            let Some((_, redis::Value::Array(nodes))) = fields(shard).into_iter().find(|(k, _)| k == "nodes")
            else {
                continue;
            };
            let primary = nodes.iter().find_map(|n| {
                let f: std::collections::HashMap<String, String> = fields(n)
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, redis::from_redis_value::<String>(&v).ok()?)))
                    .collect();
                let online_primary = f.get("role")? == "master" && f.get("health")? == "online";
                online_primary.then(|| format!("{}:{}", f.get("ip")?, f.get("port")?).parse().ok())?
            });
            out.push(primary);
        }
        Some(out)
    }

    /// Waits until every node is healthy and reported by its agent: what the control plane
    /// then shows.
    pub async fn wait_for_nodes(&self) -> Vec<NodeSeen> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = self.nodes_seen().await;
            let ready = seen.len() == self.nodes.len()
                && seen.iter().all(|n| {
                    let host = self
                        .nodes
                        .iter()
                        .find(|m| m.name == n.name)
                        .map(|m| &self.engine_hosts[m.engine_host]);
                    n.healthy && n.pid.is_some() && n.agent.as_deref() == host.map(|h| h.host.name.as_str())
                });
            if ready {
                return seen;
            }
            assert!(Instant::now() < deadline, "the nodes never were all healthy: {seen:?}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new cache `name` and a token for it.
    pub async fn create_cache(&self, name: &str) -> Cache {
        let cache =
            self.api(reqwest::Method::POST, "/v1/caches", Some(serde_json::json!({"name": name}))).await;
        let id = cache["id"].as_str().unwrap_or_else(|| panic!("{cache}")).to_string();
        let token = self.api(reqwest::Method::POST, &format!("/v1/caches/{id}/tokens"), None).await["token"]
            .as_str()
            .unwrap()
            .to_string();
        let node =
            cache["allocation"]["node"].as_str().unwrap_or_else(|| panic!("no node: {cache}")).to_string();
        let engine_host = match node.as_str() {
            "cluster" => None,
            _ => Some(
                self.nodes.iter().find(|n| n.name == node).unwrap_or_else(|| panic!("{node}?")).engine_host,
            ),
        };
        Cache {
            id,
            name: name.into(),
            account: cache["account_id"].as_str().unwrap().to_string(),
            token,
            node,
            engine_host,
        }
    }

    /// Caches `<prefix>-1`, `<prefix>-2`… until there are `n` and every engine host has at
    /// least one (placement is the control plane's).
    pub async fn caches_on_every_host(&self, prefix: &str, n: usize) -> Vec<Cache> {
        let mut caches = Vec::new();
        while caches.len() < n
            || (0..self.engine_hosts.len()).any(|e| !caches.iter().any(|c: &Cache| c.engine_host == Some(e)))
        {
            assert!(
                caches.len() < 4 * n.max(self.engine_hosts.len()),
                "placement never used every host: {caches:?}"
            );
            caches.push(self.create_cache(&format!("{prefix}-{}", caches.len() + 1)).await);
        }
        caches
    }

    /// Every process's log.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for m in self.control_planes.iter().chain(&self.engine_hosts).chain(&self.gateways) {
            let text = std::fs::read_to_string(&m.log).unwrap_or_default();
            out.push_str(&format!("--- {} ({})\n{text}\n", m.host.name, m.host.addr));
        }
        out
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // PostgreSQL stopped cleanly (nothing left behind in shared memory), then SIGKILL for
        // all at once (no graceful stops to wait for); the `Proc`s then reap their children,
        // and the `Net` removes the namespaces.
        let _ = self.db.command(&postgres_script()).arg("stop").arg(self.net.dir.join("db")).output();
        self.net.kill_all();
    }
}
