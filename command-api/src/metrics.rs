//! The command API's metrics: commands by type and outcome, the time a command spends in
//! each phase of the write path, the size of each flight, and, read from the owners on
//! each scrape, where every partition stands (owner state, epoch, last offset, idempotency
//! keys held) and how many partitions no instance serves.
//!
//! Every label is bounded: a command type, an outcome, a phase, a topic and partition;
//! never a stream id, a token subject or an idempotency key.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::error::ApiError;
use crate::owner::Status;
use crate::routes::AppState;

/// How a command ended, as the `outcome` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    /// Appended (or a no-op confirmed against the log).
    Accepted,
    /// A retry answered with its first answer (`Idempotent-Replayed`).
    Replayed,
    /// A domain rule refused it (409).
    Conflict,
    /// `If-Match` named another version (412).
    PreconditionFailed,
    /// Malformed or invalid fields, or an idempotency key reused (400, 413, 415, 422).
    Invalid,
    /// Its stream does not exist (404).
    NotFound,
    /// No owner could take it now (503): retry.
    Unavailable,
    /// Sent on to the instance that owns its partition, which counts it again by how it
    /// ended there: leave it out of rates of commands.
    Forwarded,
    /// A fault of ours (500).
    Error,
}

impl CommandOutcome {
    /// Every outcome.
    pub const ALL: [Self; 9] = [
        Self::Accepted,
        Self::Replayed,
        Self::Conflict,
        Self::PreconditionFailed,
        Self::Invalid,
        Self::NotFound,
        Self::Unavailable,
        Self::Forwarded,
        Self::Error,
    ];

    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Replayed => "replayed",
            Self::Conflict => "conflict",
            Self::PreconditionFailed => "precondition_failed",
            Self::Invalid => "invalid",
            Self::NotFound => "not_found",
            Self::Unavailable => "unavailable",
            Self::Forwarded => "forwarded",
            Self::Error => "error",
        }
    }

    /// The outcome of a command refused with `error`.
    pub fn of_error(error: &ApiError) -> Self {
        match error {
            ApiError::Conflict(_) => Self::Conflict,
            ApiError::VersionMismatch { .. } => Self::PreconditionFailed,
            ApiError::BadRequest(_)
            | ApiError::TooLarge(_)
            | ApiError::UnsupportedMediaType
            | ApiError::Invalid(_)
            | ApiError::IdempotencyKeyReused => Self::Invalid,
            ApiError::NotFound { .. } => Self::NotFound,
            ApiError::Unavailable(_) | ApiError::NotOwner { .. } => Self::Unavailable,
            ApiError::Forbidden(_) | ApiError::MethodNotAllowed | ApiError::Internal { .. } => {
                Self::Error
            }
        }
    }
}

/// A phase of the write path, as the `phase` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// From the request's arrival at the owner's queue until the owner takes it on (per
    /// command).
    Queue,
    /// Deciding a flight's commands against the state (per flight).
    Decide,
    /// From handing a flight's commits to the producer until the broker acknowledged them
    /// (per flight).
    Append,
    /// Reading a flight's commits back through the gate and answering them (per flight).
    ReadBack,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::Decide => "decide",
            Self::Append => "append",
            Self::ReadBack => "read_back",
        }
    }
}

/// How one per-partition gauge reads its value off the partition's owner.
type PartitionValue = fn(&crate::owner::StatusCell) -> i64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// The upper bounds of the phase buckets, in seconds: a tenth of a millisecond (deciding a
/// few commands in memory) to ten seconds.
const PHASE_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// The upper bounds of the flight-size buckets: commits per flight, up to a full flush.
const FLUSH_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
}

/// The write path's metrics. Counted whether registered or not (tests build owners without
/// a registry); cheap to clone.
#[derive(Clone, Debug)]
pub struct CommandMetrics {
    commands: Family<CommandLabels, Counter>,
    phases: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    flush_size: Histogram,
}

impl Default for CommandMetrics {
    fn default() -> Self {
        Self {
            commands: Family::default(),
            phases: Family::new_with_constructor(phase_histogram as fn() -> Histogram),
            flush_size: Histogram::new(FLUSH_BUCKETS),
        }
    }
}

impl CommandMetrics {
    /// Registers the families in `registry` (the process's `keel_` registry).
    /// Every command type of the catalogue starts at zero with each outcome a client can
    /// cause, and every phase is present, so rates over them have data from the start.
    pub fn register(&self, registry: &mut Registry) {
        let metrics = self;
        for spec in crate::commands::CATALOGUE {
            for outcome in CommandOutcome::ALL {
                let _ = metrics.commands.get_or_create(&CommandLabels {
                    command: spec.command_type,
                    outcome: outcome.as_str(),
                });
            }
        }
        for phase in [Phase::Queue, Phase::Decide, Phase::Append, Phase::ReadBack] {
            let _ = metrics.phases.get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            });
        }
        registry.register(
            "commands",
            "Commands answered by this instance's owners, by command type and outcome",
            metrics.commands.clone(),
        );
        registry.register_with_unit(
            "command_phase_duration",
            "Time commands spend in each phase of the write path: queue (per command), \
             decide, append (until the owner takes the broker's acknowledgement, which \
             for a flight pipelined behind another follows the one ahead's read-back) and \
             read_back (per flight)",
            Unit::Seconds,
            metrics.phases.clone(),
        );
        registry.register(
            "command_flush_commits",
            "Commits appended together in one flight",
            metrics.flush_size.clone(),
        );
    }

    /// Counts a command of type `command` that ended with `outcome`.
    pub fn command(&self, command: &'static str, outcome: CommandOutcome) {
        self.commands
            .get_or_create(&CommandLabels {
                command,
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Records `seconds` spent in `phase`.
    pub fn phase(&self, phase: Phase, seconds: f64) {
        self.phases
            .get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            })
            .observe(seconds);
    }

    /// Records a flight of `commits`.
    pub fn flight(&self, commits: usize) {
        self.flush_size.observe(commits as f64);
    }
}

/// Where every partition stands, read from the owners and the group on each scrape.
#[derive(Debug)]
pub struct PartitionCollector {
    state: AppState,
}

impl PartitionCollector {
    /// Registers the partition gauges of `state`'s owners in `registry`.
    pub fn register(registry: &mut Registry, state: AppState) {
        registry.register_collector(Box::new(Self { state }));
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    topic: String,
    partition: i32,
    state: &'static str,
}

/// The states `keel_partition_owner_state` has a series for.
const STATES: [Status; 4] = [
    Status::Starting,
    Status::Serving,
    Status::Recovering,
    Status::Lost,
];

impl Collector for PartitionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let statuses = self.state.owners.statuses();
        {
            let mut family = encoder.encode_descriptor(
                "partition_owner_state",
                "This instance's owner of each partition it runs one for: 1 for its state \
                 (starting, serving, recovering, lost), 0 for the others",
                None,
                MetricType::Gauge,
            )?;
            for status in &statuses {
                let now = status.get();
                for state in STATES {
                    let labels = StateLabels {
                        topic: status.topic.clone(),
                        partition: status.partition,
                        state: state.as_str(),
                    };
                    ConstGauge::new(i64::from(now == state))
                        .encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let gauges: [(&str, &str, PartitionValue); 3] = [
            (
                "partition_owner_epoch",
                "The epoch of the fence this instance's owner of the partition holds (0 before it fenced)",
                |s| i64::try_from(s.epoch()).unwrap_or(i64::MAX),
            ),
            (
                "partition_last_offset",
                "The offset of the last record this instance's owner of the partition read (-1 before any)",
                crate::owner::StatusCell::last_offset,
            ),
            (
                "idempotency_keys",
                "Idempotency keys this instance's owner of the partition holds, within their retention",
                |s| i64::try_from(s.keys_held()).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for status in &statuses {
                let labels = PartitionLabels {
                    topic: status.topic.clone(),
                    partition: status.partition,
                };
                ConstGauge::new(value(status)).encode(family.encode_family(&labels)?)?;
            }
        }
        let unserved = crate::routes::unserved_partitions(&self.state);
        ConstGauge::new(unserved as i64).encode(encoder.encode_descriptor(
            "partitions_unserved",
            "Partitions of every topic that, as this instance sees the group, no instance \
             serves (the same on every instance: alert when above 0)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.state.every_partition().len() as i64).encode(
            encoder.encode_descriptor(
                "partitions",
                "Partitions of every aggregate's topic",
                None,
                MetricType::Gauge,
            )?,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_outcome() {
        use keel_domain::DomainError;
        let cases = [
            (
                ApiError::Conflict(DomainError::Invalid(keel_domain::ValidationError::new(
                    "x", "y",
                ))),
                "conflict",
            ),
            (
                ApiError::VersionMismatch {
                    expected: 1,
                    actual: 2,
                },
                "precondition_failed",
            ),
            (ApiError::IdempotencyKeyReused, "invalid"),
            (ApiError::Unavailable("x".into()), "unavailable"),
            (
                ApiError::NotFound {
                    detail: "x".into(),
                    rule: None,
                },
                "not_found",
            ),
        ];
        for (error, label) in cases {
            assert_eq!(
                CommandOutcome::of_error(&error).as_str(),
                label,
                "{error:?}"
            );
        }
    }
}
