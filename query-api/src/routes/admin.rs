//! The admin routes that ask for work: rebuild a projection, retry or discard a parked
//! stream, verify one stream against the log. The query API does not read Kafka, so each
//! records a request with its actor (the token's subject) and answers 202 with where to
//! follow it; a running `projector run` process carries it out and records the outcome.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_http::Principal;
use keel_views::requests::Request;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::AppState;
use super::audit::stream_type;
use crate::error::ApiError;

/// The largest body an admin route reads: room for the longest reason even when every
/// character is written as a JSON escaped surrogate pair (12 bytes).
pub(super) const MAX_BODY: usize = 16 * 1024;
/// The longest reason a discard records.
pub(super) const MAX_REASON: usize = 1000;
/// The longest part of a rejected body echoed back in a problem.
const MAX_ECHO: usize = 200;

/// `body` read as a JSON object into `T` (an empty body is `T`'s default). Refused: a
/// request not declared `application/json`, even with an empty body (415), or a body that
/// is not an object of `T`'s fields (400, naming what is wrong). The declared type is what
/// makes a browser ask first (a CORS preflight, which this API does not answer), so that no
/// other web page can send these requests from an operator's browser, whose token it
/// cannot read but whose network (and an API with authentication off) it could use.
fn body<T: DeserializeOwned + Default>(headers: &HeaderMap, body: &Bytes) -> Result<T, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::Unsupported(
            "send a JSON object as application/json (`{}` where nothing needs saying)".into(),
        ));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad("body", echo(&e.to_string())))?;
    // An object, never an array: serde would read a struct from a sequence of its fields.
    if !value.is_object() {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad("body", echo(&e.to_string())))
}

/// `text`, cut to [`MAX_ECHO`] bytes on a character boundary.
fn echo(text: &str) -> String {
    if text.len() <= MAX_ECHO {
        return text.to_owned();
    }
    let mut end = MAX_ECHO;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A request id from the path: a whole number from 1 (a 404 otherwise: no request has it).
fn request_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id >= 1)
        .ok_or_else(|| ApiError::NotFound(format!("no request {}", echo(text))))
}

/// A failure to record a request: the database role the query API connects as may only
/// read (a read replica, or a role without the grants), or the database was not migrated
/// for requests yet; no retry mends either.
fn recording(e: sqlx::Error, grants: &str) -> ApiError {
    match &e {
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("25006" | "42501")) => {
            ApiError::Unwritable(format!(
                "the query API's database role cannot record this request ({}): it needs {grants}",
                db.message()
            ))
        }
        // No table for the requests, or not the index a rebuild request is recorded against:
        // the projector's migrations have not run on this database yet.
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P01" | "42P10")) => {
            ApiError::Unwritable(format!(
                "this database has no place for the request yet ({}): start this version's \
                 `projector run` once, which migrates it",
                db.message()
            ))
        }
        _ => ApiError::from(e),
    }
}

/// 202 with `Location: location` and `request` (as JSON, with its `state`).
fn accepted(location: String, request: Value) -> Response {
    let mut response = (StatusCode::ACCEPTED, axum::Json(request)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

/// `request` as JSON with its `state` beside its columns.
fn with_state(request: &impl serde::Serialize, state: &str) -> Result<Value, ApiError> {
    let mut value =
        serde_json::to_value(request).map_err(|e| ApiError::internal("encoding a request", &e))?;
    value["state"] = json!(state);
    Ok(value)
}

fn projection(name: &str) -> Result<&'static str, ApiError> {
    keel_views::find(name).map(|p| p.name).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no projection {:?}; the projections are: {}",
            echo(name),
            keel_views::PROJECTIONS
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RebuildBody {
    #[serde(default)]
    keep_old: bool,
}

/// `POST /v1/projections/{name}/rebuild`: asks the projector processes running `name` to
/// rebuild it blue/green (`{"keep_old": true}` keeps the replaced generation's tables).
/// Asking again while a request for the same generation waits returns that one (202), or
/// 409 when it differs in `keep_old`.
pub(super) async fn rebuild(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let name = projection(&name)?;
    let asked: RebuildBody = body(&headers, &bytes)?;
    let recorded =
        keel_views::requests::rebuild(&state.pool, name, asked.keep_old, &principal.subject)
            .await
            .map_err(|e| {
                recording(
                    e,
                    "INSERT and SELECT on keel_rebuild_requests, USAGE on keel_rebuild_requests_id_seq, and SELECT on keel_projections",
                )
            })?;
    let request = recorded.request;
    if !recorded.created && request.keep_old != asked.keep_old {
        return Err(ApiError::Conflict(format!(
            "a rebuild of {name} is already waiting (request {}, keep_old {}): follow it, or ask again once it is done",
            request.id, request.keep_old
        )));
    }
    let location = format!("/v1/projections/rebuild-requests/{}", request.id);
    Ok(accepted(location, with_state(&request, request.state())?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RetryBody {}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiscardBody {
    reason: Option<String>,
}

/// `POST /v1/projections/{name}/parked/{type}/{id}/retry`: asks the process holding the
/// parked stream's partition to apply its held-back records again, in order, once.
pub(super) async fn retry(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((name, kind, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let name = projection(&name)?;
    let RetryBody {} = body(&headers, &bytes)?;
    parked(&state, &principal, (name, &kind, &id), "retry", None).await
}

/// `POST /v1/projections/{name}/parked/{type}/{id}/discard` with `{"reason": "…"}`: asks
/// the process holding the parked stream's partition to drop its held-back records,
/// recording the reason.
pub(super) async fn discard(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((name, kind, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let name = projection(&name)?;
    let asked: DiscardBody = body(&headers, &bytes)?;
    let reason = asked.reason.unwrap_or_default();
    // Blank is spaces, tabs and line breaks only, as the document's pattern says.
    let blank = |c: char| matches!(c, ' ' | '\t' | '\r' | '\n');
    if reason.chars().all(blank) || reason.contains('\0') || reason.chars().count() > MAX_REASON {
        return Err(ApiError::bad(
            "reason",
            format!(
                "a discard needs a reason, recorded with the discarded records: 1 to {MAX_REASON} characters, not only blanks, no NUL"
            ),
        ));
    }
    parked(
        &state,
        &principal,
        (name, &kind, &id),
        "discard",
        Some(&reason),
    )
    .await
}

async fn parked(
    state: &AppState,
    principal: &Principal,
    (name, kind, id): (&str, &str, &str),
    action: &str,
    reason: Option<&str>,
) -> Result<Response, ApiError> {
    let kind = stream_type(kind)?;
    let request = keel_views::requests::stream(
        &state.pool,
        name,
        (kind, id),
        action,
        reason,
        &principal.subject,
    )
    .await
    .map_err(|e| {
        recording(
            e,
            "INSERT and SELECT on keel_stream_requests, USAGE on keel_stream_requests_id_seq, and SELECT on keel_parked_streams and keel_projections",
        )
    })?
    .ok_or_else(|| {
        ApiError::NotFound(format!(
            "the {name} projection does not hold back {kind}/{}: it is not parked",
            echo(id)
        ))
    })?;
    let location = format!("/v1/projections/stream-requests/{}", request.id);
    Ok(accepted(location, with_state(&request, request.state())?))
}

/// `POST /v1/audit/streams/{type}/{id}/verify`: asks a projector process to verify the
/// stream against the log, as `projector verify --stream` does.
pub(super) async fn verify(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let kind = stream_type(&kind)?;
    let RetryBody {} = body(&headers, &bytes)?;
    if id.is_empty() || id.contains('\0') {
        return Err(ApiError::bad(
            "id",
            "a stream id is not empty and holds no NUL",
        ));
    }
    let request = keel_views::requests::verify(&state.pool, (kind, &id), &principal.subject)
        .await
        .map_err(|e| {
            recording(
                e,
                "INSERT and SELECT on keel_verify_requests and USAGE on keel_verify_requests_id_seq",
            )
        })?;
    let location = format!("/v1/audit/verify-requests/{}", request.id);
    Ok(accepted(location, with_state(&request, request.state())?))
}

/// `GET /v1/projections/rebuild-requests/{id}`, `…/stream-requests/{id}` and
/// `/v1/audit/verify-requests/{id}`: a request of kind `R` and where it stands (a
/// rebuild's progress is in `GET /v1/projections`; a verification's report is here once
/// done).
pub(super) async fn requested<R: Request>(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let id = request_id(&id)?;
    let request = keel_views::requests::request::<R>(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no {} request {id}", R::KIND)))?;
    Ok(axum::Json(with_state(&request, request.state())?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    #[test]
    fn a_body_is_json_or_nothing() {
        let json = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            h
        };
        let none = HeaderMap::new();
        let read = |h: &HeaderMap, b: &'static str| body::<RebuildBody>(h, &Bytes::from(b));
        let declared = json("application/json");
        assert!(!read(&declared, "").unwrap().keep_old);
        assert!(!read(&declared, " \n").unwrap().keep_old);
        assert!(!read(&declared, "{}").unwrap().keep_old);
        assert!(
            matches!(read(&none, ""), Err(ApiError::Unsupported(_))),
            "an empty body undeclared is a request any page could send"
        );
        assert!(
            read(
                &json("application/json; charset=utf-8"),
                r#"{"keep_old":true}"#
            )
            .unwrap()
            .keep_old
        );
        assert!(matches!(
            read(&none, r#"{"keep_old":true}"#),
            Err(ApiError::Unsupported(_))
        ));
        assert!(matches!(
            read(&json("text/plain"), r#"{"keep_old":true}"#),
            Err(ApiError::Unsupported(_))
        ));
        let long = format!(r#"{{"{}":1}}"#, "k".repeat(5000));
        let refused = body::<RebuildBody>(&json("application/json"), &Bytes::from(long));
        match refused {
            Err(ApiError::BadRequest { detail, field }) => {
                assert_eq!(field.as_deref(), Some("body"));
                assert!(detail.len() <= MAX_ECHO + 3, "cut: {detail}");
            }
            other => panic!("{other:?}"),
        }
        for wrong in [r#"{"keep_old":1}"#, "[true]", "[]", "true", "null"] {
            assert!(
                matches!(
                    body::<RebuildBody>(&json("application/json"), &Bytes::from(wrong)),
                    Err(ApiError::BadRequest { .. })
                ),
                "{wrong}"
            );
        }
        assert!(matches!(
            body::<RetryBody>(&json("application/json"), &Bytes::from("[]")),
            Err(ApiError::BadRequest { .. })
        ));
    }

    #[test]
    fn request_ids_are_whole_numbers_from_one() {
        assert_eq!(request_id("7").unwrap(), 7);
        for bad in ["0", "-1", "x", "", "99999999999999999999"] {
            assert!(
                matches!(request_id(bad), Err(ApiError::NotFound(_))),
                "{bad}"
            );
        }
    }
}
