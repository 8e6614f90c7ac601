//! `shoal engine --config FILE`: the node agent of one host. It starts this host's Valkey
//! nodes, keeps them running (restarts, script watchdog, memory guard) and is the only thing
//! that stops them; it reports them to the control plane every few seconds and keeps going
//! while no control plane answers. Control planes with `[engine] supervisor = "agents"` only
//! connect to these nodes, so restarting or upgrading a control plane restarts no node.

use crate::pools::{EngineFile, PoolPlan, Role};
use anyhow::Context;
use serde::Deserialize;
use shoal_engine::Pool;
use shoal_gateway::control_plane::http::HttpClient;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `shoal engine` config file (TOML).
#[derive(Deserialize)]
struct AgentFile {
    agent: AgentSection,
    engine: EngineFile,
}

/// `[agent]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    /// This host's name in reports (1–63 characters of a-z, 0-9 and -).
    name: String,
    /// The control plane's internal API (https://, or http:// on loopback).
    control_plane_url: String,
    /// The certificate (or CA) to trust for it.
    control_plane_ca: Option<PathBuf>,
    /// This agent's internal credential, from `shoal admin gateway create <name>`.
    internal_credential_file: PathBuf,
    /// Seconds between two reports (default 2).
    #[serde(default = "default_report_interval")]
    report_interval: f64,
    /// Where to serve Prometheus `/metrics` (node health, restarts, script kills), if at all.
    metrics_listen: Option<String>,
}

fn default_report_interval() -> f64 {
    2.0
}

/// Runs the agent until SIGTERM or SIGINT, then stops its nodes (with `check_only`: checks
/// the config file and the files it names, and returns).
pub async fn run(path: PathBuf, check_only: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file: AgentFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let agent = file.agent;
    anyhow::ensure!(
        shoal_types::valid_gateway_name(&agent.name),
        "{}: [agent] name must be 1–63 characters of a-z, 0-9 and -",
        path.display()
    );
    anyhow::ensure!(
        (0.1..=60.0).contains(&agent.report_interval),
        "{}: [agent] report_interval must be 0.1–60 seconds",
        path.display()
    );
    // The same client (TLS, credential checks) a gateway uses for the internal API.
    let client = HttpClient::new(&shoal_gateway::GatewayConfig {
        control_plane_url: agent.control_plane_url.clone(),
        control_plane_ca: agent.control_plane_ca.clone(),
        internal_credential_file: Some(agent.internal_credential_file.clone()),
        ..Default::default()
    })
    .map_err(|e| anyhow::anyhow!("{}: [agent] {e}", path.display()))?;
    if let Some(addr) = &agent.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("{}: [agent] metrics_listen {addr}", path.display()))?;
        tokio::spawn(shoal_gateway::metrics::serve(listener, shoal_gateway::metrics::install()));
    }
    let (plans, _) =
        file.engine.plan(Role::Agent).with_context(|| format!("{}: [engine]", path.display()))?;
    if check_only {
        println!("{}: OK", path.display());
        return Ok(());
    }
    let mut pools = Vec::new();
    for (name, plan) in plans {
        // A cluster's nodes too: started in cluster mode, formed by the control plane.
        let PoolPlan::Standalone(config) = plan else { unreachable!("an agent plans its nodes only") };
        match Pool::start(config).await {
            Ok(pool) => pools.push(Arc::new(pool)),
            Err(e) => {
                for pool in &pools {
                    pool.stop().await;
                }
                return Err(e).with_context(|| format!("starting the nodes of pool {name:?}"));
            }
        }
    }
    for node in pools.iter().flat_map(|p| p.nodes()) {
        println!("  Valkey node  {} at {} (data in {})", node.name(), node.addr(), node.dir.display());
    }
    tracing::info!(host = agent.name, "engine agent running");
    let reporter = tokio::spawn(report(
        client,
        agent.name,
        pools.clone(),
        Duration::from_secs_f64(agent.report_interval),
    ));
    crate::wait_for_signal(None).await;
    reporter.abort();
    for pool in &pools {
        pool.stop().await;
    }
    tracing::info!("engine agent stopped");
    Ok(())
}

/// Reports the nodes every `interval`; logs only when reaching the control plane changes
/// (down, back) or it names nodes it does not know.
async fn report(client: HttpClient, host: String, pools: Vec<Arc<Pool>>, interval: Duration) {
    let mut reaching = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let nodes = pools
            .iter()
            .flat_map(|p| p.nodes())
            .map(|n| shoal_types::EngineNodeReport {
                name: n.name().to_string(),
                addr: n.addr(),
                pid: n.pid(),
                restarts: n.restarts(),
                healthy: n.healthy(),
            })
            .collect();
        let result = client.engine_report(&shoal_types::EngineReport { host: host.clone(), nodes }).await;
        match (&result, reaching) {
            (Ok(unknown), _) if !unknown.is_empty() => {
                tracing::warn!(
                    ?unknown,
                    "the control plane has no pool with these nodes: check its [engine] section"
                )
            }
            (Ok(_), Some(false) | None) => tracing::info!("reporting to the control plane"),
            (Err(e), Some(true) | None) => {
                tracing::warn!(error = %e, "the control plane does not answer: the nodes keep running")
            }
            _ => {}
        }
        reaching = Some(result.is_ok());
    }
}
