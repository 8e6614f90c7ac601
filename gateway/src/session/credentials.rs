//! Checking a data-plane login's credentials: throttled before, counted and audited after.
//! What they open (a cache, an upstream ACL user, an access string, an expiry) is handed to
//! the session, which binds itself to it ([`super::login`]).

use crate::auth::login::{Attempt, LoginNote};
use crate::control_plane::Verified;
use crate::router::LiveRoute;
use crate::state::Shared;
use crate::GatewayError;
use shoal_auth::throttle::{FailureOutcome, Verdict};
use shoal_types::throttle::LoginKind;
use shoal_types::VerifyRequest;
use shoal_types::{CacheId, TenantRoute};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A token's or user's login lasts this long without a token `exp` (as long as the connection).
pub(crate) const NO_EXPIRY: Duration = Duration::from_secs(100 * 365 * 86_400);

/// What checked credentials open.
pub(crate) struct Credentials {
    pub live: Arc<LiveRoute>,
    pub route: TenantRoute,
    /// A cache user's upstream ACL login; None: the cache's own ACL user.
    pub upstream: Option<(String, String)>,
    pub access: Option<Arc<shoal_auth::AccessString>>,
    /// The token's id ("" for users).
    pub jti: String,
    pub expires: Instant,
}

/// One login attempt, from the throttle's verdict to its audit record.
pub(crate) struct Login<'a> {
    shared: &'a Shared,
    source: IpAddr,
    attempt: Attempt,
    key: String,
    note: LoginNote,
    /// Which throttle counts the attempt.
    throttle: Option<LoginKind>,
    /// Already audited (a lockout refused before checking anything).
    audited: bool,
}

impl<'a> Login<'a> {
    /// `AUTH [user] password` from `source`: a token (`AUTH <token>`, `AUTH <user> <token>`),
    /// or a cache or LDAP user (`AUTH <user>@<cache id> <password>`).
    pub fn start(shared: &'a Shared, source: IpAddr, user: Option<&[u8]>, password: &[u8]) -> Login<'a> {
        let attempt = Attempt::parse(user, password);
        let note = LoginNote::for_attempt(&attempt, user);
        let key = attempt.throttle_key(source);
        // Attempts that could never succeed (neither a token nor `<user>@<cache>`) guess
        // nothing: they are refused and audited, not counted.
        let throttle = match attempt {
            Attempt::User { .. } => Some(LoginKind::User),
            Attempt::Token { .. } => Some(LoginKind::Token),
            Attempt::Invalid => None,
        };
        Login { shared, source, attempt, key, note, throttle, audited: false }
    }

    /// Waits out the throttle's delay (or refuses a locked-out attempt), then checks the
    /// credentials.
    pub async fn check(&mut self, password: &[u8]) -> Result<Credentials, GatewayError> {
        let throttles = &self.shared.throttles;
        let verdict =
            self.throttle.map_or(Verdict::Allow, |kind| throttles.check(kind, self.source, &self.key));
        match verdict {
            Verdict::Allow => {}
            Verdict::Delay(wait) => tokio::time::sleep(wait).await,
            Verdict::Locked { scope, .. } => {
                let note = &mut self.note;
                note.reason = format!("locked out ({scope:?} has too many failed attempts)").to_lowercase();
                crate::metrics::auth_attempt(&note.mechanism, "lockout");
                self.shared.audit.push(note.event(&self.shared.gateway_id, self.source, "lockout"));
                self.audited = true;
                return Err(GatewayError::LockedOut);
            }
        }
        // Checked once: what it named is not needed afterwards (the throttle key is kept).
        match std::mem::replace(&mut self.attempt, Attempt::Invalid) {
            Attempt::Token { user } => self.token(user.as_deref(), password).await,
            Attempt::User { name, cache } => self.user(&name, &cache, password).await,
            Attempt::Invalid => Err(GatewayError::Auth("not a token and no <user>@<cache id>".into())),
        }
    }

    /// Counts and audits how the login ended (the check and the session's binding).
    pub fn finish(mut self, result: &Result<(), GatewayError>) {
        if self.audited {
            return;
        }
        let (gateway_id, source, note) = (&self.shared.gateway_id, self.source, &mut self.note);
        match result {
            Ok(()) => {
                if let Some(kind) = self.throttle {
                    self.shared.throttles.success(kind, source, &self.key);
                }
                crate::metrics::auth_attempt(&note.mechanism, "success");
                self.shared.audit.push(note.event(gateway_id, source, "success"));
            }
            Err(e) => {
                if note.reason.is_empty() {
                    note.reason = e.to_string().chars().take(200).collect();
                }
                let mut outcome = "failure";
                if let Some(kind) = self.throttle.filter(|_| e.is_credential_failure()) {
                    let counted = self.shared.throttles.failure(kind, source, &self.key);
                    if matches!(counted, FailureOutcome::LockedOut(_)) {
                        outcome = "lockout";
                    }
                }
                crate::metrics::auth_attempt(&note.mechanism, outcome);
                self.shared.audit.push(note.event(gateway_id, source, outcome));
            }
        }
    }

    /// A data-plane JWT. The user name may be `default` or name the token's cache (its id or
    /// name); a token for one cache never opens another.
    async fn token(&mut self, user: Option<&str>, password: &[u8]) -> Result<Credentials, GatewayError> {
        let note = &mut self.note;
        let token = std::str::from_utf8(password).map_err(|_| GatewayError::Auth("not utf-8".into()))?;
        let claims = self.shared.jwt.verify(token).await?;
        note.cache = Some(claims.cache.clone());
        note.jti = Some(claims.jti.clone());
        note.username = format!("token:{}", claims.sub.chars().take(128).collect::<String>());
        let names_token_cache = |route: &TenantRoute, user: &str| {
            user == "default" || user == route.cache_id.as_str() || user == route.cache_name
        };
        let live = self.shared.router.live(&claims.cache).await?;
        let route = live.get();
        if let Some(user) = user.filter(|u| !names_token_cache(&route, u)) {
            let shown = user.chars().take(64).collect::<String>();
            return Err(GatewayError::Auth(format!(
                "token for cache {} presented as user {shown:?}",
                claims.cache
            )));
        }
        let (upstream, access) = crate::auth::jwt::upstream_login(&claims, &route)?;
        let (jti, expires) = (claims.jti.clone(), expiry_instant(claims.exp));
        Ok(Credentials { live, route, upstream, access, jti, expires })
    }

    /// A cache user or LDAP user: the control plane checks the password and names the
    /// upstream ACL user that carries the user's access.
    async fn user(
        &mut self,
        name: &str,
        cache: &CacheId,
        password: &[u8],
    ) -> Result<Credentials, GatewayError> {
        let note = &mut self.note;
        let request = VerifyRequest {
            username: name.to_string(),
            password: String::from_utf8(password.to_vec())
                .map_err(|_| GatewayError::Auth("password is not utf-8".into()))?,
            source: self.source.to_string(),
        };
        let login = match self.shared.control_plane.verify_user(cache, &request).await? {
            Verified::Login(login) => login,
            Verified::Refused(r) => {
                note.mechanism = r.mechanism;
                note.reason = r.reason.clone();
                return Err(GatewayError::Auth(r.reason));
            }
            Verified::Unavailable(r) => {
                note.mechanism = r.mechanism;
                note.reason = r.reason.clone();
                return Err(GatewayError::DirectoryUnavailable(r.reason));
            }
        };
        note.mechanism = login.mechanism.clone();
        note.account = Some(login.account_id.clone());
        let live = self.shared.router.live(cache).await?;
        let route = live.get();
        let upstream = Some((login.upstream_user, login.upstream_password));
        let access = login.access_string.as_deref().map(shoal_auth::AccessString::parse).transpose();
        let access = access.map_err(|e| GatewayError::ControlPlane(e.to_string()))?.map(Arc::new);
        // No token: the login lasts as long as the connection.
        Ok(Credentials {
            live,
            route,
            upstream,
            access,
            jti: String::new(),
            expires: Instant::now() + NO_EXPIRY,
        })
    }
}

/// The monotonic instant of a token's `exp` (seconds since the epoch).
fn expiry_instant(exp: i64) -> Instant {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
        as i64;
    Instant::now() + Duration::from_secs(exp.saturating_sub(now).max(0) as u64)
}
