use thiserror::Error;

/// What went wrong talking to Kafka.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KafkaError {
    /// A setting is invalid.
    #[error("invalid setting {name}: {reason}")]
    Setting {
        /// The environment variable.
        name: String,
        /// Why.
        reason: String,
    },
    /// The client reported an error.
    #[error("{context}: {source}")]
    Client {
        /// What Keel was doing.
        context: String,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// An existing topic has another partition count than configured: the partitioner would
    /// send aggregates to the wrong partitions.
    #[error("topic {topic} has {actual} partitions, but KEEL_PARTITIONS is {expected}")]
    PartitionCountMismatch {
        /// The topic.
        topic: String,
        /// Configured partitions.
        expected: i32,
        /// Partitions found.
        actual: i32,
    },
    /// A record was not sent.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The broker did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Readers were asked for something they cannot do.
    #[error("cannot read: {0}")]
    Reader(String),
}

impl KafkaError {
    pub(crate) fn client(
        context: impl Into<String>,
    ) -> impl FnOnce(rdkafka::error::KafkaError) -> Self {
        let context = context.into();
        move |source| Self::Client { context, source }
    }
}
