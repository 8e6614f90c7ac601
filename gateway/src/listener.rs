//! The accept loop: a connection-limit semaphore, backoff on accept errors, and a shutdown
//! signal that stops accepting.

use crate::control_plane::http::HttpClient;
use crate::control_plane::ControlPlane;
use crate::metering::{journal::Journal, Ledger};
use crate::session::{self, Endpoint};
use crate::state::Shared;
use crate::tls::TlsState;
use crate::GatewayConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// A bound, not yet running gateway.
pub struct Gateway {
    listener: TcpListener,
    /// The `/metrics` listener, if configured.
    metrics: Option<TcpListener>,
    /// Usage batches not yet delivered (none when metering is off).
    outbox: Option<crate::metering::usage::Outbox>,
    tls: Option<(TcpListener, Arc<TlsState>)>,
    /// The reader endpoint, if configured.
    reader: Option<TcpListener>,
    shared: Arc<Shared>,
}

impl Gateway {
    /// Binds the RESP listener (and the TLS one, if configured), with the control plane at
    /// `control_plane_url`.
    pub async fn bind(config: GatewayConfig) -> Result<Gateway, BindError> {
        // The configuration is checked before anything is bound.
        let client = HttpClient::new(&config).map_err(BindError::Config)?;
        Gateway::bind_with(config, ControlPlane::Http(client)).await
    }

    /// Everything [`Gateway::bind`] checks before it binds: the control plane's URL, CA and
    /// this gateway's credential, and the TLS certificate and key (`shoal gateway
    /// --check-config`).
    pub fn check(config: &GatewayConfig) -> Result<(), BindError> {
        HttpClient::new(config).map_err(BindError::Config)?;
        match (&config.tls_listen, &config.tls_cert, &config.tls_key) {
            (Some(_), Some(cert), Some(key)) => drop(TlsState::load(cert, key)?),
            (None, _, _) => {}
            _ => return Err(BindError::TlsIncomplete),
        }
        Ok(())
    }

    /// [`Gateway::bind`] with a control plane of the caller's (the fake one, in tests);
    /// `control_plane_url` and the credential settings are not used.
    pub async fn bind_with(config: GatewayConfig, control_plane: ControlPlane) -> Result<Gateway, BindError> {
        let client = Arc::new(control_plane);
        // The certificate and key are read before anything is bound.
        let tls_state = match (&config.tls_listen, &config.tls_cert, &config.tls_key) {
            (Some(_), Some(cert), Some(key)) => Some(Arc::new(TlsState::load(cert, key)?)),
            (None, _, _) => None,
            _ => return Err(BindError::TlsIncomplete),
        };
        let listener = TcpListener::bind(&config.listen).await?;
        let tls = match (tls_state, &config.tls_listen) {
            (Some(state), Some(addr)) => Some((TcpListener::bind(addr).await?, state)),
            _ => None,
        };
        let reader = match &config.reader_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let advertise = match &config.advertise {
            Some(a) => a.clone(),
            None => listener.local_addr()?.to_string(),
        };
        let outbox = match config.metering {
            true => Some(crate::metering::usage::Outbox::open(
                config.data_dir.as_deref(),
                config.usage_memory_batches,
            )?),
            false => None,
        };
        // What a killed predecessor metered and did not send is found here.
        let journal = match &outbox {
            Some(outbox) => Journal::open(outbox.journal_dir().as_deref(), |seq| outbox.spooled(seq))?,
            None => Journal::in_memory(),
        };
        let shared = Arc::new(Shared::new(config, client, &advertise, Ledger::new(journal)));
        let metrics = match &shared.config.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(Gateway { listener, tls, reader, shared, outbox, metrics })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where the reader endpoint listens, if it does.
    pub fn reader_addr(&self) -> Option<SocketAddr> {
        self.reader.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The TLS state, to reload certificates (on SIGHUP).
    pub fn tls(&self) -> Option<Arc<TlsState>> {
        self.tls.as_ref().map(|(_, state)| state.clone())
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// This gateway's id in usage batches (stable across restarts with the same `data_dir`).
    pub fn gateway_id(&self) -> Option<&str> {
        self.outbox.as_ref().map(|o| o.gateway_id())
    }

    /// Accepts connections until `shutdown` turns true; then closes the sessions, waits
    /// for them to hand over their counters, and delivers (or spools) the last usage.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        if let Err(e) = self.shared.jwt.refresh().await {
            tracing::warn!(error = %e, "could not load signing keys yet; will retry on first AUTH");
        }
        install_module_commands(self.shared.control_plane.clone(), shutdown.clone()).await;
        let limit = Arc::new(Semaphore::new(self.shared.config.max_connections));
        let revocations = tokio::spawn(follow_revocations(self.shared.clone(), shutdown.clone()));
        let audit =
            tokio::spawn(self.shared.audit.clone().run(self.shared.control_plane.clone(), shutdown.clone()));
        let shipper = self.outbox.map(|outbox| {
            let (shared, stop) = (self.shared.clone(), shutdown.clone());
            tokio::spawn(async move {
                let (ledger, clients, control_plane) =
                    (&shared.ledger, &shared.clients, &shared.control_plane);
                crate::metering::usage::run(outbox, ledger, clients, control_plane, stop).await
            })
        });
        let shared = self.shared.clone();
        let stop = shutdown.clone();
        let routes = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.router.run(stop).await })
        };
        let limits = {
            let (shared, stop) = (shared.clone(), shutdown.clone());
            tokio::spawn(async move { crate::metering::limit::follow(&shared, stop).await })
        };
        let metrics = self.metrics.map(|listener| {
            let handle = shared.config.metrics.clone().unwrap_or_else(crate::metrics::install);
            tokio::spawn(crate::metrics::serve(listener, handle))
        });
        let workers = match spawn_workers(self.listener, self.tls, self.reader, &shared, &limit, &shutdown) {
            Ok(workers) => workers,
            Err(e) => {
                tracing::error!(error = %e, "could not start the gateway's threads");
                Vec::new()
            }
        };
        let mut stopped = shutdown.clone();
        let _ = stopped.wait_for(|stop| *stop).await;
        revocations.abort();
        // The last login events go out before the gateway stops.
        let _ = tokio::time::timeout(Duration::from_secs(3), audit).await;
        routes.abort();
        limits.abort();
        if let Some(m) = metrics {
            m.abort();
        }
        tracing::info!("gateway stopped accepting");
        if let Some(shipper) = shipper {
            // One wait for the sessions and the workers together, one for the usage: a
            // stop takes at most about 3 + 2 × SHUTDOWN_WAIT, whatever the control plane does.
            let sessions_deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
            let closed = shared.clients.kill_all();
            sessions_ended(&shared, SHUTDOWN_WAIT).await;
            tracing::info!(closed, "sessions closed");
            for worker in workers {
                let _ = tokio::time::timeout_at(sessions_deadline, worker).await;
            }
            let usage_deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
            match tokio::time::timeout_at(usage_deadline, shipper).await {
                Ok(Ok(outbox)) => {
                    let (ledger, clients) = (&shared.ledger, &shared.clients);
                    let left = usage_deadline.saturating_duration_since(tokio::time::Instant::now());
                    crate::metering::usage::finish(outbox, ledger, clients, &shared.control_plane, left)
                        .await;
                }
                // Still sending to a control plane that does not answer: what it holds is in
                // the usage journal and spool, sent by the next start.
                _ => {
                    tracing::warn!("usage not delivered before stopping: it stays on disk for the next start")
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("binding: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("TLS needs tls_listen, tls_cert and tls_key together")]
    TlsIncomplete,
    #[error("{0}")]
    Config(String),
}

/// How long shutdown waits for sessions to end, then for the control plane to take usage.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// How often the gateway asks for revoked tokens (revocation takes effect within that).
const REVOCATION_POLL: Duration = Duration::from_secs(1);
/// How often the gateway reloads the signing keys even without an unknown kid.
const JWKS_REFRESH: Duration = Duration::from_secs(60);

/// Keeps the revocation list current and closes connections whose token was revoked.
async fn follow_revocations(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut keys_refreshed = Instant::now();
    loop {
        // Keys retired long enough ago drop out of the JWKS; unknown kids refresh at once.
        if keys_refreshed.elapsed() >= JWKS_REFRESH {
            keys_refreshed = Instant::now();
            if let Err(e) = shared.jwt.refresh().await {
                tracing::debug!(error = %e, "could not refresh signing keys");
            }
        }
        match shared.control_plane.revocations().await {
            Ok(jtis) => {
                let added = shared.jwt.set_revoked(jtis);
                if !added.is_empty() {
                    let closed = shared.clients.kill_by_token(&added);
                    tracing::info!(revoked = added.len(), closed, "tokens revoked");
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not fetch revocations"),
        }
        tokio::select! {
            _ = tokio::time::sleep(REVOCATION_POLL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Starts the threads that serve clients: each runs its own single-threaded runtime with
/// an accept loop on the shared listeners, so a session, its shared upstream connection
/// and their wake-ups stay on one thread (as twemproxy's single event loop does, once per
/// core). Each thread stops accepting on `shutdown` and ends once the sessions are closed;
/// the receivers report that.
fn spawn_workers(
    listener: TcpListener,
    tls: Option<(TcpListener, Arc<TlsState>)>,
    reader: Option<TcpListener>,
    shared: &Arc<Shared>,
    limit: &Arc<Semaphore>,
    shutdown: &watch::Receiver<bool>,
) -> std::io::Result<Vec<tokio::sync::oneshot::Receiver<()>>> {
    let threads = match shared.config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let plain = listener.into_std()?;
    let tls = match tls {
        Some((listener, state)) => Some((listener.into_std()?, state)),
        None => None,
    };
    let reader = match reader {
        Some(listener) => Some(listener.into_std()?),
        None => None,
    };
    let mut done = Vec::with_capacity(threads);
    for i in 0..threads {
        let plain = plain.try_clone()?;
        let reader = match &reader {
            Some(listener) => Some(listener.try_clone()?),
            None => None,
        };
        let tls = match &tls {
            Some((listener, state)) => Some((listener.try_clone()?, state.clone())),
            None => None,
        };
        let (shared, limit, shutdown) = (shared.clone(), limit.clone(), shutdown.clone());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name(format!("gateway-{i}")).spawn(move || {
            runtime.block_on(async move {
                let tls_loop = async {
                    if let Some((listener, state)) = tls {
                        match TcpListener::from_std(listener) {
                            Ok(l) => {
                                let (shared, limit, stop) = (shared.clone(), limit.clone(), shutdown.clone());
                                accept_loop(l, Some(state), Endpoint::Primary, shared, limit, stop).await
                            }
                            Err(e) => tracing::error!(error = %e, "TLS listener"),
                        }
                    }
                };
                let plain_loop = async {
                    match TcpListener::from_std(plain) {
                        Ok(l) => {
                            let (shared, limit, stop) = (shared.clone(), limit.clone(), shutdown.clone());
                            accept_loop(l, None, Endpoint::Primary, shared, limit, stop).await
                        }
                        Err(e) => tracing::error!(error = %e, "RESP listener"),
                    }
                };
                let reader_loop = async {
                    if let Some(listener) = reader {
                        match TcpListener::from_std(listener) {
                            Ok(l) => {
                                let (shared, limit, stop) = (shared.clone(), limit.clone(), shutdown.clone());
                                accept_loop(l, None, Endpoint::Reader, shared, limit, stop).await
                            }
                            Err(e) => tracing::error!(error = %e, "reader listener"),
                        }
                    }
                };
                tokio::join!(plain_loop, tls_loop, reader_loop);
                // Serve this thread's sessions until the gateway has closed them all.
                sessions_ended(&shared, 2 * SHUTDOWN_WAIT).await;
            });
            let _ = done_tx.send(());
        })?;
        done.push(done_rx);
    }
    Ok(done)
}

/// Returns once no authenticated session is left, or after `wait`.
async fn sessions_ended(shared: &Shared, wait: Duration) {
    let deadline = Instant::now() + wait;
    while shared.clients.live() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<TlsState>>,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(5);
    while !*shutdown.borrow() {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, "ERR max number of clients reached"));
            continue;
        };
        stream.set_nodelay(true).ok();
        // A connection is unauthenticated from here, through its TLS handshake, until AUTH.
        let unauthenticated = crate::slots::unauthenticated(
            &shared.unauthenticated,
            &shared.unauthenticated_per_source,
            peer.ip(),
        );
        let shared = shared.clone();
        let local = stream.local_addr().unwrap_or(peer);
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let conn = match acceptor {
                None => session::ClientConn::Tcp(stream),
                Some(acceptor) => {
                    // Without a handshake slot there is no TLS to say why in: just close.
                    let Some(handshake) = shared.handshakes_per_source.take(peer.ip()) else {
                        tracing::debug!(%peer, "too many TLS handshakes from this address");
                        return;
                    };
                    let timeout = shared.config.tls_handshake_timeout;
                    // (Boxed: the handshake's state would otherwise stay in every session's task.)
                    let accepted = Box::pin(tokio::time::timeout(timeout, acceptor.accept(stream))).await;
                    drop(handshake);
                    match accepted {
                        Ok(Ok(tls)) => session::ClientConn::Tls(Box::new(tls)),
                        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            };
            // One call for both kinds: a task holds one session, not room for two.
            session::run(shared, conn, endpoint, peer, local, unauthenticated).await;
            drop(permit);
        });
    }
}

/// Answers a connection the gateway will not serve, then closes it.
async fn refuse(mut stream: tokio::net::TcpStream, msg: &'static str) {
    use tokio::io::AsyncWriteExt;
    let _ = stream.write_all(format!("-{msg}\r\n").as_bytes()).await;
}

/// Puts the nodes' module commands in the command table, so routing, metering and limits
/// know their keys and weights: asked once before the first client comes; if the control
/// plane does not answer yet, asked again every 500 ms in the background (start-up does
/// not wait for it; meanwhile module commands are forwarded as unknown ones).
async fn install_module_commands(control_plane: Arc<ControlPlane>, mut shutdown: watch::Receiver<bool>) {
    let installed = |commands: Vec<shoal_commands::ModuleCommand>| {
        let added = shoal_commands::install_module_commands(&commands);
        if added > 0 {
            tracing::info!(commands = added, "module commands in the command table");
        }
    };
    match control_plane.module_commands().await {
        Ok(commands) => return installed(commands),
        Err(e) => tracing::warn!(error = %e, "module commands unknown yet: they pass as unknown commands"),
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return,
            }
            if let Ok(commands) = control_plane.module_commands().await {
                return installed(commands);
            }
        }
    });
}
