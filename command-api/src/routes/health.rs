use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;
use crate::owner::Status;

/// `GET /healthz`: the process is alive.
pub(super) async fn alive() -> Json<Value> {
    Json(json!({"status": "alive"}))
}

/// `GET /readyz`: 200 when this instance owns and has caught up with every partition;
/// 503 with each partition's status otherwise.
pub(super) async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let not_serving: Vec<Value> = state
        .statuses
        .iter()
        .filter(|s| s.get() != Status::Serving)
        .map(|s| json!({"topic": s.topic, "partition": s.partition, "status": s.get().as_str()}))
        .collect();
    if not_serving.is_empty() {
        (
            StatusCode::OK,
            Json(json!({"status": "ready", "partitions": state.statuses.len()})),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "not_serving": not_serving})),
        )
    }
}
