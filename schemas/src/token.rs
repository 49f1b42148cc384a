//! Consistency tokens: opaque, URL-safe strings that encode log positions, so a query can
//! wait until a view has read past a client's own writes.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use thiserror::Error;

const PREFIX: &str = "v1.";
/// The HTTP header that carries a consistency token, on command responses and queries.
pub const CONSISTENCY_TOKEN_HEADER: &str = "keel-consistency-token";
/// Longest token accepted, in characters.
pub const MAX_TOKEN_LEN: usize = 4096;

/// A record's place in the log.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Position {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
}

/// A set of log positions, at most one per partition (the highest).
///
/// A view has passed the token when, for every partition in it, the view's next offset
/// is greater than the token's offset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsistencyToken {
    positions: BTreeMap<(String, i32), i64>,
}

/// Why a string is not a consistency token.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Empty string.
    #[error("the consistency token is empty")]
    Empty,
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("the consistency token is longer than {MAX_TOKEN_LEN} characters")]
    TooLong,
    /// Does not start with a known version.
    #[error("the consistency token has an unknown format (expected it to start with {PREFIX:?})")]
    UnknownFormat,
    /// Not URL-safe base64.
    #[error("the consistency token is not valid URL-safe base64")]
    NotBase64,
    /// Decodes, but not to a list of positions.
    #[error("the consistency token is malformed: {0}")]
    Malformed(String),
}

impl ConsistencyToken {
    /// A token for one position.
    pub fn at(position: Position) -> Self {
        let mut token = Self::default();
        token.include(position);
        token
    }

    /// Adds a position, keeping the highest offset per partition.
    pub fn include(&mut self, position: Position) {
        let offset = self
            .positions
            .entry((position.topic, position.partition))
            .or_insert(position.offset);
        *offset = (*offset).max(position.offset);
    }

    /// The union of two tokens: the highest offset of each partition.
    #[must_use]
    pub fn merge(mut self, other: &ConsistencyToken) -> Self {
        for position in other.positions() {
            self.include(position);
        }
        self
    }

    /// The positions, ordered by topic and partition.
    pub fn positions(&self) -> impl Iterator<Item = Position> + '_ {
        self.positions
            .iter()
            .map(|((topic, partition), offset)| Position {
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
            })
    }

    /// True when no position is held.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// True when `next_offset(topic, partition)` has passed every position of the token.
    pub fn is_passed_by(&self, mut next_offset: impl FnMut(&str, i32) -> Option<i64>) -> bool {
        self.positions.iter().all(|((topic, partition), offset)| {
            next_offset(topic, *partition).is_some_and(|n| n > *offset)
        })
    }

    /// The token's text form.
    pub fn encode(&self) -> String {
        let list: Vec<(&str, i32, i64)> = self
            .positions
            .iter()
            .map(|((t, p), o)| (t.as_str(), *p, *o))
            .collect();
        // A list of strings and integers always serialises.
        let json = serde_json::to_vec(&list).unwrap_or_default();
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }
}

impl FromStr for ConsistencyToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        if s.is_empty() {
            return Err(TokenError::Empty);
        }
        if s.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let body = s.strip_prefix(PREFIX).ok_or(TokenError::UnknownFormat)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::NotBase64)?;
        let list: Vec<(String, i32, i64)> = serde_json::from_slice(&json).map_err(|_| {
            TokenError::Malformed("expected a list of [topic, partition, offset]".into())
        })?;
        if list.is_empty() {
            return Err(TokenError::Malformed("it holds no position".into()));
        }
        let mut token = Self::default();
        for (topic, partition, offset) in list {
            if topic.is_empty() || partition < 0 || offset < 0 {
                return Err(TokenError::Malformed(format!(
                    "invalid position {topic:?}/{partition}@{offset}"
                )));
            }
            token.include(Position {
                topic,
                partition,
                offset,
            });
        }
        Ok(token)
    }
}

impl fmt::Display for ConsistencyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn pos(topic: &str, partition: i32, offset: i64) -> Position {
        Position {
            topic: topic.into(),
            partition,
            offset,
        }
    }

    #[test]
    fn round_trips_and_is_url_safe() {
        let token = ConsistencyToken::at(pos("keel.order.events", 3, 42))
            .merge(&ConsistencyToken::at(pos("keel.product.events", 0, 7)));
        let text = token.encode();
        assert!(
            text.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{text}"
        );
        assert_eq!(text.parse::<ConsistencyToken>().unwrap(), token);
    }

    #[test]
    fn merge_keeps_the_highest_offset_per_partition() {
        let merged =
            ConsistencyToken::at(pos("t", 0, 5)).merge(&ConsistencyToken::at(pos("t", 0, 3)));
        assert_eq!(merged.positions().collect::<Vec<_>>(), vec![pos("t", 0, 5)]);
    }

    #[test]
    fn passed_means_every_next_offset_is_beyond() {
        let token =
            ConsistencyToken::at(pos("t", 0, 5)).merge(&ConsistencyToken::at(pos("t", 1, 2)));
        assert!(token.is_passed_by(|_, p| Some(if p == 0 { 6 } else { 3 })));
        assert!(!token.is_passed_by(|_, p| Some(if p == 0 { 5 } else { 3 })));
        assert!(!token.is_passed_by(|_, p| (p == 0).then_some(6)));
    }

    #[test]
    fn garbage_is_rejected_with_a_clear_error() {
        let b64 = |s: &str| format!("v1.{}", URL_SAFE_NO_PAD.encode(s));
        assert_eq!("".parse::<ConsistencyToken>(), Err(TokenError::Empty));
        assert_eq!(
            "hello".parse::<ConsistencyToken>(),
            Err(TokenError::UnknownFormat)
        );
        assert_eq!(
            "v1.!!!".parse::<ConsistencyToken>(),
            Err(TokenError::NotBase64)
        );
        assert!(matches!(
            b64("{}").parse::<ConsistencyToken>(),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            b64("[]").parse::<ConsistencyToken>(),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            b64(r#"[["t",-1,0]]"#).parse::<ConsistencyToken>(),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            b64(r#"[["t",0,-5]]"#).parse::<ConsistencyToken>(),
            Err(TokenError::Malformed(_))
        ));
        assert_eq!(
            "v1.".repeat(2000).parse::<ConsistencyToken>(),
            Err(TokenError::TooLong)
        );
    }

    proptest! {
        #[test]
        fn any_string_parses_or_errors_without_panicking(s in ".{0,200}") {
            let _ = s.parse::<ConsistencyToken>();
        }

        #[test]
        fn any_positions_round_trip(list in proptest::collection::vec(("[a-z.]{1,20}", 0..64i32, 0..i64::MAX), 1..10)) {
            let mut token = ConsistencyToken::default();
            for (t, p, o) in list {
                token.include(pos(&t, p, o));
            }
            prop_assert_eq!(token.encode().parse::<ConsistencyToken>().unwrap(), token);
        }
    }
}
