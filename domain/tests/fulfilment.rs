//! The fulfilment process against the real aggregates, under any interleaving: commands
//! delivered late, twice (a crash between sending and saving), payments, a customer's
//! cancellation and the deadline at any moment. Once nothing is left to send, the stock
//! adds up: a cancelled order holds and took nothing, a ready one took exactly its lines,
//! one awaiting payment holds exactly its lines, and reserved never exceeds on hand.

#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

use std::collections::{BTreeMap, VecDeque};

use keel_domain::fulfilment::{Dispatch, Process, Step};
use keel_domain::ids::{CustomerId, OrderId, Quantity, Sku, Text};
use keel_domain::money::{Currency, Money};
use keel_domain::order::{Fulfilment, Order, OrderCommand, OrderEvent, OrderLine, OrderStatus};
use keel_domain::product::{Product, ProductCommand};
use keel_domain::{Aggregate, DomainError};
use proptest::prelude::*;

/// What happens next.
#[derive(Clone, Debug)]
enum Move {
    /// The oldest command waiting is delivered (and, if `twice`, delivered again).
    Deliver { twice: bool },
    /// The customer pays in full.
    Pay,
    /// The customer cancels.
    Cancel,
    /// The clock passes the deadline and the process scans.
    Deadline,
}

fn moves() -> impl Strategy<Value = Vec<Move>> {
    proptest::collection::vec(
        prop_oneof![
            6 => any::<bool>().prop_map(|twice| Move::Deliver { twice }),
            1 => Just(Move::Pay),
            1 => Just(Move::Cancel),
            1 => Just(Move::Deadline),
        ],
        0..40,
    )
}

fn eur(n: i64) -> Money {
    Money::new(n, Currency::parse("EUR").unwrap()).unwrap()
}

struct World {
    products: BTreeMap<Sku, Product>,
    order: Order,
    process: Process,
    queue: VecDeque<Dispatch>,
    now: i64,
    event_ids: u64,
}

impl World {
    fn event_id(&mut self) -> String {
        self.event_ids += 1;
        format!("e-{}", self.event_ids)
    }

    /// `command` on the order; its events fed to the process as the log would.
    fn order_command(&mut self, command: &OrderCommand) -> Result<(), DomainError> {
        let events = self.order.decide(command)?;
        for e in &events {
            self.order = self.order.clone().evolve(e);
            let id = self.event_id();
            let sends = match e {
                OrderEvent::OrderPaid { .. } => self.process.paid(&id),
                OrderEvent::OrderCancelled { .. } => self.process.cancelled(&id),
                _ => vec![],
            };
            self.queue.extend(sends);
        }
        Ok(())
    }

    fn deliver(&mut self, dispatch: &Dispatch) {
        match dispatch {
            Dispatch::Product { sku, command, .. } => {
                let product = self.products.get(sku).unwrap().clone();
                let answer = product.decide(command);
                if let Ok(events) = &answer {
                    let product = events.iter().fold(product, |p, e| p.evolve(e));
                    self.products.insert(sku.clone(), product);
                }
                let sends = match (command, answer) {
                    (ProductCommand::ReserveStock { .. }, a) => self
                        .process
                        .reserve_answered(sku, a.map(drop).map_err(|e| e.to_string())),
                    (ProductCommand::TakeReservedStock { .. }, Ok(_)) => self.process.taken(sku),
                    _ => vec![],
                };
                self.queue.extend(sends);
            }
            Dispatch::Order { command, .. } => {
                let answer = self.order_command(command);
                match (command, answer) {
                    (OrderCommand::ConfirmReservation, Ok(())) => {
                        let sends = self.process.confirmed();
                        self.queue.extend(sends);
                    }
                    (OrderCommand::MarkReadyToShip, Ok(())) => self.process.ready(),
                    _ => {}
                }
            }
        }
    }
}

fn held(product: &Product, order: &OrderId) -> (u64, u64, u64) {
    let Product::Registered(p) = product else {
        panic!("registered")
    };
    let reserved = p.reservations.get(order).copied().unwrap_or(0);
    assert!(p.reserved() <= p.on_hand, "reserved above on hand");
    (p.on_hand, reserved, p.reserved())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn stock_adds_up_under_any_interleaving(
        stock in proptest::collection::vec(0..4u64, 3),
        wanted in proptest::collection::vec(1..3u64, 3),
        moves in moves(),
    ) {
        let order_id = OrderId::parse("o-1").unwrap();
        let skus: Vec<Sku> = ["A", "B", "C"].iter().map(|s| Sku::parse(*s).unwrap()).collect();
        let mut products = BTreeMap::new();
        for (sku, on_hand) in skus.iter().zip(&stock) {
            let mut p = Product::default();
            for c in [
                ProductCommand::RegisterProduct { name: Text::parse("name", "x").unwrap(), price: eur(100) },
                ProductCommand::Restock { quantity: Quantity::parse("q", on_hand + 1).unwrap() },
            ] {
                p = p.decide(&c).unwrap().iter().fold(p, |p, e| p.evolve(e));
            }
            // Another order holds one unit, so some lines cannot be reserved.
            let other = ProductCommand::ReserveStock {
                order_id: OrderId::parse("other").unwrap(),
                quantity: Quantity::parse("q", 1).unwrap(),
            };
            p = p.decide(&other).unwrap().iter().fold(p, |p, e| p.evolve(e));
            products.insert(sku.clone(), p);
        }
        let lines: Vec<OrderLine> = skus.iter().zip(&wanted).map(|(sku, q)| OrderLine {
            sku: sku.clone(),
            quantity: Quantity::parse("q", *q).unwrap(),
            unit_price: eur(100),
        }).collect();
        let total = eur(100 * wanted.iter().sum::<u64>() as i64);
        let place = OrderCommand::PlaceOrder { customer_id: CustomerId::parse("c").unwrap(), lines: lines.clone() };
        let order = Order::default();
        let order = order.decide(&place).unwrap().iter().fold(order, |o, e| o.evolve(e));
        let (process, sends) = Process::placed(order_id.clone(), "e-placed", &lines, 1_000);
        let mut world = World { products, order, process, queue: sends.into(), now: 0, event_ids: 0 };
        let before: BTreeMap<Sku, (u64, u64, u64)> =
            world.products.iter().map(|(s, p)| (s.clone(), held(p, &order_id))).collect();

        for m in moves.into_iter().chain(std::iter::repeat_n(Move::Deliver { twice: false }, 200)) {
            match m {
                Move::Deliver { twice } => {
                    let Some(next) = world.queue.pop_front() else { continue };
                    world.deliver(&next);
                    if twice {
                        world.deliver(&next);
                    }
                }
                Move::Pay => {
                    let _ = world.order_command(&OrderCommand::RecordPayment {
                        amount: total, payment_ref: Text::parse("r", "pay").unwrap(),
                    });
                }
                Move::Cancel => {
                    let _ = world.order_command(&OrderCommand::CancelOrder {
                        reason: Text::parse("r", "changed my mind").unwrap(),
                    });
                }
                Move::Deadline => {
                    world.now = 1_000;
                    let sends = world.process.due(world.now);
                    world.queue.extend(sends);
                }
            }
            for p in world.products.values() {
                held(p, &order_id);
            }
        }
        prop_assert!(world.queue.is_empty());

        let Order::Placed(o) = &world.order else { panic!("placed") };
        for (sku, line) in skus.iter().zip(&lines) {
            let (on_hand, reserved, all) = held(&world.products[sku], &order_id);
            let (on_hand0, _, all0) = before[sku];
            let q = line.quantity.get();
            match (o.status, o.fulfilment) {
                (OrderStatus::Cancelled, _) => {
                    prop_assert_eq!((on_hand, reserved, all), (on_hand0, 0, all0), "cancelled: {:?}", sku);
                }
                (OrderStatus::Paid, Fulfilment::ReadyToShip) => {
                    prop_assert_eq!((on_hand, reserved, all), (on_hand0 - q, 0, all0), "ready: {:?}", sku);
                }
                (status, fulfilment) => {
                    prop_assert_eq!(world.process.step, Step::AwaitingPayment, "{:?} {:?}", status, fulfilment);
                    prop_assert_eq!((status, fulfilment), (OrderStatus::Placed, Fulfilment::Reserved));
                    prop_assert_eq!((on_hand, reserved, all), (on_hand0, q, all0 + q), "awaiting: {:?}", sku);
                }
            }
        }
        // A paid order is never cancelled by the deadline: only by its customer, or for
        // a line it could not reserve.
        if o.status == OrderStatus::Cancelled && o.paid == o.total {
            prop_assert!(world.process.cancelled_event.is_some());
        }
    }
}
