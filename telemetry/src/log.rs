//! JSON log lines that carry the trace and span ids of the span they were written in, as
//! top-level `trace_id` and `span_id` fields, where log shippers look for them.
//!
//! Keel's spans record their ids as the fields `trace_id` and `span_id`
//! ([`crate::trace::record_ids`]); [`TraceIds`] keeps them with the span, and
//! [`JsonWithIds`] writes the innermost traced span's ids at the start of each line.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, span};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// A traced span's ids, kept in its extensions.
#[derive(Debug, Default)]
struct Ids {
    trace_id: Option<String>,
    span_id: Option<String>,
}

impl Visit for Ids {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, format!("{value:?}"));
    }
}

impl Ids {
    fn record(&mut self, field: &Field, value: String) {
        match field.name() {
            "trace_id" => self.trace_id = Some(value),
            "span_id" => self.span_id = Some(value),
            _ => {}
        }
    }
}

/// The layer that keeps the `trace_id` and `span_id` a span records with the span.
pub(crate) struct TraceIds;

impl<S> tracing_subscriber::Layer<S> for TraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let mut recorded = Ids::default();
        values.record(&mut recorded);
        if recorded.trace_id.is_none() && recorded.span_id.is_none() {
            return;
        }
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        match extensions.get_mut::<Ids>() {
            Some(ids) => {
                ids.trace_id = recorded.trace_id.or(ids.trace_id.take());
                ids.span_id = recorded.span_id.or(ids.span_id.take());
            }
            None => extensions.insert(recorded),
        }
    }
}

/// The JSON event format, with the innermost traced span's `trace_id` and `span_id` first.
pub(crate) struct JsonWithIds(pub(crate) Format<Json>);

impl<S, N> FormatEvent<S, N> for JsonWithIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let ids = ctx.event_scope().and_then(|scope| {
            scope.into_iter().find_map(|span| {
                let extensions = span.extensions();
                let ids = extensions.get::<Ids>()?;
                Some((ids.trace_id.clone()?, ids.span_id.clone()?))
            })
        });
        // Ids as Keel records them: hex, nothing to escape.
        let hex = |id: &str| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit());
        let ids = ids.filter(|(trace, span)| hex(trace) && hex(span));
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing::field::Empty;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(bytes)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A line written inside a span that recorded its ids starts with them, the innermost
    /// traced span's; a line outside any is the JSON format's as it was.
    #[test]
    fn json_lines_written_in_a_traced_span_carry_its_ids_first() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(TraceIds).with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(move || writer.clone())
                .event_format(JsonWithIds(
                    tracing_subscriber::fmt::format().json().flatten_event(true),
                )),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(n = 1, "outside");
            let outer = tracing::info_span!("request", trace_id = Empty, span_id = Empty);
            outer.record("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
            outer.record("span_id", "00f067aa0ba902b7");
            outer.in_scope(|| {
                tracing::info!(n = 2, "inside");
                let untraced = tracing::info_span!("step");
                untraced.in_scope(|| tracing::info!(n = 3, "deeper"));
                let inner = tracing::info_span!("wait", trace_id = Empty, span_id = Empty);
                inner.record("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
                inner.record("span_id", "b7ad6b7169203331");
                inner.in_scope(|| tracing::info!(n = 4, "innermost"));
            });
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        assert_eq!(lines[0]["message"], "outside");
        for (line, span) in [
            (&lines[1], "00f067aa0ba902b7"),
            (&lines[2], "00f067aa0ba902b7"),
            (&lines[3], "b7ad6b7169203331"),
        ] {
            assert_eq!(
                line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
                "{line}"
            );
            assert_eq!(line["span_id"], span, "{line}");
        }
        assert_eq!(lines[3]["message"], "innermost");
        assert_eq!(lines[3]["n"], 4);
        assert!(text.lines().nth(1).unwrap().starts_with("{\"trace_id\":"));
    }
}
