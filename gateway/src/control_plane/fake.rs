//! An in-memory control plane for tests (feature `testing`; a crate's tests turn it on with
//! `shoal-gateway = { path = "…", features = ["testing"] }` in their dev-dependencies).
//!
//! A test registers what the real one would know — caches' routes, users and their passwords,
//! tokens it signs with its own key — and reads back what the gateway sent: usage batches,
//! login events, storage-sample and client-tracking requests. [`FakeControlPlane::set_down`]
//! makes every call fail as an unreachable control plane would.
//!
//! ```ignore
//! let fake = FakeControlPlane::new();
//! fake.add_route(route);
//! let gateway = Gateway::bind_with(config, ControlPlane::Fake(fake.clone())).await?;
//! ```

use super::Verified;
use crate::GatewayError;
use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use shoal_types::{
    AccountId, CacheId, DataClaims, LimitAnswer, LimitReport, LimitShare, LoginEvent, Permission,
    TenantRoute, UsageBatch, VerifiedLogin, VerifyRefusal, VerifyRequest, DATA_AUDIENCE, TOKEN_ISSUER,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The fake control plane; share it (`Arc`) between the gateway and the test.
pub struct FakeControlPlane {
    state: Mutex<State>,
    down: AtomicBool,
    /// The key tokens are signed with (Ed25519, published in the JWKS).
    signing: jsonwebtoken::EncodingKey,
    jwks: JwkSet,
    next_jti: AtomicU64,
}

#[derive(Default)]
struct State {
    routes: HashMap<CacheId, TenantRoute>,
    /// `(cache, user name)` → (password, what a login gets).
    users: HashMap<(CacheId, String), (String, VerifiedLogin)>,
    revoked: Vec<String>,
    usage: Vec<UsageBatch>,
    audit: Vec<LoginEvent>,
    storage_samples: Vec<CacheId>,
    tracking: Vec<CacheId>,
}

/// The key id of the fake's signing key.
const KID: &str = "fake-1";

impl FakeControlPlane {
    pub fn new() -> Arc<Self> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("an Ed25519 key");
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.public_key_raw());
        let jwks = serde_json::json!({ "keys": [{
            "kty": "OKP", "crv": "Ed25519", "x": x, "kid": KID, "alg": "EdDSA", "use": "sig",
        }]});
        Arc::new(FakeControlPlane {
            state: Mutex::default(),
            down: AtomicBool::new(false),
            signing: jsonwebtoken::EncodingKey::from_ed_der(&key.serialize_der()),
            jwks: serde_json::from_value(jwks).expect("a valid JWKS"),
            next_jti: AtomicU64::new(1),
        })
    }

    /// Adds (or replaces) a cache.
    pub fn add_route(&self, route: TenantRoute) {
        self.state.lock().unwrap().routes.insert(route.cache_id.clone(), route);
    }

    /// Deletes a cache.
    pub fn remove_route(&self, id: &CacheId) {
        self.state.lock().unwrap().routes.remove(id);
    }

    /// A cache user `name` with `password` (`AUTH name@<cache id> password`), logged in
    /// upstream as the cache's own ACL user with all access.
    pub fn add_user(&self, cache: &CacheId, name: &str, password: &str) {
        let mut state = self.state.lock().unwrap();
        let route = state.routes.get(cache).expect("add_route before add_user");
        let login = VerifiedLogin {
            mechanism: "cache-user".into(),
            username: name.into(),
            upstream_user: route.acl_user.clone(),
            upstream_password: route.acl_password.clone(),
            account_id: AccountId::generate(),
            access_string: None,
        };
        state.users.insert((cache.clone(), name.into()), (password.into(), login));
    }

    /// A read-write token for `cache`, valid for an hour, signed with the fake's key.
    pub fn token(&self, cache: &CacheId) -> String {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let claims = DataClaims {
            iss: TOKEN_ISSUER.into(),
            aud: DATA_AUDIENCE.into(),
            sub: "test".into(),
            iat: now,
            exp: now + 3600,
            nbf: None,
            jti: format!("jti-{}", self.next_jti.fetch_add(1, Ordering::Relaxed)),
            cache: cache.clone(),
            perm: Permission::ReadWrite,
            key_patterns: Vec::new(),
        };
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(KID.into());
        jsonwebtoken::encode(&header, &claims, &self.signing).expect("signing a token")
    }

    /// Revokes a token id (the gateway polls revocations every second).
    pub fn revoke(&self, jti: &str) {
        self.state.lock().unwrap().revoked.push(jti.into());
    }

    /// Whether every call fails, as when the control plane is unreachable.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// The usage batches the gateway delivered, in order.
    pub fn usage(&self) -> Vec<UsageBatch> {
        self.state.lock().unwrap().usage.clone()
    }

    /// The login events the gateway delivered, in order.
    pub fn audit(&self) -> Vec<LoginEvent> {
        self.state.lock().unwrap().audit.clone()
    }

    /// The caches the gateway asked a storage sample of, in order.
    pub fn storage_samples(&self) -> Vec<CacheId> {
        self.state.lock().unwrap().storage_samples.clone()
    }

    /// The caches the gateway asked keyspace events for (client tracking), in order.
    pub fn tracking_enabled(&self) -> Vec<CacheId> {
        self.state.lock().unwrap().tracking.clone()
    }

    /// The state, or the error an unreachable control plane gives.
    fn up(&self) -> Result<std::sync::MutexGuard<'_, State>, GatewayError> {
        match self.down.load(Ordering::Relaxed) {
            true => Err(GatewayError::ControlPlane("the fake control plane is down".into())),
            false => Ok(self.state.lock().unwrap()),
        }
    }

    pub(super) fn route(&self, id: &CacheId) -> Result<Option<TenantRoute>, GatewayError> {
        Ok(self.up()?.routes.get(id).cloned())
    }

    pub(super) fn routes(&self, ids: &[CacheId]) -> Result<Vec<TenantRoute>, GatewayError> {
        let state = self.up()?;
        Ok(ids.iter().filter_map(|id| state.routes.get(id).cloned()).collect())
    }

    pub(super) fn enable_client_tracking(&self, id: &CacheId) -> Result<(), GatewayError> {
        self.up()?.tracking.push(id.clone());
        Ok(())
    }

    pub(super) fn sample_storage(&self, id: &CacheId) -> Result<(), GatewayError> {
        self.up()?.storage_samples.push(id.clone());
        Ok(())
    }

    pub(super) fn post_usage(&self, batch: &UsageBatch) -> Result<(), GatewayError> {
        self.up()?.usage.push(batch.clone());
        Ok(())
    }

    /// One gateway: each share is the whole limit.
    /// Every limit in full (one gateway), and no lockouts beyond the gateway's own.
    pub(super) fn limits(&self, report: &LimitReport) -> Result<LimitAnswer, GatewayError> {
        drop(self.up()?);
        let shares = report
            .demands
            .iter()
            .map(|d| LimitShare {
                cache: d.cache.clone(),
                ecpu_milli_per_second: d.ecpu_per_second.map(|n| n * 1000),
                connections: d.max_connections,
                gateways: 1,
            })
            .collect();
        let cursor = shoal_types::throttle::LockCursor { term: 0, seq: 0 };
        let logins =
            report.logins.as_ref().map(|_| shoal_types::throttle::LoginAnswer { locks: vec![], cursor });
        Ok(LimitAnswer { shares, logins })
    }

    pub(super) fn revocations(&self) -> Result<Vec<String>, GatewayError> {
        Ok(self.up()?.revoked.clone())
    }

    pub(super) fn verify_user(&self, id: &CacheId, req: &VerifyRequest) -> Result<Verified, GatewayError> {
        let state = self.up()?;
        if !state.routes.contains_key(id) {
            return Err(GatewayError::UnknownCache);
        }
        let refused = |mechanism: &str, reason: &str| {
            Verified::Refused(VerifyRefusal { mechanism: mechanism.into(), reason: reason.into() })
        };
        Ok(match state.users.get(&(id.clone(), req.username.clone())) {
            None => refused("none", "unknown user"),
            Some((password, _)) if *password != req.password => refused("cache-user", "wrong password"),
            Some((_, login)) => Verified::Login(login.clone()),
        })
    }

    pub(super) fn post_audit(&self, events: &[LoginEvent]) -> Result<(), GatewayError> {
        self.up()?.audit.extend_from_slice(events);
        Ok(())
    }

    pub(super) fn jwks(&self) -> Result<JwkSet, GatewayError> {
        drop(self.up()?);
        Ok(self.jwks.clone())
    }
}
