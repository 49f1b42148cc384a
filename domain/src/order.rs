//! The order aggregate: lines and totals, payments, shipping and cancellation.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{CustomerId, Quantity, Sku, Text};
use crate::money::Money;
use crate::{Aggregate, DomainError, DomainEvent, ValidationError};

/// Most lines one order may hold.
pub const MAX_LINES: usize = 100;
/// Most units one line may hold.
pub const MAX_LINE_QUANTITY: u64 = 1000;

/// One line of an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The product.
    pub sku: Sku,
    /// Units, from 1 to [`MAX_LINE_QUANTITY`].
    pub quantity: Quantity,
    /// Price of one unit, greater than zero.
    pub unit_price: Money,
}

/// Commands an order accepts.
#[derive(Clone, Debug, PartialEq)]
pub enum OrderCommand {
    /// Places a new order; its total is computed from the lines.
    PlaceOrder {
        /// The customer who orders.
        customer_id: CustomerId,
        /// From 1 to [`MAX_LINES`] lines, one per SKU, all in one currency.
        lines: Vec<OrderLine>,
    },
    /// Records a payment towards the total; the order is paid when it reaches the total.
    RecordPayment {
        /// Amount paid, greater than zero, in the order's currency.
        amount: Money,
        /// The payment provider's reference, unique per order.
        payment_ref: Text,
    },
    /// Ships a paid order.
    ShipOrder {
        /// Who carries it.
        carrier: Text,
        /// The carrier's tracking number.
        tracking: Text,
    },
    /// Cancels an order that has not shipped; what was paid is refunded.
    CancelOrder {
        /// Why.
        reason: Text,
    },
    /// Records that every line's stock is reserved for the order (the fulfilment process
    /// sends it). Confirming again changes nothing.
    ConfirmReservation,
    /// Records that a paid order's reserved stock left the shelves for packing. Marking
    /// again changes nothing.
    MarkReadyToShip,
    /// Cancels an order that is not fully paid (a payment deadline passed, or its stock
    /// could not be reserved): refused once it is paid, so a process lagging behind a
    /// payment cannot cancel a paid order. What was paid of it is refunded; an order
    /// already cancelled counts as done.
    CancelUnpaidOrder {
        /// Why.
        reason: Text,
    },
}

/// Events of an order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum OrderEvent {
    /// An order was placed (schema v2: money carries its currency).
    OrderPlaced {
        /// The customer.
        customer_id: CustomerId,
        /// The lines.
        lines: Vec<OrderLine>,
        /// Sum of quantity × unit price over the lines.
        total: Money,
    },
    /// A payment was recorded.
    PaymentRecorded {
        /// Amount paid.
        amount: Money,
        /// The payment provider's reference.
        payment_ref: Text,
    },
    /// The payments reached the total.
    OrderPaid {
        /// The total paid.
        total: Money,
    },
    /// The order shipped.
    OrderShipped {
        /// Who carries it.
        carrier: Text,
        /// Tracking number.
        tracking: Text,
    },
    /// The order was cancelled.
    OrderCancelled {
        /// Why.
        reason: Text,
    },
    /// What had been paid for a cancelled order was refunded.
    RefundIssued {
        /// Amount refunded.
        amount: Money,
    },
    /// Every line's stock is reserved for the order.
    OrderStockReserved {},
    /// The paid order's reserved stock was taken out for packing: it may ship.
    OrderReadyToShip {},
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::OrderPlaced { .. } => "OrderPlaced",
            Self::PaymentRecorded { .. } => "PaymentRecorded",
            Self::OrderPaid { .. } => "OrderPaid",
            Self::OrderShipped { .. } => "OrderShipped",
            Self::OrderCancelled { .. } => "OrderCancelled",
            Self::RefundIssued { .. } => "RefundIssued",
            Self::OrderStockReserved {} => "OrderStockReserved",
            Self::OrderReadyToShip {} => "OrderReadyToShip",
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            Self::OrderPlaced { .. } => 2,
            _ => 1,
        }
    }
}

/// Where an order is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Placed, not yet fully paid.
    Placed,
    /// Fully paid, not yet shipped.
    Paid,
    /// Shipped.
    Shipped,
    /// Cancelled.
    Cancelled,
}

impl OrderStatus {
    /// Every status, in the order an order moves through them.
    pub const ALL: [OrderStatus; 4] = [Self::Placed, Self::Paid, Self::Shipped, Self::Cancelled];

    /// The status as its wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::Paid => "paid",
            Self::Shipped => "shipped",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Where an order's stock is, as the fulfilment process moves it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fulfilment {
    /// Not every line's stock is reserved (every order placed before the process ran
    /// stays here).
    #[default]
    Reserving,
    /// Every line's stock is reserved.
    Reserved,
    /// Paid, and the reserved stock taken out for packing.
    ReadyToShip,
}

impl Fulfilment {
    /// The step as its wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserving => "reserving",
            Self::Reserved => "reserved",
            Self::ReadyToShip => "ready_to_ship",
        }
    }
}

/// A placed order's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    /// The customer.
    pub customer_id: CustomerId,
    /// The lines.
    pub lines: Vec<OrderLine>,
    /// The total.
    pub total: Money,
    /// Sum of payments recorded.
    pub paid: Money,
    /// Sum refunded.
    pub refunded: Money,
    /// References of the payments recorded.
    pub payment_refs: BTreeSet<String>,
    /// Where the order is.
    pub status: OrderStatus,
    /// Where its stock is.
    #[serde(default)]
    pub fulfilment: Fulfilment,
}

/// An order: not yet placed, or placed with its state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Order {
    /// No order with this id exists.
    #[default]
    Unplaced,
    /// The order exists.
    Placed(OrderState),
}

fn validate_lines(lines: &[OrderLine]) -> Result<Money, ValidationError> {
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(ValidationError::new(
            "lines",
            format!("must hold 1 to {MAX_LINES} lines"),
        ));
    }
    let currency = lines[0].unit_price.currency();
    let mut total = Money::zero(currency);
    let mut seen = BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        let at = |field: &str| format!("lines[{i}].{field}");
        if !seen.insert(&line.sku) {
            return Err(ValidationError::new(
                at("sku"),
                "appears on more than one line",
            ));
        }
        if line.quantity.get() > MAX_LINE_QUANTITY {
            return Err(ValidationError::new(
                at("quantity"),
                format!("must be between 1 and {MAX_LINE_QUANTITY}"),
            ));
        }
        if !line.unit_price.is_positive() {
            return Err(ValidationError::new(
                at("unit_price.amount_minor"),
                "must be greater than zero",
            ));
        }
        if line.unit_price.currency() != currency {
            return Err(ValidationError::new(
                at("unit_price.currency"),
                format!("every line must be in the same currency ({currency})"),
            ));
        }
        total = line
            .unit_price
            .checked_mul(line.quantity.get())
            .and_then(|amount| total.checked_add(amount))
            .ok_or_else(|| ValidationError::new("lines", "the order total is too large"))?;
    }
    Ok(total)
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    const EVENT_TYPES: &'static [(&'static str, u32)] = &[
        ("OrderPlaced", 2),
        ("PaymentRecorded", 1),
        ("OrderPaid", 1),
        ("OrderShipped", 1),
        ("OrderCancelled", 1),
        ("RefundIssued", 1),
        ("OrderStockReserved", 1),
        ("OrderReadyToShip", 1),
    ];
    type Command = OrderCommand;
    type Event = OrderEvent;

    fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, DomainError> {
        use OrderCommand as C;
        use OrderEvent as E;
        let state = match (self, command) {
            (Order::Unplaced, C::PlaceOrder { customer_id, lines }) => {
                let total = validate_lines(lines)?;
                return Ok(vec![E::OrderPlaced {
                    customer_id: customer_id.clone(),
                    lines: lines.clone(),
                    total,
                }]);
            }
            (Order::Placed(_), C::PlaceOrder { .. }) => {
                return Err(DomainError::OrderAlreadyPlaced);
            }
            (Order::Unplaced, _) => return Err(DomainError::OrderNotPlaced),
            (Order::Placed(state), _) => state,
        };
        match command {
            C::PlaceOrder { .. } => Err(DomainError::OrderAlreadyPlaced),
            C::RecordPayment {
                amount,
                payment_ref,
            } => {
                if state.status == OrderStatus::Cancelled {
                    return Err(DomainError::OrderCancelled);
                }
                if !amount.is_positive() {
                    return Err(ValidationError::new(
                        "amount.amount_minor",
                        "must be greater than zero",
                    )
                    .into());
                }
                if amount.currency() != state.total.currency() {
                    return Err(DomainError::CurrencyMismatch {
                        expected: state.total.currency(),
                        actual: amount.currency(),
                    });
                }
                if state.payment_refs.contains(payment_ref.as_str()) {
                    return Err(DomainError::PaymentAlreadyRecorded {
                        payment_ref: payment_ref.to_string(),
                    });
                }
                let outstanding = state
                    .total
                    .checked_sub(state.paid)
                    .unwrap_or(Money::zero(state.total.currency()));
                if amount.amount_minor() > outstanding.amount_minor() {
                    return Err(DomainError::Overpayment {
                        outstanding_minor: outstanding.amount_minor(),
                        attempted_minor: amount.amount_minor(),
                    });
                }
                let mut events = vec![E::PaymentRecorded {
                    amount: *amount,
                    payment_ref: payment_ref.clone(),
                }];
                if amount.amount_minor() == outstanding.amount_minor() {
                    events.push(E::OrderPaid { total: state.total });
                }
                Ok(events)
            }
            C::ShipOrder { carrier, tracking } => match state.status {
                OrderStatus::Paid if state.fulfilment == Fulfilment::ReadyToShip => {
                    Ok(vec![E::OrderShipped {
                        carrier: carrier.clone(),
                        tracking: tracking.clone(),
                    }])
                }
                OrderStatus::Paid => Err(DomainError::OrderNotReadyToShip),
                OrderStatus::Placed => Err(DomainError::OrderNotPaid),
                OrderStatus::Shipped => Err(DomainError::OrderAlreadyShipped),
                OrderStatus::Cancelled => Err(DomainError::OrderCancelled),
            },
            C::CancelOrder { reason } => match state.status {
                OrderStatus::Shipped => Err(DomainError::OrderAlreadyShipped),
                OrderStatus::Cancelled => Err(DomainError::OrderCancelled),
                OrderStatus::Placed | OrderStatus::Paid => {
                    let mut events = vec![E::OrderCancelled {
                        reason: reason.clone(),
                    }];
                    if state.paid.is_positive() {
                        events.push(E::RefundIssued { amount: state.paid });
                    }
                    Ok(events)
                }
            },
            C::ConfirmReservation => match (state.status, state.fulfilment) {
                (OrderStatus::Cancelled, _) => Err(DomainError::OrderCancelled),
                (_, Fulfilment::Reserving) if state.status != OrderStatus::Shipped => {
                    Ok(vec![E::OrderStockReserved {}])
                }
                _ => Ok(vec![]),
            },
            C::MarkReadyToShip => match (state.status, state.fulfilment) {
                (OrderStatus::Cancelled, _) => Err(DomainError::OrderCancelled),
                (OrderStatus::Shipped, _) | (_, Fulfilment::ReadyToShip) => Ok(vec![]),
                (OrderStatus::Placed, _) => Err(DomainError::OrderNotPaid),
                (OrderStatus::Paid, Fulfilment::Reserving) => Err(DomainError::StockNotReserved),
                (OrderStatus::Paid, Fulfilment::Reserved) => Ok(vec![E::OrderReadyToShip {}]),
            },
            C::CancelUnpaidOrder { reason } => match state.status {
                OrderStatus::Cancelled => Ok(vec![]),
                OrderStatus::Paid | OrderStatus::Shipped => Err(DomainError::OrderAlreadyPaid),
                OrderStatus::Placed => {
                    let mut events = vec![E::OrderCancelled {
                        reason: reason.clone(),
                    }];
                    if state.paid.is_positive() {
                        events.push(E::RefundIssued { amount: state.paid });
                    }
                    Ok(events)
                }
            },
        }
    }

    fn evolve(self, event: &OrderEvent) -> Self {
        use OrderEvent as E;
        match (self, event) {
            (
                _,
                E::OrderPlaced {
                    customer_id,
                    lines,
                    total,
                },
            ) => Order::Placed(OrderState {
                customer_id: customer_id.clone(),
                lines: lines.clone(),
                total: *total,
                paid: Money::zero(total.currency()),
                refunded: Money::zero(total.currency()),
                payment_refs: BTreeSet::new(),
                status: OrderStatus::Placed,
                fulfilment: Fulfilment::Reserving,
            }),
            (Order::Unplaced, _) => Order::Unplaced,
            (Order::Placed(mut s), event) => {
                match event {
                    E::OrderPlaced { .. } => {}
                    E::PaymentRecorded {
                        amount,
                        payment_ref,
                    } => {
                        s.paid = s.paid.checked_add(*amount).unwrap_or(s.paid);
                        s.payment_refs.insert(payment_ref.to_string());
                    }
                    E::OrderPaid { .. } => s.status = OrderStatus::Paid,
                    E::OrderShipped { .. } => s.status = OrderStatus::Shipped,
                    E::OrderCancelled { .. } => s.status = OrderStatus::Cancelled,
                    E::RefundIssued { amount } => {
                        s.refunded = s.refunded.checked_add(*amount).unwrap_or(s.refunded);
                    }
                    E::OrderStockReserved {} => s.fulfilment = Fulfilment::Reserved,
                    E::OrderReadyToShip {} => s.fulfilment = Fulfilment::ReadyToShip,
                }
                Order::Placed(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use crate::testing::given;

    use OrderCommand as C;
    use OrderEvent as E;

    fn eur(n: i64) -> Money {
        Money::new(n, Currency::parse("EUR").unwrap()).unwrap()
    }
    fn usd(n: i64) -> Money {
        Money::new(n, Currency::parse("USD").unwrap()).unwrap()
    }
    fn text(s: &str) -> Text {
        Text::parse("t", s).unwrap()
    }
    fn line(sku: &str, quantity: u64, unit_price: Money) -> OrderLine {
        OrderLine {
            sku: Sku::parse(sku).unwrap(),
            quantity: Quantity::parse("quantity", quantity).unwrap(),
            unit_price,
        }
    }
    fn customer() -> CustomerId {
        CustomerId::parse("c-1").unwrap()
    }
    fn placed() -> E {
        E::OrderPlaced {
            customer_id: customer(),
            lines: vec![line("MUG-1", 2, eur(1299)), line("TEE-1", 1, eur(2000))],
            total: eur(4598),
        }
    }
    fn pay(amount: Money, r: &str) -> C {
        C::RecordPayment {
            amount,
            payment_ref: text(r),
        }
    }
    fn paid() -> Vec<E> {
        vec![
            placed(),
            E::PaymentRecorded {
                amount: eur(4598),
                payment_ref: text("p-1"),
            },
            E::OrderPaid { total: eur(4598) },
        ]
    }
    fn ship() -> C {
        C::ShipOrder {
            carrier: text("DHL"),
            tracking: text("JD01"),
        }
    }
    fn cancel() -> C {
        C::CancelOrder {
            reason: text("changed my mind"),
        }
    }

    #[test]
    fn place_computes_the_total() {
        given::<Order>([])
            .when(C::PlaceOrder {
                customer_id: customer(),
                lines: vec![line("MUG-1", 2, eur(1299)), line("TEE-1", 1, eur(2000))],
            })
            .then([placed()]);
    }

    #[test]
    fn place_twice_is_refused() {
        given::<Order>([placed()])
            .when(C::PlaceOrder {
                customer_id: customer(),
                lines: vec![line("MUG-1", 1, eur(1))],
            })
            .then_err(DomainError::OrderAlreadyPlaced);
    }

    #[test]
    fn place_validates_every_line() {
        let cases = [
            (vec![], "lines"),
            (vec![line("A", 1, eur(1)); 101], "lines"),
            (vec![line("A", 1001, eur(1))], "lines[0].quantity"),
            (
                vec![line("A", 1, eur(1)), line("B", 1, eur(0))],
                "lines[1].unit_price.amount_minor",
            ),
            (
                vec![line("A", 1, eur(1)), line("B", 1, usd(1))],
                "lines[1].unit_price.currency",
            ),
            (
                vec![line("A", 1, eur(1)), line("A", 2, eur(1))],
                "lines[1].sku",
            ),
        ];
        for (lines, field) in cases {
            let err = given::<Order>([])
                .when(C::PlaceOrder {
                    customer_id: customer(),
                    lines,
                })
                .error();
            match err {
                DomainError::Invalid(v) => assert_eq!(v.field, field),
                other => panic!("expected a validation error on {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn partial_payment_is_recorded_without_paying_the_order() {
        given::<Order>([placed()])
            .when(pay(eur(1000), "p-1"))
            .then([E::PaymentRecorded {
                amount: eur(1000),
                payment_ref: text("p-1"),
            }]);
    }

    #[test]
    fn the_payment_that_reaches_the_total_pays_the_order() {
        let state = given::<Order>([
            placed(),
            E::PaymentRecorded {
                amount: eur(1000),
                payment_ref: text("p-1"),
            },
        ])
        .when(pay(eur(3598), "p-2"))
        .then([
            E::PaymentRecorded {
                amount: eur(3598),
                payment_ref: text("p-2"),
            },
            E::OrderPaid { total: eur(4598) },
        ]);
        let Order::Placed(s) = state else {
            panic!("not placed")
        };
        assert_eq!(s.status, OrderStatus::Paid);
        assert_eq!(s.paid, eur(4598));
    }

    #[test]
    fn overpayment_is_refused() {
        given::<Order>([placed()])
            .when(pay(eur(4599), "p-1"))
            .then_err(DomainError::Overpayment {
                outstanding_minor: 4598,
                attempted_minor: 4599,
            });
        given::<Order>(paid())
            .when(pay(eur(1), "p-2"))
            .then_err(DomainError::Overpayment {
                outstanding_minor: 0,
                attempted_minor: 1,
            });
    }

    #[test]
    fn payment_rules() {
        given::<Order>([placed()])
            .when(pay(usd(10), "p-1"))
            .then_err(DomainError::CurrencyMismatch {
                expected: Currency::parse("EUR").unwrap(),
                actual: Currency::parse("USD").unwrap(),
            });
        given::<Order>([
            placed(),
            E::PaymentRecorded {
                amount: eur(1),
                payment_ref: text("p-1"),
            },
        ])
        .when(pay(eur(1), "p-1"))
        .then_err(DomainError::PaymentAlreadyRecorded {
            payment_ref: "p-1".into(),
        });
        assert_eq!(
            given::<Order>([placed()])
                .when(pay(eur(0), "p-1"))
                .error()
                .rule(),
            "invalid_input"
        );
        given::<Order>([])
            .when(pay(eur(1), "p-1"))
            .then_err(DomainError::OrderNotPlaced);
        given::<Order>([placed(), E::OrderCancelled { reason: text("x") }])
            .when(pay(eur(1), "p-1"))
            .then_err(DomainError::OrderCancelled);
    }

    /// Paid, its stock reserved and taken out: ready to ship.
    fn ready() -> Vec<E> {
        let mut ready = paid();
        ready.extend([E::OrderStockReserved {}, E::OrderReadyToShip {}]);
        ready
    }

    #[test]
    fn ship_only_when_paid_and_ready() {
        given::<Order>([placed()])
            .when(ship())
            .then_err(DomainError::OrderNotPaid);
        // Paid, but the fulfilment process has not taken its stock out yet.
        given::<Order>(paid())
            .when(ship())
            .then_err(DomainError::OrderNotReadyToShip);
        let mut reserved = paid();
        reserved.push(E::OrderStockReserved {});
        given::<Order>(reserved)
            .when(ship())
            .then_err(DomainError::OrderNotReadyToShip);
        given::<Order>(ready()).when(ship()).then([E::OrderShipped {
            carrier: text("DHL"),
            tracking: text("JD01"),
        }]);
    }

    #[test]
    fn ship_twice_or_after_cancel_is_refused() {
        let mut shipped = ready();
        shipped.push(E::OrderShipped {
            carrier: text("DHL"),
            tracking: text("JD01"),
        });
        given::<Order>(shipped)
            .when(ship())
            .then_err(DomainError::OrderAlreadyShipped);
        given::<Order>([placed(), E::OrderCancelled { reason: text("x") }])
            .when(ship())
            .then_err(DomainError::OrderCancelled);
    }

    #[test]
    fn cancel_an_unpaid_order() {
        given::<Order>([placed()])
            .when(cancel())
            .then([E::OrderCancelled {
                reason: text("changed my mind"),
            }]);
    }

    #[test]
    fn cancel_after_payment_refunds_what_was_paid() {
        given::<Order>([
            placed(),
            E::PaymentRecorded {
                amount: eur(1000),
                payment_ref: text("p-1"),
            },
        ])
        .when(cancel())
        .then([
            E::OrderCancelled {
                reason: text("changed my mind"),
            },
            E::RefundIssued { amount: eur(1000) },
        ]);
        given::<Order>(paid()).when(cancel()).then([
            E::OrderCancelled {
                reason: text("changed my mind"),
            },
            E::RefundIssued { amount: eur(4598) },
        ]);
    }

    #[test]
    fn cancel_after_shipping_or_twice_is_refused() {
        let mut shipped = paid();
        shipped.push(E::OrderShipped {
            carrier: text("DHL"),
            tracking: text("JD01"),
        });
        given::<Order>(shipped)
            .when(cancel())
            .then_err(DomainError::OrderAlreadyShipped);
        given::<Order>([placed(), E::OrderCancelled { reason: text("x") }])
            .when(cancel())
            .then_err(DomainError::OrderCancelled);
        given::<Order>([])
            .when(cancel())
            .then_err(DomainError::OrderNotPlaced);
    }

    fn reserved() -> E {
        E::OrderStockReserved {}
    }

    fn step(order: &Order) -> (OrderStatus, Fulfilment) {
        match order {
            Order::Placed(s) => (s.status, s.fulfilment),
            Order::Unplaced => panic!("placed"),
        }
    }

    #[test]
    fn reserved_then_paid_becomes_ready_to_ship_once() {
        let order = given::<Order>([placed()])
            .when(C::ConfirmReservation)
            .then([reserved()]);
        assert_eq!(step(&order), (OrderStatus::Placed, Fulfilment::Reserved));
        given::<Order>([placed(), reserved()])
            .when(C::ConfirmReservation)
            .then([]);
        given::<Order>([placed(), reserved()])
            .when(C::MarkReadyToShip)
            .then_err(DomainError::OrderNotPaid);
        let mut history = paid();
        history.insert(1, reserved());
        let order = given::<Order>(history.clone())
            .when(C::MarkReadyToShip)
            .then([E::OrderReadyToShip {}]);
        assert_eq!(step(&order), (OrderStatus::Paid, Fulfilment::ReadyToShip));
        history.push(E::OrderReadyToShip {});
        given::<Order>(history.clone())
            .when(C::MarkReadyToShip)
            .then([]);
        given::<Order>(history).when(C::ConfirmReservation).then([]);
    }

    /// A payment that arrives before every line is reserved: the order is paid, and
    /// ready to ship only once its stock is reserved.
    #[test]
    fn paid_before_reserved_waits_for_the_reservation() {
        given::<Order>(paid())
            .when(C::MarkReadyToShip)
            .then_err(DomainError::StockNotReserved);
        let order = given::<Order>(paid())
            .when(C::ConfirmReservation)
            .then([reserved()]);
        assert_eq!(step(&order), (OrderStatus::Paid, Fulfilment::Reserved));
        let mut history = paid();
        history.push(reserved());
        given::<Order>(history)
            .when(C::MarkReadyToShip)
            .then([E::OrderReadyToShip {}]);
    }

    fn deadline() -> C {
        C::CancelUnpaidOrder {
            reason: text("not paid within 30 minutes"),
        }
    }

    /// The process cancels an unpaid order (refunding what was paid of it), never a paid
    /// one, and an order already cancelled counts as done.
    #[test]
    fn only_an_unpaid_order_is_cancelled_by_the_process() {
        given::<Order>([placed(), reserved()])
            .when(deadline())
            .then([E::OrderCancelled {
                reason: text("not paid within 30 minutes"),
            }]);
        given::<Order>([
            placed(),
            E::PaymentRecorded {
                amount: eur(1000),
                payment_ref: text("p-1"),
            },
        ])
        .when(deadline())
        .then([
            E::OrderCancelled {
                reason: text("not paid within 30 minutes"),
            },
            E::RefundIssued { amount: eur(1000) },
        ]);
        given::<Order>(paid())
            .when(deadline())
            .then_err(DomainError::OrderAlreadyPaid);
        given::<Order>([placed(), E::OrderCancelled { reason: text("x") }])
            .when(deadline())
            .then([]);
        given::<Order>([placed(), E::OrderCancelled { reason: text("x") }])
            .when(C::ConfirmReservation)
            .then_err(DomainError::OrderCancelled);
        given::<Order>([])
            .when(deadline())
            .then_err(DomainError::OrderNotPlaced);
    }

    /// A customer may still cancel an order whose stock was taken out: it is refunded in
    /// full (the process returns the stock to the shelves).
    #[test]
    fn a_customer_cancels_an_order_ready_to_ship() {
        let mut history = paid();
        history.push(reserved());
        history.push(E::OrderReadyToShip {});
        given::<Order>(history).when(cancel()).then([
            E::OrderCancelled {
                reason: text("changed my mind"),
            },
            E::RefundIssued { amount: eur(4598) },
        ]);
    }

    #[test]
    fn a_snapshot_from_before_fulfilment_reads_back_as_reserving() {
        let now = Order::fold(&[placed()]);
        let mut old = serde_json::to_value(&now).unwrap();
        assert!(old.as_object_mut().unwrap().remove("fulfilment").is_some());
        let order: Order = serde_json::from_value(old).unwrap();
        assert_eq!(order, now);
        assert_eq!(step(&order), (OrderStatus::Placed, Fulfilment::Reserving));
    }
}
