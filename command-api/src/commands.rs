//! The command catalogue: every route's collection, command, body schema, and the parsing
//! of a JSON body into a validated domain command, naming every invalid field.

use keel_domain::customer::{Customer, CustomerCommand};
use keel_domain::ids::{CustomerId, Email, OrderId, Quantity, Sku, Text};
use keel_domain::money::{Currency, Money};
use keel_domain::order::{Order, OrderCommand, OrderLine};
use keel_domain::product::{Product, ProductCommand};
use keel_domain::{Aggregate, ValidationError};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::ApiError;

/// One command route: `POST /v1/{collection}/{id}/{name}`.
#[derive(Debug)]
pub struct CommandSpec {
    /// The collection segment: `products`, `customers`, `orders`.
    pub collection: &'static str,
    /// The command segment: `register`, `restock`…
    pub name: &'static str,
    /// The command's type as recorded in the commit: `RegisterProduct`…
    pub command_type: &'static str,
    /// True when the command creates its stream (answered `201 Created`).
    pub creates: bool,
    /// JSON Schema of the body.
    pub schema: fn() -> Value,
}

/// A parsed, validated command for one of the aggregates.
#[derive(Clone, Debug)]
pub enum ParsedCommand {
    /// For a product.
    Product(ProductCommand),
    /// For a customer.
    Customer(CustomerCommand),
    /// For an order.
    Order(OrderCommand),
}

impl ParsedCommand {
    /// The command, for the owners of its aggregate to take back as their command type.
    pub fn into_any(self) -> Box<dyn std::any::Any + Send> {
        match self {
            ParsedCommand::Product(c) => Box::new(c),
            ParsedCommand::Customer(c) => Box::new(c),
            ParsedCommand::Order(c) => Box::new(c),
        }
    }
}

fn money_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["amount_minor", "currency"],
           "properties": {"amount_minor": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000_000_000_i64,
                                           "description": "amount in minor units (cents), greater than zero"},
                          "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}}})
}
/// A text field: 1 to 200 characters, not blank, no control characters (as [`Text`]).
fn text_schema() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 200,
           "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"})
}
/// JSON Schema of a stream id.
pub fn id_schema() -> Value {
    json!({"type": "string", "pattern": "^[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,127}$"})
}
fn quantity_schema(max: u32) -> Value {
    json!({"type": "integer", "minimum": 1, "maximum": max})
}
fn object(required: &[&str], properties: Value) -> Value {
    json!({"type": "object", "additionalProperties": false, "required": required, "properties": properties})
}

/// Every command route.
pub static CATALOGUE: &[CommandSpec] = &[
    CommandSpec {
        collection: "products",
        name: "register",
        command_type: "RegisterProduct",
        creates: true,
        schema: || {
            object(
                &["name", "price"],
                json!({"name": text_schema(), "price": money_schema()}),
            )
        },
    },
    CommandSpec {
        collection: "products",
        name: "change-price",
        command_type: "ChangePrice",
        creates: false,
        schema: || object(&["price"], json!({"price": money_schema()})),
    },
    CommandSpec {
        collection: "products",
        name: "restock",
        command_type: "Restock",
        creates: false,
        schema: || {
            object(
                &["quantity"],
                json!({"quantity": quantity_schema(Quantity::MAX)}),
            )
        },
    },
    CommandSpec {
        collection: "products",
        name: "reserve-stock",
        command_type: "ReserveStock",
        creates: false,
        schema: || {
            object(
                &["order_id", "quantity"],
                json!({"order_id": id_schema(), "quantity": quantity_schema(Quantity::MAX)}),
            )
        },
    },
    CommandSpec {
        collection: "products",
        name: "release-stock",
        command_type: "ReleaseStock",
        creates: false,
        schema: || object(&["order_id"], json!({"order_id": id_schema()})),
    },
    CommandSpec {
        collection: "products",
        name: "take-reserved-stock",
        command_type: "TakeReservedStock",
        creates: false,
        schema: || object(&["order_id"], json!({"order_id": id_schema()})),
    },
    CommandSpec {
        collection: "products",
        name: "return-taken-stock",
        command_type: "ReturnTakenStock",
        creates: false,
        schema: || object(&["order_id"], json!({"order_id": id_schema()})),
    },
    CommandSpec {
        collection: "products",
        name: "discontinue",
        command_type: "Discontinue",
        creates: false,
        schema: || object(&[], json!({})),
    },
    CommandSpec {
        collection: "customers",
        name: "register",
        command_type: "RegisterCustomer",
        creates: true,
        schema: || {
            object(
                &["email", "name"],
                json!({"email": {"type": "string", "format": "email", "maxLength": 254}, "name": text_schema()}),
            )
        },
    },
    CommandSpec {
        collection: "customers",
        name: "change-email",
        command_type: "ChangeEmail",
        creates: false,
        schema: || {
            object(
                &["email"],
                json!({"email": {"type": "string", "format": "email", "maxLength": 254}}),
            )
        },
    },
    CommandSpec {
        collection: "orders",
        name: "place",
        command_type: "PlaceOrder",
        creates: true,
        schema: || {
            object(
                &["customer_id", "lines"],
                json!({
            "customer_id": id_schema(),
            "lines": {"type": "array", "minItems": 1, "maxItems": 100,
                      "items": object(&["sku", "quantity", "unit_price"], json!({
                          "sku": id_schema(), "quantity": quantity_schema(1000), "unit_price": money_schema()}))}}),
            )
        },
    },
    CommandSpec {
        collection: "orders",
        name: "pay",
        command_type: "RecordPayment",
        creates: false,
        schema: || {
            object(
                &["amount", "payment_ref"],
                json!({"amount": money_schema(), "payment_ref": text_schema()}),
            )
        },
    },
    CommandSpec {
        collection: "orders",
        name: "ship",
        command_type: "ShipOrder",
        creates: false,
        schema: || {
            object(
                &["carrier", "tracking"],
                json!({"carrier": text_schema(), "tracking": text_schema()}),
            )
        },
    },
    CommandSpec {
        collection: "orders",
        name: "cancel",
        command_type: "CancelOrder",
        creates: false,
        schema: || object(&["reason"], json!({"reason": text_schema()})),
    },
    CommandSpec {
        collection: "orders",
        name: "confirm-reservation",
        command_type: "ConfirmReservation",
        creates: false,
        schema: || object(&[], json!({})),
    },
    CommandSpec {
        collection: "orders",
        name: "mark-ready-to-ship",
        command_type: "MarkReadyToShip",
        creates: false,
        schema: || object(&[], json!({})),
    },
    CommandSpec {
        collection: "orders",
        name: "cancel-unpaid",
        command_type: "CancelUnpaidOrder",
        creates: false,
        schema: || object(&["reason"], json!({"reason": text_schema()})),
    },
];

/// The stream type of a collection.
pub fn stream_type(collection: &str) -> Option<&'static str> {
    match collection {
        "products" => Some(Product::TYPE),
        "customers" => Some(Customer::TYPE),
        "orders" => Some(Order::TYPE),
        _ => None,
    }
}

/// Finds a command route.
pub fn find(collection: &str, name: &str) -> Result<&'static CommandSpec, ApiError> {
    if stream_type(collection).is_none() {
        return Err(ApiError::NotFound {
            detail: format!("no collection {collection:?}: use products, customers or orders"),
            rule: None,
        });
    }
    CATALOGUE
        .iter()
        .find(|c| c.collection == collection && c.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = CATALOGUE
                .iter()
                .filter(|c| c.collection == collection)
                .map(|c| c.name)
                .collect();
            ApiError::NotFound {
                detail: format!(
                    "{collection} have no command {name:?}: use one of {}",
                    known.join(", ")
                ),
                rule: None,
            }
        })
}

/// Collects every validation error of a body instead of stopping at the first.
#[derive(Default)]
struct Fields {
    errors: Vec<ValidationError>,
}

impl Fields {
    fn take<T>(&mut self, result: Result<T, ValidationError>) -> Option<T> {
        result.map_err(|e| self.errors.push(e)).ok()
    }

    fn text(&mut self, field: &str, value: String) -> Option<Text> {
        self.take(Text::parse(field, value))
    }

    fn money(&mut self, field: &str, dto: MoneyDto) -> Option<Money> {
        let currency = self.take(Currency::parse(&dto.currency).map_err(|e| e.within(field)))?;
        self.take(Money::new(dto.amount_minor, currency).map_err(|e| e.within(field)))
    }

    fn quantity(&mut self, field: &str, n: u64) -> Option<Quantity> {
        self.take(Quantity::parse(field, n))
    }

    fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, ApiError> {
        match (self.errors.is_empty(), build()) {
            (true, Some(value)) => Ok(value),
            _ => Err(ApiError::Invalid(self.errors)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoneyDto {
    amount_minor: i64,
    currency: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterProductDto {
    name: String,
    price: MoneyDto,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceDto {
    price: MoneyDto,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuantityDto {
    quantity: u64,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveDto {
    order_id: String,
    quantity: u64,
}
/// A body naming only an order: releasing, taking or returning its stock.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseDto {
    order_id: String,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyDto {}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterCustomerDto {
    email: String,
    name: String,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailDto {
    email: String,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineDto {
    sku: String,
    quantity: u64,
    unit_price: MoneyDto,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceOrderDto {
    customer_id: String,
    lines: Vec<LineDto>,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PayDto {
    amount: MoneyDto,
    payment_ref: String,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShipDto {
    carrier: String,
    tracking: String,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelDto {
    reason: String,
}

/// Reads a body into its DTO; a shape error names the field it is at.
fn dto<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        let reason = e.into_inner().to_string();
        // serde appends " at line 1 column 2" to some messages; the field says where.
        let reason = reason
            .split(" at line ")
            .next()
            .unwrap_or_default()
            .to_owned();
        // "missing field `x`" is reported at the parent: name the field itself.
        let named = reason
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        let field = match named {
            Some(name) if field.is_empty() => name.to_owned(),
            Some(name) => format!("{field}.{name}"),
            None => field,
        };
        ApiError::Invalid(vec![ValidationError::new(field, reason)])
    })
}

/// Validates the stream id of the path for `collection`.
pub fn validate_id(collection: &str, id: &str) -> Result<(), ApiError> {
    let result = match collection {
        "products" => Sku::parse(id).map(drop),
        "customers" => CustomerId::parse(id).map(drop),
        _ => OrderId::parse(id).map(drop),
    };
    result.map_err(|e| ApiError::Invalid(vec![ValidationError::new("id", e.reason)]))
}

/// Rewrites every number of `value` that has no fraction (`5.0`, `1e3`) as the integer it
/// equals: JSON Schema counts them as integers, and so does the API. A client's retry of
/// `5` as `5.0` is therefore the same request.
pub fn integral_numbers(value: &mut Value) {
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64())
                && f.fract() == 0.0
            {
                // In range, an integral f64 is exactly the integer it names.
                if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                    *value = Value::from(f as u64);
                } else if (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                    *value = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        Value::Object(fields) => fields.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

/// Parses `body` as the command `spec`, validating every field.
pub fn parse(spec: &CommandSpec, body: &Value) -> Result<ParsedCommand, ApiError> {
    if !body.is_object() {
        return Err(ApiError::Invalid(vec![ValidationError::new(
            "",
            "the body must be a JSON object",
        )]));
    }
    let mut f = Fields::default();
    use CustomerCommand as CC;
    use OrderCommand as OC;
    use ParsedCommand::{Customer as C, Order as O, Product as P};
    use ProductCommand as PC;
    Ok(match spec.command_type {
        "RegisterProduct" => {
            let d: RegisterProductDto = dto(body)?;
            let name = f.text("name", d.name);
            let price = f.money("price", d.price);
            P(f.finish(|| {
                Some(PC::RegisterProduct {
                    name: name?,
                    price: price?,
                })
            })?)
        }
        "ChangePrice" => {
            let d: PriceDto = dto(body)?;
            let price = f.money("price", d.price);
            P(f.finish(|| Some(PC::ChangePrice { price: price? }))?)
        }
        "Restock" => {
            let d: QuantityDto = dto(body)?;
            let quantity = f.quantity("quantity", d.quantity);
            P(f.finish(|| {
                Some(PC::Restock {
                    quantity: quantity?,
                })
            })?)
        }
        "ReserveStock" => {
            let d: ReserveDto = dto(body)?;
            let order_id = f.take(OrderId::parse(d.order_id));
            let quantity = f.quantity("quantity", d.quantity);
            P(f.finish(|| {
                Some(PC::ReserveStock {
                    order_id: order_id?,
                    quantity: quantity?,
                })
            })?)
        }
        "ReleaseStock" => {
            let d: ReleaseDto = dto(body)?;
            let order_id = f.take(OrderId::parse(d.order_id));
            P(f.finish(|| {
                Some(PC::ReleaseStock {
                    order_id: order_id?,
                })
            })?)
        }
        "TakeReservedStock" | "ReturnTakenStock" => {
            let d: ReleaseDto = dto(body)?;
            let order_id = f.take(OrderId::parse(d.order_id));
            let take = spec.command_type == "TakeReservedStock";
            P(f.finish(|| {
                let order_id = order_id?;
                Some(if take {
                    PC::TakeReservedStock { order_id }
                } else {
                    PC::ReturnTakenStock { order_id }
                })
            })?)
        }
        "Discontinue" => {
            let _: EmptyDto = dto(body)?;
            P(PC::Discontinue)
        }
        "RegisterCustomer" => {
            let d: RegisterCustomerDto = dto(body)?;
            let email = f.take(Email::parse(d.email));
            let name = f.text("name", d.name);
            C(f.finish(|| {
                Some(CC::RegisterCustomer {
                    email: email?,
                    name: name?,
                })
            })?)
        }
        "ChangeEmail" => {
            let d: EmailDto = dto(body)?;
            let email = f.take(Email::parse(d.email));
            C(f.finish(|| Some(CC::ChangeEmail { email: email? }))?)
        }
        "PlaceOrder" => {
            let d: PlaceOrderDto = dto(body)?;
            let customer_id = f.take(CustomerId::parse(d.customer_id));
            let mut lines = Vec::with_capacity(d.lines.len());
            for (i, line) in d.lines.into_iter().enumerate() {
                let at = format!("lines[{i}]");
                let sku = f.take(Sku::parse(line.sku).map_err(|e| e.within(&at)));
                let quantity = f.quantity(&format!("{at}.quantity"), line.quantity);
                let unit_price = f.money(&format!("{at}.unit_price"), line.unit_price);
                if let (Some(sku), Some(quantity), Some(unit_price)) = (sku, quantity, unit_price) {
                    lines.push(OrderLine {
                        sku,
                        quantity,
                        unit_price,
                    });
                }
            }
            O(f.finish(|| {
                Some(OC::PlaceOrder {
                    customer_id: customer_id?,
                    lines,
                })
            })?)
        }
        "RecordPayment" => {
            let d: PayDto = dto(body)?;
            let amount = f.money("amount", d.amount);
            let payment_ref = f.text("payment_ref", d.payment_ref);
            O(f.finish(|| {
                Some(OC::RecordPayment {
                    amount: amount?,
                    payment_ref: payment_ref?,
                })
            })?)
        }
        "ShipOrder" => {
            let d: ShipDto = dto(body)?;
            let carrier = f.text("carrier", d.carrier);
            let tracking = f.text("tracking", d.tracking);
            O(f.finish(|| {
                Some(OC::ShipOrder {
                    carrier: carrier?,
                    tracking: tracking?,
                })
            })?)
        }
        "CancelOrder" | "CancelUnpaidOrder" => {
            let d: CancelDto = dto(body)?;
            let reason = f.text("reason", d.reason);
            let unpaid = spec.command_type == "CancelUnpaidOrder";
            O(f.finish(|| {
                let reason = reason?;
                Some(if unpaid {
                    OC::CancelUnpaidOrder { reason }
                } else {
                    OC::CancelOrder { reason }
                })
            })?)
        }
        "ConfirmReservation" => {
            let _: EmptyDto = dto(body)?;
            O(OC::ConfirmReservation)
        }
        "MarkReadyToShip" => {
            let _: EmptyDto = dto(body)?;
            O(OC::MarkReadyToShip)
        }
        other => {
            return Err(ApiError::NotFound {
                detail: format!("no command {other}"),
                rule: None,
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(collection: &str, name: &str) -> &'static CommandSpec {
        find(collection, name).unwrap()
    }

    fn invalid_fields(result: Result<ParsedCommand, ApiError>) -> Vec<String> {
        match result {
            Err(ApiError::Invalid(errors)) => errors.into_iter().map(|e| e.field).collect(),
            other => panic!("expected invalid fields, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_valid_order() {
        let body = json!({"customer_id": "c-1", "lines": [
            {"sku": "MUG-1", "quantity": 2, "unit_price": {"amount_minor": 1299, "currency": "EUR"}}]});
        assert!(matches!(
            parse(spec("orders", "place"), &body).unwrap(),
            ParsedCommand::Order(OrderCommand::PlaceOrder { .. })
        ));
    }

    #[test]
    fn numbers_without_a_fraction_are_integers() {
        let mut body: Value = serde_json::from_str(
            r#"{"quantity": 606233.0, "n": [1e3, -2.0, 2.5, 1.5e300], "deep": {"x": 7913775157.0}}"#,
        )
        .unwrap();
        integral_numbers(&mut body);
        assert_eq!(
            body,
            json!({"quantity": 606233, "n": [1000, -2, 2.5, 1.5e300], "deep": {"x": 7_913_775_157_u64}})
        );
        assert!(body["quantity"].is_u64() && body["n"][1].is_i64());
        let mut restock = json!({"quantity": 5.0});
        integral_numbers(&mut restock);
        let parsed = parse(spec("products", "restock"), &restock);
        assert!(matches!(
            parsed.unwrap(),
            ParsedCommand::Product(ProductCommand::Restock { .. })
        ));
    }

    #[test]
    fn names_every_invalid_field() {
        let body = json!({"customer_id": "c 1", "lines": [
            {"sku": "", "quantity": 0, "unit_price": {"amount_minor": -1, "currency": "eur"}}]});
        assert_eq!(
            invalid_fields(parse(spec("orders", "place"), &body)),
            [
                "customer_id",
                "lines[0].sku",
                "lines[0].quantity",
                "lines[0].unit_price.currency"
            ]
        );
        let body = json!({"name": " ", "price": {"amount_minor": -5, "currency": "EUR"}});
        assert_eq!(
            invalid_fields(parse(spec("products", "register"), &body)),
            ["name", "price.amount_minor"]
        );
    }

    #[test]
    fn shape_errors_name_the_field() {
        let body = json!({"customer_id": "c-1", "lines": [{"sku": "A", "quantity": "two", "unit_price": {"amount_minor": 1, "currency": "EUR"}}]});
        assert_eq!(
            invalid_fields(parse(spec("orders", "place"), &body)),
            ["lines[0].quantity"]
        );
        assert_eq!(
            invalid_fields(parse(
                spec("products", "restock"),
                &json!({"quantity": 1, "extra": 1})
            )),
            ["extra"]
        );
        assert_eq!(
            invalid_fields(parse(spec("products", "restock"), &json!({}))),
            ["quantity"]
        );
        assert_eq!(
            invalid_fields(parse(
                spec("products", "register"),
                &json!({"name": "x", "price": {"currency": "EUR"}})
            )),
            ["price.amount_minor"]
        );
        assert_eq!(
            invalid_fields(parse(spec("products", "restock"), &json!([1]))),
            [""]
        );
    }

    #[test]
    fn unknown_collections_and_commands_are_not_found() {
        assert!(matches!(
            find("widgets", "register"),
            Err(ApiError::NotFound { .. })
        ));
        assert!(matches!(
            find("orders", "teleport"),
            Err(ApiError::NotFound { .. })
        ));
    }
}
