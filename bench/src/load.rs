//! The HTTP load of the command benchmarks: a mixed shop workload over a fixed set of
//! streams, driven closed-loop by a number of clients, and **B_http**, an axum handler
//! that parses the same bodies and does nothing else.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The streams of the mixed workload and how commands are spread over them.
///
/// Set-up registers `products` products, `customers` customers and half of `orders`
/// orders. Under load, a command is 35% a restock, 15% an e-mail change, 25% a new order
/// (until `orders` exist; then a payment) and 25% a partial payment of an order.
pub struct Workload {
    run: String,
    products: usize,
    customers: usize,
    orders: usize,
    placed: AtomicUsize,
    payments: AtomicU64,
}

/// A small, fast, deterministic generator (xorshift64).
pub struct Rng(u64);

impl Rng {
    /// A generator seeded by `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn eur(minor: i64) -> Value {
    json!({"amount_minor": minor, "currency": "EUR"})
}

impl Workload {
    /// A workload over `streams` streams (a fifth products, three tenths customers, half
    /// orders), with names no other run uses.
    pub fn new(streams: usize) -> Self {
        let products = (streams / 5).max(1);
        let customers = (streams * 3 / 10).max(1);
        let orders = streams.saturating_sub(products + customers).max(2);
        Self {
            run: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
            products,
            customers,
            orders,
            // Set-up places the first half.
            placed: AtomicUsize::new(orders / 2),
            payments: AtomicU64::new(0),
        }
    }

    /// The streams in all.
    pub fn streams(&self) -> usize {
        self.products + self.customers + self.orders
    }

    fn place(&self, n: usize) -> (String, Value) {
        (
            format!("/v1/orders/o-{}-{n}/place", self.run),
            json!({"customer_id": format!("c-{}-{}", self.run, n % self.customers),
                   "lines": [{"sku": format!("p-{}-{}", self.run, n % self.products), "quantity": 2,
                              "unit_price": eur(1_000_000)}]}),
        )
    }

    /// The commands that create the set-up's streams.
    pub fn setup(&self) -> Vec<(String, Value)> {
        let products = (0..self.products).map(|i| {
            (
                format!("/v1/products/p-{}-{i}/register", self.run),
                json!({"name": format!("Product {i}"), "price": eur(1_000_000)}),
            )
        });
        let customers = (0..self.customers).map(|i| {
            (
                format!("/v1/customers/c-{}-{i}/register", self.run),
                json!({"email": format!("c{i}@shop.example"), "name": format!("Customer {i}")}),
            )
        });
        let orders = (0..self.orders / 2).map(|n| self.place(n));
        products.chain(customers).chain(orders).collect()
    }

    /// The next command of the mixed workload.
    pub fn next(&self, rng: &mut Rng) -> (String, Value) {
        let roll = rng.below(100);
        if roll < 35 {
            let i = rng.below(self.products);
            return (
                format!("/v1/products/p-{}-{i}/restock", self.run),
                json!({"quantity": 1}),
            );
        }
        if roll < 50 {
            let i = rng.below(self.customers);
            return (
                format!("/v1/customers/c-{}-{i}/change-email", self.run),
                json!({"email": format!("c{i}.{}@shop.example", rng.below(1_000_000))}),
            );
        }
        if roll < 75 {
            let n = self.placed.fetch_add(1, Ordering::Relaxed);
            if n < self.orders {
                return self.place(n);
            }
        }
        let placed = self.placed.load(Ordering::Relaxed).clamp(1, self.orders);
        let n = rng.below(placed);
        let reference = self.payments.fetch_add(1, Ordering::Relaxed);
        (
            format!("/v1/orders/o-{}-{n}/pay", self.run),
            json!({"amount": eur(1), "payment_ref": format!("pay-{reference}")}),
        )
    }
}

/// Whether a request was answered 2xx, its body read to the end (so its transfer is
/// timed and the connection can be reused).
pub async fn answered(response: reqwest::Result<reqwest::Response>) -> bool {
    match response {
        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
        Err(_) => false,
    }
}

/// What a closed-loop run measured.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Latencies of the successful requests, sorted.
    pub latencies: Vec<Duration>,
    /// Successful requests completed in each second of the run.
    pub per_second: Vec<u64>,
    /// Requests that failed or answered other than 2xx.
    pub errors: u64,
    /// The run's length in seconds.
    pub elapsed: f64,
}

impl LoadResult {
    /// Successful requests per second over the run.
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.max(f64::MIN_POSITIVE)
    }

    /// The `p` quantile (0 to 1) of the latencies.
    pub fn percentile(&self, p: f64) -> Duration {
        super::percentile(&self.latencies, p)
    }
}

/// POSTs every command of `commands` to `base`, `in_flight` at a time; returns how many
/// did not answer 2xx.
pub async fn post_all(
    client: &reqwest::Client,
    base: &str,
    commands: Vec<(String, Value)>,
    in_flight: usize,
) -> u64 {
    let mut tasks = tokio::task::JoinSet::new();
    let mut failed = 0;
    for (path, body) in commands {
        let (client, url) = (client.clone(), format!("{base}{path}"));
        tasks.spawn(async move { answered(client.post(url).json(&body).send().await).await });
        while tasks.len() >= in_flight {
            if let Some(Ok(false) | Err(_)) = tasks.join_next().await {
                failed += 1;
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if !matches!(done, Ok(true)) {
            failed += 1;
        }
    }
    failed
}

/// Drives `base` with `clients` clients, each sending the workload's next command as
/// soon as its previous one is answered, for `seconds`, through `client` (its token).
pub async fn closed_loop(
    client: &reqwest::Client,
    base: &str,
    workload: Arc<Workload>,
    clients: usize,
    seconds: u64,
) -> LoadResult {
    let stop = Arc::new(AtomicBool::new(false));
    let buckets: Arc<Vec<AtomicU64>> =
        Arc::new((0..seconds + 2).map(|_| AtomicU64::new(0)).collect());
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (client, base, stop, workload, buckets) = (
            client.clone(),
            base.to_owned(),
            stop.clone(),
            workload.clone(),
            buckets.clone(),
        );
        workers.spawn(async move {
            let mut rng = Rng::new(c as u64 + 1);
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                let (path, body) = workload.next(&mut rng);
                let sent = Instant::now();
                if answered(
                    client
                        .post(format!("{base}{path}"))
                        .json(&body)
                        .send()
                        .await,
                )
                .await
                {
                    latencies.push(sent.elapsed());
                    let second = started.elapsed().as_secs() as usize;
                    if let Some(bucket) = buckets.get(second) {
                        bucket.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        });
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut result = LoadResult::default();
    while let Some(done) = workers.join_next().await {
        if let Ok((latencies, errors)) = done {
            result.latencies.extend(latencies);
            result.errors += errors;
        }
    }
    result.elapsed = started.elapsed().as_secs_f64();
    result.latencies.sort();
    result.per_second = buckets
        .iter()
        .take(seconds as usize)
        .map(|b| b.load(Ordering::Relaxed))
        .collect();
    result
}

/// Starts **B_http**: any `POST /v1/{collection}/{id}/{command}` has its JSON body
/// parsed and is answered 200 with a small JSON body, as a command would be, with
/// nothing else done. Returns its base URL.
pub async fn baseline_http() -> anyhow::Result<String> {
    use axum::Json;
    use axum::extract::Path;

    async fn handle(
        Path((collection, id, command)): Path<(String, String, String)>,
        Json(body): Json<Value>,
    ) -> Json<Value> {
        Json(
            json!({"stream": {"type": collection, "id": id}, "command": command,
                    "fields": body.as_object().map_or(0, |o| o.len())}),
        )
    }
    let app = axum::Router::new().route(
        "/v1/{collection}/{id}/{command}",
        axum::routing::post(handle),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_stays_within_its_streams_and_mixes_commands() {
        let workload = Workload::new(1000);
        assert_eq!(workload.streams(), 1000);
        let setup = workload.setup();
        assert_eq!(setup.len(), 200 + 300 + 250);
        let mut rng = Rng::new(7);
        let mut kinds = std::collections::BTreeMap::new();
        let mut streams = std::collections::BTreeSet::new();
        for _ in 0..10_000 {
            let (path, _) = workload.next(&mut rng);
            let parts: Vec<&str> = path.split('/').collect();
            *kinds.entry(parts[4].to_owned()).or_insert(0) += 1;
            streams.insert(format!("{}/{}", parts[2], parts[3]));
        }
        assert!(streams.len() <= 1000, "{} streams", streams.len());
        for kind in ["restock", "change-email", "pay"] {
            assert!(kinds.get(kind).is_some_and(|n| *n > 500), "{kinds:?}");
        }
        // Every order is placed once, then paid.
        assert_eq!(kinds["place"], 250);
    }
}
