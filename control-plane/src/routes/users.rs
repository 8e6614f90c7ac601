//! `/v1/caches/{id}/users`: cache users (ElastiCache RBAC users). Each has one or two
//! passwords (argon2id hashes) and an access string; a matching upstream Valkey ACL user
//! `t<cache>.user.<name>` holds the access string intersected with the cache's own rules, so
//! Valkey enforces it — inside Lua scripts too. Clients log in with
//! `AUTH <name>@<cache id> <password>`.

use crate::auth::Principal;
use crate::context::RequestContext;
use crate::domain::caches::{changeable_cache, visible_cache};
use crate::domain::logins::{is_valid_username, upstream_rules, upstream_user};
use crate::error::ApiError;
use crate::routes::page;
use crate::routes::responses;
use crate::state::AppState;
use crate::store::users::{self, CacheUserRecord};
use crate::store::{self, CacheRecord};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use shoal_auth::{AccessString, UserPasswords};
use utoipa::ToSchema;

/// The user name reserved for the cache's no-password user.
pub const DEFAULT_USER: &str = "default";
/// Most users one cache may have.
pub const MAX_USERS: usize = 100;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/caches/{id}/users")
            .route(web::post().to(create_user))
            .route(web::get().to(list_users)),
    )
    .service(
        web::resource("/v1/caches/{id}/users/{username}")
            .route(web::get().to(get_user))
            .route(web::patch().to(patch_user))
            .route(web::delete().to(delete_user)),
    );
}

/// Body of `POST /v1/caches/{id}/users`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// 1–64 characters: letters, digits, `-` and `_`. `default` is the cache's default user.
    pub username: String,
    /// One or two passwords (two while rotating): 16–128 printable ASCII characters, no
    /// spaces. Stored only as argon2id hashes.
    #[serde(default)]
    pub passwords: Option<Vec<String>>,
    /// Valkey ACL rules such as `on ~app:* +@read`; a user without `on` cannot log in.
    pub access_string: String,
    /// Only for `default`: log in with any password (ElastiCache's `NoPasswordRequired`),
    /// for trusted networks. Off unless set.
    #[serde(default)]
    pub no_password_required: Option<bool>,
}

/// Body of `PATCH /v1/caches/{id}/users/{username}`: any of the fields. `passwords`
/// replaces the user's passwords (send the old and the new one to rotate, then the new one
/// alone). Send `If-Match` with the ETag you read to avoid overwriting another change.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchUser {
    pub passwords: Option<Vec<String>>,
    pub access_string: Option<String>,
    pub no_password_required: Option<bool>,
}

/// A cache user as clients see it (never a password or hash).
#[derive(Serialize, ToSchema)]
pub struct CacheUser {
    pub username: String,
    pub cache_id: String,
    pub access_string: String,
    /// How many passwords the user has (0–2).
    pub password_count: usize,
    pub no_password_required: bool,
    /// What to send on the cache's endpoint: `AUTH <username>@<cache id> <password>`.
    pub login: String,
    pub etag: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct CacheUserList {
    pub items: Vec<CacheUser>,
}

impl CacheUser {
    fn of(u: &CacheUserRecord) -> CacheUser {
        CacheUser {
            username: u.username.clone(),
            cache_id: u.cache_id.to_string(),
            access_string: u.access_string.clone(),
            password_count: u.password_hashes.len(),
            no_password_required: u.no_password,
            login: format!("AUTH {}@{} <password>", u.username, u.cache_id),
            etag: page::etag(u.version),
            created_at: u.created_at.clone(),
            updated_at: u.updated_at.clone(),
        }
    }
}

fn validate_username(name: &str) -> Result<(), ApiError> {
    if is_valid_username(name) {
        Ok(())
    } else {
        Err(ApiError::field("username", "username must be 1–64 characters of letters, digits, '-' and '_'"))
    }
}

fn parse_access(text: &str) -> Result<AccessString, ApiError> {
    AccessString::parse(text).map_err(|e| ApiError::field("access_string", e.to_string()))
}

/// Hashes passwords off the async threads (argon2 is slow on purpose).
async fn hash_passwords(passwords: Vec<String>) -> Result<Vec<String>, ApiError> {
    let hashed = tokio::task::spawn_blocking(move || UserPasswords::hash(&passwords))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    hashed.map(|p| p.hashes().to_vec()).map_err(|e| ApiError::field("passwords", e.to_string()))
}

fn event_for(
    ctx: &RequestContext,
    who: &Principal,
    action: &str,
    cache: &CacheRecord,
    username: &str,
) -> crate::store::audit::AuditEvent {
    ctx.cache_event(who, action, &format!("{}/users/{username}", cache.id), cache)
}

/// Create a cache user; its upstream ACL user is made on the cache's node.
#[utoipa::path(post, path = "/v1/caches/{id}/users", request_body = CreateUser,
    params(("id" = String, Path, description = "cache id")),
    responses((status = 201, body = CacheUser), responses::ChangeById, responses::Conflict),
    security(("bearer" = [])), tag = "users")]
pub async fn create_user(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let cache = changeable_cache(&state, &who, &id).await?;
    let body: CreateUser = page::json_body(&body)?;
    validate_username(&body.username)?;
    let access = parse_access(&body.access_string)?;
    let no_password = body.no_password_required.unwrap_or(false);
    let hashes = match (no_password, body.passwords) {
        (true, _) if body.username != DEFAULT_USER => {
            return Err(ApiError::field(
                "no_password_required",
                "only the `default` user may log in without a password",
            ))
        }
        (true, Some(p)) if !p.is_empty() => {
            return Err(ApiError::field("passwords", "a user without a password has no passwords"))
        }
        (true, _) => Vec::new(),
        (false, None) => return Err(ApiError::field("passwords", "passwords: give one or two")),
        (false, Some(p)) => hash_passwords(p).await?,
    };
    let _changing = state.users_lock.lock().await;
    if state.store.cache_user(&cache.id, &body.username).await?.is_some() {
        return Err(ApiError::Conflict(format!("cache user {:?} already exists", body.username)));
    }
    if state.store.cache_users(&cache.id).await?.len() >= MAX_USERS {
        return Err(ApiError::Conflict(format!("a cache has at most {MAX_USERS} users")));
    }
    let secret = shoal_engine::node::random_secret();
    let rules = upstream_rules(&cache, &access, &secret)?;
    let name = upstream_user(&cache, &body.username);
    state.pools.of(&cache.pool)?.set_cache_user(&cache.node, &name, &rules).await?;
    let now = store::now();
    let record = CacheUserRecord {
        cache_id: cache.id.clone(),
        username: body.username.clone(),
        password_hashes: hashes,
        no_password,
        access_string: access.as_str().to_string(),
        upstream_secret: secret,
        version: 1,
        created_at: now.clone(),
        updated_at: now,
    };
    let mut event = event_for(&ctx, &who, "cache_user.create", &cache, &record.username);
    event.details = serde_json::json!({ "access_string": record.access_string, "passwords": record.password_hashes.len(),
                                        "no_password_required": no_password });
    let stored = async {
        let mut tx = state.store.begin().await?;
        users::insert_cache_user(tx.conn(), &record).await?;
        tx.commit(&event).await
    }
    .await;
    if let Err(e) = stored {
        let _ = state.pools.of(&cache.pool)?.delete_cache_users(&cache.node, &[name]).await;
        return Err(e.into());
    }
    tracing::info!(cache = %cache.id, user = %record.username, "cache user created");
    Ok(HttpResponse::Created()
        .insert_header(("ETag", page::etag(record.version)))
        .json(CacheUser::of(&record)))
}

/// List a cache's users.
#[utoipa::path(get, path = "/v1/caches/{id}/users", params(("id" = String, Path, description = "cache id")),
    responses((status = 200, body = CacheUserList), responses::ById),
    security(("bearer" = [])), tag = "users")]
pub async fn list_users(
    state: web::Data<AppState>,
    who: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let cache = visible_cache(&state, &who, &id).await?;
    let items = state.store.cache_users(&cache.id).await?.iter().map(CacheUser::of).collect();
    Ok(HttpResponse::Ok().json(CacheUserList { items }))
}

async fn find_user(
    state: &AppState,
    cache: &CacheRecord,
    username: &str,
) -> Result<CacheUserRecord, ApiError> {
    state.store.cache_user(&cache.id, username).await?.ok_or(ApiError::NotFound("cache user"))
}

/// Get one cache user (with its ETag).
#[utoipa::path(get, path = "/v1/caches/{id}/users/{username}",
    params(("id" = String, Path, description = "cache id"), ("username" = String, Path, description = "user name")),
    responses((status = 200, body = CacheUser), responses::ById),
    security(("bearer" = [])), tag = "users")]
pub async fn get_user(
    state: web::Data<AppState>,
    who: Principal,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, username) = path.into_inner();
    let cache = visible_cache(&state, &who, &id).await?;
    let user = find_user(&state, &cache, &username).await?;
    Ok(HttpResponse::Ok().insert_header(("ETag", page::etag(user.version))).json(CacheUser::of(&user)))
}

/// Rotate a user's passwords and/or change its access string. The new access string
/// applies at once, also to connections already open; a user switched `off` is
/// disconnected. Connections stay open across a password change.
#[utoipa::path(patch, path = "/v1/caches/{id}/users/{username}", request_body = PatchUser,
    params(("id" = String, Path, description = "cache id"), ("username" = String, Path, description = "user name"),
           ("If-Match" = Option<String>, Header, description = "the ETag you read")),
    responses((status = 200, body = CacheUser), responses::ChangeById, responses::PreconditionFailed),
    security(("bearer" = [])), tag = "users")]
pub async fn patch_user(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let (id, username) = path.into_inner();
    let cache = changeable_cache(&state, &who, &id).await?;
    let patch: PatchUser = page::json_body(&body)?;
    let access = patch.access_string.as_deref().map(parse_access).transpose()?;
    let new_hashes = match patch.passwords {
        Some(p) => Some(hash_passwords(p).await?),
        None => None,
    };
    let _changing = state.users_lock.lock().await;
    let current = find_user(&state, &cache, &username).await?;
    page::check_if_match(&req, current.version)?;
    let mut next = current.clone();
    let mut changed = Vec::new();
    if let Some(no_password) = patch.no_password_required {
        if no_password && username != DEFAULT_USER {
            return Err(ApiError::field(
                "no_password_required",
                "only the `default` user may log in without a password",
            ));
        }
        next.no_password = no_password;
        changed.push("no_password_required");
    }
    if let Some(hashes) = new_hashes {
        next.password_hashes = hashes;
        changed.push("passwords");
    }
    if next.no_password {
        next.password_hashes.clear();
    } else if next.password_hashes.is_empty() {
        return Err(ApiError::field("passwords", "a user that needs a password must have one or two"));
    }
    if let Some(access) = &access {
        next.access_string = access.as_str().to_string();
        changed.push("access_string");
    }
    let access = parse_access(&next.access_string)?;
    let rules = upstream_rules(&cache, &access, &current.upstream_secret)?;
    state
        .pools
        .of(&cache.pool)?
        .set_cache_user(&cache.node, &upstream_user(&cache, &username), &rules)
        .await?;
    let mut event = event_for(&ctx, &who, "cache_user.update", &cache, &username);
    event.details = serde_json::json!({ "fields": changed, "access_string": next.access_string,
                                        "passwords": next.password_hashes.len() });
    let mut tx = state.store.begin().await?;
    if !users::update_cache_user(tx.conn(), &next, current.version).await? {
        return Err(ApiError::PreconditionFailed);
    }
    tx.commit(&event).await?;
    let fresh = find_user(&state, &cache, &username).await?;
    tracing::info!(cache = %cache.id, user = %username, ?changed, "cache user updated");
    Ok(HttpResponse::Ok().insert_header(("ETag", page::etag(fresh.version))).json(CacheUser::of(&fresh)))
}

/// Delete a cache user: its upstream ACL user goes, which closes its open connections.
#[utoipa::path(delete, path = "/v1/caches/{id}/users/{username}",
    params(("id" = String, Path, description = "cache id"), ("username" = String, Path, description = "user name")),
    responses((status = 204), responses::ChangeById),
    security(("bearer" = [])), tag = "users")]
pub async fn delete_user(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, username) = path.into_inner();
    let cache = changeable_cache(&state, &who, &id).await?;
    let _changing = state.users_lock.lock().await;
    find_user(&state, &cache, &username).await?;
    state.pools.of(&cache.pool)?.delete_cache_users(&cache.node, &[upstream_user(&cache, &username)]).await?;
    let event = event_for(&ctx, &who, "cache_user.delete", &cache, &username);
    let mut tx = state.store.begin().await?;
    users::delete_cache_user(tx.conn(), &cache.id, &username).await?;
    tx.commit(&event).await?;
    tracing::info!(cache = %cache.id, user = %username, "cache user deleted");
    Ok(HttpResponse::NoContent().finish())
}
