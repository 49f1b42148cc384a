//! Checks the edge's role matrix in process, for the tests of both APIs: every operation of
//! an OpenAPI document, sent to the real router without a token, with a token of no role,
//! and with a token of each role, answers as the document's `security` says.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use crate::auth::{Claims, Role, now_secs, sign_hs256};

/// Claims for `subject` holding `roles`, for the default issuer and audience (`keel`),
/// valid for an hour.
pub fn claims(subject: &str, roles: &[Role]) -> Claims {
    let now = now_secs();
    Claims {
        sub: subject.into(),
        iss: "keel".into(),
        aud: "keel".into(),
        exp: now + 3600,
        iat: now,
        roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
    }
}

/// An HS256 token of [`claims`] for `subject` holding `roles`.
pub fn token(secret: &[u8], subject: &str, roles: &[Role]) -> String {
    sign_hs256(secret, &claims(subject, roles)).expect("an HS256 token signs")
}

/// Every `(method, path template, role)` of `doc`; `None` for an open operation.
pub fn operations(doc: &Value) -> Vec<(String, String, Option<Role>)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, operation) in item.as_object().into_iter().flatten() {
            let role = operation["security"][0]["bearer"][0]
                .as_str()
                .map(|r| Role::parse(r).expect("a documented role is a role"));
            out.push((method.to_uppercase(), path.clone(), role));
        }
    }
    out
}

/// Sends every operation of `doc` to `router` (whose edge trusts HS256 tokens of `secret`)
/// with each kind of token, and checks the answer: a guarded operation answers 401 with a
/// Bearer challenge without a token, 403 naming its role with a token lacking it, and
/// neither with the role; an open one answers neither 401 nor 403 whatever is sent.
/// `concrete` turns a path template into a path. Returns the number of requests sent.
pub async fn check_role_matrix(
    doc: &Value,
    router: &Router,
    secret: &[u8],
    concrete: impl Fn(&str) -> String,
) -> usize {
    let mut tokens: Vec<(String, Option<String>)> = vec![
        ("no token".into(), None),
        ("no role".into(), Some(token(secret, "nobody", &[]))),
    ];
    for role in Role::ALL {
        tokens.push((role.to_string(), Some(token(secret, "someone", &[role]))));
    }
    let mut sent = 0;
    for (method, template, needed) in operations(doc) {
        let path = concrete(&template);
        for (label, token) in &tokens {
            let mut request = Request::builder().method(method.as_str()).uri(&path);
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            let body = if method == "POST" {
                request = request.header("content-type", "application/json");
                Body::from("{}")
            } else {
                Body::empty()
            };
            let response = router
                .clone()
                .oneshot(request.body(body).expect("a request builds"))
                .await
                .expect("the router answers");
            sent += 1;
            let status = response.status();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            let context = format!("{method} {template} with {label}: {status}");
            let holds = needed.is_none_or(|r| label == r.as_str());
            match (needed, token.is_some(), holds) {
                (None, _, _) | (Some(_), true, true) => assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{context}"
                ),
                (Some(_), false, _) => {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{context}");
                    assert_eq!(
                        header("www-authenticate"),
                        "Bearer realm=\"keel\"",
                        "{context}"
                    );
                    assert_eq!(
                        header("content-type"),
                        "application/problem+json",
                        "{context}"
                    );
                }
                (Some(role), true, false) => {
                    assert_eq!(status, StatusCode::FORBIDDEN, "{context}");
                    let challenge = header("www-authenticate");
                    assert!(
                        challenge.contains("insufficient_scope"),
                        "{context}: {challenge}"
                    );
                    assert!(challenge.contains(role.as_str()), "{context}: {challenge}");
                    assert_eq!(
                        header("content-type"),
                        "application/problem+json",
                        "{context}"
                    );
                }
            }
        }
    }
    sent
}
