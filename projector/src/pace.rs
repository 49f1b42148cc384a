//! How fast a rebuild goes: unpaced, at a rate the operator sets, or (the default)
//! adaptively, backing off while live reads slow down or the live projection falls
//! behind, the way PostgreSQL's vacuum cost delay protects foreground work.
//!
//! The adaptive pacer looks every [`CHECK_INTERVAL`] at the latest window of each query
//! API's reads (`keel_query_windows`, which each query API writes four times a second)
//! and at the live generation's lag. While the latest window's p99 is above its bound, or
//! the lag is, it doubles the pause it makes after each slice at every check (from
//! [`FIRST_PAUSE`] up to [`MAX_PAUSE`]); on each new window well below it
//! ([`EASE_BELOW`]), it shrinks the pause by a fifth, but once backed off not below the
//! first pause while reads are served; in between it holds. With no reads served at all
//! it shrinks the pause at every check, down to none. Quick to back off, slower to press
//! on again, and it stops pressing on before the reads slow down. A rebuild that starts while live
//! reads are served starts backed off ([`START_PAUSE`]) rather than at full speed, since
//! the first sign of its harm would come a window late. With nothing else running it
//! never pauses: a rebuild alone runs at its unpaced rate, less the cost of the checks
//! (two queries each).

use std::str::FromStr;
use std::time::{Duration, Instant};

use keel_kafka::LogReader;
use sqlx::PgPool;
use tracing::debug;

use crate::applier::{Applier, Flow};
use crate::decode::Decoded;
use crate::prefetch::BatchSize;

/// How often the adaptive pacer looks at the live reads and lag.
const CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How far back the pacer looks for each query API's latest window (they are 250 ms
/// long; a publisher delayed by a busy database may be late).
const RECENT_WINDOWS: &str = "1 second";
/// The first pause after a batch once the pacer backs off.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// Only reads faster than this share of their bound let the pause shrink.
const EASE_BELOW: f64 = 0.6;
/// The pause a rebuild starts with while live reads are served.
const START_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause after a batch.
const MAX_PAUSE: Duration = Duration::from_millis(500);
/// How many records a rebuild applies between two pauses while it backs off: small
/// slices spread its work out between the live reads, where a whole batch would hold the
/// database (and the cores) for a burst that the reads queue behind.
const PACED_SLICE: usize = 100;
/// A window of fewer reads than this says too little about their latency.
const MIN_WINDOW_REQUESTS: i32 = 5;
/// Fewer reads than this, over the query APIs' windows of a moment, say too little.
const MIN_REQUESTS: i64 = 10;
/// The bound on the live reads' p99 when no baseline is known, in milliseconds.
const DEFAULT_TARGET_MS: f64 = 10.0;

/// How a rebuild paces itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// As fast as it can.
    Off,
    /// At most this many events per second.
    Rate(f64),
    /// Backs off while live reads slow down or the live projection falls behind.
    Adaptive,
}

impl FromStr for Pace {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" => Ok(Pace::Off),
            "adaptive" => Ok(Pace::Adaptive),
            n => match n.parse::<f64>() {
                Ok(rate) if rate.is_finite() && rate >= 1.0 => Ok(Pace::Rate(rate)),
                _ => Err(format!(
                    "{s:?}: expected `adaptive`, `off`, or a rate in events per second (at least 1)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Pace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pace::Off => write!(f, "off"),
            Pace::Rate(rate) => write!(f, "{rate} events/s"),
            Pace::Adaptive => write!(f, "adaptive"),
        }
    }
}

/// Paces one rebuild's batches.
pub(crate) struct Pacer {
    pace: Pace,
    pool: PgPool,
    projection: &'static str,
    started: Instant,
    events: u64,
    pause: Duration,
    checked: Option<Instant>,
    /// The bound on the live reads' p99, in milliseconds.
    target_ms: f64,
    /// The live generation's lag when the rebuild started.
    lag_at_start: i64,
    /// Records the live generation had read at the last check.
    live_read: Option<i64>,
    /// Whether the pause protects live reads: they were slow when it last grew, or were
    /// served as the rebuild started. Such a pause is whole; one that grew for the live
    /// projection's lag alone is capped.
    for_reads: bool,
    paused: Duration,
    /// How many pauses it made.
    pauses: u32,
    /// When the newest window of reads it acted on ended (seconds since the epoch).
    seen: Option<f64>,
    /// The batches the rebuild reads: [`PACED_SLICE`] records while it backs off, else
    /// `batch_size`.
    reads: BatchSize,
    batch_size: usize,
}

impl Pacer {
    /// A pacer of `projection`'s rebuild; the adaptive one takes the live reads' p99 over
    /// the last minute as their baseline (the median, over its busy quarters of a second,
    /// of the highest p99 of the query APIs' windows), and the bound as twice that plus a
    /// millisecond. While live reads are served it starts backed off.
    pub(crate) async fn start(
        pace: Pace,
        pool: &PgPool,
        projection: &'static str,
        batch_size: usize,
    ) -> Self {
        let mut pacer = Self {
            pace,
            pool: pool.clone(),
            projection,
            started: Instant::now(),
            events: 0,
            pause: Duration::ZERO,
            checked: None,
            target_ms: DEFAULT_TARGET_MS,
            lag_at_start: 0,
            live_read: None,
            for_reads: false,
            paused: Duration::ZERO,
            pauses: 0,
            seen: None,
            reads: BatchSize::fixed(batch_size),
            batch_size,
        };
        if pace == Pace::Adaptive {
            let baseline: Option<f64> = sqlx::query_scalar(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY p99)::float8 FROM (
                     SELECT max(p99_ms) AS p99 FROM keel_query_windows
                     WHERE second > now() - interval '60 seconds' AND requests >= $1
                     GROUP BY date_bin('250 milliseconds', second, timestamptz 'epoch')
                     HAVING sum(requests) >= $2) busy",
            )
            .bind(MIN_WINDOW_REQUESTS)
            .bind(MIN_REQUESTS)
            .fetch_one(pool)
            .await
            .ok()
            .flatten();
            if let Some(baseline) = baseline {
                pacer.target_ms = 2.0 * baseline + 1.0;
            }
            if let Some((_, newest)) = pacer.recent_reads().await {
                // The windows before the rebuild say nothing of its harm: they count as seen.
                pacer.seen = Some(newest);
                pacer.set_pause(START_PAUSE);
                pacer.for_reads = true;
            }
            pacer.lag_at_start = pacer.live().await.map_or(0, |(lag, _)| lag);
        }
        pacer
    }

    /// Applies `batch` with `applier`, pausing after it as the pace asks; while the pacer
    /// backs off, a slice of [`PACED_SLICE`] records at a time with a pause after each. So
    /// while live reads stay slow a rebuild applies at least [`PACED_SLICE`] records per
    /// [`MAX_PAUSE`] on each process (200 records/s): spreading one batch's pause over its
    /// slices instead kept the least pace higher, and let by-id reads queue for seconds
    /// again on the bench.
    pub(crate) async fn apply(
        &mut self,
        applier: &mut Applier<'_>,
        batch: &[Decoded],
    ) -> anyhow::Result<Flow> {
        // An empty batch still goes through the applier, which does nothing with it.
        if batch.is_empty() {
            return applier.apply(batch).await;
        }
        let slice = if self.pause.is_zero() {
            batch.len()
        } else {
            PACED_SLICE
        };
        for slice in batch.chunks(slice) {
            let (before, applying) = (applier.events(), Instant::now());
            if let Flow::Stopped = applier.apply(slice).await? {
                return Ok(Flow::Stopped);
            }
            self.after_batch(applier.events() - before, applying.elapsed())
                .await;
        }
        Ok(Flow::Continue)
    }

    /// How long it paused in all.
    pub(crate) fn paused(&self) -> Duration {
        self.paused
    }

    /// Opens the rebuild's reader of `assignment`: with a bounded read-ahead when it starts
    /// backed off among live reads ([`LogReader::open_gently`]), for as long as the reader
    /// lasts (a rebuild among live reads reads at most some ten thousand records a second
    /// on the bench, however fast they are); else as fast as it goes.
    pub(crate) fn open_reader(
        &self,
        kafka: &keel_kafka::KafkaSettings,
        assignment: &[(keel_schemas::TopicPartition, i64)],
    ) -> Result<LogReader, keel_kafka::KafkaError> {
        if self.pause.is_zero() {
            LogReader::open(kafka, assignment)
        } else {
            LogReader::open_gently(kafka, assignment)
        }
    }

    /// The size of the batches the rebuild should read, kept up to date by the pacer.
    pub(crate) fn batch_size(&self) -> BatchSize {
        self.reads.clone()
    }

    /// Reads whole batches from now on, until the pacer next checks: for a
    /// swap's catch-up under its lock.
    pub(crate) fn read_whole(&self) {
        self.reads.set(self.batch_size);
    }

    fn set_pause(&mut self, pause: Duration) {
        self.pause = pause;
        self.reads.set(if pause.is_zero() {
            self.batch_size
        } else {
            PACED_SLICE.min(self.batch_size)
        });
    }

    /// After a batch (or slice) of `events` that took `took` to apply: waits as the pace
    /// asks. A pause that protects live reads is whole, also while it shrinks once they
    /// are fast again; one that grew for the live projection's lag alone is never more
    /// than twice what the batch took, so the rebuild keeps at least a third of its pace
    /// (it competes with the live runner for the same database, and a rebuild that
    /// crawled would leave the live one behind as long).
    async fn after_batch(&mut self, events: u64, took: Duration) {
        self.events += events;
        let wait = match self.pace {
            Pace::Off => Duration::ZERO,
            Pace::Rate(rate) => {
                let due = Duration::from_secs_f64(self.events as f64 / rate);
                due.saturating_sub(self.started.elapsed())
            }
            Pace::Adaptive => {
                if self.checked.is_none_or(|t| t.elapsed() >= CHECK_INTERVAL) {
                    self.checked = Some(Instant::now());
                    self.adapt().await;
                }
                if self.for_reads {
                    self.pause
                } else {
                    self.pause.min(took * 2)
                }
            }
        };
        if !wait.is_zero() {
            self.pauses += 1;
            self.paused += wait;
            tokio::time::sleep(wait).await;
        }
    }

    /// The highest p99 of the query APIs' latest windows, and when the newest of them
    /// ended, when they served enough reads to say.
    async fn recent_reads(&self) -> Option<(f64, f64)> {
        let (p99, n, newest): (Option<f64>, Option<i64>, Option<f64>) = sqlx::query_as(&format!(
            "SELECT max(p99_ms)::float8, sum(requests)::bigint,
                        extract(epoch FROM max(second))::float8
                 FROM (SELECT DISTINCT ON (instance) second, requests, p99_ms
                       FROM keel_query_windows
                       WHERE second > now() - interval '{RECENT_WINDOWS}' AND requests >= $1
                       ORDER BY instance, second DESC) latest"
        ))
        .bind(MIN_WINDOW_REQUESTS)
        .fetch_one(&self.pool)
        .await
        .ok()?;
        p99.zip(newest)
            .filter(|_| n.is_some_and(|n| n >= MIN_REQUESTS))
    }

    /// Doubles the pause while the latest window of live reads is slow or the live
    /// projection falls behind; shrinks it on a new window of fast reads, or when none are
    /// served.
    async fn adapt(&mut self) {
        let reads = self.recent_reads().await;
        let p99 = reads.map(|(p99, _)| p99);
        // A fast window counts once: a check that finds no new one since the last does not
        // shrink the pause.
        let new_window =
            reads.is_some_and(|(_, newest)| self.seen.is_none_or(|seen| newest > seen));
        if let Some((_, newest)) = reads {
            self.seen = Some(newest);
        }
        // A slow window doubles the pause at every check while it is the latest (two or
        // three times, more while its publisher is late): backing off is what protects
        // the reads, and the pause eases again on the fast windows after.
        let slow_reads = p99.is_some_and(|p99| p99 > self.target_ms);
        // The live projection falling behind counts only while it is applied: during an
        // automatic rebuild (or with the projection stopped) nobody applies it, and a
        // pause would help no one.
        let (lag, read) = self.live().await.unwrap_or((0, 0));
        let advancing = self.live_read.is_some_and(|before| read > before);
        self.live_read = Some(read);
        let behind = advancing && lag > (2 * self.lag_at_start).max(self.lag_at_start + 5_000);
        if slow_reads {
            self.for_reads = true;
        } else if behind {
            self.for_reads = false;
        }
        // Between the bound and [`EASE_BELOW`] of it the pause holds: pressing on until
        // the reads slow down would slow them down every time.
        let fast_reads = new_window && p99.is_some_and(|p99| p99 < self.target_ms * EASE_BELOW);
        let pause = if slow_reads || behind {
            (self.pause * 2).clamp(FIRST_PAUSE, MAX_PAUSE)
        } else if reads.is_some() && !fast_reads {
            self.pause
        } else {
            let shrunk = self.pause * 4 / 5;
            if reads.is_some() && !self.pause.is_zero() {
                // Reads are served: a paused rebuild keeps at least the first pause.
                shrunk.max(FIRST_PAUSE)
            } else if shrunk < Duration::from_millis(1) {
                Duration::ZERO
            } else {
                shrunk
            }
        };
        self.set_pause(pause);
        debug!(projection = self.projection, ?p99, target_ms = self.target_ms, lag, pause = ?self.pause,
               "rebuild pacing");
    }

    /// Records the live generation still has to read, as the projectors last measured
    /// the partitions' ends, and records it has read.
    async fn live(&self) -> Result<(i64, i64), sqlx::Error> {
        sqlx::query_as(
            "SELECT COALESCE(sum(GREATEST(e.end_offset - c.next_offset, 0)), 0)::bigint,
                    COALESCE(sum(c.next_offset), 0)::bigint
             FROM keel_checkpoints c
             JOIN keel_projections p ON p.name = c.projection AND p.generation = c.generation
             LEFT JOIN keel_partition_ends e ON e.topic = c.topic AND e.partition = c.partition
             WHERE c.projection = $1",
        )
        .bind(self.projection)
        .fetch_one(&self.pool)
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    /// What a batch took to apply, in the tests.
    const BATCH: Duration = Duration::from_secs(1);

    #[test]
    fn a_pace_reads_as_off_adaptive_or_a_rate() {
        assert_eq!("off".parse::<Pace>(), Ok(Pace::Off));
        assert_eq!("adaptive".parse::<Pace>(), Ok(Pace::Adaptive));
        assert_eq!("5000".parse::<Pace>(), Ok(Pace::Rate(5000.0)));
        for bad in ["0", "-3", "fast", "NaN", "inf"] {
            assert!(bad.parse::<Pace>().is_err(), "{bad}");
        }
    }

    /// Adaptive pacing pauses while the live reads' p99 is above its bound, each new
    /// window counting once, and stops pausing once they are fast again; with no reads at
    /// all it never pauses; started while reads are served, it starts backed off.
    #[tokio::test]
    async fn adaptive_pacing_backs_off_while_live_reads_are_slow_and_not_otherwise() {
        let (_db, pool) = crate::testing::database("pace").await;
        // Each call publishes a new latest window of query API `q`, ending a little ahead
        // (each later than the one before) so that it stays the latest for the test's
        // length however slow the machine.
        let windows = std::sync::atomic::AtomicI32::new(0);
        let window = |p99: f64| {
            let (pool, n) = (
                pool.clone(),
                windows.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            );
            async move {
                sqlx::query(
                    "INSERT INTO keel_query_windows (instance, second, requests, p50_ms, p99_ms)
                     VALUES ('q', now() + interval '1 hour' + $2 * interval '1 millisecond',
                             100, 1, $1)",
                )
                .bind(p99 as f32)
                .bind(n)
                .execute(&pool)
                .await
                .unwrap();
            }
        };
        // No adapting at the next batches, however slow the machine.
        let hold_checks =
            |pacer: &mut Pacer| pacer.checked = Some(Instant::now() + Duration::from_secs(3600));
        // Idle: no reads, no lag, no pause.
        let mut pacer = Pacer::start(Pace::Adaptive, &pool, "orders", 2_000).await;
        assert_eq!(pacer.pause, Duration::ZERO);
        for _ in 0..5 {
            pacer.checked = None;
            pacer.after_batch(100, BATCH).await;
        }
        assert_eq!(pacer.paused(), Duration::ZERO);
        // A baseline of 2 ms (windows of the last minute, none of them recent): the bound
        // is 5 ms.
        sqlx::query(
            "INSERT INTO keel_query_windows (instance, second, requests, p50_ms, p99_ms)
             SELECT 'q', now() - s * interval '250 milliseconds', 100, 1, 2
             FROM generate_series(8, 120) s",
        )
        .execute(&pool)
        .await
        .unwrap();
        let mut pacer = Pacer::start(Pace::Adaptive, &pool, "orders", 2_000).await;
        assert!((pacer.target_ms - 5.0).abs() < 0.01, "{}", pacer.target_ms);
        assert_eq!(pacer.pause, Duration::ZERO, "no reads are served now");
        window(50.0).await;
        for _ in 0..3 {
            pacer.checked = None;
            pacer.after_batch(100, BATCH).await;
        }
        assert_eq!(
            pacer.pause,
            FIRST_PAUSE * 4,
            "it doubles at each check while reads are slow"
        );
        assert_eq!(pacer.batch_size().get(), PACED_SLICE, "it reads in slices");
        // While reads are slow, the whole pause, however short the batch.
        hold_checks(&mut pacer);
        let before = pacer.paused();
        pacer.after_batch(100, Duration::from_millis(1)).await;
        assert_eq!(pacer.paused() - before, FIRST_PAUSE * 4);
        // Fast again: the pause shrinks by a fifth a window, and stays whole meanwhile.
        window(2.0).await;
        pacer.checked = None;
        pacer.after_batch(100, BATCH).await;
        assert_eq!(pacer.pause, FIRST_PAUSE * 4 * 4 / 5);
        pacer.checked = None;
        pacer.after_batch(100, BATCH).await;
        assert_eq!(
            pacer.pause,
            FIRST_PAUSE * 4 * 4 / 5,
            "a fast window counts once"
        );
        hold_checks(&mut pacer);
        let before = pacer.paused();
        pacer.after_batch(100, Duration::from_millis(1)).await;
        assert_eq!(
            pacer.paused() - before,
            pacer.pause,
            "whole while it shrinks"
        );
        // Near the bound, it holds.
        let held = pacer.pause;
        window(4.0).await;
        pacer.checked = None;
        pacer.after_batch(100, BATCH).await;
        assert_eq!(pacer.pause, held, "it holds near the bound");
        for _ in 0..20 {
            window(2.0).await;
            pacer.checked = None;
            pacer.after_batch(100, BATCH).await;
        }
        assert_eq!(
            pacer.pause, FIRST_PAUSE,
            "while reads are served, never below the first pause"
        );
        // No reads at all: it stops pausing.
        sqlx::query("DELETE FROM keel_query_windows WHERE second > now()")
            .execute(&pool)
            .await
            .unwrap();
        for _ in 0..20 {
            pacer.checked = None;
            pacer.after_batch(100, BATCH).await;
        }
        assert_eq!(
            pacer.pause,
            Duration::ZERO,
            "and stops once no reads are served"
        );
        assert_eq!(pacer.batch_size().get(), 2_000, "and reads whole batches");
        // Reads are served as a rebuild starts: it starts backed off, however fast they are.
        window(2.0).await;
        let pacer = Pacer::start(Pace::Adaptive, &pool, "orders", 2_000).await;
        assert_eq!(pacer.pause, START_PAUSE);
        assert!(pacer.for_reads, "a whole pause");
        assert_eq!(pacer.batch_size().get(), PACED_SLICE);
        // Too few reads to say: not.
        sqlx::query("UPDATE keel_query_windows SET requests = 3 WHERE second > now()")
            .execute(&pool)
            .await
            .unwrap();
        let pacer = Pacer::start(Pace::Adaptive, &pool, "orders", 2_000).await;
        assert_eq!(pacer.pause, Duration::ZERO);
        pool.close().await;
    }

    /// While it backs off, a rebuild applies a batch a slice at a time with a pause after
    /// each, so its work is spread out between the live reads; otherwise whole.
    #[tokio::test]
    async fn a_backing_off_rebuild_applies_a_batch_in_slices_with_a_pause_after_each() {
        let (_db, pool) = crate::testing::database("pace-slices").await;
        let one = crate::testing::OneOrderPartition::prepare(&pool).await;
        let hold = crate::hold::Hold::claim(&pool, "run:orders".into())
            .await
            .unwrap();
        let mut applier = Applier::load(&one.job, one.live, crate::generation::Mode::Live, &hold)
            .await
            .unwrap();
        let w = keel_schemas::testing::writer("w", 1);
        let mut records = vec![one.fence(&w)];
        records.extend((1..250).map(|i| crate::testing::placed(&w, &one.key, &format!("o-{i}"))));
        let mut pacer = Pacer::start(Pace::Adaptive, &pool, "orders", 2_000).await;
        pacer.checked = Some(Instant::now() + Duration::from_secs(3600));
        pacer.pause = FIRST_PAUSE;
        pacer.for_reads = true;
        let flow = pacer
            .apply(&mut applier, &one.read(0, &records))
            .await
            .unwrap();
        assert!(matches!(flow, Flow::Continue));
        assert_eq!(applier.next_offset(&one.job.partitions()[0]), 250);
        assert_eq!(
            pacer.pauses, 3,
            "slices of 100, 100 and 50, a pause after each"
        );
        assert_eq!(pacer.paused(), FIRST_PAUSE * 3);
        // Not backing off: the batch whole, no pause.
        pacer.pause = Duration::ZERO;
        let more: Vec<_> = (250..260)
            .map(|i| crate::testing::placed(&w, &one.key, &format!("o-{i}")))
            .collect();
        pacer
            .apply(&mut applier, &one.read(250, &more))
            .await
            .unwrap();
        assert_eq!(applier.next_offset(&one.job.partitions()[0]), 260);
        assert_eq!(pacer.pauses, 3);
        pool.close().await;
    }

    /// A set rate holds the events per second to it.
    #[tokio::test]
    async fn a_set_rate_holds_the_rebuild_to_it() {
        let (_db, pool) = crate::testing::database("pace-rate").await;
        let mut pacer = Pacer::start(Pace::Rate(2_000.0), &pool, "orders", 2_000).await;
        let started = Instant::now();
        for _ in 0..5 {
            pacer.after_batch(100, Duration::ZERO).await;
        }
        // 500 events at 2,000/s: a quarter of a second at least.
        assert!(
            started.elapsed() >= Duration::from_millis(249),
            "{:?}",
            started.elapsed()
        );
        pool.close().await;
    }
}
