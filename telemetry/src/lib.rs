//! What every Keel process shares about running: the logging set-up, its metrics, the
//! shutdown signal, and reading its command line and environment. The query API links
//! this, not `keel-kafka`: it reads PostgreSQL only.

use std::io::IsTerminal;

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

/// Installs the global `tracing` subscriber: `RUST_LOG` if set, else `default_filter`;
/// written as `KEEL_LOG_FORMAT` says (JSON lines, or text on a terminal, when unset).
/// Exits with a message on a `KEEL_LOG_FORMAT` that is neither.
pub fn init(default_filter: &str) {
    let format = std::env::var("KEEL_LOG_FORMAT").ok();
    let format = match LogFormat::parse(format.as_deref(), std::io::stderr().is_terminal()) {
        Ok(format) => format,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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
