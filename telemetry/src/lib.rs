//! What every Keel process shares about running: the logging set-up, its metrics, the
//! shutdown signal, and reading its command line and environment. The query API links
//! this, not `keel-kafka`: it reads PostgreSQL only.

use std::io::IsTerminal;

mod log;
pub mod metrics;
pub mod trace;

use tracing_subscriber::EnvFilter;

/// How log lines are written (`KEEL_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for log shippers.
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// `KEEL_LOG_FORMAT`'s value (`json` or `text`); unset or empty, JSON unless standard
    /// error is a terminal.
    pub fn parse(value: Option<&str>, terminal: bool) -> Result<Self, String> {
        match value.map(str::trim) {
            None | Some("") => Ok(if terminal { Self::Text } else { Self::Json }),
            Some(v) if v.eq_ignore_ascii_case("json") => Ok(Self::Json),
            Some(v) if v.eq_ignore_ascii_case("text") => Ok(Self::Text),
            Some(other) => Err(format!(
                "KEEL_LOG_FORMAT {other:?} must be json or text (unset: json, or text on a terminal)"
            )),
        }
    }
}

/// What [`init`] set up that needs an orderly end: the trace exporter, when traces are
/// exported. Call [`Telemetry::shutdown`] before the process exits, so the last spans
/// are sent.
#[must_use = "shut it down before exiting, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans not yet exported and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The batch exporter blocks while it sends; the sends run on this runtime.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Installs the global `tracing` subscriber: `RUST_LOG` if set, else `default_filter`;
/// written as `KEEL_LOG_FORMAT` says (JSON lines, or text on a terminal, when unset).
/// With `KEEL_OTLP_ENDPOINT` set, Keel's spans are also exported there over OTLP/HTTP as
/// `service`'s, and every log line written inside one carries its trace and span ids.
/// Call it from within the Tokio runtime the process runs on. Exits with a message on a
/// `KEEL_LOG_FORMAT` or `KEEL_OTLP_ENDPOINT` it cannot use.
pub fn init(default_filter: &str, service: &'static str) -> Telemetry {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let fail = |message: String| -> ! {
        eprintln!("error: {message}");
        std::process::exit(2);
    };
    let format = std::env::var("KEEL_LOG_FORMAT").ok();
    let format = LogFormat::parse(format.as_deref(), std::io::stderr().is_terminal())
        .unwrap_or_else(|message| fail(message));
    let endpoint = std::env::var("KEEL_OTLP_ENDPOINT").ok();
    let endpoint = trace::parse_endpoint(endpoint.as_deref()).unwrap_or_else(|m| fail(m));
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let provider = endpoint.map(|endpoint| {
        let runtime = tokio::runtime::Handle::try_current().unwrap_or_else(|_| {
            fail("traces are exported from within the Tokio runtime: call init there".into())
        });
        trace::provider(&endpoint, service, runtime)
    });
    if provider.is_some()
        && let Ok(directive) = trace::DIRECTIVE.parse()
    {
        // Keel's own spans are exported whatever the log level says.
        filter = filter.add_directive(directive);
    }
    // Only Keel's own spans are exported (not every span the log level enables, such as
    // an owner's, which lives as long as the owner).
    let otel = provider.as_ref().map(|provider| {
        use tracing_subscriber::Layer as _;
        trace::layer(provider).with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(trace::TARGET, tracing::Level::INFO),
        )
    });
    let ids = provider.as_ref().map(|_| log::TraceIds);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(ids);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // A second call (tests) keeps the first subscriber.
    let installed = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry
            .with(fmt.json().event_format(log::JsonWithIds(
                tracing_subscriber::fmt::format().json().flatten_event(true),
            )))
            .try_init(),
    };
    match provider {
        Some(provider) if installed.is_ok() => {
            trace::enable(&provider);
            Telemetry {
                provider: Some(provider),
            }
        }
        _ => Telemetry { provider: None },
    }
}

/// The body of a Keel binary's `main`: [`init`], then `work`, then the exporter's
/// [`Telemetry::shutdown`] whatever `work` returned, so its last spans are sent.
pub async fn running<T>(
    default_filter: &str,
    service: &'static str,
    work: impl std::future::Future<Output = T>,
) -> T {
    let telemetry = init(default_filter, service);
    let done = work.await;
    telemetry.shutdown().await;
    done
}

/// Resolves on Ctrl-C or SIGTERM: the signal for a graceful shutdown.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

/// Parses the command line into `T`, each option falling back to its environment variable
/// as clap's `env` does, except that a variable set to the empty string counts as unset,
/// as Keel's `KEEL_*` variables always have. Exits with clap's message on a bad command
/// line, and prints `--help` and `--version`.
pub fn parse_args<T: clap::Parser>() -> T {
    let command = T::command().mut_args(|arg| match arg.get_env() {
        Some(name) if std::env::var_os(name).is_some_and(|v| v.is_empty()) => {
            arg.env(None::<&'static str>)
        }
        _ => arg,
    });
    let matches = command.get_matches();
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

#[cfg(test)]
mod tests {
    use super::LogFormat;

    #[test]
    fn the_log_format_is_json_off_a_terminal_unless_told() {
        assert_eq!(LogFormat::parse(None, false), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse(None, true), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some(""), true), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("text"), false), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some(" JSON "), true), Ok(LogFormat::Json));
        let error = LogFormat::parse(Some("yaml"), false).unwrap_err();
        assert!(
            error.contains("KEEL_LOG_FORMAT \"yaml\" must be json or text"),
            "{error}"
        );
    }
}
