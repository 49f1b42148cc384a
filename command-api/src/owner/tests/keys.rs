//! Idempotency keys against the owner: a key reused with another request, a keyed
//! answer that appended nothing (recorded in a receipt) given again after a restart, and
//! keys kept for their retention.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_reused_key_is_refused_only_once_the_commit_holding_it_counts() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, _) = serving_owner(log.handle(), "cmd-a").await;
    register_product(&owner, "p-1").await.unwrap();
    // A commit in the owner's name lands unread: the next restock of p-1 loses its version.
    restock_unread(&log, 1).await;
    let first = queue(
        &owner,
        "p-1",
        restock(5),
        meta("Restock", Some("k-1"), None),
    );
    let mut other = meta("Restock", Some("k-1"), None);
    other.request_digest = Some("another request".into());
    let reused = queue(&owner, "p-1", restock(6), other);
    assert!(matches!(
        answer(first).await,
        Err(OwnerError::Unavailable(_))
    ));
    assert!(
        matches!(answer(reused).await, Err(OwnerError::Unavailable(_))),
        "the key is in no commit that counts"
    );
}

/// A keyed command that appended nothing (refused, or no change) gets the same answer on a
/// retry, also from another owner after a restart and after the stream moved on: the
/// answer is in a receipt in the log, which changes no stream.
#[tokio::test]
async fn a_keyed_refusal_or_no_op_is_answered_the_same_after_a_restart() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, _) = serving_owner(log.handle(), "cmd-a").await;
    let none = || meta("Restock", None, None);
    send(&owner, "p-1", register(), none()).await.unwrap();
    let reserve_5 = || meta("ReserveStock", Some("k-r"), None);
    let refused = send(&owner, "p-1", reserve("o-1", 5), reserve_5()).await;
    let expected = DomainError::InsufficientStock {
        requested: 5,
        available: 0,
    };
    assert!(
        matches!(&refused, Err(OwnerError::Domain(e)) if *e == expected),
        "{refused:?}"
    );
    send(&owner, "p-1", restock(10), none()).await.unwrap();
    send(&owner, "p-1", reserve("o-2", 3), none())
        .await
        .unwrap();
    let unchanged = send(
        &owner,
        "p-1",
        reserve("o-2", 3),
        meta("ReserveStock", Some("k-n"), None),
    )
    .await
    .unwrap();
    assert_eq!((unchanged.version, unchanged.events.len()), (3, 0));
    let receipts = || {
        log.entries()
            .iter()
            .filter(|e| matches!(LogRecord::decode(&e.payload), Ok(LogRecord::Receipt(_))))
            .count()
    };
    assert_eq!(
        receipts(),
        2,
        "one receipt per keyed answer that appended nothing"
    );

    // Another owner, after a restart: the stock is there now, but the retry is answered
    // as the first attempt was; the no-op too, though the stream has moved on since.
    let (successor, _) = serving_owner(log.handle(), "cmd-b").await;
    send(&successor, "p-1", restock(1), none()).await.unwrap();
    let retried = send(&successor, "p-1", reserve("o-1", 5), reserve_5()).await;
    assert!(
        matches!(&retried, Err(OwnerError::Domain(e)) if *e == expected),
        "{retried:?}"
    );
    let again = send(
        &successor,
        "p-1",
        reserve("o-2", 3),
        meta("ReserveStock", Some("k-n"), None),
    )
    .await
    .unwrap();
    assert_eq!((again.version, again.replayed), (3, true));
    let mut other = reserve_5();
    other.request_digest = Some("another request".into());
    assert!(matches!(
        send(&successor, "p-1", reserve("o-1", 1), other).await,
        Err(OwnerError::IdempotencyKeyReused)
    ));
    assert_eq!(receipts(), 2, "a replay records nothing");
    // Receipts are no versions: every reader's gate has p-1 at its commits' version.
    let mut gate = PartitionGate::new(policy(), &here());
    for entry in log.entries() {
        let _ = gate.read(entry);
    }
    let p1 = testing::stream("product", "p-1");
    assert_eq!(gate.stream_version(&p1), 4);
}

/// A keyed refusal followed, in the same flush, by a commit of the same stream is decided
/// again on the state after it (its receipt could only be recorded at the version it was
/// decided on, which the commit moved past), and its receipt counts for every reader.
#[tokio::test]
async fn a_keyed_refusal_overtaken_by_a_commit_of_its_flush_is_decided_again() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, _) = serving_owner(log.handle(), "cmd-a").await;
    register_product(&owner, "p-1").await.unwrap();
    let refused = queue(
        &owner,
        "p-1",
        reserve("o-1", 100),
        meta("ReserveStock", Some("k-1"), None),
    );
    let restocked = queue(&owner, "p-1", restock(5), meta("Restock", None, None));
    assert_eq!(answer(restocked).await.unwrap().version, 2);
    let refused = answer(refused).await;
    let expected = DomainError::InsufficientStock {
        requested: 100,
        available: 5,
    };
    assert!(
        matches!(&refused, Err(OwnerError::Domain(e)) if *e == expected),
        "decided again after the restock: {refused:?}"
    );
    let mut gate = PartitionGate::new(policy(), &here());
    let mut receipts = 0;
    for entry in log.entries() {
        let read = gate.read(entry);
        if let Ok((LogRecord::Receipt(_), verdict)) = read.record {
            assert!(verdict.is_ok(), "the receipt counts: {verdict:?}");
            receipts += 1;
        }
    }
    assert_eq!(receipts, 1);
}

/// A key is kept for its retention, also by an owner that read it from the log: within
/// it the retry is answered from the first commit; after it the retry is a fresh command.
#[tokio::test]
async fn a_keyed_retry_replays_within_the_keys_retention_and_is_fresh_after_it() {
    let log = MemoryLog::new(TOPIC, 0);
    let start = |retention: Duration, instance: &'static str| {
        let log = log.handle();
        async move { serving_owner_keeping_keys(log, instance, retention).await.0 }
    };
    let day = Duration::from_secs(24 * 3600);
    let owner = start(day, "cmd-a").await;
    let keyed = || meta("RegisterProduct", Some("k-1"), None);
    let first = send(&owner, "p-1", register(), keyed()).await.unwrap();
    let retry = send(&owner, "p-1", register(), keyed()).await.unwrap();
    assert_eq!((retry.version, retry.replayed), (first.version, true));
    // A successor reads the key from the log and keeps it as long.
    let successor = start(day, "cmd-b").await;
    let retry = send(&successor, "p-1", register(), keyed()).await.unwrap();
    assert_eq!((retry.version, retry.replayed), (first.version, true));
    // Once the retention is over (here it is none), the key is forgotten: the retry is
    // decided afresh, and a registered product refuses a second registration.
    let forgetful = start(Duration::ZERO, "cmd-c").await;
    assert!(matches!(
        send(&forgetful, "p-1", register(), keyed()).await,
        Err(OwnerError::Domain(_))
    ));
    let restocked = || meta("Restock", Some("k-2"), None);
    let once = send(&forgetful, "p-1", restock(1), restocked())
        .await
        .unwrap();
    let again = send(&forgetful, "p-1", restock(1), restocked())
        .await
        .unwrap();
    assert!(!again.replayed, "a fresh command");
    assert_eq!(again.version, once.version + 1, "appended a second time");
}
