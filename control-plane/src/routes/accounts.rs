//! `/v1/accounts` and their API keys (`/v1/accounts/{id}/api-keys`), plus platform-wide
//! keys (`/v1/api-keys`, admin only); `DELETE /v1/api-keys/{key_id}` revokes either kind.

use crate::auth::Principal;
use crate::context::RequestContext;
use crate::domain::caches::PLATFORM_ACCOUNT;
use crate::domain::keys::may_revoke;
use crate::domain::names;
use crate::error::ApiError;
use crate::role::{Role, RoleName};
use crate::routes::page::{self, PageQuery};
use crate::routes::responses;
use crate::secret::{hash_token, random_token};
use crate::state::AppState;
use crate::store::accounts::{self, AccountRecord, ApiKeyInfo};
use crate::store::{self, CacheFilter};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use shoal_types::AccountId;
use utoipa::ToSchema;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/accounts")
            .route(web::post().to(create_account))
            .route(web::get().to(list_accounts)),
    )
    .service(
        web::resource("/v1/accounts/{id}")
            .route(web::get().to(get_account))
            .route(web::patch().to(patch_account))
            .route(web::delete().to(delete_account)),
    )
    .service(
        web::resource("/v1/accounts/{id}/api-keys")
            .route(web::post().to(create_account_key))
            .route(web::get().to(list_account_keys)),
    )
    .service(web::resource("/v1/accounts/{id}/api-keys/{key_id}").route(web::delete().to(revoke_account_key)))
    .service(
        web::resource("/v1/api-keys")
            .route(web::post().to(create_platform_key))
            .route(web::get().to(list_platform_keys)),
    )
    .service(web::resource("/v1/api-keys/{key_id}").route(web::delete().to(revoke_key)));
}

/// Body of `POST /v1/accounts`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    /// 1–63 characters: letters, digits, `-` and `_`; unique.
    pub name: String,
    /// Billing contact.
    #[serde(default)]
    pub email: Option<String>,
}

/// Body of `PATCH /v1/accounts/{id}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchAccount {
    pub name: Option<String>,
    pub email: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub email: String,
    pub status: String,
    pub etag: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct AccountList {
    pub items: Vec<Account>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl Account {
    fn of(a: &AccountRecord) -> Account {
        Account {
            id: a.id.to_string(),
            name: a.name.clone(),
            email: a.email.clone(),
            status: a.status.as_str().to_string(),
            etag: page::etag(a.version),
            created_at: a.created_at.clone(),
            updated_at: a.updated_at.clone(),
        }
    }
}

/// Body of `POST …/api-keys`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// What the key is for, 1–63 characters.
    pub name: String,
    /// `owner` or `auditor` for an account's keys; `admin` or `auditor` for platform keys.
    pub role: RoleName,
}

/// An API key. `token` is shown once, in the create response; it is stored hashed.
#[derive(Serialize, ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub role: String,
    pub account_id: Option<String>,
    pub created_at: String,
    /// The bearer token (only in the create response; not in an `Idempotency-Key` replay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Only in an `Idempotency-Key` replay: why `token` is missing (it is shown once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_note: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyList {
    pub items: Vec<ApiKey>,
}

impl ApiKey {
    fn of(k: ApiKeyInfo) -> ApiKey {
        ApiKey {
            id: k.id,
            name: k.name,
            role: k.role,
            account_id: k.account_id,
            created_at: k.created_at,
            token: None,
            token_note: None,
        }
    }
}

fn validate_email(email: &str) -> Result<(), ApiError> {
    let ok = email.is_empty()
        || (email.len() <= 254
            && !email.chars().any(|c| c.is_whitespace() || c.is_control())
            && email.split_once('@').is_some_and(|(l, d)| !l.is_empty() && d.contains('.')));
    if ok {
        Ok(())
    } else {
        Err(ApiError::field("email", "email must look like name@example.org"))
    }
}

fn parse_account_id(raw: &str) -> Result<AccountId, ApiError> {
    AccountId::parse(raw).map_err(|_| ApiError::NotFound("account"))
}

async fn visible_account(state: &AppState, who: &Principal, raw: &str) -> Result<AccountRecord, ApiError> {
    let id = parse_account_id(raw)?;
    who.read(&id, "account")?;
    state.store.account(&id).await?.ok_or(ApiError::NotFound("account"))
}

/// Create an account (platform admin).
#[utoipa::path(post, path = "/v1/accounts", request_body = CreateAccount,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes retries safe")),
    responses((status = 201, body = Account), responses::Authed, responses::Forbidden, responses::Conflict,
              responses::Unprocessable),
    security(("bearer" = [])), tag = "accounts")]
pub async fn create_account(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    who.admin()?;
    let body_in: CreateAccount = page::json_body(&body)?;
    page::idempotent(&state, &who, &req, &body, || async {
        names::account(&body_in.name, "account")?;
        let email = body_in.email.unwrap_or_default();
        validate_email(&email)?;
        let now = store::now();
        let record = AccountRecord {
            id: AccountId::generate(),
            name: body_in.name,
            email,
            status: accounts::AccountStatus::Active,
            version: 1,
            created_at: now.clone(),
            updated_at: now,
        };
        let mut event = ctx.event(&who, "account.create", record.id.as_str());
        event.account_id = Some(record.id.to_string());
        let mut tx = state.store.begin().await?;
        match accounts::insert_account(tx.conn(), &record).await {
            Err(e) if store::is_unique_violation(&e) => {
                return Err(ApiError::Conflict(format!("an account named {:?} already exists", record.name)))
            }
            other => other?,
        }
        tx.commit(&event).await?;
        Ok((StatusCode::CREATED, serde_json::to_value(Account::of(&record)).expect("serializes")))
    })
    .await
}

/// List the accounts the caller can see (admins: all; others: their own).
#[utoipa::path(get, path = "/v1/accounts", params(PageQuery),
    responses((status = 200, body = AccountList), responses::Authed),
    security(("bearer" = [])), tag = "accounts")]
pub async fn list_accounts(
    state: web::Data<AppState>,
    who: Principal,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = q.limit()?;
    let after = q.cursor()?.and_then(|k| k.into_iter().next()).unwrap_or_default();
    let records = state.store.accounts(who.scope().as_ref(), &after, limit).await?;
    let next_cursor = page::next_cursor(&records, limit, |a| vec![a.id.to_string()]);
    Ok(HttpResponse::Ok().json(AccountList { items: records.iter().map(Account::of).collect(), next_cursor }))
}

/// Get an account.
#[utoipa::path(get, path = "/v1/accounts/{id}", params(("id" = String, Path, description = "account id")),
    responses((status = 200, body = Account), responses::ById),
    security(("bearer" = [])), tag = "accounts")]
pub async fn get_account(
    state: web::Data<AppState>,
    who: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let account = visible_account(&state, &who, &id).await?;
    Ok(HttpResponse::Ok().insert_header(("ETag", page::etag(account.version))).json(Account::of(&account)))
}

/// Change an account's name and email (admin, or its owner). Honours `If-Match`.
#[utoipa::path(patch, path = "/v1/accounts/{id}", request_body = PatchAccount,
    params(("id" = String, Path, description = "account id"),
           ("If-Match" = Option<String>, Header, description = "the ETag you read")),
    responses((status = 200, body = Account), responses::ChangeById, responses::Conflict,
              responses::PreconditionFailed),
    security(("bearer" = [])), tag = "accounts")]
pub async fn patch_account(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let current = visible_account(&state, &who, &id).await?;
    who.writer()?;
    let patch: PatchAccount = page::json_body(&body)?;
    page::check_if_match(&req, current.version)?;
    let mut next = current.clone();
    if let Some(name) = patch.name {
        names::account(&name, "account")?;
        next.name = name;
    }
    if let Some(email) = patch.email {
        validate_email(&email)?;
        next.email = email;
    }
    let mut event = ctx.event(&who, "account.update", current.id.as_str());
    event.account_id = Some(current.id.to_string());
    let mut tx = state.store.begin().await?;
    let updated = match accounts::update_account(tx.conn(), &next, current.version).await {
        Err(e) if store::is_unique_violation(&e) => {
            return Err(ApiError::Conflict(format!("an account named {:?} already exists", next.name)))
        }
        other => other?,
    };
    if !updated {
        return Err(ApiError::PreconditionFailed);
    }
    tx.commit(&event).await?;
    let fresh = state.store.account(&current.id).await?.ok_or(ApiError::NotFound("account"))?;
    Ok(HttpResponse::Ok().insert_header(("ETag", page::etag(fresh.version))).json(Account::of(&fresh)))
}

/// Delete an account (platform admin). Refused while it still has caches; its API keys
/// are revoked.
#[utoipa::path(delete, path = "/v1/accounts/{id}", params(("id" = String, Path, description = "account id")),
    responses((status = 204), responses::ChangeById, responses::Conflict),
    security(("bearer" = [])), tag = "accounts")]
pub async fn delete_account(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let account = visible_account(&state, &who, &id).await?;
    who.admin()?;
    if account.id.as_str() == PLATFORM_ACCOUNT {
        return Err(ApiError::Conflict("the platform account cannot be deleted".into()));
    }
    let caches = CacheFilter { account: Some(account.id.clone()), limit: 1, ..Default::default() };
    if !state.store.caches_page(&caches).await?.is_empty() {
        return Err(ApiError::Conflict("the account still has caches; delete them first".into()));
    }
    let mut event = ctx.event(&who, "account.delete", account.id.as_str());
    event.account_id = Some(account.id.to_string());
    let mut tx = state.store.begin().await?;
    accounts::mark_account_deleted(tx.conn(), &account.id).await?;
    tx.commit(&event).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn create_key(
    state: &AppState,
    who: &Principal,
    ctx: &RequestContext,
    account: Option<&AccountId>,
    body: CreateApiKey,
) -> Result<(StatusCode, serde_json::Value), ApiError> {
    names::account(&body.name, "key")?;
    if body.name == crate::admin_token::BOOTSTRAP_KEY_NAME {
        return Err(ApiError::field("name", "that name is reserved for the bootstrap admin token"));
    }
    // Owners belong to an account, admins to none.
    let Some(role) = Role::new(body.role, account.cloned()) else {
        let roles = if account.is_some() { "owner or auditor" } else { "admin or auditor" };
        return Err(ApiError::field("role", format!("role must be {roles} here")));
    };
    let token = format!("shoal_{}_{}", body.role.as_str(), random_token(24));
    let id = format!("key-{}", random_token(6));
    let mut event = ctx.event(who, "api_key.create", &id);
    event.account_id = account.map(|a| a.to_string());
    event.details = serde_json::json!({ "role": body.role.as_str(), "name": body.name });
    let mut tx = state.store.begin().await?;
    let hash = hash_token(&token);
    let key =
        accounts::NewApiKey { id: &id, token_hash: &hash, role: &role, name: &body.name, expires_at: None };
    accounts::insert_api_key(tx.conn(), &key).await?;
    tx.commit(&event).await?;
    let key = ApiKey {
        id,
        name: body.name,
        role: body.role.as_str().into(),
        account_id: account.map(|a| a.to_string()),
        created_at: store::now(),
        token: Some(token),
        token_note: None,
    };
    Ok((StatusCode::CREATED, serde_json::to_value(key).expect("serializes")))
}

/// Create an API key for an account (admin, or the account's owner). The token is in the
/// response, once.
#[utoipa::path(post, path = "/v1/accounts/{id}/api-keys", request_body = CreateApiKey,
    params(("id" = String, Path, description = "account id"),
           ("Idempotency-Key" = Option<String>, Header, description = "makes retries safe")),
    responses((status = 201, body = ApiKey), responses::ChangeById, responses::Unprocessable),
    security(("bearer" = [])), tag = "accounts")]
pub async fn create_account_key(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let account = visible_account(&state, &who, &id).await?;
    who.writer()?;
    let parsed: CreateApiKey = page::json_body(&body)?;
    page::idempotent(&state, &who, &req, &body, || create_key(&state, &who, &ctx, Some(&account.id), parsed))
        .await
}

/// List an account's live API keys (admin, or the account's owner).
#[utoipa::path(get, path = "/v1/accounts/{id}/api-keys", params(("id" = String, Path, description = "account id")),
    responses((status = 200, body = ApiKeyList), responses::ById, responses::Forbidden),
    security(("bearer" = [])), tag = "accounts")]
pub async fn list_account_keys(
    state: web::Data<AppState>,
    who: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let account = visible_account(&state, &who, &id).await?;
    who.writer()?;
    let items = state.store.api_keys(Some(&account.id)).await?.into_iter().map(ApiKey::of).collect();
    Ok(HttpResponse::Ok().json(ApiKeyList { items }))
}

/// Revoke an account's API key: it stops working at once.
#[utoipa::path(delete, path = "/v1/accounts/{id}/api-keys/{key_id}",
    params(("id" = String, Path, description = "account id"), ("key_id" = String, Path, description = "key id")),
    responses((status = 204), responses::ChangeById),
    security(("bearer" = [])), tag = "accounts")]
pub async fn revoke_account_key(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, key_id) = path.into_inner();
    let account = visible_account(&state, &who, &id).await?;
    who.writer()?;
    let mut event = ctx.event(&who, "api_key.revoke", &key_id);
    event.account_id = Some(account.id.to_string());
    let mut tx = state.store.begin().await?;
    if !accounts::revoke_api_key(tx.conn(), &account.id, &key_id).await? {
        return Err(ApiError::NotFound("api key"));
    }
    tx.commit(&event).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Create a platform-wide key (`admin` or `auditor`; platform admin only).
#[utoipa::path(post, path = "/v1/api-keys", request_body = CreateApiKey,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes retries safe")),
    responses((status = 201, body = ApiKey), responses::Authed, responses::Forbidden,
              responses::Unprocessable),
    security(("bearer" = [])), tag = "accounts")]
pub async fn create_platform_key(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    who.admin()?;
    let parsed: CreateApiKey = page::json_body(&body)?;
    page::idempotent(&state, &who, &req, &body, || create_key(&state, &who, &ctx, None, parsed)).await
}

/// List platform-wide keys (platform admin only).
#[utoipa::path(get, path = "/v1/api-keys",
    responses((status = 200, body = ApiKeyList), responses::Authed, responses::Forbidden),
    security(("bearer" = [])), tag = "accounts")]
pub async fn list_platform_keys(
    state: web::Data<AppState>,
    who: Principal,
) -> Result<HttpResponse, ApiError> {
    who.admin()?;
    let items = state.store.api_keys(None).await?.into_iter().map(ApiKey::of).collect();
    Ok(HttpResponse::Ok().json(ApiKeyList { items }))
}

/// Revoke an API key by id: platform-wide keys (platform admin only) or an account's keys
/// (admin, or the account's owner). It stops working at once (401). LDAP sessions are keys
/// too (see `/v1/sessions`).
#[utoipa::path(delete, path = "/v1/api-keys/{key_id}", params(("key_id" = String, Path, description = "key id")),
    responses((status = 204), responses::ChangeById),
    security(("bearer" = [])), tag = "accounts")]
pub async fn revoke_key(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    key_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let key = state.store.live_key(&key_id).await?.ok_or(ApiError::NotFound("api key"))?;
    may_revoke(&who, &key, "api key")?;
    let mut event = ctx.event(&who, "api_key.revoke", &key.id);
    event.account_id = key.account_id.clone();
    event.details = serde_json::json!({ "role": key.role, "name": key.name });
    let mut tx = state.store.begin().await?;
    if !accounts::revoke_key(tx.conn(), &key.id).await? {
        return Err(ApiError::NotFound("api key"));
    }
    tx.commit(&event).await?;
    Ok(HttpResponse::NoContent().finish())
}
