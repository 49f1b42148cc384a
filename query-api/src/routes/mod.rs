//! The HTTP routes.

mod audit;
mod health;
pub mod openapi;
mod projections;
mod views;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel_http::{Edge, Role};
use keel_schemas::{CONSISTENCY_TOKEN_HEADER, ConsistencyToken};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::consistency::{self, DEFAULT_WAIT, MAX_WAIT};
use crate::error::ApiError;

/// Header: how long to wait for a consistency token, in milliseconds (default 5000, max 30000).
pub const CONSISTENCY_TIMEOUT_HEADER: &str = "keel-consistency-timeout";
/// Header: where the serving view has read to, as a consistency token.
pub const PROJECTION_POSITION_HEADER: &str = "keel-projection-position";
/// Default page size.
pub const DEFAULT_LIMIT: i64 = 50;
/// Largest page size; larger requests are capped.
pub const MAX_LIMIT: i64 = 500;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The database of the views.
    pub pool: PgPool,
    /// Ticks when the projector commits a batch.
    pub changes: watch::Receiver<u64>,
    /// The stream types each projection reads.
    pub projections: Arc<HashMap<&'static str, &'static [&'static str]>>,
    /// Checkpoints as last read, until the projector commits again.
    pub checkpoints: consistency::CheckpointCache,
}

impl AppState {
    /// State over `pool`, listening for the projector's notifications.
    pub fn new(pool: PgPool) -> Self {
        let changes = consistency::spawn_listener(pool.clone());
        let projections = keel_views::PROJECTIONS
            .iter()
            .map(|p| (p.name, p.stream_types))
            .collect();
        Self {
            pool,
            changes,
            projections: Arc::new(projections),
            checkpoints: consistency::CheckpointCache::default(),
        }
    }
}

/// The query API's routes: `/v1` behind `edge`, each group open to one role (views
/// `queries:read`, the audit trail `audit:read`, projection status `admin`); health,
/// readiness and the OpenAPI document open.
pub fn app(state: AppState, edge: &Edge) -> Router {
    let views = Router::new()
        .route("/v1/orders", get(views::list_orders))
        .route("/v1/orders/{id}", get(views::order))
        .route("/v1/products", get(views::list_products))
        .route("/v1/products/{sku}", get(views::product))
        .route("/v1/customers/{id}", get(views::customer))
        .route("/v1/reports/daily-sales", get(views::daily_sales))
        .route("/v1/reports/flagged-payments", get(views::flagged_payments));
    let audit = Router::new()
        .route("/v1/audit/streams/{type}/{id}", get(audit::stream_history))
        .route(
            "/v1/audit/streams/{type}/{id}/state",
            get(audit::stream_state),
        )
        .route("/v1/audit/events", get(audit::search));
    let admin = Router::new().route("/v1/projections", get(projections::list));
    let guarded = edge
        .guard(views, Role::QueriesRead)
        .merge(edge.guard(audit, Role::AuditRead))
        .merge(edge.guard(admin, Role::Admin));
    Router::new()
        .merge(edge.limit(guarded))
        .route("/healthz", get(health::alive))
        .route("/readyz", get(health::ready))
        .route("/openapi.json", get(openapi::serve))
        .fallback(|| async { ApiError::NotFound("no such resource".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn(keel_http::edge::problem_answers))
        .with_state(state)
}

/// Reads the consistency headers of a request.
fn consistency(headers: &HeaderMap) -> Result<(Option<ConsistencyToken>, Duration), ApiError> {
    let text = |name: &str| -> Result<Option<&str>, ApiError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| ApiError::bad(name, format!("{name} must be visible ASCII")))
            })
            .transpose()
    };
    let token = text(CONSISTENCY_TOKEN_HEADER)?
        .map(|t| {
            t.parse::<ConsistencyToken>()
                .map_err(|e| ApiError::bad("Keel-Consistency-Token", e.to_string()))
        })
        .transpose()?;
    let wait = match text(CONSISTENCY_TIMEOUT_HEADER)? {
        None => DEFAULT_WAIT,
        Some(ms) => {
            let ms: u64 = ms.trim().parse().map_err(|_| {
                ApiError::bad(
                    "Keel-Consistency-Timeout",
                    "must be a number of milliseconds, at most 30000",
                )
            })?;
            Duration::from_millis(ms).min(MAX_WAIT)
        }
    };
    Ok((token, wait))
}

/// Serves a read of `projection`: waits for the request's consistency token, runs `query`,
/// and answers with an `ETag` (304 on a matching `If-None-Match`) and the view's position.
async fn serve<F, T>(
    state: &AppState,
    headers: &HeaderMap,
    projection: &str,
    query: F,
) -> Result<Response, ApiError>
where
    F: std::future::Future<Output = Result<T, ApiError>>,
    T: serde::Serialize,
{
    let (token, wait) = consistency(headers)?;
    let stream_types = state.projections.get(projection).copied().unwrap_or(&[]);
    let read = consistency::wait_for(
        &state.pool,
        &state.checkpoints,
        state.changes.clone(),
        projection,
        stream_types,
        token.as_ref(),
        wait,
    )
    .await?;
    let body = query.await?;
    let bytes =
        serde_json::to_vec(&body).map_err(|e| ApiError::internal("encoding a response", &e))?;
    let etag = format!("\"{}\"", &hex::encode(Sha256::digest(&bytes))[..32]);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim() == "*"
                || v.split(',')
                    .any(|t| t.trim().trim_start_matches("W/") == etag)
        });
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response()
    };
    let out = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        out.insert(header::ETAG, v);
    }
    if let Some(v) = consistency::position_token(&read).and_then(|t| HeaderValue::from_str(&t).ok())
    {
        out.insert(PROJECTION_POSITION_HEADER, v);
    }
    Ok(response)
}

/// Page size from `limit`: default 50, capped at 500, at least 1.
fn limit(limit: Option<&str>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(l) => match l.parse::<i64>() {
            Ok(n) if n >= 1 => Ok(n.min(MAX_LIMIT)),
            _ => Err(ApiError::bad(
                "limit",
                format!("must be a whole number from 1 to {MAX_LIMIT}"),
            )),
        },
    }
}

/// An opaque cursor: the sort key of the last row of a page.
fn encode_cursor(key: &[&str]) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(key).unwrap_or_default())
}

fn decode_cursor(cursor: Option<&str>, parts: usize) -> Result<Option<Vec<String>>, ApiError> {
    let Some(cursor) = cursor else {
        return Ok(None);
    };
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Vec<String>>(&bytes).ok())
        .filter(|key| key.len() == parts)
        .map(Some)
        .ok_or_else(|| ApiError::bad("cursor", "is not a cursor this API returned"))
}

/// A view row as the JSON text PostgreSQL made of it, passed through without parsing.
fn raw(json: String) -> Result<Box<serde_json::value::RawValue>, ApiError> {
    serde_json::value::RawValue::from_string(json)
        .map_err(|e| ApiError::internal("a view row is not JSON", &e))
}

/// A page of rows as PostgreSQL wrote their JSON, passed through without parsing.
#[derive(serde::Serialize)]
struct RawPage {
    items: Vec<Box<serde_json::value::RawValue>>,
    next_cursor: Option<String>,
    limit: i64,
}

/// A page of `(sort key, row JSON)` rows: `items`, and `next_cursor` when more rows may
/// follow (the query asks for `limit + 1`).
fn raw_page(mut rows: Vec<(Vec<String>, String)>, limit: i64) -> Result<RawPage, ApiError> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| {
            rows.last()
                .map(|(key, _)| encode_cursor(&key.iter().map(String::as_str).collect::<Vec<_>>()))
        })
        .flatten();
    let items = rows
        .into_iter()
        .map(|(_, json)| raw(json))
        .collect::<Result<_, _>>()?;
    Ok(RawPage {
        items,
        next_cursor,
        limit,
    })
}

/// A page of rows: `items`, and `next_cursor` when more rows may follow.
fn page(mut rows: Vec<Value>, limit: i64, key: impl Fn(&Value) -> Vec<String>) -> Value {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = more
        .then(|| {
            rows.last().map(|last| {
                let k = key(last);
                encode_cursor(&k.iter().map(String::as_str).collect::<Vec<_>>())
            })
        })
        .flatten();
    serde_json::json!({"items": rows, "next_cursor": next, "limit": limit})
}
