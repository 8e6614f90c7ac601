//! `/v1/engine/pools`: the engine pools caches are placed in (platform admins and platform
//! auditors read them), and scaling a cluster pool by a shard at a time (platform admins;
//! audited).
//!
//! Adding or removing a shard moves slots (`CLUSTER MIGRATESLOTS`, seconds to minutes with
//! the data's size): the call answers when the change is done (201 with the new shard, 204
//! once the drained shard is gone). The engine work runs in a task of its own, so a client
//! that gives up waiting does not stop a migration half-way; it shows in `GET` and in the
//! audit log once done. One scale operation per pool at a time: another gets 409.

use crate::auth::Principal;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::routes::responses;
use crate::state::AppState;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use shoal_engine::{NodeStatus, Pool, ShardStatus};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use utoipa::ToSchema;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/engine/pools").route(web::get().to(list_pools)))
        .service(web::resource("/v1/engine/pools/{pool}/shards").route(web::post().to(add_shard)))
        .service(web::resource("/v1/engine/pools/{pool}/shards/{id}").route(web::delete().to(remove_shard)));
}

/// One Valkey node of a pool.
#[derive(Serialize, ToSchema)]
pub struct PoolNode {
    /// The engine's name for it (absent for a node of the cluster the engine does not run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `host:port`.
    pub addr: String,
    /// `primary` or `replica` (a standalone node is a primary).
    pub role: String,
    /// It answered the engine's last health check.
    pub healthy: bool,
    /// The cluster's view: `online`, `failed` or `loading` (standalone: `online` or `failed`).
    pub health: String,
    /// `used_memory` in bytes; absent when the node did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_memory: Option<u64>,
    /// The Valkey modules it has loaded from a file (`MODULE LIST`; the pool's `modules`
    /// setting), empty when none; absent when the node did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modules: Option<Vec<PoolModule>>,
    /// What it tracks of keys' use: `recency` (caches with LRU and every other policy) or
    /// `frequency` (caches with `allkeys-lfu` or `volatile-lfu`).
    #[schema(value_type = String)]
    pub key_access: shoal_engine::KeyAccess,
    /// Which caches it holds: `shared` (numbered databases of many caches) or `dedicated`
    /// (one cache at a time, with the node to itself).
    #[schema(value_type = String)]
    pub placement: shoal_engine::Placement,
    /// The engine agent that runs the node (`shoal engine`), as it last reported; absent for
    /// nodes the control plane runs itself, and until the agent reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_host: Option<crate::engine_hosts::EngineHostSeen>,
}

/// A Valkey module a node has loaded.
#[derive(Serialize, ToSchema)]
pub struct PoolModule {
    /// The module's own name (`json`, `bf`, `search`, `ReJSON`…), not its file's.
    pub name: String,
    /// Its version as the module reports it: `major * 10000 + minor * 100 + patch` by
    /// convention (20803 is 2.8.3).
    pub version: i64,
}

/// One shard of a cluster pool.
#[derive(Serialize, ToSchema)]
pub struct PoolShard {
    /// Valkey's shard id (kept across failovers): the `{id}` of `DELETE …/shards/{id}`.
    pub id: String,
    /// Inclusive slot ranges `[first, last]`.
    pub slots: Vec<[u16; 2]>,
    pub slot_count: u32,
    /// Its primary first, then its replicas.
    pub nodes: Vec<PoolNode>,
}

/// An engine pool.
#[derive(Serialize, ToSchema)]
pub struct EnginePool {
    pub name: String,
    /// `standalone` (each cache in databases of one node) or `cluster` (each cache one
    /// database number across every shard).
    pub kind: String,
    /// Caches created without `"pool"` go here.
    pub default: bool,
    /// Live caches placed in it.
    pub caches: u64,
    /// Standalone: every node answers. Cluster: `cluster_state:ok`.
    pub ok: bool,
    /// A cluster's shards (empty for standalone).
    pub shards: Vec<PoolShard>,
    /// Every node: a standalone pool's, or the cluster's (the same as in `shards`).
    pub nodes: Vec<PoolNode>,
}

#[derive(Serialize, ToSchema)]
pub struct EnginePoolList {
    pub items: Vec<EnginePool>,
}

fn node(n: &NodeStatus) -> PoolNode {
    PoolNode {
        name: n.name.clone(),
        addr: n.addr.clone(),
        role: format!("{:?}", n.role).to_lowercase(),
        healthy: n.healthy,
        health: n.health.clone(),
        used_memory: n.used_memory,
        modules: n.modules.as_ref().map(|list| {
            list.iter().map(|m| PoolModule { name: m.name.clone(), version: m.version }).collect()
        }),
        key_access: n.key_access,
        placement: n.placement,
        engine_host: None,
    }
}

fn shard(s: &ShardStatus) -> PoolShard {
    PoolShard {
        id: s.id.clone(),
        slots: s.slots.iter().map(|&(a, b)| [a, b]).collect(),
        slot_count: s.slot_count(),
        nodes: s.primary.iter().chain(&s.replicas).map(node).collect(),
    }
}

async fn describe(
    name: &str,
    pool: &Pool,
    default: bool,
    caches: u64,
    hosts: &HashMap<String, crate::engine_hosts::EngineHostSeen>,
) -> Result<EnginePool, ApiError> {
    let (ok, shards, nodes) = match pool.cluster() {
        None => {
            let nodes: Vec<PoolNode> = pool
                .standalone_status()
                .await
                .iter()
                .map(|n| PoolNode {
                    engine_host: n.name.as_deref().and_then(|n| hosts.get(n).cloned()),
                    ..node(n)
                })
                .collect();
            (nodes.iter().all(|n| n.healthy), Vec::new(), nodes)
        }
        Some(_) => {
            let status = pool.cluster_status().await?;
            let mut shards: Vec<PoolShard> = status.shards.iter().map(shard).collect();
            for n in shards.iter_mut().flat_map(|s| s.nodes.iter_mut()) {
                n.engine_host = n.name.as_deref().and_then(|n| hosts.get(n).cloned());
            }
            let nodes = status
                .shards
                .iter()
                .flat_map(|s| s.primary.iter().chain(&s.replicas))
                .map(|n| PoolNode {
                    engine_host: n.name.as_deref().and_then(|n| hosts.get(n).cloned()),
                    ..node(n)
                })
                .collect();
            (status.ok, shards, nodes)
        }
    };
    Ok(EnginePool {
        name: name.to_string(),
        kind: pool.kind().to_string(),
        default,
        caches,
        ok,
        shards,
        nodes,
    })
}

/// List the engine pools: kind, caches, shards with their slots, nodes with their roles,
/// health and memory (platform admins and platform auditors).
#[utoipa::path(get, path = "/v1/engine/pools",
    responses((status = 200, body = EnginePoolList), responses::Authed, responses::Forbidden,
              responses::Unavailable),
    security(("bearer" = [])), tag = "engine")]
pub async fn list_pools(state: web::Data<AppState>, who: Principal) -> Result<HttpResponse, ApiError> {
    if who.scope().is_some() {
        return Err(ApiError::Forbidden);
    }
    let mut caches: BTreeMap<String, u64> = BTreeMap::new();
    for cache in state.store.caches(None).await? {
        *caches.entry(cache.pool).or_insert(0) += 1;
    }
    let hosts = crate::engine_hosts::seen(&state.store).await?;
    let mut items = Vec::new();
    for (name, pool) in state.pools.iter() {
        let count = caches.get(name).copied().unwrap_or(0);
        items.push(describe(name, pool, name == state.pools.default_name(), count, &hosts).await?);
    }
    Ok(HttpResponse::Ok().json(EnginePoolList { items }))
}

/// The cluster pool a scale call names, and the guard that keeps others out meanwhile.
fn scalable(state: &AppState, name: &str) -> Result<(Arc<Pool>, crate::pools::ScaleGuard), ApiError> {
    let pool = state.pools.get(name).ok_or(ApiError::NotFound("pool"))?;
    match pool.cluster() {
        None => {
            return Err(ApiError::Conflict(format!("pool {name:?} is standalone nodes: it has no shards")))
        }
        Some(c) if c.run_by_agents() => {
            return Err(ApiError::Conflict(format!(
                "pool {name:?}: {}",
                shoal_engine::cluster::SCALING_UNDER_AGENTS
            )))
        }
        Some(_) => {}
    }
    let guard = state.pools.scaling(name).ok_or_else(|| {
        ApiError::Conflict(format!(
            "pool {name:?} is already adding or removing a shard; try again when it is done"
        ))
    })?;
    Ok((Arc::clone(pool), guard))
}

/// Add a shard to a cluster pool (platform admin): a new primary and the pool's replicas per
/// shard, every cache's ACL users on them, then an even share of the slots moved onto it
/// with their keys (atomic slot migration). Answers when done, with the new shard.
#[utoipa::path(post, path = "/v1/engine/pools/{pool}/shards",
    params(("pool" = String, Path, description = "pool name")),
    responses((status = 201, body = PoolShard), responses::ChangeById,
              (status = 409, description = "a standalone pool, a cluster run by engine agents, or a scale operation already running"),
              responses::Unavailable),
    security(("bearer" = [])), tag = "engine")]
pub async fn add_shard(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    who.admin()?;
    let (pool, guard) = scalable(&state, &name)?;
    // Its own task: a client that stops waiting does not cancel a migration half-way.
    let engine = Arc::clone(&pool);
    let added = tokio::spawn(async move {
        let _guard = guard;
        engine.add_shard().await
    })
    .await
    .map_err(|e| ApiError::Internal(format!("add_shard task: {e}")))??;
    let status = pool.cluster_status().await?;
    let new = status.shards.iter().find(|s| s.id == added).map(shard).unwrap_or(PoolShard {
        id: added.clone(),
        slots: Vec::new(),
        slot_count: 0,
        nodes: Vec::new(),
    });
    let mut event = ctx.event(&who, "pool.shard.add", &name);
    event.details =
        serde_json::json!({ "shard": new.id, "slot_count": new.slot_count, "shards": status.shards.len() });
    state.store.audit(&event).await?;
    tracing::info!(pool = %name, shard = %new.id, slots = new.slot_count, "shard added");
    Ok(HttpResponse::Created().json(new))
}

/// Remove a shard of a cluster pool (platform admin): its slots are moved to the other
/// shards first, with their keys, then its nodes leave the cluster and are stopped. The last
/// shard cannot be removed. Answers when done.
#[utoipa::path(delete, path = "/v1/engine/pools/{pool}/shards/{id}",
    params(("pool" = String, Path, description = "pool name"), ("id" = String, Path, description = "shard id")),
    responses((status = 204), responses::ChangeById,
              (status = 409, description = "a standalone pool, a cluster run by engine agents, its last shard, or a scale operation already running"),
              responses::Unavailable),
    security(("bearer" = [])), tag = "engine")]
pub async fn remove_shard(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    who.admin()?;
    let (name, id) = path.into_inner();
    let (pool, guard) = scalable(&state, &name)?;
    let before = pool.cluster_status().await?;
    let leaving = before.shards.iter().find(|s| s.id == id).ok_or(ApiError::NotFound("shard"))?;
    let slots = leaving.slot_count();
    if before.shards.iter().filter(|s| s.primary.is_some()).count() <= 1 {
        return Err(ApiError::Conflict(format!("shard {id} is the last shard of pool {name:?}")));
    }
    let engine = Arc::clone(&pool);
    let shard_id = id.clone();
    tokio::spawn(async move {
        let _guard = guard;
        engine.remove_shard(&shard_id).await
    })
    .await
    .map_err(|e| ApiError::Internal(format!("remove_shard task: {e}")))??;
    let mut event = ctx.event(&who, "pool.shard.remove", &name);
    event.details =
        serde_json::json!({ "shard": id, "slots_moved": slots, "shards": before.shards.len() - 1 });
    state.store.audit(&event).await?;
    tracing::info!(pool = %name, shard = %id, slots, "shard drained and removed");
    Ok(HttpResponse::NoContent().finish())
}
