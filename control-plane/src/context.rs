//! Per-request context: a request id (the client's `X-Request-Id` if it is sane, else a new
//! one) echoed in the response and the logs, and the source address — both go into audit
//! records. Failed state-changing calls are audited here too, so every refusal is on record.

use crate::auth::Principal;
use crate::state::AppState;
use crate::store::audit::AuditEvent;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use std::future::{ready, Ready};

pub const REQUEST_ID: &str = "x-request-id";

/// Who asked, from where, under which request id.
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub request_id: String,
    pub source: String,
}

impl RequestContext {
    fn of(req: &HttpRequest) -> RequestContext {
        req.extensions()
            .get::<RequestContext>()
            .cloned()
            .unwrap_or_else(|| RequestContext { request_id: new_request_id(), source: source_of(req) })
    }

    /// An audit event by `who` with this request's id and source; fill in the rest.
    pub fn event(&self, who: &Principal, action: &str, target: &str) -> AuditEvent {
        AuditEvent {
            actor: who.actor(),
            account_id: who.role.account().map(|a| a.to_string()),
            source: self.source.clone(),
            action: action.into(),
            target: target.into(),
            outcome: "success".into(),
            request_id: self.request_id.clone(),
            details: serde_json::json!({}),
            ..Default::default()
        }
    }
}

impl RequestContext {
    /// An audit event about one of `cache`'s objects (its account and id filled in).
    pub fn cache_event(
        &self,
        who: &Principal,
        action: &str,
        target: &str,
        cache: &crate::store::CacheRecord,
    ) -> AuditEvent {
        let mut event = self.event(who, action, target);
        event.account_id = Some(cache.account_id.to_string());
        event.cache_id = Some(cache.id.to_string());
        event
    }
}

impl FromRequest for RequestContext {
    type Error = actix_web::Error;
    type Future = Ready<Result<RequestContext, actix_web::Error>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready(Ok(RequestContext::of(req)))
    }
}

fn new_request_id() -> String {
    format!("req-{}", crate::secret::random_token(8))
}

fn source_of(req: &HttpRequest) -> String {
    req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_else(|| "unknown".into())
}

/// Middleware: sets the request context, echoes the id, audits failed changes.
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    // A NUL can be neither stored nor matched (PostgreSQL's text refuses it): bad input, for
    // every query parameter of every route, before anything reads it.
    if req.query_string().contains("%00") {
        return Err(
            crate::error::ApiError::field("query", "query parameters may not contain NUL (%00)").into()
        );
    }
    let ctx = RequestContext { request_id: request_id.clone(), source: source_of(req.request()) };
    req.extensions_mut().insert(ctx.clone());
    let changes = !matches!(req.method().as_str(), "GET" | "HEAD" | "OPTIONS");
    let audited = req.path().starts_with("/v1/");
    let mut res = next.call(req).await?;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(HeaderName::from_static(REQUEST_ID), v);
    }
    let status = res.status();
    if audited
        && ((changes && (status.is_client_error() || status.is_server_error())) || status.as_u16() == 401)
    {
        audit_failure(res.request(), &ctx, status.as_u16()).await;
    }
    Ok(res)
}

/// Records a refused or failed change (the change itself did not happen).
async fn audit_failure(req: &HttpRequest, ctx: &RequestContext, status: u16) {
    let Some(state) = req.app_data::<web::Data<AppState>>() else { return };
    let who = req.extensions().get::<Principal>().cloned();
    let event = AuditEvent {
        actor: who.as_ref().map(Principal::actor).unwrap_or_else(|| "anonymous".into()),
        account_id: who.as_ref().and_then(|w| w.role.account().map(|a| a.to_string())),
        source: ctx.source.clone(),
        action: format!("{} {}", req.method(), route_pattern(req)),
        target: req.path().chars().take(200).collect(),
        outcome: "failure".into(),
        reason: format!("HTTP {status}"),
        request_id: ctx.request_id.clone(),
        details: serde_json::json!({}),
        ..Default::default()
    };
    // Refusals of callers who could not authenticate are throttled per source (counted in
    // aggregates beyond a few): anyone can send them by the thousand.
    let result = match who {
        None if status == 401 => state.store.audit_unauthenticated(event).await,
        _ => state.store.audit(&event).await.map(|_| ()),
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "could not audit a failed request");
    }
}

fn route_pattern(req: &HttpRequest) -> String {
    req.match_pattern().unwrap_or_else(|| "(unmatched)".into())
}
