//! `shoal control-plane` and `shoal gateway`s as separate processes in one directory, as an
//! operator runs them: one control plane (SQLite), any number of gateways.

use super::Proc;
use std::path::PathBuf;

pub struct Split {
    dir: tempfile::TempDir,
    pub rest: u16,
    /// The first gateway's RESP port.
    pub resp: u16,
    pub internal: u16,
    pub http: reqwest::Client,
    /// Lines added to every gateway's `[gateway]` section.
    gateway_extra: String,
    /// An engine agent runs the node ([`Split::with_engine_agent`]).
    agent: bool,
    /// The engine agent's `/metrics` port.
    pub agent_metrics: u16,
}

impl Split {
    pub fn new() -> Split {
        Self::with_config("", "")
    }

    /// With extra lines in the control plane's `[control_plane]` section and in every
    /// gateway's `[gateway]` section.
    pub fn with_config(control_plane: &str, gateway: &str) -> Split {
        let dir = tempfile::tempdir().unwrap();
        let (rest, resp, node) = (super::free_port(), super::free_port(), super::free_port());
        let internal = super::free_port();
        let cp = super::control_plane_toml(
            dir.path(),
            rest,
            node,
            &format!(
                "public_endpoint = \"127.0.0.1:{resp}\"\ninternal_listen = \"127.0.0.1:{internal}\"\n{control_plane}"
            ),
        );
        std::fs::write(dir.path().join("cp.toml"), cp).unwrap();
        let split = Split {
            dir,
            rest,
            resp,
            internal,
            http: super::http_client(),
            gateway_extra: gateway.into(),
            agent: false,
            agent_metrics: 0,
        };
        split.write_gateway_config("gateway", resp);
        split
    }

    /// With the control plane's node run by an engine agent (`shoal engine`, `engine.toml`,
    /// host `e1`): the control plane only connects to it.
    pub fn with_engine_agent() -> Split {
        let split = Split { agent: true, agent_metrics: super::free_port(), ..Split::new() };
        let d = split.dir.path().display();
        let mut random = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut random).unwrap();
        let secret = hex::encode(random);
        std::fs::write(split.path("node.secret"), secret).unwrap();
        let engine =
            format!("supervisor = \"agents\"\nnode_secret_file = \"{d}/node.secret\"\nmaxmemory_mb = 1000\n");
        let cp = std::fs::read_to_string(split.path("cp.toml")).unwrap();
        let node = cp.rsplit_once("port = ").unwrap().1.trim().to_string();
        std::fs::write(
            split.path("cp.toml"),
            cp.replacen("databases = 8\n", &format!("databases = 8\n{engine}"), 1),
        )
        .unwrap();
        let agent = format!(
            "[agent]\nname = \"e1\"\ncontrol_plane_url = \"http://127.0.0.1:{internal}\"\n\
             internal_credential_file = \"{d}/engine.credential\"\nreport_interval = 0.3\n\
             metrics_listen = \"127.0.0.1:{metrics}\"\n\n\
             [engine]\ndir = \"{d}/valkey\"\ndatabases = 8\n{engine}\n[[engine.nodes]]\nname = \"n0\"\nport = {node}\n",
            internal = split.internal,
            metrics = split.agent_metrics,
        );
        std::fs::write(split.path("engine.toml"), agent).unwrap();
        split
    }

    /// Starts the engine agent of [`Split::with_engine_agent`] (its credential made on first
    /// use: the control plane must have started once).
    pub fn engine_agent(&self) -> Proc {
        let credential_file = self.path("engine.credential");
        if !credential_file.exists() {
            let credential = super::create_gateway_credential(&self.path("cp.toml"), "engine-e1");
            std::fs::write(credential_file, credential).unwrap();
        }
        Proc::spawn(
            &["engine", "--config", self.path("engine.toml").to_str().unwrap()],
            &self.path("engine.log"),
        )
    }

    /// The control plane started from another binary (an upgrade).
    pub async fn control_plane_from(&self, binary: &std::path::Path) -> Proc {
        let p = Proc::spawn_binary(
            binary,
            &["control-plane", "--config", self.path("cp.toml").to_str().unwrap()],
            &self.path("cp.log"),
        );
        if !self.agent {
            super::wait_for_control_plane(&self.http, self.rest, self.dir.path()).await;
            return p;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let up = self.http.get(format!("http://127.0.0.1:{}/healthz", self.rest)).send().await;
            if self.path("admin.token").exists() && up.is_ok_and(|r| r.status().is_success()) {
                return p;
            }
            assert!(std::time::Instant::now() < deadline, "control plane did not start\n{}", self.log());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// A gateway's config, `<name>.toml`: its own port, data directory and credential. A
    /// small memory bound, so that an outage of a few seconds already spools to disk.
    fn write_gateway_config(&self, name: &str, resp: u16) {
        let d = self.dir.path().display();
        let internal = self.internal;
        let gw = format!(
            "[gateway]\nlisten = \"127.0.0.1:{resp}\"\ncontrol_plane_url = \"http://127.0.0.1:{internal}\"\n\
             internal_credential_file = \"{d}/{name}.credential\"\ndata_dir = \"{d}/{name}\"\nusage_memory_batches = 3\n\
             gateway_id = \"{name}\"\n{}",
            self.gateway_extra
        );
        std::fs::write(self.path(&format!("{name}.toml")), gw).unwrap();
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The control plane's and every gateway's log.
    pub fn log(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            out.push_str(&format!("--- {}\n{text}\n", p.file_name().unwrap().to_string_lossy()));
        }
        out
    }

    /// Starts the control plane and waits until it is ready (with an engine agent: until it
    /// answers, since its node is not ready before the agent runs).
    pub async fn control_plane(&self) -> Proc {
        self.control_plane_from(std::path::Path::new(env!("CARGO_BIN_EXE_shoal"))).await
    }

    /// Starts the first gateway (its credential made on first use).
    pub fn gateway(&self) -> Proc {
        self.start_gateway("gateway")
    }

    /// Starts gateway `n` (1, 2 …) beside the first: its RESP port.
    pub fn another_gateway(&self, n: usize) -> (Proc, u16) {
        let (name, resp) = (format!("gateway{n}"), super::free_port());
        self.write_gateway_config(&name, resp);
        (self.start_gateway(&name), resp)
    }

    fn start_gateway(&self, name: &str) -> Proc {
        let credential_file = self.path(&format!("{name}.credential"));
        if !credential_file.exists() {
            let credential =
                super::create_gateway_credential(&self.path("cp.toml"), &format!("split-{name}"));
            std::fs::write(credential_file, credential).unwrap();
        }
        let config = self.path(&format!("{name}.toml"));
        Proc::spawn(&["gateway", "--config", config.to_str().unwrap()], &self.path(&format!("{name}.log")))
    }

    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let admin = std::fs::read_to_string(self.path("admin.token")).unwrap();
        super::admin_api(&self.http, self.rest, &admin, method, path, body).await
    }

    /// A client of the first gateway, once it is up.
    pub async fn client(&self, token: &str) -> redis::aio::MultiplexedConnection {
        self.client_at(self.resp, token).await
    }

    pub async fn client_at(&self, resp: u16, token: &str) -> redis::aio::MultiplexedConnection {
        super::client_when_up(resp, token, || self.log()).await
    }
}
