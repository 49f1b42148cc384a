use anyhow::Context;
use axum::Router;
use axum::routing::get;
use keel_kafka::ensure_topics;
use tokio::net::TcpListener;
use tracing::info;

use crate::Settings;

/// The HTTP routes.
pub fn app() -> Router {
    Router::new().route("/healthz", get(|| async { "ok" }))
}

/// A built command API: topics ensured, listener bound.
pub struct Application {
    listener: TcpListener,
}

impl Application {
    /// Ensures the topics exist and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let topics = ensure_topics(&settings.kafka, &keel_domain::STREAM_TYPES)
            .await
            .context("ensuring the topics")?;
        info!(?topics, "topics ready");
        let listener = TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("binding {}", settings.addr))?;
        Ok(Self { listener })
    }

    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until Ctrl-C or SIGTERM, then finishes in-flight requests.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        info!(addr = %self.local_addr()?, "command API listening");
        axum::serve(self.listener, app())
            .with_graceful_shutdown(keel_kafka::telemetry::shutdown_signal())
            .await
            .context("serving HTTP")
    }
}
