//! The HTTP routes.

mod command;
mod health;
pub mod openapi;
pub(crate) use health::unserved_partitions;
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
use crate::metrics::{CommandMetrics, PartitionCollector};
pub use crate::owners::Owners;
use keel_http::metrics::HttpMetrics;
use keel_schemas::TopicPartition;
use keel_telemetry::metrics::Metrics;
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
    /// The metrics the handlers record, and those `/metrics` serves.
    pub telemetry: Telemetry,
}

/// The command API's metrics.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    /// Commands by type and outcome, their phases, flight sizes; shared with the owners.
    pub commands: CommandMetrics,
    /// Requests by route, method and status.
    pub http: HttpMetrics,
    /// Everything `/metrics` serves, once [`AppState::exporting`] has registered it.
    pub exported: Option<Arc<Metrics>>,
}

impl AppState {
    /// The topic of `stream_type`.
    pub fn topic(&self, stream_type: &str) -> String {
        self.topics.get(stream_type).cloned().unwrap_or_default()
    }

    /// The same state, its metrics registered for `/metrics`: the commands', the HTTP
    /// requests', `edge`'s refusals, where each partition stands, and the process's own.
    pub fn exporting(mut self, edge: &Edge) -> Self {
        let mut metrics = Metrics::new();
        let keel = metrics.keel();
        self.telemetry.commands.register(keel);
        self.telemetry.http.register(keel);
        edge.register_metrics(keel);
        // A clone exporting nothing: the collector holds no reference to the registry.
        PartitionCollector::register(keel, self.clone());
        self.telemetry.exported = Some(metrics.shared());
        self
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
/// concurrency limits, a timeout); health, readiness and the OpenAPI document open, and
/// `/metrics` too unless `KEEL_METRICS_ROLE` names a role (and when the state exports
/// metrics). Every request is counted by route, method and status. The pages of the
/// origins `KEEL_CORS_ORIGINS` names may read `/v1/partitions` and `/metrics`.
pub fn app(state: AppState, edge: &Edge) -> Router {
    let metrics = match &state.telemetry.exported {
        Some(exported) => edge.metrics_route(Arc::clone(exported)),
        None => Router::new(),
    };
    let http = state.telemetry.http.clone();
    let commands = Router::new().route("/v1/{collection}/{id}/{command}", post(command::handle));
    let admin = Router::new().route("/v1/partitions", get(health::partitions));
    // Between instances: checked by its signature, not a token; limited like the rest.
    let handoff = Router::new().route("/handoff", post(health::handoff));
    let app = Router::new()
        .merge(edge.limit(edge.guard(commands, Role::CommandsWrite)))
        .merge(edge.limit(edge.guard(admin, Role::Admin)))
        .merge(edge.limit(handoff))
        .merge(metrics)
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
        .layer(axum::middleware::from_fn_with_state(
            http,
            keel_http::metrics::track,
        ))
        .with_state(state);
    // The console (served by the query API) reads the partitions and the command counts.
    edge.cross_origin(app, &["/v1/partitions", "/metrics"])
}
