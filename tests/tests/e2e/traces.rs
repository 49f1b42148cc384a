//! Traces: the three processes export their spans over OTLP/HTTP to a receiver in the test,
//! which decodes them with the reference protobuf types; one command is followed from its
//! request through the owner's phases and the log to the views and a read that waited
//! for it.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use keel_tests::{Service, Stack, eur, read_accepted};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use reqwest::StatusCode;
use serde_json::json;

/// One span as received: the service that sent it and the span.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: opentelemetry_proto::tonic::trace::v1::Span,
}

impl Received {
    fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }

    fn span_id(&self) -> String {
        hex::encode(&self.span.span_id)
    }

    fn parent(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }

    fn attribute(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                other => format!("{other:?}"),
            })
    }
}

type Spans = Arc<Mutex<Vec<Received>>>;

/// An OTLP/HTTP receiver on a free port: its base URL and what it received.
async fn receiver() -> (String, Spans) {
    let received: Spans = Arc::default();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(|State(received): State<Spans>, body: Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body)
                    .unwrap_or_else(|e| panic!("an export that does not decode: {e}"));
                let mut received = received.lock().unwrap();
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            received.push(Received {
                                service: service.clone(),
                                span,
                            });
                        }
                    }
                }
            }),
        )
        .with_state(Arc::clone(&received));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

/// The spans of trace `trace_id` received so far.
fn of_trace(spans: &Spans, trace_id: &str) -> Vec<Received> {
    spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id() == trace_id)
        .cloned()
        .collect()
}

/// Waits up to 30 s until `done` holds of trace `trace_id`'s spans; returns them.
async fn wait_for(
    spans: &Spans,
    trace_id: &str,
    what: &str,
    done: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let trace = of_trace(spans, trace_id);
        if done(&trace) {
            return trace;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: trace {trace_id} has only {:#?}",
            trace
                .iter()
                .map(|s| (&s.service, &s.span.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn named<'a>(trace: &'a [Received], name: &str) -> Vec<&'a Received> {
    trace.iter().filter(|s| s.span.name == name).collect()
}

/// A fresh trace id and a caller's span id in it.
fn caller() -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    (
        id,
        uuid::Uuid::new_v4().simple().to_string()[..16].to_owned(),
    )
}

/// What every process of these tests gets: traces exported to `endpoint` at once, JSON
/// logs with the request's access lines.
fn traced_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KEEL_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("KEEL_LOG_FORMAT", "json".into()),
        ("RUST_LOG", "info,keel_http::access=debug".into()),
    ]
}

/// A command sent with a `traceparent` is one trace: the command API's request span
/// (the caller's child) with the owner's queue, decide, append and read-back; the commit
/// in the log records the request's trace context (covered by its hash, since the gate
/// took it); each projection's application of that commit is a span under the request's;
/// and a read that waits for the command's consistency token shows that wait. The
/// command API's JSON log lines written in the request carry its trace and span ids.
#[tokio::test]
async fn one_trace_follows_a_command_from_its_request_into_the_views() {
    let (endpoint, spans) = receiver().await;
    let stack = Stack::start_with_env("traces", 2, traced_env(&endpoint)).await;
    let (trace_id, caller_span) = caller();

    let r = stack
        .client
        .post(stack.command.url("/v1/products/TRACE-1/register"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({"name": "Traced", "price": eur(500)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: serde_json::Value = r.json().await.unwrap();
    let token = body["consistency_token"].as_str().unwrap().to_owned();
    let (_, reader_span) = caller();
    let read = stack
        .client
        .get(stack.query.url("/v1/products/TRACE-1"))
        .header("traceparent", format!("00-{trace_id}-{reader_span}-01"))
        .header("keel-consistency-token", &token)
        .header("keel-consistency-timeout", "30000")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);

    let projections: usize = keel_views::PROJECTIONS
        .iter()
        .filter(|p| p.stream_types.contains(&"product"))
        .count();
    assert!(projections > 0);
    let trace = wait_for(&spans, &trace_id, "the command's trace", |t| {
        named(t, "projection.apply").len() >= projections
            && !named(t, "consistency.wait").is_empty()
            && !named(t, "command.read_back").is_empty()
            && !named(t, "POST /v1/{collection}/{id}/{command}").is_empty()
            && !named(t, "GET /v1/products/{sku}").is_empty()
    })
    .await;

    // The command API's request span, the caller's child.
    let request = named(&trace, "POST /v1/{collection}/{id}/{command}");
    assert_eq!(request.len(), 1, "{trace:#?}");
    let request = request[0];
    assert_eq!(request.service, "keel-command-api");
    assert_eq!(request.parent(), caller_span);
    assert_eq!(request.span.kind, SpanKind::Server as i32);
    assert_eq!(
        request.attribute("http.response.status_code").as_deref(),
        Some("201")
    );
    // The command API's spans form one tree under the request span.
    let command_api: HashMap<String, &Received> = trace
        .iter()
        .filter(|s| s.service == "keel-command-api")
        .map(|s| (s.span_id(), s))
        .collect();
    let under_request = |span: &Received| {
        let mut at = span;
        for _ in 0..8 {
            if at.span_id() == request.span_id() {
                return true;
            }
            match command_api.get(&at.parent()) {
                Some(parent) => at = parent,
                None => return false,
            }
        }
        false
    };
    for phase in [
        "command.queue",
        "command.decide",
        "command.append",
        "command.read_back",
    ] {
        let found = named(&trace, phase);
        assert_eq!(found.len(), 1, "{phase}: {trace:#?}");
        assert!(under_request(found[0]), "{phase} is not under the request");
        assert!(found[0].span.end_time_unix_nano >= found[0].span.start_time_unix_nano);
    }
    let decide = named(&trace, "command.decide")[0];
    let append = named(&trace, "command.append")[0];
    let read_back = named(&trace, "command.read_back")[0];
    assert!(decide.span.end_time_unix_nano <= append.span.start_time_unix_nano);
    assert!(append.span.end_time_unix_nano <= read_back.span.end_time_unix_nano);
    assert!(read_back.span.end_time_unix_nano <= request.span.end_time_unix_nano);

    // The commit records the trace context it ran in, and the gate took it (its hash and
    // signature cover the field).
    let settings = stack
        .broker
        .settings(&stack.config.prefix, stack.config.partitions);
    let (accepted, _) = read_accepted(
        &settings,
        &stack.config.policy(),
        &settings.topic("product"),
    )
    .await
    .unwrap();
    let commit = accepted
        .iter()
        .find(|a| a.commit.stream.id == "TRACE-1")
        .expect("the command's commit");
    let recorded = commit.commit.command.traceparent.clone().unwrap();
    assert!(
        recorded.starts_with(&format!("00-{trace_id}-")),
        "{recorded}"
    );
    let recorded_span = recorded.split('-').nth(2).unwrap().to_owned();
    assert_eq!(
        recorded_span,
        request.span_id(),
        "the request's span is recorded"
    );

    // Each projection's application, a consumer span under the recorded one.
    let applied = named(&trace, "projection.apply");
    let by_projection: HashSet<String> = applied
        .iter()
        .map(|s| s.attribute("keel.projection").unwrap())
        .collect();
    assert_eq!(by_projection.len(), projections, "{applied:#?}");
    for span in &applied {
        assert_eq!(span.service, "keel-projector");
        assert_eq!(span.parent(), recorded_span);
        assert_eq!(span.span.kind, SpanKind::Consumer as i32);
        assert_eq!(
            span.attribute("keel.commit.id"),
            Some(commit.commit.commit_id.to_string())
        );
        assert_eq!(
            span.attribute("messaging.kafka.offset"),
            Some(commit.offset.to_string())
        );
        assert!(span.attribute("keel.batch.id").is_some());
    }

    // The read's request span and its consistency wait.
    let read_request = named(&trace, "GET /v1/products/{sku}");
    assert_eq!(read_request.len(), 1, "{trace:#?}");
    assert_eq!(read_request[0].service, "keel-query-api");
    assert_eq!(read_request[0].parent(), reader_span);
    let waited = named(&trace, "consistency.wait");
    assert_eq!(waited.len(), 1);
    assert_eq!(waited[0].parent(), read_request[0].span_id());
    assert_eq!(
        waited[0].attribute("keel.timed_out").as_deref(),
        Some("false")
    );
    assert_eq!(
        waited[0].attribute("keel.projection").as_deref(),
        Some("products")
    );

    // The access line the command API wrote in the request carries its ids.
    let log = stack.command.log();
    let line: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| {
            l["target"] == "keel_http::access" && l["route"] == "/v1/{collection}/{id}/{command}"
        })
        .unwrap_or_else(|| panic!("no access line for the command in {log}"));
    assert_eq!(line["trace_id"], trace_id.as_str(), "{line}");
    assert_eq!(line["span_id"], request.span_id().as_str(), "{line}");

    // Only Keel's own spans are exported: the API's requests (not probes or scrapes), the
    // phases, the views' application and the waits; none of the spans the log level
    // enables (the handler's, the owner's, the flush's, the projection runner's).
    let unexpected: HashSet<String> = spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| {
            let name = s.span.name.as_str();
            !(name.starts_with("POST /v1/")
                || name.starts_with("GET /v1/")
                || name.starts_with("command.")
                || name == "projection.apply"
                || name == "consistency.wait")
        })
        .map(|s| format!("{} {}", s.service, s.span.name))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
}

/// One batch of the projector holds the commits of many commands: each commit's
/// application is a span in its own command's trace, and the spans share the batch's id.
#[tokio::test]
async fn two_traces_landing_in_one_batch_each_get_their_span() {
    let (endpoint, spans) = receiver().await;
    let mut stack = Stack::start_with_env("traces_batch", 1, traced_env(&endpoint)).await;
    stack.projector.take().unwrap().stop().await.unwrap();

    let mut traces = Vec::new();
    for (path, body) in [
        (
            "/v1/products/BATCH-1/register",
            json!({"name": "One", "price": eur(100)}),
        ),
        ("/v1/products/BATCH-1/restock", json!({"quantity": 5})),
    ] {
        let (trace_id, span) = caller();
        let r = stack
            .client
            .post(stack.command.url(path))
            .header("traceparent", format!("00-{trace_id}-{span}-01"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        traces.push(trace_id);
    }
    // Both commits wait in the log: the projector reads them in one batch.
    stack.projector = Some(
        Service::projector(&stack.config, &stack.db.url(), &[])
            .await
            .unwrap(),
    );
    let applied_in = |trace_id: &str| {
        let spans = &spans;
        let trace_id = trace_id.to_owned();
        async move {
            wait_for(spans, &trace_id, "the products view's application", |t| {
                named(t, "projection.apply")
                    .iter()
                    .any(|s| s.attribute("keel.projection").as_deref() == Some("products"))
            })
            .await
            .into_iter()
            .find(|s| {
                s.span.name == "projection.apply"
                    && s.attribute("keel.projection").as_deref() == Some("products")
            })
            .unwrap()
        }
    };
    let first = applied_in(&traces[0]).await;
    let second = applied_in(&traces[1]).await;
    assert_ne!(first.trace_id(), second.trace_id());
    assert_ne!(
        first.attribute("keel.commit.id"),
        second.attribute("keel.commit.id")
    );
    assert_eq!(
        first.attribute("keel.batch.id"),
        second.attribute("keel.batch.id"),
        "the two commits were applied in one batch"
    );
    assert_eq!(
        first.span.end_time_unix_nano,
        second.span.end_time_unix_nano
    );
}
