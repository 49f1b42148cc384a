//! Pipelined flushes: the commands queued behind a flight are decided against the state
//! including it and appended while it is read back. Each test queues more than one
//! flight's worth of commands at once, so the owner has a second flight to decide while
//! the first is in the air.

use super::super::task::MAX_FLUSH;
use super::*;

/// Queues, without waiting, one keyed registration of a new product per id.
fn queue_registrations(
    owner: &mpsc::Sender<CommandRequest<Product>>,
    ids: impl Iterator<Item = usize>,
) -> Vec<(String, Answer)> {
    ids.map(|i| {
        let stream = format!("p-{i}");
        let key = format!("k-{i}");
        let answer = queue(
            owner,
            &stream,
            register(),
            meta("RegisterProduct", Some(&key), None),
        );
        (stream, answer)
    })
    .collect()
}

/// The commits in the log (accepted or not) holding the idempotency key `key`.
fn commits_with_key(log: &MemoryLog, key: &str) -> usize {
    log.entries()
        .iter()
        .filter(|e| {
            matches!(
                LogRecord::decode(&e.payload),
                Ok(LogRecord::Commit(c)) if c.command.idempotency_key.as_deref() == Some(key)
            )
        })
        .count()
}

#[tokio::test]
async fn the_flight_behind_is_decided_on_the_one_ahead_and_a_retry_of_its_key_waits_for_it() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, status) = serving_owner(log.handle(), "cmd-a").await;
    register_product(&owner, "lamp").await.unwrap();

    // The first flight restocks the lamp under a key and registers products; the second
    // restocks it again (decided on the first: version 3) and retries the first restock
    // with its key while the first flight is still in the air.
    let first = queue(
        &owner,
        "lamp",
        restock(5),
        meta("Restock", Some("k-r"), None),
    );
    let mut registered = queue_registrations(&owner, 0..MAX_FLUSH - 1);
    let second = queue(&owner, "lamp", restock(2), meta("Restock", None, Some(2)));
    let retried = queue(
        &owner,
        "lamp",
        restock(5),
        meta("Restock", Some("k-r"), None),
    );
    registered.extend(queue_registrations(&owner, MAX_FLUSH..MAX_FLUSH + 40));

    let first = answer(first).await.unwrap();
    let second = answer(second).await.unwrap();
    let retried = answer(retried).await.unwrap();
    assert!(
        status.pipelined() >= 1,
        "the second flight was decided while the first was read back"
    );
    assert_eq!((first.version, first.replayed), (2, false));
    assert_eq!(second.version, 3, "decided on the flight ahead of it");
    assert_eq!(
        retried,
        Outcome {
            replayed: true,
            ..first.clone()
        },
        "the retry waited for its key's answer instead of restocking again"
    );
    for (stream, answer) in registered {
        let outcome = super::answer(answer).await.unwrap();
        assert_eq!((outcome.stream.id, outcome.version), (stream, 1));
    }

    // The log holds one restock under the key, and every commit was accepted.
    assert_eq!(commits_with_key(&log, "k-r"), 1);
    let (commits, skipped) = accepted(&log);
    assert_eq!(skipped, 0);
    let lamp: Vec<u64> = commits
        .iter()
        .filter(|(s, _, _)| s == "lamp")
        .map(|(_, v, _)| *v)
        .collect();
    assert_eq!(lamp, vec![1, 2, 3]);
    assert_eq!(commits.len(), 3 + MAX_FLUSH - 1 + 40);
}

#[tokio::test]
async fn a_rejected_commit_fails_the_flight_behind_it_too_and_retries_learn_what_the_log_holds() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, status) = serving_owner(log.handle(), "cmd-a").await;

    // The first flight's first commit is damaged on its way, so the gate refuses it; the
    // second flight was decided on the first.
    log.garble_next_flush();
    let ahead = queue_registrations(&owner, 0..MAX_FLUSH);
    let behind = queue_registrations(&owner, MAX_FLUSH..MAX_FLUSH + 40);
    for (_, answer) in ahead.into_iter().chain(behind) {
        assert!(
            matches!(super::answer(answer).await, Err(OwnerError::Unavailable(_))),
            "nothing decided after a refused commit is acknowledged"
        );
    }
    assert!(status.pipelined() >= 1);

    // The second flight's commits are in the log and accepted all the same: acknowledging
    // them was not wrong here, but they were decided on a state the log did not hold.
    let (commits, skipped) = accepted(&log);
    assert_eq!(skipped, 1, "the damaged commit");
    let behind_accepted = commits
        .iter()
        .filter(|(s, _, _)| {
            s.strip_prefix("p-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n >= MAX_FLUSH)
        })
        .count();
    assert_eq!(behind_accepted, 40);

    // Retries with the same keys: the refused one is committed now, every other replays
    // what the log holds; nothing is applied twice.
    for i in 0..MAX_FLUSH + 40 {
        let outcome = send(
            &owner,
            &format!("p-{i}"),
            register(),
            meta("RegisterProduct", Some(&format!("k-{i}")), None),
        )
        .await
        .unwrap();
        assert_eq!(outcome.version, 1);
        assert_eq!(outcome.replayed, i != 0, "p-{i}");
    }
    let (commits, skipped) = accepted(&log);
    assert_eq!((commits.len(), skipped), (MAX_FLUSH + 40, 1));
    assert_eq!(
        commits_with_key(&log, "k-0"),
        2,
        "the refused one and its retry"
    );
}

#[tokio::test]
async fn a_command_behind_a_keyed_refusal_on_its_stream_waits_for_the_refusal_s_receipt() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, _) = serving_owner(log.handle(), "cmd-a").await;
    register_product(&owner, "lamp").await.unwrap();

    // The first flight refuses a keyed restock (If-Match on another version): its answer
    // is recorded in a receipt linked onto the lamp's stream once the flight has landed.
    // The second flight restocks the lamp.
    let refused = queue(
        &owner,
        "lamp",
        restock(1),
        meta("Restock", Some("k-412"), Some(7)),
    );
    let registered = queue_registrations(&owner, 0..MAX_FLUSH - 1);
    let restocked = queue(&owner, "lamp", restock(2), meta("Restock", None, None));

    assert_eq!(
        answer(refused).await,
        Err(OwnerError::VersionMismatch {
            expected: 7,
            actual: 1
        }),
        "the refusal's receipt was not overtaken by a commit on its stream"
    );
    assert_eq!(answer(restocked).await.unwrap().version, 2);
    for (_, answer) in registered {
        super::answer(answer).await.unwrap();
    }
    let (_, skipped) = accepted(&log);
    assert_eq!(
        skipped, 0,
        "every record counts: the receipt and the commits"
    );
}
