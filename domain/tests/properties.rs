//! Properties of the shop domain, checked over random command sequences:
//! (a) folding any accepted history, as read back from its wire form, reproduces the state;
//! (b) no sequence of commands breaks an invariant.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use keel_domain::customer::{Customer, CustomerCommand};
use keel_domain::ids::{CustomerId, Email, OrderId, Quantity, Sku, Text};
use keel_domain::money::{Currency, Money};
use keel_domain::order::{Order, OrderCommand, OrderEvent, OrderLine, OrderStatus};
use keel_domain::product::{Product, ProductCommand, ProductEvent};
use keel_domain::{Aggregate, DomainEvent};
use proptest::prelude::*;

fn money() -> impl Strategy<Value = Money> {
    (0i64..6000, prop_oneof![9 => Just("EUR"), 1 => Just("USD")])
        .prop_map(|(n, c)| Money::new(n, Currency::parse(c).unwrap()).unwrap())
}
fn quantity(max: u64) -> impl Strategy<Value = Quantity> {
    (1..=max).prop_map(|n| Quantity::parse("quantity", n).unwrap())
}
fn text() -> impl Strategy<Value = Text> {
    "[a-z]{1,3}".prop_map(|s| Text::parse("text", s).unwrap())
}
fn order_id() -> impl Strategy<Value = OrderId> {
    (1..5u8).prop_map(|n| OrderId::parse(format!("o-{n}")).unwrap())
}

fn product_command() -> impl Strategy<Value = ProductCommand> {
    prop_oneof![
        2 => (text(), money()).prop_map(|(name, price)| ProductCommand::RegisterProduct { name, price }),
        2 => money().prop_map(|price| ProductCommand::ChangePrice { price }),
        4 => quantity(20).prop_map(|quantity| ProductCommand::Restock { quantity }),
        4 => (order_id(), quantity(15))
            .prop_map(|(order_id, quantity)| ProductCommand::ReserveStock { order_id, quantity }),
        3 => order_id().prop_map(|order_id| ProductCommand::ReleaseStock { order_id }),
        3 => order_id().prop_map(|order_id| ProductCommand::TakeReservedStock { order_id }),
        2 => order_id().prop_map(|order_id| ProductCommand::ReturnTakenStock { order_id }),
        1 => Just(ProductCommand::Discontinue),
    ]
}

fn customer_command() -> impl Strategy<Value = CustomerCommand> {
    let email = (0..3u8).prop_map(|n| Email::parse(format!("u{n}@example.com")).unwrap());
    prop_oneof![
        (email.clone(), text())
            .prop_map(|(email, name)| CustomerCommand::RegisterCustomer { email, name }),
        email.prop_map(|email| CustomerCommand::ChangeEmail { email }),
    ]
}

fn order_command() -> impl Strategy<Value = OrderCommand> {
    let line = (0..4u8, quantity(5), money()).prop_map(|(sku, quantity, unit_price)| OrderLine {
        sku: Sku::parse(format!("SKU-{sku}")).unwrap(),
        quantity,
        unit_price,
    });
    prop_oneof![
        2 => proptest::collection::vec(line, 0..4).prop_map(|lines| OrderCommand::PlaceOrder {
            customer_id: CustomerId::parse("c-1").unwrap(),
            lines,
        }),
        3 => (money(), (0..4u8).prop_map(|n| Text::parse("payment_ref", format!("p-{n}")).unwrap()))
            .prop_map(|(amount, payment_ref)| OrderCommand::RecordPayment { amount, payment_ref }),
        1 => (text(), text()).prop_map(|(carrier, tracking)| OrderCommand::ShipOrder { carrier, tracking }),
        1 => text().prop_map(|reason| OrderCommand::CancelOrder { reason }),
        2 => Just(OrderCommand::ConfirmReservation),
        2 => Just(OrderCommand::MarkReadyToShip),
        1 => text().prop_map(|reason| OrderCommand::CancelUnpaidOrder { reason }),
    ]
}

/// Runs `commands`, checking `invariant` after every accepted one, and returns the final
/// state with the accepted history.
fn run<A: Aggregate>(
    commands: &[A::Command],
    invariant: impl Fn(&A, &[A::Event]),
) -> (A, Vec<A::Event>) {
    let mut state = A::default();
    let mut history = Vec::new();
    for command in commands {
        if let Ok(events) = state.decide(command) {
            history.extend(events.iter().cloned());
            state = events.iter().fold(state, |s, e| s.evolve(e));
            invariant(&state, &history);
        }
    }
    (state, history)
}

/// Property (a): the history, written to JSON and read back, folds to the same state.
fn refold<A: Aggregate>(state: &A, history: &[A::Event]) {
    let read_back: Vec<A::Event> = history
        .iter()
        .map(|e| {
            let json = serde_json::to_string(e).unwrap();
            let back: A::Event = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, e);
            assert!(A::EVENT_TYPES.contains(&(e.event_type(), e.schema_version())));
            back
        })
        .collect();
    assert_eq!(&A::fold(&read_back), state);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn product_history_refolds_and_stock_never_goes_negative(
        commands in proptest::collection::vec(product_command(), 1..60)
    ) {
        let (state, history) = run::<Product>(&commands, |s, history| {
            if let Product::Registered(p) = s {
                assert!(p.reserved() <= p.on_hand, "reserved {} > on hand {}", p.reserved(), p.on_hand);
            }
            // An order's units leave the shelves at most once, and come back at most once,
            // only after they left.
            let mut taken = std::collections::BTreeMap::new();
            for e in history {
                match e {
                    ProductEvent::ReservedStockTaken { order_id, .. } => {
                        assert!(taken.insert(order_id.clone(), false).is_none(), "{order_id} taken twice");
                    }
                    ProductEvent::TakenStockReturned { order_id, .. } => {
                        assert_eq!(taken.insert(order_id.clone(), true), Some(false), "{order_id} returned twice or untaken");
                    }
                    _ => {}
                }
            }
        });
        refold(&state, &history);
    }

    #[test]
    fn customer_history_refolds(commands in proptest::collection::vec(customer_command(), 1..20)) {
        let (state, history) = run::<Customer>(&commands, |_, _| {});
        refold(&state, &history);
    }

    #[test]
    fn order_history_refolds_and_keeps_its_invariants(
        commands in proptest::collection::vec(order_command(), 1..40)
    ) {
        let (state, history) = run::<Order>(&commands, |s, history| {
            let Order::Placed(o) = s else { return };
            assert!(o.paid.amount_minor() <= o.total.amount_minor(), "paid more than the total");
            let shipped = history.iter().position(|e| matches!(e, OrderEvent::OrderShipped { .. }));
            let cancelled = history.iter().position(|e| matches!(e, OrderEvent::OrderCancelled { .. }));
            if let Some(at) = shipped {
                assert!(
                    history[..at].iter().any(|e| matches!(e, OrderEvent::OrderPaid { .. })),
                    "shipped an unpaid order"
                );
                assert!(
                    history[..at].iter().any(|e| matches!(e, OrderEvent::OrderReadyToShip {})),
                    "shipped an order its fulfilment did not mark ready"
                );
                assert!(cancelled.is_none(), "a shipped order was cancelled, or a cancelled one shipped");
                assert_eq!(o.status, OrderStatus::Shipped);
            }
            if matches!(o.status, OrderStatus::Paid | OrderStatus::Shipped) {
                assert_eq!(o.paid, o.total);
            }
            // Ready to ship once, and only once paid and its stock reserved.
            let ready: Vec<usize> = history.iter().enumerate()
                .filter(|(_, e)| matches!(e, OrderEvent::OrderReadyToShip {}))
                .map(|(i, _)| i)
                .collect();
            assert!(ready.len() <= 1, "ready to ship twice");
            if let Some(&at) = ready.first() {
                assert!(history[..at].iter().any(|e| matches!(e, OrderEvent::OrderPaid { .. })));
                assert!(history[..at].iter().any(|e| matches!(e, OrderEvent::OrderStockReserved {})));
                assert!(cancelled.is_none_or(|c| c > at), "a cancelled order became ready to ship");
            }
        });
        refold(&state, &history);
    }
}
