//! What the owner is asked and what it answers, in the owner's own terms: the API layer
//! turns an [`OwnerError`] into problem+json.

use keel_domain::{Aggregate, DomainError};
use keel_schemas::{Position, StreamRef};
use serde::Serialize;
use tokio::sync::oneshot;
use uuid::Uuid;

/// What the caller knows of a command besides the command itself.
#[derive(Clone, Debug)]
pub struct RequestMeta {
    /// `RegisterProduct`…
    pub command_type: &'static str,
    /// The client's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// Digest of the request, recorded with the key.
    pub request_digest: Option<String>,
    /// The version the command requires the stream to be at (`If-Match`).
    pub if_match: Option<u64>,
    /// Who sent it.
    pub actor: String,
    /// The request's correlation id.
    pub correlation_id: String,
    /// What caused it, if the client said.
    pub causation_id: Option<String>,
    /// The W3C trace context to put on the record.
    pub traceparent: Option<String>,
}

/// A command for the owner of its stream's partition.
#[derive(Debug)]
pub struct CommandRequest<A: Aggregate> {
    /// The stream id.
    pub stream_id: String,
    /// The command.
    pub command: A::Command,
    /// The rest of the request.
    pub meta: RequestMeta,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<Outcome, OwnerError>>,
}

/// One event of an accepted command, as the response lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventSummary {
    /// The event's id.
    pub event_id: Uuid,
    /// Its type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The stream version it brings the stream to.
    pub version: u64,
}

/// The result of an accepted command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The stream.
    pub stream: StreamRef,
    /// The stream's version after the command.
    pub version: u64,
    /// The events the command produced (none when it changed nothing).
    pub events: Vec<EventSummary>,
    /// Where the commit (or the stream's latest commit) is in the log.
    pub position: Option<Position>,
    /// True for a command whose commit opened its stream.
    pub created: bool,
    /// True when this answers a retry with the original result.
    pub replayed: bool,
}

/// Why the owner did not accept a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OwnerError {
    /// The partition cannot take commands now (starting, recovering, owned elsewhere) or
    /// the commit was not confirmed: retry, with the same `Idempotency-Key`.
    #[error("{0}")]
    Unavailable(String),
    /// The command required another stream version.
    #[error("the stream is at version {actual}, not {expected}")]
    VersionMismatch {
        /// The version the command required.
        expected: u64,
        /// The stream's version.
        actual: u64,
    },
    /// The idempotency key was used before with another request.
    #[error("the Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    /// The command breaks a domain rule (or names a stream that does not exist).
    #[error(transparent)]
    Domain(#[from] DomainError),
}
