//! Gateways and their credentials: each gateway calls the internal API with its own
//! credential (`sgw_<name>_<secret>`, see [`shoal_types::GatewayCredential`]); the store keeps
//! its SHA-256. Whatever a gateway posts (usage, login events) is stamped with the name of
//! the credential it authenticated with, never a name from the body.

use crate::error::ApiError;
use crate::secret::hash_token;
use crate::state::AppState;
use crate::store::audit::AuditEvent;
use crate::store::{gateways, is_unique_violation, Store, StoreError};
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use shoal_types::{valid_gateway_name, GatewayCredential};
use std::future::Future;
use std::pin::Pin;

/// Why a credential could not be made.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("gateway names are 1–63 characters of a-z, 0-9 and -, starting with a letter or digit")]
    BadName,
    #[error("a gateway named {0:?} already exists")]
    Exists(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl From<IssueError> for ApiError {
    fn from(e: IssueError) -> ApiError {
        match e {
            IssueError::BadName => ApiError::field("name", e.to_string()),
            IssueError::Exists(_) => ApiError::Conflict(e.to_string()),
            IssueError::Store(e) => e.into(),
        }
    }
}

/// Makes gateway `name` and its credential (returned, never stored), audited by `event`
/// (its target is set to the name). With `replace`, an existing gateway of that name gets
/// the new credential (its old one stops working).
pub async fn issue(
    store: &Store,
    name: &str,
    replace: bool,
    mut event: AuditEvent,
) -> Result<GatewayCredential, IssueError> {
    if !valid_gateway_name(name) {
        return Err(IssueError::BadName);
    }
    let credential = GatewayCredential::generate(name);
    event.target = name.into();
    let mut tx = store.begin().await?;
    if replace {
        gateways::delete(tx.conn(), name).await?;
    }
    match gateways::insert(tx.conn(), name, &hash_token(credential.expose()), &event.actor).await {
        Err(e) if is_unique_violation(&e) => return Err(IssueError::Exists(name.into())),
        other => other?,
    }
    tx.commit(&event).await?;
    Ok(credential)
}

/// Deletes gateway `name` (its credential stops working at once), audited by `event`;
/// false if there was none.
pub async fn remove(store: &Store, name: &str, mut event: AuditEvent) -> Result<bool, StoreError> {
    event.target = name.into();
    let mut tx = store.begin().await?;
    if !gateways::delete(tx.conn(), name).await? {
        return Ok(false);
    }
    tx.commit(&event).await?;
    Ok(true)
}

/// The gateway an internal call authenticated as (its bearer credential).
#[derive(Clone, Debug)]
pub struct Gateway {
    pub name: String,
}

impl FromRequest for Gateway {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Gateway, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let credential = req
            .headers()
            .get("Authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|t| GatewayCredential::parse(t).ok());
        Box::pin(async move {
            let (Some(state), Some(credential)) = (state, credential) else {
                return Err(ApiError::Unauthorized);
            };
            let stored = state.store.gateway_credential_hash(credential.name()).await?;
            match stored {
                Some(hash) if constant_time_eq(&hash, &hash_token(credential.expose())) => {
                    Ok(Gateway { name: credential.name().to_owned() })
                }
                _ => Err(ApiError::Unauthorized),
            }
        })
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
