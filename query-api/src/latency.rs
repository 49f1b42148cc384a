//! The latency of the reads this query API serves (the read itself, not a wait for a
//! consistency token), per window of [`WINDOW`], published in `keel_query_windows` so
//! that a rebuild's adaptive pacing backs off within a fraction of a second once live
//! queries slow down. On a hot standby (read only) or before the projector created the table,
//! nothing is published.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tracing::{info, warn};

/// How long one published window of reads lasts.
pub const WINDOW: Duration = Duration::from_millis(250);
/// Most latencies kept per window; beyond them a window's percentiles come from a sample.
const KEPT: usize = 50_000;
/// How long the published rows are kept.
const KEEP_ROWS: &str = "2 minutes";

/// The latencies of the reads served in the current window, in microseconds.
#[derive(Clone, Debug, Default)]
pub struct Latencies(Arc<Mutex<Window>>);

#[derive(Debug, Default)]
struct Window {
    micros: Vec<u32>,
    seen: u64,
}

impl Latencies {
    /// Counts a read that took `took`.
    pub fn record(&self, took: Duration) {
        if let Ok(mut w) = self.0.lock() {
            w.seen += 1;
            let micros = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
            if w.micros.len() < KEPT {
                w.micros.push(micros);
            } else {
                // Reservoir sampling keeps a fair sample of a very busy window.
                let slot = (w.seen.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % w.seen;
                if let Some(kept) = w.micros.get_mut(slot as usize) {
                    *kept = micros;
                }
            }
        }
    }

    /// The window's requests and p50/p99 in milliseconds, and a new window begun.
    fn take(&self) -> Option<(u64, f64, f64)> {
        let mut w = self.0.lock().ok()?;
        let Window { mut micros, seen } = std::mem::take(&mut *w);
        drop(w);
        if seen == 0 {
            return None;
        }
        micros.sort_unstable();
        let at = |q: f64| {
            let i = ((micros.len() as f64 * q) as usize).min(micros.len() - 1);
            f64::from(micros[i]) / 1000.0
        };
        Some((seen, at(0.5), at(0.99)))
    }
}

/// Publishes each window while the database takes it.
pub fn spawn_publisher(pool: PgPool, latencies: Latencies) {
    let instance = format!(
        "{}:{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
        std::process::id()
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WINDOW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut published = 0u64;
        let mut failed = false;
        loop {
            tick.tick().await;
            let Some((requests, p50, p99)) = latencies.take() else {
                continue;
            };
            let written = sqlx::query(
                "INSERT INTO keel_query_windows (instance, second, requests, p50_ms, p99_ms)
                 VALUES ($1, now(), $2, $3, $4)
                 ON CONFLICT (instance, second) DO NOTHING",
            )
            .bind(&instance)
            .bind(i32::try_from(requests).unwrap_or(i32::MAX))
            .bind(p50 as f32)
            .bind(p99 as f32)
            .execute(&pool)
            .await;
            match written {
                Ok(_) => {
                    failed = false;
                    published += 1;
                    if published % 120 == 1 {
                        let _ = sqlx::query(&format!(
                            "DELETE FROM keel_query_windows WHERE instance = $1
                             AND second < now() - interval '{KEEP_ROWS}'"
                        ))
                        .bind(&instance)
                        .execute(&pool)
                        .await;
                    }
                }
                // Read only (a hot standby, or a role without the right), or the projector
                // has not created the table: nothing to publish to.
                Err(sqlx::Error::Database(e))
                    if matches!(e.code().as_deref(), Some("25006" | "42501" | "42P01")) =>
                {
                    info!(reason = %e, "not publishing query latencies for rebuild pacing");
                    if e.code().as_deref() != Some("42P01") {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                // Anything else (the database away for a moment): the next window tries again,
                // and the first such failure is logged.
                Err(e) => {
                    if !failed {
                        warn!(error = %e, "publishing query latencies for rebuild pacing failed; trying on");
                        failed = true;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_gives_its_count_and_percentiles_and_the_next_starts_empty() {
        let latencies = Latencies::default();
        assert_eq!(latencies.take(), None);
        for ms in 1..=100u64 {
            latencies.record(Duration::from_millis(ms));
        }
        assert_eq!(latencies.take(), Some((100, 51.0, 100.0)));
        assert_eq!(latencies.take(), None, "a new window begins empty");
        // A busy window keeps a sample of its latencies, and counts them all.
        for _ in 0..KEPT + 1000 {
            latencies.record(Duration::from_micros(500));
        }
        let (n, p50, p99) = latencies.take().unwrap_or_default();
        assert_eq!((n, p50, p99), ((KEPT + 1000) as u64, 0.5, 0.5));
    }
}
