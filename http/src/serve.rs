//! Serving a router over HTTP or, with `KEEL_TLS_CERT`/`KEEL_TLS_KEY`, HTTPS (rustls), with
//! a header-read timeout against slow clients and a graceful shutdown.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use hyper_util::rt::TokioTimer;
use tokio::net::TcpListener;

use crate::settings::EdgeSettings;

/// Serves `app` on `listener` until `shutdown` completes, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: &EdgeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = listener.into_std().context("taking the listener")?;
    let handle = Handle::new();
    let stopper = handle.clone();
    // In-flight requests may finish: none takes longer than the request timeout.
    let grace = settings.timeout + Duration::from_secs(1);
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(grace));
    });
    // The peer address reaches the handlers (the edge limits refused tokens per address).
    let service = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    match &settings.tls {
        None => {
            let server = axum_server::from_tcp(listener)?.handle(handle);
            tuned(server, settings).serve(service).await?;
        }
        Some(tls) => {
            let config = tls_config(&tls.cert, &tls.key).await?;
            let server = axum_server::from_tcp_rustls(listener, config)?.handle(handle);
            tuned(server, settings).serve(service).await?;
        }
    }
    Ok(())
}

/// HTTP/1.1 only, with a deadline for the request headers.
fn tuned<A: axum_server::Address, Acc>(
    server: axum_server::Server<A, Acc>,
    settings: &EdgeSettings,
) -> axum_server::Server<A, Acc> {
    let mut server = server.http1_only();
    server
        .http_builder()
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout);
    server
}

/// Makes ring the process's TLS provider (for servers and for clients such as the
/// command API's forwarding one). Installing twice is harmless: the first one stays.
pub fn use_ring_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The rustls configuration of a PEM certificate chain and key, with ring as the provider.
pub async fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<RustlsConfig> {
    use_ring_provider();
    RustlsConfig::from_pem_file(cert, key)
        .await
        .with_context(|| {
            format!(
                "reading the TLS certificate {} and key {}",
                cert.display(),
                key.display()
            )
        })
}
