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
        crate::routes::tokens::mint_token,
        crate::routes::tokens::list_tokens,
        crate::routes::tokens::revoke_token,
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
        crate::routes::me::me,
        crate::routes::audit::list_audit,
        crate::routes::audit::verify_audit,
        crate::routes::internal::jwks,
        crate::routes::health::healthz,
        crate::routes::health::readyz,
    ),
    modifiers(&BearerAuth)
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

/// The document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty JSON.
pub fn document() -> String {
    openapi().to_pretty_json().expect("the document serializes")
}
