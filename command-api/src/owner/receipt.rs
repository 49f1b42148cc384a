//! Receipts: the answer to a keyed command that appended no commit (a no-op, a `409`, a
//! `412`), recorded in the log before it is given, so that a retry with the same
//! `Idempotency-Key` gets the same answer, also from an owner that read it after a
//! restart. The gate counts a receipt from the owner only, at its stream's version and
//! chained onto the stream's last link; it moves the chain, not the version.

use keel_domain::DomainError;
use keel_schemas::{Position, ReceiptRecord};
use serde::{Deserialize, Serialize};

use super::outcome::{Answered, Outcome, OwnerError};

/// An answer as a receipt records it (its `answer` field).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub(super) enum Recorded {
    /// The command changed nothing; the stream was at the receipt's version.
    Unchanged,
    /// `If-Match` named another version than the stream's.
    VersionMismatch {
        /// The version the command expected.
        expected: u64,
        /// The stream's version.
        actual: u64,
    },
    /// A domain rule refused the command.
    Refused {
        /// The rule and its details.
        error: DomainError,
    },
}

impl Recorded {
    /// What a receipt records of `answer`: `None` for an answer that is not the log's to
    /// keep (`503`, a reused key), given as it is.
    pub(super) fn of(answer: &Answered) -> Option<Self> {
        match answer {
            Ok(_) => Some(Self::Unchanged),
            Err(OwnerError::VersionMismatch { expected, actual }) => Some(Self::VersionMismatch {
                expected: *expected,
                actual: *actual,
            }),
            Err(OwnerError::Domain(error)) => Some(Self::Refused {
                error: error.clone(),
            }),
            Err(OwnerError::Unavailable(_) | OwnerError::IdempotencyKeyReused) => None,
        }
    }
}

impl Recorded {
    /// The refusal this records (a snapshot keeps refusals this way; `Unchanged` is an
    /// outcome, kept as one).
    pub(super) fn into_error(self) -> OwnerError {
        match self {
            Recorded::VersionMismatch { expected, actual } => {
                OwnerError::VersionMismatch { expected, actual }
            }
            Recorded::Refused { error } => OwnerError::Domain(error),
            Recorded::Unchanged => {
                OwnerError::Unavailable("this key's answer cannot be replayed; retry".into())
            }
        }
    }
}

/// The answer `receipt`, read at `position`, records; `None` when this build cannot read
/// it (a newer build's answer): the key is then treated as unused.
pub(super) fn answer_of(receipt: &ReceiptRecord, position: Position) -> Option<Answered> {
    let recorded: Recorded = serde_json::from_value(receipt.answer.clone()).ok()?;
    Some(match recorded {
        Recorded::Unchanged => Ok(Outcome {
            stream: receipt.stream.clone(),
            version: receipt.version,
            events: Vec::new(),
            position: Some(position),
            created: false,
            replayed: false,
        }),
        Recorded::VersionMismatch { expected, actual } => {
            Err(OwnerError::VersionMismatch { expected, actual })
        }
        Recorded::Refused { error } => Err(OwnerError::Domain(error)),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use keel_domain::ValidationError;

    use super::*;

    /// Each answer a receipt keeps reads back as the same answer; the rule is named as
    /// problem+json names it.
    #[test]
    fn recorded_answers_read_back_as_given() {
        for recorded in [
            Recorded::Unchanged,
            Recorded::VersionMismatch {
                expected: 3,
                actual: 4,
            },
            Recorded::Refused {
                error: DomainError::InsufficientStock {
                    requested: 5,
                    available: 2,
                },
            },
            Recorded::Refused {
                error: DomainError::Invalid(ValidationError::new("quantity", "too large")),
            },
            Recorded::Refused {
                error: DomainError::ProductDiscontinued,
            },
        ] {
            let value = serde_json::to_value(&recorded).unwrap();
            if let Recorded::Refused { error } = &recorded {
                let name = match &value["error"] {
                    serde_json::Value::String(name) => name.clone(),
                    other => other.as_object().unwrap().keys().next().unwrap().clone(),
                };
                assert_eq!(name, error.rule(), "{value}");
            }
            assert_eq!(serde_json::from_value::<Recorded>(value).unwrap(), recorded);
        }
    }
}
