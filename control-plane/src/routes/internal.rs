//! The internal API gateways use: routes to caches and the token-verification keys.
//! Routes carry Valkey ACL passwords, so they require the internal bearer token.

use crate::error::ApiError;
use crate::routes::caches::parse_id;
use crate::startup::AppState;
use crate::store::CacheRecord;
use actix_web::{web, HttpRequest, HttpResponse};
use shoal_types::{CacheId, TenantRoute};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/internal/v1/routes/{id}", web::get().to(route))
        .route("/internal/v1/routes", web::post().to(routes))
        .route("/internal/v1/caches/{id}/client-tracking", web::post().to(enable_client_tracking))
        .route("/internal/v1/revocations", web::get().to(revocations))
        .route("/.well-known/jwks.json", web::get().to(jwks));
}

/// Internal calls must carry the gateways' bearer token.
pub(crate) fn require_gateway(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    if crate::auth::internal_token_ok(req, &state.config.internal_token) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// The live cache an internal call names, once the caller proved it is a gateway.
async fn internal_cache(state: &AppState, req: &HttpRequest, id: &str) -> Result<CacheRecord, ApiError> {
    require_gateway(state, req)?;
    state.store.cache(&parse_id(id)?).await?.ok_or(ApiError::NotFound("cache"))
}

async fn route(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let cache = internal_cache(&state, &req, &id).await?;
    let full = state.store.cache_storage(&cache.id).await?.is_some_and(|s| s.storage_full);
    Ok(HttpResponse::Ok().json(tenant_route(&state, cache, full)?))
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
    req: HttpRequest,
    body: web::Json<RoutesRequest>,
) -> Result<HttpResponse, ApiError> {
    require_gateway(&state, &req)?;
    if body.ids.len() > MAX_ROUTES {
        return Err(ApiError::field("ids", format!("at most {MAX_ROUTES} ids per request")));
    }
    let ids: Vec<CacheId> = body.ids.iter().filter_map(|id| CacheId::parse(id).ok()).collect();
    let full = state.store.storage_full_caches().await?;
    let mut routes = Vec::with_capacity(ids.len());
    for cache in state.store.live_caches(&ids).await? {
        let is_full = full.contains(&cache.id);
        routes.push(tenant_route(&state, cache, is_full)?);
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "routes": routes })))
}

/// What a gateway needs to serve a cache.
fn tenant_route(state: &AppState, cache: CacheRecord, storage_full: bool) -> Result<TenantRoute, ApiError> {
    let node = state.pool.node(&cache.node).map_err(ApiError::from)?;
    Ok(TenantRoute {
        acl_user: cache.id.acl_user(),
        cache_id: cache.id,
        cache_name: cache.name,
        node_addr: node.addr(),
        db: cache.db,
        databases: cache.databases,
        acl_password: cache.acl_password,
        observer_user: shoal_engine::node::OBSERVER_USER.to_string(),
        observer_password: node.observer_password().to_string(),
        keyspace_events: cache.keyspace_events,
        limits: cache.limits,
        storage_full,
    })
}

/// A gateway reports that a cache's clients turned on client-side caching: the cache's node
/// starts publishing the keyspace events gateways turn into invalidations.
async fn enable_client_tracking(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let cache = internal_cache(&state, &req, &id).await?;
    if state.store.enable_client_tracking(&cache.id).await? {
        crate::routes::caches::apply_keyspace_events(&state, &cache.node).await?;
    }
    Ok(HttpResponse::NoContent().finish())
}

/// Revoked tokens that have not expired: gateways poll this every second.
async fn revocations(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    require_gateway(&state, &req)?;
    let jtis: Vec<String> = state.store.revoked_tokens().await?.into_iter().map(|(jti, _)| jti).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "revoked": jtis })))
}

/// The public keys that verify data-plane tokens (JWKS).
#[utoipa::path(get, path = "/.well-known/jwks.json", responses((status = 200, body = crate::signing::Jwks)), tag = "auth")]
pub async fn jwks(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.signer.jwks())
}
