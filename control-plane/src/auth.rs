//! REST authentication: bearer API keys, looked up by their SHA-256 hash.

use crate::error::ApiError;
use crate::startup::AppState;
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::pin::Pin;

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Principal {
    pub key_id: String,
    pub role: Role,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
}

impl FromRequest for Principal {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Principal, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let token = req
            .headers()
            .get("Authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string());
        Box::pin(async move {
            let (Some(state), Some(token)) = (state, token) else { return Err(ApiError::Unauthorized) };
            let key =
                state.store.api_key_by_hash(&hash_token(&token)).await?.ok_or(ApiError::Unauthorized)?;
            let role = match key.role.as_str() {
                "admin" => Role::Admin,
                _ => return Err(ApiError::Unauthorized),
            };
            Ok(Principal { key_id: key.id, role })
        })
    }
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// `n` random bytes, hex encoded.
pub fn random_token(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Whether the internal API's bearer token matches (constant time).
pub fn internal_token_ok(req: &HttpRequest, expected: &str) -> bool {
    let Some(got) = req.headers().get("Authorization").and_then(|v| v.to_str().ok()) else { return false };
    let Some(got) = got.strip_prefix("Bearer ") else { return false };
    !expected.is_empty()
        && got.len() == expected.len()
        && got.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}
