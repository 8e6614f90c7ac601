//! `/v1/caches`: create, list, get, patch, delete.

use crate::auth::Principal;
use crate::config::ControlPlaneConfig;
use crate::context::RequestContext;
use crate::domain::caches::{apply_keyspace_events, changeable_cache, visible_cache, PLATFORM_ACCOUNT};
use crate::domain::names;
use crate::error::ApiError;
use crate::routes::page::{self, PageQuery};
use crate::routes::responses;
use crate::snapshots::Existing;
use crate::state::AppState;
use crate::store::audit::AuditEvent;
use crate::store::snapshots::{SnapshotKind, SnapshotRecord, SnapshotStatus};
use crate::store::{self, CacheFilter, CacheRecord};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use shoal_engine::{placement, KeyAccess, NodeLoad, Placement, Pool, TenantAcl};
use shoal_types::{AccountId, CacheId, CacheLimits};
use std::collections::BTreeMap;
use std::sync::Arc;
use utoipa::ToSchema;

/// Most numbered databases one cache may have.
pub const MAX_DATABASES: u32 = 16;
/// Upper bounds of the limits (ElastiCache Serverless allows up to 15M ECPU/s and 5 TB).
pub const MAX_ECPU_PER_SECOND: u64 = 15_000_000;
pub const MAX_DATA_STORAGE_MB: u64 = 5_000_000;
pub const MAX_CONNECTIONS: u32 = 65_000;
/// What happens when a cache reaches `data_storage_mb`.
/// Valkey's `maxmemory-policy`s a cache may have, the default first. The LFU ones place the
/// cache on a node that tracks frequency ([`KeyAccess`]).
pub const EVICTION_POLICIES: [&str; 8] = [
    "volatile-lru",
    "allkeys-lru",
    "volatile-lfu",
    "allkeys-lfu",
    "volatile-random",
    "allkeys-random",
    "volatile-ttl",
    "noeviction",
];

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/caches").route(web::post().to(create_cache)).route(web::get().to(list_caches)),
    )
    .service(
        web::resource("/v1/caches/{id}")
            .route(web::get().to(get_cache))
            .route(web::patch().to(patch_cache))
            .route(web::delete().to(delete_cache)),
    );
}

/// Usage limits of a cache; absent = unlimited, except `data_storage_mb`, which every cache
/// has (the control plane's `default_data_storage_mb`, 100 by default, when not given).
#[derive(Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// ECPU per second (1–15,000,000); over it commands wait up to 10 ms, then get `-THROTTLED`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecpu_per_second: Option<u64>,
    /// Stored data in MB (1–5,000,000; default 100); over it keys with a TTL are evicted, then
    /// writes get `-OOM`. The limits of the caches on one node add up to at most 75% of its
    /// memory: a limit no node has room for is refused with 422.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_storage_mb: Option<u64>,
    /// Concurrent client connections per gateway (1–65,000, and at most the gateways'
    /// `max_connections`, 10,000 by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl Limits {
    /// `gateway_max`: the gateways' own connection limit, which no cache can reach past.
    fn validate(&self, gateway_max: u32) -> Result<CacheLimits, ApiError> {
        let check = |v: Option<u64>, max: u64, field: &str| match v {
            Some(n) if n == 0 || n > max => Err(ApiError::field(
                format!("limits.{field}"),
                format!("limits.{field} must be between 1 and {max}"),
            )),
            _ => Ok(()),
        };
        check(self.ecpu_per_second, MAX_ECPU_PER_SECOND, "ecpu_per_second")?;
        check(self.data_storage_mb, MAX_DATA_STORAGE_MB, "data_storage_mb")?;
        check(
            self.max_connections.map(u64::from),
            MAX_CONNECTIONS.min(gateway_max) as u64,
            "max_connections",
        )?;
        Ok(CacheLimits {
            ecpu_per_second: self.ecpu_per_second,
            data_storage_mb: self.data_storage_mb,
            max_connections: self.max_connections,
        })
    }

    fn of(l: &CacheLimits) -> Limits {
        Limits {
            ecpu_per_second: l.ecpu_per_second,
            data_storage_mb: l.data_storage_mb,
            max_connections: l.max_connections,
        }
    }
}

/// Body of `POST /v1/caches`. Ids, accounts and placement are the platform's to choose:
/// fields such as `id`, `account_id`, `node` or `db` are refused.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCache {
    /// 1–63 characters: letters, digits, `-` and `_`; unique among the account's caches.
    pub name: String,
    /// Free text, up to 256 characters.
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub limits: Option<Limits>,
    /// What goes when the cache is over `data_storage_mb`, as Valkey's `maxmemory-policy`:
    /// `volatile-lru` (default: keys with a TTL, least recently used first), `allkeys-lru` (any
    /// key, least recently used first), `volatile-lfu`/`allkeys-lfu` (least frequently used
    /// first; the cache goes to a node that tracks frequency, and the policy cannot be changed
    /// to a non-LFU one later), `volatile-random` (keys with a TTL, at random),
    /// `allkeys-random` (any key, at random), `volatile-ttl` (keys with a TTL, soonest to expire
    /// first) or `noeviction` (nothing: writes get `-OOM`).
    #[serde(default)]
    pub eviction_policy: Option<String>,
    /// How many numbered databases the cache may `SELECT` (default 1).
    #[serde(default)]
    pub databases: Option<u32>,
    /// Up to 50 string tags.
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
    /// Keyspace notifications to deliver to the cache's subscribers, in Valkey's
    /// `notify-keyspace-events` syntax (e.g. `KEA`); off when absent.
    #[serde(default)]
    pub keyspace_notifications: Option<String>,
    /// The engine pool to place the cache in (`GET /v1/engine/pools` lists them; a
    /// standalone pool or a Valkey cluster); default: the platform's default pool. Fixed
    /// once created.
    #[serde(default)]
    pub pool: Option<String>,
    /// `shared` (default: a numbered database of a node other caches share) or `dedicated`:
    /// a node of its own, from database 0, where Search indexes (`FT.*`, vectors),
    /// functions (`FUNCTION LOAD`, `FCALL`) and `SCRIPT FLUSH` work; billed per node-hour
    /// on top of usage. Needs a pool with a free dedicated node. Fixed once created.
    #[serde(default)]
    pub placement: Option<String>,
    /// Restore a snapshot into the new cache (its id; `GET /v1/snapshots` lists them): the
    /// snapshot's keys, with the TTLs they had left when it was taken. `databases` defaults
    /// to the snapshot's; the snapshot must fit the new cache's `data_storage_mb`.
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// The UTC start ("HH:MM") of a daily one-hour window in which an automatic snapshot is
    /// taken; absent: none.
    #[serde(default)]
    pub snapshot_window: Option<String>,
    /// How many automatic snapshots to keep (1–35; default 1 with a window).
    #[serde(default)]
    pub snapshot_retention_limit: Option<u32>,
}

/// Body of `PATCH /v1/caches/{id}`: any number of fields at once (JSON merge patch; `null`
/// in `limits` removes that limit). Send `If-Match` with the ETag you read to avoid
/// overwriting someone else's change.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchCache {
    pub name: Option<String>,
    pub description: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub limits: Option<serde_json::Map<String, serde_json::Value>>,
    pub eviction_policy: Option<String>,
    pub tags: Option<BTreeMap<String, String>>,
    pub keyspace_notifications: Option<String>,
    /// "HH:MM" (UTC) to take a daily snapshot, "" to stop.
    pub snapshot_window: Option<String>,
    pub snapshot_retention_limit: Option<u32>,
}

/// Where the cache lives (a summary; node names are internal).
#[derive(Serialize, ToSchema)]
pub struct Allocation {
    /// Numbered Valkey databases the cache holds.
    pub databases: u32,
    /// The pool member (shown to the platform admin only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A cache as clients see it.
#[derive(Serialize, ToSchema)]
pub struct Cache {
    pub id: String,
    pub name: String,
    pub description: String,
    pub account_id: String,
    /// `available` once it can take connections.
    pub status: String,
    /// The engine pool it is placed in.
    pub pool: String,
    /// `shared` or `dedicated` (a node of its own).
    pub placement: String,
    /// The RESP endpoint (`host:port`) to connect to.
    pub endpoint: String,
    /// The reader endpoint: read-only commands, served by replicas on a cluster pool
    /// (replication lag included); writes there get `-READONLY`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reader_endpoint: Option<String>,
    pub databases: u32,
    pub limits: Limits,
    pub eviction_policy: String,
    pub tags: BTreeMap<String, String>,
    /// Keyspace-notification flags ("" = off).
    pub keyspace_notifications: String,
    /// The UTC start ("HH:MM") of the daily snapshot window; "" = no daily snapshot.
    pub snapshot_window: String,
    /// Automatic snapshots kept.
    pub snapshot_retention_limit: u32,
    pub allocation: Allocation,
    /// Changes with every update; send it back in `If-Match`.
    pub etag: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct CacheList {
    pub items: Vec<Cache>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Filters of `GET /v1/caches`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CacheQuery {
    /// Only caches of this account (admins and platform auditors).
    pub account_id: Option<String>,
    /// Only the cache with this name.
    pub name: Option<String>,
    /// Only caches whose name starts with this (1–63 letters, digits, `-` and `_`).
    pub name_prefix: Option<String>,
}

impl Cache {
    pub fn from_record(c: &CacheRecord, config: &ControlPlaneConfig, who: &Principal) -> Cache {
        Cache {
            id: c.id.to_string(),
            name: c.name.clone(),
            description: c.description.clone(),
            account_id: c.account_id.to_string(),
            status: c.status.as_str().to_string(),
            pool: c.pool.clone(),
            placement: c.placement.as_str().to_string(),
            endpoint: config.public_endpoint.clone(),
            reader_endpoint: config.public_reader_endpoint.clone(),
            databases: c.databases,
            limits: Limits::of(&c.limits),
            eviction_policy: c.eviction_policy.clone(),
            tags: serde_json::from_str(&c.tags).unwrap_or_default(),
            keyspace_notifications: c.keyspace_events.clone(),
            snapshot_window: c.snapshot_window.clone(),
            snapshot_retention_limit: c.snapshot_retention,
            allocation: Allocation { databases: c.databases, node: who.is_admin().then(|| c.node.clone()) },
            etag: page::etag(c.version),
            created_at: c.created_at.clone(),
            updated_at: c.updated_at.clone(),
        }
    }
}

fn validate_description(d: &str) -> Result<(), ApiError> {
    if d.chars().count() > 256 || d.chars().any(char::is_control) {
        return Err(ApiError::field(
            "description",
            "description must be at most 256 characters, no control characters",
        ));
    }
    Ok(())
}

fn validate_eviction_policy(p: &str) -> Result<(), ApiError> {
    if EVICTION_POLICIES.contains(&p) {
        Ok(())
    } else {
        Err(ApiError::field(
            "eviction_policy",
            format!("eviction_policy must be one of {}", EVICTION_POLICIES.join(", ")),
        ))
    }
}

/// A daily snapshot window and retention as given: ("HH:MM" or "", kept).
fn validate_schedule(window: &str, retention: Option<u32>) -> Result<(String, u32), ApiError> {
    use crate::snapshots::schedule::{parse_window, MAX_RETENTION};
    if !window.is_empty() && parse_window(window).is_none() {
        return Err(ApiError::field(
            "snapshot_window",
            "snapshot_window is \"HH:MM\" (UTC), or \"\" for none",
        ));
    }
    let retention = retention.unwrap_or(if window.is_empty() { 0 } else { 1 });
    if retention > MAX_RETENTION || (!window.is_empty() && retention == 0) {
        return Err(ApiError::field(
            "snapshot_retention_limit",
            format!("snapshot_retention_limit must be between 1 and {MAX_RETENTION} with a snapshot_window"),
        ));
    }
    Ok((window.to_string(), retention))
}

fn validate_tags(tags: &BTreeMap<String, String>) -> Result<String, ApiError> {
    if tags.len() > 50 {
        return Err(ApiError::field("tags", "at most 50 tags"));
    }
    for (k, v) in tags {
        if k.is_empty()
            || k.chars().count() > 128
            || v.chars().count() > 256
            || k.chars().chain(v.chars()).any(char::is_control)
        {
            return Err(ApiError::field(
                "tags",
                format!("tag {k:?}: keys are 1–128 characters, values up to 256, no control characters"),
            ));
        }
    }
    Ok(serde_json::to_string(tags).expect("strings serialize"))
}

/// Create a cache: choose a node and database, fence it with its own ACL user, store it.
/// The cache belongs to the caller's account (the platform account for admins).
/// Send `Idempotency-Key` to make retries safe.
#[utoipa::path(post, path = "/v1/caches", request_body = CreateCache,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes retries safe")),
    responses((status = 201, body = Cache), responses::Authed, responses::Forbidden, responses::Conflict,
              responses::Unprocessable, responses::Unavailable),
    security(("bearer" = [])), tag = "caches")]
pub async fn create_cache(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    who.writer()?;
    let parsed: CreateCache = page::json_body(&body)?;
    page::idempotent(&state, &who, &req, &body, || async {
        let cache = create(&state, &who, &ctx, parsed).await?;
        Ok((StatusCode::CREATED, serde_json::to_value(cache).expect("serializes")))
    })
    .await
}

async fn create(
    state: &AppState,
    who: &Principal,
    ctx: &RequestContext,
    body: CreateCache,
) -> Result<Cache, ApiError> {
    names::cache(&body.name)?;
    let description = body.description.unwrap_or_default();
    validate_description(&description)?;
    let limits = body.limits.unwrap_or_default().validate(state.config.gateway_max_connections)?;
    let eviction_policy = body.eviction_policy.unwrap_or_else(|| EVICTION_POLICIES[0].to_string());
    validate_eviction_policy(&eviction_policy)?;
    let tags = validate_tags(&body.tags.unwrap_or_default())?;
    let (snapshot_window, snapshot_retention) =
        validate_schedule(body.snapshot_window.as_deref().unwrap_or(""), body.snapshot_retention_limit)?;
    let snapshot = match &body.from_snapshot {
        Some(id) => {
            let s =
                crate::routes::snapshots::visible_snapshot(state, who, id).await.map_err(|e| match e {
                    ApiError::NotFound(_) => ApiError::field("from_snapshot", format!("no snapshot {id:?}")),
                    e => e,
                })?;
            if s.status != SnapshotStatus::Available {
                return Err(ApiError::field(
                    "from_snapshot",
                    format!("snapshot {id:?} is {}", s.status.as_str()),
                ));
            }
            Some(s)
        }
        None => None,
    };
    let databases = body.databases.or(snapshot.as_ref().map(|s| s.databases)).unwrap_or(1);
    if !(1..=MAX_DATABASES).contains(&databases) {
        return Err(ApiError::field("databases", format!("databases must be between 1 and {MAX_DATABASES}")));
    }
    if let Some(s) = snapshot.as_ref().filter(|s| s.databases > databases) {
        return Err(ApiError::field(
            "databases",
            format!("the snapshot holds {} databases: the new cache needs at least as many", s.databases),
        ));
    }
    let keyspace_events =
        shoal_engine::tenant::parse_keyspace_events(body.keyspace_notifications.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::field("keyspace_notifications", e))?;
    let placement = match body.placement.as_deref() {
        None => Placement::Shared,
        Some(p) => Placement::parse(p).ok_or_else(|| {
            ApiError::field("placement", format!("placement must be shared or dedicated, not {p:?}"))
        })?,
    };
    // LFU caches live on nodes that track frequency (see `KeyAccess`), dedicated ones on
    // dedicated nodes: without a pool named, the default pool if it has such nodes, else the
    // first pool that has.
    let key_access = KeyAccess::needed_by(&eviction_policy);
    let fits = |l: &NodeLoad| l.key_access == key_access && l.placement == placement;
    let serves = |p: &Pool| p.loads().iter().any(fits);
    let pool_name = body.pool.clone().unwrap_or_else(|| {
        let default = state.pools.default_name();
        match state.pools.get(default).is_some_and(|p| serves(p)) {
            true => default.to_string(),
            false => state.pools.iter().find(|(_, p)| serves(p)).map_or(default, |(n, _)| n).to_string(),
        }
    });
    let pool = state.pools.get(&pool_name).ok_or_else(|| {
        let known: Vec<&str> = state.pools.iter().map(|(n, _)| n).collect();
        ApiError::field("pool", format!("unknown pool {pool_name:?}: the pools are {}", known.join(", ")))
    })?;
    if !serves(pool) {
        if placement == Placement::Dedicated {
            return Err(ApiError::field("placement", no_dedicated_node(&pool_name, pool, &eviction_policy)));
        }
        return Err(ApiError::field("eviction_policy", no_node_tracks(&pool_name, &eviction_policy)));
    }
    let account = who
        .role
        .account()
        .cloned()
        .unwrap_or_else(|| AccountId::parse(PLATFORM_ACCOUNT).expect("valid constant"));
    // A credential minted just as its account was deleted (keys are revoked with it).
    if state.store.account(&account).await?.is_none() {
        return Err(ApiError::Refused(format!("account {account} does not exist or was deleted")));
    }

    // One placement at a time, so two creates never pick the same database.
    let asked = std::time::Instant::now();
    let placing = state.placement_lock.lock().await;
    let placed = std::time::Instant::now();
    let same_name = CacheFilter {
        account: Some(account.clone()),
        name: Some(body.name.clone()),
        limit: 1,
        ..Default::default()
    };
    if !state.store.caches_page(&same_name).await?.is_empty() {
        return Err(ApiError::Conflict(format!("a cache named {:?} already exists", body.name)));
    }
    let mut limits = limits;
    let storage_mb = *limits.data_storage_mb.get_or_insert(state.config.default_data_storage_mb);
    if let Some(s) = snapshot.as_ref().filter(|s| s.bytes > storage_mb * 1_000_000) {
        return Err(ApiError::Unprocessable {
            detail: format!(
                "the snapshot is {} MB; the new cache's data_storage_mb is {storage_mb}",
                s.bytes.div_ceil(1_000_000)
            ),
            field: Some("limits.data_storage_mb".into()),
        });
    }
    let mut loads = pool.loads();
    loads.retain(fits);
    state.occupancy.fill(state, &pool_name, &mut loads).await?;
    let filled = std::time::Instant::now();
    let id = CacheId::generate();
    // A node that does not answer in time is marked unhealthy and the next one is tried.
    let (chosen, acl) = loop {
        let chosen = match placement {
            Placement::Shared => placement::choose(&loads, databases, storage_mb),
            Placement::Dedicated => placement::choose_dedicated(&loads, databases, storage_mb),
        }
        .map_err(|e| no_placement(e, storage_mb, placement))?;
        let acl = TenantAcl {
            user: id.acl_user(),
            password: shoal_engine::node::random_secret(),
            db: chosen.db,
            databases,
            placement,
        };
        match pool.create_tenant(&chosen.node, &acl).await {
            Ok(()) => break (chosen, acl),
            Err(e) => {
                tracing::warn!(node = %chosen.node, error = %e, "could not provision a cache on this node; trying another");
                forget_half_made_tenant(pool, &chosen.node, &acl.user);
                for load in loads.iter_mut().filter(|l| l.node == chosen.node) {
                    load.healthy = false;
                }
            }
        }
    };
    let provisioned = std::time::Instant::now();
    let now = store::now();
    let record = CacheRecord {
        id,
        account_id: account,
        name: body.name,
        status: crate::store::CacheStatus::Available,
        pool: pool_name.clone(),
        node: chosen.node.clone(),
        db: chosen.db,
        databases,
        acl_password: acl.password.clone(),
        created_at: now.clone(),
        keyspace_events,
        description,
        limits,
        eviction_policy,
        tags,
        version: 1,
        updated_at: now,
        snapshot_window,
        snapshot_retention,
        placement,
    };
    let mut event = ctx.cache_event(who, "cache.create", record.id.as_str(), &record);
    event.details = serde_json::json!({
        "name": record.name,
        "from_snapshot": body.from_snapshot,
        "placement": placement.as_str(),
    });
    let stored = async {
        let mut tx = state.store.begin().await?;
        store::insert_cache(tx.conn(), &record).await?;
        let created_ms =
            crate::storage::created_ms(&record.created_at, chrono::Utc::now().timestamp_millis());
        store::record_creation_sample(tx.conn(), &record.id, created_ms).await?;
        let version = store::bump_placement(tx.conn(), &record.pool, &record.id).await?;
        tx.commit(&event).await.map(|_| version)
    }
    .await;
    let version = match stored {
        Ok(version) => version,
        Err(e) => {
            let _ = pool.delete_tenant(&chosen.node, &acl).await;
            return Err(if store::is_unique_violation(&e) {
                ApiError::Conflict(format!("a cache named {:?} already exists", record.name))
            } else {
                e.into()
            });
        }
    };
    state.occupancy.changed(&record, storage_mb, true, version);
    if !record.keyspace_events.is_empty() {
        apply_keyspace_events(state, &record.pool, &record.node).await?;
    }
    drop(placing);
    if placed.elapsed() > SLOW_CREATE {
        // Where a slow create's time went (each step's end, from taking the placement lock).
        let ms = |t: std::time::Instant| t.saturating_duration_since(placed).as_secs_f64() * 1000.0;
        tracing::debug!(
            waited_ms = placed.duration_since(asked).as_secs_f64() * 1000.0,
            placed_ms = ms(filled),
            provisioned_ms = ms(provisioned),
            stored_ms = ms(std::time::Instant::now()),
            "slow cache create"
        );
    }
    tracing::info!(cache = %record.id, pool = %record.pool, node = %record.node, db = record.db, "cache created");
    if let Some(snapshot) = &snapshot {
        if let Err(e) = restore(state, &record, snapshot).await {
            // Nothing stays of a cache whose restore failed.
            let mut event = ctx.cache_event(who, "cache.delete", record.id.as_str(), &record);
            event.reason = format!("restoring snapshot {} failed", snapshot.id);
            let _placing = state.placement_lock.lock().await;
            if let Err(e) = remove_cache(state, &record, event).await {
                tracing::error!(cache = %record.id, error = %e, "could not remove a cache whose restore failed");
            }
            return Err(e);
        }
    }
    Ok(Cache::from_record(&record, &state.config, who))
}

/// Writes `snapshot`'s keys into the new cache `cache`.
async fn restore(state: &AppState, cache: &CacheRecord, snapshot: &SnapshotRecord) -> Result<(), ApiError> {
    let path = crate::snapshots::fetch(state, snapshot).await?;
    let loaded = async {
        let summary = crate::snapshots::inspect(&path).await.map_err(|e| {
            ApiError::Conflict(format!("snapshot {} cannot be read: {e}; nothing was restored", snapshot.id))
        })?;
        crate::routes::snapshots::check_fits(state, cache, summary, false).await?;
        crate::snapshots::load(state, cache, &path, Some(snapshot.created_at_ms), Existing::Empty).await
    }
    .await;
    let _ = tokio::fs::remove_file(&path).await;
    let loaded = loaded?;
    tracing::info!(cache = %cache.id, snapshot = %snapshot.id, keys = loaded.keys, "snapshot restored");
    Ok(())
}

/// MB of storage limits held on each node of engine pool `pool` by its live caches (`except`
/// one of them), caches without a stored limit counting the default.
async fn reserved_storage(
    state: &AppState,
    pool: &str,
    except: Option<&CacheId>,
) -> Result<BTreeMap<String, u64>, ApiError> {
    let mut reserved = BTreeMap::new();
    for cache in state.store.caches(None).await? {
        if Some(&cache.id) == except || cache.pool != pool {
            continue;
        }
        let mb = cache.limits.data_storage_mb.unwrap_or(state.config.default_data_storage_mb);
        *reserved.entry(cache.node.clone()).or_insert(0) += mb;
    }
    Ok(reserved)
}

/// Why a cache with `policy` cannot be in `pool`.
fn no_node_tracks(pool: &str, policy: &str) -> String {
    match KeyAccess::needed_by(policy) {
        KeyAccess::Frequency => format!(
            "{policy} needs a node that tracks how often keys are used, and pool {pool:?} has none: \
             add one with key_access = \"frequency\" in [[engine.nodes]] (shoal dev: --lfu-nodes 1)"
        ),
        KeyAccess::Recency => format!("pool {pool:?} only has nodes that track frequency, for LFU policies"),
    }
}

/// Why pool `pool` cannot take a dedicated cache with `policy` at all.
fn no_dedicated_node(name: &str, pool: &Pool, policy: &str) -> String {
    if pool.kind() == "cluster" {
        return format!(
            "pool {name:?} is a Valkey cluster: dedicated caches need a standalone pool with dedicated nodes"
        );
    }
    let frequency = KeyAccess::needed_by(policy) == KeyAccess::Frequency;
    format!(
        "pool {name:?} has no dedicated node{}: add one with placement = \"dedicated\"{} in [[engine.nodes]] \
         (shoal dev: --dedicated-nodes 1)",
        if frequency { " that tracks frequency, for an LFU policy" } else { "" },
        if frequency { " and key_access = \"frequency\"" } else { "" },
    )
}

/// The problem a create gets when no node can take the cache.
fn no_placement(e: placement::NoPlacement, storage_mb: u64, placement: Placement) -> ApiError {
    match e {
        placement::NoPlacement::Full if placement == Placement::Dedicated => ApiError::Unavailable(
            "every dedicated node is taken: delete a dedicated cache or add dedicated nodes".into(),
        ),
        placement::NoPlacement::Full => shoal_engine::EngineError::Full.into(),
        placement::NoPlacement::NoHealthyNode => {
            tracing::warn!("no healthy node for a new cache");
            ApiError::Unavailable(
                "no cache node is healthy right now (restarting or not answering); try again shortly".into(),
            )
        }
        placement::NoPlacement::NoRoom { largest_free_mb } => no_room(storage_mb, largest_free_mb),
    }
}

fn no_room(storage_mb: u64, free_mb: u64) -> ApiError {
    ApiError::Unprocessable {
        detail: format!(
            "no node has room for data_storage_mb = {storage_mb}: the most a node can still take is \
             {free_mb} MB (the storage limits of the caches on a node add up to at most {}% of its memory)",
            100 - shoal_engine::RESERVED_MEMORY_PERCENT
        ),
        field: Some("limits.data_storage_mb".into()),
    }
}

/// A create whose provisioning on `node` failed (timed out) may still run there later:
/// once the node answers again, remove the ACL user it would have made. Its database is
/// flushed anyway when a cache gets it.
fn forget_half_made_tenant(pool: &Arc<Pool>, node: &str, user: &str) {
    let pool = Arc::clone(pool);
    let (node, user) = (node.to_string(), user.to_string());
    tokio::spawn(async move {
        for _ in 0..600 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            // A cluster pool's target is healthy when any of its nodes is.
            let Some(load) = pool.loads().into_iter().find(|l| l.node == node) else { return };
            if !load.healthy {
                continue;
            }
            // Let whatever was queued on the node run first.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if pool.delete_cache_users(&node, std::slice::from_ref(&user)).await.is_ok() {
                return;
            }
        }
    });
}

/// List caches the caller can see, oldest first, a page at a time.
#[utoipa::path(get, path = "/v1/caches", params(PageQuery, CacheQuery),
    responses((status = 200, body = CacheList), responses::Authed),
    security(("bearer" = [])), tag = "caches")]
pub async fn list_caches(
    state: web::Data<AppState>,
    who: Principal,
    page_q: web::Query<PageQuery>,
    q: web::Query<CacheQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = page_q.limit()?;
    let after = match page_q.cursor()? {
        Some(k) if k.len() == 2 => Some((k[0].clone(), k[1].clone())),
        Some(_) => return Err(ApiError::field("cursor", "cursor is not one this API returned")),
        None => None,
    };
    let mut account = who.scope();
    if let Some(raw) = &q.account_id {
        let wanted = AccountId::parse(raw).map_err(|_| ApiError::field("account_id", "not an account id"))?;
        if account.as_ref().is_some_and(|mine| mine != &wanted) {
            // Another account's caches: an empty list, like an account with none.
            return Ok(HttpResponse::Ok().json(CacheList { items: vec![], next_cursor: None }));
        }
        account = Some(wanted);
    }
    if let Some(prefix) = &q.name_prefix {
        names::cache(prefix).map_err(|_| {
            ApiError::field(
                "name_prefix",
                "name_prefix must be 1–63 characters of letters, digits, '-' and '_'",
            )
        })?;
    }
    let filter =
        CacheFilter { account, name: q.name.clone(), name_prefix: q.name_prefix.clone(), after, limit };
    let records = state.store.caches_page(&filter).await?;
    let next_cursor = page::next_cursor(&records, limit, |c| vec![c.created_at.clone(), c.id.to_string()]);
    let items = records.iter().map(|c| Cache::from_record(c, &state.config, &who)).collect();
    Ok(HttpResponse::Ok().json(CacheList { items, next_cursor }))
}

/// Get one cache (with its ETag).
#[utoipa::path(get, path = "/v1/caches/{id}", params(("id" = String, Path, description = "cache id")),
    responses((status = 200, body = Cache), responses::ById),
    security(("bearer" = [])), tag = "caches")]
pub async fn get_cache(
    state: web::Data<AppState>,
    who: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let cache = visible_cache(&state, &who, &id).await?;
    Ok(HttpResponse::Ok().insert_header(("ETag", page::etag(cache.version))).json(Cache::from_record(
        &cache,
        &state.config,
        &who,
    )))
}

/// Change any number of a cache's fields in one request. Limits take effect at the
/// gateways within a second. `databases` cannot change after create.
#[utoipa::path(patch, path = "/v1/caches/{id}", request_body = PatchCache,
    params(("id" = String, Path, description = "cache id"),
           ("If-Match" = Option<String>, Header, description = "the ETag you read")),
    responses((status = 200, body = Cache), responses::ChangeById, responses::Conflict,
              responses::PreconditionFailed, responses::Unprocessable),
    security(("bearer" = [])), tag = "caches")]
pub async fn patch_cache(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let current = changeable_cache(&state, &who, &id).await?;
    let patch: PatchCache = page::json_body(&body)?;
    page::check_if_match(&req, current.version)?;
    let mut next = current.clone();
    let mut changed = Vec::new();
    if let Some(name) = patch.name {
        names::cache(&name)?;
        next.name = name;
        changed.push("name");
    }
    if let Some(d) = patch.description {
        validate_description(&d)?;
        next.description = d;
        changed.push("description");
    }
    if let Some(l) = patch.limits {
        let mut merged = serde_json::to_value(Limits::of(&current.limits)).expect("serializes");
        for (k, v) in l {
            merged[k.as_str()] = v;
        }
        let limits: Limits = serde_json::from_value(merged).map_err(|e| ApiError::BadRequest {
            field: crate::error::unknown_field(&e.to_string())
                .map(|f| format!("limits.{f}"))
                .or(Some("limits".into())),
            detail: format!("invalid limits: {e}"),
        })?;
        next.limits = limits.validate(state.config.gateway_max_connections)?;
        // No storage limit means the default one.
        next.limits.data_storage_mb.get_or_insert(state.config.default_data_storage_mb);
        changed.push("limits");
    }
    if let Some(p) = patch.eviction_policy {
        validate_eviction_policy(&p)?;
        if KeyAccess::needed_by(&p) != KeyAccess::needed_by(&next.eviction_policy) {
            return Err(ApiError::Conflict(format!(
                "the cache's node tracks {} of use, which {p} cannot use: LFU and other policies live on \
                 different nodes, so choose an LFU policy at creation (a snapshot restores into a new \
                 cache with another policy)",
                match KeyAccess::needed_by(&next.eviction_policy) {
                    KeyAccess::Frequency => "frequency",
                    KeyAccess::Recency => "recency",
                }
            )));
        }
        next.eviction_policy = p;
        changed.push("eviction_policy");
    }
    if let Some(t) = patch.tags {
        next.tags = validate_tags(&t)?;
        changed.push("tags");
    }
    if patch.snapshot_window.is_some() || patch.snapshot_retention_limit.is_some() {
        let window = patch.snapshot_window.unwrap_or_else(|| current.snapshot_window.clone());
        let retention = patch
            .snapshot_retention_limit
            .or((current.snapshot_retention > 0).then_some(current.snapshot_retention));
        (next.snapshot_window, next.snapshot_retention) = validate_schedule(&window, retention)?;
        changed.push("snapshot_window");
    }
    if let Some(k) = patch.keyspace_notifications {
        next.keyspace_events = shoal_engine::tenant::parse_keyspace_events(&k)
            .map_err(|e| ApiError::field("keyspace_notifications", e))?;
        changed.push("keyspace_notifications");
    }
    // A bigger storage limit must fit the node (one check at a time, like placement).
    let _placing = state.placement_lock.lock().await;
    let old_mb = current.limits.data_storage_mb.unwrap_or(state.config.default_data_storage_mb);
    let new_mb = next.limits.data_storage_mb.unwrap_or(state.config.default_data_storage_mb);
    if new_mb > old_mb {
        let capacity = state.pools.of(&current.pool)?.capacity_mb(&current.node)?;
        let others = reserved_storage(&state, &current.pool, Some(&current.id))
            .await?
            .remove(&current.node)
            .unwrap_or(0);
        if others + new_mb > capacity {
            return Err(ApiError::Unprocessable {
                detail: format!(
                    "the cache's node has no room for data_storage_mb = {new_mb}: it can take at most \
                     {} MB for this cache (the storage limits of the caches on a node add up to at most {}% \
                     of its memory)",
                    capacity.saturating_sub(others),
                    100 - shoal_engine::RESERVED_MEMORY_PERCENT
                ),
                field: Some("limits.data_storage_mb".into()),
            });
        }
    }
    let mut event = ctx.cache_event(&who, "cache.update", current.id.as_str(), &current);
    event.details = serde_json::json!({ "fields": changed });
    let mut tx = state.store.begin().await?;
    let updated = match store::update_cache(tx.conn(), &next, current.version).await {
        Ok(done) => done,
        Err(e) if store::is_unique_violation(&e) => {
            return Err(ApiError::Conflict(format!("a cache named {:?} already exists", next.name)))
        }
        Err(e) => return Err(e.into()),
    };
    if !updated {
        return Err(ApiError::PreconditionFailed);
    }
    if new_mb != old_mb {
        store::bump_placement(tx.conn(), &current.pool, &current.id).await?;
    }
    tx.commit(&event).await?;
    if new_mb != old_mb {
        state.occupancy.forget(&current.pool);
    }
    if next.keyspace_events != current.keyspace_events {
        apply_keyspace_events(&state, &next.pool, &next.node).await?;
    }
    next.version += 1;
    let fresh = state.store.cache(&next.id).await?.unwrap_or(next);
    Ok(HttpResponse::Ok().insert_header(("ETag", page::etag(fresh.version))).json(Cache::from_record(
        &fresh,
        &state.config,
        &who,
    )))
}

/// A create that held the placement lock longer than this logs where its time went (debug).
const SLOW_CREATE: std::time::Duration = std::time::Duration::from_millis(20);

/// Query of `DELETE /v1/caches/{id}`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Take a last snapshot with this name first (ElastiCache's `FinalSnapshotName`); if it
    /// cannot be taken, the cache is not deleted.
    pub final_snapshot: Option<String>,
}

/// Delete a cache: its ACL user and its cache users go (open connections close), its data
/// is flushed. Its snapshots stay until deleted.
#[utoipa::path(delete, path = "/v1/caches/{id}", params(("id" = String, Path, description = "cache id"), DeleteQuery),
    responses((status = 204), responses::ChangeById, responses::Conflict, responses::Unavailable),
    security(("bearer" = [])), tag = "caches")]
pub async fn delete_cache(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    id: web::Path<String>,
    q: web::Query<DeleteQuery>,
) -> Result<HttpResponse, ApiError> {
    let _placing = state.placement_lock.lock().await;
    let cache = changeable_cache(&state, &who, &id).await?;
    let mut event = ctx.cache_event(&who, "cache.delete", cache.id.as_str(), &cache);
    if let Some(name) = &q.final_snapshot {
        crate::routes::snapshots::validate_name(name)?;
        let snap_event = ctx.cache_event(&who, "snapshot.create", cache.id.as_str(), &cache);
        let mut record = crate::routes::snapshots::begin_snapshot(
            &state,
            &cache,
            name.clone(),
            SnapshotKind::Final,
            snap_event,
        )
        .await?;
        crate::snapshots::take(&state, &cache, &mut record).await.map_err(|e| {
            ApiError::Unavailable(format!(
                "the final snapshot could not be taken ({e}); the cache was not deleted"
            ))
        })?;
        event.details = serde_json::json!({ "final_snapshot": record.id });
    }
    remove_cache(&state, &cache, event).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Removes a cache (the caller holds the placement lock): its cache users' and its own ACL
/// users go (their connections close), its databases are flushed, its row is marked
/// deleted with `event`.
async fn remove_cache(state: &AppState, cache: &CacheRecord, mut event: AuditEvent) -> Result<(), ApiError> {
    let acl = cache.tenant_acl();
    // Its users' ACL users (cache users and LDAP roles) go first: their connections close.
    let _users = state.users_lock.lock().await;
    let pool = state.pools.of(&cache.pool)?;
    // Looked up by name (O(1) each), not by listing every ACL user of the node.
    let possible = crate::domain::logins::possible_upstream_users(state, cache).await?;
    let users = pool.existing_acl_users(&cache.node, &possible).await?;
    pool.delete_cache_users(&cache.node, &users).await?;
    pool.delete_tenant(&cache.node, &acl).await?;
    let tracking = state.store.client_tracking(&cache.id).await?;
    let mut tx = state.store.begin().await?;
    store::mark_cache_deleted(tx.conn(), &cache.id).await?;
    let removed = store::users::delete_cache_users(tx.conn(), &cache.id).await?;
    let version = store::bump_placement(tx.conn(), &cache.pool, &cache.id).await?;
    if let Some(details) = event.details.as_object_mut() {
        details.insert("cache_users_deleted".into(), removed.into());
    }
    tx.commit(&event).await?;
    // A token user the store does not know (a failed mint's) is left for the sweep.
    state.token_user_changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mb = cache.limits.data_storage_mb.unwrap_or(state.config.default_data_storage_mb);
    state.occupancy.changed(cache, mb, false, version);
    // Only a cache that added keyspace events changes its node's (reading them is O(caches)).
    if !cache.keyspace_events.is_empty() || tracking {
        apply_keyspace_events(state, &cache.pool, &cache.node).await?;
    }
    tracing::info!(cache = %cache.id, "cache deleted");
    Ok(())
}
