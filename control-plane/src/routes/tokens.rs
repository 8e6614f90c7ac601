//! `/v1/caches/{id}/tokens`: mint short-lived data-plane JWTs.

use crate::auth::{random_token, Principal};
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::routes::caches::{changeable_cache, visible_cache};
use crate::startup::AppState;
use crate::store;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use shoal_types::{DataClaims, Permission, DATA_AUDIENCE, TOKEN_ISSUER};
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
    pub created_at: String,
    pub expires_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct TokenList {
    pub items: Vec<TokenInfo>,
}

/// List a cache's active (unexpired, unrevoked) tokens.
#[utoipa::path(get, path = "/v1/caches/{id}/tokens", params(("id" = String, Path, description = "cache id")),
    responses((status = 200, body = TokenList), (status = 404, body = crate::error::Problem)),
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
        .map(|(jti, created_at, expires_at)| TokenInfo { jti, created_at, expires_at })
        .collect();
    Ok(HttpResponse::Ok().json(TokenList { items }))
}

/// Revoke a token: every gateway refuses it within seconds and closes connections that
/// logged in with it.
#[utoipa::path(delete, path = "/v1/caches/{id}/tokens/{jti}",
    params(("id" = String, Path, description = "cache id"), ("jti" = String, Path, description = "token id")),
    responses((status = 204), (status = 404, body = crate::error::Problem)),
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
}

#[derive(Serialize, ToSchema)]
pub struct MintedToken {
    /// Use as `AUTH <token>` on the cache's endpoint.
    pub token: String,
    pub jti: String,
    /// RFC 3339 time after which the token is refused.
    pub expires_at: String,
}

/// Mint a data-plane token for a cache.
#[utoipa::path(post, path = "/v1/caches/{id}/tokens", params(("id" = String, Path, description = "cache id")),
    request_body(content = MintToken, description = "optional"),
    responses((status = 201, body = MintedToken), (status = 404, body = crate::error::Problem)),
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
    let now = chrono::Utc::now();
    let exp = now + chrono::Duration::seconds(ttl as i64);
    let claims = DataClaims {
        iss: TOKEN_ISSUER.into(),
        aud: DATA_AUDIENCE.into(),
        sub: who.key_id.clone(),
        iat: now.timestamp(),
        exp: exp.timestamp(),
        nbf: None,
        jti: random_token(16),
        cache: cache.id.clone(),
        perm: Permission::ReadWrite,
    };
    let token = state.signer.sign(&claims).map_err(|e| ApiError::Internal(e.to_string()))?;
    let expires_at = exp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut event = ctx.cache_event(&who, "token.mint", &claims.jti, &cache);
    event.details = serde_json::json!({ "ttl_seconds": ttl });
    let mut tx = state.store.begin().await?;
    store::insert_token(tx.conn(), &claims.jti, &cache.id, "read-write", &expires_at).await?;
    tx.commit(&event).await?;
    Ok(HttpResponse::Created().json(MintedToken { token, jti: claims.jti, expires_at }))
}
