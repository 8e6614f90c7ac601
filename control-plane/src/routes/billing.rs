//! `/v1/invoices` (monthly bills per account: JSON, CSV, printable HTML) and `/v1/estimate`
//! (the monthly cost of expected traffic, with the arithmetic shown).
//!
//! Drafts are computed on request from stored usage up to the last completed minute. A
//! month becomes final `invoice_grace_seconds` (default 1 h) after it ends — usage batches
//! that a cut-off gateway delivers within that grace still land in their month — and is then
//! frozen in the store: later batches no longer change it.

use crate::auth::Principal;
use crate::error::ApiError;
use crate::routes::page::{self, PageQuery};
use crate::routes::responses;
use crate::state::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use shoal_billing::{
    build_invoice, estimate, BillingError, Estimate, EstimateInput, Invoice, InvoiceStatus, KeptSnapshot,
    Month,
};
use shoal_types::AccountId;
use utoipa::ToSchema;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/invoices").route(web::get().to(list_invoices)))
        .service(web::resource("/v1/invoices/{id}").route(web::get().to(get_invoice)))
        .service(web::resource("/v1/estimate").route(web::post().to(post_estimate)));
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        ApiError::BadRequest { detail: e.to_string(), field: None }
    }
}

/// An invoice in a list (the lines are in `GET /v1/invoices/{id}`).
#[derive(Serialize, ToSchema)]
pub struct InvoiceSummary {
    /// `<account id>-<YYYY-MM>`.
    pub id: String,
    pub account_id: String,
    pub month: String,
    pub status: InvoiceStatus,
    pub currency: String,
    #[schema(value_type = String)]
    pub total: shoal_billing::Decimal,
}

#[derive(Serialize, ToSchema)]
pub struct InvoiceList {
    pub items: Vec<InvoiceSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// An invoice with its id.
#[derive(Serialize, ToSchema)]
pub struct InvoiceDocument {
    pub id: String,
    #[serde(flatten)]
    pub invoice: Invoice,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InvoiceQuery {
    /// Only this account's invoices (admins and platform auditors).
    pub account_id: Option<String>,
    /// Only this month (`YYYY-MM`).
    pub month: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FormatQuery {
    /// `json` (default), `csv` or `html`; or send `Accept: text/csv` / `text/html`.
    pub format: Option<String>,
}

fn invoice_id(account: &AccountId, month: Month) -> String {
    format!("{account}-{month}")
}

fn parse_invoice_id(id: &str) -> Result<(AccountId, Month), ApiError> {
    let (account, month) = id.split_at_checked(13).ok_or(ApiError::NotFound("invoice"))?;
    let month = month.strip_prefix('-').ok_or(ApiError::NotFound("invoice"))?;
    Ok((
        AccountId::parse(account).map_err(|_| ApiError::NotFound("invoice"))?,
        Month::parse(month).map_err(|_| ApiError::NotFound("invoice"))?,
    ))
}

/// The invoice of `account` for `month` as of now: frozen if final, computed if draft.
pub async fn invoice_for(state: &AppState, account: &AccountId, month: Month) -> Result<Invoice, ApiError> {
    let key = month.to_string();
    if let Some(body) = state.store.final_invoice(account, &key).await? {
        return serde_json::from_str(&body).map_err(|e| ApiError::Internal(format!("stored invoice: {e}")));
    }
    let now = chrono::Utc::now().timestamp();
    let rates = state.config.billing.for_account(account)?;
    let usage = state.store.account_usage(account, month.start(), month.end()).await?;
    let storage = state.store.account_storage(account, month.start(), month.end()).await?;
    let mut invoice = build_invoice(account, month, &usage, &storage, &rates, now)?;
    let kept: Vec<KeptSnapshot> = state
        .store
        .snapshots_kept_between(account, month.start() * 1000, month.end() * 1000)
        .await?
        .into_iter()
        .map(|s| KeptSnapshot {
            cache_id: s.cache_id,
            bytes: s.bytes,
            from: s.completed_at_ms.unwrap_or(s.created_at_ms) / 1000,
            until: s.deleted_at_ms.map(|ms| ms / 1000),
        })
        .collect();
    invoice.add_snapshot_storage(&kept);
    invoice.add_dedicated_nodes(&state.store.dedicated_spans(account).await?);
    invoice.set_cache_names(&state.store.cache_names(account).await?);
    if invoice.status == InvoiceStatus::Final {
        if now < month.end() + state.config.invoice_grace_seconds {
            // Late usage may still arrive: not final yet.
            invoice.status = InvoiceStatus::Draft;
        } else {
            let body = serde_json::to_string(&invoice).expect("serializes");
            state.store.store_final_invoice(&invoice_id(account, month), account, &key, &body).await?;
        }
    }
    Ok(invoice)
}

/// List invoices, newest month first: one per account and month since the account was
/// created. Owners and account auditors see their account's; admins all.
#[utoipa::path(get, path = "/v1/invoices", params(PageQuery, InvoiceQuery),
    responses((status = 200, body = InvoiceList), responses::Authed), security(("bearer" = [])), tag = "billing")]
pub async fn list_invoices(
    state: web::Data<AppState>,
    who: Principal,
    page_q: web::Query<PageQuery>,
    q: web::Query<InvoiceQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = page_q.limit()?;
    let after = page_q.cursor()?.and_then(|k| k.into_iter().next());
    let only_month = q
        .month
        .as_deref()
        .map(Month::parse)
        .transpose()
        .map_err(|e| ApiError::field("month", e.to_string()))?;
    let mut accounts = match who.scope() {
        Some(mine) => vec![state.store.account(&mine).await?.ok_or(ApiError::NotFound("account"))?],
        None => state.store.accounts(None, "", i64::MAX).await?,
    };
    if let Some(wanted) = &q.account_id {
        accounts.retain(|a| a.id.as_str() == wanted);
    }
    let now = chrono::Utc::now().timestamp();
    let current = Month::containing(now)?;
    // (month, account) keys, newest month first.
    let mut keys = Vec::new();
    for a in &accounts {
        let created =
            chrono::DateTime::parse_from_rfc3339(&a.created_at).map(|d| d.timestamp()).unwrap_or(now);
        let mut m = Month::containing(created.min(now))?;
        loop {
            if only_month.is_none_or(|only| only == m) {
                keys.push((m, a.id.clone()));
            }
            if m == current {
                break;
            }
            m = m.next();
        }
    }
    keys.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)));
    let start = match &after {
        Some(id) => {
            keys.iter().position(|(m, a)| &invoice_id(a, *m) == id).map(|i| i + 1).unwrap_or(keys.len())
        }
        None => 0,
    };
    let mut items = Vec::new();
    for (m, a) in keys.iter().skip(start).take(limit as usize) {
        let inv = invoice_for(&state, a, *m).await?;
        items.push(InvoiceSummary {
            id: invoice_id(a, *m),
            account_id: a.to_string(),
            month: m.to_string(),
            status: inv.status,
            currency: inv.currency.clone(),
            total: inv.total,
        });
    }
    let next_cursor = page::next_cursor(&items, limit, |i| vec![i.id.clone()]);
    Ok(HttpResponse::Ok().json(InvoiceList { items, next_cursor }))
}

/// One invoice as JSON, CSV (`Accept: text/csv` or `?format=csv`) or a printable HTML page
/// (`Accept: text/html` or `?format=html`).
#[utoipa::path(get, path = "/v1/invoices/{id}", params(("id" = String, Path, description = "`<account id>-<YYYY-MM>`"), FormatQuery),
    responses((status = 200, description = "the invoice: JSON, CSV or a printable page", content((InvoiceDocument = "application/json"), (String = "text/csv"), (String = "text/html"))),
              responses::ById),
    security(("bearer" = [])), tag = "billing")]
pub async fn get_invoice(
    state: web::Data<AppState>,
    who: Principal,
    req: HttpRequest,
    id: web::Path<String>,
    q: web::Query<FormatQuery>,
) -> Result<HttpResponse, ApiError> {
    let (account, month) = parse_invoice_id(&id)?;
    who.read(&account, "invoice")?;
    let created = state.store.account(&account).await?.ok_or(ApiError::NotFound("invoice"))?.created_at;
    let now = chrono::Utc::now().timestamp();
    let created = chrono::DateTime::parse_from_rfc3339(&created).map(|d| d.timestamp()).unwrap_or(now);
    if month < Month::containing(created)? || month > Month::containing(now)? {
        return Err(ApiError::NotFound("invoice"));
    }
    let invoice = invoice_for(&state, &account, month).await?;
    let accept = req.headers().get("Accept").and_then(|v| v.to_str().ok()).unwrap_or("");
    let format = match q.format.as_deref() {
        Some(f) => f,
        None if accept.starts_with("text/csv") => "csv",
        None if accept.starts_with("text/html") => "html",
        None => "json",
    };
    let filename = format!("shoal-invoice-{}", id.as_str());
    Ok(match format {
        "json" => HttpResponse::Ok().json(InvoiceDocument { id: id.into_inner(), invoice }),
        "csv" => HttpResponse::Ok()
            .content_type("text/csv; charset=utf-8")
            .insert_header(("Content-Disposition", format!("attachment; filename=\"{filename}.csv\"")))
            .body(invoice.to_csv()),
        "html" => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header(("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"))
            .body(invoice.to_html()),
        other => return Err(ApiError::field("format", format!("format {other:?} is not json, csv or html"))),
    })
}

/// The monthly cost of a cache from expected traffic (like the AWS pricing calculator), at
/// the caller's rates, with each step of the arithmetic.
#[utoipa::path(post, path = "/v1/estimate", request_body = EstimateInput,
    responses((status = 200, body = Estimate), responses::Authed, responses::Forbidden), security(("bearer" = [])), tag = "billing")]
pub async fn post_estimate(
    state: web::Data<AppState>,
    who: Principal,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let input: EstimateInput = page::json_body(&body)?;
    let rates = match who.role.account() {
        Some(a) => state.config.billing.for_account(a)?,
        None => state.config.billing.defaults.clone(),
    };
    Ok(HttpResponse::Ok().json(estimate(&input, &rates)?))
}
