//! The internal API gateways use: routes to caches and the token-verification keys.
//! Routes carry Valkey ACL passwords, so the API is served on its own listener
//! (`internal_listen`; TLS off loopback) and every call carries a gateway's own credential
//! ([`Gateway`]).

use crate::domain::caches::parse_id;
use crate::error::ApiError;
use crate::gateways::Gateway;
use crate::state::AppState;
use crate::store::CacheRecord;
use actix_web::{web, HttpResponse};
use shoal_types::{CacheId, LoginEvent, TenantRoute, VerifiedLogin, VerifyRefusal, VerifyRequest};
use std::collections::HashMap;
use std::time::Instant;

/// The public REST port serves only the (public) signing keys from here.
pub fn configure_public(cfg: &mut web::ServiceConfig) {
    cfg.route("/.well-known/jwks.json", web::get().to(jwks));
}

/// The internal listener's routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/internal/v1/routes/{id}", web::get().to(route))
        .route("/internal/v1/routes", web::post().to(routes))
        .route("/internal/v1/caches/{id}/client-tracking", web::post().to(enable_client_tracking))
        .route("/internal/v1/caches/{id}/storage-sample", web::post().to(sample_storage))
        .route("/internal/v1/revocations", web::get().to(revocations))
        .route("/internal/v1/module-commands", web::get().to(module_commands))
        .route("/internal/v1/caches/{id}/users/verify", web::post().to(verify_user))
        .route("/internal/v1/audit", web::post().to(login_events))
        .service(
            web::resource("/internal/v1/limits")
                .app_data(
                    web::JsonConfig::default()
                        .limit(MAX_LIMITS_BYTES)
                        .content_type_required(false)
                        .error_handler(crate::error::json_error),
                )
                .route(web::post().to(limits)),
        )
        .route("/internal/v1/engine/report", web::post().to(engine_report))
        .route("/.well-known/jwks.json", web::get().to(jwks));
}

/// The live cache an internal call names (the caller authenticated as a gateway).
async fn internal_cache(state: &AppState, _: &Gateway, id: &str) -> Result<CacheRecord, ApiError> {
    state.store.cache(&parse_id(id)?).await?.ok_or(ApiError::NotFound("cache"))
}

async fn route(
    state: web::Data<AppState>,
    gw: Gateway,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let cache = internal_cache(&state, &gw, &id).await?;
    let storage = state.store.cache_storage(&cache.id).await?;
    crate::storage::observe_before_use(&state, &cache, storage.as_ref()).await;
    let place = place(&state, &cache).await?;
    Ok(HttpResponse::Ok().json(tenant_route(&state, cache, place, storage.as_ref())))
}

/// Most routes one request may ask for (gateways ask in chunks of this many).
const MAX_ROUTES: usize = 1000;

#[derive(serde::Deserialize)]
struct RoutesRequest {
    ids: Vec<String>,
}

/// The routes of several caches at once (the gateways' per-second refresh of the caches they
/// serve); caches that do not exist (any more) are left out.
async fn routes(
    state: web::Data<AppState>,
    _: Gateway,
    body: web::Json<RoutesRequest>,
) -> Result<HttpResponse, ApiError> {
    if body.ids.len() > MAX_ROUTES {
        return Err(ApiError::field("ids", format!("at most {MAX_ROUTES} ids per request")));
    }
    let ids: Vec<CacheId> = body.ids.iter().filter_map(|id| CacheId::parse(id).ok()).collect();
    // Caches the gateway holds sessions of: their clients may give them keys.
    crate::storage::note_in_use(&ids);
    let storage = state.store.caches_storage(&ids).await?;
    let mut routes = Vec::with_capacity(ids.len());
    // One look at each placement target per request (a cluster's asks it for its primaries).
    let mut places: HashMap<(String, String), Place> = HashMap::new();
    for cache in state.store.live_caches(&ids).await? {
        let sample = storage.get(&cache.id);
        let key = (cache.pool.clone(), cache.node.clone());
        let place = match places.get(&key) {
            Some(p) => p.clone(),
            None => places.entry(key).or_insert(place(&state, &cache).await?).clone(),
        };
        routes.push(tenant_route(&state, cache, place, sample));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "routes": routes })))
}

/// Where a cache's pool is reached: a node's address (one shard's primary in a cluster),
/// every node of a cluster (empty for standalone), the observer user's password.
type Place = (String, Vec<String>, String);

async fn place(state: &AppState, cache: &CacheRecord) -> Result<Place, ApiError> {
    Ok(state.pools.of(&cache.pool)?.route(&cache.node).await?)
}

/// What a gateway needs to serve a cache.
fn tenant_route(
    state: &AppState,
    cache: CacheRecord,
    (node_addr, cluster_nodes, observer_password): Place,
    storage: Option<&crate::store::CacheStorage>,
) -> TenantRoute {
    let mut limits = cache.limits;
    // Caches stored before storage limits had a default get it here too.
    limits.data_storage_mb = Some(limits.data_storage_mb.unwrap_or(state.config.default_data_storage_mb));
    TenantRoute {
        acl_user: cache.id.acl_user(),
        cache_id: cache.id,
        cache_name: cache.name,
        node_addr,
        cluster_nodes,
        db: cache.db,
        databases: cache.databases,
        acl_password: cache.acl_password,
        observer_user: shoal_engine::node::OBSERVER_USER.to_string(),
        observer_password,
        keyspace_events: cache.keyspace_events,
        limits,
        storage_full: storage.is_some_and(|s| s.storage_full),
        storage_bytes: storage.map_or(0, |s| s.bytes),
        storage_sampled_at_ms: storage.map_or(0, |s| s.sampled_at_ms),
        eviction_policy: cache.eviction_policy,
        dedicated: cache.placement == shoal_engine::Placement::Dedicated,
    }
}

/// A gateway saw a cache write close to its storage limit since the last sample: sample it
/// now (and evict, or mark it full), so the gateway's estimate is replaced by a measurement
/// within about a second instead of the next periodic sample. At most one per cache per
/// 250 ms; answers once the sample is recorded.
async fn sample_storage(
    state: web::Data<AppState>,
    gw: Gateway,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let cache = internal_cache(&state, &gw, &id).await?;
    crate::storage::sample_now(&state, &cache).await;
    Ok(HttpResponse::NoContent().finish())
}

/// A gateway reports that a cache's clients turned on client-side caching: the cache's node
/// starts publishing the keyspace events gateways turn into invalidations.
async fn enable_client_tracking(
    state: web::Data<AppState>,
    gw: Gateway,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let cache = internal_cache(&state, &gw, &id).await?;
    if state.store.enable_client_tracking(&cache.id).await? {
        crate::domain::caches::apply_keyspace_events(&state, &cache.pool, &cache.node).await?;
    }
    Ok(HttpResponse::NoContent().finish())
}

/// The commands the nodes' modules add (their `COMMAND` facts): gateways put them in their
/// command table at start.
async fn module_commands(_: Gateway) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "commands": shoal_commands::module_commands() }))
}

/// Revoked tokens that have not expired: gateways poll this every second.
async fn revocations(state: web::Data<AppState>, _: Gateway) -> Result<HttpResponse, ApiError> {
    let jtis: Vec<String> = state.store.revoked_tokens().await?.into_iter().map(|(jti, _)| jti).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "revoked": jtis })))
}

/// The public keys that verify data-plane tokens (JWKS).
#[utoipa::path(get, path = "/.well-known/jwks.json", responses((status = 200, body = crate::signing::Jwks)), tag = "auth")]
pub async fn jwks(state: web::Data<AppState>) -> HttpResponse {
    // The store's keys (another control plane may have rotated); the last known ones if the
    // store cannot be read just now.
    if let Err(e) = state.signer.refresh(&state.store).await {
        tracing::warn!(error = %e, "could not reload the signing keys; serving the last known JWKS");
    }
    HttpResponse::Ok().json(state.signer.jwks())
}

/// Most events one audit batch may carry.
const MAX_AUDIT_BATCH: usize = 1000;

fn refused(status: actix_web::http::StatusCode, mechanism: &str, reason: &str) -> HttpResponse {
    HttpResponse::build(status).json(VerifyRefusal { mechanism: mechanism.into(), reason: reason.into() })
}

/// A gateway checks a login to a cache: a cache user's password (argon2, off the async
/// threads), the cache's no-password `default` user, or — for names that are no cache
/// user — an LDAP bind whose groups give a role on this cache. Answers the upstream ACL user
/// to connect as (200), a refusal (401), 503 when the directory cannot be asked, or 429
/// (with Retry-After) while the (user, source) — or the gateway's failure budget — is
/// locked out. The gateway delays; the control plane only locks.
async fn verify_user(
    state: web::Data<AppState>,
    gw: Gateway,
    id: web::Path<String>,
    body: web::Json<VerifyRequest>,
) -> Result<HttpResponse, ApiError> {
    let cache = internal_cache(&state, &gw, &id).await?;
    let request = body.into_inner();
    let source: std::net::IpAddr =
        request.source.parse().map_err(|_| ApiError::field("source", "source must be an IP address"))?;
    // Keyed by (user, source): a flood from one source cannot lock the user out elsewhere.
    let key = format!("{}@{}/{source}", request.username, cache.id);
    let now = Instant::now();
    let locked = state.verify_budget.lock().unwrap().exhausted(&gw.name, now).or_else(|| {
        match state.verify_throttle.lock().unwrap().check(now, source, &key) {
            shoal_auth::throttle::Verdict::Locked { remaining, .. } => Some(remaining),
            _ => None,
        }
    });
    if let Some(remaining) = locked {
        let secs = remaining.as_secs().max(1);
        return Ok(HttpResponse::TooManyRequests()
            .insert_header(("Retry-After", secs.to_string()))
            .json(VerifyRefusal { mechanism: "none".into(), reason: "locked_out".into() }));
    }
    let answer = check_login(&state, cache, request).await?;
    match answer.status().as_u16() {
        200 => {
            state.verify_throttle.lock().unwrap().success(source, &key);
        }
        401 => {
            state.verify_throttle.lock().unwrap().failure(now, source, &key);
            state.verify_budget.lock().unwrap().spend(&gw.name, now);
        }
        _ => {}
    }
    Ok(answer)
}

async fn check_login(
    state: &AppState,
    cache: CacheRecord,
    request: VerifyRequest,
) -> Result<HttpResponse, ApiError> {
    use actix_web::http::StatusCode;
    let VerifyRequest { username, password, .. } = request;
    // Only well-formed names can be cache users (and a NUL byte is no text to PostgreSQL).
    let cache_user = match crate::domain::logins::is_valid_username(&username) {
        true => state.store.cache_user(&cache.id, &username).await?,
        false => None,
    };
    if let Some(user) = cache_user {
        let ok = user.no_password
            || match shoal_auth::UserPasswords::from_hashes(user.password_hashes.clone()) {
                Ok(hashes) => tokio::task::spawn_blocking(move || hashes.verify(&password))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
                Err(e) => return Err(ApiError::Internal(e.to_string())),
            };
        if !ok {
            return Ok(refused(StatusCode::UNAUTHORIZED, "cache-user", "wrong_password"));
        }
        let enabled =
            shoal_auth::AccessString::parse(&user.access_string).map(|a| a.enabled()).unwrap_or(false);
        if !enabled {
            return Ok(refused(StatusCode::UNAUTHORIZED, "cache-user", "user_disabled"));
        }
        return Ok(HttpResponse::Ok().json(VerifiedLogin {
            mechanism: "cache-user".into(),
            username,
            upstream_user: crate::domain::logins::upstream_user(&cache, &user.username),
            upstream_password: user.upstream_secret,
            account_id: cache.account_id,
            access_string: Some(user.access_string),
        }));
    }
    let Some(directory) = state.directory.clone() else {
        return Ok(refused(StatusCode::UNAUTHORIZED, "none", "unknown_user"));
    };
    let identity = match directory.authenticate(&username, &password).await {
        Ok(identity) => identity,
        Err(e) if e.is_credential_failure() => {
            return Ok(refused(StatusCode::UNAUTHORIZED, "ldap", e.kind()));
        }
        Err(e) => {
            tracing::warn!(error = %e, "LDAP unavailable for a gateway login");
            return Ok(refused(StatusCode::SERVICE_UNAVAILABLE, "ldap", e.kind()));
        }
    };
    let role = identity.roles.iter().find_map(|r| match r {
        shoal_auth::Role::CacheReadWrite { cache: c } if *c == cache.id => Some("rw"),
        _ => None,
    });
    let role = role.or_else(|| {
        identity.roles.iter().find_map(|r| match r {
            shoal_auth::Role::CacheReadOnly { cache: c } if *c == cache.id => Some("ro"),
            _ => None,
        })
    });
    let Some(role) = role else {
        return Ok(refused(StatusCode::UNAUTHORIZED, "ldap", "no_role_on_cache"));
    };
    // One upstream ACL user per role and cache, with a password derived from the cache's
    // own secret (so nothing more is stored); (re)made on each login, which is idempotent.
    let access_text = if role == "rw" { LDAP_READ_WRITE } else { LDAP_READ_ONLY };
    let access = shoal_auth::AccessString::parse(access_text).expect("a valid constant");
    let upstream_user = format!("{}.ldap.{role}", cache.id.acl_user());
    let secret = shoal_auth::token::derived_password(&cache.acl_password, &upstream_user);
    crate::domain::logins::ensure_login_user(state, &cache, &upstream_user, &access, &secret).await?;
    Ok(HttpResponse::Ok().json(VerifiedLogin {
        mechanism: "ldap".into(),
        username: identity.user,
        upstream_user,
        upstream_password: secret,
        account_id: cache.account_id,
        access_string: Some(access_text.to_string()),
    }))
}

/// What LDAP users with the cache read-write / read-only role may do (as tokens of either
/// permission).
pub const LDAP_READ_WRITE: &str = shoal_auth::token::READ_WRITE;
pub const LDAP_READ_ONLY: &str = shoal_auth::token::READ_ONLY;

/// Most caches in one limits report (a gateway reports those with sessions).
const MAX_LIMIT_DEMANDS: usize = 100_000;
/// Largest limits report accepted: room for [`MAX_LIMIT_DEMANDS`] demands (about 150 bytes
/// each) and `MAX_LOGIN_KEYS` failed-login keys (at most about 400 bytes each).
const MAX_LIMITS_BYTES: usize = 32 * 1024 * 1024;

/// A gateway instance's demands on caches' limits, answered with its shares
/// (`crate::limits`). Keyed by the credential's name and the instance's id, so one gateway
/// cannot speak for another. Answered by the control plane that coordinates the limits (the
/// `limits` lease's holder): another forwards the report there (with the gateway's own
/// credential). When none can be reached, the control plane asked offers to coordinate (its
/// lease tries at once); 503 — the gateway then keeps its last shares, then divides — when
/// that does not settle it, and while a new coordinator warms up. A forwarded report that
/// reaches a control plane that does not coordinate is answered 421. The coordinator also
/// counts the failed logins a report carries (`crate::login_locks`) and answers the
/// lockouts with the shares; a report without logins gets the bare list of shares.
async fn limits(
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
    gw: Gateway,
    body: web::Json<shoal_types::LimitReport>,
) -> Result<HttpResponse, ApiError> {
    use crate::limits::Phase;
    let report = body.into_inner();
    if report.demands.len() > MAX_LIMIT_DEMANDS {
        return Err(ApiError::field("demands", format!("at most {MAX_LIMIT_DEMANDS} caches per report")));
    }
    if let Some(logins) = &report.logins {
        crate::login_locks::validate(logins).map_err(|e| ApiError::field("logins", e))?;
    }
    let instance: String = report.gateway_id.chars().take(160).collect();
    let gateway = format!("{}/{instance}", gw.name);
    let forwarded = req.headers().contains_key(crate::limits::FORWARDED_BY);
    if !forwarded {
        state.limits.asked();
    }
    let mut phase = state.limits.phase();
    if phase == Phase::Elsewhere {
        if forwarded {
            return Ok(HttpResponse::MisdirectedRequest().json(serde_json::json!({
                "detail": "this control plane does not coordinate the limits"
            })));
        }
        let authorization =
            req.headers().get("Authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let forward =
            || state.limits_forwarder.forward(&state.store, &state.instance, authorization, &report);
        if let Ok(answer) = forward().await {
            return Ok(passed_on(answer));
        }
        // Nobody coordinates, or the coordinator cannot be reached: offer to. Another
        // control plane may win: then forward to it.
        phase = state.limits.offer(crate::limits::OFFER_WAIT).await;
        if phase == Phase::Elsewhere {
            state.limits_forwarder.invalidate();
            return match forward().await {
                Ok(answer) => Ok(passed_on(answer)),
                Err(e) => Err(ApiError::Unavailable(e.to_string())),
            };
        }
    }
    let coordinator = &state.limits;
    match phase {
        Phase::WarmingUp => {
            if let Some(logins) = &report.logins {
                coordinator.logins(logins);
            }
            coordinator.observe(&gateway, report.demands);
            Err(ApiError::Unavailable(
                "the limits coordinator has just taken over and is learning every gateway's demand; \
                 the last shares hold meanwhile"
                    .into(),
            ))
        }
        _ => {
            let shares = coordinator.report(&gateway, report.demands);
            Ok(match report.logins {
                Some(logins) => HttpResponse::Ok()
                    .json(shoal_types::LimitAnswer { shares, logins: Some(coordinator.logins(&logins)) }),
                None => HttpResponse::Ok().json(shares),
            })
        }
    }
}

/// The coordinator's answer to a forwarded report, as it came.
fn passed_on(answer: crate::limits::Forwarded) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(answer.status)
        .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
    let mut resp = HttpResponse::build(status);
    if let Some(content_type) = answer.content_type {
        resp.content_type(content_type);
    }
    resp.body(answer.body)
}

/// An engine agent's report of the nodes it runs (it authenticates with an internal
/// credential, like a gateway). Nodes no pool of this control plane has are named in the
/// answer, and logged: the agent's and the control plane's configs disagree.
async fn engine_report(
    state: web::Data<AppState>,
    caller: Gateway,
    body: web::Json<shoal_types::EngineReport>,
) -> Result<HttpResponse, ApiError> {
    let report = body.into_inner();
    if report.nodes.len() > crate::engine_hosts::MAX_REPORTED_NODES {
        return Err(ApiError::field(
            "nodes",
            format!("at most {} nodes per report", crate::engine_hosts::MAX_REPORTED_NODES),
        ));
    }
    if !shoal_types::valid_gateway_name(&report.host) {
        return Err(ApiError::field("host", "1–63 characters of a-z, 0-9 and -"));
    }
    let host = report.host.clone();
    let pools = &state.pools;
    let known = |name: &str| pools.iter().any(|(_, p)| p.runs_on_agent(name));
    let unknown = crate::engine_hosts::record(&state.store, &caller.name, report, known).await?;
    if !unknown.is_empty() {
        tracing::warn!(host, ?unknown, "an engine agent runs nodes that no pool here is configured to use");
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "unknown_nodes": unknown })))
}

/// A gateway's batch of data-plane login events: each becomes an audit record, stamped with
/// the name of the gateway whose credential posted it.
async fn login_events(
    state: web::Data<AppState>,
    gw: Gateway,
    body: web::Json<Vec<LoginEvent>>,
) -> Result<HttpResponse, ApiError> {
    if body.len() > MAX_AUDIT_BATCH {
        return Err(ApiError::field("events", format!("at most {MAX_AUDIT_BATCH} events per batch")));
    }
    // One batch for the writer: a gateway's flood does not become a transaction per event.
    let mut events = Vec::with_capacity(body.len());
    for e in body.into_inner() {
        let clip = |s: &str, n: usize| crate::store::audit::printable(&s.chars().take(n).collect::<String>());
        let mut details = serde_json::json!({ "mechanism": clip(&e.mechanism, 16), "username": clip(&e.username, 200),
                                              "at": clip(&e.at, 40), "gateway": gw.name,
                                              "gateway_instance": clip(&e.gateway_id, 64),
                                              "jti": e.jti.map(|j| clip(&j, 64)) });
        if let Some(a) = &e.aggregate {
            // Failures a gateway counted instead of sending one by one.
            let reasons: serde_json::Map<String, serde_json::Value> =
                a.reasons.iter().take(20).map(|(r, n)| (clip(r, 200), (*n).into())).collect();
            let usernames: Vec<String> = a.usernames.iter().take(10).map(|u| clip(u, 200)).collect();
            details["count"] = a.count.into();
            details["first_at"] = clip(&a.first_at, 40).into();
            details["last_at"] = clip(&e.at, 40).into();
            details["reasons"] = reasons.into();
            details["usernames"] = usernames.into();
        }
        events.push(crate::store::audit::AuditEvent {
            actor: format!("{}:{}", clip(&e.mechanism, 16), clip(&e.username, 200)),
            account_id: e.account_id.map(|a| a.to_string()),
            source: clip(&e.source, 64),
            action: "data.auth".into(),
            target: e.cache_id.as_ref().map(|c| c.to_string()).unwrap_or_default(),
            cache_id: e.cache_id.map(|c| c.to_string()),
            outcome: clip(&e.outcome, 16),
            reason: clip(&e.reason, 200),
            request_id: gw.name.clone(),
            details,
        });
    }
    state.store.audit_all(events).await?;
    Ok(HttpResponse::NoContent().finish())
}
