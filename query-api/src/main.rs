//! Keel's query API: reads the PostgreSQL views. This build serves its health route; the
//! view, audit and status routes build on it.

use anyhow::Context;
use axum::Router;
use axum::routing::get;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keel_kafka::telemetry::init("query_api=info");
    let addr = std::env::var("KEEL_QUERY_ADDR").unwrap_or_else(|_| "127.0.0.1:8081".into());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding KEEL_QUERY_ADDR {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "query API listening");
    let app = Router::new().route("/healthz", get(|| async { "ok" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(keel_kafka::telemetry::shutdown_signal())
        .await
        .context("serving HTTP")
}
