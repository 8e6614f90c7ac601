//! Snapshots: `/v1/caches/{id}/snapshots` (take one, list a cache's), `/v1/snapshots` (an
//! account's, its caches' deleted ones included; get, delete, download as RDB), and
//! `/v1/caches/{id}/import` (load a user's RDB into a cache). Restoring into a new cache is
//! `POST /v1/caches` with `from_snapshot`.

use crate::auth::Principal;
use crate::context::RequestContext;
use crate::domain::caches::{changeable_cache, visible_cache};
use crate::error::ApiError;
use crate::routes::{page, responses};
use crate::snapshots::{self, Existing};
use crate::state::AppState;
use crate::store::snapshots::{
    insert_snapshot, mark_snapshot_deleted, SnapshotKind, SnapshotRecord, SnapshotStatus,
};
use crate::store::{audit::AuditEvent, CacheRecord};
use actix_web::{web, HttpResponse};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/caches/{id}/snapshots")
            .route(web::post().to(create_snapshot))
            .route(web::get().to(list_cache_snapshots)),
    )
    .service(web::resource("/v1/caches/{id}/import").route(web::put().to(import)))
    .service(web::resource("/v1/snapshots").route(web::get().to(list_snapshots)))
    .service(
        web::resource("/v1/snapshots/{id}")
            .route(web::get().to(get_snapshot))
            .route(web::delete().to(delete_snapshot)),
    )
    .service(web::resource("/v1/snapshots/{id}/rdb").route(web::get().to(export)));
}

/// Body of `POST /v1/caches/{id}/snapshots`.
#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// 1–63 characters: letters, digits, `-` and `_`; unique among the account's snapshots
    /// (default: the cache's name and the time).
    #[serde(default)]
    pub name: Option<String>,
}

/// A snapshot: a point-in-time copy of one cache, as a standard RDB file of its databases.
#[derive(Serialize, ToSchema)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub account_id: String,
    /// The cache it was taken of (which may have been deleted since).
    pub cache_id: String,
    pub cache_name: String,
    /// `manual`, `automatic` (the cache's daily window) or `final` (taken as the cache was deleted).
    pub kind: String,
    /// `creating`, `available` or `failed`.
    pub status: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The cache's databases (a cache restored from it has at least as many).
    pub databases: u32,
    pub keys: u64,
    /// Size of the RDB file (billed per GB-month while it is kept).
    pub bytes: u64,
    /// SHA-256 of the RDB file, checked whenever it is read back.
    pub sha256: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SnapshotList {
    pub items: Vec<Snapshot>,
}

/// Filters of `GET /v1/snapshots`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SnapshotQuery {
    /// Only snapshots of this cache (deleted caches included).
    pub cache_id: Option<String>,
}

/// What an import wrote.
#[derive(Serialize, ToSchema)]
pub struct ImportResult {
    pub keys: u64,
    /// Keys of the file left out because they had expired when it was written.
    pub expired: u64,
    /// What the import was metered, as `RESTORE` commands.
    pub ecpu: f64,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Snapshot {
    pub fn of(s: &SnapshotRecord) -> Snapshot {
        Snapshot {
            id: s.id.clone(),
            name: s.name.clone(),
            account_id: s.account_id.to_string(),
            cache_id: s.cache_id.to_string(),
            cache_name: s.cache_name.clone(),
            kind: s.kind.as_str().into(),
            status: s.status.as_str().into(),
            error: s.error.clone(),
            databases: s.databases,
            keys: s.keys,
            bytes: s.bytes,
            sha256: s.sha256.clone(),
            created_at: rfc3339(s.created_at_ms),
            completed_at: s.completed_at_ms.map(rfc3339),
        }
    }
}

/// A snapshot name given by a caller: like a cache name.
pub fn validate_name(name: &str) -> Result<(), ApiError> {
    crate::domain::names::cache(name).map_err(|_| {
        ApiError::field("name", "a snapshot name is 1–63 characters: letters, digits, '-' and '_'")
    })
}

/// The default name of a snapshot of `cache` taken now.
pub fn default_name(cache: &CacheRecord, kind: SnapshotKind) -> String {
    let at = chrono::Utc::now().format("%Y%m%d-%H%M%S");
    let base: String = cache.name.chars().take(40).collect();
    match kind {
        SnapshotKind::Automatic => format!("{base}-auto-{at}"),
        _ => format!("{base}-{at}-{}", &crate::secret::random_token(2)),
    }
}

/// Most snapshots of one cache in 24 hours (ElastiCache allows 20 manual snapshots a day):
/// each one forks the cache's node.
pub const SNAPSHOTS_PER_DAY: usize = 20;

/// Inserts a new `creating` snapshot of `cache` with its audit record (`snapshot.create`).
/// One at a time per cache, and at most [`SNAPSHOTS_PER_DAY`] a day.
pub async fn begin_snapshot(
    state: &AppState,
    cache: &CacheRecord,
    name: String,
    kind: SnapshotKind,
    mut event: AuditEvent,
) -> Result<SnapshotRecord, ApiError> {
    let record = snapshots::new_record(cache, name, kind);
    let recent = state.store.snapshots_since(&cache.id, record.created_at_ms - 86_400_000).await?;
    if recent.iter().any(|s| s.status == SnapshotStatus::Creating) {
        return Err(ApiError::Conflict(
            "a snapshot of this cache is being taken; try again when it is done".into(),
        ));
    }
    if recent.len() >= SNAPSHOTS_PER_DAY && kind != SnapshotKind::Final {
        return Err(ApiError::TooManyRequests(format!(
            "at most {SNAPSHOTS_PER_DAY} snapshots of a cache in 24 hours (each forks its node); try again later"
        )));
    }
    event.target = record.id.clone();
    event.details = serde_json::json!({ "name": record.name, "kind": kind.as_str() });
    let mut tx = state.store.begin().await?;
    if let Err(e) = insert_snapshot(tx.conn(), &record).await {
        return Err(if crate::store::is_unique_violation(&e) {
            ApiError::Conflict(format!("a snapshot named {:?} already exists", record.name))
        } else {
            e.into()
        });
    }
    tx.commit(&event).await?;
    Ok(record)
}

/// Take a snapshot of the cache: a consistent point-in-time copy of its databases (the node
/// forks; nothing else waits). Answers at once with the snapshot `creating`; it becomes
/// `available` (or `failed`, with the reason) when done: poll `GET /v1/snapshots/{id}`.
#[utoipa::path(post, path = "/v1/caches/{id}/snapshots", request_body = CreateSnapshot,
    params(("id" = String, Path, description = "cache id")),
    responses((status = 202, body = Snapshot), responses::ChangeById, responses::Conflict,
              (status = 429, description = "20 snapshots of this cache in the last 24 hours already")),
    security(("bearer" = [])), tag = "snapshots")]
pub async fn create_snapshot(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let cache = changeable_cache(&state, &who, &id).await?;
    let parsed: CreateSnapshot =
        if body.is_empty() { CreateSnapshot::default() } else { page::json_body(&body)? };
    let name = match parsed.name {
        Some(name) => {
            validate_name(&name)?;
            name
        }
        None => default_name(&cache, SnapshotKind::Manual),
    };
    let event = ctx.cache_event(&who, "snapshot.create", cache.id.as_str(), &cache);
    let mut record = begin_snapshot(&state, &cache, name, SnapshotKind::Manual, event).await?;
    let answer = Snapshot::of(&record);
    let state = state.into_inner();
    tokio::spawn(async move {
        let _ = snapshots::take(&state, &cache, &mut record).await;
    });
    Ok(HttpResponse::Accepted().json(answer))
}

/// The cache's snapshots, newest first.
#[utoipa::path(get, path = "/v1/caches/{id}/snapshots", params(("id" = String, Path, description = "cache id")),
    responses((status = 200, body = SnapshotList), responses::ById),
    security(("bearer" = [])), tag = "snapshots")]
pub async fn list_cache_snapshots(
    state: web::Data<AppState>,
    who: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let cache = visible_cache(&state, &who, &id).await?;
    let items = state.store.snapshots(None, Some(&cache.id)).await?;
    Ok(HttpResponse::Ok().json(SnapshotList { items: items.iter().map(Snapshot::of).collect() }))
}

/// Snapshots the caller can see, newest first, those of deleted caches included.
#[utoipa::path(get, path = "/v1/snapshots", params(SnapshotQuery),
    responses((status = 200, body = SnapshotList), responses::Authed),
    security(("bearer" = [])), tag = "snapshots")]
pub async fn list_snapshots(
    state: web::Data<AppState>,
    who: Principal,
    q: web::Query<SnapshotQuery>,
) -> Result<HttpResponse, ApiError> {
    let cache = match &q.cache_id {
        Some(raw) => Some(
            shoal_types::CacheId::parse(raw).map_err(|_| ApiError::field("cache_id", "not a cache id"))?,
        ),
        None => None,
    };
    let items = state.store.snapshots(who.scope().as_ref(), cache.as_ref()).await?;
    Ok(HttpResponse::Ok().json(SnapshotList { items: items.iter().map(Snapshot::of).collect() }))
}

/// A snapshot the caller can see.
pub async fn visible_snapshot(
    state: &AppState,
    who: &Principal,
    id: &str,
) -> Result<SnapshotRecord, ApiError> {
    let snapshot = state.store.snapshot(id).await?.ok_or(ApiError::NotFound("snapshot"))?;
    who.read(&snapshot.account_id, "snapshot")?;
    Ok(snapshot)
}

/// One snapshot.
#[utoipa::path(get, path = "/v1/snapshots/{id}", params(("id" = String, Path, description = "snapshot id")),
    responses((status = 200, body = Snapshot), responses::ById),
    security(("bearer" = [])), tag = "snapshots")]
pub async fn get_snapshot(
    state: web::Data<AppState>,
    who: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let snapshot = visible_snapshot(&state, &who, &id).await?;
    Ok(HttpResponse::Ok().json(Snapshot::of(&snapshot)))
}

/// Delete a snapshot: its file goes from the snapshot store (billing stops).
#[utoipa::path(delete, path = "/v1/snapshots/{id}", params(("id" = String, Path, description = "snapshot id")),
    responses((status = 204), responses::ChangeById, responses::Conflict),
    security(("bearer" = [])), tag = "snapshots")]
pub async fn delete_snapshot(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let snapshot = visible_snapshot(&state, &who, &id).await?;
    who.writer()?;
    if snapshot.status == SnapshotStatus::Creating {
        return Err(ApiError::Conflict(
            "the snapshot is still being taken; delete it once it is done".into(),
        ));
    }
    let mut event = ctx.event(&who, "snapshot.delete", &snapshot.id);
    event.account_id = Some(snapshot.account_id.to_string());
    event.cache_id = Some(snapshot.cache_id.to_string());
    event.details = serde_json::json!({ "name": snapshot.name });
    remove(&state, &snapshot, &event).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Marks `snapshot` deleted (with `event`) and removes its file.
pub async fn remove(state: &AppState, snapshot: &SnapshotRecord, event: &AuditEvent) -> Result<(), ApiError> {
    let mut tx = state.store.begin().await?;
    if !mark_snapshot_deleted(tx.conn(), &snapshot.id, snapshots::now_ms()).await? {
        return Err(ApiError::NotFound("snapshot"));
    }
    tx.commit(event).await?;
    if let Err(e) = state.snapshots.delete(&snapshots::object_name(&snapshot.id)).await {
        tracing::warn!(snapshot = %snapshot.id, error = %e, "a deleted snapshot's file stays in the store");
    }
    Ok(())
}

/// Download a snapshot as a standard RDB file (it loads in any Valkey:
/// `valkey-server --dbfilename <file>`). Its checksum is verified first. The file is the
/// cache's data: owners and admins only (auditors read about snapshots, not their data).
#[utoipa::path(get, path = "/v1/snapshots/{id}/rdb", params(("id" = String, Path, description = "snapshot id")),
    responses((status = 200, description = "the RDB file", content_type = "application/octet-stream"),
              responses::ById, responses::Conflict),
    security(("bearer" = [])), tag = "snapshots")]
pub async fn export(
    state: web::Data<AppState>,
    who: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let snapshot = visible_snapshot(&state, &who, &id).await?;
    who.writer()?;
    if snapshot.status != SnapshotStatus::Available {
        return Err(ApiError::Conflict(format!("the snapshot is {}", snapshot.status.as_str())));
    }
    let path = snapshots::fetch(&state, &snapshot).await?;
    let file = tokio::fs::File::open(&path).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    // Open: the file can go now; the stream reads it to its end.
    let _ = tokio::fs::remove_file(&path).await;
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header(("Content-Disposition", format!("attachment; filename=\"{}.rdb\"", snapshot.name)))
        .insert_header(("Content-Length", snapshot.bytes.to_string()))
        .streaming(tokio_util::io::ReaderStream::new(file)))
}

/// Import an RDB file written by Valkey, Redis or ElastiCache (the request body, up to the
/// control plane's `import_max_mb`, 1024 MB by default): its keys are added to the cache,
/// each in the database of the same number, TTLs counting from when the file was written.
/// The file is checked whole first; a file that is not an RDB, is truncated or corrupt,
/// has keys in databases the cache lacks, would pass the cache's `data_storage_mb`, or
/// holds a key the cache already has changes nothing. Metered as `RESTORE` commands.
#[utoipa::path(put, path = "/v1/caches/{id}/import", params(("id" = String, Path, description = "cache id")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "an RDB file"),
    responses((status = 200, body = ImportResult), responses::ChangeById, responses::Conflict,
              responses::Unprocessable, (status = 413, description = "the file is over the import limit")),
    security(("bearer" = [])), tag = "snapshots")]
pub async fn import(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    id: web::Path<String>,
    mut body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let cache = changeable_cache(&state, &who, &id).await?;
    let limit = state.config.snapshots.import_max_mb * 1_000_000;
    let path = snapshots::work_file(&state, &format!("import-{}", crate::secret::random_token(8)), "rdb")
        .map_err(ApiError::Internal)?;
    let received = async {
        let mut file = tokio::fs::File::create(&path).await.map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut total = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ApiError::BadRequest { detail: e.to_string(), field: None })?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(ApiError::TooLarge(format!(
                    "the file is over the import limit of {} MB; nothing was imported",
                    state.config.snapshots.import_max_mb
                )));
            }
            file.write_all(&chunk).await.map_err(|e| ApiError::Internal(e.to_string()))?;
        }
        file.flush().await.map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(total)
    }
    .await;
    let result = match received {
        Ok(_) => import_file(&state, &cache, &path).await,
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_file(&path).await;
    let loaded = result?;
    let mut event = ctx.cache_event(&who, "cache.import", cache.id.as_str(), &cache);
    event.details = serde_json::json!({ "keys": loaded.keys, "expired": loaded.expired });
    state.store.audit(&event).await?;
    Ok(HttpResponse::Ok().json(ImportResult {
        keys: loaded.keys,
        expired: loaded.expired,
        ecpu: loaded.counters.ecpu_milli as f64 / 1000.0,
    }))
}

async fn import_file(
    state: &AppState,
    cache: &CacheRecord,
    path: &std::path::Path,
) -> Result<snapshots::Loaded, ApiError> {
    let summary = snapshots::inspect(path)
        .await
        .map_err(|e| ApiError::Unprocessable { detail: format!("{e}; nothing was imported"), field: None })?;
    check_fits(state, cache, summary, true).await?;
    snapshots::load(state, cache, path, None, Existing::Refuse).await
}

/// Whether an RDB's keys fit `cache`: its databases, and its storage limit (with what the
/// cache holds already when `adding`).
pub async fn check_fits(
    state: &AppState,
    cache: &CacheRecord,
    rdb: snapshots::RdbSummary,
    adding: bool,
) -> Result<(), ApiError> {
    if rdb.databases > cache.databases {
        return Err(ApiError::Unprocessable {
            detail: format!(
                "the file has keys in database {}, and the cache has {} database(s); nothing was written",
                rdb.databases - 1,
                cache.databases
            ),
            field: None,
        });
    }
    let limit = cache.limits.data_storage_mb.unwrap_or(state.config.default_data_storage_mb) * 1_000_000;
    let held = if adding { state.store.cache_storage(&cache.id).await?.map_or(0, |s| s.bytes) } else { 0 };
    if held + rdb.bytes > limit {
        return Err(ApiError::Unprocessable {
            detail: format!(
                "the file's keys take about {} MB and the cache holds {} MB of its data_storage_mb = {} MB; \
                 nothing was written",
                rdb.bytes.div_ceil(1_000_000),
                held.div_ceil(1_000_000),
                limit / 1_000_000
            ),
            field: Some("limits.data_storage_mb".into()),
        });
    }
    Ok(())
}
