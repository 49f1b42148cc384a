//! Prometheus metrics every Keel process exports: a registry whose own families carry the
//! `keel_` prefix, beside the standard `process_*` metrics read from `/proc/self` on each
//! scrape, encoded in the Prometheus text format (version 0.0.4).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

pub use prometheus_client;

/// The `Content-Type` of what [`Metrics::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A process's metrics: built once at start-up, then shared read-only with the handler
/// that serves `GET /metrics`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry holding the process metrics.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        Self { registry }
    }

    /// Where the process registers its own families: each name gets the `keel_` prefix.
    pub fn keel(&mut self) -> &mut Registry {
        self.registry.sub_registry_with_prefix("keel")
    }

    /// Everything registered, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail; a metric that cannot encode is left out.
        if prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry).is_err()
        {
            tracing::warn!("encoding the metrics failed");
        }
        text
    }

    /// Shared, for handlers.
    pub fn shared(self) -> Arc<Self> {
        Arc::new(self)
    }
}

/// Clock ticks per second in `/proc/<pid>/stat`: Linux's `USER_HZ`, 100 on every
/// architecture Keel builds for (the kernel's ABI keeps it fixed whatever its own HZ).
const TICKS_PER_SECOND: f64 = 100.0;

/// The standard process metrics of Prometheus's client libraries, read on each scrape.
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says of this process; `None` where it cannot be read (not Linux).
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
    start_time_seconds: Option<f64>,
}

impl ProcessStats {
    fn read() -> Self {
        let (cpu_ticks, start_ticks) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .map_or((None, None), |line| stat_ticks(&line));
        let cpu_seconds = cpu_ticks.map(|ticks| ticks / TICKS_PER_SECOND);
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let start_time_seconds = start_ticks
            .zip(boot_time)
            .map(|(start, boot)| boot + start / TICKS_PER_SECOND);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| {
            status.lines().find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .map(|k| k * 1024)
            })
        };
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as i64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Max open files"))
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|soft| soft.parse::<i64>().ok())
            });
        Self {
            cpu_seconds,
            resident_bytes: kib("VmRSS:"),
            virtual_bytes: kib("VmSize:"),
            open_fds,
            max_fds,
            start_time_seconds,
        }
    }
}

/// From a `/proc/<pid>/stat` line: the CPU time (user and system) and the start time after
/// boot, in clock ticks.
fn stat_ticks(line: &str) -> (Option<f64>, Option<f64>) {
    // The fields after the command name, which is in parentheses and may itself hold
    // spaces and parentheses: the last `)` ends it.
    let fields: Vec<&str> = line
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, starttime 22; `fields` starts at
    // field 3.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    let cpu = field(14).zip(field(15)).map(|(user, system)| user + system);
    (cpu, field(22))
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = ProcessStats::read();
        if let Some(seconds) = stats.cpu_seconds {
            emit(
                &mut encoder,
                "process_cpu",
                "Total user and system CPU time spent in seconds.",
                Some(&Unit::Seconds),
                &ConstCounter::new(seconds),
            )?;
        }
        let gauges = [
            (
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(Unit::Bytes),
                stats.resident_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size in bytes.",
                Some(Unit::Bytes),
                stats.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                stats.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                stats.max_fds,
            ),
        ];
        for (name, help, unit, value) in &gauges {
            if let Some(value) = value {
                emit(
                    &mut encoder,
                    name,
                    help,
                    unit.as_ref(),
                    &ConstGauge::new(*value),
                )?;
            }
        }
        if let Some(start) = stats.start_time_seconds {
            emit(
                &mut encoder,
                "process_start_time",
                "Start time of the process since unix epoch in seconds.",
                Some(&Unit::Seconds),
                &ConstGauge::new(start),
            )?;
        }
        Ok(())
    }
}

/// Writes `metric`'s descriptor and its one sample.
fn emit<'s>(
    encoder: &'s mut DescriptorEncoder<'_>,
    name: &'s str,
    help: &str,
    unit: Option<&'s Unit>,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use prometheus_client::metrics::counter::Counter;

    use super::*;

    /// The value of the sample `name` (without labels) in `text`.
    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
            .parse()
            .unwrap()
    }

    /// The process metrics are read afresh on each scrape, with Prometheus's standard
    /// names, beside the process's own families under `keel_`.
    #[test]
    fn a_scrape_holds_the_process_metrics_and_the_prefixed_families() {
        let mut metrics = Metrics::new();
        let counter = Counter::<u64>::default();
        metrics
            .keel()
            .register("things", "Things done", counter.clone());
        counter.inc_by(3);

        let first = metrics.encode();
        assert_eq!(sample(&first, "keel_things_total"), 3.0);
        assert!(
            first.contains("# TYPE process_cpu_seconds_total counter"),
            "{first}"
        );
        let resident = sample(&first, "process_resident_memory_bytes");
        assert!(
            resident > 1e6,
            "a running test holds more than a megabyte: {resident}"
        );
        assert!(sample(&first, "process_virtual_memory_bytes") >= resident);
        let start = sample(&first, "process_start_time_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "started within a day: {start} against {now}"
        );
        assert!(sample(&first, "process_max_fds") >= 1.0);

        // Open files count when they are open; CPU time only goes up.
        let open = sample(&first, "process_open_fds");
        let files: Vec<std::fs::File> = (0..20)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let busy = (0..2_000_000u64).fold(0u64, |a, b| a.wrapping_add(b * b));
        assert_ne!(busy, 1);
        let second = metrics.encode();
        assert!(
            sample(&second, "process_open_fds") >= open + 20.0,
            "{second}"
        );
        assert!(
            sample(&second, "process_cpu_seconds_total")
                >= sample(&first, "process_cpu_seconds_total")
        );
        drop(files);
    }

    /// A command name with spaces and parentheses does not shift the fields read after it.
    #[test]
    fn the_stat_line_is_read_after_the_command_name() {
        let line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0 12345 \
                    1000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(stat_ticks(line), (Some(300.0), Some(12345.0)));
        assert_eq!(stat_ticks("garbage"), (None, None));
    }
}
