//! The query API's errors, rendered as RFC 9457 problem+json.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::error;

/// Everything a query can fail with, each mapped to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: a malformed parameter, header or cursor.
    #[error("{detail}")]
    BadRequest {
        /// What is wrong.
        detail: String,
        /// The parameter or header at fault.
        field: Option<String>,
    },
    /// 404: no such resource.
    #[error("{0}")]
    NotFound(String),
    /// 409: the request conflicts with one already waiting.
    #[error("{0}")]
    Conflict(String),
    /// 415: a body in another media type than JSON.
    #[error("{0}")]
    Unsupported(String),
    /// 405: the route exists for another method.
    #[error("this route does not take that method")]
    MethodNotAllowed,
    /// 503: not ready, or the view has not caught up with the consistency token in time.
    #[error("{0}")]
    Unavailable(String),
    /// 503: the consistency token covers a record a parked stream holds back; no quick
    /// retry helps (no `Retry-After`) until an operator retries or discards the stream.
    #[error("{0}")]
    HeldBack(String),
    /// 503: a request could not be recorded because the database role may only read; no
    /// retry helps (no `Retry-After`) until it is granted what the problem names.
    #[error("{0}")]
    Unwritable(String),
    /// 500: a fault of ours; the detail goes to the log, the client gets a request id.
    /// Made by [`ApiError::internal`], which logs.
    #[error("internal error {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming the parameter at fault.
    pub fn bad(field: &str, detail: impl Into<String>) -> Self {
        ApiError::BadRequest {
            detail: detail.into(),
            field: Some(field.to_owned()),
        }
    }

    /// A 500: logs `what` and `error` under a new request id, which alone the client sees.
    pub fn internal(what: &str, error: &dyn std::fmt::Display) -> Self {
        let request_id = uuid::Uuid::now_v7().to_string();
        error!(%request_id, error = %error, "{what}");
        ApiError::Internal(request_id)
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) | ApiError::HeldBack(_) | ApiError::Unwritable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "bad-request",
            ApiError::NotFound(_) => "not-found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unsupported(_) => "unsupported-media-type",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::HeldBack(_) => "held-back",
            ApiError::Unwritable(_) => "read-only",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            // The view does not exist yet: the projector has not created it.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => {
                ApiError::Unavailable(
                    "this view is not built yet: is the projector running?".into(),
                )
            }
            // A NUL byte in a path or query parameter: PostgreSQL cannot hold it in text.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("22021") => {
                ApiError::BadRequest {
                    detail: "a parameter holds a character that cannot be stored (NUL)".into(),
                    field: None,
                }
            }
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                ApiError::Unavailable("the database is not reachable".into())
            }
            _ => ApiError::internal("query failed", &e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = keel_schemas::problem(
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error"),
            self.slug(),
            &self.to_string(),
        );
        match &self {
            ApiError::BadRequest {
                field: Some(field), ..
            } => body["field"] = json!(field),
            ApiError::Internal(request_id) => body["request_id"] = json!(request_id),
            _ => {}
        }
        let mut response = keel_http::edge::problem_response(status, body);
        if matches!(self, ApiError::Unavailable(_)) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
        }
        response
    }
}
