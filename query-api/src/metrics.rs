//! The query API's own metrics: how long reads wait for their consistency token, and how
//! many such waits run out. Labelled by projection only (bounded), never by a token or a
//! stream.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectionLabels {
    projection: String,
}

/// The upper bounds of the wait buckets, in seconds: a view already past the token (a
/// millisecond) to the longest wait allowed (30 s).
const WAIT_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn wait_histogram() -> Histogram {
    Histogram::new(WAIT_BUCKETS)
}

/// Consistency waits, counted whether registered or not; cheap to clone.
#[derive(Clone, Debug)]
pub struct QueryMetrics {
    waits: Family<ProjectionLabels, Histogram, fn() -> Histogram>,
    timeouts: Family<ProjectionLabels, Counter>,
}

impl Default for QueryMetrics {
    fn default() -> Self {
        Self {
            waits: Family::new_with_constructor(wait_histogram as fn() -> Histogram),
            timeouts: Family::default(),
        }
    }
}

impl QueryMetrics {
    /// Registers `consistency_wait_duration_seconds` and `consistency_wait_timeouts_total`
    /// in `registry` (the process's `keel_` registry), each of `projections` from zero (so
    /// a rate over them has data before the first wait).
    pub fn register(&self, registry: &mut Registry, projections: &[&str]) {
        for projection in projections {
            let labels = ProjectionLabels {
                projection: (*projection).to_owned(),
            };
            let _ = self.waits.get_or_create(&labels);
            let _ = self.timeouts.get_or_create(&labels);
        }
        registry.register_with_unit(
            "consistency_wait_duration",
            "Time reads carrying a consistency token waited for the view to pass it, by \
             projection (including waits that ran out)",
            Unit::Seconds,
            self.waits.clone(),
        );
        registry.register(
            "consistency_wait_timeouts",
            "Reads answered 503 because the view did not pass their consistency token in \
             time, by projection",
            self.timeouts.clone(),
        );
    }

    /// Records a wait of `waited` for `projection` that `timed_out` or not.
    pub fn waited(&self, projection: &str, waited: Duration, timed_out: bool) {
        let labels = ProjectionLabels {
            projection: projection.to_owned(),
        };
        self.waits
            .get_or_create(&labels)
            .observe(waited.as_secs_f64());
        if timed_out {
            let _ = self.timeouts.get_or_create(&labels).inc();
        }
    }
}
