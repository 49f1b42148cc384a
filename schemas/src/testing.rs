//! Records for tests and benchmarks, built in one place instead of by hand in each.

use serde_json::Value;
use uuid::Uuid;

use crate::{
    CommandMeta, CommitRecord, EventEnvelope, FenceRecord, LogRecord, SigningKey, StreamRef,
    Timestamp, TopicPartition, Writer,
};

/// A commit being put together: [`commit`] starts one, [`CommitFixture::build`] seals it.
#[derive(Clone, Debug)]
pub struct CommitFixture {
    stream: StreamRef,
    expected_version: u64,
    events: Vec<EventEnvelope>,
    command: CommandMeta,
    writer: Writer,
    prev_hash: Option<String>,
}

/// A commit of `stream` by `writer` after `expected_version`, with no events yet, for a
/// command `Test` by actor `test`.
pub fn commit(writer: &Writer, stream: StreamRef, expected_version: u64) -> CommitFixture {
    CommitFixture {
        stream,
        expected_version,
        events: Vec::new(),
        command: CommandMeta {
            id: Uuid::now_v7(),
            command_type: "Test".into(),
            idempotency_key: None,
            actor: "test".into(),
            correlation_id: "corr".into(),
            causation_id: None,
            request_digest: None,
            traceparent: None,
        },
        writer: writer.clone(),
        prev_hash: None,
    }
}

/// An unsigned legacy fence of `writer` (no rules), recorded now: it counts only where the
/// key policy lets legacy fences count.
pub fn fence(writer: &Writer) -> LogRecord {
    LogRecord::Fence(FenceRecord {
        writer: writer.clone(),
        recorded_at: Timestamp::now(),
        rules: None,
        claims: None,
        handoff: false,
        signature: None,
    })
}

/// A fence of `writer` on the partition `at` under today's rules, signed with `key`,
/// recorded now.
pub fn signed_fence(writer: &Writer, key: &SigningKey, at: &TopicPartition) -> LogRecord {
    LogRecord::Fence(FenceRecord::ruled(writer.clone(), at).signed(key))
}

/// A writer named `instance` at `epoch`.
pub fn writer(instance: &str, epoch: u64) -> Writer {
    Writer {
        instance: instance.into(),
        epoch,
    }
}

/// A stream reference `type/id`.
pub fn stream(stream_type: &str, id: impl Into<String>) -> StreamRef {
    StreamRef {
        stream_type: stream_type.into(),
        id: id.into(),
    }
}

impl CommitFixture {
    /// Adds an event of `event_type` at `schema_version`, numbered after the ones before.
    #[must_use]
    pub fn event(mut self, event_type: &str, schema_version: u32, payload: Value) -> Self {
        let version = self.expected_version + self.events.len() as u64 + 1;
        self.events.push(EventEnvelope {
            event_id: Uuid::now_v7(),
            version,
            event_type: event_type.into(),
            schema_version,
            payload,
        });
        self
    }

    /// Names the command and its actor.
    #[must_use]
    pub fn command(mut self, command_type: &str, actor: &str) -> Self {
        command_type.clone_into(&mut self.command.command_type);
        actor.clone_into(&mut self.command.actor);
        self
    }

    /// Sets the command's idempotency key.
    #[must_use]
    pub fn idempotency_key(mut self, key: &str) -> Self {
        self.command.idempotency_key = Some(key.into());
        self
    }

    /// Chains the commit to the stream's previous commit's hash.
    #[must_use]
    pub fn prev_hash(mut self, prev_hash: Option<String>) -> Self {
        self.prev_hash = prev_hash;
        self
    }

    /// The commit, sealed and signed with `key`.
    pub fn signed(self, key: &SigningKey) -> CommitRecord {
        let sealed = self.build();
        CommitRecord {
            signature: Some(key.sign(&sealed.hash)),
            ..sealed
        }
    }

    /// The commit, sealed (its hash set), unsigned.
    pub fn build(self) -> CommitRecord {
        CommitRecord::new(
            self.stream,
            self.expected_version,
            self.events,
            self.command,
            self.writer,
            self.prev_hash,
        )
        .sealed()
    }
}
