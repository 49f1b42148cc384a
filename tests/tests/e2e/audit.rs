//! The audit trail against the real broker and PostgreSQL: history, search, time travel,
//! and tamper detection by `projector verify`.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use keel_domain::Aggregate;
use keel_domain::order::Order;
use keel_http::Role;
use keel_kafka::{LogProducer, PartitionGate, PartitionReader, partition_for};
use keel_schemas::{
    CommitRecord, ConsistencyToken, LogRecord, SigningKey, Writer, commit_hash_of_value,
    decode_event,
};
use keel_tests::{Stack, eur, read_accepted};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

/// POSTs a command with a token whose subject is `actor`; returns its body and token.
async fn post_as(stack: &Stack, actor: &str, path: &str, body: Value) -> (Value, ConsistencyToken) {
    let token = stack.config.auth.token(actor, &[Role::CommandsWrite]);
    let r = stack
        .client
        .post(stack.command.url(path))
        .bearer_auth(token)
        // A client-chosen actor is ignored: the token's subject is the actor.
        .header("keel-actor", "mallory")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    let body: Value = r.json().await.unwrap();
    let token = body["consistency_token"].as_str().unwrap().parse().unwrap();
    (body, token)
}

#[tokio::test]
async fn time_travel_history_and_search_over_twenty_commits() {
    let stack = Stack::start("audit-tt", 4).await;
    let mut token = ConsistencyToken::default();
    let (_, t) = post_as(
        &stack,
        "alice",
        "/v1/orders/o-tt/place",
        json!({"customer_id": "c-1", "lines": [{"sku": "S-1", "quantity": 1, "unit_price": eur(1000)}]}),
    )
    .await;
    token = token.merge(&t);
    for i in 1..20 {
        // Commits a few milliseconds apart, so each has a time of its own.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let (_, t) = post_as(
            &stack,
            "bob",
            "/v1/orders/o-tt/pay",
            json!({"amount": eur(10), "payment_ref": format!("p-{i}")}),
        )
        .await;
        token = token.merge(&t);
    }
    let settings = stack
        .broker
        .settings(&stack.config.prefix, stack.config.partitions);
    let (accepted, _) = read_accepted(&settings, &stack.config.policy(), &settings.topic("order"))
        .await
        .unwrap();
    let commits: Vec<CommitRecord> = accepted
        .into_iter()
        .map(|a| a.commit)
        .filter(|c| c.stream.id == "o-tt")
        .collect();
    assert_eq!(commits.len(), 20);
    let events: Vec<_> = commits
        .iter()
        .flat_map(|c| c.events.iter())
        .map(|e| decode_event::<Order>(e).unwrap())
        .collect();
    assert_eq!(events.len(), 20, "one event per commit");

    // The state at every version equals folding the first N events of the log.
    for n in 1..=20 {
        let (status, body) = stack
            .get(
                &format!("/v1/audit/streams/order/o-tt/state?version={n}"),
                Some(&token),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let expected = serde_json::to_value(Order::fold(&events[..n])).unwrap();
        assert_eq!(body["state"], expected, "state at version {n}");
        assert_eq!(body["version"], n);
    }
    // `at` picks the version of the commit recorded at that time.
    for commit in &commits {
        let at = commit
            .recorded_at
            .as_datetime()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let (status, body) = stack
            .get(&format!("/v1/audit/streams/order/o-tt/state?at={at}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["version"], commit.next_version(), "at {at}");
    }
    let before = (commits[0].recorded_at.as_datetime() - chrono::Duration::seconds(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let cases = [
        (format!("state?at={before}"), StatusCode::NOT_FOUND),
        ("state?version=21".to_owned(), StatusCode::NOT_FOUND),
        ("state?version=0".to_owned(), StatusCode::BAD_REQUEST),
        ("state?at=yesterday".to_owned(), StatusCode::BAD_REQUEST),
        (
            "state?version=1&at=2026-01-01T00:00:00Z".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        ("state?versoin=1".to_owned(), StatusCode::BAD_REQUEST),
    ];
    for (query, expected) in cases {
        let (status, body) = stack
            .get(&format!("/v1/audit/streams/order/o-tt/{query}"), None)
            .await;
        assert_eq!(status, expected, "{query}: {body}");
        assert!(body["detail"].is_string(), "problem+json for {query}");
    }

    // The history, page by page: every version once, in order, chained and signed.
    let mut cursor = String::new();
    let mut history = Vec::new();
    loop {
        let (status, page) = stack
            .get(
                &format!("/v1/audit/streams/order/o-tt?limit=7{cursor}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        history.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(history.len(), 20);
    for (i, (entry, commit)) in history.iter().zip(&commits).enumerate() {
        assert_eq!(entry["version"], i + 1);
        assert_eq!(entry["hash"], commit.hash);
        assert_eq!(entry["commit_id"], commit.commit_id.to_string());
        assert_eq!(entry["command_id"], commit.command.id.to_string());
        assert_eq!(entry["actor"], if i == 0 { "alice" } else { "bob" });
        assert_eq!(entry["prev_hash"], json!(commit.prev_hash));
        assert_eq!(
            entry["signature"]["key_id"],
            commit.signature.as_ref().unwrap().key_id
        );
        assert!(entry["offset"].is_i64() && entry["partition"].is_i64());
        if i > 0 {
            assert_eq!(
                entry["prev_hash"],
                history[i - 1]["hash"],
                "the chain links"
            );
        }
    }
    let (status, _) = stack.get("/v1/audit/streams/order/o-none", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = stack.get("/v1/audit/streams/invoice/i-1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Search by actor and event type, and by time.
    let (status, found) = stack
        .get(
            "/v1/audit/events?actor=bob&event_type=PaymentRecorded&limit=500",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["items"].as_array().unwrap().len(), 19);
    let tenth = commits[9]
        .recorded_at
        .as_datetime()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut cursor = String::new();
    let mut since = 0;
    loop {
        let (status, page) = stack
            .get(
                &format!("/v1/audit/events?stream_type=order&from={tenth}&limit=3{cursor}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        since += page["items"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(
        since, 11,
        "commits 10 to 20 were recorded from the tenth's time on"
    );
    let (status, _) = stack
        .get("/v1/audit/events?stream_type=invoice", None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = stack.get("/v1/audit/events?from=noon", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = stack.get("/v1/audit/events?cursor=garbage", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// The owner of a partition as the gate sees it at the end of the log.
async fn owner_of(stack: &Stack, topic: &str, partition: i32) -> Writer {
    let settings = stack
        .broker
        .settings(&stack.config.prefix, stack.config.partitions);
    let mut reader = PartitionReader::open(&settings, topic, partition, 0).unwrap();
    let at = keel_schemas::TopicPartition::new(topic, partition);
    let mut gate = PartitionGate::new(stack.config.policy(), &at);
    reader
        .read_to_end(|entry| assert!(gate.read(entry).record.is_ok(), "a Keel record"))
        .await
        .unwrap();
    gate.owner().unwrap().clone()
}

async fn verify(stack: &Stack, args: &[&str]) -> (bool, String) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    let (status, stdout, stderr) = stack.projector_command(&all, &[]).await.unwrap();
    assert!(
        status.code() == Some(0) || status.code() == Some(1),
        "verify ran: {stderr}"
    );
    (status.success(), stdout)
}

#[tokio::test]
async fn verify_tells_forgeries_from_zombie_writes_and_export_hands_out_the_records() {
    let stack = Stack::start("audit-verify", 4).await;
    let mut token = ConsistencyToken::default();
    for i in 0..6 {
        let (_, t) = post_as(
            &stack,
            "alice",
            &format!("/v1/orders/o-{i}/place"),
            json!({"customer_id": "c-1", "lines": [{"sku": "S-1", "quantity": 1, "unit_price": eur(500)}]}),
        )
        .await;
        token = token.merge(&t);
    }
    // A keyed command refused without a commit leaves a receipt in o-1's partition:
    // views read past it (the payment after it is visible) and verify finds nothing wrong.
    let refused = stack
        .client
        .post(stack.command.url("/v1/orders/o-1/place"))
        .header("idempotency-key", "place-again")
        .json(&json!({"customer_id": "c-1", "lines": [{"sku": "S-1", "quantity": 1, "unit_price": eur(500)}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    let (_, t) = post_as(
        &stack,
        "alice",
        "/v1/orders/o-1/pay",
        json!({"amount": eur(500), "payment_ref": "pay-1"}),
    )
    .await;
    token = token.merge(&t);
    let (status, order) = stack.get("/v1/orders/o-1", Some(&token)).await;
    assert_eq!(
        (status, &order["paid_minor"]),
        (StatusCode::OK, &json!(500))
    );
    // The audit log has seen every commit (verify compares the topics with it).
    let (status, _) = stack.get("/v1/audit/streams/order/o-5", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);

    let (clean, report) = verify(&stack, &[]).await;
    assert!(clean, "a clean log passes: {report}");
    assert!(report.contains("0 violations"), "{report}");
    assert!(report.contains("audit log compared"), "{report}");

    let settings = stack
        .broker
        .settings(&stack.config.prefix, stack.config.partitions);
    let topic = settings.topic("order");
    let producer = LogProducer::new(&settings).unwrap();
    let (accepted, _) = read_accepted(&settings, &stack.config.policy(), &topic)
        .await
        .unwrap();
    let template = accepted
        .iter()
        .find(|a| a.commit.stream.id == "o-1")
        .unwrap()
        .commit
        .clone();
    let real_key = SigningKey::read(&stack.config.keys_dir.join("signing.key")).unwrap();
    let append = |record: CommitRecord| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            let partition = partition_for(record.stream.id.as_bytes(), settings.partitions);
            let key = record.stream.id.clone();
            producer
                .append_record(&topic, partition, &key, &LogRecord::Commit(record), None)
                .await
                .unwrap()
        }
    };
    let forged = |id: &str, expected_version: u64, prev_hash: Option<String>, writer: Writer| {
        let mut c = template.clone();
        c.commit_id = Uuid::now_v7();
        c.stream.id = id.to_owned();
        c.expected_version = expected_version;
        c.events[0].version = expected_version + 1;
        c.events[0].event_id = Uuid::now_v7();
        c.prev_hash = prev_hash;
        c.writer = writer;
        c.signature = None;
        c
    };
    let partition_of = |id: &str| partition_for(id.as_bytes(), settings.partitions);

    // A zombie write (a writer that does not own the partition) is no violation.
    let mut zombie_writer = owner_of(&stack, &topic, partition_of("o-zombie")).await;
    zombie_writer.instance = "cmd-old".into();
    append(forged("o-zombie", 0, None, zombie_writer).sealed_and_signed(&real_key)).await;
    let (clean, report) = verify(&stack, &[]).await;
    assert!(clean, "zombie writes are not corruption: {report}");
    assert!(report.contains("zombie write order/o-zombie"), "{report}");

    // A commit with a wrong hash.
    let owner = owner_of(&stack, &topic, partition_of("o-badhash")).await;
    let mut bad_hash = forged("o-badhash", 0, None, owner).sealed_and_signed(&real_key);
    bad_hash.hash = "0".repeat(64);
    let bad_hash_offset = append(bad_hash).await;
    // A commit whose hash chain holds, signed with a key nobody trusts.
    let owner = owner_of(&stack, &topic, partition_of("o-badkey")).await;
    let stranger = SigningKey::generate();
    append(forged("o-badkey", 0, None, owner).sealed_and_signed(&stranger)).await;
    // A commit that skips a version of an existing stream.
    let o2 = accepted
        .iter()
        .find(|a| a.commit.stream.id == "o-2")
        .unwrap();
    let owner = owner_of(&stack, &topic, partition_of("o-2")).await;
    let skip_offset =
        append(forged("o-2", 2, Some(o2.commit.hash.clone()), owner).sealed_and_signed(&real_key))
            .await;

    let (clean, report) = verify(&stack, &[]).await;
    assert!(!clean, "verify exits non-zero: {report}");
    let line = |stream: &str| {
        report
            .lines()
            .find(|l| l.starts_with(&format!("VIOLATION {stream} ")))
            .unwrap_or_else(|| panic!("no violation reported for {stream}: {report}"))
            .to_owned()
    };
    let bad_hash = line("order/o-badhash");
    assert!(
        bad_hash.contains("skipped by the gate") && bad_hash.contains("hash does not recompute"),
        "{bad_hash}"
    );
    assert!(
        bad_hash.contains(&format!("offset {bad_hash_offset}")),
        "{bad_hash}"
    );
    assert!(bad_hash.contains("version 1"), "{bad_hash}");
    let bad_key = line("order/o-badkey");
    assert!(
        bad_key.contains(&format!("signed with key {}", stranger.key_id())),
        "{bad_key}"
    );
    assert_eq!(
        report
            .lines()
            .filter(|l| l.starts_with("VIOLATION order/o-badkey "))
            .count(),
        1,
        "only the signature of o-badkey is wrong: {report}"
    );
    let skipped = line("order/o-2");
    assert!(skipped.contains("version out of sequence"), "{skipped}");
    assert!(
        skipped.contains(&format!("offset {skip_offset}")),
        "{skipped}"
    );
    // o-badhash: its hash; o-badkey: its signature; o-2: its version. The gate skipped
    // each of them: no reader applied any.
    assert!(report.contains("; 3 violations"), "{report}");
    assert!(
        !report.contains("VIOLATION order/o-1 "),
        "o-1 is sound: {report}"
    );

    // One stream only.
    let (clean, report) = verify(&stack, &["--stream", "order/o-3"]).await;
    assert!(clean, "{report}");
    let (clean, report) = verify(&stack, &["--stream", "order/o-2"]).await;
    assert!(
        !clean && report.contains("VIOLATION order/o-2 "),
        "{report}"
    );

    // A topic that lost what the audit log has seen (here: the topics of another prefix).
    let empty = format!("{}-empty", stack.config.prefix);
    let env = [("KEEL_TOPIC_PREFIX", empty)];
    let (status, _, stderr) = stack.projector_command(&["topics"], &env).await.unwrap();
    assert!(status.success(), "{stderr}");
    let (status, report, _) = stack.projector_command(&["verify"], &env).await.unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(
        report.contains("VIOLATION order/o-4 version 1")
            && report.contains("the topic has lost this stream"),
        "{report}"
    );

    // A fence appended straight to the topic, signed with a key nobody trusts: the gate
    // skips it, so it takes nothing; verify reports the attempt.
    let mut usurper = owner_of(&stack, &topic, partition_of("o-5")).await;
    usurper.instance = "cmd-usurper".into();
    usurper.epoch += 1;
    let at = keel_schemas::TopicPartition::new(topic.clone(), partition_of("o-5"));
    let fence = keel_schemas::FenceRecord::ruled(usurper, &at).signed(&stranger);
    let fence_offset = producer
        .append_record(
            &topic,
            partition_of("o-5"),
            "",
            &LogRecord::Fence(fence),
            None,
        )
        .await
        .unwrap();
    let (clean, report) = verify(&stack, &[]).await;
    assert!(!clean);
    let fence_line = report
        .lines()
        .find(|l| l.contains("cmd-usurper"))
        .unwrap_or_else(|| panic!("the forged fence is reported: {report}"));
    assert!(
        fence_line.starts_with("VIOLATION")
            && fence_line.contains(&format!("offset {fence_offset}")),
        "{fence_line}"
    );

    // Export: the stream's records as written, with the gate's verdicts.
    let (status, lines, stderr) = stack
        .projector_command(&["export", "--stream", "order/o-2"], &[])
        .await
        .unwrap();
    assert!(status.success(), "{stderr}");
    let lines: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["accepted"], true);
    assert_eq!(lines[1]["accepted"], false);
    assert_eq!(lines[1]["offset"], skip_offset);
    assert_eq!(
        commit_hash_of_value(&lines[0]["record"]),
        lines[0]["record"]["hash"].as_str().unwrap(),
        "an auditor can recompute the hash from the exported record"
    );
    let (status, _, stderr) = stack
        .projector_command(&["export", "--stream", "nothing"], &[])
        .await
        .unwrap();
    assert!(
        !status.success() && stderr.contains("<type>/<id>"),
        "{stderr}"
    );
}
