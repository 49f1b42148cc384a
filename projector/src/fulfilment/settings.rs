//! How the fulfilment process runs: its options (`projector run --process fulfilment`) and
//! what they make of it.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use super::Fulfilment;
use super::sender::{self, SenderSettings};
use crate::units::Unit;

/// How long the process waits for the command API's answer before trying again.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The fulfilment process's options, each also read from the environment variable beside it.
#[derive(Clone, Debug, clap::Args)]
pub struct FulfilmentArgs {
    /// How long after it was placed an order must be paid in full before the fulfilment
    /// process cancels it: `30m`, `90s`, `500ms`, `2h`.
    #[arg(long, env = "KEEL_PAYMENT_DEADLINE", default_value = "30m", value_parser = parse_duration)]
    pub payment_deadline: Duration,
    /// The command API the fulfilment process sends its commands to.
    #[arg(
        long,
        env = "KEEL_FULFILMENT_COMMAND_API",
        default_value = "http://127.0.0.1:8080"
    )]
    pub fulfilment_command_api: String,
    /// A file holding the fulfilment process's bearer token (its own service identity,
    /// with the `commands:write` role; read again for each batch of commands, so it can be
    /// rotated). Without it the process sends no token (a command API without auth).
    #[arg(long, env = "KEEL_FULFILMENT_TOKEN_FILE", value_name = "PATH")]
    pub fulfilment_token_file: Option<PathBuf>,
    /// Most fulfilment commands in flight at once.
    #[arg(long, env = "KEEL_FULFILMENT_CONCURRENCY", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub fulfilment_concurrency: u64,
}

impl FulfilmentArgs {
    /// The process as the runner runs it.
    pub fn projection(&self) -> Fulfilment {
        Fulfilment {
            payment_deadline: self.payment_deadline,
        }
    }

    /// Starts sending the process's commands on the units `held` holds, as holder
    /// `process`; it stops when the handle is dropped.
    pub fn spawn_sender(
        &self,
        pool: PgPool,
        process: Uuid,
        held: watch::Receiver<Vec<Unit>>,
    ) -> keel_kafka::AbortOnDrop<()> {
        let settings = SenderSettings {
            command_api: self.fulfilment_command_api.clone(),
            token_file: self.fulfilment_token_file.clone(),
            concurrency: self.fulfilment_concurrency as usize,
            timeout: COMMAND_TIMEOUT,
        };
        keel_kafka::AbortOnDrop(tokio::spawn(sender::run(pool, settings, process, held)))
    }
}

/// The longest duration [`parse_duration`] takes: ten years.
const MAX_DURATION_MS: u64 = 10 * 366 * 24 * 3_600_000;

/// A duration as `<number><unit>`, the unit one of `ms`, `s`, `m`, `h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let millis = match unit {
        "ms" => Some(number),
        "s" => number.checked_mul(1_000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => return Err(format!("{text:?}: the unit must be ms, s, m or h")),
    };
    millis
        .filter(|m| (1..=MAX_DURATION_MS).contains(m))
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} must be above zero and at most ten years"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_their_units_and_refuse_the_rest() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(
            parse_duration("87840h"),
            Ok(Duration::from_secs(87840 * 3600))
        );
        for bad in [
            "",
            "30",
            "m",
            "0s",
            "1d",
            "-5s",
            "1.5h",
            "87841h",
            "3000000000h",
            "99999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was taken");
        }
    }
}
