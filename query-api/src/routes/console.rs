//! The operations console at `/console`: plain HTML, CSS and ES modules built into the
//! binary, no build step. The page calls the public APIs only, with the bearer token its
//! tab signed in with: the views, the audit trail, the projections and the admin requests
//! here, the partitions and command counts on the command API (`KEEL_CONSOLE_COMMAND_API`,
//! which must allow this origin in its `KEEL_CORS_ORIGINS`).
//!
//! Event payloads are written by clients, so the page treats them as hostile: it builds
//! text nodes, never markup, and every answer here carries a Content-Security-Policy that
//! allows scripts and styles from this origin only.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::error::ApiError;

/// The console's files: path under `/console/`, media type, contents.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../console/index.html"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("../../console/console.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("../../console/favicon.svg"),
    ),
    (
        "js/main.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/js/main.js"),
    ),
    (
        "js/api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/js/api.js"),
    ),
    (
        "js/dom.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/js/dom.js"),
    ),
    (
        "js/chart.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/js/chart.js"),
    ),
    (
        "js/guard.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/js/guard.js"),
    ),
    (
        "js/projections.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/js/projections.js"),
    ),
    (
        "js/writepath.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/js/writepath.js"),
    ),
    (
        "js/audit.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/js/audit.js"),
    ),
    (
        "js/data.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/js/data.js"),
    ),
];

/// Where the console's page finds the command API, as a browser reaches it.
#[derive(Clone, Debug, Default)]
pub struct ConsoleSettings {
    /// The command API's origin (`scheme://host[:port]`), if the page may call it.
    pub command_api: Option<String>,
}

impl ConsoleSettings {
    /// The settings of `KEEL_CONSOLE_COMMAND_API` (`None` or empty: the write path panel
    /// says how to set it).
    pub fn new(command_api: Option<&str>) -> anyhow::Result<Self> {
        let command_api = match command_api.map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(text) => {
                let origin = text.trim_end_matches('/');
                let wrong = || {
                    anyhow::anyhow!(
                        "KEEL_CONSOLE_COMMAND_API {text:?} is not the command API's origin, like http://127.0.0.1:8080"
                    )
                };
                let mut origins = keel_http::cors::parse_origins(origin).map_err(|_| wrong())?;
                anyhow::ensure!(origins.len() == 1, wrong());
                origins.pop()
            }
        };
        Ok(Self { command_api })
    }

    /// The Content-Security-Policy of every console answer: everything from this origin
    /// only, and calls to the command API's origin too.
    fn policy(&self) -> String {
        let connect = match &self.command_api {
            Some(origin) => format!("'self' {origin}"),
            None => "'self'".to_owned(),
        };
        format!(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    }
}

fn answer(settings: &ConsoleSettings, media_type: &'static str, body: String) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    if let Ok(policy) = HeaderValue::from_str(&settings.policy()) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Built into the binary: a new build serves new files, so the browser asks each time.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /console` and `GET /console/`: the page.
pub(super) async fn page(State(state): State<AppState>) -> Response {
    let (_, media_type, body) = ASSETS[0];
    answer(&state.console, media_type, body.to_owned())
}

/// `GET /console/settings.json`: where the page finds the command API.
pub(super) async fn settings(State(state): State<AppState>) -> Response {
    let body = serde_json::json!({ "command_api": state.console.command_api }).to_string();
    answer(&state.console, "application/json", body)
}

/// `GET /console/{*file}`: one of the console's files.
pub(super) async fn file(
    State(state): State<AppState>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let (_, media_type, body) = ASSETS
        .iter()
        .find(|(path, _, _)| *path == file)
        .ok_or_else(|| ApiError::NotFound("the console has no such file".into()))?;
    Ok(answer(&state.console, media_type, (*body).to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::routes::router_without_database;

    /// Every file the page loads is served with its media type and the policy; the page
    /// names only files that exist; nothing else is served.
    #[tokio::test]
    async fn the_console_is_served_with_its_policy() {
        let router = router_without_database(|n| (n == "KEEL_AUTH").then(|| "off".into()));
        let get = |uri: &str| {
            router
                .clone()
                .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        };
        for (path, media_type, _) in ASSETS {
            let r = get(&format!("/console/{path}")).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], *media_type);
            let policy = r.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap();
            assert!(
                policy.contains("script-src 'self'") && !policy.contains("unsafe"),
                "{policy}"
            );
        }
        for uri in ["/console", "/console/"] {
            let r = get(uri).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{uri}");
        }
        for uri in ["/console/js/nothing.js", "/console/../Cargo.toml"] {
            assert_eq!(get(uri).await.unwrap().status(), StatusCode::NOT_FOUND);
        }
        // Every module a module imports, and every file the page links, is served.
        let served: Vec<&str> = ASSETS.iter().map(|(p, _, _)| *p).collect();
        for (path, _, body) in ASSETS {
            for import in body
                .split(['\'', '"'])
                .filter(|s| s.starts_with("./") || s.starts_with("/console/"))
            {
                let target = match import.strip_prefix("./") {
                    Some(name) => format!("js/{name}"),
                    None => import.trim_start_matches("/console/").to_owned(),
                };
                assert!(
                    served.contains(&target.as_str()) || target == "settings.json",
                    "{path} names {import}, which is not served"
                );
            }
        }
    }

    #[test]
    fn the_command_api_is_an_origin() {
        let s = ConsoleSettings::new(Some("http://127.0.0.1:8080/")).unwrap();
        assert_eq!(s.command_api.as_deref(), Some("http://127.0.0.1:8080"));
        assert!(
            s.policy()
                .contains("connect-src 'self' http://127.0.0.1:8080;")
        );
        assert!(ConsoleSettings::new(Some("127.0.0.1:8080")).is_err());
        assert!(ConsoleSettings::new(Some("http://a:1,http://b:2")).is_err());
        assert!(ConsoleSettings::new(Some("http://x/v1")).is_err());
        assert_eq!(ConsoleSettings::new(Some(" ")).unwrap().command_api, None);
    }
}
