//! Stopping an owner: a planned handoff answers what it took and leaves its mark; an owner
//! stopped before it owns the partition writes nothing; an owner the assignment still
//! names takes a partition back from a writer that fenced it out.

use super::*;
use keel_schemas::Writer;

fn fences(log: &MemoryLog) -> Vec<keel_schemas::FenceRecord> {
    log.entries()
        .iter()
        .filter_map(|e| match LogRecord::decode(&e.payload).unwrap() {
            LogRecord::Fence(f) => Some(f),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_planned_handoff_answers_the_queued_commands_then_leaves_its_mark() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, status, stop, task) = stoppable_owner(log.handle(), "cmd-a", |o| o).await;
    register_product(&owner, "p-1").await.unwrap();
    // Queued before the stop: taken on, so answered.
    let queued: Vec<Answer> = (0..5)
        .map(|_| queue(&owner, "p-1", restock(1), meta("Restock", None, None)))
        .collect();
    stop.send(Stop::Handoff).unwrap();
    for (n, answer) in queued.into_iter().enumerate() {
        let outcome = super::answer(answer)
            .await
            .expect("a queued command is answered");
        assert_eq!(outcome.version, 2 + n as u64);
    }
    tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
    // After the stop nothing is taken.
    let (reply, _answer) = reply_channel();
    assert!(
        owner
            .try_send(CommandRequest {
                stream_id: "p-1".into(),
                command: restock(1),
                meta: meta("Restock", None, None),
                reply,
            })
            .is_err(),
        "a stopped owner takes no command"
    );
    // The mark is the last record: the owner's own writer and epoch, signed.
    let last = LogRecord::decode(&log.entries().last().unwrap().payload).unwrap();
    let LogRecord::Fence(mark) = last else {
        panic!("the last record is the handoff mark: {last:?}")
    };
    assert!(mark.handoff);
    assert_eq!(Some(mark.writer.instance.as_str()), status.writer());
    assert_eq!(mark.writer.epoch, 1);
    assert!(mark.signature.is_some());

    // The next owner fences above it and serves on from the log.
    let (next, next_status) = serving_owner(log.handle(), "cmd-b").await;
    assert_eq!(next_status.epoch(), 2);
    let outcome = send(&next, "p-1", restock(1), meta("Restock", None, None))
        .await
        .unwrap();
    assert_eq!(outcome.version, 7);
    let (accepted, skipped) = accepted(&log);
    assert_eq!(accepted.len(), 7, "every acknowledged command counts");
    assert_eq!(skipped, 1, "the mark takes nothing");
}

#[tokio::test]
async fn an_owner_stopped_for_a_lost_partition_leaves_no_mark() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, _, stop, task) = stoppable_owner(log.handle(), "cmd-a", |o| o).await;
    register_product(&owner, "p-1").await.unwrap();
    stop.send(Stop::Lost).unwrap();
    tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
    assert!(
        fences(&log).iter().all(|f| !f.handoff),
        "a lost partition gets no handoff mark"
    );
}

#[tokio::test]
async fn an_owner_stopped_before_it_owns_the_partition_writes_nothing() {
    let log = MemoryLog::new(TOPIC, 0);
    let earlier = Writer {
        instance: "cmd-0/1".into(),
        epoch: 1,
    };
    log.handle()
        .append(&[("", &testing::signed_fence(&earlier, &key(), &here()), None)])
        .await;
    // Every read fails: the owner keeps trying to catch up, and never fences.
    log.fail_reads_at(0, usize::MAX);
    let (owner, status) =
        PartitionOwner::<Product, _>::new(log.handle(), "cmd-a", key(), policy(), TIMEOUT);
    let (_tx, rx) = mpsc::channel(8);
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(owner.run_until(rx, Some(stop_rx)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(status.get(), Status::Starting);
    stop.send(Stop::Handoff).unwrap();
    tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
    assert_eq!(log.entries().len(), 1, "nothing was written");
}

#[tokio::test(start_paused = true)]
async fn an_owner_still_assigned_takes_the_partition_back_after_its_delay() {
    let log = MemoryLog::new(TOPIC, 0);
    let retake = Duration::from_secs(6);
    let (owner, status, _stop, _task) =
        stoppable_owner(log.handle(), "cmd-a", |o| o.retaking_after(retake)).await;
    register_product(&owner, "p-1").await.unwrap();
    // A writer the group let go (paused past its session) fences the partition.
    let zombie = Writer {
        instance: "cmd-z/1".into(),
        epoch: 2,
    };
    log.handle()
        .append(&[("", &testing::signed_fence(&zombie, &key(), &here()), None)])
        .await;
    tokio::time::timeout(TIMEOUT, async {
        while status.get() != Status::Lost {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the owner sees it was fenced out");
    // Until the delay has passed it answers 503; then it fences again and serves.
    assert!(matches!(
        send(&owner, "p-1", restock(1), meta("Restock", None, None)).await,
        Err(OwnerError::Unavailable(_))
    ));
    tokio::time::sleep(retake).await;
    tokio::time::timeout(TIMEOUT, async {
        while status.get() != Status::Serving {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the owner took the partition back");
    assert_eq!(status.epoch(), 3);
    let outcome = send(&owner, "p-1", restock(1), meta("Restock", None, None))
        .await
        .unwrap();
    assert_eq!(outcome.version, 2);
}

#[tokio::test(start_paused = true)]
async fn an_owner_without_a_retake_delay_stays_fenced_out() {
    let log = MemoryLog::new(TOPIC, 0);
    let (owner, status, _stop, _task) = stoppable_owner(log.handle(), "cmd-a", |o| o).await;
    register_product(&owner, "p-1").await.unwrap();
    let other = Writer {
        instance: "cmd-b/1".into(),
        epoch: 2,
    };
    log.handle()
        .append(&[("", &testing::signed_fence(&other, &key(), &here()), None)])
        .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(status.get(), Status::Lost);
    assert_eq!(fences(&log).len(), 2, "it never fenced again");
}

#[tokio::test]
async fn a_new_owner_asks_its_predecessor_to_hand_over_once_it_has_read_the_log() {
    let log = MemoryLog::new(TOPIC, 0);
    let (old, old_status, stop, old_task) =
        stoppable_owner(log.handle(), "cmd-a", |o| o.with_snapshots(1_000)).await;
    register_product(&old, "p-1").await.unwrap();

    // The successor's ask: the old owner still serves when it is called (a command sent
    // to it then is acknowledged), then hands over on request.
    let (asked_tx, asked_rx) = tokio::sync::oneshot::channel::<Result<Outcome, OwnerError>>();
    let ask_old = old.clone();
    let ends_read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (ask_log, ask_ends_read) = (log.handle(), Arc::clone(&ends_read));
    let ask: AskPredecessor = Box::new(move || {
        Box::pin(async move {
            let served = send(&ask_old, "p-1", restock(3), meta("Restock", None, None)).await;
            let _ = asked_tx.send(served);
            stop.send(Stop::HandoffNow).unwrap();
            tokio::time::timeout(TIMEOUT, old_task)
                .await
                .unwrap()
                .unwrap();
            ask_ends_read.store(ask_log.ends_read(), std::sync::atomic::Ordering::SeqCst);
        })
    });
    let (next, next_status, _next_stop, _next_task) = stoppable_owner(log.handle(), "cmd-b", |o| {
        o.after_predecessor_hands_over(ask)
    })
    .await;

    let served_meanwhile = asked_rx.await.unwrap().unwrap();
    assert_eq!(
        served_meanwhile.version, 2,
        "the old owner served while asked"
    );
    assert_eq!(
        (old_status.epoch(), next_status.epoch()),
        (1, 2),
        "the new owner fenced above the old one"
    );
    // The log: the old owner's fence, its commits, its mark, then the new fence; and no
    // snapshot (the successor had read the log already).
    let marks: Vec<(bool, u64)> = fences(&log)
        .iter()
        .map(|f| (f.handoff, f.writer.epoch))
        .collect();
    assert_eq!(marks, vec![(false, 1), (true, 1), (false, 2)]);
    assert!(log.snapshots().is_empty());
    assert_eq!(
        log.ends_read(),
        ends_read.load(std::sync::atomic::Ordering::SeqCst),
        "it fenced on its predecessor's answer, without asking where the log ends again"
    );
    let outcome = send(&next, "p-1", restock(1), meta("Restock", None, None))
        .await
        .unwrap();
    assert_eq!(
        outcome.version, 3,
        "decided on everything the old owner acknowledged"
    );
}

#[tokio::test]
async fn an_owner_taking_a_fresh_partition_asks_nobody() {
    let log = MemoryLog::new(TOPIC, 0);
    let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&asked);
    let ask: AskPredecessor = Box::new(move || {
        Box::pin(async move {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    });
    let (owner, status, _stop, _task) = stoppable_owner(log.handle(), "cmd-a", |o| {
        o.after_predecessor_hands_over(ask)
    })
    .await;
    register_product(&owner, "p-1").await.unwrap();
    assert_eq!(status.epoch(), 1);
    assert!(
        !asked.load(std::sync::atomic::Ordering::SeqCst),
        "no writer held the partition"
    );
}
