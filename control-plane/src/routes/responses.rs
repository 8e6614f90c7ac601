//! The error responses handlers document, each said once: `responses((status = 200, body =
//! Cache), ById, Conflict)` in `#[utoipa::path]`. Every one is an `application/problem+json`
//! [`Problem`] (the content type is set where the OpenAPI document is assembled,
//! `apidoc.rs`). A route with its own reason for a status keeps a `(status = …,
//! description = …)` tuple instead.
//!
//! The sets: [`Authed`] for every route behind a bearer token, [`ById`] for one named
//! object, [`ChangeById`] for changes to one. The rest are single statuses.
#![allow(dead_code)] // Only the derives read the fields.

use crate::error::Problem;
use utoipa::IntoResponses;

/// Any route behind a bearer token: 400 and 401.
#[derive(IntoResponses)]
pub enum Authed {
    #[response(status = 400, description = "bad request")]
    BadRequest(Problem),
    #[response(status = 401, description = "missing or invalid bearer token")]
    Unauthorized(Problem),
}

/// A route on one object named in its path: 400, 401 and 404.
#[derive(IntoResponses)]
pub enum ById {
    #[response(status = 400, description = "bad request")]
    BadRequest(Problem),
    #[response(status = 401, description = "missing or invalid bearer token")]
    Unauthorized(Problem),
    #[response(status = 404, description = "no such object, or not one the caller may see")]
    NotFound(Problem),
}

/// A change to one object named in its path: 400, 401, 403 and 404.
#[derive(IntoResponses)]
pub enum ChangeById {
    #[response(status = 400, description = "bad request")]
    BadRequest(Problem),
    #[response(status = 401, description = "missing or invalid bearer token")]
    Unauthorized(Problem),
    #[response(status = 403, description = "the caller's role may not do this")]
    Forbidden(Problem),
    #[response(status = 404, description = "no such object, or not one the caller may see")]
    NotFound(Problem),
}

#[derive(IntoResponses)]
#[response(status = 403, description = "the caller's role may not do this")]
pub struct Forbidden(Problem);

#[derive(IntoResponses)]
#[response(status = 404, description = "no such object, or not one the caller may see")]
pub struct NotFound(Problem);

#[derive(IntoResponses)]
#[response(status = 409, description = "conflicts with an existing object or the object's state")]
pub struct Conflict(Problem);

#[derive(IntoResponses)]
#[response(
    status = 412,
    description = "the object changed since you read it (If-Match does not match its ETag)"
)]
pub struct PreconditionFailed(Problem);

#[derive(IntoResponses)]
#[response(
    status = 422,
    description = "well-formed but not applicable (an Idempotency-Key reused with another body; `field` names it)"
)]
pub struct Unprocessable(Problem);

#[derive(IntoResponses)]
#[response(status = 503, description = "a node or the directory cannot be reached; retry")]
pub struct Unavailable(Problem);

/// 400 alone, for a route that lists 401 and the rest by themselves.
#[derive(IntoResponses)]
#[response(status = 400, description = "bad request")]
pub struct BadRequest(Problem);

#[derive(IntoResponses)]
#[response(status = 401, description = "missing or invalid bearer token")]
pub struct Unauthorized(Problem);
