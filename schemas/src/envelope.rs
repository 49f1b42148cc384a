//! Event envelopes, and the conversions between them and the domain's events.

use keel_domain::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{SchemaError, Upcasters};

/// One event as stored inside a commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// UUID v7 of the event.
    pub event_id: Uuid,
    /// The stream version this event brings the stream to (1 for its first event).
    pub version: u64,
    /// The event type, e.g. `OrderPlaced`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The version of the payload's schema.
    pub schema_version: u32,
    /// The event's data.
    pub payload: Value,
}

/// Wraps a domain event in an envelope at stream version `version`.
pub fn encode_event<E: DomainEvent>(event: &E, event_id: Uuid, version: u64) -> EventEnvelope {
    // Domain events serialise as {"type": .., "payload": {..}}; that cannot fail.
    let mut tagged = serde_json::to_value(event).unwrap_or(Value::Null);
    let payload = tagged
        .get_mut("payload")
        .map(Value::take)
        .unwrap_or_else(|| json!({}));
    EventEnvelope {
        event_id,
        version,
        event_type: event.event_type().to_owned(),
        schema_version: event.schema_version(),
        payload,
    }
}

/// Reads an envelope as an event of aggregate `A`, upcasting older schema versions with
/// the standard upcasters.
pub fn decode_event<A: Aggregate>(envelope: &EventEnvelope) -> Result<A::Event, SchemaError> {
    decode_event_with::<A>(envelope, Upcasters::standard())
}

/// Reads an envelope as an event of aggregate `A` with the given upcasters.
pub fn decode_event_with<A: Aggregate>(
    envelope: &EventEnvelope,
    upcasters: &Upcasters,
) -> Result<A::Event, SchemaError> {
    let event_type = envelope.event_type.as_str();
    let Some(&(_, current)) = A::EVENT_TYPES.iter().find(|(t, _)| *t == event_type) else {
        return Err(SchemaError::UnknownEventType {
            stream_type: A::TYPE,
            event_type: event_type.to_owned(),
        });
    };
    if envelope.schema_version > current {
        return Err(SchemaError::NewerSchemaVersion {
            event_type: event_type.to_owned(),
            found: envelope.schema_version,
            known: current,
        });
    }
    let read = |source| SchemaError::Payload {
        event_type: event_type.to_owned(),
        source,
    };
    if envelope.schema_version == current {
        // The current schema: read the payload where it is, without copying it.
        return A::Event::deserialize(Tagged {
            event_type,
            payload: &envelope.payload,
        })
        .map_err(read);
    }
    let payload = upcasters.upcast(
        event_type,
        envelope.schema_version,
        current,
        envelope.payload.clone(),
    )?;
    serde_json::from_value(json!({"type": event_type, "payload": payload})).map_err(read)
}

/// An event as the domain's types read it, `{"type": …, "payload": …}`, over a borrowed
/// payload: the tag comes first, so the payload is read straight into its variant.
struct Tagged<'a> {
    event_type: &'a str,
    payload: &'a Value,
}

impl<'de> serde::Deserializer<'de> for Tagged<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_map(TaggedFields {
            tagged: self,
            next: 0,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

/// The two fields of [`Tagged`], in order.
struct TaggedFields<'a> {
    tagged: Tagged<'a>,
    next: u8,
}

impl<'de> serde::de::MapAccess<'de> for TaggedFields<'de> {
    type Error = serde_json::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let key = match self.next {
            0 => "type",
            1 => "payload",
            _ => return Ok(None),
        };
        seed.deserialize(serde::de::value::BorrowedStrDeserializer::new(key))
            .map(Some)
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        self.next += 1;
        if self.next == 1 {
            seed.deserialize(serde::de::value::BorrowedStrDeserializer::new(
                self.tagged.event_type,
            ))
        } else {
            seed.deserialize(self.tagged.payload)
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_domain::customer::{Customer, CustomerEvent};
    use keel_domain::ids::{Email, Text};
    use keel_domain::order::Order;
    use keel_domain::product::{Product, ProductEvent};

    use super::*;

    #[test]
    fn encode_then_decode_is_identity() {
        let event = CustomerEvent::CustomerRegistered {
            email: Email::parse("ada@example.com").unwrap(),
            name: Text::parse("name", "Ada").unwrap(),
        };
        let envelope = encode_event(&event, Uuid::now_v7(), 1);
        assert_eq!(envelope.event_type, "CustomerRegistered");
        assert_eq!(envelope.payload["email"], "ada@example.com");
        assert_eq!(decode_event::<Customer>(&envelope).unwrap(), event);
    }

    #[test]
    fn the_borrowed_read_agrees_with_reading_a_tagged_value() {
        let payloads = [
            ("OrderShipped", json!({"carrier": "DHL", "tracking": "T-1"})),
            ("OrderShipped", json!({"carrier": "", "tracking": "T-1"})),
            ("OrderShipped", json!({"carrier": "DHL"})),
            (
                "OrderShipped",
                json!({"carrier": "DHL", "tracking": "T-1", "extra": 1}),
            ),
            ("OrderShipped", json!([1, 2])),
            ("OrderCancelled", json!({"reason": "changed my mind"})),
        ];
        for (event_type, payload) in payloads {
            let envelope = EventEnvelope {
                event_id: Uuid::now_v7(),
                version: 2,
                event_type: event_type.into(),
                schema_version: 1,
                payload: payload.clone(),
            };
            let borrowed = decode_event::<Order>(&envelope).map_err(|e| e.to_string());
            let tagged: Result<<Order as Aggregate>::Event, String> = serde_json::from_value(
                json!({"type": event_type, "payload": payload}),
            )
            .map_err(|source| {
                SchemaError::Payload {
                    event_type: event_type.to_owned(),
                    source,
                }
                .to_string()
            });
            assert_eq!(borrowed, tagged, "{event_type} {}", envelope.payload);
        }
    }

    #[test]
    fn payload_less_events_store_an_empty_object() {
        let envelope = encode_event(&ProductEvent::ProductDiscontinued {}, Uuid::now_v7(), 3);
        assert_eq!(envelope.payload, json!({}));
        assert_eq!(
            decode_event::<Product>(&envelope).unwrap(),
            ProductEvent::ProductDiscontinued {}
        );
    }

    #[test]
    fn unknown_types_newer_versions_and_bad_payloads_are_errors() {
        let mut envelope = EventEnvelope {
            event_id: Uuid::now_v7(),
            version: 1,
            event_type: "OrderTeleported".into(),
            schema_version: 1,
            payload: json!({}),
        };
        assert!(matches!(
            decode_event::<Order>(&envelope),
            Err(SchemaError::UnknownEventType { .. })
        ));
        envelope.event_type = "OrderShipped".into();
        envelope.schema_version = 9;
        assert!(matches!(
            decode_event::<Order>(&envelope),
            Err(SchemaError::NewerSchemaVersion {
                found: 9,
                known: 1,
                ..
            })
        ));
        envelope.schema_version = 1;
        envelope.payload = json!({"carrier": ""});
        assert!(matches!(
            decode_event::<Order>(&envelope),
            Err(SchemaError::Payload { .. })
        ));
    }
}
