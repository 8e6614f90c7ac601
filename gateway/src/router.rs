//! Where each cache lives: asks the control plane's internal API and remembers the answer
//! for a short time (`route_ttl`). A stale route is harmless: a deleted cache's Valkey ACL
//! user is gone, so its upstream login fails.

use crate::GatewayError;
use shoal_types::{CacheId, LoginEvent, TenantRoute, VerifiedLogin, VerifyRefusal, VerifyRequest};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Client of the control plane's internal API.
pub struct ControlPlaneClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl ControlPlaneClient {
    pub fn new(base: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .expect("a plain HTTP client always builds");
        ControlPlaneClient { http, base: base.trim_end_matches('/').to_string(), token: token.into() }
    }

    /// Sends an internal-API request with the gateway's bearer token.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, GatewayError> {
        req.bearer_auth(&self.token).send().await.map_err(|e| GatewayError::ControlPlane(e.to_string()))
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
            s => Err(GatewayError::ControlPlane(format!("user verification answered {s}"))),
        }
    }

    /// Posts a batch of login events to the audit log.
    pub async fn post_audit(&self, events: &[LoginEvent]) -> Result<(), GatewayError> {
        let url = format!("{}/internal/v1/audit", self.base);
        let resp = self.send(self.http.post(url).json(events)).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(GatewayError::ControlPlane(format!("audit answered {}", resp.status())))
        }
    }

    /// The public keys that verify data-plane tokens.
    pub async fn jwks(&self) -> Result<jsonwebtoken::jwk::JwkSet, GatewayError> {
        let url = format!("{}/.well-known/jwks.json", self.base);
        let resp = self.http.get(url).send().await.map_err(|e| GatewayError::ControlPlane(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(GatewayError::ControlPlane(format!("jwks answered {}", resp.status())));
        }
        resp.json().await.map_err(|e| GatewayError::ControlPlane(e.to_string()))
    }
}

/// The control plane's answer to a password check.
pub enum Verified {
    Login(VerifiedLogin),
    /// Wrong credentials, unknown or disabled user, no role on the cache.
    Refused(VerifyRefusal),
    /// The check could not be made (the LDAP directory is down): fail closed.
    Unavailable(VerifyRefusal),
}

/// Routes by cache id, cached for `ttl`.
pub struct Router {
    client: std::sync::Arc<ControlPlaneClient>,
    ttl: Duration,
    cache: Mutex<HashMap<CacheId, (Instant, TenantRoute)>>,
}

impl Router {
    pub fn new(client: std::sync::Arc<ControlPlaneClient>, ttl: Duration) -> Self {
        Router { client, ttl, cache: Mutex::new(HashMap::new()) }
    }

    pub async fn route(&self, id: &CacheId) -> Result<TenantRoute, GatewayError> {
        if let Some((at, route)) = self.cache.lock().unwrap().get(id) {
            if at.elapsed() < self.ttl {
                return Ok(route.clone());
            }
        }
        match self.client.route(id).await? {
            Some(route) => {
                self.cache.lock().unwrap().insert(id.clone(), (Instant::now(), route.clone()));
                Ok(route)
            }
            None => {
                self.cache.lock().unwrap().remove(id);
                Err(GatewayError::UnknownCache)
            }
        }
    }
}
