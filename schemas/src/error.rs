use thiserror::Error;

/// Why a record or an event could not be read or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The bytes are not a Keel record.
    #[error("not a valid Keel record: {0}")]
    Record(#[source] serde_json::Error),
    /// The event type is not one this aggregate knows.
    #[error("unknown event type {event_type:?} for stream type {stream_type:?}")]
    UnknownEventType {
        /// The stream type.
        stream_type: &'static str,
        /// The event type found.
        event_type: String,
    },
    /// The event was written by newer code than this build.
    #[error("{event_type} schema version {found} is newer than this build reads (up to {known})")]
    NewerSchemaVersion {
        /// The event type.
        event_type: String,
        /// The version found.
        found: u32,
        /// The newest version this build knows.
        known: u32,
    },
    /// No upcaster leads from the stored version to the current one.
    #[error("no upcaster from {event_type} v{from}")]
    MissingUpcaster {
        /// The event type.
        event_type: String,
        /// The version without an upcaster.
        from: u32,
    },
    /// An upcaster refused the payload.
    #[error("upcasting {event_type} v{from} failed: {reason}")]
    Upcast {
        /// The event type.
        event_type: String,
        /// The version being upcast.
        from: u32,
        /// Why.
        reason: String,
    },
    /// The payload does not match the event type's schema.
    #[error("invalid {event_type} payload: {source}")]
    Payload {
        /// The event type.
        event_type: String,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
}
