//! What the owner is asked and what it answers, in the owner's own terms: the API layer
//! turns an [`OwnerError`] into problem+json.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, SystemTime};

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
    /// The W3C trace context to put on the record's `traceparent` header.
    pub traceparent: Option<String>,
    /// The trace context to record in the commit itself (`command.traceparent`, under its
    /// hash): the command API's span of the request, set only when traces are exported,
    /// so a deployment that does not trace writes commits as builds before the field did.
    pub recorded_trace: Option<String>,
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
    pub reply: Reply,
}

/// What the owner answers a command.
pub type Answered = Result<Outcome, OwnerError>;

/// When a command went through the owner's phases, for its trace: told with the answer
/// of a command whose commit was appended (the phases are its flight's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeline {
    /// Deciding its flight.
    pub decide: Option<(SystemTime, SystemTime)>,
    /// From handing the flight's commits to the producer to their acknowledgement.
    pub append: Option<(SystemTime, SystemTime)>,
    /// Reading the flight back, to the answer.
    pub read_back: Option<(SystemTime, SystemTime)>,
}

/// The caller waits for the answer.
const WAITING: u8 = 0;
/// The owner took the command on: it may be appended, and the caller waits for its
/// read-back whatever its patience.
const TAKEN: u8 = 1;
/// The caller stopped waiting before the owner took the command on: it is never appended.
const ABANDONED: u8 = 2;

/// The owner's end of a command's answer. The owner [takes the command on](Reply::take_on)
/// before deciding it; a caller that gave up first can never see it appended.
#[derive(Debug)]
pub struct Reply {
    sender: oneshot::Sender<(Answered, Timeline)>,
    state: Arc<AtomicU8>,
    /// When the command was sent to the owner.
    sent: std::time::Instant,
}

/// The caller's end of a command's answer.
#[derive(Debug)]
pub struct Answer {
    receiver: oneshot::Receiver<(Answered, Timeline)>,
    state: Arc<AtomicU8>,
}

/// Why a caller has no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoAnswer {
    /// The caller's patience ran out before the owner took the command on: nothing was or
    /// will be appended for it.
    GaveUp,
    /// The owner went away without answering (it stopped, or its process is shutting
    /// down): the command may or may not be in the log.
    OwnerGone,
}

/// A command's answer channel: the owner's end and the caller's.
pub fn reply_channel() -> (Reply, Answer) {
    let (sender, receiver) = oneshot::channel();
    let state = Arc::new(AtomicU8::new(WAITING));
    (
        Reply {
            sender,
            state: Arc::clone(&state),
            sent: std::time::Instant::now(),
        },
        Answer { receiver, state },
    )
}

impl Reply {
    /// Takes the command on, before deciding it: false when its caller gave up, and then
    /// nothing may be appended for it.
    pub fn take_on(&self) -> bool {
        match self
            .state
            .compare_exchange(WAITING, TAKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == TAKEN,
        }
    }

    /// How long the command has waited for the owner to take it on: `None` once it has
    /// been taken on (or given up on).
    pub fn waiting_for(&self) -> Option<Duration> {
        (self.state.load(Ordering::Acquire) == WAITING).then(|| self.sent.elapsed())
    }

    /// Sends the answer: false if nobody waits for it any more.
    pub fn send(self, answer: Answered) -> bool {
        self.send_timed(answer, Timeline::default())
    }

    /// Sends the answer with when its phases ran.
    pub fn send_timed(self, answer: Answered, timeline: Timeline) -> bool {
        self.sender.send((answer, timeline)).is_ok()
    }
}

impl Answer {
    /// Waits for the answer for up to `patience` while the command waits in the owner's
    /// queue; once the owner has taken it on, waits for the owner's answer, which follows
    /// the read-back of its commit.
    pub async fn wait(self, patience: Duration) -> Result<Answered, NoAnswer> {
        self.wait_timed(patience).await.map(|(answer, _)| answer)
    }

    /// [`Answer::wait`], with when the command's phases ran.
    pub async fn wait_timed(
        mut self,
        patience: Duration,
    ) -> Result<(Answered, Timeline), NoAnswer> {
        if let Ok(answer) = tokio::time::timeout(patience, &mut self.receiver).await {
            return answer.map_err(|_| NoAnswer::OwnerGone);
        }
        let gave_up = self
            .state
            .compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if gave_up {
            return Err(NoAnswer::GaveUp);
        }
        self.receiver.await.map_err(|_| NoAnswer::OwnerGone)
    }
}

/// One event of an accepted command, as the response lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
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
