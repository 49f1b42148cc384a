//! Cross-origin reads for the operations console (served by the query API, from another
//! origin than the command API's): off unless `KEEL_CORS_ORIGINS` names origins, and then
//! only for those origins, only `GET` on the paths an API opens, and only the
//! `Authorization` header. Every other cross-origin request gets no CORS header, so the
//! browser keeps its answer from the page.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The origins allowed and the paths they may read.
#[derive(Clone, Debug)]
pub struct Cors {
    origins: Arc<[String]>,
    paths: Arc<[&'static str]>,
}

impl Cors {
    /// `origins` (checked by [`parse_origins`]) may `GET` `paths`.
    pub fn new(origins: &[String], paths: &[&'static str]) -> Self {
        Self {
            origins: origins.into(),
            paths: paths.into(),
        }
    }

    fn allowed<'h>(&self, headers: &'h HeaderMap, path: &str) -> Option<&'h HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let text = origin.to_str().ok()?;
        (self.paths.contains(&path) && self.origins.iter().any(|o| o == text)).then_some(origin)
    }
}

/// Middleware: answers an allowed origin's preflight (`OPTIONS` with
/// `Access-Control-Request-Method: GET`) with 204, and marks its `GET` answers readable.
pub async fn cors(State(cors): State<Cors>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let origin = cors.allowed(request.headers(), &path).cloned();
    let Some(origin) = origin else {
        let mut response = next.run(request).await;
        // Whether the answer is readable depends on the origin on these paths: a cache
        // must not serve one origin's answer to another.
        if !cors.origins.is_empty() && cors.paths.contains(&path.as_str()) {
            response
                .headers_mut()
                .append(header::VARY, HeaderValue::from_static("Origin"));
        }
        return response;
    };
    if request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let asks_get = request
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .is_some_and(|m| m == "GET");
        if !asks_get {
            return next.run(request).await;
        }
        let mut response = StatusCode::NO_CONTENT.into_response();
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        return response;
    }
    let get = request.method() == Method::GET;
    let mut response = next.run(request).await;
    if get {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// The origins of `KEEL_CORS_ORIGINS`: a comma-separated list of `scheme://host[:port]`
/// (http or https, no path, no `*`).
pub fn parse_origins(text: &str) -> anyhow::Result<Vec<String>> {
    text.split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|origin| {
            let rest = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            let valid = rest.is_some_and(|host| {
                !host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
            });
            anyhow::ensure!(
                valid,
                "KEEL_CORS_ORIGINS: {origin:?} is not an origin like https://console.example.com:8443 \
                 (scheme, host and port only; no path, no wildcard)"
            );
            // Browsers send scheme and host in lower case.
            Ok(origin.to_ascii_lowercase())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    fn router() -> Router {
        let cors = Cors::new(
            &["http://console.test:8081".to_owned()],
            &["/v1/partitions"],
        );
        Router::new()
            .route("/v1/partitions", get(|| async { "partitions" }))
            .route("/v1/other", get(|| async { "other" }))
            .layer(axum::middleware::from_fn_with_state(cors, self::cors))
    }

    async fn send(method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        router()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn only_configured_origins_may_read_only_the_opened_paths() {
        let allowed = [("origin", "http://console.test:8081")];
        let r = send("GET", "/v1/partitions", &allowed).await;
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "http://console.test:8081"
        );
        let preflight = send(
            "OPTIONS",
            "/v1/partitions",
            &[
                allowed[0],
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "authorization"),
            ],
        )
        .await;
        assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            preflight.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization"
        );
        for (method, path, origin) in [
            ("GET", "/v1/partitions", "http://evil.test"),
            ("GET", "/v1/other", "http://console.test:8081"),
            ("GET", "/v1/partitions", "http://console.test:8082"),
        ] {
            let r = send(method, path, &[("origin", origin)]).await;
            assert!(
                !r.headers()
                    .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
                "{method} {path} from {origin}"
            );
        }
        // Every answer on an opened path varies by origin, readable or not (and without
        // one), so that no cache hands one origin's answer to another.
        for headers in [&allowed[..], &[("origin", "http://evil.test")], &[]] {
            let r = send("GET", "/v1/partitions", headers).await;
            assert_eq!(r.headers()[header::VARY], "Origin", "{headers:?}");
        }
        let post = send(
            "OPTIONS",
            "/v1/partitions",
            &[allowed[0], ("access-control-request-method", "POST")],
        )
        .await;
        assert!(
            !post
                .headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
    }

    #[test]
    fn origins_are_scheme_host_and_port() {
        assert_eq!(
            parse_origins(" http://a.test:1, https://B.Test ").unwrap(),
            ["http://a.test:1", "https://b.test"]
        );
        assert!(parse_origins("").unwrap().is_empty());
        for bad in ["*", "a.test", "http://a.test/", "ftp://a.test", "http://"] {
            assert!(parse_origins(bad).is_err(), "{bad}");
        }
    }
}
