//! Random and malformed requests against both running APIs: bodies, headers, tokens,
//! paths, query strings, cursors and consistency tokens. Every answer must come (no
//! dropped connection, no panic), none may be a 5xx, each must hold to the API's OpenAPI
//! document, and the log must hold exactly the commits of the commands that were accepted.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::cell::RefCell;

use keel_http::Role;
use keel_http::auth::{Claims, now_secs};
use keel_tests::{Contract, Reply, Stack, TestAuth, eur, send_raw};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

/// Requests per run.
const CASES: u32 = 1500;

#[derive(Clone, Debug)]
struct Request {
    command_api: bool,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
}

/// Tokens and consistency tokens the strategies pick from.
#[derive(Clone, Debug)]
struct Material {
    /// A token holding every role.
    full: String,
    /// Tokens of single roles, of none, expired, or signed with another key.
    tokens: Vec<String>,
    consistency: Vec<String>,
}

/// Percent-encodes everything but unreserved characters, so any string is a path segment.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "S-[0-9]",
        4 => "[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,12}",
        1 => ".{0,24}",
        1 => "[a-z]{120,200}",
        1 => Just(String::new()),
        1 => Just("...".to_owned()),
        1 => Just("%FF%FE".to_owned()),
    ]
    .prop_map(|s| if s == "%FF%FE" { s } else { encode(&s) })
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,30}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The command routes, in the order of [`valid_body`]; the last two do not exist.
const COMMANDS: [&str; 14] = [
    "products/{}/register",
    "products/{}/change-price",
    "products/{}/restock",
    "products/{}/reserve-stock",
    "products/{}/release-stock",
    "products/{}/discontinue",
    "customers/{}/register",
    "customers/{}/change-email",
    "orders/{}/place",
    "orders/{}/pay",
    "orders/{}/ship",
    "orders/{}/cancel",
    "widgets/{}/register",
    "orders/{}/teleport",
];

/// A body valid for command `i` of [`COMMANDS`], so that some commands are accepted.
fn valid_body(i: usize) -> BoxedStrategy<Value> {
    let name = "[A-Za-z][A-Za-z ]{0,19}";
    match i {
        0 => (name, 0i64..100_000)
            .prop_map(|(n, p)| json!({"name": n, "price": eur(p)}))
            .boxed(),
        1 => (0i64..100_000)
            .prop_map(|p| json!({"price": eur(p)}))
            .boxed(),
        2 => (1u64..50).prop_map(|q| json!({"quantity": q})).boxed(),
        3 => ("S-[0-9]", 1u64..5)
            .prop_map(|(o, q)| json!({"order_id": o, "quantity": q}))
            .boxed(),
        4 => "S-[0-9]".prop_map(|o| json!({"order_id": o})).boxed(),
        6 => "[a-z]{1,8}"
            .prop_map(|n| json!({"email": format!("{n}@example.com"), "name": n}))
            .boxed(),
        7 => "[a-z]{1,8}"
            .prop_map(|n| json!({"email": format!("{n}@example.org")}))
            .boxed(),
        8 => ("S-[0-9]", "S-[0-9]", 1u64..4)
            .prop_map(|(c, sku, q)| {
                json!({
            "customer_id": c, "lines": [{"sku": sku, "quantity": q, "unit_price": eur(250)}]})
            })
            .boxed(),
        9 => (1i64..5_000, "[a-z0-9]{1,10}")
            .prop_map(|(a, r)| json!({"amount": eur(a), "payment_ref": r}))
            .boxed(),
        10 => Just(json!({"carrier": "DHL", "tracking": "JD01"})).boxed(),
        11 => Just(json!({"reason": "changed my mind"})).boxed(),
        _ => Just(json!({})).boxed(),
    }
}

fn body() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        2 => Just(None),
        2 => json_value().prop_map(|v| Some(v.to_string().into_bytes())),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Some),
        1 => (60_000usize..70_000).prop_map(|n| Some(format!("{{\"name\": \"{}\"}}", "a".repeat(n)).into_bytes())),
        1 => (0usize..300).prop_map(|n| Some(format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes())),
    ]
}

fn query_string() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("limit"),
        Just("cursor"),
        Just("from"),
        Just("to"),
        Just("status"),
        Just("customer_id"),
        Just("version"),
        Just("at"),
        Just("currency"),
        Just("stream_type"),
        Just("event_type"),
        Just("actor"),
        Just("nonsense"),
    ];
    let value = prop_oneof![
        "-?[0-9]{1,20}",
        ".{0,20}",
        "[A-Za-z0-9_-]{0,40}",
        Just("2026-11-22T00:00:00Z".to_owned()),
        Just("2026-11-22".to_owned()),
    ];
    prop::collection::vec((key, value), 0..4).prop_map(|pairs| {
        if pairs.is_empty() {
            return String::new();
        }
        let joined: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        format!("?{}", joined.join("&"))
    })
}

fn request(material: Material) -> impl Strategy<Value = Request> {
    let command = (0..COMMANDS.len()).prop_flat_map(|i| {
        let valid = valid_body(i).prop_map(|v| Some(v.to_string().into_bytes()));
        (Just(COMMANDS[i]), prop_oneof![3 => valid, 2 => body()])
    });
    let queries = [
        "orders",
        "orders/{}",
        "products",
        "products/{}",
        "customers/{}",
        "reports/daily-sales",
        "reports/flagged-payments",
        "projections",
        "audit/streams/order/{}",
        "audit/streams/{}/{}",
        "audit/streams/product/{}/state",
        "audit/events",
        "nothing/{}",
    ];
    let tokens = material.tokens.clone();
    let consistency = material.consistency.clone();
    let authorization = prop_oneof![
        8 => Just(Some(format!("Bearer {}", material.full))),
        4 => prop::sample::select(tokens).prop_map(|t| Some(format!("Bearer {t}"))),
        1 => Just(None),
        1 => "[ -~]{0,60}".prop_map(Some),
        1 => "[A-Za-z0-9._-]{0,300}".prop_map(|t| Some(format!("Bearer {t}"))),
    ];
    let consistency_token = prop_oneof![
        3 => Just(None),
        2 => prop::sample::select(consistency).prop_map(Some),
        1 => "v1\\.[A-Za-z0-9_-]{0,40}".prop_map(Some),
        1 => "[ -~]{0,40}".prop_map(Some),
    ];
    let content_type = prop_oneof![
        12 => Just(Some("application/json".to_owned())),
        1 => Just(None),
        1 => Just(Some("text/plain".to_owned())),
        1 => "[ -~]{0,30}".prop_map(Some),
    ];
    let optional = |s: &'static str| prop_oneof![3 => Just(None), 1 => s.prop_map(Some)];
    (
        any::<bool>(),
        prop_oneof![12 => Just(None), 1 => prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]).prop_map(Some)],
        command,
        prop::sample::select(queries.to_vec()),
        segment(),
        segment(),
        query_string(),
        (authorization, consistency_token, content_type),
        (
            optional("[ -~]{0,300}"),
            optional("(\"[0-9]{1,3}\")|([ -~]{0,12})"),
            optional("[0-9]{1,3}|[ -~]{0,8}"),
            optional("[ -~]{0,300}"),
        ),
        body(),
    )
        .prop_map(
            |(command_api, other_method, (command, command_body), query, a, b, qs, (auth, ct, content), (key, if_match, wait, correlation), query_body)| {
                let template = if command_api { command } else { query };
                let method = other_method.unwrap_or(if command_api { "POST" } else { "GET" });
                let body = if command_api { command_body } else { query_body };
                let path = format!("/v1/{}", template.replacen("{}", &a, 1).replacen("{}", &b, 1));
                let mut headers = Vec::new();
                let mut push = |name: &'static str, value: Option<String>| {
                    if let Some(v) = value {
                        headers.push((name, v));
                    }
                };
                push("authorization", auth);
                push("keel-consistency-token", ct);
                push("content-type", content);
                push("idempotency-key", key);
                push("if-match", if_match);
                push("keel-consistency-timeout", wait);
                push("x-correlation-id", correlation);
                Request {
                    command_api,
                    method,
                    path: format!("{path}{}", if command_api { String::new() } else { qs }),
                    headers,
                    body,
                }
            },
        )
}

/// What one request came to, and whether it appended a commit.
async fn send(stack: &Stack, request: &Request) -> Result<(Reply, bool), String> {
    let service = if request.command_api {
        &stack.command
    } else {
        &stack.query
    };
    let reply = send_raw(
        request.method,
        &service.url(&request.path),
        &request.headers,
        request.body.clone(),
    )
    .await
    .map_err(|e| format!("no whole answer (a panic or a dropped connection?): {e}"))?;
    // An accepted command that changed something appended exactly one commit.
    let appended = request.command_api
        && reply.status.is_success()
        && !reply.headers.contains_key("idempotent-replayed")
        && reply.json()["events"]
            .as_array()
            .is_some_and(|e| !e.is_empty());
    Ok((reply, appended))
}

#[test]
fn random_and_malformed_requests_harm_nothing() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stack = runtime.block_on(Stack::start("fuzz", 2));
    let auth = &stack.config.auth;
    // Tokens: every role, single roles, none, expired, and one signed with another key.
    let mut tokens = Vec::new();
    for role in Role::ALL {
        tokens.push(auth.token("single", &[role]));
    }
    tokens.push(auth.token("nobody", &[]));
    tokens.push(auth.sign(&Claims {
        exp: now_secs() - 600,
        ..TestAuth::claims("late", &Role::ALL)
    }));
    tokens.push(TestAuth::new().token("forger", &Role::ALL));
    let (_, _, seed) = runtime.block_on(stack.post(
        "/v1/products/SEED-1/register",
        json!({"name": "Seed", "price": eur(100)}),
    ));
    let seed = seed.unwrap().encode();
    let material = Material {
        full: auth.token("fuzz", &Role::ALL),
        tokens,
        consistency: vec![
            seed.clone(),
            seed[..seed.len() / 2].to_owned(),
            format!("{seed}x"),
        ],
    };
    let contracts = runtime.block_on(async {
        (
            Contract::fetch(&stack.command).await.unwrap(),
            Contract::fetch(&stack.query).await.unwrap(),
        )
    });
    let before = runtime.block_on(stack.accepted_commits()).unwrap();

    let appended = RefCell::new(0usize);
    let statuses = RefCell::new(std::collections::BTreeMap::<u16, usize>::new());
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&request(material), |request| {
        let (answer, appends) = runtime
            .block_on(send(&stack, &request))
            .map_err(TestCaseError::fail)?;
        let status = answer.status.as_u16();
        *statuses.borrow_mut().entry(status).or_default() += 1;
        if appends {
            *appended.borrow_mut() += 1;
        }
        prop_assert!(
            status < 500,
            "{request:?} answered {status}: {}",
            answer.text()
        );
        let contract = if request.command_api {
            &contracts.0
        } else {
            &contracts.1
        };
        let path = request.path.split('?').next().unwrap_or_default();
        if status != 304 {
            contract
                .check(request.method, path, status, &answer.headers, &answer.bytes)
                .map_err(|e| TestCaseError::fail(format!("{request:?}: {e}")))?;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Nothing was appended but the accepted commands, each once.
    let after = runtime.block_on(stack.accepted_commits()).unwrap();
    let statuses = statuses.into_inner();
    eprintln!("answers by status: {statuses:?}");
    assert_eq!(
        after - before,
        appended.into_inner(),
        "commits appended by the fuzz run"
    );
    // The run reached past the edge: some commands were accepted, some refused by field.
    assert!(after > before, "no command was accepted: {statuses:?}");
    for status in [200, 400, 401, 403, 404, 422] {
        assert!(
            statuses.contains_key(&status),
            "no {status} in {statuses:?}"
        );
    }
    // And every service is still up.
    runtime.block_on(async {
        for service in [&stack.command, &stack.query] {
            let r = reqwest::get(service.url("/healthz")).await.unwrap();
            assert!(r.status().is_success());
        }
    });
}
