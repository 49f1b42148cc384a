//! The benchmark report: every figure beside its baseline, the ratio and the target, as
//! JSON and as the Markdown of BENCHMARKS.md.

use std::fmt::Write;

use serde::Serialize;

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The scenario (`Commands, 64 clients`…).
    pub scenario: String,
    /// What is measured (`commands/s`, `p99 ms`…).
    pub measure: String,
    /// Keel's figure.
    pub keel: f64,
    /// The baseline it is set beside, by name (`B_http`…), with its figure in the same unit.
    pub baseline: Option<(String, f64)>,
    /// `keel / baseline`.
    pub ratio: Option<f64>,
    /// The target, in words with its bound worked out.
    pub target: Option<String>,
    /// Whether the target is met.
    pub met: Option<bool>,
}

impl Row {
    /// A figure with no baseline.
    pub fn plain(scenario: &str, measure: &str, keel: f64) -> Self {
        Self {
            scenario: scenario.to_owned(),
            measure: measure.to_owned(),
            keel,
            baseline: None,
            ratio: None,
            target: None,
            met: None,
        }
    }

    /// A figure beside a baseline.
    pub fn beside(scenario: &str, measure: &str, keel: f64, baseline: &str, value: f64) -> Self {
        Self {
            baseline: Some((baseline.to_owned(), value)),
            ratio: (value > 0.0).then(|| keel / value),
            ..Self::plain(scenario, measure, keel)
        }
    }

    /// A throughput target: at least `share` of the baseline.
    pub fn at_least(mut self, share: f64) -> Self {
        if let Some((name, value)) = &self.baseline {
            self.target = Some(format!("≥ {share} × {name} = {}", number(share * value)));
            self.met = Some(self.keel >= share * value);
        }
        self
    }

    /// A latency target: at most `bound`, described by `rule`.
    pub fn at_most(mut self, rule: &str, bound: f64) -> Self {
        self.target = Some(format!("{rule} = {}", number(bound)));
        self.met = Some(self.keel <= bound);
        self
    }
}

/// A plot of the report, drawn beside it.
#[derive(Clone, Debug, Serialize)]
pub struct Plot {
    /// The SVG's file name, next to the report.
    pub file: String,
    /// What it shows.
    pub caption: String,
}

/// The whole report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// When the run started (UTC, RFC 3339).
    pub started_at: String,
    /// How long it ran, in seconds.
    pub seconds: f64,
    /// The command that produced it.
    pub command: String,
    /// The machine, the toolchain, the broker and the database.
    pub machine: Vec<(String, String)>,
    /// Every figure.
    pub rows: Vec<Row>,
    /// The plots.
    pub plots: Vec<Plot>,
    /// What bounds each missed target, and other observations of the run.
    pub notes: Vec<String>,
    /// Groups of scenarios that failed, with why: the figures measured before the failure
    /// are kept.
    pub failed: Vec<String>,
}

/// A figure rounded for reading: three significant digits, thousands separated.
pub fn number(value: f64) -> String {
    let a = value.abs();
    let rounded = if a >= 1000.0 {
        let digits = a.log10().floor() as i32 - 2;
        (value / 10f64.powi(digits)).round() * 10f64.powi(digits)
    } else {
        value
    };
    if a >= 1000.0 {
        let text = format!("{:.0}", rounded.abs());
        let mut grouped = String::new();
        for (i, c) in text.chars().enumerate() {
            if i > 0 && (text.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if value < 0.0 {
            grouped.insert(0, '-');
        }
        grouped
    } else if a >= 100.0 {
        format!("{value:.0}")
    } else if a >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

impl Report {
    /// The results as a Markdown section: the table of figures, the plots, the notes.
    pub fn markdown(&self, plot_dir: &str) -> String {
        let mut md = String::new();
        for failure in &self.failed {
            let _ = writeln!(
                md,
                "**Failed:** {failure}. The figures below are what was measured before it.\n"
            );
        }
        let _ = writeln!(
            md,
            "| Scenario | Measure | Keel | Baseline | Ratio | Target | Met |\n|---|---|---:|---|---:|---|---|"
        );
        for r in &self.rows {
            let baseline = r
                .baseline
                .as_ref()
                .map_or(String::new(), |(name, v)| format!("{name} {}", number(*v)));
            let ratio = r.ratio.map_or(String::new(), |x| format!("{x:.3}"));
            let met = match r.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "",
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {baseline} | {ratio} | {} | {met} |",
                r.scenario,
                r.measure,
                number(r.keel),
                r.target.as_deref().unwrap_or("")
            );
        }
        if !self.notes.is_empty() {
            md.push('\n');
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
        }
        for plot in &self.plots {
            let _ = write!(md, "\n![{}]({plot_dir}/{})\n", plot.caption, plot.file);
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_rounded_for_reading() {
        assert_eq!(number(23_456.7), "23,500");
        assert_eq!(number(1_234_567.0), "1,230,000");
        assert_eq!(number(512.4), "512");
        assert_eq!(number(42.42), "42.4");
        assert_eq!(number(5.678), "5.68");
        assert_eq!(number(-2_500.0), "-2,500");
    }

    #[test]
    fn targets_are_judged_and_shown() {
        let met = Row::beside("Commands", "commands/s", 7_200.0, "B_http", 23_000.0).at_least(0.3);
        assert_eq!(met.met, Some(true));
        assert_eq!(met.target.as_deref(), Some("≥ 0.3 × B_http = 6,900"));
        let missed = Row::beside("Queries", "p99 ms", 9.0, "B_select p99", 1.5)
            .at_most("≤ 3 × B_select p99 + 2 ms", 6.5);
        assert_eq!(missed.met, Some(false));
        let report = Report {
            rows: vec![met, missed],
            ..Report::default()
        };
        let md = report.markdown("docs/bench");
        assert!(md.contains("| Commands | commands/s | 7,200 | B_http 23,000 | 0.313 | ≥ 0.3 × B_http = 6,900 | met |"), "{md}");
        assert!(md.contains("**missed**"));
    }
}
