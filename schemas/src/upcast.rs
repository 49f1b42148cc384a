//! Upcasters: functions that lift a stored payload from one schema version to the next.
//!
//! Applied on read, everywhere (command-side state, projections, audit), so old events
//! stay readable forever and the domain only knows the current shape.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde_json::{Value, json};

use crate::SchemaError;

/// Lifts a payload from version `n` to version `n + 1`, or says why it cannot.
pub type Upcaster = fn(Value) -> Result<Value, String>;

/// A registry of upcasters keyed by (event type, the version they read).
#[derive(Clone, Debug, Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), Upcaster>,
}

static STANDARD: LazyLock<Upcasters> = LazyLock::new(|| {
    let mut upcasters = Upcasters::default();
    upcasters.register("OrderPlaced", 1, order_placed_v1_to_v2);
    upcasters
});

impl Upcasters {
    /// Every upcaster of the shop domain.
    pub fn standard() -> &'static Upcasters {
        &STANDARD
    }

    /// Registers `step`, which reads `event_type` at version `from` and writes `from + 1`.
    pub fn register(&mut self, event_type: &str, from: u32, step: Upcaster) {
        self.steps.insert((event_type.to_owned(), from), step);
    }

    /// Lifts `payload` of `event_type` from version `from` to version `to`, step by step.
    pub fn upcast(
        &self,
        event_type: &str,
        from: u32,
        to: u32,
        mut payload: Value,
    ) -> Result<Value, SchemaError> {
        for version in from..to {
            let step = self
                .steps
                .get(&(event_type.to_owned(), version))
                .ok_or_else(|| SchemaError::MissingUpcaster {
                    event_type: event_type.to_owned(),
                    from: version,
                })?;
            payload = step(payload).map_err(|reason| SchemaError::Upcast {
                event_type: event_type.to_owned(),
                from: version,
                reason,
            })?;
        }
        Ok(payload)
    }
}

/// The currency of every order written before money carried its currency: the shop sold
/// in euros only until `OrderPlaced` v2.
const V1_CURRENCY: &str = "EUR";

/// `OrderPlaced` v1 held bare minor units (`unit_price_minor`, `total_minor`); v2 holds
/// money with its currency (`unit_price`, `total`).
fn order_placed_v1_to_v2(mut payload: Value) -> Result<Value, String> {
    let money = |v: Option<Value>, field: &str| -> Result<Value, String> {
        match v {
            Some(Value::Number(n)) if n.is_i64() => {
                Ok(json!({"amount_minor": n, "currency": V1_CURRENCY}))
            }
            _ => Err(format!("{field} must be an integer")),
        }
    };
    let obj = payload.as_object_mut().ok_or("payload must be an object")?;
    let total = money(obj.remove("total_minor"), "total_minor")?;
    obj.insert("total".into(), total);
    let lines = obj
        .get_mut("lines")
        .and_then(Value::as_array_mut)
        .ok_or("lines must be an array")?;
    for (i, line) in lines.iter_mut().enumerate() {
        let line = line
            .as_object_mut()
            .ok_or_else(|| format!("lines[{i}] must be an object"))?;
        let price = money(
            line.remove("unit_price_minor"),
            &format!("lines[{i}].unit_price_minor"),
        )?;
        line.insert("unit_price".into(), price);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_placed_v1_reads_as_v2_in_euros() {
        let v1 = json!({
            "customer_id": "c-1",
            "lines": [{"sku": "MUG-1", "quantity": 2, "unit_price_minor": 1299}],
            "total_minor": 2598
        });
        let v2 = Upcasters::standard()
            .upcast("OrderPlaced", 1, 2, v1)
            .unwrap();
        assert_eq!(
            v2,
            json!({
                "customer_id": "c-1",
                "lines": [{"sku": "MUG-1", "quantity": 2,
                           "unit_price": {"amount_minor": 1299, "currency": "EUR"}}],
                "total": {"amount_minor": 2598, "currency": "EUR"}
            })
        );
    }

    #[test]
    fn a_broken_v1_payload_is_an_upcast_error() {
        let err = Upcasters::standard()
            .upcast("OrderPlaced", 1, 2, json!({"lines": []}))
            .unwrap_err();
        assert!(matches!(err, SchemaError::Upcast { from: 1, .. }), "{err}");
    }

    #[test]
    fn a_missing_step_is_named() {
        let err = Upcasters::standard()
            .upcast("OrderShipped", 1, 2, json!({}))
            .unwrap_err();
        assert!(matches!(err, SchemaError::MissingUpcaster { from: 1, .. }));
    }
}
