//! The HTTP metrics of both APIs: requests counted by route template, method and status,
//! with a histogram of their durations; and the edge's refusals (authentication failures
//! by reason, requests turned away by a limit). The labels are bounded: the route is the
//! template the request matched (`/v1/orders/{id}`, never the id), `unmatched` for a path
//! no route has, and a method outside the standard ones counts as `other`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The upper bounds of the request-duration buckets, in seconds: half a millisecond (a
/// read from memory) to ten seconds (past any deadline an API sets).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The labels of one series of requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: u16,
}

/// A histogram of request durations with [`DURATION_BUCKETS`].
fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The request metrics of one API. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
        }
    }
}

impl HttpMetrics {
    /// Registers `http_requests_total` and `http_request_duration_seconds` in `registry`
    /// (the process's `keel_` registry).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time from a request's arrival to its answer's headers, by route template, method and status",
            Unit::Seconds,
            self.durations.clone(),
        );
    }

    /// Counts `response` to a request of `route` and `method` that took from `started`.
    fn record(&self, route: String, method: &'static str, response: &Response, started: Instant) {
        let labels = RequestLabels {
            route,
            method,
            status: response.status().as_u16(),
        };
        self.durations
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.requests.get_or_create(&labels).inc();
    }
}

/// The label of an authentication failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The label of a request a limit turned away.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

/// The edge's refusals. Counted from the start; registered with [`EdgeMetrics::register`].
/// Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct EdgeMetrics {
    auth_failures: Family<ReasonLabels, Counter>,
    limited: Family<LimitLabels, Counter>,
}

impl EdgeMetrics {
    /// Registers `auth_failures_total` and `http_rate_limited_total` in `registry`, every
    /// reason and limit from zero (so a rate over them has data before the first refusal).
    pub fn register(&self, registry: &mut Registry) {
        for reason in ["missing", "expired", "invalid", "forbidden"] {
            let _ = self.auth_failures.get_or_create(&ReasonLabels { reason });
        }
        for limit in ["subject", "refused_tokens", "in_flight"] {
            let _ = self.limited.get_or_create(&LimitLabels { limit });
        }
        registry.register(
            "auth_failures",
            "Requests refused by authentication (401: missing, expired, invalid) or by \
             their token's roles (403: forbidden)",
            self.auth_failures.clone(),
        );
        registry.register(
            "http_rate_limited",
            "Requests turned away by a limit: the token subject's rate (subject), the \
             client address's refused tokens (refused_tokens), requests in flight (in_flight)",
            self.limited.clone(),
        );
    }

    /// Counts a request refused for `reason`.
    pub(crate) fn auth_failed(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a request turned away by `limit`.
    pub(crate) fn limited(&self, limit: &'static str) {
        let _ = self.limited.get_or_create(&LimitLabels { limit }).inc();
    }
}

/// `GET /metrics`: `metrics` in the Prometheus text format.
pub async fn serve(
    State(metrics): State<std::sync::Arc<keel_telemetry::metrics::Metrics>>,
) -> Response {
    exposition(metrics.encode())
}

/// `text`, an encoded scrape, as the answer to `GET /metrics`.
pub fn exposition(text: String) -> Response {
    use axum::response::IntoResponse;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            keel_telemetry::metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response()
}

/// A method's label: the standard methods by name, any other as `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The middleware that records every request: add it with
/// `router.layer(axum::middleware::from_fn_with_state(metrics, track))`, which runs it
/// after routing, where the matched template is known. When traces are exported, the
/// request is also a server span (`POST /v1/orders/{id}/{command}`), the child of the
/// caller's `traceparent` when it sent one.
pub async fn track(State(metrics): State<HttpMetrics>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    // The API's routes are traced; probes and scrapes are not.
    let response = if keel_telemetry::trace::enabled() && route.starts_with("/v1/") {
        traced(&route, method, started, request, next).await
    } else {
        let response = next.run(request).await;
        access(&route, method, response.status().as_u16(), started);
        response
    };
    metrics.record(route, method, &response, started);
    response
}

/// The access log line of a request, at `debug` under the target `keel_http::access`
/// (`RUST_LOG=info,keel_http::access=debug` writes them).
fn access(route: &str, method: &'static str, status: u16, started: Instant) {
    tracing::debug!(
        target: "keel_http::access",
        route,
        method,
        status,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "answered"
    );
}

/// Runs `request` inside its server span.
async fn traced(
    route: &str,
    method: &'static str,
    started: Instant,
    request: Request,
    next: Next,
) -> Response {
    use tracing::Instrument as _;
    use tracing::field::Empty;

    let span = tracing::info_span!(
        target: "keel_trace",
        "http.request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method,
        http.route = route,
        http.response.status_code = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    let traceparent = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    keel_telemetry::trace::adopt(&span, traceparent);
    let context = keel_telemetry::trace::context_of(&span);
    let response =
        keel_telemetry::trace::in_request(context, next.run(request).instrument(span.clone()))
            .await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    span.in_scope(|| access(route, method, status.as_u16(), started));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use axum::Router;
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    /// Sends `method` `uri` through `app`; the status.
    async fn send(app: &Router, method: &str, uri: &str) -> StatusCode {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        app.clone().oneshot(request).await.unwrap().status()
    }

    /// The sample of `series` in `text`, or 0 when it has none.
    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.parse().unwrap())
    }

    /// Requests are counted by the route they matched, never by their path: a thousand
    /// ids make one series, and paths no route has make one more.
    #[tokio::test]
    async fn requests_are_counted_by_route_template_method_and_status() {
        let mut registry = Registry::with_prefix("keel");
        let metrics = HttpMetrics::default();
        metrics.register(&mut registry);
        let app = Router::new()
            .route("/v1/orders/{id}", get(|| async { "an order" }))
            .route(
                "/v1/teapot",
                get(|| async { (StatusCode::IM_A_TEAPOT, "no") }),
            )
            .layer(axum::middleware::from_fn_with_state(metrics, track));

        for i in 0..1000 {
            assert_eq!(
                send(&app, "GET", &format!("/v1/orders/o-{i}")).await,
                StatusCode::OK
            );
        }
        assert_eq!(
            send(&app, "GET", "/v1/teapot").await,
            StatusCode::IM_A_TEAPOT
        );
        for path in ["/nowhere", "/v1/orders/o-1/extra", "/.env"] {
            assert_eq!(send(&app, "GET", path).await, StatusCode::NOT_FOUND);
        }
        assert_eq!(
            send(&app, "POST", "/v1/orders/o-1").await,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            send(&app, "BREW", "/v1/teapot").await,
            StatusCode::METHOD_NOT_ALLOWED
        );

        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let count = |labels: &str| value(&text, &format!("keel_http_requests_total{{{labels}}}"));
        assert_eq!(
            count(r#"route="/v1/orders/{id}",method="GET",status="200""#),
            1000.0,
            "{text}"
        );
        assert_eq!(
            count(r#"route="/v1/teapot",method="GET",status="418""#),
            1.0
        );
        assert_eq!(
            count(r#"route="/v1/orders/{id}",method="POST",status="405""#),
            1.0
        );
        assert_eq!(
            count(r#"route="/v1/teapot",method="other",status="405""#),
            1.0
        );
        // The fallback of paths no route has: one series for all of them.
        assert_eq!(count(r#"route="unmatched",method="GET",status="404""#), 3.0);
        let series = text
            .lines()
            .filter(|l| l.starts_with("keel_http_requests_total{"))
            .count();
        assert_eq!(series, 5, "a series per route, method and status:\n{text}");
        assert_eq!(
            value(
                &text,
                r#"keel_http_request_duration_seconds_count{route="/v1/orders/{id}",method="GET",status="200"}"#
            ),
            1000.0
        );
        assert!(text.contains("# TYPE keel_http_request_duration_seconds histogram"));
        assert!(text.contains(r#"le="0.0005""#) && text.contains(r#"le="+Inf""#));
    }
}
