//! Idempotency: the `Idempotency-Key` of every commit in the partition, with the request's
//! digest and the answer it got. Rebuilt from the log like the rest of the owner's state,
//! so a retry after a restart gets the original answer instead of a second append.
//!
//! A key is kept for the retention (default 24 hours) from the time its commit was
//! recorded, then forgotten: memory stays bounded by the keys used within the retention,
//! and a retry after it is a fresh command. Time is the log's: the latest commit's
//! recorded time (never ahead of this process's clock), so writers' clocks that disagree
//! make a key last longer, never shorter, and a partition nobody writes to keeps its keys.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::outcome::{Answered, Outcome, OwnerError};

/// How long a key is kept when not configured: a day, as the payment APIs that made the
/// header common keep theirs.
pub const DEFAULT_KEY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

type Key = (String, String);

/// A key as a snapshot keeps it: the key, its request digest, its answer and its time.
pub(super) type HeldKey = (Key, Option<String>, Answered, DateTime<Utc>);

/// A remembered key's request digest and answer (a commit's outcome, or the answer a
/// receipt recorded), and when it was recorded.
struct Remembered {
    digest: Option<String>,
    answer: Answered,
    at: DateTime<Utc>,
}

/// Every key of the partition within the retention, by stream and key.
pub(super) struct IdempotencyKeys {
    keys: HashMap<Key, Remembered>,
    /// The keys in the order they were remembered, to forget them in that order.
    order: VecDeque<(DateTime<Utc>, Key)>,
    retention: chrono::Duration,
    /// The log's time: the latest commit time remembered.
    log_time: Option<DateTime<Utc>>,
}

impl Default for IdempotencyKeys {
    fn default() -> Self {
        Self::with_retention(DEFAULT_KEY_RETENTION)
    }
}

impl IdempotencyKeys {
    /// No keys yet; each kept for `retention`.
    pub(super) fn with_retention(retention: Duration) -> Self {
        Self {
            keys: HashMap::new(),
            order: VecDeque::new(),
            retention: chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX),
            log_time: None,
        }
    }

    /// Remembers the answer to the commit or receipt that carried `key`, recorded `at` (by its
    /// writer's clock; taken as `now` if that is later than this process's `now`), and
    /// forgets the keys whose retention is over by the log's time.
    pub(super) fn remember(
        &mut self,
        key: Key,
        digest: Option<String>,
        answer: Answered,
        at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) {
        let at = at.min(now);
        self.log_time = self.log_time.max(Some(at));
        // The first record of a key within its retention holds it: a later one (a commit
        // the broker persisted late under a receipt, a receipt copied onto the log again)
        // never replaces its answer.
        let held = self
            .keys
            .get(&key)
            .is_some_and(|r| !self.expired(r.at) || r.at >= at);
        if !held {
            self.order.push_back((at, key.clone()));
            self.keys.insert(key, Remembered { digest, answer, at });
        }
        self.expire();
    }

    /// Forgets the keys whose retention is over by the log's time. Keys are remembered in
    /// log order, which is nearly time order: one recorded out of order is forgotten a
    /// little late, never early.
    fn expire(&mut self) {
        while let Some((at, _)) = self.order.front() {
            if !self.expired(*at) {
                break;
            }
            if let Some((at, key)) = self.order.pop_front()
                && self.keys.get(&key).is_some_and(|r| r.at == at)
            {
                self.keys.remove(&key);
            }
        }
    }

    fn expired(&self, at: DateTime<Utc>) -> bool {
        self.log_time
            .is_some_and(|now| now.signed_duration_since(at) >= self.retention)
    }

    /// The answer for a request with a key already used within the retention: the
    /// original outcome, replayed, for the same request; a refusal for another one.
    /// `None` for a new key, or one whose retention is over.
    pub(super) fn answer(
        &self,
        key: &Key,
        digest: Option<&String>,
    ) -> Option<Result<Outcome, OwnerError>> {
        let remembered = self.keys.get(key).filter(|r| !self.expired(r.at))?;
        Some(if remembered.digest.as_ref() == digest {
            remembered.answer.clone().map(|outcome| Outcome {
                replayed: true,
                ..outcome
            })
        } else {
            Err(OwnerError::IdempotencyKeyReused)
        })
    }

    /// How many keys are held.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Every key held, in the order it was remembered, with its request digest, answer
    /// and time; and the log's time. What a snapshot keeps of the keys.
    pub(super) fn export(&self) -> (Vec<HeldKey>, Option<DateTime<Utc>>) {
        let held = self
            .order
            .iter()
            .filter_map(|(at, key)| {
                let r = self.keys.get(key).filter(|r| r.at == *at)?;
                Some((key.clone(), r.digest.clone(), r.answer.clone(), r.at))
            })
            .collect();
        (held, self.log_time)
    }

    /// The keys [`IdempotencyKeys::export`] gave, kept for `retention` by the log's time
    /// `log_time`.
    pub(super) fn import(
        retention: Duration,
        held: Vec<HeldKey>,
        log_time: Option<DateTime<Utc>>,
    ) -> Self {
        let mut keys = Self::with_retention(retention);
        keys.log_time = log_time;
        for (key, digest, answer, at) in held {
            keys.order.push_back((at, key.clone()));
            keys.keys.insert(key, Remembered { digest, answer, at });
        }
        keys.expire();
        keys
    }

    /// The retention.
    pub(super) fn retention(&self) -> Duration {
        self.retention.to_std().unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use keel_schemas::StreamRef;

    use super::*;

    fn outcome(version: u64) -> Answered {
        Ok(Outcome {
            stream: StreamRef {
                stream_type: "order".into(),
                id: "o-1".into(),
            },
            version,
            events: Vec::new(),
            position: None,
            created: false,
            replayed: false,
        })
    }

    fn key(k: &str) -> Key {
        ("o-1".into(), k.into())
    }

    /// A key answers as its commit did within the retention, and not after it: the
    /// retry is then a fresh command, and the key's memory is given back. Time is the
    /// log's, and a commit time ahead of this process's clock counts as its clock.
    #[test]
    fn keys_are_kept_for_the_retention_and_then_forgotten() {
        let t0 = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
        let hour = chrono::Duration::hours(1);
        let mut keys = IdempotencyKeys::with_retention(Duration::from_secs(24 * 3600));
        keys.remember(key("a"), None, outcome(1), t0, t0);
        keys.remember(key("b"), None, outcome(2), t0 + hour, t0 + hour);
        keys.remember(key("x"), None, outcome(3), t0 + hour * 23, t0 + hour * 23);
        let replayed = keys.answer(&key("a"), None).unwrap().unwrap();
        assert_eq!((replayed.version, replayed.replayed), (1, true));
        assert!(matches!(
            keys.answer(&key("a"), Some(&"other".into())),
            Some(Err(OwnerError::IdempotencyKeyReused))
        ));
        // A writer whose clock runs a week ahead moves the log's time only to this
        // process's clock: a is forgotten at 24 hours, not before.
        keys.remember(
            key("y"),
            None,
            outcome(4),
            t0 + hour * 24 * 7,
            t0 + hour * 24,
        );
        assert!(keys.answer(&key("a"), None).is_none(), "a's day is over");
        assert!(keys.answer(&key("b"), None).is_some(), "b's is not");
        assert_eq!(keys.len(), 3, "a's memory is given back: b, x, y");
        // A retry of a is fresh: its new commit holds the key again.
        keys.remember(key("a"), None, outcome(5), t0 + hour * 24, t0 + hour * 24);
        assert_eq!(keys.answer(&key("a"), None).unwrap().unwrap().version, 5);
        // b goes when its day is over; the older entry of the re-used key a did not take
        // the newer one with it.
        keys.remember(key("c"), None, outcome(6), t0 + hour * 25, t0 + hour * 25);
        assert!(keys.answer(&key("b"), None).is_none());
        assert!(keys.answer(&key("a"), None).is_some());
        assert_eq!(keys.len(), 4, "x, y, a again, c");
        // Within the retention the first record of a key holds it.
        keys.remember(
            key("c"),
            Some("other".into()),
            outcome(7),
            t0 + hour * 25,
            t0 + hour * 25,
        );
        assert_eq!(keys.answer(&key("c"), None).unwrap().unwrap().version, 6);
    }
}
