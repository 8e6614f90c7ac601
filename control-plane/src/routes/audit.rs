//! `/v1/audit`: search and export the audit log; `/v1/audit/verify`: check its keyed chain.

use crate::auth::Principal;
use crate::error::ApiError;
use crate::routes::page::{self, PageQuery};
use crate::routes::responses;
use crate::state::AppState;
use crate::store::audit::{AuditFilter, AuditRecord, ChainReport};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/audit").route(web::get().to(list_audit)))
        .service(web::resource("/v1/audit/verify").route(web::get().to(verify_audit)));
}

/// Filters of `GET /v1/audit`. Times are RFC 3339 (UTC).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    pub actor: Option<String>,
    /// e.g. `cache.create`, `auth.login`.
    pub action: Option<String>,
    pub cache_id: Option<String>,
    /// `success`, `failure` or `lockout`.
    pub outcome: Option<String>,
    /// Only the account's records (admins and platform auditors).
    pub account_id: Option<String>,
    /// From this time (inclusive).
    pub from: Option<String>,
    /// Up to this time (exclusive).
    pub to: Option<String>,
    /// `jsonl` exports JSON lines (one record per line) instead of a page object.
    pub format: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditList {
    pub items: Vec<AuditRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

fn time_param(v: &Option<String>, field: &'static str) -> Result<Option<String>, ApiError> {
    v.as_deref()
        .map(|t| page::parse_time(field, t))
        .transpose()
        .map(|t| t.map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
}

/// Search the audit log, oldest first. Owners and account auditors see their account's
/// records. `format=jsonl` (or `Accept: application/jsonl`) exports JSON lines.
#[utoipa::path(get, path = "/v1/audit", params(PageQuery, AuditQuery),
    responses((status = 200, body = AuditList), responses::Authed),
    security(("bearer" = [])), tag = "audit")]
pub async fn list_audit(
    state: web::Data<AppState>,
    who: Principal,
    req: HttpRequest,
    page_q: web::Query<PageQuery>,
    q: web::Query<AuditQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = page_q.limit()?;
    let after_seq = match page_q.cursor()? {
        Some(k) => k
            .first()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ApiError::field("cursor", "cursor is not one this API returned"))?,
        None => 0,
    };
    let mut account = who.scope().map(|a| a.to_string());
    if let Some(wanted) = &q.account_id {
        if account.as_ref().is_some_and(|mine| mine != wanted) {
            return Ok(HttpResponse::Ok().json(AuditList { items: vec![], next_cursor: None }));
        }
        account = Some(wanted.clone());
    }
    let jsonl = q.format.as_deref() == Some("jsonl")
        || req
            .headers()
            .get("Accept")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("jsonl") || a.contains("ndjson"));
    if let Some(f) = q.format.as_deref().filter(|f| *f != "jsonl" && *f != "json") {
        return Err(ApiError::field("format", format!("format {f:?} is not json or jsonl")));
    }
    let filter = AuditFilter {
        account_id: account,
        actor: q.actor.clone(),
        action: q.action.clone(),
        cache_id: q.cache_id.clone(),
        outcome: q.outcome.clone(),
        from: time_param(&q.from, "from")?,
        to: time_param(&q.to, "to")?,
        after_seq,
        limit,
    };
    let items = state.store.audit_records(&filter).await?;
    let next_cursor = page::next_cursor(&items, limit, |r| vec![r.seq.to_string()]);
    if jsonl {
        let mut out = String::new();
        for r in &items {
            out.push_str(&serde_json::to_string(r).expect("serializes"));
            out.push('\n');
        }
        let mut resp = HttpResponse::Ok();
        resp.content_type("application/jsonl");
        if let Some(c) = &next_cursor {
            resp.insert_header(("X-Next-Cursor", c.as_str()));
        }
        return Ok(resp.body(out));
    }
    Ok(HttpResponse::Ok().json(AuditList { items, next_cursor }))
}

/// Check the whole audit log: every record against its keyed hash and link, and the head
/// against the signed checkpoints and the head the control plane remembers. Names each
/// changed, missing (deleted) or truncated record and each bad checkpoint. Platform admins
/// and platform auditors only (the report covers every account).
#[utoipa::path(get, path = "/v1/audit/verify",
    responses((status = 200, body = ChainReport), responses::Authed, responses::Forbidden),
    security(("bearer" = [])), tag = "audit")]
pub async fn verify_audit(state: web::Data<AppState>, who: Principal) -> Result<HttpResponse, ApiError> {
    if who.scope().is_some() {
        return Err(ApiError::Forbidden);
    }
    Ok(HttpResponse::Ok().json(state.store.verify_audit_chain().await?))
}
