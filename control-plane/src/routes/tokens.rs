//! `/v1/caches/{id}/tokens`: mint short-lived data-plane JWTs.

use crate::auth::Principal;
use crate::context::RequestContext;
use crate::domain::caches::{changeable_cache, visible_cache};
use crate::error::ApiError;
use crate::routes::responses;
use crate::secret::random_token;
use crate::state::AppState;
use crate::store;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use shoal_auth::token as token_scope;
use shoal_types::{DataClaims, Permission, DATA_AUDIENCE, LIMITED_DATA_AUDIENCE, TOKEN_ISSUER};
use utoipa::ToSchema;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/caches/{id}/tokens")
            .route(web::post().to(mint_token))
            .route(web::get().to(list_tokens)),
    )
    .service(web::resource("/v1/caches/{id}/tokens/{jti}").route(web::delete().to(revoke_token)));
}

/// An active data-plane token (the token itself is shown only once, when minted).
#[derive(Serialize, ToSchema)]
pub struct TokenInfo {
    pub jti: String,
    /// `read-write` or `read-only`.
    pub permission: String,
    /// The Valkey glob patterns of the keys the token may touch; absent: all keys.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub key_patterns: Vec<String>,
    pub created_at: String,
    pub expires_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct TokenList {
    pub items: Vec<TokenInfo>,
}

/// List a cache's active (unexpired, unrevoked) tokens.
#[utoipa::path(get, path = "/v1/caches/{id}/tokens", params(("id" = String, Path, description = "cache id")),
    responses((status = 200, body = TokenList), responses::ById),
    security(("bearer" = [])), tag = "tokens")]
pub async fn list_tokens(
    state: web::Data<AppState>,
    who: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let cache = visible_cache(&state, &who, &id).await?;
    let items = state
        .store
        .active_tokens(&cache.id)
        .await?
        .into_iter()
        .map(|t| TokenInfo {
            jti: t.jti,
            permission: t.permission.as_str().to_string(),
            key_patterns: t.key_patterns,
            created_at: t.created_at,
            expires_at: t.expires_at,
        })
        .collect();
    Ok(HttpResponse::Ok().json(TokenList { items }))
}

/// Revoke a token: every gateway refuses it within seconds and closes connections that
/// logged in with it.
#[utoipa::path(delete, path = "/v1/caches/{id}/tokens/{jti}",
    params(("id" = String, Path, description = "cache id"), ("jti" = String, Path, description = "token id")),
    responses((status = 204), responses::ChangeById),
    security(("bearer" = [])), tag = "tokens")]
pub async fn revoke_token(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, jti) = path.into_inner();
    let cache = changeable_cache(&state, &who, &id).await?;
    let event = ctx.cache_event(&who, "token.revoke", &jti, &cache);
    let mut tx = state.store.begin().await?;
    if !store::revoke_token(tx.conn(), &cache.id, &jti).await? {
        return Err(ApiError::NotFound("token"));
    }
    tx.commit(&event).await?;
    tracing::info!(cache = %cache.id, %jti, "token revoked");
    Ok(HttpResponse::NoContent().finish())
}

/// Body of `POST /v1/caches/{id}/tokens` (optional).
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct MintToken {
    /// Lifetime in seconds (default 900, like ElastiCache IAM auth tokens).
    pub ttl_seconds: Option<u64>,
    /// `read-write` (default) or `read-only` (read commands only: writes, scripts and
    /// PUBLISH are refused with `-NOPERM`).
    #[schema(example = "read-only")]
    pub permission: Option<String>,
    /// Valkey glob patterns of the keys the token may touch, as in an ACL's `~pattern`
    /// (1–32 patterns of up to 100 bytes, no whitespace). Absent: all keys.
    #[schema(example = json!(["app:*"]))]
    pub key_patterns: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema)]
pub struct MintedToken {
    /// Use as `AUTH <token>` on the cache's endpoint.
    pub token: String,
    pub jti: String,
    /// RFC 3339 time after which the token is refused.
    pub expires_at: String,
    /// `read-write` or `read-only`.
    pub permission: String,
    /// The key patterns the token is limited to; absent: all keys.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub key_patterns: Vec<String>,
}

/// Mint a data-plane token for a cache.
///
/// Read-write or read-only, on all keys or on keys matching some patterns. Valkey itself
/// enforces what the token may do (also inside scripts and transactions): a token that
/// grants less than everything logs in upstream as an ACL user made for its permission and
/// patterns.
#[utoipa::path(post, path = "/v1/caches/{id}/tokens", params(("id" = String, Path, description = "cache id")),
    request_body(content = MintToken, description = "optional"),
    responses((status = 201, body = MintedToken), (status = 400, body = crate::error::Problem,
              description = "a bad ttl_seconds, permission or key_patterns (`field` names it)"),
              (status = 409, body = crate::error::Problem,
               description = "the cache already has 100 distinct token scopes in use"),
              (status = 503, body = crate::error::Problem,
               description = "the cache's node cannot be reached to make a limited token's ACL user"),
              responses::Unauthorized, responses::Forbidden, responses::NotFound),
    security(("bearer" = [])), tag = "tokens")]
pub async fn mint_token(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let cache = changeable_cache(&state, &who, &id).await?;
    let body: MintToken = if body.iter().all(u8::is_ascii_whitespace) {
        MintToken::default()
    } else {
        crate::routes::page::json_body(&body)?
    };
    let ttl = body.ttl_seconds.unwrap_or(state.config.token_ttl_default);
    if ttl == 0 || ttl > state.config.token_ttl_max {
        return Err(ApiError::field(
            "ttl_seconds",
            format!("ttl_seconds must be between 1 and {}", state.config.token_ttl_max),
        ));
    }
    let perm = match body.permission.as_deref() {
        None => Permission::ReadWrite,
        Some(p) => Permission::parse(p).ok_or_else(|| {
            ApiError::field("permission", "permission must be one of read-write, read-only")
        })?,
    };
    let key_patterns = match body.key_patterns {
        None => Vec::new(),
        Some(p) => {
            token_scope::check_key_patterns(&p).map_err(|e| ApiError::field("key_patterns", e))?;
            token_scope::canonical_patterns(&p)
        }
    };
    // A token that grants less than everything logs in as an upstream user of its own (a
    // bounded number per cache; held until the token is stored, see `token_users`).
    let login = token_scope::token_login(&cache.id.acl_user(), &cache.acl_password, perm, &key_patterns);
    let _changing = state.users_lock.lock().await;
    if let Some(login) = &login {
        let access = shoal_auth::AccessString::parse(&login.access_string)
            .map_err(|e| ApiError::field("key_patterns", e.to_string()))?;
        crate::token_users::admit(&state, &cache, &login.user).await?;
        state.token_user_changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::domain::logins::set_login_user(&state, &cache, &login.user, &access, &login.password).await?;
    }
    let now = chrono::Utc::now();
    let exp = now + chrono::Duration::seconds(ttl as i64);
    let claims = DataClaims {
        iss: TOKEN_ISSUER.into(),
        aud: if login.is_some() { LIMITED_DATA_AUDIENCE } else { DATA_AUDIENCE }.into(),
        sub: who.key_id.clone(),
        iat: now.timestamp(),
        exp: exp.timestamp(),
        nbf: None,
        jti: random_token(16),
        cache: cache.id.clone(),
        perm,
        key_patterns,
    };
    // Sign with the store's current key (another control plane may have rotated it).
    state.signer.refresh(&state.store).await?;
    let token = state.signer.sign(&claims).map_err(|e| ApiError::Internal(e.to_string()))?;
    let expires_at = exp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut event = ctx.cache_event(&who, "token.mint", &claims.jti, &cache);
    event.details = serde_json::json!({ "ttl_seconds": ttl, "permission": perm.as_str(),
                                        "key_patterns": claims.key_patterns });
    let mut tx = state.store.begin().await?;
    store::insert_token(tx.conn(), &claims.jti, &cache.id, perm, &claims.key_patterns, &expires_at).await?;
    tx.commit(&event).await?;
    Ok(HttpResponse::Created().json(MintedToken {
        token,
        jti: claims.jti,
        expires_at,
        permission: perm.as_str().to_string(),
        key_patterns: claims.key_patterns,
    }))
}
