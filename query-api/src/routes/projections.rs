use axum::Json;
use axum::extract::State;
use serde_json::Value;

use super::AppState;
use crate::error::ApiError;

/// `GET /v1/projections`: each projection's generation, state, events, dead letters and
/// checkpoints (lag needs the broker: `projector status` reports it).
pub(super) async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let status = projector::status::read(&state.pool, None)
        .await
        .map_err(|e| match e.downcast::<sqlx::Error>() {
            Ok(db) => ApiError::from(db),
            Err(other) => ApiError::internal("reading the projections' status", &other),
        })?;
    Ok(Json(serde_json::json!({ "projections": status })))
}
