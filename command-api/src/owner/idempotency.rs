//! Idempotency: the `Idempotency-Key` of every commit in the partition, with the request's
//! digest and the answer it got. Rebuilt from the log like the rest of the owner's state,
//! so a retry after a restart gets the original answer instead of a second append.

use std::collections::HashMap;

use super::outcome::{Outcome, OwnerError};

/// A remembered key's request digest and answer.
struct Remembered {
    digest: Option<String>,
    outcome: Outcome,
}

/// Every key of the partition, by stream and key.
#[derive(Default)]
pub(super) struct IdempotencyKeys {
    keys: HashMap<(String, String), Remembered>,
}

impl IdempotencyKeys {
    /// Remembers the answer to the commit that carried `key`.
    pub(super) fn remember(
        &mut self,
        key: (String, String),
        digest: Option<String>,
        outcome: Outcome,
    ) {
        self.keys.insert(key, Remembered { digest, outcome });
    }

    /// The answer for a request with a key already used: the original outcome, replayed,
    /// for the same request; a refusal for another one. `None` for a new key.
    pub(super) fn answer(
        &self,
        key: &(String, String),
        digest: Option<&String>,
    ) -> Option<Result<Outcome, OwnerError>> {
        let remembered = self.keys.get(key)?;
        Some(if remembered.digest.as_ref() == digest {
            Ok(Outcome {
                replayed: true,
                ..remembered.outcome.clone()
            })
        } else {
            Err(OwnerError::IdempotencyKeyReused)
        })
    }

    /// How many keys are held.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }
}
