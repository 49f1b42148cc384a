//! One error type for the API, rendered as RFC 9457 problem+json.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_domain::{DomainError, ValidationError};
use serde_json::{Value, json};

use crate::owner::OwnerError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: u32 = 1;

/// Everything a request can fail with, each mapped to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (bad JSON, a bad header).
    #[error("{0}")]
    BadRequest(String),
    /// 403: a request between instances that no trusted key signed.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such collection, command or stream.
    #[error("{detail}")]
    NotFound {
        /// What was not found.
        detail: String,
        /// The domain rule, when a command addressed a stream that does not exist.
        rule: Option<&'static str>,
    },
    /// 405: the route exists for another method.
    #[error("this route does not take that method")]
    MethodNotAllowed,
    /// 409: a domain rule was broken.
    #[error("{0}")]
    Conflict(DomainError),
    /// 412: `If-Match` named another version.
    #[error("the stream is at version {actual}, not {expected}")]
    VersionMismatch {
        /// The version the client expected.
        expected: u64,
        /// The stream's version.
        actual: u64,
    },
    /// 413: the body is too large.
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    /// 415: the body is not JSON.
    #[error("commands must be sent as application/json")]
    UnsupportedMediaType,
    /// 422: fields are invalid.
    #[error("{} invalid field(s)", .0.len())]
    Invalid(Vec<ValidationError>),
    /// 422: the idempotency key was used before with another request.
    #[error("the Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    /// 503: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// 503: a command forwarded to this instance for a partition it does not own (it moved
    /// meanwhile); the forwarding instance looks for the owner again, starting with
    /// `moved_to` when this instance knows where the partition went.
    #[error("{detail}")]
    NotOwner {
        /// What happened.
        detail: String,
        /// The member the partition moved to, if known here.
        moved_to: Option<String>,
    },
    /// 500: a fault of ours; the detail goes to the log, the client gets a request id.
    #[error("internal error {request_id}")]
    Internal {
        /// Ties the response to the log line.
        request_id: String,
    },
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::Invalid(v) => ApiError::Invalid(vec![v]),
            e if e.is_not_found() => ApiError::NotFound {
                detail: e.to_string(),
                rule: Some(e.rule()),
            },
            e => ApiError::Conflict(e),
        }
    }
}

impl From<OwnerError> for ApiError {
    fn from(e: OwnerError) -> Self {
        match e {
            OwnerError::Unavailable(reason) => ApiError::Unavailable(reason),
            OwnerError::VersionMismatch { expected, actual } => {
                ApiError::VersionMismatch { expected, actual }
            }
            OwnerError::IdempotencyKeyReused => ApiError::IdempotencyKeyReused,
            OwnerError::Domain(e) => e.into(),
        }
    }
}

impl ApiError {
    /// A fault of ours: the detail goes to the log with a request id, the client gets the id.
    pub fn internal(what: &str, error: &dyn std::fmt::Display) -> Self {
        let request_id = uuid::Uuid::now_v7().to_string();
        tracing::error!(%request_id, error = %error, "{what}");
        ApiError::Internal { request_id }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::VersionMismatch { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid(_) | ApiError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Unavailable(_) | ApiError::NotOwner { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound { .. } => "not-found",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::Conflict(_) => "domain-rule-broken",
            ApiError::VersionMismatch { .. } => "version-mismatch",
            ApiError::TooLarge(_) => "body-too-large",
            ApiError::UnsupportedMediaType => "unsupported-media-type",
            ApiError::Invalid(_) => "invalid-fields",
            ApiError::IdempotencyKeyReused => "idempotency-key-reused",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::NotOwner { .. } => "not-owner",
            ApiError::Internal { .. } => "internal",
        }
    }

    /// The problem document (RFC 9457).
    pub fn problem(&self) -> Value {
        let status = self.status();
        let mut problem = keel_schemas::problem(
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error"),
            self.slug(),
            &self.to_string(),
        );
        match self {
            ApiError::Conflict(e) => problem["rule"] = json!(e.rule()),
            ApiError::NotFound {
                rule: Some(rule), ..
            } => problem["rule"] = json!(rule),
            ApiError::VersionMismatch { expected, actual } => {
                problem["expected_version"] = json!(expected);
                problem["current_version"] = json!(actual);
            }
            ApiError::Invalid(errors) => {
                problem["errors"] = errors
                    .iter()
                    .map(|e| json!({"field": e.field, "reason": e.reason}))
                    .collect();
            }
            ApiError::Internal { request_id } => problem["request_id"] = json!(request_id),
            _ => {}
        }
        problem
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = keel_http::edge::problem_response(self.status(), self.problem());
        if matches!(self, ApiError::Unavailable(_) | ApiError::NotOwner { .. }) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if let ApiError::NotOwner { moved_to, .. } = &self {
            let headers = response.headers_mut();
            headers.insert(crate::cluster::NOT_OWNER, HeaderValue::from_static("true"));
            if let Some(url) = moved_to
                .as_deref()
                .and_then(|u| HeaderValue::from_str(u).ok())
            {
                headers.insert(crate::cluster::MOVED_TO, url);
            }
        }
        response
    }
}
