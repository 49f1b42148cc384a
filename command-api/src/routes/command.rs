use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::any::Any;
use std::future::Future;
use std::pin::Pin;

use keel_domain::{AggregateFn, ShopAggregate, with_aggregate};
use keel_http::Principal;
use keel_kafka::partition_for;
use keel_schemas::{CONSISTENCY_TOKEN_HEADER, ConsistencyToken, TopicPartition, canonical_json};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tracing::instrument;
use uuid::Uuid;

use super::{AppState, MAX_BODY_BYTES};
use crate::cluster::{DEADLINE_MS, FORWARDED_BY};
use crate::commands;
use crate::error::ApiError;
use crate::metrics::CommandOutcome;
use crate::owner::{
    CommandRequest, NoAnswer, Outcome, RequestMeta, Status, Timeline, reply_channel,
};

/// `POST /v1/{collection}/{id}/{command}`.
#[instrument(skip(state, principal, headers, body), fields(collection = %collection, id = %id, command = %command))]
pub(super) async fn handle(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((collection, id, command)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let spec = commands::find(&collection, &command)?;
    let headers_forwarded = headers.contains_key(FORWARDED_BY);
    let handled = execute(
        &state,
        principal,
        spec,
        (collection, id, command),
        headers,
        body,
        started,
    )
    .await;
    let outcome = match &handled {
        Ok(Handled::Here(outcome)) if outcome.replayed => Some(CommandOutcome::Replayed),
        Ok(Handled::Here(_)) => Some(CommandOutcome::Accepted),
        Ok(Handled::Forwarded(_)) => Some(CommandOutcome::Forwarded),
        // Forwarded here by an instance that routes it again: that instance counts it.
        Err(ApiError::NotOwner { .. }) if headers_forwarded => None,
        Err(e) => Some(CommandOutcome::of_error(e)),
    };
    if let Some(outcome) = outcome {
        state.telemetry.commands.command(spec.command_type, outcome);
    }
    Ok(match handled? {
        Handled::Here(outcome) => respond(outcome),
        Handled::Forwarded(response) => response,
    })
}

/// How a command was answered.
enum Handled {
    /// By this instance's owner of its partition.
    Here(Outcome),
    /// By the instance that owns its partition: its response.
    Forwarded(Response),
}

/// Parses, routes and dispatches a command of `spec`.
async fn execute(
    state: &AppState,
    principal: Principal,
    spec: &'static commands::CommandSpec,
    (collection, id, command): (String, String, String),
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    started: Instant,
) -> Result<Handled, ApiError> {
    commands::validate_id(&collection, &id)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(MAX_BODY_BYTES)
        } else {
            ApiError::BadRequest(rejection.body_text())
        }
    })?;
    let json = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        if !is_json(&headers) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let mut json = serde_json::from_slice::<Value>(&body)
            .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
        commands::integral_numbers(&mut json);
        json
    };
    let parsed = commands::parse(spec, &json)?;

    let idempotency_key = header_text(&headers, "idempotency-key")?;
    // The subject is part of the request: another subject's retry with the same key is a
    // reuse (422), never a replay of someone else's response.
    let request_digest = idempotency_key.as_ref().map(|_| {
        let mut hasher = Sha256::new();
        hasher.update(principal.subject.as_bytes());
        hasher.update(b"\n");
        hasher.update(spec.command_type.as_bytes());
        hasher.update(b"\n");
        hasher.update(id.as_bytes());
        hasher.update(b"\n");
        hasher.update(canonical_json(&json));
        hex::encode(hasher.finalize())
    });
    let recorded_trace = keel_telemetry::trace::current_traceparent();
    let meta = RequestMeta {
        command_type: spec.command_type,
        idempotency_key,
        request_digest,
        if_match: if_match(&headers)?,
        // The token's subject, never a value the client chose in the body or a header.
        actor: principal.subject,
        correlation_id: header_text(&headers, "x-correlation-id")?
            .unwrap_or_else(|| Uuid::now_v7().to_string()),
        causation_id: header_text(&headers, "x-causation-id")?,
        // On the record's header: this request's span when traces are exported, else
        // the caller's as it sent it. In the commit: only the request's span.
        traceparent: recorded_trace
            .clone()
            .or(header_text(&headers, "traceparent")?),
        recorded_trace,
    };
    let stream_type = commands::stream_type(&collection).ok_or_else(|| {
        ApiError::internal("routing a command", &"a parsed command has no stream type")
    })?;
    let patience = patience(&headers, state.request_timeout)?;
    let partition = partition_for(id.as_bytes(), state.partitions);
    let at = TopicPartition::new(state.topic(stream_type), partition);
    let forwarded = headers.contains_key(FORWARDED_BY);
    // Forwarded to an instance that turns out not to own the partition (it moved
    // meanwhile), the command is routed again, once: still one hop per attempt.
    let mut moved_from: Option<String> = None;
    // One deadline for every hop and wait: the caller's patience.
    let deadline = started + patience;
    let out_of_patience =
        || ApiError::Unavailable("the partition's owner did not answer in time; retry".into());
    loop {
        let routed = route(
            state,
            stream_type,
            &at,
            forwarded,
            moved_from.as_deref(),
            deadline.saturating_duration_since(Instant::now()),
        );
        let Route::There(url) = routed.await? else {
            break;
        };
        let Some(cluster) = &state.cluster else {
            break;
        };
        let path = format!("/v1/{collection}/{id}/{command}");
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(out_of_patience());
        }
        let answer = cluster
            .forward(&url, &path, &headers, body.clone(), left)
            .await?;
        let Some(moved_to) = answer.not_owner else {
            return Ok(Handled::Forwarded(answer.response));
        };
        if moved_from.is_some() {
            return Ok(Handled::Forwarded(answer.response));
        }
        match moved_to {
            // It handed the partition over moments ago, and says to whom.
            Some(to) => cluster.note_moved(&at, &to),
            None => {
                cluster.refresh_soon();
                // Until the view no longer names that instance, or patience runs out.
                let until = deadline.min(Instant::now() + OWNERLESS_WAIT);
                while cluster.owner_of(&at).as_deref() == Some(url.as_str())
                    && Instant::now() < until
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        moved_from = Some(url);
    }
    let dispatch = Dispatch {
        state,
        stream_id: id,
        partition,
        command: parsed.into_any(),
        meta,
        patience: patience.saturating_sub(started.elapsed()),
    };
    let outcome = with_aggregate(stream_type, dispatch)
        .ok_or_else(|| {
            ApiError::internal("routing a command", &"no aggregate for its stream type")
        })?
        .await?;
    Ok(Handled::Here(outcome))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// Longest value of the headers a command records (Idempotency-Key, correlation and
/// causation ids, traceparent).
const MAX_HEADER_CHARS: usize = 255;

fn header_text(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    headers
        .get(name)
        .map(|v| match v.to_str() {
            Ok(text) if (1..=MAX_HEADER_CHARS).contains(&text.len()) => Ok(text.to_owned()),
            Ok(_) => Err(ApiError::BadRequest(format!(
                "header {name} must have 1 to {MAX_HEADER_CHARS} characters"
            ))),
            Err(_) => Err(ApiError::BadRequest(format!(
                "header {name} must be visible ASCII"
            ))),
        })
        .transpose()
}

/// `If-Match: "<version>"` (quotes optional; a weak `W/` tag is refused).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = header_text(headers, "if-match")? else {
        return Ok(None);
    };
    let tag = value.trim();
    let bare = tag
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(tag);
    bare.parse().map(Some).map_err(|_| {
        ApiError::BadRequest(format!(
            "If-Match must be a stream version in quotes, like \"3\"; got {value:?}"
        ))
    })
}

/// How long a command whose partition has no owner at the moment (the instances are
/// rebalancing) waits for one before it is answered 503.
const OWNERLESS_WAIT: Duration = Duration::from_secs(2);

/// How often a command waiting for its partition's owner has the group's view read again.
const OWNERLESS_LOOK: Duration = Duration::from_millis(100);

/// Where a command goes.
enum Route {
    /// To this instance's owner of its partition.
    Here,
    /// To the instance at this URL, which owns it.
    There(String),
}

/// The caller's patience: the request timeout, or less when a forwarding instance says
/// how much of the caller's is left.
fn patience(headers: &HeaderMap, request_timeout: Duration) -> Result<Duration, ApiError> {
    let Some(left) = header_text(headers, DEADLINE_MS)? else {
        return Ok(request_timeout);
    };
    let ms: u64 = left
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("header {DEADLINE_MS} must be milliseconds")))?;
    Ok(request_timeout.min(Duration::from_millis(ms)))
}

/// Finds the owner of `at`: this instance's, or another's (never for a command another
/// instance forwarded: one hop only; never `moved_from`, which said it no longer owns it).
/// While the partition has no owner, waits a little.
async fn route(
    state: &AppState,
    stream_type: &str,
    at: &TopicPartition,
    forwarded: bool,
    moved_from: Option<&str>,
    patience: Duration,
) -> Result<Route, ApiError> {
    let until = Instant::now() + patience.min(OWNERLESS_WAIT);
    let mut asked: Option<Instant> = None;
    loop {
        let here = state.owners.status_of(stream_type, at.partition);
        let Some(cluster) = &state.cluster else {
            return match here {
                Some(_) => Ok(Route::Here),
                None => Err(ApiError::Unavailable(format!(
                    "this instance does not own {at}"
                ))),
            };
        };
        match here {
            Some(Status::Serving) => return Ok(Route::Here),
            // An owner starting here (or fenced out) while another member still serves
            // the partition: that member answers until it hands the partition over.
            Some(_) if !forwarded => match cluster.served_by(at) {
                Some(url) if url != cluster.url() && Some(url.as_str()) != moved_from => {
                    return Ok(Route::There(url));
                }
                _ => return Ok(Route::Here),
            },
            // Forwarded here, to an owner fenced out meanwhile: the forwarding instance
            // looks again.
            Some(Status::Lost) => return Err(not_owner(cluster, at)),
            Some(_) => return Ok(Route::Here),
            None => {}
        }
        if !forwarded
            && let Some(url) = cluster.owner_of(at)
            && url != cluster.url()
            && Some(url.as_str()) != moved_from
        {
            return Ok(Route::There(url));
        }
        if forwarded {
            // The forwarding instance knows others too: it looks again at once.
            return Err(not_owner(cluster, at));
        }
        // The view is read again every so often while the partition has no owner.
        if asked.is_none_or(|at| at.elapsed() >= OWNERLESS_LOOK) {
            cluster.refresh_soon();
            asked = Some(Instant::now());
        }
        if Instant::now() >= until {
            return Err(ApiError::Unavailable(format!(
                "{at} has no owner at the moment (the instances are rebalancing); retry"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The answer to a command forwarded here for a partition this instance does not own
/// (any more): with the member it handed the partition to moments ago, if it did (never a
/// guess from its view of the group, which the forwarding instance has too).
fn not_owner(cluster: &crate::cluster::Cluster, at: &TopicPartition) -> ApiError {
    ApiError::NotOwner {
        detail: format!(
            "{at} moved away from this instance while the command was forwarded; retry"
        ),
        moved_to: cluster.moved_to(at),
    }
}

/// A parsed command on its way to the owner of its stream's partition.
struct Dispatch<'a> {
    state: &'a AppState,
    stream_id: String,
    partition: i32,
    command: Box<dyn Any + Send>,
    meta: RequestMeta,
    patience: Duration,
}

impl<'a> AggregateFn for Dispatch<'a> {
    type Output = Pin<Box<dyn Future<Output = Result<Outcome, ApiError>> + Send + 'a>>;

    fn call<A: ShopAggregate>(self) -> Self::Output {
        Box::pin(async move {
            let command = self.command.downcast::<A::Command>().map_err(|_| {
                ApiError::internal("routing a command", &"the command is not its aggregate's")
            })?;
            dispatch(
                self.state.owners.of::<A>(self.partition),
                self.stream_id,
                *command,
                self.meta,
                self.patience,
            )
            .await
        })
    }
}

async fn dispatch<A: ShopAggregate>(
    owner: Option<mpsc::Sender<CommandRequest<A>>>,
    stream_id: String,
    command: A::Command,
    meta: RequestMeta,
    patience: Duration,
) -> Result<Outcome, ApiError> {
    let owner = owner.ok_or_else(|| {
        ApiError::Unavailable("this partition's owner stopped here; retry".into())
    })?;
    let (reply, answer) = reply_channel();
    let sent = SystemTime::now();
    owner
        .try_send(CommandRequest {
            stream_id,
            command,
            meta,
            reply,
        })
        .map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                ApiError::Unavailable("too many commands waiting; retry".into())
            }
            mpsc::error::TrySendError::Closed(_) => ApiError::Unavailable("shutting down".into()),
        })?;
    // The request timeout covers the wait in the owner's queue: a command the owner has
    // taken on is answered after its read-back, and one it has not is never appended.
    match answer.wait_timed(patience).await {
        Ok((result, timeline)) => {
            trace_phases(sent, &timeline);
            result.map_err(ApiError::from)
        }
        Err(NoAnswer::OwnerGone) => Err(ApiError::Unavailable(
            "the partition's owner stopped; retry with the same Idempotency-Key".into(),
        )),
        Err(NoAnswer::GaveUp) => Err(ApiError::Unavailable(
            "the partition's owner did not take the command in time; it was not appended: retry"
                .into(),
        )),
    }
}

/// Records the phases a command went through in the owner, from when it was `sent` there,
/// as spans of the current one (its request's), when traces are exported.
fn trace_phases(sent: SystemTime, timeline: &Timeline) {
    use keel_telemetry::trace::{SpanKind, span_at};

    let Some(decide) = timeline.decide else {
        return;
    };
    if !keel_telemetry::trace::enabled() {
        return;
    }
    let parent = keel_telemetry::trace::current_context();
    let phases = [
        ("command.queue", SpanKind::Internal, Some((sent, decide.0))),
        ("command.decide", SpanKind::Internal, Some(decide)),
        ("command.append", SpanKind::Producer, timeline.append),
        ("command.read_back", SpanKind::Internal, timeline.read_back),
    ];
    for (name, kind, times) in phases {
        if let Some(times) = times {
            span_at(name, kind, &parent, times, Vec::new());
        }
    }
}

fn respond(outcome: Outcome) -> Response {
    let token = outcome
        .position
        .clone()
        .map(|p| ConsistencyToken::at(p).encode());
    let status = if outcome.created && !outcome.events.is_empty() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = json!({
        "stream": outcome.stream,
        "version": outcome.version,
        "events": outcome.events,
        "consistency_token": token,
    });
    let mut response = (status, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", outcome.version)) {
        headers.insert(header::ETAG, etag);
    }
    if let Some(token) = token.and_then(|t| HeaderValue::from_str(&t).ok()) {
        headers.insert(CONSISTENCY_TOKEN_HEADER, token);
    }
    if outcome.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}
