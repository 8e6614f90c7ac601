//! `/v1/auth/login` (LDAP → a short-lived REST bearer token) and
//! `/v1/signing-keys/rotate` (a new key signs data-plane tokens; old ones keep verifying).
//!
//! A login's token is an API key with an expiry (`api_keys.expires_at`), so the usual
//! bearer extractor accepts it, key revocation works on it, and it never outlives
//! `session_ttl`. Its role is the strongest REST role the user's LDAP groups map to.

use crate::auth::Principal;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::role::{Role, RoleName};
use crate::routes::responses;
use crate::secret::{hash_token, random_token};
use crate::state::AppState;
use crate::store::audit::AuditEvent;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use shoal_auth::throttle::{FailureOutcome, Verdict};
use std::net::IpAddr;
use std::time::Instant;
use utoipa::ToSchema;

/// Seconds a retired signing key outlives the longest token it may have signed.
pub const VERIFY_LEEWAY_SECS: u64 = 60;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/auth/login", web::post().to(login))
        .route("/v1/signing-keys/rotate", web::post().to(rotate_signing_key));
}

/// Body of `POST /v1/auth/login`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub username: String,
    pub password: String,
}

#[derive(Serialize, ToSchema)]
pub struct LoginResponse {
    /// Send as `Authorization: Bearer <token>` until `expires_at`.
    pub token: String,
    /// The API key id of this session (revocable like any key).
    pub key_id: String,
    pub role: RoleName,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    pub expires_at: String,
    /// Every role the user's groups map to (data-plane roles included).
    #[schema(value_type = Vec<Object>)]
    pub roles: Vec<shoal_auth::Role>,
}

/// `shoal_rest_logins_total{outcome}`: `success`, `failure` or `lockout`.
fn login_metric(outcome: &str) {
    let outcome = ["success", "lockout"].into_iter().find(|o| *o == outcome).unwrap_or("failure");
    metrics::counter!("shoal_rest_logins_total", "outcome" => outcome).increment(1);
}

fn login_event(ctx: &RequestContext, user: &str, outcome: &str, reason: &str) -> AuditEvent {
    AuditEvent {
        actor: format!(
            "ldap:{}",
            crate::store::audit::printable(&user.chars().take(128).collect::<String>())
        ),
        source: ctx.source.clone(),
        action: "auth.login".into(),
        target: "rest".into(),
        outcome: outcome.into(),
        reason: reason.into(),
        request_id: ctx.request_id.clone(),
        details: serde_json::json!({ "mechanism": "ldap" }),
        ..Default::default()
    }
}

async fn audit(state: &AppState, event: &AuditEvent) {
    login_metric(&event.outcome);
    if let Err(e) = state.store.audit(event).await {
        tracing::error!(error = %e, "could not audit a login");
    }
}

/// Log in with an LDAP user name and password; returns a short-lived bearer token for this
/// API with the role the user's directory groups map to. Failed attempts are throttled per
/// source address and per user name (`429` while locked out).
#[utoipa::path(post, path = "/v1/auth/login", request_body = Login,
    responses((status = 200, body = LoginResponse), (status = 400, body = crate::error::Problem),
              (status = 401, body = crate::error::Problem), (status = 403, body = crate::error::Problem),
              (status = 404, body = crate::error::Problem), (status = 429, body = crate::error::Problem),
              (status = 503, body = crate::error::Problem)),
    tag = "auth")]
pub async fn login(
    state: web::Data<AppState>,
    ctx: RequestContext,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body: Login = crate::routes::page::json_body(&body)?;
    let Some(directory) = state.directory.clone() else {
        return Err(ApiError::NotFound("LDAP login (not configured)"));
    };
    let source: IpAddr = ctx.source.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let verdict = state.login_throttle.lock().unwrap().check(Instant::now(), source, &body.username);
    match verdict {
        Verdict::Allow => {}
        Verdict::Delay(d) => tokio::time::sleep(d).await,
        Verdict::Locked { remaining, .. } => {
            audit(&state, &login_event(&ctx, &body.username, "lockout", "locked_out")).await;
            return Err(ApiError::TooManyRequests(format!(
                "too many failed attempts; try again in {} s",
                remaining.as_secs().max(1)
            )));
        }
    }
    let identity = match directory.authenticate(&body.username, &body.password).await {
        Ok(identity) => identity,
        Err(e) => {
            tracing::info!(user = %body.username, reason = e.kind(), error = %e, "LDAP login refused");
            if !e.is_credential_failure() {
                audit(&state, &login_event(&ctx, &body.username, "failure", e.kind())).await;
                return Err(ApiError::Unavailable(e.client_message().into()));
            }
            let outcome =
                state.login_throttle.lock().unwrap().failure(Instant::now(), source, &body.username);
            let (outcome, reason) = match outcome {
                FailureOutcome::Counted => ("failure", e.kind()),
                FailureOutcome::LockedOut(_) => ("lockout", e.kind()),
            };
            audit(&state, &login_event(&ctx, &body.username, outcome, reason)).await;
            return Err(ApiError::LoginFailed(e.client_message().into()));
        }
    };
    state.login_throttle.lock().unwrap().success(source, &body.username);
    let Some(role) = Role::strongest_of(&identity.roles) else {
        audit(&state, &login_event(&ctx, &body.username, "failure", "no_rest_role")).await;
        return Err(ApiError::Forbidden);
    };
    if let Some(account) = role.account() {
        if state.store.account(account).await?.is_none() {
            audit(&state, &login_event(&ctx, &body.username, "failure", "account_deleted")).await;
            return Err(ApiError::Refused(format!(
                "account {account}, which your directory groups name, does not exist or was deleted"
            )));
        }
    }
    let token = format!("shoal_session_{}", random_token(24));
    let key_id = format!("ldap-{}", random_token(6));
    let expires = chrono::Utc::now() + chrono::Duration::seconds(state.config.session_ttl as i64);
    let expires_at = expires.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut event = login_event(&ctx, &identity.user, "success", "");
    event.target = key_id.clone();
    event.account_id = role.account().map(|a| a.to_string());
    event.details = serde_json::json!({ "mechanism": "ldap", "role": role.name().as_str(), "dn": identity.dn,
                                        "expires_at": expires_at });
    let mut tx = state.store.begin().await?;
    let (hash, name) = (hash_token(&token), format!("ldap:{}", identity.user));
    let key = crate::store::accounts::NewApiKey {
        id: &key_id,
        token_hash: &hash,
        role: &role,
        name: &name,
        expires_at: Some(&expires_at),
    };
    crate::store::accounts::insert_api_key(tx.conn(), &key).await?;
    tx.commit(&event).await?;
    login_metric("success");
    tracing::info!(user = %identity.user, role = role.name().as_str(), key = %key_id, "LDAP login");
    Ok(HttpResponse::Ok().json(LoginResponse {
        token,
        key_id,
        role: role.name(),
        account_id: role.account().map(|a| a.to_string()),
        expires_at,
        roles: identity.roles,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct RotatedKey {
    /// The key that signs new data-plane tokens from now on.
    pub kid: String,
    /// Every key gateways accept now (the new one and those still verifying).
    pub verifying: Vec<String>,
}

/// Rotate the data-plane signing key (platform admin): a new Ed25519 key signs from now on;
/// the old keys stay in the JWKS, so tokens they signed keep working until they expire.
#[utoipa::path(post, path = "/v1/signing-keys/rotate",
    responses((status = 200, body = RotatedKey), responses::Authed, responses::Forbidden),
    security(("bearer" = [])), tag = "auth")]
pub async fn rotate_signing_key(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
) -> Result<HttpResponse, ApiError> {
    who.admin()?;
    let mut event = ctx.event(&who, "signing_key.rotate", "");
    let kid = state.signer.rotate(&state.store, &mut event).await?;
    let verifying = state.signer.jwks().keys.into_iter().map(|k| k.kid).collect();
    tracing::info!(%kid, "signing key rotated");
    Ok(HttpResponse::Ok().json(RotatedKey { kid, verifying }))
}
