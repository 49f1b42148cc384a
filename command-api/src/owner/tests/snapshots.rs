//! Snapshots: an owner starts from the latest one and reads only what follows it, with
//! its streams, keys and gate as reading the whole partition gives them; a snapshot that
//! fails a check (tampered, cut short, unsigned by a trusted key, of another log) is
//! ignored, and the owner reads the partition from its first record.

use super::*;

/// An owner of `log` writing a snapshot every `every` records, run until stopped.
async fn snapshotting_owner(log: MemoryLog, instance: &str, every: u64) -> Stoppable {
    stoppable_owner(log, instance, |o| o.with_snapshots(every)).await
}

/// Ten products, each restocked twice, one restock keyed; then a planned handoff (which
/// writes a snapshot and the mark).
async fn history(log: &MemoryLog) {
    let (owner, _, stop, task) = snapshotting_owner(log.handle(), "cmd-a", 7).await;
    for i in 0..10 {
        register_product(&owner, &format!("p-{i}")).await.unwrap();
    }
    for i in 0..10 {
        send(
            &owner,
            &format!("p-{i}"),
            restock(1),
            meta("Restock", None, None),
        )
        .await
        .unwrap();
    }
    let keyed = send(
        &owner,
        "p-3",
        restock(2),
        meta("Restock", Some("k-3"), None),
    )
    .await
    .unwrap();
    assert_eq!(keyed.version, 3);
    stop.send(Stop::Handoff).unwrap();
    tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
}

/// The next owner serves as if it had read the whole partition: versions go on, and the
/// keyed command replays.
async fn serves_on(owner: &mpsc::Sender<CommandRequest<Product>>) {
    let replay = send(owner, "p-3", restock(2), meta("Restock", Some("k-3"), None))
        .await
        .unwrap();
    assert_eq!((replay.version, replay.replayed), (3, true));
    for i in 0..10 {
        let expected = if i == 3 { 4 } else { 3 };
        let outcome = send(
            owner,
            &format!("p-{i}"),
            restock(1),
            meta("Restock", None, None),
        )
        .await
        .unwrap();
        assert_eq!(outcome.version, expected, "p-{i}");
    }
    assert!(matches!(
        send(
            owner,
            "p-0",
            register(),
            meta("RegisterProduct", None, None)
        )
        .await,
        Err(OwnerError::Domain(_))
    ));
}

#[tokio::test]
async fn an_owner_starts_from_the_latest_snapshot_and_reads_only_what_follows() {
    let log = MemoryLog::new(TOPIC, 0);
    history(&log).await;
    assert!(log.snapshots().len() >= 2, "periodic and handoff snapshots");
    let latest: Manifest =
        serde_json::from_slice(&log.snapshots().last().unwrap().manifest).unwrap();
    let end = log.entries().len() as i64;
    assert_eq!(
        latest.next_offset,
        end - 1,
        "the handoff snapshot covers everything before the mark"
    );
    // Every record the snapshot covers but its last fails to read: only an owner that
    // started from the snapshot can serve.
    for offset in 0..latest.next_offset - 1 {
        log.fail_reads_at(offset, usize::MAX);
    }
    let (owner, status, _stop, _task) = snapshotting_owner(log.handle(), "cmd-b", 1000).await;
    assert_eq!(status.epoch(), 2);
    assert_eq!(status.started_from(), Some(latest.next_offset));
    serves_on(&owner).await;
    let (accepted, _) = accepted(&log);
    assert_eq!(accepted.len(), 10 + 10 + 1 + 10);
}

#[tokio::test]
async fn a_snapshot_that_fails_a_check_is_ignored_and_the_partition_is_read() {
    type Change = Box<dyn Fn(&mut StoredSnapshot)>;
    let other_key = SigningKey::generate();
    let cases: Vec<(&str, Change)> = vec![
        (
            "a body changed",
            Box::new(|s: &mut StoredSnapshot| {
                let at = s.body.len() / 2;
                s.body[at] ^= 1;
            }),
        ),
        (
            "a body cut short",
            Box::new(|s: &mut StoredSnapshot| s.body.truncate(s.body.len() / 2)),
        ),
        (
            "a manifest cut short",
            Box::new(|s: &mut StoredSnapshot| s.manifest.truncate(10)),
        ),
        (
            "a manifest claiming more",
            Box::new(|s: &mut StoredSnapshot| {
                let mut m: Manifest = serde_json::from_slice(&s.manifest).unwrap();
                m.next_offset -= 1;
                s.manifest = serde_json::to_vec(&m).unwrap();
            }),
        ),
        (
            // Re-signed by a key no reader trusts, with a body that says every product
            // is at version 99: trusted, it would answer wrongly.
            "signed by an untrusted key",
            Box::new(move |s: &mut StoredSnapshot| {
                let body = String::from_utf8(s.body.clone())
                    .unwrap()
                    .replace("\"version\":3", "\"version\":99");
                s.body = body.into_bytes();
                let mut m: Manifest = serde_json::from_slice(&s.manifest).unwrap();
                m.body_sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&s.body));
                m.signature = Some(other_key.sign(&m.digest()));
                s.manifest = serde_json::to_vec(&m).unwrap();
            }),
        ),
        (
            // Kept keys for a minute: this owner keeps them a day, and would miss some.
            "holding keys of a shorter retention",
            Box::new(|s: &mut StoredSnapshot| {
                let mut m: Manifest = serde_json::from_slice(&s.manifest).unwrap();
                m.key_retention_secs = 60;
                m.signature = Some(key().sign(&m.digest()));
                s.manifest = serde_json::to_vec(&m).unwrap();
            }),
        ),
        (
            // Signed with a trusted key, but not the owner's.
            "signed by another trusted key than the owner's",
            Box::new(|s: &mut StoredSnapshot| {
                let mut m: Manifest = serde_json::from_slice(&s.manifest).unwrap();
                m.signature = Some(second_key().sign(&m.digest()));
                s.manifest = serde_json::to_vec(&m).unwrap();
            }),
        ),
        (
            "anchored on another record",
            Box::new(|s: &mut StoredSnapshot| {
                let mut m: Manifest = serde_json::from_slice(&s.manifest).unwrap();
                m.anchor = "0".repeat(64);
                m.signature = Some(key().sign(&m.digest()));
                s.manifest = serde_json::to_vec(&m).unwrap();
            }),
        ),
    ];
    for (case, change) in cases {
        let log = MemoryLog::new(TOPIC, 0);
        history(&log).await;
        log.change_latest_snapshot(|s| change(s));
        let (owner, status, _stop, _task) = snapshotting_owner(log.handle(), "cmd-b", 1000).await;
        assert_eq!(
            status.started_from(),
            None,
            "{case}: the snapshot was trusted"
        );
        // It serves right: it read the partition from its first record.
        serves_on(&owner).await;
        eprintln!("{case}: ignored");
    }
}

#[tokio::test]
async fn a_snapshot_of_another_partition_is_ignored() {
    let log = MemoryLog::new(TOPIC, 0);
    history(&log).await;
    let elsewhere = MemoryLog::new(TOPIC, 1);
    // The other partition's log: the same history (its own records), then this one's
    // snapshot copied over.
    history(&elsewhere).await;
    let copied = log.snapshots().last().unwrap().clone();
    elsewhere.change_latest_snapshot(|s| *s = copied);
    let (owner, status, _stop, _task) = snapshotting_owner(elsewhere.handle(), "cmd-b", 1000).await;
    assert_eq!(status.started_from(), None);
    serves_on(&owner).await;
}

#[tokio::test]
async fn a_snapshot_of_another_log_of_the_same_partition_is_ignored() {
    // The topic was deleted and made again: the same partition, other records.
    let earlier = MemoryLog::new(TOPIC, 0);
    history(&earlier).await;
    let log = MemoryLog::new(TOPIC, 0);
    history(&log).await;
    let copied = earlier.snapshots().last().unwrap().clone();
    log.change_latest_snapshot(|s| *s = copied);
    let (owner, status, _stop, _task) = snapshotting_owner(log.handle(), "cmd-b", 1000).await;
    assert_eq!(status.started_from(), None, "its anchor is not this log's");
    serves_on(&owner).await;
}
