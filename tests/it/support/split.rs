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
        let split =
            Split { dir, rest, resp, internal, http: super::http_client(), gateway_extra: gateway.into() };
        split.write_gateway_config("gateway", resp);
        split
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

    pub async fn control_plane(&self) -> Proc {
        let p = Proc::spawn(
            &["control-plane", "--config", self.path("cp.toml").to_str().unwrap()],
            &self.path("cp.log"),
        );
        super::wait_for_control_plane(&self.http, self.rest, self.dir.path()).await;
        p
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
