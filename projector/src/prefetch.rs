//! The next batches, read and decoded by a task of their own while the current one is
//! applied: the broker, the decoding and PostgreSQL work at the same time instead of in
//! turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_kafka::{AbortOnDrop, LogEntry, LogReader, in_two_halves};
use keel_schemas::TrustedKeys;

use crate::decode::Decoded;

/// How many records a batch read holds at most: fixed, or as a rebuild's pacer says
/// ([`crate::pace::Pacer::batch_size`]), so that while a rebuild backs off its reading
/// and decoding (checking each commit's signature) come in small slices too, not in
/// bursts that hold both cores.
#[derive(Clone, Debug)]
pub(crate) struct BatchSize(Arc<AtomicUsize>);

impl BatchSize {
    /// Batches of up to `records`.
    pub(crate) fn fixed(records: usize) -> Self {
        Self(Arc::new(AtomicUsize::new(records.max(1))))
    }

    /// The size of the next batch read.
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the size of the batches read from now on.
    pub(crate) fn set(&self, records: usize) {
        self.0.store(records.max(1), Ordering::Relaxed);
    }
}

/// Batches read ahead of the one being applied.
pub(crate) struct Prefetch {
    batches: tokio::sync::mpsc::Receiver<anyhow::Result<Vec<Decoded>>>,
    _task: AbortOnDrop<()>,
}

impl Prefetch {
    /// Starts reading batches of up to `size` records each (see [`LogReader::next_batch`]).
    /// Each batch is decoded and its commits' hashes and signatures checked against
    /// `policy` in two halves at once, off the apply path.
    pub(crate) fn start(
        reader: Arc<LogReader>,
        policy: Arc<TrustedKeys>,
        size: BatchSize,
        wait: Duration,
        linger: Duration,
    ) -> Self {
        let (tx, batches) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            loop {
                let batch = match reader.next_batch(size.get(), wait, linger).await {
                    Ok(entries) => decode(entries, &policy).await,
                    Err(e) => Err(e.into()),
                };
                let failed = batch.is_err();
                if tx.send(batch).await.is_err() || failed {
                    return;
                }
            }
        });
        Self {
            batches,
            _task: AbortOnDrop(task),
        }
    }
}

/// Decodes `entries` in order, in two halves on two blocking threads.
async fn decode(entries: Vec<LogEntry>, policy: &Arc<TrustedKeys>) -> anyhow::Result<Vec<Decoded>> {
    let policy = Arc::clone(policy);
    Ok(in_two_halves(entries, move |half| Decoded::all(half, &policy)).await?)
}

impl Prefetch {
    /// The next batch; empty when nothing arrived within the wait.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Vec<Decoded>> {
        match self.batches.recv().await {
            Some(batch) => batch,
            None => anyhow::bail!("the log reader stopped"),
        }
    }
}
