//! Verifies data-plane JWTs locally with the control plane's published keys (JWKS).
//!
//! The algorithm is pinned to EdDSA, `iss`, `aud`, `sub`, `exp` and `iat` are required, and
//! a small leeway allows for clock skew. Unknown key ids trigger a (rate-limited) refresh.

use crate::control_plane::ControlPlane;
use crate::GatewayError;
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use shoal_types::{DataClaims, TenantRoute, DATA_AUDIENCE, LIMITED_DATA_AUDIENCE, TOKEN_ISSUER};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 30;
/// Unknown kids reload the key set at most this often: within it after such a reload, an
/// unknown kid is refused at once, without another fetch (a client with a genuinely new key
/// retries a moment later), so a flood of made-up kids neither floods the control plane nor
/// queues logins.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

pub struct JwtVerifier {
    client: Arc<ControlPlane>,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_refresh: Mutex<Option<Instant>>,
    /// The last reload an unknown kid caused (the periodic and startup ones do not count,
    /// so a key rotated in just after them still loads at once).
    last_kid_reload: Mutex<Option<Instant>>,
    validation: Validation,
    /// Revoked token ids (unexpired), refreshed from the control plane every second.
    revoked: RwLock<std::collections::HashSet<String>>,
    /// One reload for unknown kids at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl JwtVerifier {
    pub fn new(client: Arc<ControlPlane>) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[TOKEN_ISSUER]);
        validation.set_audience(&[DATA_AUDIENCE, LIMITED_DATA_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        JwtVerifier {
            client,
            keys: RwLock::new(HashMap::new()),
            last_refresh: Mutex::new(None),
            last_kid_reload: Mutex::new(None),
            validation,
            revoked: RwLock::new(Default::default()),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Reloads the key set from the control plane, unless it was reloaded very recently.
    pub async fn refresh(&self) -> Result<(), GatewayError> {
        {
            let mut last = self.last_refresh.lock().unwrap();
            if last.is_some_and(|t| t.elapsed() < MIN_REFRESH_INTERVAL) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        self.load().await
    }

    /// Reloads the key set for a kid not seen before (a rotated-in key), single-flight:
    /// logins that waited while another reloaded share that reload. Within
    /// `MIN_REFRESH_INTERVAL` of the last such reload nothing is fetched (the kid stays
    /// unknown and the login is refused).
    async fn refresh_for(&self, kid: &str) -> Result<(), GatewayError> {
        let arrived = Instant::now();
        let recent =
            || self.last_kid_reload.lock().unwrap().is_some_and(|t| t.elapsed() < MIN_REFRESH_INTERVAL);
        if recent() {
            return Ok(());
        }
        let _one = self.reloading.lock().await;
        if self.keys.read().unwrap().contains_key(kid) || recent() {
            return Ok(());
        }
        if self.last_refresh.lock().unwrap().is_some_and(|t| t >= arrived) {
            // Reloaded since this login arrived: as fresh as a reload of its own would be.
            return Ok(());
        }
        let now = Instant::now();
        *self.last_refresh.lock().unwrap() = Some(now);
        *self.last_kid_reload.lock().unwrap() = Some(now);
        self.load().await
    }

    async fn load(&self) -> Result<(), GatewayError> {
        let set: JwkSet = self.client.jwks().await?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            if let (Some(kid), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk)) {
                keys.insert(kid, key);
            }
        }
        *self.keys.write().unwrap() = keys;
        Ok(())
    }

    /// Checks signature and claims; returns the claims of a valid token.
    pub async fn verify(&self, token: &str) -> Result<DataClaims, GatewayError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| GatewayError::Auth(e.to_string()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(GatewayError::Auth(format!("algorithm {:?} not accepted", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| GatewayError::Auth("token has no kid".into()))?;
        if !self.keys.read().unwrap().contains_key(&kid) {
            self.refresh_for(&kid).await?;
        }
        let keys = self.keys.read().unwrap();
        let key = keys.get(&kid).ok_or_else(|| GatewayError::Auth("unknown kid".into()))?;
        let data = jsonwebtoken::decode::<DataClaims>(token, key, &self.validation)
            .map_err(|e| GatewayError::Auth(e.to_string()))?;
        if self.revoked.read().unwrap().contains(&data.claims.jti) {
            return Err(GatewayError::Auth(format!("token {} is revoked", data.claims.jti)));
        }
        Ok(data.claims)
    }

    /// Replaces the revocation list; returns the token ids that are newly revoked.
    pub fn set_revoked(&self, jtis: Vec<String>) -> Vec<String> {
        let new: std::collections::HashSet<String> = jtis.into_iter().collect();
        let mut revoked = self.revoked.write().unwrap();
        let added = new.difference(&revoked).cloned().collect();
        *revoked = new;
        added
    }
}

/// What a token logs in upstream as, and the access string the gateway checks the commands
/// it answers itself against; both None for the cache's own ACL user.
pub type UpstreamLogin = (Option<(String, String)>, Option<Arc<shoal_auth::AccessString>>);

/// The upstream login of a token that grants less than everything (read-only, or only some
/// keys): the ACL user the control plane made for it when minting, with the password both
/// derive from the cache's own secret.
pub fn upstream_login(claims: &DataClaims, route: &TenantRoute) -> Result<UpstreamLogin, GatewayError> {
    let login = shoal_auth::token::token_login(
        &route.acl_user,
        &route.acl_password,
        claims.perm,
        &claims.key_patterns,
    );
    let Some(login) = login else { return Ok((None, None)) };
    // The control plane mints no token whose access string does not parse.
    let access = shoal_auth::AccessString::parse(&login.access_string)
        .map_err(|e| GatewayError::Auth(format!("token key patterns: {e}")))?;
    Ok((Some((login.user, login.password)), Some(Arc::new(access))))
}

/// Whether a password looks like a JWT (three base64url parts).
pub fn looks_like_jwt(password: &[u8]) -> bool {
    password.len() > 20
        && password.iter().filter(|&&b| b == b'.').count() == 2
        && password.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}
