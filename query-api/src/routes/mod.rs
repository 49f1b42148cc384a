//! The HTTP routes.

mod admin;
mod audit;
pub mod console;
mod health;
pub mod openapi;
mod projections;
mod views;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel_http::{Edge, Role};
use keel_schemas::{CONSISTENCY_TOKEN_HEADER, ConsistencyToken};
use keel_views::requests::{RebuildRequest, StreamRequest, VerifyRequest};
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
/// Header: how many parked streams the answer is served without (absent when none): the
/// stream read, or the streams a list or report leaves out; `GET /v1/projections` names them.
pub const HELD_BACK_HEADER: &str = "keel-held-back";
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
    /// The topics and partition counts the projector reads, as last read.
    pub topics: consistency::TopicCache,
    /// The latencies of the reads served in the current window (published for rebuild pacing).
    pub latencies: crate::latency::Latencies,
    /// What `/metrics` serves.
    pub telemetry: Telemetry,
    /// Where the console's page finds the command API.
    pub console: console::ConsoleSettings,
    /// Whether the fulfilment process's table is there to read orders' steps from.
    pub fulfilment: views::FulfilmentSeen,
}

/// The query API's metrics: consistency waits, HTTP requests, and, once
/// [`AppState::exporting`] has registered them with the edge's refusals and the process's
/// own, the registry `/metrics` serves.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    /// Consistency waits and their timeouts.
    pub queries: crate::metrics::QueryMetrics,
    /// Requests by route template, method and status.
    pub http: keel_http::metrics::HttpMetrics,
    /// Everything `/metrics` serves.
    pub exported: Option<Arc<keel_telemetry::metrics::Metrics>>,
}

impl AppState {
    /// State over `pool`, listening for the projector's notifications.
    pub fn new(pool: PgPool) -> Self {
        let changes = consistency::spawn_listener(pool.clone());
        let latencies = crate::latency::Latencies::default();
        crate::latency::spawn_publisher(pool.clone(), latencies.clone());
        let projections = keel_views::PROJECTIONS
            .iter()
            .map(|p| (p.name, p.stream_types))
            .collect();
        Self {
            pool,
            changes,
            projections: Arc::new(projections),
            checkpoints: consistency::CheckpointCache::default(),
            topics: consistency::TopicCache::default(),
            latencies,
            telemetry: Telemetry::default(),
            console: console::ConsoleSettings::default(),
            fulfilment: views::FulfilmentSeen::default(),
        }
    }

    /// The same state, its metrics registered for `/metrics`: the consistency waits', the
    /// HTTP requests', `edge`'s refusals, and the process's own.
    pub fn exporting(mut self, edge: &Edge) -> Self {
        let mut metrics = keel_telemetry::metrics::Metrics::new();
        let keel = metrics.keel();
        let projections: Vec<&str> = keel_views::PROJECTIONS.iter().map(|p| p.name).collect();
        self.telemetry.queries.register(keel, &projections);
        self.telemetry.http.register(keel);
        edge.register_metrics(keel);
        self.telemetry.exported = Some(metrics.shared());
        self
    }
}

/// The query API's routes: `/v1` behind `edge`, each group open to one role (views
/// `queries:read`, the audit trail `audit:read`, projection status and the requests for
/// rebuilds, retries, discards and verifications `admin`); health,
/// readiness, the OpenAPI document and the console's files open (the page signs in to
/// the `/v1` routes), and `/metrics` too unless `KEEL_METRICS_ROLE`
/// names a role (and when the state exports metrics). Every request is counted by route,
/// method and status.
pub fn app(state: AppState, edge: &Edge) -> Router {
    let metrics = match &state.telemetry.exported {
        Some(exported) => edge.metrics_route(Arc::clone(exported)),
        None => Router::new(),
    };
    let http = state.telemetry.http.clone();
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
    let admin = Router::new()
        .route("/v1/projections", get(projections::list))
        .route("/v1/projections/{name}/rebuild", post(admin::rebuild))
        .route(
            "/v1/projections/rebuild-requests/{request}",
            get(admin::requested::<RebuildRequest>),
        )
        .route(
            "/v1/projections/{name}/parked/{type}/{id}/retry",
            post(admin::retry),
        )
        .route(
            "/v1/projections/{name}/parked/{type}/{id}/discard",
            post(admin::discard),
        )
        .route(
            "/v1/projections/stream-requests/{request}",
            get(admin::requested::<StreamRequest>),
        )
        .route("/v1/audit/streams/{type}/{id}/verify", post(admin::verify))
        .route(
            "/v1/audit/verify-requests/{request}",
            get(admin::requested::<VerifyRequest>),
        )
        .layer(DefaultBodyLimit::max(admin::MAX_BODY));
    let guarded = edge
        .guard(views, Role::QueriesRead)
        .merge(edge.guard(audit, Role::AuditRead))
        .merge(edge.guard(admin, Role::Admin));
    Router::new()
        .merge(edge.limit(guarded))
        .merge(metrics)
        .route("/healthz", get(health::alive))
        .route("/readyz", get(health::ready))
        .route("/openapi.json", get(openapi::serve))
        .route("/console", get(console::page))
        .route("/console/", get(console::page))
        .route("/console/settings.json", get(console::settings))
        .route("/console/{*file}", get(console::file))
        .fallback(|| async { ApiError::NotFound("no such resource".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn(keel_http::edge::problem_answers))
        .layer(axum::middleware::from_fn_with_state(
            http,
            keel_http::metrics::track,
        ))
        .with_state(state)
}

/// Reads the consistency headers of a request. A query may carry the tokens of several
/// commands (read-your-writes across streams): the header repeated, or one header with
/// tokens separated by commas; it waits for all of them (their merge).
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
    // An empty header (or an empty item of the list) names no position: nothing to wait
    // for, as without the header.
    let mut token: Option<ConsistencyToken> = None;
    for value in headers.get_all(CONSISTENCY_TOKEN_HEADER) {
        let value = value.to_str().map_err(|_| {
            ApiError::bad(
                "Keel-Consistency-Token",
                "Keel-Consistency-Token must be visible ASCII",
            )
        })?;
        for item in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let parsed = item
                .parse::<ConsistencyToken>()
                .map_err(|e| ApiError::bad("Keel-Consistency-Token", e.to_string()))?;
            token = Some(match token {
                Some(t) => t.merge(&parsed),
                None => parsed,
            });
        }
    }
    let wait = match text(CONSISTENCY_TIMEOUT_HEADER)? {
        None => DEFAULT_WAIT,
        Some(ms) => {
            let ms = whole_number(ms).ok_or_else(|| {
                ApiError::bad(
                    "Keel-Consistency-Timeout",
                    "must be a whole number of milliseconds (longer than 30000 waits 30000)",
                )
            })?;
            Duration::from_millis(ms).min(MAX_WAIT)
        }
    };
    Ok((token, wait))
}

/// Serves a read of `projection` (of one `stream` of it, or of many): waits for the
/// request's consistency token, refuses (503) when a parked stream the read depends on
/// holds back a record the token covers, runs `query`, and answers with an `ETag` (304 on
/// a matching `If-None-Match`), the view's position, and `Keel-Held-Back` when parked
/// streams are held back from the answer.
async fn serve<F, T>(
    state: &AppState,
    headers: &HeaderMap,
    projection: &str,
    stream: Option<(&str, &str)>,
    query: F,
) -> Result<Response, ApiError>
where
    F: std::future::Future<Output = Result<T, ApiError>>,
    T: serde::Serialize,
{
    let (token, wait) = consistency(headers)?;
    if let Some(token) = &token {
        consistency::check_token(&state.pool, &state.topics, &state.changes, token).await?;
    }
    let stream_types = state.projections.get(projection).copied().unwrap_or(&[]);
    let read = consistency::wait_for(state, projection, stream_types, token.as_ref(), wait).await?;
    let held_back =
        consistency::check_held_back(&state.pool, &read, projection, stream, token.as_ref())
            .await?;
    // The read itself is timed (not the wait for a token), for the pacing of rebuilds.
    let started = std::time::Instant::now();
    let body = query.await?;
    let bytes =
        serde_json::to_vec(&body).map_err(|e| ApiError::internal("encoding a response", &e))?;
    state.latencies.record(started.elapsed());
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
    if held_back > 0 {
        out.insert(HELD_BACK_HEADER, HeaderValue::from(held_back));
    }
    Ok(response)
}

/// A whole number written in ASCII digits; one too large for a `u64` reads as `u64::MAX`
/// (every parameter read this way is capped or looked up, so a huge one is merely large).
fn whole_number(text: &str) -> Option<u64> {
    let digits = text.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(digits.parse().unwrap_or(u64::MAX))
}

/// `value`, when it is one of `allowed`; else a 400 naming `field` and the values allowed.
fn one_of(
    field: &str,
    value: Option<String>,
    allowed: &[&str],
) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if !allowed.contains(&v.as_str()) => Err(ApiError::bad(
            field,
            format!("must be one of {}", allowed.join(", ")),
        )),
        v => Ok(v),
    }
}

/// Page size from `limit`: default 50, at least 1; larger than 500 is served as 500.
fn limit(limit: Option<&str>) -> Result<i64, ApiError> {
    match limit.map(whole_number) {
        None => Ok(DEFAULT_LIMIT),
        Some(Some(n)) if n >= 1 => Ok(n.min(MAX_LIMIT as u64) as i64),
        Some(_) => Err(ApiError::bad(
            "limit",
            format!(
                "must be a whole number from 1 (larger than {MAX_LIMIT} is served as {MAX_LIMIT})"
            ),
        )),
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

/// The router over a database that is not there (every read fails fast: 503), behind an
/// edge configured by the variables `vars` gives; for the in-process tests.
#[cfg(test)]
pub(crate) fn router_without_database(vars: impl Fn(&str) -> Option<String>) -> Router {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("postgres://keel@127.0.0.1:1/none")
        .expect("a lazy pool");
    let settings = keel_http::EdgeSettings::from_vars(vars).expect("edge settings");
    let edge = Edge::new(&settings, "test").expect("an edge");
    app(AppState::new(pool).exporting(&edge), &edge)
}

/// A documented path template with a value in each parameter; for the in-process tests.
#[cfg(test)]
pub(crate) fn concrete(template: &str) -> String {
    template
        .replace("{type}", "order")
        .replace("{id}", "x-1")
        .replace("{sku}", "X-1")
        .replace("{name}", "orders")
        .replace("{request}", "1")
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    /// A parameter the document does not allow is a 400 naming it, decided before any
    /// database read (there is none behind this router); one it allows gets past the
    /// checks (to the missing database: 503).
    #[tokio::test]
    async fn parameters_are_checked_as_the_document_says() {
        let router = router_without_database(|n| (n == "KEEL_AUTH").then(|| "off".into()));
        let get = |uri: &str, header: Option<(&str, &str)>| {
            let mut request = Request::get(uri);
            if let Some((name, value)) = header {
                request = request.header(name, value);
            }
            router.clone().oneshot(request.body(Body::empty()).unwrap())
        };
        for (uri, header, field) in [
            ("/v1/orders?status=shiped", None, Some("status")),
            ("/v1/products?status=retired", None, Some("status")),
            (
                "/v1/reports/daily-sales?currency=eur",
                None,
                Some("currency"),
            ),
            ("/v1/orders?limit=0", None, Some("limit")),
            ("/v1/orders?limit=-1", None, Some("limit")),
            (
                "/v1/audit/streams/order/o-1/state?version=0",
                None,
                Some("version"),
            ),
            (
                "/v1/orders/o-1",
                Some(("keel-consistency-timeout", "-5")),
                Some("Keel-Consistency-Timeout"),
            ),
            (
                "/v1/orders/o-1",
                Some(("keel-consistency-token", "v2.x")),
                Some("Keel-Consistency-Token"),
            ),
            ("/v1/orders?status=shipped", None, None),
            ("/v1/products?status=discontinued", None, None),
            ("/v1/reports/daily-sales?currency=EUR", None, None),
            ("/v1/orders?limit=99999999999999999999999", None, None),
            (
                "/v1/audit/streams/order/o-1/state?version=99999999999999999999999",
                None,
                None,
            ),
            (
                "/v1/orders/o-1",
                Some(("keel-consistency-timeout", "99999999999999999999999")),
                None,
            ),
            ("/v1/orders/o-1", Some(("keel-consistency-token", "")), None),
        ] {
            let response = get(uri, header).await.unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            match field {
                Some(field) => {
                    assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {header:?}: {body}");
                    assert_eq!(body["field"], field, "{uri} {header:?}");
                }
                None => assert_eq!(
                    status,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "{uri} {header:?}: {body}"
                ),
            }
        }
    }

    /// `/metrics` needs no token (unless a role is named), and counts each request by its
    /// route template (never the id in the path), method and status, and each refused token
    /// by its reason.
    #[tokio::test]
    async fn metrics_are_open_and_count_requests_by_route_template() {
        let secret = "a-secret-of-at-least-thirty-two-bytes!!";
        let router =
            router_without_database(|n| (n == "KEEL_AUTH_HS256_SECRET").then(|| secret.into()));
        let send = |uri: &str, bearer: Option<String>| {
            let mut request = Request::get(uri);
            if let Some(t) = bearer {
                request = request.header("authorization", format!("Bearer {t}"));
            }
            router.clone().oneshot(request.body(Body::empty()).unwrap())
        };
        let reader = keel_http::testing::token(secret.as_bytes(), "r", &[Role::QueriesRead]);
        for id in ["o-1", "o-2", "o-3"] {
            let r = send(&format!("/v1/orders/{id}"), Some(reader.clone()))
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        let r = send("/v1/orders/o-1", None).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = send("/v1/projections", Some(reader)).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let r = send("/metrics", None).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        for line in [
            r#"keel_http_requests_total{route="/v1/orders/{id}",method="GET",status="503"} 3"#,
            r#"keel_http_requests_total{route="/v1/orders/{id}",method="GET",status="401"} 1"#,
            r#"keel_auth_failures_total{reason="missing"} 1"#,
            r#"keel_auth_failures_total{reason="forbidden"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        assert!(!text.contains("o-1"), "no id in a label: {text}");
        // Every projection's waits and timeouts from zero, before any wait.
        for p in keel_views::PROJECTIONS {
            let line = format!(
                r#"keel_consistency_wait_timeouts_total{{projection="{}"}} 0"#,
                p.name
            );
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        assert!(text.contains("process_open_fds"));
    }
}
