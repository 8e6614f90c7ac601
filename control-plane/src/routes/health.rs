//! `/healthz` (the process is up) and `/readyz` (store and every Valkey node of every pool
//! answer; a cluster's replicas too).

use crate::state::AppState;
use actix_web::{web, HttpResponse};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz)).route("/readyz", web::get().to(readyz));
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "up")), tag = "health")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Readiness: the store and every node answer.
#[utoipa::path(get, path = "/readyz", responses((status = 200), (status = 503)), tag = "health")]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let store_ok = state.store.ping().await.is_ok();
    let mut nodes = serde_json::Map::new();
    let mut all_ok = store_ok;
    for (pool_name, pool) in state.pools.iter() {
        let members = match pool.cluster() {
            Some(cluster) => cluster.nodes(),
            None => pool.nodes().to_vec(),
        };
        for node in members {
            let ok = node.ping().await;
            all_ok &= ok;
            // `node` alone in the main pool, as before pools existed.
            let key = if pool_name == crate::pools::MAIN_POOL {
                node.name().to_string()
            } else {
                format!("{pool_name}/{}", node.name())
            };
            nodes.insert(key, serde_json::Value::Bool(ok));
        }
    }
    let body = serde_json::json!({"store": store_ok, "nodes": nodes});
    if all_ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
