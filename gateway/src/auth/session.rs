//! Logging a session in: credentials checked (throttled, audited), the session bound to its
//! cache.

use crate::auth::login::{Attempt, LoginNote};
use crate::control_plane::Verified;
use crate::pubsub::Namespace;
use crate::session::{Session, Tenant, NO_EXPIRY};
use crate::{upstream, GatewayError};
use shoal_auth::throttle::{FailureOutcome, Verdict};
use shoal_types::VerifyRequest;
use shoal_types::{CacheId, TenantRoute};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The route with a cache user's upstream login in place of the cache's own ACL user.
pub(crate) fn with_login(mut route: TenantRoute, login: &Option<(String, String)>) -> TenantRoute {
    if let Some((user, password)) = login {
        route.acl_user = user.clone();
        route.acl_password = password.clone();
    }
    route
}

/// Most connections a cache may hold on this gateway: its own limit if it has one, else the
/// gateway's `max_connections_per_cache`.
pub(crate) fn max_connections(config: &crate::GatewayConfig, route: &TenantRoute) -> usize {
    // Never more than the gateway's own total (the control plane refuses larger limits too).
    route
        .limits
        .max_connections
        .map_or(config.max_connections_per_cache, |n| n as usize)
        .min(config.max_connections)
}

/// The monotonic instant of a token's `exp` (seconds since the epoch).
pub(crate) fn expiry_instant(exp: i64) -> Instant {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
        as i64;
    Instant::now() + Duration::from_secs(exp.saturating_sub(now).max(0) as u64)
}

impl Session {
    /// Checks credentials (throttled, audited) and binds the session to a cache: a token
    /// (`AUTH <token>`, `AUTH <user> <token>`), or a cache or LDAP user
    /// (`AUTH <user>@<cache id> <password>`). On an authenticated connection, a login to the
    /// same cache switches the user; another cache's is refused.
    pub async fn authenticate(&mut self, user: Option<&[u8]>, password: &[u8]) -> Result<(), GatewayError> {
        let attempt = Attempt::parse(user, password);
        let mut note = LoginNote::for_attempt(&attempt, user);
        let source = self.peer.ip();
        let key = attempt.throttle_key(source);
        let shared = self.shared.clone();
        // Attempts that could never succeed (neither a token nor `<user>@<cache>`) guess
        // nothing: they are refused and audited, not counted.
        let throttle = match attempt {
            Attempt::User { .. } => Some(&shared.throttle),
            Attempt::Token { .. } => Some(&shared.token_throttle),
            Attempt::Invalid => None,
        };
        let verdict =
            throttle.map_or(Verdict::Allow, |t| t.lock().unwrap().check(Instant::now(), source, &key));
        match verdict {
            Verdict::Allow => {}
            Verdict::Delay(wait) => tokio::time::sleep(wait).await,
            Verdict::Locked { scope, .. } => {
                note.reason = format!("locked out ({scope:?} has too many failed attempts)").to_lowercase();
                crate::metrics::auth_attempt(&note.mechanism, "lockout");
                self.shared.audit.push(note.event(&self.shared.gateway_id, source, "lockout"));
                return Err(GatewayError::LockedOut);
            }
        }
        let result = match attempt {
            Attempt::Token { user } => self.login_token(user.as_deref(), password, &mut note).await,
            Attempt::User { name, cache } => self.login_user(&name, &cache, password, &mut note).await,
            Attempt::Invalid => Err(GatewayError::Auth("not a token and no <user>@<cache id>".into())),
        };
        let gateway_id = &self.shared.gateway_id;
        match &result {
            Ok(()) => {
                if let Some(t) = throttle {
                    t.lock().unwrap().success(source, &key);
                }
                crate::metrics::auth_attempt(&note.mechanism, "success");
                self.shared.audit.push(note.event(gateway_id, source, "success"));
            }
            Err(e) => {
                if note.reason.is_empty() {
                    note.reason = e.to_string().chars().take(200).collect();
                }
                let mut outcome = "failure";
                if let Some(t) = throttle.filter(|_| e.is_credential_failure()) {
                    let counted = t.lock().unwrap().failure(Instant::now(), source, &key);
                    if matches!(counted, FailureOutcome::LockedOut(_)) {
                        outcome = "lockout";
                    }
                }
                crate::metrics::auth_attempt(&note.mechanism, outcome);
                self.shared.audit.push(note.event(gateway_id, source, outcome));
            }
        }
        result
    }

    /// A data-plane JWT. The user name may be `default` or name the token's cache (its id or
    /// name); a token for one cache never opens another.
    pub(super) async fn login_token(
        &mut self,
        user: Option<&str>,
        password: &[u8],
        note: &mut LoginNote,
    ) -> Result<(), GatewayError> {
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
        self.bind(live, route, upstream, access, &claims.jti, expiry_instant(claims.exp)).await
    }

    /// A cache user or LDAP user: the control plane checks the password and names the
    /// upstream ACL user that carries the user's access.
    pub(super) async fn login_user(
        &mut self,
        name: &str,
        cache: &CacheId,
        password: &[u8],
        note: &mut LoginNote,
    ) -> Result<(), GatewayError> {
        let request = VerifyRequest {
            username: name.to_string(),
            password: String::from_utf8(password.to_vec())
                .map_err(|_| GatewayError::Auth("password is not utf-8".into()))?,
            source: self.peer.ip().to_string(),
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
        self.bind(live, route, upstream, access, "", Instant::now() + NO_EXPIRY).await
    }

    /// Binds the session to the cache of `route`, logged in upstream as the cache's own ACL
    /// user or as `upstream` (a cache user's). A second login on the connection must be to
    /// the same cache; it switches the upstream user in place.
    pub(super) async fn bind(
        &mut self,
        live: Arc<crate::router::LiveRoute>,
        route: TenantRoute,
        upstream: Option<(String, String)>,
        access: Option<Arc<shoal_auth::AccessString>>,
        jti: &str,
        expires: Instant,
    ) -> Result<(), GatewayError> {
        if let Some(tenant) = &mut self.tenant {
            if tenant.cache != route.cache_id {
                return Err(GatewayError::Auth("re-authentication to another cache".into()));
            }
            *tenant.entry.jti.lock().unwrap() = jti.to_string();
            self.token_expires = expires;
            tenant.access = access;
            if tenant.upstream_login != upstream {
                tenant.upstream_login = upstream;
                tenant.route = with_login(route, &tenant.upstream_login);
                let (user, password) = (tenant.route.acl_user.clone(), tenant.route.acl_password.clone());
                if self.up_write.is_some() {
                    self.forward_helper(&[b"AUTH", user.as_bytes(), password.as_bytes()]);
                }
            }
            return Ok(());
        }
        let cache = route.cache_id.clone();
        let (registration, inbox) = self
            .shared
            .clients
            .register(
                &cache,
                max_connections(&self.shared.config, &route),
                self.peer.to_string(),
                self.local.to_string(),
            )
            .ok_or(GatewayError::TooManyConnections)?;
        let ns = Namespace::new(&route.acl_user, route.db, route.databases, &route.keyspace_events);
        let route = with_login(route, &upstream);
        let stream = match upstream::connect(&route, route.db).await {
            Ok(x) => x,
            // (Dropping the registration gives the slot back.)
            Err(e) => return Err(e),
        };
        let entry = registration.entry().clone();
        entry.proto.store(self.proto, Ordering::Relaxed);
        let (read, write) = stream.into_split();
        self.up_read = Some(read);
        self.up_metric = Some(crate::metrics::Upstream::opened());
        self.up_write = Some(write);
        tracing::info!(cache = %cache, jti, upstream_user = %route.acl_user, peer = %self.peer, "authenticated");
        *entry.jti.lock().unwrap() = jti.to_string();
        self.token_expires = expires;
        self.unauthenticated = None;
        self.inbox = Some(inbox);
        self.killed = Some(Box::pin(entry.kill.clone().notified_owned()));
        let bucket = self.shared.buckets.get(&cache, route.limits.ecpu_per_second);
        let latency = crate::metrics::latency(&cache);
        self.tenant = Some(Tenant {
            bucket,
            latency,
            ns,
            cache,
            route,
            live,
            db: 0,
            entry,
            _registration: registration,
            upstream_login: upstream,
            access,
        });
        Ok(())
    }

    /// When an unauthenticated connection's time to log in (`auth_timeout`) runs out; None
    /// once it has logged in.
    pub(crate) fn auth_deadline(&self) -> Option<Instant> {
        self.unauthenticated.as_ref().map(|u| u.since + self.shared.config.auth_timeout)
    }
}
