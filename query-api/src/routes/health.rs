use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// `GET /healthz`: the process is alive.
pub(super) async fn alive() -> Json<Value> {
    Json(json!({"status": "alive"}))
}

/// `GET /readyz`: 200 when the database answers and the projector has created the views.
pub(super) async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let views: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM keel_projections")
        .fetch_one(&state.pool)
        .await;
    match views {
        Ok(n) if n > 0 => (
            StatusCode::OK,
            Json(json!({"status": "ready", "projections": n})),
        ),
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reason": "no projection has run yet"})),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "not ready", "reason": "the database is not reachable or not migrated"}),
            ),
        ),
    }
}
