//! The control plane's internal API over HTTP(S): what `shoal gateway` and `shoal dev` use.

use super::Verified;
use crate::{GatewayConfig, GatewayError};
use shoal_types::{CacheId, GatewayCredential, LoginEvent, TenantRoute, VerifyRequest};
use std::time::Duration;

/// Client of the control plane's internal API (`control_plane_url`, with this gateway's
/// credential).
pub struct HttpClient {
    http: reqwest::Client,
    base: String,
    credential: GatewayCredential,
}

/// How to get a credential, for every error about one.
const MAKE_CREDENTIAL: &str = "make one on the control plane's machine with `shoal admin gateway create \
    <name> --config <control-plane config>` (or POST /v1/gateways as the admin) and put it in \
    internal_credential_file";

impl HttpClient {
    /// The client `config` describes. Refuses (with what to do instead) a missing, placeholder
    /// or short credential, the shared `internal_token` of old, and plain HTTP to anything
    /// but a loopback address.
    pub fn new(config: &GatewayConfig) -> Result<Self, String> {
        if config.internal_token.is_some() {
            return Err(format!(
                "internal_token is no longer used and must be removed: each gateway has its own \
                 internal_credential; {MAKE_CREDENTIAL}"
            ));
        }
        let (text, source) = match (&config.internal_credential_file, config.internal_credential.is_empty()) {
            (None, _) => (config.internal_credential.clone(), "internal_credential".to_string()),
            (Some(path), true) => (
                std::fs::read_to_string(path)
                    .map_err(|e| format!("reading internal_credential_file {}: {e}", path.display()))?,
                format!("internal_credential_file {}", path.display()),
            ),
            (Some(_), false) => {
                return Err("set internal_credential or internal_credential_file, not both".into())
            }
        };
        let credential =
            GatewayCredential::parse(&text).map_err(|e| format!("{source} {e}; {MAKE_CREDENTIAL}"))?;
        let base = config.control_plane_url.trim_end_matches('/').to_string();
        let plain = match base.split_once("://") {
            Some(("https", _)) => false,
            Some(("http", rest)) => {
                let authority = rest.split('/').next().unwrap_or(rest);
                if !shoal_types::is_loopback(authority) {
                    return Err(format!(
                        "control_plane_url {base} is plain HTTP to a host that is not loopback: the internal \
                         API carries cache passwords, so use https:// there (control_plane_ca: the \
                         certificate to trust)"
                    ));
                }
                true
            }
            _ => {
                return Err(format!(
                    "control_plane_url {base:?} must start with https:// (or http:// on loopback)"
                ))
            }
        };
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(3)).https_only(!plain);
        if let Some(path) = &config.control_plane_ca {
            let read =
                std::fs::read(path).map_err(|e| format!("reading control_plane_ca {}: {e}", path.display()));
            let certs = reqwest::Certificate::from_pem_bundle(&read?)
                .map_err(|e| format!("control_plane_ca {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("control_plane_ca {} holds no PEM certificate", path.display()));
            }
            // Only what the operator named: not every public CA.
            http = http.tls_built_in_root_certs(false);
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http.build().map_err(|e| format!("the internal API client: {e}"))?;
        Ok(HttpClient { http, base, credential })
    }

    /// The gateway name of this gateway's credential.
    pub fn gateway_name(&self) -> &str {
        self.credential.name()
    }

    /// Sends an internal-API request with the gateway's credential.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, GatewayError> {
        req.bearer_auth(self.credential.expose())
            .send()
            .await
            .map_err(|e| GatewayError::ControlPlane(e.to_string()))
    }

    /// `GET /internal/v1/routes/{id}`; `Ok(None)` when the cache does not exist.
    pub async fn route(&self, id: &CacheId) -> Result<Option<TenantRoute>, GatewayError> {
        let url = format!("{}/internal/v1/routes/{}", self.base, id);
        let resp = self.send(self.http.get(url)).await?;
        match resp.status() {
            s if s.is_success() => {
                resp.json().await.map(Some).map_err(|e| GatewayError::ControlPlane(e.to_string()))
            }
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            s => Err(GatewayError::ControlPlane(format!("route lookup answered {s}"))),
        }
    }

    /// `POST /internal/v1/routes`: the routes of several caches at once; caches that no
    /// longer exist are left out.
    pub async fn routes(&self, ids: &[CacheId]) -> Result<Vec<TenantRoute>, GatewayError> {
        #[derive(serde::Deserialize)]
        struct Routes {
            routes: Vec<TenantRoute>,
        }
        let url = format!("{}/internal/v1/routes", self.base);
        let resp = self.send(self.http.post(url).json(&serde_json::json!({ "ids": ids }))).await?;
        if !resp.status().is_success() {
            return Err(GatewayError::ControlPlane(format!("routes answered {}", resp.status())));
        }
        let body: Routes = resp.json().await.map_err(|e| GatewayError::ControlPlane(e.to_string()))?;
        Ok(body.routes)
    }

    /// Asks the control plane to have the cache's node publish keyspace events (for
    /// client-side caching invalidations).
    pub async fn enable_client_tracking(&self, id: &CacheId) -> Result<(), GatewayError> {
        let url = format!("{}/internal/v1/caches/{}/client-tracking", self.base, id);
        let resp = self.send(self.http.post(url)).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(GatewayError::ControlPlane(format!("client-tracking answered {}", resp.status())))
        }
    }

    /// Asks the control plane to sample a cache's storage now (it answers once recorded).
    pub async fn sample_storage(&self, id: &CacheId) -> Result<(), GatewayError> {
        let url = format!("{}/internal/v1/caches/{}/storage-sample", self.base, id);
        let resp = self.send(self.http.post(url)).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(GatewayError::ControlPlane(format!("storage-sample answered {}", resp.status())))
        }
    }

    /// `POST /internal/v1/usage`: done once the control plane acknowledges the batch. A 4xx
    /// other than 401/403/429 means the batch itself is refused: resending cannot help, so it
    /// is logged and counted as delivered.
    pub async fn post_usage(&self, batch: &shoal_types::UsageBatch) -> Result<(), GatewayError> {
        let url = format!("{}/internal/v1/usage", self.base);
        let resp = self.send(self.http.post(url).json(batch)).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        if status.is_client_error() && ![401, 403, 408, 429].contains(&status.as_u16()) {
            let body = resp.text().await.unwrap_or_default();
            tracing::error!(seq = batch.seq, %status, body, "usage batch refused by the control plane");
            return Ok(());
        }
        Err(GatewayError::ControlPlane(format!("usage answered {status}")))
    }

    /// `POST /internal/v1/limits`: this gateway's shares of the reported caches' limits.
    pub async fn limits(
        &self,
        report: &shoal_types::LimitReport,
    ) -> Result<shoal_types::LimitAnswer, GatewayError> {
        /// A report without logins is answered a bare list of shares.
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Answer {
            Full(shoal_types::LimitAnswer),
            Shares(Vec<shoal_types::LimitShare>),
        }
        let resp =
            self.send(self.http.post(format!("{}/internal/v1/limits", self.base)).json(report)).await?;
        if !resp.status().is_success() {
            return Err(GatewayError::ControlPlane(format!("limits answered {}", resp.status())));
        }
        match resp.json().await.map_err(|e| GatewayError::ControlPlane(e.to_string()))? {
            Answer::Full(answer) => Ok(answer),
            Answer::Shares(shares) => Ok(shoal_types::LimitAnswer { shares, logins: None }),
        }
    }

    /// An engine agent's report (`shoal engine` uses this client too): the nodes the control
    /// plane does not know.
    pub async fn engine_report(
        &self,
        report: &shoal_types::EngineReport,
    ) -> Result<Vec<String>, GatewayError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            unknown_nodes: Vec<String>,
        }
        let url = format!("{}/internal/v1/engine/report", self.base);
        let resp = self.send(self.http.post(url).json(report)).await?;
        if !resp.status().is_success() {
            return Err(GatewayError::ControlPlane(format!("engine report answered {}", resp.status())));
        }
        resp.json::<Answer>()
            .await
            .map(|a| a.unknown_nodes)
            .map_err(|e| GatewayError::ControlPlane(e.to_string()))
    }

    /// `GET /internal/v1/module-commands`: the commands the nodes' modules add.
    pub async fn module_commands(&self) -> Result<Vec<shoal_commands::ModuleCommand>, GatewayError> {
        #[derive(serde::Deserialize)]
        struct Commands {
            commands: Vec<shoal_commands::ModuleCommand>,
        }
        let resp = self.send(self.http.get(format!("{}/internal/v1/module-commands", self.base))).await?;
        if !resp.status().is_success() {
            return Err(GatewayError::ControlPlane(format!("module commands answered {}", resp.status())));
        }
        let body: Commands = resp.json().await.map_err(|e| GatewayError::ControlPlane(e.to_string()))?;
        Ok(body.commands)
    }

    /// Revoked, unexpired token ids.
    pub async fn revocations(&self) -> Result<Vec<String>, GatewayError> {
        #[derive(serde::Deserialize)]
        struct Revocations {
            revoked: Vec<String>,
        }
        let resp = self.send(self.http.get(format!("{}/internal/v1/revocations", self.base))).await?;
        if !resp.status().is_success() {
            return Err(GatewayError::ControlPlane(format!("revocations answered {}", resp.status())));
        }
        let body: Revocations = resp.json().await.map_err(|e| GatewayError::ControlPlane(e.to_string()))?;
        Ok(body.revoked)
    }

    /// Asks the control plane to check a cache user's or LDAP user's password.
    pub async fn verify_user(&self, id: &CacheId, req: &VerifyRequest) -> Result<Verified, GatewayError> {
        let url = format!("{}/internal/v1/caches/{}/users/verify", self.base, id);
        let resp = self.send(self.http.post(url).json(req)).await?;
        let status = resp.status();
        let bad = |e: reqwest::Error| GatewayError::ControlPlane(e.to_string());
        match status {
            s if s.is_success() => Ok(Verified::Login(resp.json().await.map_err(bad)?)),
            reqwest::StatusCode::UNAUTHORIZED => Ok(Verified::Refused(resp.json().await.map_err(bad)?)),
            reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                Ok(Verified::Unavailable(resp.json().await.map_err(bad)?))
            }
            reqwest::StatusCode::NOT_FOUND => Err(GatewayError::UnknownCache),
            // The control plane's own throttle (per user and source) has locked this out.
            reqwest::StatusCode::TOO_MANY_REQUESTS => Err(GatewayError::LockedOut),
            s => Err(GatewayError::ControlPlane(format!("user verification answered {s}"))),
        }
    }

    /// Posts a batch of login events to the audit log.
    pub async fn post_audit(&self, events: &[LoginEvent]) -> Result<(), GatewayError> {
        let url = format!("{}/internal/v1/audit", self.base);
        let resp = self.send(self.http.post(url).json(events)).await?;
        if resp.status().is_success() {
            Ok(())
        } else if resp.status().is_client_error() {
            // Retrying a batch the control plane refuses would block every later event.
            tracing::error!(status = %resp.status(), events = events.len(), "login events refused; dropped");
            Ok(())
        } else {
            Err(GatewayError::ControlPlane(format!("audit answered {}", resp.status())))
        }
    }

    /// The public keys that verify data-plane tokens (over the same private channel, so no
    /// one on the way can swap them).
    pub async fn jwks(&self) -> Result<jsonwebtoken::jwk::JwkSet, GatewayError> {
        let url = format!("{}/.well-known/jwks.json", self.base);
        let resp = self.send(self.http.get(url)).await?;
        if !resp.status().is_success() {
            return Err(GatewayError::ControlPlane(format!("jwks answered {}", resp.status())));
        }
        resp.json().await.map_err(|e| GatewayError::ControlPlane(e.to_string()))
    }
}
