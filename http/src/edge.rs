//! The middleware in front of every `/v1` route: authentication, roles, per-subject rate
//! limits, a cap on requests in flight and an end-to-end timeout. Every refusal is an
//! RFC 9457 problem document; none carries internals.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tracing::warn;

use crate::auth::{AuthError, Principal, Role, Verifier};
use crate::metrics::EdgeMetrics;
use crate::settings::EdgeSettings;

/// Longest `Authorization` header read; longer ones are refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// How often the token key file is checked for changes.
pub const KEY_RELOAD_EVERY: Duration = Duration::from_secs(1);
/// Refused tokens allowed per client address and second, and at once: enough for any
/// honest client, too few to make a key file of many keys a CPU sink.
const FAILURES_PER_SEC: f64 = 20.0;
const FAILURE_BURST: f64 = 100.0;
/// The realm named in `WWW-Authenticate`.
const REALM: &str = "keel";

/// The guard shared by an API's routes. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Edge {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    verifier: Option<Arc<Verifier>>,
    limiter: Option<RateLimiter>,
    /// Refused tokens per client address: past the allowance, `429` before any check.
    failures: RateLimiter,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    timeout: Duration,
    /// The role `/metrics` needs, if any.
    metrics_role: Option<Role>,
    metrics: EdgeMetrics,
    /// The origins whose pages may read the routes opened to other origins.
    cors_origins: Vec<String>,
}

impl Edge {
    /// The guard for `settings`. Reads the token keys now, and re-reads a key file when it
    /// changes (call within a Tokio runtime). With authentication off, logs a warning.
    pub fn new(settings: &EdgeSettings, service: &str) -> anyhow::Result<Self> {
        let verifier = match &settings.auth {
            Some(auth) => {
                let verifier = Arc::new(Verifier::new(auth.clone())?);
                if matches!(auth.keys, crate::auth::KeySource::PublicKeyFile(_)) {
                    verifier.spawn_reloader(KEY_RELOAD_EVERY);
                }
                Some(verifier)
            }
            None => {
                warn!(
                    service,
                    "AUTHENTICATION IS OFF (KEEL_AUTH=off): anyone who reaches this port may \
                     use every route, and commits are recorded as actor \"anonymous\""
                );
                None
            }
        };
        let limiter = (settings.rate_per_sec > 0.0)
            .then(|| RateLimiter::new(settings.rate_per_sec, settings.burst));
        Ok(Self {
            inner: Arc::new(Inner {
                verifier,
                limiter,
                failures: RateLimiter::new(FAILURES_PER_SEC, FAILURE_BURST),
                in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
                max_in_flight: settings.max_in_flight,
                timeout: settings.timeout,
                metrics_role: settings.metrics_role,
                metrics: EdgeMetrics::default(),
                cors_origins: settings.cors_origins.clone(),
            }),
        })
    }

    /// `router`'s routes, each open only to tokens holding `role`. The handlers find the
    /// caller as an `Extension<Principal>`.
    pub fn guard<S: Clone + Send + Sync + 'static>(
        &self,
        router: Router<S>,
        role: Role,
    ) -> Router<S> {
        router.route_layer(middleware::from_fn_with_state(
            (self.clone(), role),
            authorize,
        ))
    }

    /// Registers the edge's refusals (authentication failures, requests a limit turned
    /// away) in `registry`, the process's `keel_` registry.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(registry);
    }

    /// `GET /metrics`, serving `metrics`: open, or behind `KEEL_METRICS_ROLE` (and then
    /// limited like the `/v1` routes).
    pub fn metrics_route<S: Clone + Send + Sync + 'static>(
        &self,
        metrics: Arc<keel_telemetry::metrics::Metrics>,
    ) -> Router<S> {
        self.guarded_metrics(
            Router::new()
                .route("/metrics", axum::routing::get(crate::metrics::serve))
                .with_state(metrics),
        )
    }

    /// `route` (a `/metrics` of its own) behind `KEEL_METRICS_ROLE` and limited like the
    /// `/v1` routes when a role is named; as it is otherwise.
    pub fn guarded_metrics<S: Clone + Send + Sync + 'static>(&self, route: Router<S>) -> Router<S> {
        match self.inner.metrics_role {
            Some(role) => self.limit(self.guard(route, role)),
            None => route,
        }
    }

    /// `router`, whose `GET` answers at `paths` the pages of the origins `KEEL_CORS_ORIGINS`
    /// names may read (preflights answered before any other layer); as it is when it names
    /// none.
    pub fn cross_origin(&self, router: Router, paths: &[&'static str]) -> Router {
        if self.inner.cors_origins.is_empty() {
            return router;
        }
        router.layer(middleware::from_fn_with_state(
            crate::cors::Cors::new(&self.inner.cors_origins, paths),
            crate::cors::cors,
        ))
    }

    /// `router` with the cap on requests in flight and the timeout.
    pub fn limit<S: Clone + Send + Sync + 'static>(&self, router: Router<S>) -> Router<S> {
        router.layer(middleware::from_fn_with_state(self.clone(), limits))
    }
}

async fn authorize(
    State((edge, role)): State<(Edge, Role)>,
    mut request: Request,
    next: Next,
) -> Response {
    let principal = match &edge.inner.verifier {
        None => Principal::anonymous(),
        Some(verifier) => match bearer(request.headers()).and_then(|t| verifier.verify(t)) {
            Ok(principal) => principal,
            Err(e) => {
                // The peer address, when the server provides it (not in in-process tests).
                let peer = request
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.ip().to_string());
                if let Some(peer) = peer
                    && let Err(wait) = edge.inner.failures.check(&peer)
                {
                    edge.inner.metrics.limited("refused_tokens");
                    return too_many_requests(wait, "this address sent too many refused tokens");
                }
                edge.inner.metrics.auth_failed(e.reason());
                return unauthorized(&e);
            }
        },
    };
    if let Some(limiter) = &edge.inner.limiter
        && let Err(wait) = limiter.check(&principal.subject)
    {
        edge.inner.metrics.limited("subject");
        return too_many_requests(
            wait,
            "this token's subject sends more requests than allowed",
        );
    }
    if !principal.has(role) {
        edge.inner.metrics.auth_failed("forbidden");
        return forbidden(role);
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

async fn limits(State(edge): State<Edge>, request: Request, next: Next) -> Response {
    let Ok(_permit) = Arc::clone(&edge.inner.in_flight).try_acquire_owned() else {
        edge.inner.metrics.limited("in_flight");
        let mut response = problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            &format!(
                "{} requests are in flight, the most this instance serves at once; retry shortly",
                edge.inner.max_in_flight
            ),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
        return response;
    };
    match tokio::time::timeout(edge.inner.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                &format!(
                    "the request took longer than {} ms and was stopped; a command may still \
                     take effect: retry with the same Idempotency-Key",
                    edge.inner.timeout.as_millis()
                ),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
            response
        }
    }
}

/// Longest plain-text rejection carried over into a problem's detail.
const MAX_DETAIL_BYTES: usize = 1024;

/// Middleware: every error answer as problem+json. The rejections axum makes itself (an
/// undecodable path segment, a malformed query string…) are plain text otherwise.
pub async fn problem_answers(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == keel_schemas::PROBLEM_JSON.as_bytes());
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_DETAIL_BYTES)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .filter(|t| !t.trim().is_empty() && status.is_client_error())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_lowercase());
    let slug = match status {
        StatusCode::BAD_REQUEST => "bad-request",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid-fields",
        _ => "error",
    };
    let mut answer = problem(status, slug, &text);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name, value.clone());
        }
    }
    answer
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AuthError::Missing);
    };
    if values.next().is_some() {
        return Err(AuthError::Invalid(
            "send one Authorization header, not several".into(),
        ));
    }
    if value.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Invalid(format!(
            "the Authorization header is longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::Invalid("the Authorization header must be visible ASCII".into()))?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Invalid(
            "use the Bearer scheme: Authorization: Bearer <JWT>".into(),
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Invalid("the bearer token is empty".into()));
    }
    Ok(token)
}

/// A problem+json response: `type` `/problems/<slug>`, the status's reason as `title`.
pub fn problem(status: StatusCode, slug: &str, detail: &str) -> Response {
    let body = keel_schemas::problem(
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error"),
        slug,
        detail,
    );
    problem_response(status, body)
}

/// `body`, a problem document, as an `application/problem+json` response.
pub fn problem_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(keel_schemas::PROBLEM_JSON),
    );
    response
}

/// A value safe inside a quoted `WWW-Authenticate` parameter.
fn quoted(text: &str) -> String {
    text.chars()
        .filter(|c| (' '..='~').contains(c) && *c != '"' && *c != '\\')
        .collect()
}

fn unauthorized(e: &AuthError) -> Response {
    let challenge = match e {
        AuthError::Missing => format!("Bearer realm=\"{REALM}\""),
        AuthError::Invalid(reason) => format!(
            "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{}\"",
            quoted(reason)
        ),
    };
    let mut response = problem(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

fn forbidden(role: Role) -> Response {
    let mut response = problem(
        StatusCode::FORBIDDEN,
        "forbidden",
        &format!("this route needs the role {role}, which the token does not hold"),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_str(&format!(
            "Bearer realm=\"{REALM}\", error=\"insufficient_scope\", scope=\"{role}\""
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer")),
    );
    response
}

fn too_many_requests(wait: Duration, why: &str) -> Response {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = problem(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        &format!("{why}; retry in {secs} s"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// A token bucket per key: `rate` requests per second, up to `burst` at once.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_key: HashMap<String, Bucket>,
    swept: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept before the full ones are swept out, at most once a second.
const SWEEP_ABOVE: usize = 10_000;
/// Buckets kept at most: past this, all are dropped (every key starts full again).
const MAX_BUCKETS: usize = 100_000;

impl RateLimiter {
    /// A limiter of `rate` per second with bursts of `burst`.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate: if rate.is_finite() && rate > 0.0 {
                rate
            } else {
                1.0
            },
            burst: if burst.is_finite() {
                burst.max(1.0)
            } else {
                1.0
            },
            buckets: Mutex::new(Buckets::default()),
        }
    }

    /// Takes one request for `key`, or says how long until one is allowed.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let Buckets { by_key, swept } = &mut *buckets;
        if by_key.len() >= SWEEP_ABOVE
            && !by_key.contains_key(key)
            && swept.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            // A bucket idle long enough to be full again holds nothing worth keeping.
            let full_after =
                Duration::try_from_secs_f64(self.burst / self.rate).unwrap_or(Duration::MAX);
            by_key.retain(|_, b| now.duration_since(b.at) < full_after);
            *swept = Some(now);
            if by_key.len() >= MAX_BUCKETS {
                by_key.clear();
            }
        }
        // A known key is looked up without allocating its name again.
        if !by_key.contains_key(key) {
            by_key.insert(
                key.to_owned(),
                Bucket {
                    tokens: self.burst,
                    at: now,
                },
            );
        }
        let Some(bucket) = by_key.get_mut(key) else {
            return Ok(());
        };
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(
                Duration::try_from_secs_f64((1.0 - bucket.tokens) / self.rate)
                    .unwrap_or(Duration::from_secs(1)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = RateLimiter::new(2.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at("a", t0).is_ok());
        }
        let wait = limiter.check_at("a", t0).unwrap_err();
        assert!(wait <= Duration::from_millis(500) && wait > Duration::ZERO);
        // Another subject has its own bucket.
        assert!(limiter.check_at("b", t0).is_ok());
        // Half a second later, one more.
        let t1 = t0 + Duration::from_millis(500);
        assert!(limiter.check_at("a", t1).is_ok());
        assert!(limiter.check_at("a", t1).is_err());
    }

    #[test]
    fn idle_buckets_are_swept() {
        let limiter = RateLimiter::new(1000.0, 1.0);
        let t0 = Instant::now();
        for i in 0..SWEEP_ABOVE {
            assert!(limiter.check_at(&i.to_string(), t0).is_ok());
        }
        assert!(
            limiter
                .check_at("late", t0 + Duration::from_secs(1))
                .is_ok()
        );
        assert_eq!(limiter.buckets.lock().unwrap().by_key.len(), 1);
    }

    #[cfg(feature = "testing")]
    /// With `KEEL_METRICS_ROLE`, `/metrics` answers only tokens holding that role, and
    /// every refusal is counted by its reason, in the scrape the role can read.
    #[tokio::test]
    async fn a_metrics_role_guards_the_scrape_and_refusals_are_counted() {
        use crate::auth::{AuthSettings, KeySource, sign_hs256};
        use crate::testing::{claims, token};
        use tower::ServiceExt;

        let secret = b"a-secret-of-at-least-thirty-two-bytes!!";
        let settings = EdgeSettings {
            auth: Some(AuthSettings {
                keys: KeySource::Hs256(secret.to_vec()),
                issuer: "keel".into(),
                audience: "keel".into(),
                leeway: Duration::ZERO,
            }),
            rate_per_sec: 0.0,
            burst: 0.0,
            max_in_flight: 8,
            timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(5),
            tls: None,
            metrics_role: Some(Role::Admin),
            cors_origins: Vec::new(),
        };
        let edge = Edge::new(&settings, "test").unwrap();
        let mut metrics = keel_telemetry::metrics::Metrics::new();
        edge.register_metrics(metrics.keel());
        let router: Router = edge.metrics_route(metrics.shared());
        let scrape = |bearer: Option<String>| {
            let router = router.clone();
            async move {
                let mut request = Request::get("/metrics");
                if let Some(t) = bearer {
                    request = request.header("authorization", format!("Bearer {t}"));
                }
                let response = router
                    .oneshot(request.body(axum::body::Body::empty()).unwrap())
                    .await
                    .unwrap();
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .unwrap();
                (status, String::from_utf8(body.to_vec()).unwrap())
            }
        };
        let mut expired = claims("ops", &[Role::Admin]);
        expired.exp = expired.iat - 60;
        let expired = sign_hs256(secret, &expired).unwrap();
        assert_eq!(scrape(None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(scrape(Some(expired)).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            scrape(Some("not.a.token".into())).await.0,
            StatusCode::UNAUTHORIZED
        );
        let reader = token(secret, "ops", &[Role::QueriesRead]);
        assert_eq!(scrape(Some(reader)).await.0, StatusCode::FORBIDDEN);
        let (status, text) = scrape(Some(token(secret, "ops", &[Role::Admin]))).await;
        assert_eq!(status, StatusCode::OK);
        for reason in ["missing", "expired", "invalid", "forbidden"] {
            let line = format!("keel_auth_failures_total{{reason=\"{reason}\"}} 1");
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
    }

    #[test]
    fn bearer_tokens_are_read_strictly() {
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(bearer(&headers("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer(&HeaderMap::new()), Err(AuthError::Missing));
        assert!(bearer(&headers("Basic dXNlcjpwYXNz")).is_err());
        assert!(bearer(&headers("Bearer")).is_err());
        assert!(bearer(&headers(&format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES)))).is_err());
    }
}
