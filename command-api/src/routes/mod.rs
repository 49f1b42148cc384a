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

use crate::cluster::Cluster;
use crate::error::ApiError;
pub use crate::owners::Owners;
use keel_schemas::TopicPartition;
use std::collections::HashMap;

/// Largest command body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// This instance's partition owners.
    pub owners: Arc<Owners>,
    /// The group this instance shares the partitions with; `None` when it takes every
    /// partition itself.
    pub cluster: Option<Arc<Cluster>>,
    /// This instance's writer name prefix.
    pub instance: String,
    /// Each aggregate's topic, by stream type.
    pub topics: Arc<HashMap<&'static str, String>>,
    /// Partitions per topic.
    pub partitions: i32,
    /// How long a request waits for its command to be read back.
    pub request_timeout: Duration,
}

impl AppState {
    /// The topic of `stream_type`.
    pub fn topic(&self, stream_type: &str) -> String {
        self.topics.get(stream_type).cloned().unwrap_or_default()
    }

    /// Every partition of every aggregate's topic.
    pub fn every_partition(&self) -> Vec<(&'static str, TopicPartition)> {
        keel_domain::STREAM_TYPES
            .iter()
            .flat_map(|t| {
                (0..self.partitions).map(move |p| (*t, TopicPartition::new(self.topic(t), p)))
            })
            .collect()
    }
}

/// Each aggregate's topic under `prefix`, by stream type.
pub fn topics(prefix: &str) -> Arc<HashMap<&'static str, String>> {
    Arc::new(
        keel_domain::STREAM_TYPES
            .iter()
            .map(|t| (*t, keel_schemas::topic_name(prefix, t)))
            .collect(),
    )
}

/// The command API's routes: `/v1` behind `edge` (a token with `commands:write`, rate and
/// concurrency limits, a timeout); health, readiness and the OpenAPI document open.
pub fn app(state: AppState, edge: &Edge) -> Router {
    let commands = Router::new().route("/v1/{collection}/{id}/{command}", post(command::handle));
    let admin = Router::new().route("/v1/partitions", get(health::partitions));
    // Between instances: checked by its signature, not a token; limited like the rest.
    let handoff = Router::new().route("/handoff", post(health::handoff));
    Router::new()
        .merge(edge.limit(edge.guard(commands, Role::CommandsWrite)))
        .merge(edge.limit(edge.guard(admin, Role::Admin)))
        .merge(edge.limit(handoff))
        .route("/healthz", get(health::alive))
        .route("/readyz", get(health::ready))
        .route("/owned", get(health::owned))
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
