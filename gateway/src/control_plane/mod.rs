//! The control plane as the gateway sees it: one type, [`ControlPlane`], for everything the
//! gateway asks of it (routes, password checks, the JWKS and revocations) and sends to it
//! (usage, login events, storage-sample and client-tracking requests).
//!
//! Two backends, as variants of an enum (no boxed futures on the login and refresh paths):
//! - [`http`]: the internal API over HTTP(S), what `shoal gateway` and `shoal dev` use;
//! - `fake` (feature `testing`): in memory, for tests that run a gateway without a control
//!   plane. Tests register caches, users and tokens on it and read back what the gateway
//!   posted. Not built into the `shoal` binary.

pub mod http;

#[cfg(feature = "testing")]
pub mod fake;

use crate::GatewayError;
use shoal_types::{
    CacheId, LimitAnswer, LimitReport, LoginEvent, TenantRoute, UsageBatch, VerifiedLogin, VerifyRefusal,
    VerifyRequest,
};

/// The control plane a gateway talks to.
pub enum ControlPlane {
    Http(http::HttpClient),
    #[cfg(feature = "testing")]
    Fake(std::sync::Arc<fake::FakeControlPlane>),
}

/// The control plane's answer to a password check.
pub enum Verified {
    Login(VerifiedLogin),
    /// Wrong credentials, unknown or disabled user, no role on the cache.
    Refused(VerifyRefusal),
    /// The check could not be made (the LDAP directory is down): fail closed.
    Unavailable(VerifyRefusal),
}

impl ControlPlane {
    /// A cache's route; `Ok(None)` when the cache does not exist.
    pub async fn route(&self, id: &CacheId) -> Result<Option<TenantRoute>, GatewayError> {
        match self {
            ControlPlane::Http(c) => c.route(id).await,
            #[cfg(feature = "testing")]
            ControlPlane::Fake(f) => f.route(id),
        }
    }

    /// The routes of several caches at once; caches that no longer exist are left out.
    pub async fn routes(&self, ids: &[CacheId]) -> Result<Vec<TenantRoute>, GatewayError> {
        match self {
            ControlPlane::Http(c) => c.routes(ids).await,
            #[cfg(feature = "testing")]
            ControlPlane::Fake(f) => f.routes(ids),
        }
    }

    /// Has the cache's node publish keyspace events (client-side caching invalidations).
    pub async fn enable_client_tracking(&self, id: &CacheId) -> Result<(), GatewayError> {
        match self {
            ControlPlane::Http(c) => c.enable_client_tracking(id).await,
            #[cfg(feature = "testing")]
            ControlPlane::Fake(f) => f.enable_client_tracking(id),
        }
    }

    /// Has a cache's storage sampled now (done once recorded).
    pub async fn sample_storage(&self, id: &CacheId) -> Result<(), GatewayError> {
        match self {
            ControlPlane::Http(c) => c.sample_storage(id).await,
            #[cfg(feature = "testing")]
            ControlPlane::Fake(f) => f.sample_storage(id),
        }
    }

    /// Hands over a usage batch; done once acknowledged.
    pub async fn post_usage(&self, batch: &UsageBatch) -> Result<(), GatewayError> {
        match self {
            ControlPlane::Http(c) => c.post_usage(batch).await,
            #[cfg(feature = "testing")]
            ControlPlane::Fake(f) => f.post_usage(batch),
        }
    }

    /// Reports this gateway's demand on caches' limits and its failed logins; answers its
    /// shares and the lockouts it has not been told of.
    pub async fn limits(&self, report: &LimitReport) -> Result<LimitAnswer, GatewayError> {
        match self {
            ControlPlane::Http(c) => c.limits(report).await,
            #[cfg(feature = "testing")]
            ControlPlane::Fake(f) => f.limits(report),
        }
    }

    /// The commands the nodes' modules add, for the command table.
    pub async fn module_commands(&self) -> Result<Vec<shoal_commands::ModuleCommand>, GatewayError> {
        match self {
            ControlPlane::Http(c) => c.module_commands().await,
            #[cfg(feature = "testing")]
            ControlPlane::Fake(_) => Ok(Vec::new()),
        }
    }

    /// Revoked, unexpired token ids.
    pub async fn revocations(&self) -> Result<Vec<String>, GatewayError> {
        match self {
            ControlPlane::Http(c) => c.revocations().await,
            #[cfg(feature = "testing")]
            ControlPlane::Fake(f) => f.revocations(),
        }
    }

    /// Checks a cache user's or LDAP user's password.
    pub async fn verify_user(&self, id: &CacheId, req: &VerifyRequest) -> Result<Verified, GatewayError> {
        match self {
            ControlPlane::Http(c) => c.verify_user(id, req).await,
            #[cfg(feature = "testing")]
            ControlPlane::Fake(f) => f.verify_user(id, req),
        }
    }

    /// Hands over a batch of login events for the audit log.
    pub async fn post_audit(&self, events: &[LoginEvent]) -> Result<(), GatewayError> {
        match self {
            ControlPlane::Http(c) => c.post_audit(events).await,
            #[cfg(feature = "testing")]
            ControlPlane::Fake(f) => f.post_audit(events),
        }
    }

    /// The public keys that verify data-plane tokens.
    pub async fn jwks(&self) -> Result<jsonwebtoken::jwk::JwkSet, GatewayError> {
        match self {
            ControlPlane::Http(c) => c.jwks().await,
            #[cfg(feature = "testing")]
            ControlPlane::Fake(f) => f.jwks(),
        }
    }
}
