//! REST errors as `application/problem+json` (RFC 9457). Internal details are logged, never
//! sent.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    BadRequest { detail: String, field: Option<String> },
    #[error("{detail}")]
    Unprocessable { detail: String, field: Option<String> },
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("not allowed")]
    Forbidden,
    /// Not allowed, with a reason safe to show.
    #[error("{0}")]
    Refused(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    /// A login that failed (wrong credentials): 401 with a reason safe to show.
    #[error("{0}")]
    LoginFailed(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// A request body over its limit (413).
    #[error("{0}")]
    TooLarge(String),
    #[error("the object changed since you read it (If-Match does not match its ETag)")]
    PreconditionFailed,
    #[error("internal error")]
    Internal(String),
    /// The store failed; the error and its sources are logged, the client sees "internal error".
    #[error("internal error")]
    Store(#[from] sqlx::Error),
}

impl ApiError {
    pub fn field(field: impl Into<String>, detail: impl Into<String>) -> ApiError {
        ApiError::BadRequest { detail: detail.into(), field: Some(field.into()) }
    }
}

/// The body of every error response.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized | ApiError::LoginFailed(_) => StatusCode::UNAUTHORIZED,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Forbidden | ApiError::Refused(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ApiError::Internal(_) | ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ApiError::Internal(detail) => tracing::error!(%detail, "internal error"),
            ApiError::Store(e) => tracing::error!(error = %chain(e), "store error"),
            _ => {}
        }
        let status = self.status_code();
        let field = match self {
            ApiError::BadRequest { field, .. } | ApiError::Unprocessable { field, .. } => field.clone(),
            _ => None,
        };
        let mut resp = HttpResponse::build(status);
        if matches!(self, ApiError::Unauthorized) {
            resp.insert_header(("WWW-Authenticate", "Bearer"));
        }
        resp.content_type("application/problem+json").json(Problem {
            type_: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: self.to_string(),
            field,
        })
    }
}

/// An error and its sources, `outer: inner: …` (reqwest's and sqlx's own say little).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl From<shoal_engine::EngineError> for ApiError {
    fn from(e: shoal_engine::EngineError) -> Self {
        tracing::error!(error = %e, kind = e.kind(), "engine error");
        match e {
            shoal_engine::EngineError::Full => {
                ApiError::Unavailable("no capacity left for a new cache".into())
            }
            _ => ApiError::Unavailable("the cache engine is unavailable, try again".into()),
        }
    }
}

/// Turns actix's JSON and path extractor failures into problem+json 400s.
pub fn json_error(
    err: actix_web::error::JsonPayloadError,
    _req: &actix_web::HttpRequest,
) -> actix_web::Error {
    ApiError::BadRequest {
        detail: format!("invalid JSON body: {err}"),
        field: unknown_field(&err.to_string()),
    }
    .into()
}

/// The field serde complained about ("unknown field `x`", "missing field `x`"), if any.
pub fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.split_once("field `")?.1;
    Some(rest.split_once('`')?.0.to_string())
}

pub fn query_error(
    err: actix_web::error::QueryPayloadError,
    _req: &actix_web::HttpRequest,
) -> actix_web::Error {
    let msg = err.to_string();
    ApiError::BadRequest { field: unknown_field(&msg), detail: format!("invalid query: {msg}") }.into()
}

pub fn path_error(err: actix_web::error::PathError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::BadRequest { detail: format!("invalid path: {err}"), field: None }.into()
}
