use serde::{Serialize, de::DeserializeOwned};

use crate::DomainError;

/// An event of the domain: a past-tense fact with a stable wire name and schema version.
///
/// Events serialise adjacently tagged, `{"type": "<EventType>", "payload": {..}}`, so the
/// wire format can store the type and the payload apart.
pub trait DomainEvent: Clone + std::fmt::Debug + PartialEq + Serialize + DeserializeOwned {
    /// The stable name of this event's type, e.g. `OrderPlaced`.
    fn event_type(&self) -> &'static str;
    /// The schema version this code writes for this event type.
    fn schema_version(&self) -> u32;
}

/// An aggregate: the consistency boundary that decides commands against its own state.
pub trait Aggregate: Clone + Default + std::fmt::Debug + PartialEq {
    /// The stream type, used in topic names and stream references (`product`, `order`…).
    const TYPE: &'static str;
    /// Every event type this aggregate emits, with the schema version written today.
    const EVENT_TYPES: &'static [(&'static str, u32)];
    /// The commands this aggregate accepts.
    type Command: Clone + std::fmt::Debug;
    /// The events this aggregate emits.
    type Event: DomainEvent;

    /// Decides a command against the current state: the events it produces, or the rule
    /// it breaks. An empty vector means the command is accepted and changes nothing.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, DomainError>;

    /// Folds one event into the state. Never fails: events are facts.
    fn evolve(self, event: &Self::Event) -> Self;

    /// Folds a history of events into a state, starting from the empty aggregate.
    fn fold<'a, I>(events: I) -> Self
    where
        I: IntoIterator<Item = &'a Self::Event>,
        Self::Event: 'a,
    {
        events.into_iter().fold(Self::default(), Self::evolve)
    }
}
