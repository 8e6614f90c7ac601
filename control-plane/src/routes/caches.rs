//! `/v1/caches`: create, list, get, delete.

use crate::auth::Principal;
use crate::error::ApiError;
use crate::startup::AppState;
use crate::store::{self, CacheRecord};
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use shoal_engine::{placement, TenantAcl};
use shoal_types::{AccountId, CacheId};
use utoipa::ToSchema;

/// The account that owns what the platform admin creates (accounts come with the REST API).
pub const PLATFORM_ACCOUNT: &str = "a000000000000";
/// Most numbered databases one cache may have.
pub const MAX_DATABASES: u32 = 16;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/caches").route(web::post().to(create_cache)).route(web::get().to(list_caches)),
    )
    .service(
        web::resource("/v1/caches/{id}")
            .route(web::get().to(get_cache))
            .route(web::delete().to(delete_cache)),
    );
}

/// Body of `POST /v1/caches`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCache {
    /// 1–63 characters: letters, digits, `-` and `_`; unique among the account's caches.
    pub name: String,
    /// How many numbered databases the cache may `SELECT` (default 1).
    #[serde(default)]
    pub databases: Option<u32>,
    /// Keyspace notifications to deliver to the cache's subscribers, in Valkey's
    /// `notify-keyspace-events` syntax (e.g. `KEA`); off when absent.
    #[serde(default)]
    pub keyspace_notifications: Option<String>,
}

/// A cache as clients see it.
#[derive(Serialize, ToSchema)]
pub struct Cache {
    pub id: String,
    pub name: String,
    pub account_id: String,
    /// `available` once it can take connections.
    pub status: String,
    /// The RESP endpoint (`host:port`) to connect to.
    pub endpoint: String,
    pub databases: u32,
    /// Keyspace-notification flags ("" = off).
    pub keyspace_notifications: String,
    pub created_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct CacheList {
    pub items: Vec<Cache>,
}

impl Cache {
    fn from_record(c: &CacheRecord, endpoint: &str) -> Cache {
        Cache {
            id: c.id.to_string(),
            name: c.name.clone(),
            account_id: c.account_id.to_string(),
            status: c.status.clone(),
            endpoint: endpoint.to_string(),
            databases: c.databases,
            keyspace_notifications: c.keyspace_events.clone(),
            created_at: c.created_at.clone(),
        }
    }
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::field("name", "name must be 1–63 characters of letters, digits, '-' and '_'"))
    }
}

/// Parses a cache id from the path; malformed ids are simply not found.
pub fn parse_id(raw: &str) -> Result<CacheId, ApiError> {
    CacheId::parse(raw).map_err(|_| ApiError::NotFound("cache"))
}

/// Create a cache: choose a node and database, fence it with its own ACL user, store it.
#[utoipa::path(post, path = "/v1/caches", request_body = CreateCache,
    responses((status = 201, body = Cache), (status = 400, body = crate::error::Problem),
              (status = 401, body = crate::error::Problem), (status = 409, body = crate::error::Problem)),
    security(("bearer" = [])), tag = "caches")]
pub async fn create_cache(
    state: web::Data<AppState>,
    _who: Principal,
    body: web::Json<CreateCache>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    validate_name(&body.name)?;
    let databases = body.databases.unwrap_or(1);
    if !(1..=MAX_DATABASES).contains(&databases) {
        return Err(ApiError::field("databases", format!("databases must be between 1 and {MAX_DATABASES}")));
    }
    let keyspace_events =
        shoal_engine::tenant::parse_keyspace_events(body.keyspace_notifications.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::field("keyspace_notifications", e))?;
    let account = AccountId::parse(PLATFORM_ACCOUNT).expect("valid constant");

    // One placement at a time, so two creates never pick the same database.
    let _placing = state.placement_lock.lock().await;
    if state.store.caches(Some(&account)).await?.iter().any(|c| c.name == body.name) {
        return Err(ApiError::Conflict(format!("a cache named {:?} already exists", body.name)));
    }
    let mut loads = state.pool.loads();
    for (node, db) in state.store.taken_databases().await? {
        if let Some(load) = loads.iter_mut().find(|l| l.node == node) {
            load.taken.insert(db);
        }
    }
    let chosen = placement::choose(&loads, databases).ok_or(shoal_engine::EngineError::Full)?;
    let id = CacheId::generate();
    let acl = TenantAcl {
        user: id.acl_user(),
        password: shoal_engine::node::random_secret(),
        db: chosen.db,
        databases,
    };
    state.pool.create_tenant(&chosen.node, &acl).await?;
    let record = CacheRecord {
        id,
        account_id: account,
        name: body.name,
        status: "available".into(),
        node: chosen.node.clone(),
        db: chosen.db,
        databases,
        acl_password: acl.password.clone(),
        created_at: store::now(),
        keyspace_events,
    };
    if let Err(e) = state.store.insert_cache(&record).await {
        let _ = state.pool.delete_tenant(&chosen.node, &acl).await;
        return Err(if store::is_unique_violation(&e) {
            ApiError::Conflict(format!("a cache named {:?} already exists", record.name))
        } else {
            e.into()
        });
    }
    if !record.keyspace_events.is_empty() {
        apply_keyspace_events(&state, &record.node).await?;
    }
    tracing::info!(cache = %record.id, node = %record.node, db = record.db, "cache created");
    Ok(HttpResponse::Created().json(Cache::from_record(&record, &state.config.public_endpoint)))
}

/// List caches.
#[utoipa::path(get, path = "/v1/caches", responses((status = 200, body = CacheList)),
    security(("bearer" = [])), tag = "caches")]
pub async fn list_caches(state: web::Data<AppState>, _who: Principal) -> Result<HttpResponse, ApiError> {
    let items = state.store.caches(None).await?;
    let endpoint = &state.config.public_endpoint;
    Ok(HttpResponse::Ok()
        .json(CacheList { items: items.iter().map(|c| Cache::from_record(c, endpoint)).collect() }))
}

/// Get one cache.
#[utoipa::path(get, path = "/v1/caches/{id}", params(("id" = String, Path, description = "cache id")),
    responses((status = 200, body = Cache), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])), tag = "caches")]
pub async fn get_cache(
    state: web::Data<AppState>,
    _who: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&id)?;
    let cache = state.store.cache(&id).await?.ok_or(ApiError::NotFound("cache"))?;
    Ok(HttpResponse::Ok().json(Cache::from_record(&cache, &state.config.public_endpoint)))
}

/// Delete a cache: its ACL user goes (open connections close), its data is flushed.
#[utoipa::path(delete, path = "/v1/caches/{id}", params(("id" = String, Path, description = "cache id")),
    responses((status = 204), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])), tag = "caches")]
pub async fn delete_cache(
    state: web::Data<AppState>,
    _who: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&id)?;
    let _placing = state.placement_lock.lock().await;
    let cache = state.store.cache(&id).await?.ok_or(ApiError::NotFound("cache"))?;
    let acl = TenantAcl {
        user: cache.id.acl_user(),
        password: cache.acl_password.clone(),
        db: cache.db,
        databases: cache.databases,
    };
    state.pool.delete_tenant(&cache.node, &acl).await?;
    state.store.mark_cache_deleted(&cache.id).await?;
    apply_keyspace_events(&state, &cache.node).await?;
    tracing::info!(cache = %cache.id, "cache deleted");
    Ok(HttpResponse::NoContent().finish())
}

/// Sets a node's `notify-keyspace-events` to the union of its live caches' flags.
pub async fn apply_keyspace_events(state: &AppState, node: &str) -> Result<(), ApiError> {
    let flags = state.store.keyspace_events_on(node).await?;
    let union = shoal_engine::tenant::union_keyspace_events(flags.iter().map(String::as_str));
    state.pool.set_keyspace_events(node, &union).await?;
    Ok(())
}
