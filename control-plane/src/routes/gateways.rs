//! `/v1/gateways`: the gateways allowed on the internal API, each with its own credential
//! (platform admin only; every change audited).

use crate::auth::Principal;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::routes::responses;
use crate::state::AppState;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/gateways")
            .route(web::post().to(create_gateway))
            .route(web::get().to(list_gateways)),
    )
    .service(web::resource("/v1/gateways/{name}").route(web::delete().to(delete_gateway)));
}

/// Body of `POST /v1/gateways`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGateway {
    /// 1–63 characters of `a-z`, `0-9` and `-`; unique. Shown in the gateway's usage and
    /// audit records.
    pub name: String,
}

#[derive(Serialize, ToSchema)]
pub struct GatewayInfo {
    pub name: String,
    pub created_at: String,
    /// Who made it (an API key, `cli:<user>`, or `shoal-dev`).
    pub created_by: String,
    /// The gateway's `internal_credential`: in the create response only, once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct GatewayList {
    pub items: Vec<GatewayInfo>,
}

/// Make a gateway and its credential for the internal API (platform admin). The credential
/// is in the response, once: put it in the gateway's `internal_credential_file`.
#[utoipa::path(post, path = "/v1/gateways", request_body = CreateGateway,
    responses((status = 201, body = GatewayInfo), responses::Authed, responses::Forbidden,
              responses::Conflict),
    security(("bearer" = [])), tag = "gateways")]
pub async fn create_gateway(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    body: web::Json<CreateGateway>,
) -> Result<HttpResponse, ApiError> {
    who.admin()?;
    let event = ctx.event(&who, "gateway.create", &body.name);
    let credential = crate::gateways::issue(&state.store, &body.name, false, event).await?;
    Ok(HttpResponse::Created().json(GatewayInfo {
        name: body.name.clone(),
        created_at: crate::store::now(),
        created_by: who.actor(),
        credential: Some(credential.expose().to_owned()),
    }))
}

/// List the gateways (platform admin); credentials are never shown again.
#[utoipa::path(get, path = "/v1/gateways", responses((status = 200, body = GatewayList), responses::Authed),
    security(("bearer" = [])), tag = "gateways")]
pub async fn list_gateways(state: web::Data<AppState>, who: Principal) -> Result<HttpResponse, ApiError> {
    who.admin()?;
    let items = state
        .store
        .gateways()
        .await?
        .into_iter()
        .map(|g| GatewayInfo {
            name: g.name,
            created_at: g.created_at,
            created_by: g.created_by,
            credential: None,
        })
        .collect();
    Ok(HttpResponse::Ok().json(GatewayList { items }))
}

/// Delete a gateway (platform admin): its credential stops working at once.
#[utoipa::path(delete, path = "/v1/gateways/{name}", params(("name" = String, Path, description = "gateway name")),
    responses((status = 204), responses::ChangeById), security(("bearer" = [])), tag = "gateways")]
pub async fn delete_gateway(
    state: web::Data<AppState>,
    who: Principal,
    ctx: RequestContext,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    who.admin()?;
    let event = ctx.event(&who, "gateway.delete", &name);
    if !crate::gateways::remove(&state.store, &name, event).await? {
        return Err(ApiError::NotFound("gateway"));
    }
    Ok(HttpResponse::NoContent().finish())
}
