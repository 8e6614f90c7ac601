//! The OpenAPI document, derived from the handlers by utoipa.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "Shoal", description = "Self-hosted, serverless-style, multi-tenant cache platform on Valkey 9."),
    paths(
        crate::routes::caches::create_cache,
        crate::routes::caches::list_caches,
        crate::routes::caches::get_cache,
        crate::routes::caches::patch_cache,
        crate::routes::caches::delete_cache,
        crate::routes::snapshots::create_snapshot,
        crate::routes::snapshots::list_cache_snapshots,
        crate::routes::snapshots::list_snapshots,
        crate::routes::snapshots::get_snapshot,
        crate::routes::snapshots::delete_snapshot,
        crate::routes::snapshots::export,
        crate::routes::snapshots::import,
        crate::routes::tokens::mint_token,
        crate::routes::tokens::list_tokens,
        crate::routes::tokens::revoke_token,
        crate::routes::usage::get_usage,
        crate::routes::accounts::create_account,
        crate::routes::accounts::list_accounts,
        crate::routes::accounts::get_account,
        crate::routes::accounts::patch_account,
        crate::routes::accounts::delete_account,
        crate::routes::accounts::create_account_key,
        crate::routes::accounts::list_account_keys,
        crate::routes::accounts::revoke_account_key,
        crate::routes::accounts::create_platform_key,
        crate::routes::accounts::list_platform_keys,
        crate::routes::accounts::revoke_key,
        crate::routes::me::me,
        crate::routes::billing::list_invoices,
        crate::routes::billing::get_invoice,
        crate::routes::billing::post_estimate,
        crate::routes::audit::list_audit,
        crate::routes::audit::verify_audit,
        crate::routes::users::create_user,
        crate::routes::users::list_users,
        crate::routes::users::get_user,
        crate::routes::users::patch_user,
        crate::routes::users::delete_user,
        crate::routes::auth::login,
        crate::routes::auth::rotate_signing_key,
        crate::routes::sessions::list_sessions,
        crate::routes::sessions::revoke_session,
        crate::routes::gateways::create_gateway,
        crate::routes::gateways::list_gateways,
        crate::routes::gateways::delete_gateway,
        crate::routes::pools::list_pools,
        crate::routes::pools::add_shard,
        crate::routes::pools::remove_shard,
        crate::routes::internal::jwks,
        crate::routes::health::healthz,
        crate::routes::health::readyz,
    ),
    modifiers(&BearerAuth, &ProblemResponses)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Errors are `application/problem+json` (handlers list them with
/// [`crate::routes::responses`], whose derive says `application/json`).
struct ProblemResponses;

impl Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.head,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for op in ops.into_iter().flatten() {
                for (code, response) in op.responses.responses.iter_mut() {
                    if code.as_str() >= "400" {
                        if let RefOr::T(r) = response {
                            if let Some(c) = r.content.shift_remove("application/json") {
                                r.content.insert("application/problem+json".to_string(), c);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty JSON.
pub fn document() -> String {
    openapi().to_pretty_json().expect("the document serializes")
}
