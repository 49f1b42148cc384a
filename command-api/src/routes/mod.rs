//! The HTTP routes.

mod command;
mod health;
pub mod openapi;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use keel_http::{Edge, Role};

use crate::error::ApiError;
use crate::owner::StatusCell;
pub use crate::owners::Owners;

/// Largest command body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The partition owners.
    pub owners: Arc<Owners>,
    /// Their statuses, for readiness.
    pub statuses: Arc<Vec<StatusCell>>,
    /// Partitions per topic.
    pub partitions: i32,
    /// How long a request waits for its command to be read back.
    pub request_timeout: Duration,
}

/// The command API's routes: `/v1` behind `edge` (a token with `commands:write`, rate and
/// concurrency limits, a timeout); health, readiness and the OpenAPI document open.
pub fn app(state: AppState, edge: &Edge) -> Router {
    let commands = Router::new().route("/v1/{collection}/{id}/{command}", post(command::handle));
    Router::new()
        .merge(edge.limit(edge.guard(commands, Role::CommandsWrite)))
        .route("/healthz", get(health::alive))
        .route("/readyz", get(health::ready))
        .route("/openapi.json", get(openapi::serve))
        .fallback(|| async {
            ApiError::NotFound {
                detail: "no such resource: commands are POST /v1/{collection}/{id}/{command}"
                    .into(),
                rule: None,
            }
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(keel_http::edge::problem_answers))
        .with_state(state)
}
