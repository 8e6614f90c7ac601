//! The accept loop: a connection-limit semaphore, backoff on accept errors, and a shutdown
//! signal that stops accepting.

use crate::auth::jwt::JwtVerifier;
use crate::clients::Registry;
use crate::cluster::Identity;
use crate::observer::Observers;
use crate::router::{ControlPlaneClient, Router};
use crate::session;
use crate::GatewayConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// What every session shares.
pub struct Shared {
    pub config: GatewayConfig,
    pub jwt: JwtVerifier,
    pub router: Router,
    pub clients: Registry,
    pub observers: Observers,
    /// How the gateway presents itself to cluster-mode clients.
    pub identity: Identity,
    pub started: Instant,
    /// Permits for connections that have not authenticated yet.
    pub unauthenticated: Arc<Semaphore>,
}

/// A bound, not yet running gateway.
pub struct Gateway {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Gateway {
    /// Binds the RESP listener.
    pub async fn bind(config: GatewayConfig) -> std::io::Result<Gateway> {
        let listener = TcpListener::bind(&config.listen).await?;
        let client = Arc::new(ControlPlaneClient::new(&config.control_plane_url, &config.internal_token));
        let advertise = match &config.advertise {
            Some(a) => a.clone(),
            None => listener.local_addr()?.to_string(),
        };
        let shared = Arc::new(Shared {
            jwt: JwtVerifier::new(client.clone()),
            router: Router::new(client, config.route_ttl),
            clients: Registry::default(),
            observers: Observers::default(),
            identity: Identity::new(&advertise),
            started: Instant::now(),
            unauthenticated: Arc::new(Semaphore::new(config.max_unauthenticated)),
            config,
        });
        Ok(Gateway { listener, shared })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        if let Err(e) = self.shared.jwt.refresh().await {
            tracing::warn!(error = %e, "could not load signing keys yet; will retry on first AUTH");
        }
        let limit = Arc::new(Semaphore::new(self.shared.config.max_connections));
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
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
            let shared = self.shared.clone();
            let local = stream.local_addr().unwrap_or(peer);
            tokio::spawn(async move {
                session::run(shared, stream, peer, local).await;
                drop(permit);
            });
        }
        tracing::info!("gateway stopped accepting");
    }
}

/// Answers a connection the gateway will not serve, then closes it.
async fn refuse(mut stream: tokio::net::TcpStream, msg: &'static str) {
    use tokio::io::AsyncWriteExt;
    let _ = stream.write_all(format!("-{msg}\r\n").as_bytes()).await;
}
