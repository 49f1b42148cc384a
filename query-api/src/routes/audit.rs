//! The audit endpoints: a stream's full history, a search over the audit log, and a
//! stream's state as it was at a version or a time, folded with the domain's own `evolve`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::{DateTime, SecondsFormat, Utc};
use keel_domain::{AggregateFn, ShopAggregate, with_aggregate};
use keel_schemas::{EventEnvelope, decode_event};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::views::params;
use super::{AppState, decode_cursor, limit, one_of, page, serve, whole_number};
use crate::error::ApiError;

/// The view every audit endpoint reads.
const AUDIT_LOG: &str = "audit_log";

/// The columns of an audit entry, as the API shows them. The signature is read through
/// `to_jsonb` (of [`ENTRIES`]) so a generation built before signatures existed still answers.
const ENTRY: &str = r#"jsonb_build_object(
    'stream_type', stream_type, 'stream_id', stream_id, 'version', version,
    'event_type', event_type, 'schema_version', schema_version, 'payload', payload,
    'event_id', event_id, 'commit_id', commit_id, 'command_id', command_id, 'command_type', command_type,
    'actor', actor, 'idempotency_key', idempotency_key, 'correlation_id', correlation_id,
    'causation_id', causation_id, 'recorded_at', recorded_at,
    'writer', jsonb_build_object('instance', writer_instance, 'epoch', writer_epoch),
    'topic', topic, 'partition', partition, 'offset', "offset", 'index', index,
    'prev_hash', prev_hash, 'hash', hash,
    'signature', CASE WHEN j.doc->>'signature' IS NULL THEN NULL
                 ELSE jsonb_build_object('key_id', j.doc->'signature_key_id',
                                         'value', j.doc->'signature') END)"#;

/// What [`ENTRY`] reads from: each audit row, and that row as JSON once.
const ENTRIES: &str = "audit_log a CROSS JOIN LATERAL to_jsonb(a) AS j(doc)";

pub(super) fn stream_type(value: &str) -> Result<&'static str, ApiError> {
    keel_domain::STREAM_TYPES
        .iter()
        .find(|t| **t == value)
        .copied()
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no stream type {value:?}; the types are: {}",
                keel_domain::STREAM_TYPES.join(", ")
            ))
        })
}

fn time(field: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    ApiError::bad(field, "must be an RFC 3339 time like 2026-11-21T12:00:00Z")
                })
        })
        .transpose()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryParams {
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /v1/audit/streams/{type}/{id}?limit=&cursor=`: the stream's events in version order
/// with their full metadata, position and hashes.
pub(super) async fn stream_history(
    State(state): State<AppState>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    query: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let kind = stream_type(&kind)?;
    let q = params(query)?;
    let limit = limit(q.limit.as_deref())?;
    let after: Option<i64> = decode_cursor(q.cursor.as_deref(), 1)?
        .map(|k| k[0].parse())
        .transpose()
        .map_err(|_| ApiError::bad("cursor", "is not a cursor this API returned"))?;
    let body = async {
        let rows: Vec<Value> = sqlx::query_scalar(&format!(
            "SELECT {ENTRY} FROM {ENTRIES}
             WHERE stream_type = $1 AND stream_id = $2 AND ($3::bigint IS NULL OR version > $3)
             ORDER BY version LIMIT $4"
        ))
        .bind(kind)
        .bind(&id)
        .bind(after)
        .bind(limit + 1)
        .fetch_all(&state.pool)
        .await?;
        if rows.is_empty() && after.is_none() {
            return Err(ApiError::NotFound(format!("no stream {kind}/{id}")));
        }
        let mut body = page(rows, limit, |r| vec![r["version"].to_string()]);
        body["stream"] = json!({"type": kind, "id": id});
        Ok(body)
    };
    serve(&state, &headers, AUDIT_LOG, Some((kind, &id)), body).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SearchParams {
    stream_type: Option<String>,
    event_type: Option<String>,
    actor: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /v1/audit/events?stream_type=&event_type=&actor=&from=&to=&limit=&cursor=`: events
/// in recorded order; `from` is inclusive, `to` exclusive (RFC 3339 times).
pub(super) async fn search(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<SearchParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = params(query)?;
    let stream_type_filter = one_of("stream_type", q.stream_type, &keel_domain::STREAM_TYPES)?;
    let (from, to) = (
        time("from", q.from.as_deref())?,
        time("to", q.to.as_deref())?,
    );
    let limit = limit(q.limit.as_deref())?;
    let after = decode_cursor(q.cursor.as_deref(), 2)?
        .map(|k| -> Option<(DateTime<Utc>, Uuid)> {
            Some((
                DateTime::parse_from_rfc3339(&k[0])
                    .ok()?
                    .with_timezone(&Utc),
                k[1].parse().ok()?,
            ))
        })
        .map(|k| k.ok_or_else(|| ApiError::bad("cursor", "is not a cursor this API returned")))
        .transpose()?;
    let body = async {
        let rows: Vec<Value> = sqlx::query_scalar(&format!(
            "SELECT {ENTRY} FROM {ENTRIES}
             WHERE ($1::text IS NULL OR stream_type = $1) AND ($2::text IS NULL OR event_type = $2)
               AND ($3::text IS NULL OR actor = $3)
               AND ($4::timestamptz IS NULL OR recorded_at >= $4) AND ($5::timestamptz IS NULL OR recorded_at < $5)
               AND ($6::timestamptz IS NULL OR (recorded_at, event_id) > ($6, $7::uuid))
             ORDER BY recorded_at, event_id LIMIT $8"
        ))
        .bind(&stream_type_filter)
        .bind(&q.event_type)
        .bind(&q.actor)
        .bind(from)
        .bind(to)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(limit + 1)
        .fetch_all(&state.pool)
        .await?;
        Ok(page(rows, limit, |r| {
            // The key in full precision: the JSON form of a timestamp keeps microseconds.
            let at = r["recorded_at"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true))
                .unwrap_or_default();
            vec![at, r["event_id"].as_str().unwrap_or_default().to_owned()]
        }))
    };
    serve(&state, &headers, AUDIT_LOG, None, body).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StateParams {
    version: Option<String>,
    at: Option<String>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    event_id: Uuid,
    version: i64,
    event_type: String,
    schema_version: i32,
    payload: Value,
    recorded_at: DateTime<Utc>,
}

/// Folds its rows with the stream's aggregate's own `evolve`, upcasting as every reader
/// does.
struct Fold<'a>(&'a [EventRow]);

impl AggregateFn for Fold<'_> {
    type Output = Result<Value, ApiError>;
    fn call<A: ShopAggregate>(self) -> Self::Output {
        fold::<A>(self.0)
    }
}

fn fold<A: ShopAggregate>(rows: &[EventRow]) -> Result<Value, ApiError> {
    let mut state = A::default();
    for row in rows {
        let envelope = EventEnvelope {
            event_id: row.event_id,
            version: row.version as u64,
            event_type: row.event_type.clone(),
            schema_version: row.schema_version as u32,
            payload: row.payload.clone(),
        };
        let event = decode_event::<A>(&envelope).map_err(|e| {
            ApiError::internal(
                &format!("event version {} cannot be decoded", row.version),
                &e,
            )
        })?;
        state = state.evolve(&event);
    }
    serde_json::to_value(&state).map_err(|e| ApiError::internal("encoding a stream's state", &e))
}

/// `GET /v1/audit/streams/{type}/{id}/state?version=N` or `?at=<RFC 3339>`: the state after
/// version N, or as it was at that time (the latest version recorded at or before it);
/// the current state without either.
pub(super) async fn stream_state(
    State(state): State<AppState>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    query: Result<Query<StateParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let kind = stream_type(&kind)?;
    let q = params(query)?;
    if q.version.is_some() && q.at.is_some() {
        return Err(ApiError::bad(
            "version",
            "give either version or at, not both",
        ));
    }
    let version: Option<i64> = q
        .version
        .as_deref()
        .map(|v| {
            whole_number(v)
                .filter(|v| *v >= 1)
                .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
                .ok_or_else(|| ApiError::bad("version", "must be a whole number from 1"))
        })
        .transpose()?;
    let at = time("at", q.at.as_deref())?;
    let body = async {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT event_id, version, event_type, schema_version, payload, recorded_at FROM audit_log
             WHERE stream_type = $1 AND stream_id = $2
               AND ($3::bigint IS NULL OR version <= $3)
               AND ($4::timestamptz IS NULL OR version <= (
                    SELECT max(version) FROM audit_log
                    WHERE stream_type = $1 AND stream_id = $2 AND recorded_at <= $4))
             ORDER BY version",
        )
        .bind(kind)
        .bind(&id)
        .bind(version)
        .bind(at)
        .fetch_all(&state.pool)
        .await?;
        let Some(last) = rows.last() else {
            return Err(ApiError::NotFound(match at {
                Some(at) => format!("stream {kind}/{id} has no event at or before {at:?}"),
                None => format!("no stream {kind}/{id}"),
            }));
        };
        if let Some(v) = version
            && last.version < v
        {
            return Err(ApiError::NotFound(format!(
                "stream {kind}/{id} is at version {}: it has no version {v}",
                last.version
            )));
        }
        // `kind` is one of the stream types (checked above), so an aggregate is found.
        let folded = with_aggregate(kind, Fold(&rows))
            .ok_or_else(|| ApiError::NotFound(format!("no stream type {kind:?}")))??;
        Ok(json!({
            "stream": {"type": kind, "id": id},
            "version": last.version,
            "recorded_at": last.recorded_at,
            "state": folded,
        }))
    };
    serve(&state, &headers, AUDIT_LOG, Some((kind, &id)), body).await
}
