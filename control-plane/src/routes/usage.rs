//! Usage: gateways post what they metered (`POST /internal/v1/usage`); operators read it
//! per cache (`GET /v1/caches/{id}/usage`).

use crate::auth::Principal;
use crate::domain::caches::parse_id;
use crate::error::ApiError;
use crate::routes::page;
use crate::routes::responses;
use crate::state::AppState;
use crate::store::{Granularity, UsageRow};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use shoal_types::UsageBatch;
use utoipa::{IntoParams, ToSchema};

/// Largest usage batch accepted (a batch holds one entry per cache and minute).
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/caches/{id}/usage", web::get().to(get_usage));
}

/// On the internal listener.
pub fn configure_internal(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/internal/v1/usage")
            .app_data(
                web::JsonConfig::default()
                    .limit(MAX_BATCH_BYTES)
                    .content_type_required(false)
                    .error_handler(crate::error::json_error),
            )
            .route(web::post().to(post_usage)),
    );
}

/// A gateway's batch: stored once per (gateway, gateway_id, seq) — the gateway named by the
/// credential that posted it, and its instance id from the batch — so a repeat is
/// acknowledged and changes nothing (gateways resend until they see a 2xx), and no gateway
/// can write, or shadow, another's batches.
async fn post_usage(
    state: web::Data<AppState>,
    gw: crate::gateways::Gateway,
    batch: web::Json<UsageBatch>,
) -> Result<HttpResponse, ApiError> {
    let mut batch = batch.into_inner();
    if batch.gateway_id.is_empty() || batch.gateway_id.len() > 128 {
        return Err(ApiError::field("gateway_id", "gateway_id must be 1–128 characters"));
    }
    if batch.seq > i64::MAX as u64 {
        return Err(ApiError::field("seq", "seq is out of range"));
    }
    if let Some(u) = batch.usage.iter().find(|u| u.minute % 60 != 0) {
        return Err(ApiError::field("usage", format!("minute {} is not the start of a minute", u.minute)));
    }
    batch.gateway_id = format!("{}/{}", gw.name, batch.gateway_id);
    let stored = state.store.record_usage(&batch).await?;
    crate::metrics::usage_batch(&batch, stored);
    Ok(HttpResponse::Ok().json(serde_json::json!({ "stored": stored })))
}

/// Query of `GET /v1/caches/{id}/usage`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start (RFC 3339), rounded down to the period; default: 1 hour (minute granularity)
    /// or 24 hours (hour granularity) before `to`.
    pub from: Option<String>,
    /// End, exclusive (RFC 3339); default: now.
    pub to: Option<String>,
    /// `minute` (default) or `hour`.
    pub granularity: Option<String>,
}

/// A cache's usage over one period.
#[derive(Serialize, ToSchema)]
pub struct UsagePoint {
    /// Start of the period (RFC 3339 UTC).
    pub start: String,
    /// ECPU consumed (`ecpu_milli` / 1000).
    pub ecpu: f64,
    /// ECPU in milli-ECPU, exact.
    pub ecpu_milli: u64,
    pub commands: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Average stored bytes over the period (over its part that has passed, since the cache
    /// was created).
    pub storage_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    /// Commands refused with `-THROTTLED`.
    pub throttled: u64,
    /// Commands that returned an error.
    pub errors: u64,
    /// Keys with a TTL evicted because the cache was over `data_storage_mb`.
    pub evicted_keys: u64,
    /// Peak concurrent client connections in the period: per minute, the sum over gateways
    /// of each gateway's largest count in that minute; per hour, the largest minute's.
    pub connections: u64,
}

#[derive(Serialize, ToSchema)]
pub struct Usage {
    pub cache_id: String,
    pub granularity: String,
    pub from: String,
    pub to: String,
    /// One point per period in `[from, to)`, periods without usage included (zeros).
    pub points: Vec<UsagePoint>,
}

/// A cache's usage per minute or hour: ECPU, commands, bytes, storage, hits, connections.
#[utoipa::path(get, path = "/v1/caches/{id}/usage", params(("id" = String, Path, description = "cache id"), UsageQuery),
    responses((status = 200, body = Usage), responses::ById),
    security(("bearer" = [])), tag = "caches")]
pub async fn get_usage(
    state: web::Data<AppState>,
    who: Principal,
    id: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&id)?;
    let query = web::Query::<UsageQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest { detail: e.to_string(), field: None })?
        .into_inner();
    let (granularity, step, default_span, max_span) = match query.granularity.as_deref() {
        None | Some("minute") => (Granularity::Minute, 60, Duration::hours(1), Duration::days(7)),
        Some("hour") => (Granularity::Hour, 3600, Duration::days(1), Duration::days(93)),
        Some(_) => return Err(ApiError::field("granularity", "granularity must be minute or hour")),
    };
    let to = match &query.to {
        Some(t) => page::parse_time("to", t)?,
        None => Utc::now(),
    };
    let from = match &query.from {
        Some(f) => page::parse_time("from", f)?,
        None => to - default_span,
    };
    if from >= to {
        return Err(ApiError::field("from", "from must be before to"));
    }
    if to - from > max_span {
        return Err(ApiError::field("from", format!("at most {} days per request", max_span.num_days())));
    }
    let cache = state.store.cache(&id).await?.ok_or(ApiError::NotFound("cache"))?;
    who.read(&cache.account_id, "cache")?;
    let first = from.timestamp() - from.timestamp().rem_euclid(step);
    let (from_text, to_text) = (text(first), text(to.timestamp()));
    let rows = state.store.usage(&id, &from_text, &to_text, granularity).await?;
    // Storage is sampled by the control plane (byte-seconds per minute); a point's
    // storage_bytes is its average over the part of the period the cache existed in and that
    // has passed (the running period, and the one it was created in, are not diluted).
    let mut storage: std::collections::BTreeMap<i64, (u64, u64)> = Default::default();
    for s in state.store.storage_usage(&id, first, to.timestamp()).await? {
        let point = storage.entry(s.minute - s.minute.rem_euclid(step)).or_default();
        point.0 += s.byte_seconds;
        point.1 += s.evicted_keys;
    }
    let now = chrono::Utc::now().timestamp();
    let created = chrono::DateTime::parse_from_rfc3339(&cache.created_at).map_or(first, |d| d.timestamp());
    let covered = |start: i64| ((start + step).min(now) - start.max(created)).clamp(1, step);
    let mut rows = rows.into_iter().peekable();
    let mut points = Vec::new();
    let mut start = first;
    while start < to.timestamp() {
        let at = text(start);
        let row = match rows.peek() {
            Some(r) if r.start == at => rows.next().unwrap_or_default(),
            _ => UsageRow::default(),
        };
        let c = row.counters;
        points.push(UsagePoint {
            ecpu: c.ecpu_milli as f64 / 1000.0,
            ecpu_milli: c.ecpu_milli,
            commands: c.commands,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            storage_bytes: storage.get(&start).map_or(0, |s| s.0) / covered(start) as u64,
            evicted_keys: storage.get(&start).map_or(0, |s| s.1),
            hits: c.hits,
            misses: c.misses,
            throttled: c.throttled,
            errors: c.errors,
            connections: row.connections,
            start: at,
        });
        start += step;
    }
    Ok(HttpResponse::Ok().json(Usage {
        cache_id: id.to_string(),
        granularity: if granularity == Granularity::Hour { "hour" } else { "minute" }.into(),
        from: text(first),
        to: to_text,
        points,
    }))
}

fn text(unix: i64) -> String {
    DateTime::from_timestamp(unix, 0).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Secs, true)
}
