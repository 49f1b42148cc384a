//! The projector's metrics: what this process applied (events and batches, each batch's
//! duration, live or rebuilding), and, read from PostgreSQL on each scrape, where every
//! projection stands: its generation, whether it runs, its lag per partition in records and
//! in seconds, the streams it holds back, its dead letters, whether a live process holds
//! each partition, and a rebuild's progress. The second part is the same on every
//! projector process (it is the database's), so any one scrape shows the whole picture.
//!
//! Every label is bounded: a projection, a mode, a topic and partition; never a stream.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use keel_views::status::ProjectionStatus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use sqlx::PgPool;
use tracing::warn;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    projection: String,
    mode: &'static str,
}

/// The upper bounds of the batch buckets, in seconds: one small transaction (a
/// millisecond) to a stalled one (half a minute).
const BATCH_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn batch_histogram() -> Histogram {
    Histogram::new(BATCH_BUCKETS)
}

/// What this process applied. Counted whether registered or not; cheap to clone.
#[derive(Clone, Debug)]
pub struct ProjectorMetrics {
    events: Family<ModeLabels, Counter>,
    batches: Family<ModeLabels, Counter>,
    durations: Family<ModeLabels, Histogram, fn() -> Histogram>,
}

impl Default for ProjectorMetrics {
    fn default() -> Self {
        Self {
            events: Family::default(),
            batches: Family::default(),
            durations: Family::new_with_constructor(batch_histogram as fn() -> Histogram),
        }
    }
}

impl ProjectorMetrics {
    /// Registers the families in `registry` (the process's `keel_` registry), each of
    /// `projections` in both modes from zero.
    pub fn register(&self, registry: &mut Registry, projections: &[&str]) {
        for projection in projections {
            for mode in ["live", "rebuild"] {
                let labels = ModeLabels {
                    projection: (*projection).to_owned(),
                    mode,
                };
                let _ = self.events.get_or_create(&labels);
                let _ = self.batches.get_or_create(&labels);
                let _ = self.durations.get_or_create(&labels);
            }
        }
        registry.register(
            "projection_events_applied",
            "Events this process applied to a projection's views, live or into a generation \
             being rebuilt",
            self.events.clone(),
        );
        registry.register(
            "projection_batches",
            "Batch transactions this process committed, by projection and mode",
            self.batches.clone(),
        );
        registry.register_with_unit(
            "projection_batch_duration",
            "Time from a batch's first gate check to its transaction's commit, by projection \
             and mode",
            Unit::Seconds,
            self.durations.clone(),
        );
    }

    /// Records a committed batch of `events` that took `took`.
    pub(crate) fn batch(&self, projection: &str, rebuild: bool, events: usize, took: Duration) {
        let labels = ModeLabels {
            projection: projection.to_owned(),
            mode: if rebuild { "rebuild" } else { "live" },
        };
        self.events.get_or_create(&labels).inc_by(events as u64);
        self.batches.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }
}

/// Every projection's status as last read for a scrape: [`StatusSnapshot::scrape`] reads
/// it (at most once a second, one scrape at a time) before the registry encodes it.
#[derive(Clone, Debug, Default)]
pub struct StatusSnapshot {
    last: Arc<Mutex<Read>>,
    /// Held across a scrape's read and encoding: concurrent scrapes wait for one read.
    scraping: Arc<tokio::sync::Mutex<()>>,
}

/// The last read of the status.
#[derive(Debug, Default)]
struct Read {
    statuses: Vec<ProjectionStatus>,
    /// The fulfilment process's open orders, when it runs on this database.
    fulfilment: Option<crate::fulfilment::Gauges>,
    at: Option<Instant>,
    /// Whether that read succeeded.
    up: bool,
}

/// How long a scrape waits for the status before it answers without it.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// A read this recent serves the next scrape too.
const STATUS_FRESH: Duration = Duration::from_secs(1);

impl StatusSnapshot {
    /// Reads every projection's status from `pool` (unless a read under a second old
    /// stands), then `encode`s, one scrape at a time. A read that fails or takes longer than
    /// [`STATUS_TIMEOUT`] leaves the status out (not stale) and `keel_projection_status_up`
    /// at 0.
    pub async fn scrape<T>(&self, pool: &PgPool, encode: impl FnOnce() -> T) -> T {
        let _one = self.scraping.lock().await;
        let fresh = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .at
            .is_some_and(|at| at.elapsed() < STATUS_FRESH);
        if !fresh {
            let read = tokio::time::timeout(STATUS_TIMEOUT, keel_views::status::read(pool)).await;
            let (statuses, up) = match read {
                Ok(Ok(statuses)) => (statuses, true),
                Ok(Err(e)) => {
                    warn!(error = %e, "reading the projections' status for /metrics failed");
                    (Vec::new(), false)
                }
                Err(_) => {
                    warn!("reading the projections' status for /metrics timed out");
                    (Vec::new(), false)
                }
            };
            let fulfilment = match tokio::time::timeout(
                STATUS_TIMEOUT,
                crate::fulfilment::gauges(pool),
            )
            .await
            {
                Ok(Ok(gauges)) => gauges,
                Ok(Err(e)) => {
                    warn!(error = %e, "reading the fulfilment process's orders for /metrics failed");
                    None
                }
                Err(_) => None,
            };
            *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Read {
                statuses,
                fulfilment,
                at: Some(Instant::now()),
                up,
            };
        }
        encode()
    }

    /// Registers the status gauges in `registry`, read from this snapshot.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(StatusCollector {
            snapshot: self.clone(),
        }));
    }
}

#[derive(Debug)]
struct StatusCollector {
    snapshot: StatusSnapshot,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectionLabels {
    projection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    projection: String,
    topic: String,
    partition: i32,
}

/// A gauge of one projection, read off its status.
type ProjectionValue = fn(&ProjectionStatus) -> Option<f64>;

/// A gauge of one partition of a projection, read off its status.
type PartitionValue = fn(&keel_views::status::PartitionStatus) -> Option<f64>;

/// The gauges by projection: name, help and how to read them.
const PROJECTION_GAUGES: [(&str, &str, ProjectionValue); 7] = [
    (
        "projection_generation",
        "The live generation of the projection's views",
        |s| Some(f64::from(s.generation)),
    ),
    (
        "projection_running",
        "1 while the projection runs, 0 once it stopped on a dead letter (in stop mode)",
        |s| Some(if s.state == "running" { 1.0 } else { 0.0 }),
    ),
    (
        "projection_dead_letters",
        "Dead letters recorded for the live generation (stopped on, skipped, parked, \
         retried or discarded)",
        |s| Some(s.dead_letters as f64),
    ),
    (
        "projection_rebuilding",
        "1 while a rebuild of the projection is building its next generation (not once it \
         stopped on a dead letter)",
        |s| {
            Some(
                if s.rebuild.as_ref().is_some_and(|r| r.state == "building") {
                    1.0
                } else {
                    0.0
                },
            )
        },
    ),
    (
        "projection_rebuild_records_done",
        "Records the rebuild in progress has read",
        |s| s.rebuild.as_ref().map(|r| r.records_done as f64),
    ),
    (
        "projection_rebuild_records_total",
        "Records the rebuild in progress reads in all (the log's end when it started)",
        |s| s.rebuild.as_ref().map(|r| r.records_total as f64),
    ),
    (
        "projection_rebuild_progress_ratio",
        "The rebuild in progress's share of its records read, 0 to 1",
        |s| {
            s.rebuild.as_ref().map(|r| {
                if r.records_total > 0 {
                    (r.records_done as f64 / r.records_total as f64).min(1.0)
                } else {
                    1.0
                }
            })
        },
    ),
];

/// The gauges by partition of a projection.
const PARTITION_GAUGES: [(&str, &str, PartitionValue); 4] = [
    (
        "projection_lag_records",
        "Records of the partition the projection has yet to read, against the end the \
         projectors last measured",
        |p| p.lag.map(|l| l as f64),
    ),
    (
        "projection_lag_seconds",
        "How far behind the partition the projection is in time: the age of the last \
         record applied while records wait, 0 when none do",
        |p| p.lag_seconds,
    ),
    (
        "projection_parked_streams",
        "Streams of the partition the projection holds back, parked on a record it could \
         not decode or apply",
        |p| Some(p.parked_streams as f64),
    ),
    (
        "projection_partition_held",
        "1 while a live projector process holds the partition of the projection, 0 when \
         none does",
        |p| Some(if p.held_by.is_some() { 1.0 } else { 0.0 }),
    ),
];

/// A gauge's sample: a whole number as one (`3`, not `3.0`), any other as a float.
fn encode_gauge(
    v: f64,
    encoder: prometheus_client::encoding::MetricEncoder,
) -> Result<(), std::fmt::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        ConstGauge::new(v as i64).encode(encoder)
    } else {
        ConstGauge::new(v).encode(encoder)
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (statuses, up, fulfilment) = {
            let last = self
                .snapshot
                .last
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Before the first read (the runners have not started): no verdict either way.
            (
                last.statuses.clone(),
                last.at.map(|_| last.up),
                last.fulfilment.clone(),
            )
        };
        if let Some(gauges) = fulfilment {
            gauges.encode(&mut encoder)?;
        }
        if let Some(up) = up {
            ConstGauge::new(i64::from(up)).encode(encoder.encode_descriptor(
                "projection_status_up",
                "1 when this scrape read the projections' status from PostgreSQL, 0 when the \
                 read failed or timed out (the status gauges are then left out)",
                None,
                MetricType::Gauge,
            )?)?;
        }
        for (name, help, value) in PROJECTION_GAUGES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for status in &statuses {
                if let Some(v) = value(status) {
                    let labels = ProjectionLabels {
                        projection: status.name.clone(),
                    };
                    encode_gauge(v, family.encode_family(&labels)?)?;
                }
            }
        }
        for (name, help, value) in PARTITION_GAUGES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for status in &statuses {
                for partition in &status.partitions {
                    if let Some(v) = value(partition) {
                        let labels = PartitionLabels {
                            projection: status.name.clone(),
                            topic: partition.topic.clone(),
                            partition: partition.partition,
                        };
                        encode_gauge(v, family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}
