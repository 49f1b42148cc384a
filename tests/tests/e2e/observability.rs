//! What the processes export for Prometheus, against the real stack: every documented
//! metric moves when the thing it counts happens, and the number of series does not grow
//! with the number of streams.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_http::Role;
use keel_kafka::{LogProducer, partition_for};
use keel_tests::{Service, Stack, eur};
use reqwest::StatusCode;
use serde_json::json;

/// One scrape: each series (name and labels, as written) and its value.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    /// The value of `series`, 0 when it is absent (a counter not yet counted).
    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// Whether `series` is exported.
    fn has(&self, series: &str) -> bool {
        self.0.contains_key(series)
    }

    /// The sum over every series of `name` whose labels contain each of `labels`.
    fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                series.split('{').next() == Some(name) && labels.iter().all(|l| series.contains(l))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// How many series there are.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// `GET /metrics` of `service`, without a token, parsed.
pub(crate) async fn scrape(service: &Service) -> Scrape {
    let r = reqwest::get(service.url("/metrics")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
            || r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    Scrape(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap();
                (series.to_owned(), value.parse().unwrap())
            })
            .collect(),
    )
}

/// One scrape of each process: command API, query API, projector (in [`Proc`]'s order).
async fn scrape_all(stack: &Stack) -> [Scrape; 3] {
    [
        scrape(&stack.command).await,
        scrape(&stack.query).await,
        scrape(stack.projector.as_ref().unwrap()).await,
    ]
}

/// Scrapes `service` until `check` holds of a scrape (up to 60 s), and returns it.
async fn until(service: &Service, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = scrape(service).await;
        if check(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what} never held: {now:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Which process exports a row's series.
#[derive(Clone, Copy, Debug)]
enum Proc {
    Command,
    Query,
    Projector,
}

/// How a row's series must have changed between the scrape before the actions and the
/// one after.
#[derive(Clone, Copy, Debug)]
enum Moved {
    /// Grew by exactly this much.
    By(f64),
    /// Grew.
    Up,
    /// Ends at this value.
    Is(f64),
    /// Ends above this value.
    Above(f64),
}

/// Each documented metric, made to move by what the test does: a conflict increments the
/// conflict counter, a poison record the dead-letter and parked gauges, a stopped
/// projector the consistency-wait timeouts, a projector of other projections the lag, and so on.
#[tokio::test]
async fn every_documented_metric_moves_when_what_it_counts_happens() {
    let mut stack = Stack::start("metrics", 2).await;
    let n = stack.config.partitions;
    // Each partition's owner and the views have started; this is where counting begins.
    let (status, _, _) = stack
        .post(
            "/v1/products/WARM-1/register",
            json!({"name": "Warm", "price": eur(100)}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let projector = stack.projector.as_ref().unwrap();
    let before = scrape_all(&stack).await;

    // The write path's outcomes.
    let keyed = |key: &str| {
        stack
            .client
            .post(stack.command.url("/v1/products/MUG-1/register"))
            .header("idempotency-key", key.to_owned())
            .json(&json!({"name": "Mug", "price": eur(1299)}))
    };
    assert_eq!(
        keyed("k-1").send().await.unwrap().status(),
        StatusCode::CREATED
    );
    let replayed = keyed("k-1").send().await.unwrap();
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    let (status, _, _) = stack
        .post(
            "/v1/products/MUG-1/register",
            json!({"name": "Mug", "price": eur(1299)}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let r = stack
        .client
        .post(stack.command.url("/v1/products/MUG-1/restock"))
        .header("if-match", "\"9\"")
        .json(&json!({"quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let (status, _, _) = stack
        .post("/v1/products/MUG-1/restock", json!({"quantity": -1}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _, _) = stack
        .post("/v1/products/NONE/restock", json!({"quantity": 1}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, mug) = stack
        .post("/v1/products/MUG-1/restock", json!({"quantity": 5}))
        .await;
    assert_eq!(status, StatusCode::OK);

    // The edge's refusals, each by its reason.
    let auth = &stack.config.auth;
    let plain = reqwest::Client::new();
    let refused = |bearer: Option<String>| {
        let mut request = plain
            .post(stack.command.url("/v1/products/MUG-1/restock"))
            .json(&json!({"quantity": 1}));
        if let Some(t) = bearer {
            request = request.bearer_auth(t);
        }
        request.send()
    };
    assert_eq!(
        refused(None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        refused(Some("not.a.token".into())).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let mut expired = keel_tests::TestAuth::claims("ops", &[Role::CommandsWrite]);
    expired.exp = expired.iat - 3600;
    assert_eq!(
        refused(Some(auth.sign(&expired))).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        refused(Some(auth.token("reader", &[Role::QueriesRead])))
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    // A query API whose subjects may send one request a second: the second is limited.
    let mut limited = stack.config.clone();
    limited.extra_env.extend([
        ("KEEL_RATE_LIMIT_RPS", "1".into()),
        ("KEEL_RATE_LIMIT_BURST", "1".into()),
    ]);
    let slow_reads = Service::query_api(&limited, &stack.db.url()).await.unwrap();
    let limited_before = scrape(&slow_reads).await;
    let statuses = [
        slow_reads
            .client
            .get(slow_reads.url("/v1/products/MUG-1"))
            .send()
            .await
            .unwrap()
            .status(),
        slow_reads
            .client
            .get(slow_reads.url("/v1/products/MUG-1"))
            .send()
            .await
            .unwrap()
            .status(),
    ];
    assert_eq!(statuses[1], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
    let limited_after = scrape(&slow_reads).await;
    let series = r#"keel_http_rate_limited_total{limit="subject"}"#;
    assert_eq!(limited_after.get(series) - limited_before.get(series), 1.0);

    // A read that waits for its command's token.
    let (status, product) = stack.get("/v1/products/MUG-1", mug.as_ref()).await;
    assert_eq!(status, StatusCode::OK, "{product}");

    // A poison record on an order's partition: the projection parks that stream.
    let (status, _, placed) = stack
        .post(
            "/v1/orders/P-1/place",
            json!({"customer_id": "c-1", "lines": [{"sku": "MUG-1", "quantity": 1, "unit_price": eur(1299)}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    stack.get("/v1/orders/P-1", placed.as_ref()).await;
    let settings = stack.broker.settings(&stack.config.prefix, n);
    let order_topic = settings.topic("order");
    let poisoned = partition_for(b"P-1", n);
    LogProducer::new(&settings)
        .unwrap()
        .append(&order_topic, poisoned, "P-1", b"{not json", &[])
        .await
        .unwrap();
    let parked = format!(
        r#"keel_projection_parked_streams{{projection="orders",topic="{order_topic}",partition="{poisoned}"}}"#
    );
    // Both rows of its transaction (the status is read query by query, not as one snapshot).
    until(projector, "the poisoned stream is parked", |s| {
        s.get(&parked) >= 1.0
            && s.get(r#"keel_projection_dead_letters{projection="orders"}"#) >= 1.0
    })
    .await;

    let after = scrape_all(&stack).await;
    let product_topic = settings.topic("product");
    let mug_partition = partition_for(b"MUG-1", n);
    let mug_at = format!(r#"topic="{product_topic}",partition="{mug_partition}""#);
    let command = |outcome: &str, command: &str| {
        format!(r#"keel_commands_total{{command="{command}",outcome="{outcome}"}}"#)
    };
    let rows: Vec<(Proc, String, Moved)> = vec![
        (Proc::Command, command("accepted", "RegisterProduct"), Moved::By(1.0)),
        (Proc::Command, command("replayed", "RegisterProduct"), Moved::By(1.0)),
        (Proc::Command, command("conflict", "RegisterProduct"), Moved::By(1.0)),
        (Proc::Command, command("precondition_failed", "Restock"), Moved::By(1.0)),
        (Proc::Command, command("invalid", "Restock"), Moved::By(1.0)),
        (Proc::Command, command("not_found", "Restock"), Moved::By(1.0)),
        (Proc::Command, command("accepted", "Restock"), Moved::By(1.0)),
        (Proc::Command, command("accepted", "PlaceOrder"), Moved::By(1.0)),
        (Proc::Command, r#"keel_auth_failures_total{reason="missing"}"#.into(), Moved::By(1.0)),
        (Proc::Command, r#"keel_auth_failures_total{reason="invalid"}"#.into(), Moved::By(1.0)),
        (Proc::Command, r#"keel_auth_failures_total{reason="expired"}"#.into(), Moved::By(1.0)),
        (Proc::Command, r#"keel_auth_failures_total{reason="forbidden"}"#.into(), Moved::By(1.0)),
        (
            Proc::Command,
            r#"keel_http_requests_total{route="/v1/{collection}/{id}/{command}",method="POST",status="409"}"#.into(),
            Moved::By(1.0),
        ),
        (
            Proc::Command,
            // The registration, its replay and the order.
            r#"keel_http_request_duration_seconds_count{route="/v1/{collection}/{id}/{command}",method="POST",status="201"}"#.into(),
            Moved::By(3.0),
        ),
        (Proc::Command, r#"keel_command_phase_duration_seconds_count{phase="queue"}"#.into(), Moved::Up),
        (Proc::Command, r#"keel_command_phase_duration_seconds_count{phase="decide"}"#.into(), Moved::Up),
        (Proc::Command, r#"keel_command_phase_duration_seconds_count{phase="append"}"#.into(), Moved::Up),
        (Proc::Command, r#"keel_command_phase_duration_seconds_count{phase="read_back"}"#.into(), Moved::Up),
        (Proc::Command, "keel_command_flush_commits_count".into(), Moved::Up),
        (Proc::Command, "keel_command_flush_commits_sum".into(), Moved::Up),
        (
            Proc::Command,
            format!(r#"keel_partition_owner_state{{{mug_at},state="serving"}}"#),
            Moved::Is(1.0),
        ),
        (Proc::Command, format!("keel_partition_owner_epoch{{{mug_at}}}"), Moved::Above(0.0)),
        (Proc::Command, format!("keel_partition_last_offset{{{mug_at}}}"), Moved::Up),
        (Proc::Command, format!("keel_idempotency_keys{{{mug_at}}}"), Moved::By(1.0)),
        (Proc::Command, "keel_partitions".into(), Moved::Is(f64::from(3 * n))),
        (Proc::Command, "keel_partitions_unserved".into(), Moved::Is(0.0)),
        (Proc::Command, "process_cpu_seconds_total".into(), Moved::Up),
        (Proc::Command, "process_resident_memory_bytes".into(), Moved::Above(0.0)),
        (Proc::Command, "process_open_fds".into(), Moved::Above(0.0)),
        (
            Proc::Query,
            r#"keel_consistency_wait_duration_seconds_count{projection="products"}"#.into(),
            Moved::By(1.0),
        ),
        (
            Proc::Query,
            r#"keel_http_requests_total{route="/v1/products/{sku}",method="GET",status="200"}"#.into(),
            Moved::By(1.0),
        ),
        (Proc::Query, "process_resident_memory_bytes".into(), Moved::Above(0.0)),
        (
            Proc::Projector,
            r#"keel_projection_events_applied_total{projection="products",mode="live"}"#.into(),
            Moved::Up,
        ),
        (
            Proc::Projector,
            r#"keel_projection_batches_total{projection="orders",mode="live"}"#.into(),
            Moved::Up,
        ),
        (
            Proc::Projector,
            r#"keel_projection_batch_duration_seconds_count{projection="orders",mode="live"}"#.into(),
            Moved::Up,
        ),
        (Proc::Projector, r#"keel_projection_dead_letters{projection="orders"}"#.into(), Moved::By(1.0)),
        (Proc::Projector, parked.clone(), Moved::Is(1.0)),
        (Proc::Projector, r#"keel_projection_generation{projection="orders"}"#.into(), Moved::Above(0.0)),
        (Proc::Projector, r#"keel_projection_running{projection="orders"}"#.into(), Moved::Is(1.0)),
        (Proc::Projector, r#"keel_projection_rebuilding{projection="orders"}"#.into(), Moved::Is(0.0)),
        (
            Proc::Projector,
            format!(r#"keel_projection_partition_held{{projection="products",{mug_at}}}"#),
            Moved::Is(1.0),
        ),
        (
            Proc::Projector,
            format!(r#"keel_projection_lag_records{{projection="products",{mug_at}}}"#),
            Moved::Is(0.0),
        ),
        (Proc::Projector, "process_resident_memory_bytes".into(), Moved::Above(0.0)),
    ];
    let mut wrong = Vec::new();
    for (from, series, moved) in &rows {
        let i = *from as usize;
        let (was, is) = (before[i].get(series), after[i].get(series));
        let ok = after[i].has(series)
            && match moved {
                Moved::By(d) => is - was == *d,
                Moved::Up => is > was,
                Moved::Is(v) => is == *v,
                Moved::Above(v) => is > *v,
            };
        if !ok {
            wrong.push(format!(
                "{from:?} {series}: {was} -> {is}, wanted {moved:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{}\n{}",
        wrong.join("\n"),
        stack.projection("orders").await
    );

    // The projector stops: a read's token is not reached in time, and the timeout counted.
    let query_before = scrape(&stack.query).await;
    stack.projector.take().unwrap().stop().await.unwrap();
    let (status, _, stalled) = stack
        .post("/v1/products/MUG-1/restock", json!({"quantity": 1}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let r = stack
        .client
        .get(stack.query.url("/v1/products/MUG-1"))
        .header("keel-consistency-token", stalled.unwrap().encode())
        .header("keel-consistency-timeout", "200")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let query_after = scrape(&stack.query).await;
    let timeouts = r#"keel_consistency_wait_timeouts_total{projection="products"}"#;
    assert_eq!(query_after.get(timeouts) - query_before.get(timeouts), 1.0);

    // Orders pile up while it is down. A projector of daily_sales alone (which reads the
    // same topic, and measures where it ends) shows the orders projection behind, in records
    // and in seconds, and its partitions held by nobody.
    let orders = (0..1500).map(|i| {
        (
            format!("/v1/orders/L-{i}/place"),
            json!({"customer_id": "c-2", "lines": [{"sku": "MUG-1", "quantity": 1, "unit_price": eur(100)}]}),
        )
    });
    let token = stack.post_many(orders, 32, StatusCode::CREATED).await;
    let other = stack
        .projector_process(&["run", "--projection", "daily_sales"], &[])
        .await
        .unwrap();
    let orders_only = [r#"projection="orders""#];
    let lagging = until(&other, "the orders projection lags", |s| {
        s.sum("keel_projection_lag_records", &orders_only) >= 1500.0
            && s.sum("keel_projection_lag_seconds", &orders_only) > 0.0
    })
    .await;
    assert_eq!(
        lagging.sum("keel_projection_partition_held", &orders_only),
        0.0,
        "{lagging:#?}"
    );
    assert_eq!(lagging.get("keel_projection_status_up"), 1.0);
    other.stop().await.unwrap();
    // Every projection runs again, rebuilds paced to a few hundred events a second so that
    // the next one can be watched: the lag falls to nothing, every partition held.
    let paced = [("KEEL_REBUILD_PACE", "300".to_owned())];
    stack.projector = Some(stack.projector_process(&["run"], &paced).await.unwrap());
    let projector = stack.projector.as_ref().unwrap();
    // One order (a list would be refused: the token covers the parked stream's partition).
    let (status, order) = stack.get("/v1/orders/L-1499", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    until(projector, "the orders projection caught up", |s| {
        s.sum("keel_projection_lag_records", &orders_only) == 0.0
            && s.sum("keel_projection_partition_held", &orders_only) == f64::from(n)
    })
    .await;

    // A rebuild: its progress shows, then the new generation.
    let generation = r#"keel_projection_generation{projection="orders"}"#;
    let was = scrape(projector).await.get(generation);
    let rebuild = stack
        .projector_process(&["rebuild", "orders"], &paced)
        .await
        .unwrap();
    let progress = r#"keel_projection_rebuild_progress_ratio{projection="orders"}"#;
    let building = until(projector, "the rebuild's progress shows", |s| {
        s.get(r#"keel_projection_rebuilding{projection="orders"}"#) == 1.0
            && s.get(r#"keel_projection_rebuild_records_done{projection="orders"}"#) > 0.0
    })
    .await;
    assert!(
        building.get(r#"keel_projection_rebuild_records_total{projection="orders"}"#) >= 1500.0
    );
    assert!((0.0..=1.0).contains(&building.get(progress)));
    let status = rebuild.wait(Duration::from_secs(300)).await.unwrap();
    assert!(status.success(), "the rebuild failed");
    let done = until(projector, "the rebuilt generation is live", |s| {
        s.get(generation) == was + 1.0
    })
    .await;
    assert!(!done.has(progress), "no rebuild in progress: {done:#?}");
}

/// Commands for 10,000 different streams add no series: no label carries a stream id, an
/// idempotency key or a token subject.
#[tokio::test]
async fn ten_thousand_streams_add_no_series() {
    let stack = Stack::start("cardinality", 2).await;
    let register = |i: usize| {
        (
            format!("/v1/products/C-{i}/register"),
            json!({"name": format!("Product {i}"), "price": eur(100)}),
        )
    };
    // Every route, status and partition seen once before counting.
    let warm = stack
        .post_many((0..20).map(register), 8, StatusCode::CREATED)
        .await;
    let (status, _) = stack.get("/v1/products/C-0", Some(&warm)).await;
    assert_eq!(status, StatusCode::OK);
    let projector = stack.projector.as_ref().unwrap();
    // A first scrape, which `/metrics` itself counts from then on.
    for service in [&stack.command, &stack.query, projector] {
        scrape(service).await;
    }
    let before = scrape_all(&stack).await.map(|s| s.len());
    let token = stack
        .post_many((20..10_000).map(register), 64, StatusCode::CREATED)
        .await;
    let (status, _) = stack.get("/v1/products/C-9999", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    let after = scrape_all(&stack).await;
    assert_eq!(
        after.iter().map(Scrape::len).collect::<Vec<_>>(),
        before.to_vec(),
        "series before and after 9,980 more streams"
    );
    assert!(
        after[0].get(r#"keel_commands_total{command="RegisterProduct",outcome="accepted"}"#)
            >= 10_000.0
    );
    for scrape in &after {
        assert!(
            !scrape
                .0
                .keys()
                .any(|s| s.contains("C-1") || s.contains(r#"="test""#)),
            "a stream id or subject in a label"
        );
    }
}
