//! `projector run`'s small HTTP listener (`KEEL_PROJECTOR_ADDR`): `/metrics` for
//! Prometheus, `/healthz` and `/readyz` for orchestrators' probes. It serves nothing else:
//! the projector's work is driven by the log and PostgreSQL, not by requests.
//!
//! `/metrics` is open, like the probes, unless `KEEL_METRICS_ROLE` names the role a token
//! needs; then the listener reads the same authentication settings as the APIs
//! (`KEEL_AUTH_*`) and serves over TLS when `KEEL_TLS_CERT` and `KEEL_TLS_KEY` are set.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Json, Response};
use axum::routing::get;
use keel_telemetry::metrics::Metrics;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::metrics::{ProjectorMetrics, StatusSnapshot};

/// The default address: loopback, beside the command API (8080) and the query API (8081).
pub const DEFAULT_ADDR: &str = "127.0.0.1:8082";

/// What the listener answers from. It serves from the moment it binds, before the
/// projections run: `/readyz` says not ready, and `/metrics` has no status, until
/// [`Observed::started`].
#[derive(Clone)]
pub struct Observed {
    /// The database and this process's id in the projector group, once the runners run.
    running: Arc<OnceLock<(PgPool, Uuid)>>,
    snapshot: StatusSnapshot,
    metrics: Arc<Metrics>,
}

impl Observed {
    /// The listener's state: its metrics are `applied` (which the runners count into), the
    /// projections' status, read on each scrape once the runners run, and, when `/metrics`
    /// is behind `edge`, its refusals.
    pub fn new(applied: &ProjectorMetrics, edge: Option<&keel_http::Edge>) -> Self {
        let mut metrics = Metrics::new();
        let snapshot = StatusSnapshot::default();
        let names: Vec<&str> = keel_views::PROJECTIONS.iter().map(|p| p.name).collect();
        applied.register(metrics.keel(), &names);
        snapshot.register(metrics.keel());
        if let Some(edge) = edge {
            edge.register_metrics(metrics.keel());
        }
        Self {
            running: Arc::default(),
            snapshot,
            metrics: metrics.shared(),
        }
    }

    /// The runners have started, as the process `process` of the group; `pool` (a small one
    /// of its own, beside the batches') reads the status and the heartbeat.
    pub fn started(&self, pool: PgPool, process: Uuid) {
        let _ = self.running.set((pool, process));
    }
}

/// The listener's routes. With `edge` (when `KEEL_METRICS_ROLE` is set), `/metrics` needs
/// that role's token.
pub fn router(observed: Observed, edge: Option<&keel_http::Edge>) -> Router {
    let scrape = Router::new()
        .route("/metrics", get(metrics))
        .with_state(observed.clone());
    let scrape = match edge {
        Some(edge) => edge.guarded_metrics(scrape),
        None => scrape,
    };
    Router::new()
        .merge(scrape)
        .route("/healthz", get(alive))
        .route("/readyz", get(ready))
        .fallback(|| async {
            keel_http::edge::problem(
                StatusCode::NOT_FOUND,
                "not-found",
                "no such resource: the projector serves /metrics, /healthz and /readyz",
            )
        })
        .with_state(observed)
}

/// Binds `addr`, failing with the address in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding KEEL_PROJECTOR_ADDR {addr}"))
}

/// Serves `router` on `listener` until `shutdown`: plain HTTP, or through the APIs' edge
/// (its TLS and timeouts) when `edge` is set.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    edge: Option<&keel_http::EdgeSettings>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    match edge {
        Some(settings) => keel_http::serve(listener, router, settings, shutdown).await,
        None => axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving the projector's HTTP listener"),
    }
}

/// `GET /metrics`: this process's counters and every projection's status, read now.
async fn metrics(State(observed): State<Observed>) -> Response {
    let text = match observed.running.get() {
        Some((pool, _)) => {
            observed
                .snapshot
                .scrape(pool, || observed.metrics.encode())
                .await
        }
        None => observed.metrics.encode(),
    };
    keel_http::metrics::exposition(text)
}

/// `GET /healthz`: the process is alive.
async fn alive() -> Json<serde_json::Value> {
    Json(json!({"status": "alive"}))
}

/// `GET /readyz`: 200 once the runners have started, the database answers and this
/// process's heartbeat in the group is current; with the units of work it holds.
async fn ready(State(observed): State<Observed>) -> (StatusCode, Json<serde_json::Value>) {
    let not_ready = |reason: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reason": reason})),
        )
    };
    let Some((pool, process)) = observed.running.get() else {
        return not_ready("the projections are starting");
    };
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_as::<_, (bool, i64)>(
            "SELECT p.expires_at > now(),
                    (SELECT count(*) FROM keel_units u WHERE u.holder = p.id)
             FROM keel_projector_processes p WHERE p.id = $1",
        )
        .bind(process)
        .fetch_optional(pool),
    )
    .await;
    match read {
        Ok(Ok(Some((true, units)))) => (
            StatusCode::OK,
            Json(json!({"status": "ready", "process": process, "units": units})),
        ),
        Ok(Ok(_)) => not_ready("this process's heartbeat in the projector group is not current"),
        Ok(Err(_)) | Err(_) => not_ready("the database is not reachable"),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get(router: &Router, path: &str) -> (StatusCode, String) {
        let response = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// Alive from the start; ready only once the runners run and this process's heartbeat
    /// is current; `/metrics` counts the batches applied and shows each projection's status
    /// as the database holds it.
    #[tokio::test]
    async fn the_listener_probes_and_exports_what_the_projector_does() {
        let (_db, pool) = crate::testing::database("http").await;
        let applied = ProjectorMetrics::default();
        let observed = Observed::new(&applied, None);
        let router = router(observed.clone(), None);

        assert_eq!(get(&router, "/healthz").await.0, StatusCode::OK);
        let (status, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("starting"), "{body}");
        let (status, text) = get(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.lines().any(|l| l
                == r#"keel_projection_events_applied_total{projection="orders",mode="live"} 0"#),
            "{text}"
        );
        assert!(!text.contains("keel_projection_generation{"), "{text}");

        let process = Uuid::new_v4();
        observed.started(pool.clone(), process);
        let (status, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("heartbeat"), "{body}");
        sqlx::query(
            "INSERT INTO keel_projector_processes (id, name, projections, expires_at)
             VALUES ($1, 'test', ARRAY['orders'], now() + interval '1 minute')",
        )
        .bind(process)
        .execute(&pool)
        .await
        .unwrap();
        let (status, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::OK, "{body}");

        sqlx::query(
            "INSERT INTO keel_projections (name, generation, code_version) VALUES ('orders', 3, 1)",
        )
        .execute(&pool)
        .await
        .unwrap();
        applied.batch("orders", false, 7, Duration::from_millis(12));
        applied.batch("orders", true, 2, Duration::from_millis(3));
        let (_, text) = get(&router, "/metrics").await;
        for line in [
            r#"keel_projection_events_applied_total{projection="orders",mode="live"} 7"#,
            r#"keel_projection_events_applied_total{projection="orders",mode="rebuild"} 2"#,
            r#"keel_projection_batches_total{projection="orders",mode="live"} 1"#,
            r#"keel_projection_batch_duration_seconds_count{projection="orders",mode="live"} 1"#,
            r#"keel_projection_generation{projection="orders"} 3"#,
            r#"keel_projection_running{projection="orders"} 1"#,
            r#"keel_projection_rebuilding{projection="orders"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        assert!(text.contains("process_open_fds"), "{text}");

        let (status, body) = get(&router, "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("/metrics, /healthz and /readyz"), "{body}");
    }
}
