//! Binding a session to the cache its checked credentials open (the check itself, throttled
//! and audited, is [`super::credentials`]).

use super::credentials::{Credentials, Login};
use super::{Session, Tenant};
use crate::pubsub::Namespace;
use crate::{upstream, GatewayError};
use shoal_types::TenantRoute;
use std::sync::atomic::Ordering;
use std::time::Instant;

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

impl Session {
    /// Checks credentials (throttled, audited) and binds the session to their cache. On an
    /// authenticated connection, a login to the same cache switches the user; another
    /// cache's is refused.
    pub async fn authenticate(&mut self, user: Option<&[u8]>, password: &[u8]) -> Result<(), GatewayError> {
        let shared = self.shared.clone();
        let mut login = Login::start(&shared, self.peer.ip(), user, password);
        let result = match login.check(password).await {
            Ok(credentials) => self.bind(credentials).await,
            Err(e) => Err(e),
        };
        login.finish(&result);
        result
    }

    /// Binds the session to the cache of `route`, logged in upstream as the cache's own ACL
    /// user or as `upstream` (a cache user's). A second login on the connection must be to
    /// the same cache; it switches the upstream user in place.
    async fn bind(&mut self, credentials: Credentials) -> Result<(), GatewayError> {
        let Credentials { live, route, upstream, access, jti, expires } = credentials;
        let jti = jti.as_str();
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
        // The cache's limits are shared with the other gateways: the first session here
        // asks for this gateway's share before it takes a connection.
        let (bucket, new) = self.shared.buckets.get(&cache, &route.limits);
        if new {
            crate::metering::limit::ask_at_login(&self.shared, &cache, &bucket).await;
        }
        let max = bucket.connection_share().map_or(usize::MAX, |n| n as usize);
        let Some((registration, inbox)) = self.shared.clients.register(
            &cache,
            max_connections(&self.shared.config, &route).min(max),
            self.peer.to_string(),
            self.local.to_string(),
        ) else {
            if !new {
                // (A new bucket's first ask counted this client already.)
                bucket.connection_refused();
            }
            return Err(GatewayError::TooManyConnections);
        };
        let ns = Namespace::new(&route.acl_user, route.db, route.databases, &route.keyspace_events);
        let route = with_login(route, &upstream);
        // The node checks the login (a deleted cache's ACL user is gone, so a stale route
        // fails here). On an error, dropping the registration gives the slot back.
        let stream = upstream::connect(&route, route.db, self.endpoint == super::Endpoint::Reader).await?;
        // A session that will send its stateless commands to the cache's shared connection
        // gives this one back and opens its own again only when a command needs it: an idle
        // client holds no upstream connection. The others (a login with its own ACL user,
        // RESP3, the reader endpoint, a cluster pool) keep it.
        let shares = upstream.is_none()
            && self.proto == 2
            && self.endpoint == super::Endpoint::Primary
            && route.cluster_nodes.is_empty();
        if !shares {
            self.attach_upstream(stream);
        }
        let entry = registration.entry().clone();
        entry.proto.store(self.proto, Ordering::Relaxed);
        tracing::info!(cache = %cache, jti, upstream_user = %route.acl_user, peer = %self.peer, "authenticated");
        *entry.jti.lock().unwrap() = jti.to_string();
        self.token_expires = expires;
        self.unauthenticated = None;
        self.inbox = Some(inbox);
        self.killed = Some(Box::pin(entry.kill.clone().notified_owned()));
        let latency = crate::metrics::latency(&cache);
        let stats = registration.stats();
        let channels = registration.channels();
        self.tenant = Some(Tenant {
            stats,
            channels,
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
