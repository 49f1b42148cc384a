//! Traces: OpenTelemetry spans, exported over OTLP/HTTP (protobuf) to
//! `KEEL_OTLP_ENDPOINT` when it is set. Off by default, and then free: no layer is
//! installed, spans stay `tracing`'s, and nothing is encoded or sent.
//!
//! Keel's spans have the target `keel_trace` ([`DIRECTIVE`] enables them when traces are
//! exported, whatever the log level) and record their `trace_id` and `span_id` as fields,
//! so log lines written inside them carry both. The write path's phases and the
//! projector's application of a commit run apart from the request that caused them, and
//! are recorded afterwards with their own times ([`span_under`]).
//!
//! The exporter is Keel's own, on the `reqwest` client the services already link: the SDK's
//! batch processor runs it on a thread of its own, and each export is sent on the Tokio
//! runtime that installed it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

pub use opentelemetry::trace::SpanKind;
use opentelemetry::trace::{
    Span as _, SpanContext, TraceContextExt, TraceFlags, TraceState, Tracer as _,
    TracerProvider as _,
};
pub use opentelemetry::{Context, KeyValue};
use opentelemetry::{SpanId, TraceId};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use prost::Message;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The target of Keel's spans.
pub const TARGET: &str = "keel_trace";

/// The filter directive that enables Keel's spans.
pub const DIRECTIVE: &str = "keel_trace=info";

/// Whether spans are exported: set once, by [`crate::init`].
static ENABLED: AtomicBool = AtomicBool::new(false);

/// True when spans are exported (`KEEL_OTLP_ENDPOINT` is set): only then are Keel's spans
/// made, so traces cost nothing when they are off.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Makes `provider` the one [`span_under`] records with, and turns Keel's spans on.
pub(crate) fn enable(provider: &SdkTracerProvider) {
    opentelemetry::global::set_tracer_provider(provider.clone());
    ENABLED.store(true, Ordering::Relaxed);
}

/// `KEEL_OTLP_ENDPOINT`'s value: the collector's base URL (`http://host:4318`), or `None`
/// when unset or empty (traces off).
pub fn parse_endpoint(value: Option<&str>) -> Result<Option<String>, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(url) => match reqwest::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => {
                Ok(Some(url.trim_end_matches('/').to_owned()))
            }
            _ => Err(format!(
                "KEEL_OTLP_ENDPOINT {url:?} must be an http:// or https:// URL of an OTLP/HTTP \
                 collector, such as http://127.0.0.1:4318"
            )),
        },
    }
}

/// Gives `span` (one of Keel's, not yet entered) the parent a W3C `traceparent` names, if
/// it names one, and records its `trace_id` and `span_id` fields. Does nothing when
/// traces are off or the span is disabled.
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) {
    if !enabled() || span.is_disabled() {
        return;
    }
    if let Some(parent) = traceparent.and_then(parse_traceparent) {
        let _ = span.set_parent(Context::new().with_remote_span_context(parent));
    }
    record_ids(span);
}

/// Records `span`'s `trace_id` and `span_id` fields from its OpenTelemetry context.
pub fn record_ids(span: &tracing::Span) {
    if !enabled() || span.is_disabled() {
        return;
    }
    let context = span.context();
    let otel = context.span();
    let ids = otel.span_context();
    if ids.is_valid() {
        span.record("trace_id", tracing::field::display(ids.trace_id()));
        span.record("span_id", tracing::field::display(ids.span_id()));
    }
}

tokio::task_local! {
    /// The context of the request the task serves.
    static REQUEST: Context;
}

/// `span`'s OpenTelemetry context (empty when traces are off).
pub fn context_of(span: &tracing::Span) -> Context {
    if !enabled() || span.is_disabled() {
        return Context::new();
    }
    span.context()
}

/// Runs `serving` (a request's handling) with `context` as its request's trace context,
/// which [`current_context`] answers inside it.
pub async fn in_request<F: std::future::Future>(context: Context, serving: F) -> F::Output {
    REQUEST.scope(context, serving).await
}

/// The trace context of the request being served (its server span's), as
/// [`in_request`] set it: empty when traces are off or outside a request.
pub fn current_context() -> Context {
    if !enabled() {
        return Context::new();
    }
    REQUEST.try_with(Clone::clone).unwrap_or_default()
}

/// [`current_context`] as a W3C `traceparent`: `None` when traces are off or outside a
/// traced request.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    traceparent(&current_context())
}

/// Records a finished span `name` of `kind`, from `start` to `end`, as a child of
/// `parent`, with `attributes`. Nothing is recorded when traces are off or the parent is
/// not sampled.
pub fn span_at(
    name: &'static str,
    kind: SpanKind,
    parent: &Context,
    (start, end): (SystemTime, SystemTime),
    attributes: Vec<KeyValue>,
) {
    if !enabled() || !parent.span().span_context().is_sampled() {
        return;
    }
    static TRACER: std::sync::OnceLock<opentelemetry::global::BoxedTracer> =
        std::sync::OnceLock::new();
    let tracer = TRACER.get_or_init(|| opentelemetry::global::tracer("keel"));
    let mut span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, parent);
    span.end_with_timestamp(end.max(start));
}

/// [`span_at`] under the span a W3C `traceparent` names; nothing when it names none.
pub fn span_under(
    name: &'static str,
    kind: SpanKind,
    traceparent: &str,
    times: (SystemTime, SystemTime),
    attributes: Vec<KeyValue>,
) {
    if !enabled() {
        return;
    }
    if let Some(parent) = parse_traceparent(traceparent) {
        span_at(
            name,
            kind,
            &Context::new().with_remote_span_context(parent),
            times,
            attributes,
        );
    }
}

/// How long one export may take before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends batches of spans to an OTLP/HTTP collector as protobuf.
#[derive(Debug)]
struct OtlpHttp {
    client: reqwest::Client,
    /// `<endpoint>/v1/traces`.
    url: String,
    /// The runtime the requests are sent on.
    runtime: tokio::runtime::Handle,
    resource: ResourceAttributesWithSchema,
}

impl SpanExporter for OtlpHttp {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let request = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &self.resource),
        };
        let (client, url, body) = (
            self.client.clone(),
            self.url.clone(),
            request.encode_to_vec(),
        );
        // Built on the runtime too: the request's timeout needs its timer.
        let sent = self.runtime.spawn(async move {
            client
                .post(url)
                .header("content-type", "application/x-protobuf")
                .timeout(EXPORT_TIMEOUT)
                .body(body)
                .send()
                .await
        });
        async move {
            match sent.await {
                Ok(Ok(response)) if response.status().is_success() => Ok(()),
                Ok(Ok(response)) => Err(OTelSdkError::InternalFailure(format!(
                    "the OTLP collector answered {}",
                    response.status()
                ))),
                Ok(Err(e)) => Err(OTelSdkError::InternalFailure(format!(
                    "sending spans to the OTLP collector: {e}"
                ))),
                Err(e) => Err(OTelSdkError::InternalFailure(format!(
                    "the export task failed: {e}"
                ))),
            }
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.into();
    }
}

/// A tracer provider exporting `service`'s spans to the OTLP/HTTP collector at `endpoint`
/// (`http://host:4318`), sent on `runtime`.
pub fn provider(
    endpoint: &str,
    service: &'static str,
    runtime: tokio::runtime::Handle,
) -> SdkTracerProvider {
    let exporter = OtlpHttp {
        client: reqwest::Client::new(),
        url: format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        runtime,
        resource: (&Resource::builder_empty().build()).into(),
    };
    SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build()
}

/// The `tracing` layer that makes spans OpenTelemetry spans of `provider`.
pub fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("keel"))
}

/// A W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) as a remote span context;
/// `None` when it is malformed or names the invalid trace or span.
pub fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let mut parts = text.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let context = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// `context`'s span as a W3C `traceparent`, when it is valid.
pub fn traceparent(context: &Context) -> Option<String> {
    let span = context.span();
    let span = span.span_context();
    span.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span.trace_id(),
            span.span_id(),
            span.trace_flags().to_u8()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_read_strictly_and_written_back_alike() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = parse_traceparent(text).unwrap();
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(context.is_sampled() && context.is_remote());
        let cx = Context::new().with_remote_span_context(context);
        assert_eq!(traceparent(&cx).as_deref(), Some(text));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
        assert_eq!(traceparent(&Context::new()), None);
    }

    #[test]
    fn the_otlp_endpoint_is_an_http_url_or_unset() {
        assert_eq!(parse_endpoint(None), Ok(None));
        assert_eq!(parse_endpoint(Some(" ")), Ok(None));
        assert_eq!(
            parse_endpoint(Some("http://collector:4318/")),
            Ok(Some("http://collector:4318".into()))
        );
        for bad in ["collector:4318", "grpc://collector:4317", "http://"] {
            let error = parse_endpoint(Some(bad)).unwrap_err();
            assert!(error.contains("KEEL_OTLP_ENDPOINT"), "{error}");
        }
    }

    /// Off (no provider installed), Keel makes no spans and reads no context.
    #[test]
    fn with_traces_off_nothing_is_traced() {
        assert!(!enabled());
        assert_eq!(current_traceparent(), None);
        let span = tracing::info_span!("http.request", trace_id = tracing::field::Empty);
        adopt(
            &span,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert!(!current_context().span().span_context().is_valid());
    }
}

#[cfg(test)]
mod export_tests {
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::extract::State;
    use opentelemetry::trace::{Span as _, Tracer as _};

    use super::*;

    /// Spans reach an OTLP/HTTP receiver as protobuf, with the service's name, and the
    /// receiver decodes them with the reference types.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_are_exported_as_otlp_protobuf() {
        let received: Arc<Mutex<Vec<ExportTraceServiceRequest>>> = Arc::default();
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(
                    |State(received): State<Arc<Mutex<Vec<ExportTraceServiceRequest>>>>,
                     body: Bytes| async move {
                        received
                            .lock()
                            .unwrap()
                            .push(ExportTraceServiceRequest::decode(body).unwrap());
                    },
                ),
            )
            .with_state(Arc::clone(&received));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let provider = provider(
            &format!("http://{addr}/"),
            "keel-test",
            tokio::runtime::Handle::current(),
        );
        let tracer = provider.tracer("keel");
        let parent =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let cx = Context::new().with_remote_span_context(parent);
        let mut span = tracer.start_with_context("decide", &cx);
        span.end();
        let flushing = provider.clone();
        tokio::task::spawn_blocking(move || flushing.force_flush())
            .await
            .unwrap()
            .unwrap();

        let received = received.lock().unwrap();
        let spans: Vec<_> = received
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .collect();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].name, "decide");
        assert_eq!(
            hex::encode(&spans[0].trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(hex::encode(&spans[0].parent_span_id), "00f067aa0ba902b7");
        let service = received[0].resource_spans[0]
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .find(|a| a.key == "service.name")
            .unwrap();
        assert_eq!(
            format!("{:?}", service.value),
            format!(
                "{:?}",
                Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                    value: Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                            "keel-test".into()
                        )
                    )
                })
            )
        );
    }
}
