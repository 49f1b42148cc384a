//! How a rebuild shows its progress: a bar on a terminal, lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;

/// How a rebuild shows its progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A progress bar on standard error when it is a terminal, plain lines otherwise.
    Terminal,
    /// Log lines (what `projector run` uses for its automatic rebuilds).
    Log,
}

/// Shows a rebuild's progress: a bar on a terminal, lines otherwise.
pub(crate) struct ProgressView {
    mode: Progress,
    bar: Option<ProgressBar>,
    label: String,
    last_line: Option<Instant>,
}

impl ProgressView {
    pub(crate) fn new(
        mode: Progress,
        name: &str,
        generation: i32,
        resumed: bool,
        done: i64,
    ) -> Self {
        let label = format!("{name} generation {generation}");
        let bar = (mode == Progress::Terminal && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {human_pos}/{human_len} records ({percent}%) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(label.clone());
            bar.set_position(done as u64);
            bar
        });
        let view = Self {
            mode,
            bar,
            label,
            last_line: None,
        };
        view.note(if resumed {
            "resuming from its checkpoints"
        } else {
            "rebuilding from offset 0"
        });
        view
    }

    pub(crate) fn show(&mut self, done: i64, total: i64, events: u64, rate: f64, eta: Option<f64>) {
        let eta = eta.map_or("?".to_owned(), |s| format!("{}s", s.ceil() as u64));
        let msg = format!(
            "{events} events, {} events/s, ETA {eta}",
            rate.round() as u64
        );
        if let Some(bar) = &self.bar {
            bar.set_length(total.max(done) as u64);
            bar.set_position(done as u64);
            bar.set_message(msg);
            return;
        }
        if self
            .last_line
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.last_line = Some(Instant::now());
        let percent = if total > 0 {
            done as f64 * 100.0 / total as f64
        } else {
            100.0
        };
        let line = format!(
            "{}: {done}/{total} records ({percent:.1}%), {msg}",
            self.label
        );
        match self.mode {
            Progress::Terminal => eprintln!("{line}"),
            Progress::Log => info!("{line}"),
        }
    }

    pub(crate) fn note(&self, what: &str) {
        match (&self.bar, self.mode) {
            (Some(bar), _) => bar.println(format!("{}: {what}", self.label)),
            (None, Progress::Terminal) => eprintln!("{}: {what}", self.label),
            (None, Progress::Log) => info!("{}: {what}", self.label),
        }
    }

    pub(crate) fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }

    pub(crate) fn finish(&self, summary: &str) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
        self.note(summary);
    }
}
