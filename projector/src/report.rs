//! How `projector status`, `verify`, `dead-letters list` and `topics` print what they found, for a person.
//! (`--json` prints the same structures as JSON.)

use keel_schemas::TopicPartition;
use keel_views::status::{ParkedStream, ProjectionStatus};

use crate::verify::{FindingKind, VerifyReport};

/// `verify`'s findings, one line each, then a summary line.
pub fn verify_text(report: &VerifyReport) -> String {
    let mut out = String::new();
    for f in &report.findings {
        let label = match f.kind {
            FindingKind::Violation => "VIOLATION",
            FindingKind::Zombie => "zombie write",
            FindingKind::Legacy => "legacy",
        };
        let at = f.offset.map_or(String::new(), |o| format!(" offset {o}"));
        let stream = f
            .stream
            .as_deref()
            .map_or(String::new(), |s| format!(" {s}"));
        let version = f.version.map_or(String::new(), |v| format!(" version {v}"));
        out.push_str(&format!(
            "{label}{stream}{version} at {}/{}{at}: {}\n",
            f.topic, f.partition, f.detail
        ));
    }
    let zombies = report
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Zombie)
        .count();
    out.push_str(&format!(
        "verified {} records: {} commits of {} streams checked ({} legacy, unsigned, under the cut-off); \
         {} zombie writes skipped by the gate; audit log {}; {} violations\n",
        report.records,
        report.commits,
        report.streams,
        report.legacy,
        zombies,
        if report.audit_log_compared {
            "compared"
        } else {
            "not compared"
        },
        report.violations()
    ));
    out
}

/// Each projection with its rebuild and partitions; the events/s are the difference
/// between `before` and `now`, read a second apart.
pub fn status_text(before: &[ProjectionStatus], now: &[ProjectionStatus]) -> String {
    let mut out = String::new();
    for p in now {
        let rate = before
            .iter()
            .find(|b| b.name == p.name)
            .map_or(0, |b| p.events - b.events);
        out.push_str(&format!(
            "{} (generation {}, code v{}): {}, {} events, {rate} events/s, lag {}, {} dead letters, {} parked streams\n",
            p.name,
            p.generation,
            p.code_version,
            p.state,
            p.events,
            p.lag.map_or("?".into(), |l| l.to_string()),
            p.dead_letters,
            p.parked_streams
        ));
        if let Some(error) = &p.error {
            out.push_str(&format!("  stopped: {error}\n"));
        }
        if let Some(r) = &p.rebuild {
            out.push_str(&format!(
                "  rebuild of generation {} (code v{}): {}, {}/{} records, {} events/s, ETA {} (by {}, started {}; {} running processes filling it)\n",
                r.generation,
                r.code_version,
                r.state,
                r.records_done,
                r.records_total,
                r.events_per_second.map_or("?".into(), |e| format!("{e:.0}")),
                r.eta_seconds.map_or("?".into(), |e| format!("{e:.0}s")),
                r.owner,
                r.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
                r.helpers
            ));
            if let Some(error) = &r.error {
                out.push_str(&format!("    stopped: {error}\n"));
            }
        }
        for part in &p.partitions {
            out.push_str(&format!(
                "  {}/{}: next offset {}, end {}, lag {} ({}), gate skipped {}, held by {}\n",
                part.topic,
                part.partition,
                part.next_offset,
                part.end_offset.map_or("?".into(), |e| e.to_string()),
                part.lag.map_or("?".into(), |l| l.to_string()),
                part.lag_seconds
                    .map_or("? s".into(), |s| format!("{s:.1} s")),
                part.rejected,
                part.held_by.as_deref().unwrap_or("nobody")
            ));
            for parked in &part.parked {
                out.push_str(&format!(
                    "    parked {}/{} from offset {} ({} records): {}\n",
                    parked.stream_type,
                    parked.stream_id,
                    parked.first_offset,
                    parked.records,
                    parked.error
                ));
            }
            if part.parked_streams > part.parked.len() as i64 {
                out.push_str(&format!(
                    "    … and {} more parked streams (projector dead-letters list)\n",
                    part.parked_streams - part.parked.len() as i64
                ));
            }
        }
    }
    out
}

/// The parked streams, one line each: the projection, the stream, where it is held back
/// from, how many records, since when, and the error.
pub fn parked_text(parked: &[ParkedStream]) -> String {
    if parked.is_empty() {
        return "no stream is parked\n".to_owned();
    }
    let mut out = String::new();
    for p in parked {
        out.push_str(&format!(
            "{} {}/{}: held back at {}/{} from offset {} to {} ({} records) since {}: {}\n",
            p.projection,
            p.stream_type,
            p.stream_id,
            p.topic,
            p.partition,
            p.first_offset,
            p.last_offset,
            p.records,
            p.parked_at.format("%Y-%m-%d %H:%M:%S UTC"),
            p.error
        ));
    }
    out
}

/// Each topic's partition count, records in all, and records per partition, from where
/// each partition ends (in topic and partition order).
pub fn topics_text(ends: &[(TopicPartition, i64)]) -> String {
    let mut out = String::new();
    let mut rest = ends;
    while let Some((first, _)) = rest.first() {
        let count = rest
            .iter()
            .take_while(|(at, _)| at.topic == first.topic)
            .count();
        let (topic, tail) = rest.split_at(count);
        let per_partition: Vec<i64> = topic.iter().map(|(_, end)| *end).collect();
        let total: i64 = per_partition.iter().sum();
        out.push_str(&format!(
            "{}: {count} partitions, {total} records {per_partition:?}\n",
            first.topic
        ));
        rest = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_summed_per_topic() {
        let ends = vec![
            (TopicPartition::new("k.order.events", 0), 3),
            (TopicPartition::new("k.order.events", 1), 4),
            (TopicPartition::new("k.product.events", 0), 0),
        ];
        assert_eq!(
            topics_text(&ends),
            "k.order.events: 2 partitions, 7 records [3, 4]\nk.product.events: 1 partitions, 0 records [0]\n"
        );
    }
}
