//! Topic names and partitions: one topic per stream type, `<prefix>.<type>.events`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The topic of `stream_type` under `prefix`: `<prefix>.<stream_type>.events`.
pub fn topic_name(prefix: &str, stream_type: &str) -> String {
    format!("{prefix}.{stream_type}.events")
}

/// The stream type a topic `<prefix>.<type>.events` holds; `None` for a name of another
/// shape. The inverse of [`topic_name`].
pub fn stream_type_of(topic: &str) -> Option<&str> {
    topic
        .strip_suffix(".events")?
        .rsplit('.')
        .next()
        .filter(|t| !t.is_empty())
}

/// One partition of one topic: the unit a reader reads, an owner owns and a checkpoint
/// counts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TopicPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
}

impl TopicPartition {
    /// `topic`/`partition`.
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_their_stream_type() {
        assert_eq!(topic_name("keel", "order"), "keel.order.events");
        assert_eq!(stream_type_of("keel.order.events"), Some("order"));
        assert_eq!(stream_type_of("a.b.c.product.events"), Some("product"));
        assert_eq!(
            stream_type_of(&topic_name("x.y", "customer")),
            Some("customer")
        );
        assert_eq!(stream_type_of("weird"), None);
        assert_eq!(stream_type_of(".events"), None);
    }

    #[test]
    fn a_topic_partition_reads_as_topic_slash_partition() {
        assert_eq!(
            TopicPartition::new("keel.order.events", 3).to_string(),
            "keel.order.events/3"
        );
    }
}
