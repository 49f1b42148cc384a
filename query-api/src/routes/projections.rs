use axum::Json;
use axum::extract::State;
use serde_json::Value;

use super::AppState;
use crate::error::ApiError;

/// `GET /v1/projections`: each projection's generation, state, events, dead letters and
/// checkpoints (lag needs the broker: `projector status` reports it).
pub(super) async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let status = keel_views::status::read(&state.pool).await?;
    Ok(Json(serde_json::json!({ "projections": status })))
}
