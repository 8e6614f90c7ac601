//! `deploy/`: Shoal on many machines (docs/deploy.md). Every file there is used or checked:
//! the example configs pass `--check-config` with the files they name and document every
//! option they set ([`configs`]); placeholder secrets are refused at start; the systemd units
//! pass `systemd-analyze verify` ([`systemd`]); the compose file, its configs and
//! `make-secrets.sh` fit together ([`docker`]); the Kubernetes manifests validate against the
//! API's schemas and fit their configs ([`kubernetes`]).

mod configs;
mod docker;
mod kubernetes;
mod systemd;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// `deploy/` of this repository.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs `cmd` to its end, killed after `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill only signals the child this function spawned.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} still ran after {limit:?}");
        }
    }
}

/// The `shoal` binary with `args` (a start that should fail fast, or `--check-config`).
pub fn shoal(args: &[&str]) -> Output {
    run(
        Command::new(env!("CARGO_BIN_EXE_shoal")).args(args).env("RUST_BACKTRACE", "0"),
        Duration::from_secs(20),
    )
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The documents of a YAML file, as JSON (PyYAML, installed by `scripts/setup.sh --test`
/// with kubernetes-validate).
pub fn yaml(path: &Path) -> Vec<serde_json::Value> {
    let out = run(
        Command::new("python3").args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
            path.to_str().unwrap(),
        ]),
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "reading {} as YAML (python3 with PyYAML: scripts/setup.sh --test installs it): {}",
        path.display(),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A certificate and its key (PEM), made once.
pub fn cert_and_key() -> &'static (String, String) {
    static PAIR: OnceLock<(String, String)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = shoal_gateway::tls::ensure_self_signed(dir.path()).unwrap();
        (read(&cert), read(&key))
    })
}

/// 64 random hex digits.
pub fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
    hex::encode(bytes)
}

/// A config file of the platform under a temporary root: every absolute path in it moved
/// there, so that the files it names can be made.
pub struct Placed {
    pub root: tempfile::TempDir,
    pub config: PathBuf,
    /// The options that name a file or folder: (key, path under the root).
    pub files: Vec<(String, PathBuf)>,
}

impl Placed {
    pub fn new(name: &str, config_text: &str) -> Placed {
        let root = tempfile::tempdir().unwrap();
        let text = config_text.replace("\"/", &format!("\"{}/", root.path().display()));
        let config = root.path().join(name);
        std::fs::write(&config, &text).unwrap();
        let value: toml::Value =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{name} is not TOML: {e}\n{config_text}"));
        let mut files = Vec::new();
        collect_paths(&value, root.path(), &mut files);
        Placed { root, config, files }
    }

    /// What a path was before it was placed.
    pub fn original(&self, path: &Path) -> PathBuf {
        Path::new("/").join(path.strip_prefix(self.root.path()).unwrap())
    }

    /// Writes every file the config reads a secret, key or certificate from: what `given`
    /// returns for (option, original path), else the usual content of that option.
    pub fn fill_with(&self, given: impl Fn(&str, &Path) -> Option<Vec<u8>>) {
        for (key, path) in &self.files {
            let content = match given(key, &self.original(path)) {
                Some(content) => Some(content),
                None => usual_content(key),
            };
            if let Some(content) = content {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, content).unwrap();
            }
        }
    }

    pub fn fill(&self) {
        self.fill_with(|_, _| None);
    }

    /// The placed path of option `key` (the first one of that name).
    pub fn file(&self, key: &str) -> &Path {
        &self.files.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no option {key}")).1
    }

    /// `shoal <role> --config <placed file> [--check-config]`.
    pub fn start(&self, role: &str, check_only: bool) -> Output {
        let mut args = vec![role, "--config", self.config.to_str().unwrap()];
        if check_only {
            args.push("--check-config");
        }
        shoal(&args)
    }
}

fn collect_paths(value: &toml::Value, root: &Path, out: &mut Vec<(String, PathBuf)>) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table {
                match v {
                    toml::Value::String(s) if Path::new(s).starts_with(root) => {
                        out.push((key.clone(), PathBuf::from(s)))
                    }
                    _ => collect_paths(v, root, out),
                }
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|v| collect_paths(v, root, out)),
        _ => {}
    }
}

/// What the file of option `key` holds on a real machine; None for what the process makes
/// itself (admin token and audit key when missing, data folders) or finds (valkey_server).
fn usual_content(key: &str) -> Option<Vec<u8>> {
    let (cert, pem_key) = cert_and_key();
    match key {
        "internal_tls_cert" | "tls_cert" | "control_plane_ca" => Some(cert.clone().into_bytes()),
        "internal_tls_key" | "tls_key" => Some(pem_key.clone().into_bytes()),
        "internal_credential_file" => {
            Some(shoal_types::GatewayCredential::generate("deploy-test").expose().as_bytes().to_vec())
        }
        "node_secret_file" => Some(random_hex().into_bytes()),
        "admin_token_path" | "audit_key_path" | "dir" | "data_dir" | "valkey_server" => None,
        other => {
            panic!("a config option names a file this test does not know: {other} (teach usual_content)")
        }
    }
}

/// The values of `[[engine.nodes]]`: (name, host, port).
pub fn nodes(config: &toml::Value) -> Vec<(String, String, i64)> {
    config["engine"]
        .get("nodes")
        .and_then(|n| n.as_array())
        .map(|nodes| {
            nodes
                .iter()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap().to_string(),
                        n["host"].as_str().unwrap().to_string(),
                        n["port"].as_integer().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts what every control plane and engine agent must agree on: each agent's nodes are
/// control-plane nodes (same name, host and port), each run by one agent (with `all`: every
/// control-plane node is), and the node secret's place, databases and maxmemory_mb are the
/// same.
pub fn assert_engine_agrees(control_plane: &toml::Value, agents: &[&toml::Value], all: bool, context: &str) {
    let cp = &control_plane["engine"];
    assert_eq!(cp["supervisor"].as_str(), Some("agents"), "{context}: the control plane runs no node");
    let mut run_by_agents = Vec::new();
    for agent in agents {
        let e = &agent["engine"];
        for key in ["databases", "maxmemory_mb", "node_secret_file", "script_time_limit"] {
            assert_eq!(
                e.get(key),
                cp.get(key),
                "{context}: [engine] {key} differs on agent {}",
                agent["agent"]
            );
        }
        run_by_agents.extend(nodes(agent));
    }
    let mut cp_nodes = nodes(control_plane);
    cp_nodes.sort();
    run_by_agents.sort();
    if all {
        assert_eq!(
            run_by_agents, cp_nodes,
            "{context}: the agents' nodes are the control plane's, each once"
        );
    } else {
        assert!(run_by_agents.windows(2).all(|w| w[0] != w[1]), "{context}: a node run twice");
        for node in &run_by_agents {
            assert!(cp_nodes.contains(node), "{context}: the control plane has no node {node:?}");
        }
    }
}

/// The host and port of a `scheme://host:port` URL.
pub fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap();
    let (host, port) = authority.rsplit_once(':').unwrap_or_else(|| panic!("no port in {url}"));
    (host.to_string(), port.parse().unwrap())
}

/// The port of a `host:port` listen address.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap_or_else(|| panic!("no port in {addr}")).1.parse().unwrap()
}
