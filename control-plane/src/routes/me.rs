//! `GET /v1/me`: who the bearer token belongs to (the portal uses it to show only what the
//! caller may do).

use crate::auth::Principal;
use crate::role::RoleName;
use crate::routes::responses;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/me", web::get().to(me));
}

/// The caller's API key and what it may do.
#[derive(Serialize, ToSchema)]
pub struct Me {
    pub key_id: String,
    pub role: RoleName,
    /// The account the key belongs to; absent for platform keys (admins and platform auditors).
    pub account_id: Option<String>,
    /// Whether the key may change anything (false for auditors).
    pub can_write: bool,
}

/// Who am I: the caller's key id, role and account.
#[utoipa::path(get, path = "/v1/me",
    responses((status = 200, body = Me), responses::Authed),
    security(("bearer" = [])), tag = "accounts")]
pub async fn me(who: Principal) -> HttpResponse {
    HttpResponse::Ok().json(Me {
        key_id: who.key_id.clone(),
        role: who.role.name(),
        account_id: who.role.account().map(|a| a.to_string()),
        can_write: who.writer().is_ok(),
    })
}
