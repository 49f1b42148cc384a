//! The shipped alerting rules and Grafana dashboard against a real Prometheus (Debian's
//! `prometheus` package, which `make test` installs): promtool's unit tests of each rule,
//! and a Prometheus server scraping the live stack on a free port, through whose query API
//! every alert's measure and every dashboard query returns data.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use keel_kafka::{LogProducer, partition_for};
use keel_tests::{Stack, eur, free_port};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: install Debian's prometheus package (make test does)",
        path.display()
    );
    path
}

/// `promtool check rules`, `check config` and `test rules` on the shipped files.
#[test]
fn the_alert_rules_and_the_example_configuration_pass_promtool() {
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["check", "config", "prometheus.yml"],
        vec!["test", "rules", "alerts.test.yml"],
    ] {
        let out = std::process::Command::new(binary("promtool"))
            .args(&args)
            .current_dir(deploy("prometheus"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A Prometheus server of the test's own, killed when dropped.
struct Prometheus {
    child: tokio::process::Child,
    url: String,
    client: reqwest::Client,
    _dir: TempDir,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Prometheus {
    /// Scrapes each `(job, address)` every second and evaluates the shipped rules.
    async fn start(targets: &[(&str, std::net::SocketAddr)]) -> Self {
        let dir = std::env::temp_dir().join(format!("keel-prometheus-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let jobs: String = targets
            .iter()
            .map(|(job, addr)| {
                format!("  - job_name: {job}\n    static_configs:\n      - targets: [\"{addr}\"]\n")
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n{jobs}",
            deploy("prometheus/alerts.yml").display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port().unwrap();
        let child = tokio::process::Command::new(binary("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let prometheus = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            _dir: TempDir(dir),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = prometheus
                .client
                .get(format!("{}/-/ready", prometheus.url))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                return prometheus;
            }
            assert!(Instant::now() < deadline, "Prometheus did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `GET /api/v1/<path>`'s `data`, asserting success.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let r = self
            .client
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await
            .unwrap();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// The instant vector `expr` evaluates to now.
    async fn query(&self, expr: &str) -> Vec<Value> {
        self.api("query", &[("query", expr)]).await["result"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits (up to 90 s) until `expr` returns data.
    async fn until_data(&self, expr: &str) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let result = self.query(expr).await;
            if !result.is_empty() {
                return result;
            }
            assert!(Instant::now() < deadline, "{expr} never returned data");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// An alert's measure: its expression without the final comparison to a number
/// (`<measure> > 60`), which returns data whether or not the alert fires.
fn measure(expr: &str) -> &str {
    for op in [" > ", " < ", " == ", " != ", " >= ", " <= "] {
        if let Some((left, right)) = expr.rsplit_once(op)
            && right.trim().parse::<f64>().is_ok()
        {
            return left.trim();
        }
    }
    panic!("the alert expression {expr:?} is not `<measure> <comparison> <number>`");
}

/// Every metric name (`keel_…`, `process_…`, `up`) `expr` reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word = (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_')
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if word {
            let end = (i..bytes.len())
                .find(|&j| !(bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_'))
                .unwrap_or(bytes.len());
            let name = &expr[i..end];
            if name.starts_with("keel_") || name.starts_with("process_") || name == "up" {
                names.push(name.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test]
async fn prometheus_scrapes_the_stack_and_every_alert_and_dashboard_query_returns_data() {
    let mut stack = Stack::start("prometheus", 2).await;
    // Rebuilds paced, so that one is scraped while it runs.
    let paced = [("KEEL_REBUILD_PACE", "100".to_owned())];
    stack.projector.take().unwrap().stop().await.unwrap();
    stack.projector = Some(stack.projector_process(&["run"], &paced).await.unwrap());
    let projector = stack.projector.as_ref().unwrap();
    let prometheus = Prometheus::start(&[
        ("keel-command-api", stack.command.addr.unwrap()),
        ("keel-query-api", stack.query.addr.unwrap()),
        ("keel-projector", projector.addr.unwrap()),
    ])
    .await;

    // Traffic for the rates: commands of several outcomes, reads waiting for their tokens.
    for i in 0..20 {
        let (status, _, token) = stack
            .post(
                &format!("/v1/products/PR-{i}/register"),
                json!({"name": "P", "price": eur(100)}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, _) = stack
            .get(&format!("/v1/products/PR-{i}"), token.as_ref())
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _, _) = stack
        .post(
            "/v1/products/PR-0/register",
            json!({"name": "P", "price": eur(100)}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    // A poison record parks a stream: its alert goes pending.
    let (_, _, placed) = stack
        .post(
            "/v1/orders/PO-1/place",
            json!({"customer_id": "c", "lines": [{"sku": "PR-1", "quantity": 1, "unit_price": eur(100)}]}),
        )
        .await;
    stack.get("/v1/orders/PO-1", placed.as_ref()).await;
    let n = stack.config.partitions;
    let settings = stack.broker.settings(&stack.config.prefix, n);
    LogProducer::new(&settings)
        .unwrap()
        .append(
            &settings.topic("order"),
            partition_for(b"PO-1", n),
            "PO-1",
            b"{not json",
            &[],
        )
        .await
        .unwrap();

    // A rebuild of some hundreds of orders, at a hundred events a second in each process.
    let orders = (0..600).map(|i| {
        (
            format!("/v1/orders/PB-{i}/place"),
            json!({"customer_id": "c", "lines": [{"sku": "PR-1", "quantity": 1, "unit_price": eur(100)}]}),
        )
    });
    let token = stack.post_many(orders, 16, StatusCode::CREATED).await;
    let (status, _) = stack.get("/v1/orders/PB-599", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    let _rebuild = stack
        .projector_process(&["rebuild", "orders"], &paced)
        .await
        .unwrap();
    prometheus
        .until_data(r#"keel_projection_rebuild_progress_ratio{projection="orders"}"#)
        .await;

    // Every job up, and scraped often enough for a rate.
    let up = prometheus
        .until_data(r#"count(count_over_time(up{job=~"keel-.*"}[1m]) >= 3) == 3"#)
        .await;
    assert_eq!(up.len(), 1);
    let ups = prometheus.query(r#"up{job=~"keel-.*"}"#).await;
    assert!(ups.iter().all(|s| s["value"][1] == "1"), "{ups:?}");

    // The fulfilment process, whose orders every projector process exports.
    let _fulfilment = stack.fulfilment_process("30m", &[]).await.unwrap();
    prometheus
        .until_data(r#"keel_fulfilment_orders{job="keel-projector"}"#)
        .await;

    // Each rule loaded, evaluated without error, and its measure returns data.
    let rules = prometheus.api("rules", &[("type", "alert")]).await;
    let rules: Vec<Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect();
    assert_eq!(rules.len(), 12, "{rules:?}");
    let names = prometheus.api("label/__name__/values", &[]).await;
    let exported: Vec<&str> = names
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for rule in &rules {
        let expr = rule["query"].as_str().unwrap();
        for name in metric_names(expr) {
            assert!(
                exported.contains(&name.as_str()),
                "{name} of {expr} is not exported"
            );
        }
        prometheus.until_data(measure(expr)).await;
        let health = prometheus.api("rules", &[("type", "alert")]).await;
        let unhealthy: Vec<&Value> = health["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["health"] != "ok" && r["health"] != "unknown")
            .collect();
        assert!(unhealthy.is_empty(), "{unhealthy:?}");
    }
    // The parked stream's alert is pending (it fires after its minute).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let alerts = prometheus.api("alerts", &[]).await;
        let parked = alerts["alerts"].as_array().unwrap().iter().any(|a| {
            a["labels"]["alertname"] == "KeelStreamParked" && a["labels"]["projection"] == "orders"
        });
        if parked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "KeelStreamParked never went pending: {alerts}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every dashboard query names exported metrics and returns data.
    let dashboard: Value =
        serde_json::from_slice(&std::fs::read(deploy("grafana/keel-dashboard.json")).unwrap())
            .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                assert!(
                    exported.contains(&name.as_str()),
                    "{name} of panel {} is not exported",
                    panel["title"]
                );
            }
            prometheus.until_data(expr).await;
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} dashboard queries");
}
