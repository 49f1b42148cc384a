//! The operations console in a real browser: Debian's Chromium, headless, driven through
//! chromedriver (WebDriver) against the whole stack. An operator signs in, watches the
//! projections, retries a parked stream, rebuilds a projection and follows it to the swap,
//! reads the write path, searches the audit trail, walks an order's audit timeline back a
//! version, diffs two versions and verifies the stream; a product named like an XSS payload shows as text; axe-core
//! finds no accessibility violation on any panel, at laptop and phone widths; the browser
//! logs no error; a token without `admin` is refused politely. The screens are saved as
//! PNG files (into `docs/console/` with `KEEL_UPDATE_SCREENSHOTS=1`).

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use keel_http::Role;
use keel_tests::{Stack, eur, free_port};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The product name a hostile client registers.
const HOSTILE: &str = "<img src=x onerror=alert(1)>";

/// chromedriver and a headless Chromium session, ended when dropped.
struct Browser {
    driver: Child,
    client: Client,
    _profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self._profile);
    }
}

/// The browser's log since the last call (chromedriver's `se/log`).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

fn installed(variable: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(variable).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.exists(),
        "{} is missing: `make test` installs Debian's chromium and chromium-driver, and fetches \
         axe-core (or set {variable})",
        path.display()
    );
    path
}

async fn browser() -> Browser {
    let chromedriver = installed("KEEL_CHROMEDRIVER", "/usr/bin/chromedriver");
    let chromium = installed("KEEL_CHROMIUM", "/usr/bin/chromium");
    let port = free_port().unwrap();
    let driver = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{url}/status")).await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = std::env::temp_dir().join(format!("keel-chromium-{}", uuid::Uuid::new_v4()));
    let capabilities = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            // As root Chromium needs --no-sandbox; /dev/shm is small in containers.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--hide-scrollbars", "--force-device-scale-factor=1",
                     format!("--user-data-dir={}", profile.display())],
        },
        "goog:loggingPrefs": {"browser": "ALL"},
    });
    let client = ClientBuilder::native()
        .capabilities(capabilities.as_object().unwrap().clone())
        .connect(&url)
        .await
        .expect("a Chromium session");
    Browser {
        driver,
        client,
        _profile: profile,
    }
}

/// Waits up to 60 s for `script` (a function body returning a value) to return a truthy
/// value in the page; that value.
async fn until(client: &Client, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let value = client.execute(script, vec![]).await.unwrap();
        let truthy = match &value {
            Value::Null | Value::Bool(false) => false,
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen in 60 s; the panel reads: {}",
            text(client).await
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// The text of the panel.
async fn text(client: &Client) -> String {
    client
        .execute("return document.body.innerText;", vec![])
        .await
        .unwrap()
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Waits until the panel's text contains `needle`.
async fn shows(client: &Client, needle: &str) {
    let script = format!(
        "return document.body.innerText.includes({});",
        json!(needle)
    );
    until(client, needle, &script).await;
}

/// Waits until a chart in the panel has drawn a line of at least `points` samples.
async fn charted(client: &Client, points: usize) {
    let script = format!(
        "return [...document.querySelectorAll('main svg.chart polyline')]
           .some((l) => l.getAttribute('points').trim().split(' ').length >= {points});"
    );
    until(
        client,
        &format!("a chart line of {points} samples"),
        &script,
    )
    .await;
}

/// Places orders `T-{tag}-…` at about 20 a second while `watch` runs, so that the charts
/// have something to draw; `watch`'s value.
async fn with_traffic<T>(
    stack: &Stack,
    tag: &str,
    watch: impl std::future::Future<Output = T>,
) -> T {
    let done = std::sync::atomic::AtomicBool::new(false);
    let traffic = async {
        let mut i = 0;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let (status, body, _) = stack
                .post(
                    &format!("/v1/orders/T-{tag}-{i:04}/place"),
                    json!({"customer_id": "c-2", "lines": [{"sku": "MUG-1", "quantity": 1, "unit_price": eur(1299)}]}),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            i += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let watched = async {
        let value = watch.await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        value
    };
    tokio::join!(traffic, watched).1
}

async fn click(client: &Client, css: &str) {
    client
        .wait()
        .at_most(Duration::from_secs(60))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

/// Clicks the button whose text is `label` (the first, or the one inside `within`).
async fn press(client: &Client, within: &str, label: &str) {
    let script = format!(
        "const b = [...document.querySelectorAll({within} + ' button')].find((b) => b.textContent.trim() === {label});
         if (b) b.setAttribute('data-press', '1');
         return Boolean(b);",
        within = json!(within),
        label = json!(label)
    );
    until(client, &format!("the button {label}"), &script).await;
    click(client, "[data-press='1']").await;
    client
        .execute(
            "document.querySelectorAll('[data-press]').forEach((b) => b.removeAttribute('data-press'));",
            vec![],
        )
        .await
        .unwrap();
}

async fn go(client: &Client, base: &str, hash: &str) {
    client
        .goto(&format!("{base}/console#{hash}"))
        .await
        .unwrap();
}

/// axe-core's WCAG 2 A and AA rules over the page: the violations (none expected).
async fn accessibility(client: &Client, axe: &str, screen: &str) {
    client.execute(axe, vec![]).await.unwrap();
    let violations = client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21aa']}})
               .then((r) => done(r.violations.map((v) => ({id: v.id, impact: v.impact, help: v.help,
                                                            nodes: v.nodes.map((n) => n.target.join(' '))}))))
               .catch((e) => done([{id: 'axe failed', help: String(e)}]));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        violations,
        json!([]),
        "accessibility violations on {screen}"
    );
}

/// Saves the page, scrolled to show `from` (a CSS selector) at the top, as `name`.png:
/// into the test's directory, and into `docs/console/` when `KEEL_UPDATE_SCREENSHOTS` is set.
async fn screenshot(client: &Client, name: &str, from: &str) {
    client
        .execute(
            "document.querySelector(arguments[0]).scrollIntoView({block: 'start'});",
            vec![json!(from)],
        )
        .await
        .unwrap();
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{name}: a PNG");
    let mut dirs = vec![std::env::temp_dir().join("keel-console-screens")];
    if std::env::var_os("KEEL_UPDATE_SCREENSHOTS").is_some() {
        dirs.push(docs());
    }
    for dir in dirs {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
    }
}

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console")
}

/// The browser's log entries at level SEVERE since the last call.
async fn errors(client: &Client) -> Vec<Value> {
    let log = client.issue_cmd(BrowserLog).await.unwrap();
    log.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["level"] == "SEVERE")
        .collect()
}

async fn sign_in(client: &Client, base: &str, token: &str) {
    go(client, base, "projections").await;
    client
        .execute("sessionStorage.clear();", vec![])
        .await
        .unwrap();
    // Loaded again (not a fragment change): the page starts signed out.
    client.goto("about:blank").await.unwrap();
    go(client, base, "projections").await;
    let field = client
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Id("token"))
        .await
        .unwrap();
    field.send_keys(token).await.unwrap();
    click(client, "#sign-in-form button[type=submit]").await;
}

#[tokio::test]
async fn an_operator_works_the_console_in_a_real_browser() {
    let axe = std::fs::read_to_string(installed(
        "KEEL_AXE_JS",
        &format!(
            "{}/.cargo/keel-axe/axe-core-4.14.1/axe.min.js",
            std::env::var("HOME").unwrap_or_default()
        ),
    ))
    .unwrap();
    // Both APIs on ports known before they start: the command API allows the console's
    // origin, and the console is told where the command API is.
    let (command_port, query_port) = (free_port().unwrap(), free_port().unwrap());
    let query_origin = format!("http://127.0.0.1:{query_port}");
    let stack = Stack::start_with_env(
        "console",
        2,
        vec![
            ("KEEL_COMMAND_ADDR", format!("127.0.0.1:{command_port}")),
            ("KEEL_QUERY_ADDR", format!("127.0.0.1:{query_port}")),
            ("KEEL_CORS_ORIGINS", query_origin.clone()),
            (
                "KEEL_CONSOLE_COMMAND_API",
                format!("http://127.0.0.1:{command_port}"),
            ),
            // A rebuild slow enough to watch: batches of 50 records (the pacer waits
            // between batches) at 60 events/s, about ten seconds for the orders.
            ("KEEL_BATCH_SIZE", "50".into()),
            ("KEEL_REBUILD_PACE", "60".into()),
        ],
    )
    .await;

    // The shop: a product with a hostile name, orders enough for two pages, one paid.
    for (sku, name) in [("HOSTILE-1", HOSTILE), ("MUG-1", "Mug")] {
        let (status, body, _) = stack
            .post(
                &format!("/v1/products/{sku}/register"),
                json!({"name": name, "price": eur(1299)}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let line = |sku: &str| json!({"customer_id": "c-1", "lines": [{"sku": sku, "quantity": 1, "unit_price": eur(1299)}]});
    let token = stack
        .post_many(
            (0..600).map(|i| (format!("/v1/orders/O-{i:03}/place"), line("MUG-1"))),
            16,
            StatusCode::CREATED,
        )
        .await;
    let (status, body, paid) = stack
        .post(
            "/v1/orders/O-001/pay",
            json!({"amount": eur(1299), "payment_ref": "pay-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = token.merge(&paid.unwrap());
    let (status, _) = stack.get("/v1/orders?limit=1", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);

    // A stream the orders view cannot apply yet: a constraint on the live table refuses it,
    // so it parks; the operator fixes the cause and retries it from the console.
    let pool = stack.pool().await;
    let generation = stack.projection("orders").await["generation"]
        .as_i64()
        .unwrap();
    sqlx::query(&format!(
        "ALTER TABLE orders_g{generation} ADD CONSTRAINT not_yet CHECK (order_id <> 'P-1')"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let (status, _, _) = stack.post("/v1/orders/P-1/place", line("HOSTILE-1")).await;
    assert_eq!(status, StatusCode::CREATED);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.projection("orders").await["parked_streams"] != 1 {
        assert!(Instant::now() < deadline, "P-1 parks");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let chrome = browser().await;
    let client = &chrome.client;
    let base = stack.query.url("");
    let base = base.trim_end_matches('/');
    assert_eq!(base, query_origin);

    // Signing in: the page asks for a token first.
    go(client, base, "projections").await;
    shows(client, "Paste a bearer token").await;
    accessibility(client, &axe, "the sign-in screen").await;
    let admin = stack.config.auth.token("ops-ada", &Role::ALL);
    sign_in(client, base, &admin).await;
    shows(client, "Signed in as").await;

    // Projections: every projection with its charts, and the parked stream.
    shows(client, "Parked streams (1)").await;
    shows(client, "order/P-1").await;
    until(
        client,
        "a chart per projection",
        "return document.querySelectorAll('main svg.chart').length >= 6;",
    )
    .await;
    with_traffic(&stack, "p", charted(client, 4)).await;
    accessibility(client, &axe, "the projections panel").await;
    screenshot(client, "projections", "body").await;
    sqlx::query(&format!(
        "ALTER TABLE orders_g{generation} DROP CONSTRAINT not_yet"
    ))
    .execute(&pool)
    .await
    .unwrap();
    press(client, "main", "Retry").await;
    shows(client, "by ops-ada: done").await;
    let (status, order) = stack.get("/v1/orders/P-1", None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the retried stream is applied: {order}"
    );
    let retried: (String, String) = sqlx::query_as(
        "SELECT action, actor FROM keel_stream_requests WHERE stream_id = 'P-1' AND ok",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(retried, ("retry".to_owned(), "ops-ada".to_owned()));

    // A rebuild started from the page and watched to the swap.
    shows(client, "Rebuild orders").await;
    press(client, "main", "Rebuild orders").await;
    go(client, base, "rebuilds").await;
    until(
        client,
        "the rebuild's progress bar",
        "return document.querySelector('main progress') !== null;",
    )
    .await;
    until(
        client,
        "the rebuild under way",
        "const p = document.querySelector('main progress'); return p !== null && p.value > 0;",
    )
    .await;
    charted(client, 3).await;
    accessibility(client, &axe, "the rebuilds panel").await;
    screenshot(client, "rebuilds", "body").await;
    shows(
        client,
        &format!(
            "orders swapped generation {generation} for {}",
            generation + 1
        ),
    )
    .await;
    shows(client, "rebuild orders").await;
    let (actor, ok): (String, bool) =
        sqlx::query_as("SELECT actor, ok FROM keel_rebuild_requests WHERE projection = 'orders'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((actor.as_str(), ok), ("ops-ada", true));

    // The write path, from the command API across origins.
    go(client, base, "write-path").await;
    shows(client, "Partitions and their owners").await;
    shows(client, "serving").await;
    with_traffic(&stack, "w", charted(client, 4)).await;
    shows(client, "accepted").await;
    accessibility(client, &axe, "the write path panel").await;
    screenshot(client, "write-path", "body").await;

    // The audit trail searched by event type: the one paid order.
    go(client, base, "audit").await;
    let field = client
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Id("q-event-type"))
        .await
        .unwrap();
    field.send_keys("OrderPaid").await.unwrap();
    press(client, "main", "Search").await;
    shows(client, "Events (page 1)").await;
    let found = until(
        client,
        "the search's results",
        "const rows = [...document.querySelectorAll('main table tbody tr')];
         return rows.length && rows.map((r) => r.innerText).join('\\n');",
    )
    .await;
    let found = found.as_str().unwrap();
    assert!(
        found.contains("order/O-001") && found.lines().count() == 1,
        "one OrderPaid event, O-001's: {found}"
    );

    // An order's audit timeline, one version back, a diff, and a verification.
    go(client, base, "audit/order/O-001").await;
    shows(client, "order/O-001: ").await;
    let versions = until(
        client,
        "the version slider",
        "const s = document.getElementById('version'); return s && Number(s.max) >= 2 && Number(s.max);",
    )
    .await;
    shows(
        client,
        &format!("State at version {versions} of {versions}"),
    )
    .await;
    let slider = client.find(Locator::Id("version")).await.unwrap();
    slider.send_keys("\u{E011}").await.unwrap(); // Home: the first version, by keyboard.
    shows(client, &format!("State at version 1 of {versions}")).await;
    until(
        client,
        "the state at version 1",
        "const v = [...document.querySelectorAll('main td')].map((t) => t.textContent);
         return v.includes('\"placed\"') && !v.includes('\"paid\"');",
    )
    .await;
    press(client, "main", "Compare").await;
    shows(
        client,
        &format!(
            "From version {} to {versions}",
            versions.as_i64().unwrap() - 1
        ),
    )
    .await;
    press(client, "main", "Verify against the log").await;
    shows(client, "Verified.").await;
    accessibility(client, &axe, "the audit panel").await;
    screenshot(client, "audit", "#stream-title").await;

    // The hostile name is text everywhere it shows; nothing it names ran.
    go(client, base, "products").await;
    shows(client, HOSTILE).await;
    go(client, base, "audit/product/HOSTILE-1").await;
    shows(client, "product/HOSTILE-1: ").await;
    shows(client, HOSTILE).await;
    let injected = client
        .execute(
            "return document.querySelectorAll('main img, main [onerror]').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(injected, 0, "no element made of the product's name");
    assert!(
        client.get_alert_text().await.is_err(),
        "no alert was raised"
    );

    // Orders, page by page.
    go(client, base, "orders").await;
    shows(client, "Orders, page 1").await;
    accessibility(client, &axe, "the orders panel").await;
    screenshot(client, "orders", "body").await;
    press(client, "main", "Next page").await;
    shows(client, "Orders, page 2").await;

    // A phone: 375 pixels wide, nothing wider than the screen but the tables' own scroll.
    client.set_window_size(375, 812).await.unwrap();
    go(client, base, "projections").await;
    shows(client, "Generation").await;
    let overflow = client
        .execute(
            "const root = document.documentElement;
             const wide = [...document.querySelectorAll('body *')]
               .filter((e) => e.getBoundingClientRect().right > root.clientWidth + 0.5
                              && !e.closest('.table-wrap, .tabs'))
               .map((e) => `${e.tagName.toLowerCase()}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`);
             return {by: root.scrollWidth - root.clientWidth, wide: wide.slice(0, 10)};",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        overflow["by"].as_i64().unwrap_or(1) <= 0,
        "the page scrolls sideways on a phone: {overflow}"
    );
    accessibility(client, &axe, "the projections panel on a phone").await;
    screenshot(client, "phone", "body").await;
    client.set_window_size(1280, 900).await.unwrap();

    // A token without admin: the admin panels say so, and ask nothing of the APIs.
    let reader = stack
        .config
        .auth
        .token("reader-bo", &[Role::QueriesRead, Role::AuditRead]);
    sign_in(client, base, &reader).await;
    shows(client, "The projections panel needs the admin role").await;
    shows(client, "nothing was asked of the APIs").await;
    go(client, base, "write-path").await;
    shows(client, "The write path panel needs the admin role").await;
    go(client, base, "audit/order/O-001").await;
    shows(client, "Verifying against the log needs the admin role").await;
    go(client, base, "orders").await;
    shows(client, "Orders, page 1").await;
    accessibility(client, &axe, "a refused panel").await;

    let errors = errors(client).await;
    assert!(errors.is_empty(), "the browser logged errors: {errors:#?}");
    drop(chrome);

    // The committed screenshots the README shows exist.
    for name in [
        "projections",
        "rebuilds",
        "write-path",
        "audit",
        "orders",
        "phone",
    ] {
        assert!(
            docs().join(format!("{name}.png")).exists(),
            "docs/console/{name}.png: run this test with KEEL_UPDATE_SCREENSHOTS=1"
        );
    }
}
