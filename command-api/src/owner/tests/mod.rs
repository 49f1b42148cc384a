//! The partition owner against an in-memory log: no broker. Every answer is checked
//! against the log itself, read through the gate as every reader reads it.

use std::sync::Arc;
use std::time::Duration;

use keel_domain::DomainError;
use keel_domain::ids::{OrderId, Quantity, Text};
use keel_domain::money::{Currency, Money};
use keel_domain::product::{Product, ProductCommand};
use keel_kafka::PartitionGate;
use keel_schemas::{LogRecord, SigningKey, TopicPartition, TrustedKeys, testing};
use tokio::sync::mpsc;

use super::*;

mod handoff;
mod keys;
mod pipeline;
mod snapshots;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Room in the tests' owners' queues: more than one flush holds, so a test can queue two.
const QUEUE: usize = 2048;

/// The topic of the tests' partitions.
const TOPIC: &str = "t.product.events";

/// The partition the tests' owners own: partition 0 of [`TOPIC`].
fn here() -> TopicPartition {
    TopicPartition::new(TOPIC, 0)
}

/// The deployment's signing key: every owner of these tests signs with it.
fn key() -> Arc<SigningKey> {
    static KEY: std::sync::OnceLock<Arc<SigningKey>> = std::sync::OnceLock::new();
    Arc::clone(KEY.get_or_init(|| Arc::new(SigningKey::generate())))
}

/// A second key every reader trusts, which no owner of these tests signs with.
fn second_key() -> Arc<SigningKey> {
    static KEY: std::sync::OnceLock<Arc<SigningKey>> = std::sync::OnceLock::new();
    Arc::clone(KEY.get_or_init(|| Arc::new(SigningKey::generate())))
}

/// The key policy every reader applies: the deployment's key (and a second one) trusted.
fn policy() -> Arc<TrustedKeys> {
    let mut trusted = TrustedKeys::default();
    trusted.add(&key());
    trusted.add(&second_key());
    Arc::new(trusted)
}

fn meta(command_type: &'static str, key: Option<&str>, if_match: Option<u64>) -> RequestMeta {
    RequestMeta {
        command_type,
        idempotency_key: key.map(str::to_owned),
        request_digest: key.map(|k| format!("digest-of-{k}")),
        if_match,
        actor: "alice".into(),
        correlation_id: "corr-1".into(),
        causation_id: None,
        traceparent: None,
        recorded_trace: None,
    }
}

fn register() -> ProductCommand {
    ProductCommand::RegisterProduct {
        name: Text::parse("name", "Lamp").unwrap(),
        price: Money::new(1999, Currency::parse("EUR").unwrap()).unwrap(),
    }
}

fn restock(n: u64) -> ProductCommand {
    ProductCommand::Restock {
        quantity: Quantity::parse("quantity", n).unwrap(),
    }
}

fn reserve(order: &str, n: u64) -> ProductCommand {
    ProductCommand::ReserveStock {
        order_id: OrderId::parse(order).unwrap(),
        quantity: Quantity::parse("quantity", n).unwrap(),
    }
}

/// An owner of `log`, started as `instance` on a task of its own, once it serves; and the
/// channel to it.
async fn serving_owner(
    log: MemoryLog,
    instance: &str,
) -> (mpsc::Sender<CommandRequest<Product>>, StatusCell) {
    serving_owner_keeping_keys(log, instance, super::DEFAULT_KEY_RETENTION).await
}

/// [`serving_owner`], keeping each idempotency key for `retention`.
async fn serving_owner_keeping_keys(
    log: MemoryLog,
    instance: &str,
    retention: Duration,
) -> (mpsc::Sender<CommandRequest<Product>>, StatusCell) {
    let (owner, status) =
        PartitionOwner::<Product, _>::new(log, instance, key(), policy(), TIMEOUT);
    let owner = owner.with_key_retention(retention);
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(owner.run(rx));
    tokio::time::timeout(TIMEOUT, async {
        while status.get() != Status::Serving {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the owner took the partition");
    (tx, status)
}

/// An owner run until asked to stop: its channel, status, stop and task.
type Stoppable = (
    mpsc::Sender<CommandRequest<Product>>,
    StatusCell,
    tokio::sync::oneshot::Sender<Stop>,
    tokio::task::JoinHandle<()>,
);

/// An owner of `log`, started as `instance` and made as `configure` says, run on a task of
/// its own until it is asked to stop; once it serves: its channel, status, the way to ask
/// it to stop, and its task.
async fn stoppable_owner(
    log: MemoryLog,
    instance: &str,
    configure: impl FnOnce(PartitionOwner<Product, MemoryLog>) -> PartitionOwner<Product, MemoryLog>,
) -> Stoppable {
    let (owner, status) =
        PartitionOwner::<Product, _>::new(log, instance, key(), policy(), TIMEOUT);
    let (tx, rx) = mpsc::channel(QUEUE);
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(configure(owner).run_until(rx, Some(stop_rx)));
    tokio::time::timeout(TIMEOUT, async {
        while status.get() != Status::Serving {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the owner took the partition");
    (tx, status, stop, task)
}

/// Sends a command and waits for its answer.
async fn send(
    owner: &mpsc::Sender<CommandRequest<Product>>,
    stream: &str,
    command: ProductCommand,
    meta: RequestMeta,
) -> Result<Outcome, OwnerError> {
    answer(queue(owner, stream, command, meta)).await
}

/// Registers the product `stream` (no key, no precondition) and waits for the answer.
async fn register_product(
    owner: &mpsc::Sender<CommandRequest<Product>>,
    stream: &str,
) -> Result<Outcome, OwnerError> {
    send(
        owner,
        stream,
        register(),
        meta("RegisterProduct", None, None),
    )
    .await
}

/// Puts a command in the owner's queue without waiting: commands queued with no await
/// between them are decided in one flush (the tests run on one thread).
fn queue(
    owner: &mpsc::Sender<CommandRequest<Product>>,
    stream: &str,
    command: ProductCommand,
    meta: RequestMeta,
) -> Answer {
    let (reply, answer) = reply_channel();
    owner
        .try_send(CommandRequest {
            stream_id: stream.into(),
            command,
            meta,
            reply,
        })
        .expect("the owner's queue has room");
    answer
}

async fn answer(answer: Answer) -> Result<Outcome, OwnerError> {
    answer.wait(TIMEOUT).await.expect("answered in time")
}

/// Appends, straight to the log and unread by the owner, a restock of `quantity` on the
/// stream of the log's last commit, in the name of the writer of its first fence and
/// chained onto that commit: the owner's own earlier commit whose acknowledgement it never
/// got, landing late.
async fn restock_unread(log: &MemoryLog, quantity: u64) {
    let entries = log.entries();
    let decode = |e: &keel_kafka::LogEntry| LogRecord::decode(&e.payload).unwrap();
    let writer = decode(&entries[0]).writer().clone();
    let last = entries
        .iter()
        .rev()
        .find_map(|e| match decode(e) {
            LogRecord::Commit(c) => Some(c),
            LogRecord::Fence(_) | LogRecord::Receipt(_) => None,
        })
        .expect("a commit");
    let x = LogRecord::Commit(
        testing::commit(&writer, last.stream.clone(), last.next_version())
            .event(
                "ProductRestocked",
                1,
                serde_json::json!({"quantity": quantity}),
            )
            .command("Restock", "alice")
            .prev_hash(Some(last.hash.clone()))
            .signed(&key()),
    );
    log.handle()
        .append(&[(last.stream.id.as_str(), &x, None)])
        .await;
}

/// The log folded through the gate: each accepted commit's stream, version after it and
/// offset; and how many records the gate skipped.
fn accepted(log: &MemoryLog) -> (Vec<(String, u64, i64)>, u64) {
    let mut gate = PartitionGate::new(policy(), &here());
    let mut accepted = Vec::new();
    for entry in log.entries() {
        let read = gate.read(entry);
        assert!(read.record.is_ok(), "a Keel record");
        if let Some(LogRecord::Commit(commit)) = read.accepted() {
            accepted.push((
                commit.stream.id.clone(),
                commit.next_version(),
                read.entry.offset,
            ));
        }
    }
    (accepted, gate.rejected())
}

#[tokio::test]
async fn the_owner_decides_appends_and_acknowledges_what_the_log_accepted() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, _) = serving_owner(log.handle(), "cmd-a").await;

    let created = send(
        &owner,
        "p-1",
        register(),
        meta("RegisterProduct", Some("k-1"), None),
    )
    .await
    .unwrap();
    assert_eq!(
        (created.version, created.created, created.replayed),
        (1, true, false)
    );
    assert_eq!(created.events.len(), 1);

    // A retry with the same key gets the original answer; another request with it is refused.
    let replayed = send(
        &owner,
        "p-1",
        register(),
        meta("RegisterProduct", Some("k-1"), None),
    )
    .await
    .unwrap();
    assert_eq!(
        replayed,
        Outcome {
            replayed: true,
            ..created.clone()
        }
    );
    let mut other = meta("RegisterProduct", Some("k-1"), None);
    other.request_digest = Some("another request".into());
    assert_eq!(
        send(&owner, "p-1", register(), other).await,
        Err(OwnerError::IdempotencyKeyReused)
    );

    // If-Match on another version, and a domain rule, append nothing.
    assert_eq!(
        send(&owner, "p-1", restock(5), meta("Restock", None, Some(7))).await,
        Err(OwnerError::VersionMismatch {
            expected: 7,
            actual: 1
        })
    );
    let restocked = send(&owner, "p-1", restock(5), meta("Restock", None, Some(1)))
        .await
        .unwrap();
    assert_eq!((restocked.version, restocked.created), (2, false));
    assert!(matches!(
        send(
            &owner,
            "p-1",
            reserve("o-1", 6),
            meta("ReserveStock", None, None)
        )
        .await,
        Err(OwnerError::Domain(DomainError::InsufficientStock { .. }))
    ));
    assert!(matches!(
        send(&owner, "p-2", restock(1), meta("Restock", None, None)).await,
        Err(OwnerError::Domain(DomainError::ProductNotRegistered))
    ));

    // The log holds the fence and exactly the two acknowledged commits, all accepted.
    let (commits, skipped) = accepted(&log);
    assert_eq!(skipped, 0);
    let at = |o: &Outcome| o.position.as_ref().map(|p| p.offset).unwrap();
    assert_eq!(
        commits,
        vec![
            ("p-1".into(), 1, at(&created)),
            ("p-1".into(), 2, at(&restocked))
        ]
    );
    assert_eq!(log.entries().len(), 3);
}

/// An appended command's answer tells when its flight was decided, appended and read
/// back, in that order, for its trace; its commit records the trace context it ran in,
/// under the commit's hash and signature (the gate takes it). A command that appends
/// nothing has no phases to tell.
#[tokio::test]
async fn an_appended_command_is_answered_with_its_phases_and_its_commit_keeps_its_trace() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, _) = serving_owner(log.handle(), "cmd-a").await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut traced = meta("RegisterProduct", None, None);
    traced.recorded_trace = Some(traceparent.into());
    let before = std::time::SystemTime::now();
    let (answer, timeline) = queue(&owner, "p-1", register(), traced)
        .wait_timed(TIMEOUT)
        .await
        .expect("answered in time");
    assert_eq!(answer.map(|o| o.version), Ok(1));
    let decide = timeline.decide.expect("decided");
    let append = timeline.append.expect("appended");
    let read_back = timeline.read_back.expect("read back");
    assert!(before <= decide.0 && decide.0 <= decide.1, "{timeline:?}");
    assert!(decide.1 <= append.0 && append.0 <= append.1, "{timeline:?}");
    assert!(
        append.1 <= read_back.1 && read_back.0 <= read_back.1,
        "{timeline:?}"
    );

    let (unchanged, timeline) = queue(
        &owner,
        "p-1",
        register(),
        meta("RegisterProduct", None, None),
    )
    .wait_timed(TIMEOUT)
    .await
    .expect("answered in time");
    assert!(unchanged.is_err());
    assert_eq!(timeline, Timeline::default());

    let mut gate = PartitionGate::new(policy(), &here());
    let commits: Vec<_> = log
        .entries()
        .into_iter()
        .filter_map(|entry| match gate.read(entry).accepted() {
            Some(LogRecord::Commit(commit)) => Some(commit.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(commits.len(), 1);
    assert_eq!(commits[0].command.traceparent.as_deref(), Some(traceparent));
}

#[tokio::test]
async fn a_group_commit_decides_each_command_on_the_ones_ahead_of_it() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, _) = serving_owner(log.handle(), "cmd-a").await;
    // Queued together, so decided in one flush: the restock sees the registration and
    // the reservation sees the restock, though none of them is in the log yet.
    let answers = [
        queue(
            &owner,
            "p-1",
            register(),
            meta("RegisterProduct", None, None),
        ),
        queue(&owner, "p-1", restock(10), meta("Restock", None, None)),
        queue(
            &owner,
            "p-1",
            reserve("o-1", 10),
            meta("ReserveStock", None, None),
        ),
    ];
    let mut versions = Vec::new();
    for a in answers {
        versions.push(answer(a).await.unwrap().version);
    }
    assert_eq!(versions, [1, 2, 3]);
    // The fence, then the three commits in one append.
    assert_eq!(log.appends(), [Appended::One, Appended::Together(3)]);
    let (commits, skipped) = accepted(&log);
    assert_eq!(skipped, 0);
    assert_eq!(
        commits.iter().map(|(_, v, _)| *v).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

#[tokio::test]
async fn a_command_that_changes_nothing_appends_nothing_and_answers_the_version_read() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, _) = serving_owner(log.handle(), "cmd-a").await;
    let created = register_product(&owner, "p-1").await.unwrap();
    let release = ProductCommand::ReleaseStock {
        order_id: OrderId::parse("o-9").unwrap(),
    };
    let unchanged = send(&owner, "p-1", release, meta("ReleaseStock", None, None))
        .await
        .unwrap();
    assert_eq!(unchanged.version, 1);
    assert!(unchanged.events.is_empty() && !unchanged.created && !unchanged.replayed);
    assert_eq!(unchanged.position, created.position);
    // A flush of one command is still a flush: appended together, never waiting for room
    // in the producer's queue as the fence does.
    assert_eq!(log.appends(), [Appended::One, Appended::Together(1)]);
}

#[tokio::test]
async fn a_commit_the_gate_rejects_is_never_acknowledged() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, status) = serving_owner(log.handle(), "cmd-a").await;
    // Another writer fences the partition; before the owner reads that, it takes a
    // command (its queue comes first), appends, and reads back a commit the gate skips.
    let zombie_fence = testing::signed_fence(&testing::writer("cmd-z", 99), &key(), &here());
    log.handle().append(&[("", &zombie_fence, None)]).await;
    let refused = queue(
        &owner,
        "p-1",
        register(),
        meta("RegisterProduct", Some("k-1"), None),
    );
    assert!(matches!(
        answer(refused).await,
        Err(OwnerError::Unavailable(_))
    ));
    assert_eq!(status.get(), Status::Lost);
    // Its commit is in the log, and skipped by every reader.
    let (commits, skipped) = accepted(&log);
    assert!(commits.is_empty());
    assert_eq!(skipped, 1);
    assert_eq!(log.entries().len(), 3);
    // So a successor knows nothing of that key or stream.
    let (successor, _) = serving_owner(log.handle(), "cmd-b").await;
    let created = send(
        &successor,
        "p-1",
        register(),
        meta("RegisterProduct", Some("k-1"), None),
    )
    .await
    .unwrap();
    assert_eq!(
        (created.version, created.created, created.replayed),
        (1, true, false)
    );
}

/// A fence signed by a trusted key for another partition (or another topic), copied here
/// by someone with produce rights, claims nothing: the owner keeps serving, and every
/// reader keeps counting its commits.
#[tokio::test]
async fn a_signed_fence_copied_from_another_partition_takes_nothing() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, status) = serving_owner(log.handle(), "cmd-a").await;
    let elsewhere = [
        TopicPartition::new(TOPIC, 1),
        TopicPartition::new("t.order.events", 0),
    ];
    for (n, at) in elsewhere.iter().enumerate() {
        let copied = testing::signed_fence(&testing::writer("cmd-b", 50 + n as u64), &key(), at);
        log.handle().append(&[("", &copied, None)]).await;
    }
    let created = register_product(&owner, "p-1")
        .await
        .expect("the owner still owns its partition");
    assert_eq!(created.version, 1);
    assert_eq!(status.get(), Status::Serving);
    let (commits, skipped) = accepted(&log);
    assert_eq!(commits.len(), 1, "its commit counts for every reader");
    assert_eq!(skipped, 2, "the copied fences count for none");
}

/// A fence of rules this build does not know, above every epoch so far, is most likely a
/// newer command API's: the owner cannot judge it, so it stops acknowledging rather than
/// answer what the newer readers may not count.
#[tokio::test]
async fn a_fence_of_unknown_rules_stops_the_owner_serving() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, status) = serving_owner(log.handle(), "cmd-a").await;
    let LogRecord::Fence(mut newer) =
        testing::signed_fence(&testing::writer("cmd-new", 50), &key(), &here())
    else {
        unreachable!()
    };
    newer.rules = Some(keel_schemas::FENCE_RULES + 1);
    log.handle()
        .append(&[("", &LogRecord::Fence(newer.signed(&key())), None)])
        .await;
    let refused = register_product(&owner, "p-1").await;
    assert!(
        matches!(refused, Err(OwnerError::Unavailable(_))),
        "{refused:?}"
    );
    // Its commit may be in the log (decided before the owner read the fence); it was not
    // acknowledged, and the owner takes nothing more.
    assert_eq!(status.get(), Status::Lost);
    let again = register_product(&owner, "p-2").await;
    assert!(
        matches!(again, Err(OwnerError::Unavailable(_))),
        "{again:?}"
    );
}

/// A newer command API's fence of unknown rules stops an owner for good: a read-back that
/// fails after it (the owner recovering) does not make it serve again.
#[tokio::test(start_paused = true)]
async fn an_owner_stopped_by_a_fence_of_unknown_rules_does_not_recover_into_serving() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, status) = serving_owner(log.handle(), "cmd-a").await;
    log.handle()
        .append(&[("", &newer_rules_fence(), None)])
        .await;
    // The next command's read-back reads the newer fence, then fails at its own commit.
    log.fail_reads_at(2, 1);
    let refused = register_product(&owner, "p-1").await;
    assert!(
        matches!(refused, Err(OwnerError::Unavailable(_))),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status.get(), Status::Lost, "it does not serve again");
    let again = register_product(&owner, "p-2").await;
    assert!(
        matches!(again, Err(OwnerError::Unavailable(_))),
        "{again:?}"
    );
}

/// An owner started over a log whose last fence is of rules this build does not know
/// fences nothing and serves nothing: its fence would rank below the newer one for the
/// newer readers, which would skip whatever it acknowledged.
#[tokio::test]
async fn a_new_owner_over_a_fence_of_unknown_rules_does_not_fence() {
    let log = MemoryLog::new(TOPIC, 0);
    let (_first, _) = serving_owner(log.handle(), "cmd-a").await;
    log.handle()
        .append(&[("", &newer_rules_fence(), None)])
        .await;
    let (owner, status) =
        PartitionOwner::<Product, _>::new(log.handle(), "cmd-b", key(), policy(), TIMEOUT);
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(owner.run(rx));
    tokio::time::timeout(TIMEOUT, async {
        while status.get() != Status::Lost {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the new owner stops");
    assert_eq!(log.entries().len(), 2, "it appended no fence");
    let refused = register_product(&tx, "p-1").await;
    assert!(
        matches!(refused, Err(OwnerError::Unavailable(_))),
        "{refused:?}"
    );
}

/// A fence signed by a trusted key, of rules above this build's, at a high epoch.
fn newer_rules_fence() -> LogRecord {
    let LogRecord::Fence(mut newer) =
        testing::signed_fence(&testing::writer("cmd-new", 50), &key(), &here())
    else {
        unreachable!()
    };
    newer.rules = Some(keel_schemas::FENCE_RULES + 1);
    LogRecord::Fence(newer.signed(&key()))
}

#[tokio::test]
async fn a_fenced_owner_stops_acknowledging_and_its_successor_reads_the_state_from_the_log() {
    let log = MemoryLog::new(TOPIC, 0);
    let (first, first_status) = serving_owner(log.handle(), "cmd-a").await;
    let created = send(
        &first,
        "p-1",
        register(),
        meta("RegisterProduct", Some("k-1"), None),
    )
    .await
    .unwrap();

    // A second owner fences the partition with the next epoch and serves it.
    let (second, _) = serving_owner(log.handle(), "cmd-b").await;
    let restocked = send(&second, "p-1", restock(3), meta("Restock", None, Some(1)))
        .await
        .unwrap();
    assert_eq!(restocked.version, 2);
    // The key the first owner recorded is known to the second: rebuilt from the log.
    assert_eq!(
        send(
            &second,
            "p-1",
            register(),
            meta("RegisterProduct", Some("k-1"), None)
        )
        .await,
        Ok(Outcome {
            replayed: true,
            ..created
        })
    );

    // The first owner has seen the newer fence: it refuses, and appends nothing.
    tokio::time::timeout(TIMEOUT, async {
        while first_status.get() != Status::Lost {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the first owner noticed the fence");
    let before = log.entries().len();
    assert!(matches!(
        send(&first, "p-1", restock(1), meta("Restock", None, None)).await,
        Err(OwnerError::Unavailable(_))
    ));
    assert_eq!(log.entries().len(), before);

    let (commits, skipped) = accepted(&log);
    assert_eq!(skipped, 0);
    assert_eq!(
        commits
            .iter()
            .map(|(s, v, _)| (s.as_str(), *v))
            .collect::<Vec<_>>(),
        vec![("p-1", 1), ("p-1", 2)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_catch_up_that_fails_partway_resumes_where_it_applied() {
    let log = MemoryLog::new(TOPIC, 0);
    let (first, _) = serving_owner(log.handle(), "cmd-a").await;
    register_product(&first, "p-1").await.unwrap();
    send(&first, "p-1", restock(5), meta("Restock", None, None))
        .await
        .unwrap();
    // The next owner's catch-up reads the first fence, then its fetch of the first commit
    // fails once: it must not resume past the fence it read.
    log.fail_reads_at(1, 1);
    let (second, _) = serving_owner(log.handle(), "cmd-b").await;
    let restocked = send(&second, "p-1", restock(1), meta("Restock", None, Some(2)))
        .await
        .expect("the second owner knows the stream is at version 2");
    assert_eq!(restocked.version, 3);
    let (commits, skipped) = accepted(&log);
    assert_eq!(skipped, 0);
    assert_eq!(commits.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_command_whose_caller_gave_up_in_the_queue_is_never_appended() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, _) = serving_owner(log.handle(), "cmd-a").await;
    // The caller gives up before the owner (on this thread) gets to the command.
    let abandoned = queue(
        &owner,
        "p-1",
        register(),
        meta("RegisterProduct", Some("k-1"), None),
    );
    assert_eq!(abandoned.wait(Duration::ZERO).await, Err(NoAnswer::GaveUp));
    // The next command is decided in a later flush: the first was dropped, not appended.
    let created = send(
        &owner,
        "p-2",
        register(),
        meta("RegisterProduct", Some("k-2"), None),
    )
    .await
    .unwrap();
    assert_eq!(created.stream.id, "p-2");
    let (commits, _) = accepted(&log);
    assert_eq!(
        commits
            .iter()
            .map(|(s, _, _)| s.as_str())
            .collect::<Vec<_>>(),
        ["p-2"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_command_taken_on_is_answered_after_its_read_back_whatever_the_callers_patience() {
    let (reply, answer) = reply_channel();
    assert!(reply.take_on());
    let waiting = tokio::spawn(answer.wait(Duration::from_millis(10)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(reply.send(Err(OwnerError::Unavailable("read-back failed".into()))));
    assert_eq!(
        waiting.await.unwrap(),
        Ok(Err(OwnerError::Unavailable("read-back failed".into())))
    );
}

#[tokio::test(start_paused = true)]
async fn two_owners_started_with_one_name_never_both_serve() {
    let log = MemoryLog::new(TOPIC, 0);
    // Both read the empty log before either fences: both fence with epoch 1.
    let start = |log: MemoryLog| {
        let (owner, status) =
            PartitionOwner::<Product, _>::new(log, "cmd-same", key(), policy(), TIMEOUT);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(owner.run(rx));
        (tx, status)
    };
    let (a, a_status) = start(log.handle());
    let (b, b_status) = start(log.handle());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let serving = [&a_status, &b_status]
        .iter()
        .filter(|s| s.get() == Status::Serving)
        .count();
    assert_eq!(serving, 1, "one owner serves, the other knows it lost");
    let fences: Vec<_> = log
        .entries()
        .iter()
        .map(|e| LogRecord::decode(&e.payload).unwrap())
        .collect();
    assert_eq!(fences.len(), 2);
    assert_ne!(
        fences[0].writer(),
        fences[1].writer(),
        "each has its own name"
    );
    assert!(fences[0].writer().instance.starts_with("cmd-same/"));
    // Whichever serves, only one acknowledges.
    let answers = [
        register_product(&a, "p-1").await,
        register_product(&b, "p-2").await,
    ];
    assert_eq!(answers.iter().filter(|a| a.is_ok()).count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_commit_fails_the_rest_of_its_flush() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, status) = serving_owner(log.handle(), "cmd-a").await;
    let created = register_product(&owner, "p-1").await.unwrap();
    send(&owner, "p-1", restock(10), meta("Restock", None, None))
        .await
        .unwrap();
    // The owner's own earlier commit X, whose acknowledgement it never got, becomes
    // visible only now: a restock of 1, in the owner's name, chained onto the stream.
    restock_unread(&log, 1).await;
    // One flush, decided before the owner reads X: the restock loses its version to X,
    // the reservation was decided on a state that held the restock, the registration of
    // p-2 comes after a rejected commit.
    let answers = [
        queue(
            &owner,
            "p-1",
            restock(5),
            meta("Restock", Some("k-r"), None),
        ),
        queue(
            &owner,
            "p-1",
            reserve("o-1", 15),
            meta("ReserveStock", Some("k-s"), None),
        ),
        queue(
            &owner,
            "p-2",
            register(),
            meta("RegisterProduct", Some("k-p"), None),
        ),
    ];
    for a in answers {
        assert!(matches!(answer(a).await, Err(OwnerError::Unavailable(_))));
    }
    // Every reader skips the reservation: it chained onto the skipped restock.
    let (commits, skipped) = accepted(&log);
    assert_eq!(skipped, 2);
    assert_eq!(
        commits
            .iter()
            .map(|(s, v, _)| (s.as_str(), *v))
            .collect::<Vec<_>>(),
        [("p-1", 1), ("p-1", 2), ("p-1", 3), ("p-2", 1)]
    );
    // The owner re-read the log: it serves again, on the state the log holds.
    assert_eq!(
        send(
            &owner,
            "p-1",
            reserve("o-1", 15),
            meta("ReserveStock", Some("k-s"), None)
        )
        .await,
        Err(OwnerError::Domain(DomainError::InsufficientStock {
            requested: 15,
            available: 11
        }))
    );
    assert_eq!(status.get(), Status::Serving);
    assert_eq!(created.version, 1);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_given_only_from_a_state_confirmed_against_the_log() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, _) = serving_owner(log.handle(), "cmd-a").await;
    register_product(&owner, "p-1").await.unwrap();
    // A restock of 20 in the owner's name lands, not yet read by the owner.
    restock_unread(&log, 20).await;
    // Decided on the state read, the reservation is refused (no stock) and the If-Match
    // of version 2 fails; neither is true of the log, which the owner reads before
    // answering: both are decided again.
    let reserved = queue(
        &owner,
        "p-1",
        reserve("o-1", 15),
        meta("ReserveStock", None, None),
    );
    let conditional = queue(&owner, "p-1", restock(1), meta("Restock", None, Some(3)));
    assert_eq!(answer(reserved).await.unwrap().version, 3);
    assert_eq!(answer(conditional).await.unwrap().version, 4);
}

#[tokio::test(start_paused = true)]
async fn a_recovering_owner_reads_the_log_again_without_waiting_for_a_command() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, status) = serving_owner(log.handle(), "cmd-a").await;
    // The read-back of its commit fails once: the commit is not confirmed, and the owner
    // stops serving.
    log.fail_reads_at(1, 1);
    assert!(matches!(
        send(
            &owner,
            "p-1",
            register(),
            meta("RegisterProduct", Some("k-1"), None),
        )
        .await,
        Err(OwnerError::Unavailable(_))
    ));
    assert_eq!(status.get(), Status::Recovering);
    // No command arrives, yet it reads the log again and serves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status.get(), Status::Serving);
    let replayed = send(
        &owner,
        "p-1",
        register(),
        meta("RegisterProduct", Some("k-1"), None),
    )
    .await
    .unwrap();
    assert!(replayed.replayed, "the commit was in the log all along");
}

#[tokio::test]
async fn a_long_catch_up_checks_in_parallel_and_resumes_where_it_applied() {
    let log = MemoryLog::new(TOPIC, 0);
    let (first, _) = serving_owner(log.handle(), "cmd-a").await;
    register_product(&first, "p-1").await.unwrap();
    // 1,200 commits: catch-up chunks large enough to be checked on two threads.
    for round in 0..4 {
        let answers: Vec<_> = (0..300)
            .map(|i| {
                let stream = format!("p-{}", 2 + round * 300 + i);
                queue(
                    &first,
                    &stream,
                    register(),
                    meta("RegisterProduct", None, None),
                )
            })
            .collect();
        for a in answers {
            answer(a).await.unwrap();
        }
    }
    send(&first, "p-1", restock(5), meta("Restock", None, Some(1)))
        .await
        .unwrap();
    // The next owner's fetch fails once in the middle of its first chunk.
    log.fail_reads_at(700, 1);
    let (second, _) = serving_owner(log.handle(), "cmd-b").await;
    let restocked = send(&second, "p-1", restock(1), meta("Restock", None, Some(2)))
        .await
        .expect("the second owner read every commit");
    assert_eq!(restocked.version, 3);
    let conflict = register_product(&second, "p-1000").await;
    assert_eq!(
        conflict,
        Err(OwnerError::Domain(DomainError::ProductAlreadyRegistered))
    );
    let (commits, skipped) = accepted(&log);
    assert_eq!((commits.len(), skipped), (1203, 0));
}
