//! Drives the command API over HTTP and reports accepted commands/s and latency.
//!
//! ```sh
//! cargo run --release -p keel-tests --bin command-load -- http://127.0.0.1:8080 64 10 1000
//! ```
//! Arguments: base URL, concurrent clients (64), seconds (10), products (1,000). The
//! products are registered first; then every client restocks random ones, one request
//! at a time, for the given time.
//!
//! With `baseline` for the URL it drives **B_http** instead: an axum handler in this
//! process that parses the same JSON bodies and answers 200 doing nothing else, with the
//! same client at the same concurrency. The ratio of the two is what command handling
//! costs beyond HTTP and JSON.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut base = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let label = if base == "baseline" {
        "B_http"
    } else {
        "commands"
    };
    let clients: usize = args
        .get(2)
        .map_or(Ok(64), |s| s.parse())
        .context("clients")?;
    let seconds: u64 = args
        .get(3)
        .map_or(Ok(10), |s| s.parse())
        .context("seconds")?;
    let products: usize = args
        .get(4)
        .map_or(Ok(1000), |s| s.parse())
        .context("products")?;
    let run = format!("{:08x}", std::process::id());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        if base == "baseline" {
            base = format!("http://{}", baseline_http().await?);
        }
        let client = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
        let sku = |i: usize| format!("LOAD-{run}-{i}");
        // Register the products, 64 at a time.
        let mut pending = tokio::task::JoinSet::new();
        for i in 0..products {
            let (client, url) = (client.clone(), format!("{base}/v1/products/{}/register", sku(i)));
            pending.spawn(async move {
                client
                    .post(url)
                    .json(&json!({"name": "Load", "price": {"amount_minor": 100, "currency": "EUR"}}))
                    .send()
                    .await
            });
            if pending.len() >= 64 {
                pending.join_next().await;
            }
        }
        while pending.join_next().await.is_some() {}

        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for c in 0..clients {
            let (client, base, stop) = (client.clone(), base.clone(), stop.clone());
            let skus: Vec<String> = (0..products).map(sku).collect();
            workers.spawn(async move {
                let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ (c as u64 + 1);
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                while !stop.load(Ordering::Relaxed) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let url = format!("{base}/v1/products/{}/restock", skus[(state % skus.len() as u64) as usize]);
                    let sent = Instant::now();
                    match client.post(url).json(&json!({"quantity": 1})).send().await {
                        Ok(r) if r.status().is_success() => latencies.push(sent.elapsed()),
                        _ => errors += 1,
                    }
                }
                (latencies, errors)
            });
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let (mut latencies, mut errors) = (Vec::new(), 0);
        while let Some(done) = workers.join_next().await {
            let (l, e) = done?;
            latencies.extend(l);
            errors += e;
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort();
        let pct = |p: f64| keel_tests::bench::percentile(&latencies, p);
        println!(
            "{label}: {} accepted in {elapsed:.1} s = {:.0}/s with {clients} clients; p50 {:.1} ms, p99 {:.1} ms; {errors} errors",
            latencies.len(),
            latencies.len() as f64 / elapsed,
            pct(0.50).as_secs_f64() * 1000.0,
            pct(0.99).as_secs_f64() * 1000.0,
        );
        anyhow::Ok(())
    })
}

/// B_http: parses a command body as the command API would and answers 200.
async fn baseline_http() -> anyhow::Result<std::net::SocketAddr> {
    use axum::Json;
    use axum::extract::Path;
    use axum::http::StatusCode;

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code, reason = "parsed like a command body, then dropped")]
    struct Body {
        quantity: Option<u64>,
        name: Option<String>,
        price: Option<serde_json::Value>,
    }
    async fn handle(
        Path((_sku, _action)): Path<(String, String)>,
        Json(body): Json<Body>,
    ) -> (StatusCode, Json<serde_json::Value>) {
        let ok = body.quantity.is_some() || body.name.is_some();
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::BAD_REQUEST
        };
        (status, Json(json!({"ok": ok})))
    }
    let app = axum::Router::new().route("/v1/products/{sku}/{action}", axum::routing::post(handle));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}
