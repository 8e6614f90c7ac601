//! `/v1/sessions`: the LDAP REST sessions (`POST /v1/auth/login`) that work now, and their
//! revocation. A session is an API key with an expiry, so a revoked session's token is
//! refused (401) by the next request, like any revoked key.
//!
//! Scope: the platform admin sees and revokes every session, an account's owner those whose
//! role is on its account; auditors change nothing. Anyone may end its own session (log out).

use crate::auth::Principal;
use crate::context::RequestContext;
use crate::domain::keys::may_revoke;
use crate::error::ApiError;
use crate::routes::responses;
use crate::state::AppState;
use crate::store::accounts::{self, LiveKey};
use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/sessions", web::get().to(list_sessions))
        .route("/v1/sessions/{id}", web::delete().to(revoke_session));
}

/// An LDAP REST session (never its token).
#[derive(Serialize, ToSchema)]
pub struct Session {
    /// The session's key id (`key_id` of the login response).
    pub id: String,
    /// The LDAP user name.
    pub user: String,
    /// `admin`, `owner` or `auditor`.
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    pub created_at: String,
    pub expires_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    pub items: Vec<Session>,
}

impl Session {
    fn of(k: LiveKey) -> Session {
        Session {
            user: k.name.strip_prefix("ldap:").unwrap_or(&k.name).to_string(),
            id: k.id,
            role: k.role,
            account_id: k.account_id,
            created_at: k.created_at,
            expires_at: k.expires_at.unwrap_or_default(),
        }
    }
}

/// List the LDAP sessions that work now (platform admin: all; an account's owner: its
/// account's), oldest first.
#[utoipa::path(get, path = "/v1/sessions",
    responses((status = 200, body = SessionList), responses::Authed, responses::Forbidden),
    security(("bearer" = [])), tag = "auth")]
pub async fn list_sessions(state: web::Data<AppState>, who: Principal) -> Result<HttpResponse, ApiError> {
    who.writer()?;
    let items = state.store.live_sessions(who.scope().as_ref()).await?.into_iter().map(Session::of).collect();
    Ok(HttpResponse::Ok().json(SessionList { items }))
}

/// Revoke an LDAP session: its token is refused (401) at once. The platform admin revokes
/// any session, an account's owner its account's; anyone may revoke its own (log out).
#[utoipa::path(delete, path = "/v1/sessions/{id}", params(("id" = String, Path, description = "session (key) id")),
    responses((status = 204), responses::ChangeById),
    security(("bearer" = [])), tag = "auth")]
pub async fn revoke_session(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let key = state
        .store
        .live_key(&id)
        .await?
        .filter(|k| k.expires_at.is_some())
        .ok_or(ApiError::NotFound("session"))?;
    if key.id != who.key_id {
        may_revoke(&who, &key, "session")?;
    }
    let mut event = ctx.event(&who, "session.revoke", &key.id);
    event.account_id = key.account_id.clone();
    event.details = serde_json::json!({ "user": key.name, "role": key.role, "own": key.id == who.key_id });
    let mut tx = state.store.begin().await?;
    if !accounts::revoke_key(tx.conn(), &key.id).await? {
        return Err(ApiError::NotFound("session"));
    }
    tx.commit(&event).await?;
    Ok(HttpResponse::NoContent().finish())
}
