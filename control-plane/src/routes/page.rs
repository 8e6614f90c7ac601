//! Shared pieces of the REST handlers: pagination, idempotent creates, ETags.

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::idempotency::Claim;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::future::Future;

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;

/// `?limit=&cursor=` of every list endpoint. Lists answer `{items, next_cursor}`; pass
/// `next_cursor` back to get the next page (absent on the last page).
#[derive(Deserialize, utoipa::IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1–1000 (default 100).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageQuery {
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::field("limit", format!("limit must be between 1 and {MAX_LIMIT}"))),
        }
    }

    /// The decoded cursor: the sort key of the last item of the previous page.
    pub fn cursor(&self) -> Result<Option<Vec<String>>, ApiError> {
        let Some(c) = &self.cursor else { return Ok(None) };
        URL_SAFE_NO_PAD
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
            .map(Some)
            .ok_or_else(|| ApiError::field("cursor", "cursor is not one this API returned"))
    }
}

/// A cursor pointing after an item with this sort key.
pub fn cursor(key: &[&str]) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(key).expect("strings serialize"))
}

/// `next_cursor` for a page: present only when the page is full (there may be more).
pub fn next_cursor<T>(items: &[T], limit: i64, key: impl Fn(&T) -> Vec<String>) -> Option<String> {
    if (items.len() as i64) < limit {
        return None;
    }
    let last = key(items.last()?);
    Some(cursor(&last.iter().map(String::as_str).collect::<Vec<_>>()))
}

/// Fields of a create's response that hold a secret shown only once (an API key's `token`,
/// a password): never kept for an idempotent replay.
pub const SECRET_FIELDS: &[&str] = &["token", "password", "passwords", "secret"];

/// What a replay says in place of a secret field `f` (as `<f>_note`).
pub const REDACTED_NOTE: &str = "shown only once, in the first response to this Idempotency-Key; a replay \
     does not repeat it (Shoal keeps no copy). If it was lost, revoke this one and create another.";

/// The response as kept for replays: each top-level secret field replaced by a
/// `<field>_note` saying why it is missing. Returns the kept body and the fields taken out.
pub fn redact(value: &serde_json::Value) -> (serde_json::Value, Vec<&'static str>) {
    let mut kept = value.clone();
    let mut removed = Vec::new();
    if let Some(object) = kept.as_object_mut() {
        for &field in SECRET_FIELDS {
            if object.remove(field).is_some() {
                object.insert(format!("{field}_note"), REDACTED_NOTE.into());
                removed.push(field);
            }
        }
    }
    (kept, removed)
}

/// Runs a create once per `Idempotency-Key` (per caller): a retry with the same key and
/// body gets the first response again (with `Idempotent-Replayed: true`), the same key
/// with a different body gets 422. Without the header, just runs it. A secret in the
/// response (an API key's token) is in the first response only: the kept copy has it
/// taken out, so a replay answers without it, with a `<field>_note` and an
/// `Idempotent-Redacted: <fields>` header. Keys expire 24 h after their first use.
pub async fn idempotent<F, Fut>(
    state: &AppState,
    who: &Principal,
    req: &HttpRequest,
    body: &[u8],
    create: F,
) -> Result<HttpResponse, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(StatusCode, serde_json::Value), ApiError>>,
{
    let key = match req.headers().get("Idempotency-Key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if (1..=255).contains(&k.len()) => Some(k.to_owned()),
            _ => {
                return Err(ApiError::field(
                    "Idempotency-Key",
                    "Idempotency-Key must be 1–255 visible characters",
                ))
            }
        },
    };
    let Some(key) = key else {
        let (status, value) = create().await?;
        return Ok(HttpResponse::build(status).json(value));
    };
    let mut h = Sha256::new();
    h.update(req.method().as_str());
    h.update(b" ");
    h.update(req.path());
    h.update(b"\n");
    h.update(body);
    let request_hash = hex::encode(h.finalize());
    let principal = who.actor();
    match state.store.claim_idempotency_key(&principal, &key, &request_hash).await? {
        Claim::Replay(status, body) => {
            let mut answer = HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::OK));
            answer.insert_header(("Idempotent-Replayed", "true"));
            let redacted: Vec<&str> = match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(serde_json::Value::Object(o)) => {
                    SECRET_FIELDS.iter().copied().filter(|f| o.contains_key(&format!("{f}_note"))).collect()
                }
                _ => Vec::new(),
            };
            if !redacted.is_empty() {
                answer.insert_header(("Idempotent-Redacted", redacted.join(",")));
            }
            Ok(answer.content_type("application/json").body(body))
        }
        Claim::Conflict(why) => {
            Err(ApiError::Unprocessable { detail: why.into(), field: Some("Idempotency-Key".into()) })
        }
        Claim::Fresh => match create().await {
            Ok((status, value)) => {
                let (kept, _) = redact(&value);
                state.store.finish_idempotent(&principal, &key, status.as_u16(), &kept.to_string()).await?;
                Ok(HttpResponse::build(status).content_type("application/json").body(value.to_string()))
            }
            Err(e) => {
                state.store.release_idempotency_key(&principal, &key).await?;
                Err(e)
            }
        },
    }
}

/// The ETag of an object at `version`.
pub fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// Checks `If-Match` (if sent) against the object's current version.
pub fn check_if_match(req: &HttpRequest, version: i64) -> Result<(), ApiError> {
    let Some(v) = req.headers().get("If-Match") else { return Ok(()) };
    let v = v.to_str().map_err(|_| ApiError::PreconditionFailed)?;
    let current = etag(version);
    if v.trim() == "*" || v.split(',').any(|t| t.trim().trim_start_matches("W/") == current) {
        Ok(())
    } else {
        Err(ApiError::PreconditionFailed)
    }
}

/// Parses a JSON body, naming the problem; empty bodies are refused.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        ApiError::BadRequest {
            field: crate::error::unknown_field(&msg),
            detail: format!("invalid JSON body: {msg}"),
        }
    })
}

/// A time in a query (`from`, `to`): RFC 3339, as UTC.
pub fn parse_time(field: &'static str, raw: &str) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| ApiError::field(field, format!("{field} must be an RFC 3339 time")))
}

#[cfg(test)]
mod redaction_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_kept_response_has_no_secret_and_says_why() {
        let answer = json!({"id": "key-1", "name": "ci", "token": "shoal_owner_abc", "password": "p"});
        let (kept, removed) = redact(&answer);
        assert_eq!(removed, vec!["token", "password"]);
        assert!(!kept.to_string().contains("shoal_owner_abc"));
        assert_eq!(kept["id"], "key-1");
        assert_eq!(kept["token_note"], REDACTED_NOTE);
        assert_eq!(kept["password_note"], REDACTED_NOTE);
        // Nothing secret: kept as is.
        let cache = json!({"id": "c1", "name": "once"});
        assert_eq!(redact(&cache), (cache.clone(), vec![]));
    }
}
