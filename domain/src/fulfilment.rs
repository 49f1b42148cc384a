//! Order fulfilment as a process manager: what to send, and when, for one order. Pure like
//! the aggregates: the process that runs it reads the log, feeds this the events and the
//! answers to the commands it sent, keeps the state, and sends what this returns.
//!
//! The order's life: on `OrderPlaced` each line's stock is reserved (all at once); when
//! every line is reserved the order's reservation is confirmed and it awaits payment; if a
//! line cannot be reserved the order is cancelled with a reason naming the line. On payment
//! (before or after the reservation) the reserved stock is taken out of stock on hand, and
//! then the order is marked ready to ship. A payment deadline cancels an order not fully
//! paid by then, with a command the order refuses once paid, so a payment the log holds
//! before the cancellation wins. Any cancellation releases what is reserved and returns
//! what was taken.
//!
//! Every command carries an idempotency key made of the event that caused it and what it
//! does, so sending it again after a crash is a replay; each is also idempotent in the
//! domain, so it stays so after the keys expire.

use serde::{Deserialize, Serialize};

use crate::ids::{OrderId, Quantity, Sku, Text};
use crate::order::{OrderCommand, OrderLine};
use crate::product::ProductCommand;

/// A command to send: to which stream, and with which idempotency key.
#[derive(Clone, Debug, PartialEq)]
pub enum Dispatch {
    /// To a product.
    Product {
        /// The idempotency key.
        key: String,
        /// The product.
        sku: Sku,
        /// The command.
        command: ProductCommand,
    },
    /// To the order.
    Order {
        /// The idempotency key.
        key: String,
        /// The order.
        order_id: OrderId,
        /// The command.
        command: OrderCommand,
    },
}

impl Dispatch {
    /// Its idempotency key.
    pub fn key(&self) -> &str {
        match self {
            Self::Product { key, .. } | Self::Order { key, .. } => key,
        }
    }
}

/// Where the process is with one order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Reserving each line's stock.
    Reserving,
    /// Every line reserved, the confirmation sent to the order.
    Confirming,
    /// Reserved and confirmed, not yet fully paid.
    AwaitingPayment,
    /// Paid and reserved: taking the stock out of stock on hand.
    TakingStock,
    /// The stock taken: marking the order ready to ship.
    MarkingReady,
    /// Ready to ship: nothing more to do unless it is cancelled.
    ReadyToShip,
    /// Cancelled: its stock released or returned.
    Cancelled,
}

impl Step {
    /// The step as its wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserving => "reserving",
            Self::Confirming => "confirming",
            Self::AwaitingPayment => "awaiting_payment",
            Self::TakingStock => "taking_stock",
            Self::MarkingReady => "marking_ready",
            Self::ReadyToShip => "ready_to_ship",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Where one line's stock is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum LineState {
    /// Its reservation was sent; no answer yet.
    Asked,
    /// Reserved.
    Reserved,
    /// The product refused the reservation.
    Refused {
        /// Why, as the product said.
        reason: String,
    },
    /// Taken out of stock on hand.
    Taken,
}

/// One line of the order, as the process follows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The product.
    pub sku: Sku,
    /// Units.
    pub quantity: Quantity,
    /// Where its stock is.
    pub state: LineState,
}

/// The process's state for one order: kept with its checkpoint, so that it survives
/// restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// The order.
    pub order_id: OrderId,
    /// The id of the `OrderPlaced` event: the cause of the reservations, the
    /// confirmation and the deadline's cancellation.
    pub placed_event: String,
    /// The lines.
    pub lines: Vec<Line>,
    /// When the payment is due (milliseconds since the Unix epoch).
    pub deadline_ms: i64,
    /// The id of the `OrderPaid` event, once the order is paid: the cause of taking the
    /// stock and marking it ready.
    pub paid_event: Option<String>,
    /// The id of the `OrderCancelled` event, once cancelled: the cause of the releases
    /// and returns.
    pub cancelled_event: Option<String>,
    /// Where it is.
    pub step: Step,
}

impl Process {
    /// The process for an order placed by event `event_id` with `lines`, due to be paid by
    /// `deadline_ms`, and the reservations to send.
    pub fn placed(
        order_id: OrderId,
        event_id: &str,
        lines: &[OrderLine],
        deadline_ms: i64,
    ) -> (Self, Vec<Dispatch>) {
        let process = Self {
            order_id,
            placed_event: event_id.to_owned(),
            lines: lines
                .iter()
                .map(|l| Line {
                    sku: l.sku.clone(),
                    quantity: l.quantity,
                    state: LineState::Asked,
                })
                .collect(),
            deadline_ms,
            paid_event: None,
            cancelled_event: None,
            step: Step::Reserving,
        };
        let sends = process
            .lines
            .iter()
            .map(|l| {
                process.to_product(&process.placed_event, "reserve", l, |order_id| {
                    ProductCommand::ReserveStock {
                        order_id,
                        quantity: l.quantity,
                    }
                })
            })
            .collect();
        (process, sends)
    }

    fn to_product(
        &self,
        cause: &str,
        what: &str,
        line: &Line,
        command: impl FnOnce(OrderId) -> ProductCommand,
    ) -> Dispatch {
        Dispatch::Product {
            key: format!("fulfil:{cause}:{what}:{}", line.sku),
            sku: line.sku.clone(),
            command: command(self.order_id.clone()),
        }
    }

    fn to_order(&self, cause: &str, what: &str, command: OrderCommand) -> Dispatch {
        Dispatch::Order {
            key: format!("fulfil:{cause}:{what}"),
            order_id: self.order_id.clone(),
            command,
        }
    }

    fn line_mut(&mut self, sku: &Sku) -> Option<&mut Line> {
        self.lines.iter_mut().find(|l| &l.sku == sku)
    }

    /// The product's answer to the reservation of `sku`: `Ok`, or the rule it broke.
    pub fn reserve_answered(&mut self, sku: &Sku, answer: Result<(), String>) -> Vec<Dispatch> {
        let Some(line) = self.line_mut(sku) else {
            return vec![];
        };
        if line.state != LineState::Asked {
            return vec![];
        }
        line.state = match answer {
            Ok(()) => LineState::Reserved,
            Err(reason) => LineState::Refused { reason },
        };
        if let Some(cause) = self.cancelled_event.clone() {
            // Cancelled while the reservation was on its way: release what it held.
            let line = self.lines.iter().find(|l| &l.sku == sku);
            return line
                .filter(|l| l.state == LineState::Reserved)
                .map(|l| {
                    self.to_product(&cause, "release", l, |order_id| {
                        ProductCommand::ReleaseStock { order_id }
                    })
                })
                .into_iter()
                .collect();
        }
        if self.step != Step::Reserving || self.lines.iter().any(|l| l.state == LineState::Asked) {
            return vec![];
        }
        let refused = self
            .lines
            .iter()
            .enumerate()
            .find_map(|(i, l)| match &l.state {
                LineState::Refused { reason } => Some((i, l.sku.clone(), reason.clone())),
                _ => None,
            });
        if let Some((i, sku, reason)) = refused {
            // The order cannot be fulfilled: cancel it (refunding what was paid); its
            // cancellation releases what the other lines reserved.
            let reason = Text::parse(
                "reason",
                format!("line {} ({sku}) could not be reserved: {reason}", i + 1),
            )
            .unwrap_or_else(|_| {
                Text::parse("reason", "a line could not be reserved").expect("a valid text")
            });
            return vec![self.to_order(
                &self.placed_event,
                "cancel-unreservable",
                OrderCommand::CancelOrder { reason },
            )];
        }
        self.step = Step::Confirming;
        vec![self.to_order(
            &self.placed_event,
            "confirm",
            OrderCommand::ConfirmReservation,
        )]
    }

    /// The order accepted the confirmation of its reservation.
    pub fn confirmed(&mut self) -> Vec<Dispatch> {
        if self.step != Step::Confirming {
            return vec![];
        }
        match self.paid_event.clone() {
            Some(paid) => self.take(&paid),
            None => {
                self.step = Step::AwaitingPayment;
                vec![]
            }
        }
    }

    /// The order was paid in full (`OrderPaid`, event `event_id`).
    pub fn paid(&mut self, event_id: &str) -> Vec<Dispatch> {
        if self.paid_event.is_some() {
            return vec![];
        }
        self.paid_event = Some(event_id.to_owned());
        if self.step == Step::AwaitingPayment {
            return self.take(event_id);
        }
        // Paid before every line was reserved (or once cancelled): the stock is taken once
        // the reservation is confirmed.
        vec![]
    }

    fn take(&mut self, cause: &str) -> Vec<Dispatch> {
        self.step = Step::TakingStock;
        self.lines
            .iter()
            .filter(|l| l.state == LineState::Reserved)
            .map(|l| {
                self.to_product(cause, "take", l, |order_id| {
                    ProductCommand::TakeReservedStock { order_id }
                })
            })
            .collect()
    }

    /// The product took the reserved stock of `sku` out of stock on hand.
    pub fn taken(&mut self, sku: &Sku) -> Vec<Dispatch> {
        let Some(line) = self.line_mut(sku) else {
            return vec![];
        };
        if line.state != LineState::Reserved {
            return vec![];
        }
        line.state = LineState::Taken;
        if let Some(cause) = self.cancelled_event.clone() {
            // Cancelled while the stock was being taken: put it back.
            let line = self.lines.iter().find(|l| &l.sku == sku).cloned();
            return line
                .map(|l| {
                    self.to_product(&cause, "return", &l, |order_id| {
                        ProductCommand::ReturnTakenStock { order_id }
                    })
                })
                .into_iter()
                .collect();
        }
        if self.step != Step::TakingStock || self.lines.iter().any(|l| l.state != LineState::Taken)
        {
            return vec![];
        }
        self.step = Step::MarkingReady;
        let cause = self.paid_event.clone().unwrap_or_default();
        vec![self.to_order(&cause, "ready", OrderCommand::MarkReadyToShip)]
    }

    /// The order accepted being marked ready to ship.
    pub fn ready(&mut self) {
        if self.step == Step::MarkingReady {
            self.step = Step::ReadyToShip;
        }
    }

    /// The order was cancelled (`OrderCancelled`, event `event_id`), by its customer or by
    /// this process: what is reserved is released, what was taken is returned.
    pub fn cancelled(&mut self, event_id: &str) -> Vec<Dispatch> {
        if self.cancelled_event.is_some() {
            return vec![];
        }
        self.cancelled_event = Some(event_id.to_owned());
        self.step = Step::Cancelled;
        self.releases(event_id)
    }

    fn releases(&self, cause: &str) -> Vec<Dispatch> {
        self.lines
            .iter()
            .filter_map(|l| match l.state {
                LineState::Reserved => Some(self.to_product(cause, "release", l, |order_id| {
                    ProductCommand::ReleaseStock { order_id }
                })),
                LineState::Taken => Some(self.to_product(cause, "return", l, |order_id| {
                    ProductCommand::ReturnTakenStock { order_id }
                })),
                LineState::Asked | LineState::Refused { .. } => None,
            })
            .collect()
    }

    /// Whether the payment deadline has passed at `now_ms` for an order still unpaid and
    /// not cancelled.
    pub fn overdue(&self, now_ms: i64) -> bool {
        now_ms >= self.deadline_ms && self.paid_event.is_none() && self.cancelled_event.is_none()
    }

    /// At `now_ms`: the deadline's cancellation, once it has passed (refused by the order
    /// if a payment came first; the log's order decides).
    pub fn due(&self, now_ms: i64) -> Vec<Dispatch> {
        if !self.overdue(now_ms) {
            return vec![];
        }
        let reason =
            Text::parse("reason", "not paid by the payment deadline").expect("a valid text");
        vec![self.to_order(
            &self.placed_event,
            "deadline",
            OrderCommand::CancelUnpaidOrder { reason },
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::{Currency, Money};

    fn sku(s: &str) -> Sku {
        Sku::parse(s).unwrap()
    }

    fn lines(skus: &[&str]) -> Vec<OrderLine> {
        skus.iter()
            .map(|s| OrderLine {
                sku: sku(s),
                quantity: Quantity::parse("quantity", 2).unwrap(),
                unit_price: Money::new(100, Currency::parse("EUR").unwrap()).unwrap(),
            })
            .collect()
    }

    fn start(skus: &[&str]) -> (Process, Vec<Dispatch>) {
        Process::placed(
            OrderId::parse("o-1").unwrap(),
            "e-placed",
            &lines(skus),
            1_000,
        )
    }

    fn keys(sends: &[Dispatch]) -> Vec<&str> {
        sends.iter().map(Dispatch::key).collect()
    }

    #[test]
    fn the_happy_path_reserves_confirms_takes_and_marks_ready() {
        let (mut p, sends) = start(&["A", "B"]);
        assert_eq!(
            keys(&sends),
            ["fulfil:e-placed:reserve:A", "fulfil:e-placed:reserve:B"]
        );
        assert!(p.reserve_answered(&sku("A"), Ok(())).is_empty());
        let confirm = p.reserve_answered(&sku("B"), Ok(()));
        assert_eq!(keys(&confirm), ["fulfil:e-placed:confirm"]);
        assert!(p.confirmed().is_empty());
        assert_eq!(p.step, Step::AwaitingPayment);
        assert!(p.due(999).is_empty(), "not yet due");
        let takes = p.paid("e-paid");
        assert_eq!(
            keys(&takes),
            ["fulfil:e-paid:take:A", "fulfil:e-paid:take:B"]
        );
        assert!(p.due(5_000).is_empty(), "paid orders are not cancelled");
        assert!(p.taken(&sku("A")).is_empty());
        let ready = p.taken(&sku("B"));
        assert_eq!(keys(&ready), ["fulfil:e-paid:ready"]);
        p.ready();
        assert_eq!(p.step, Step::ReadyToShip);
    }

    #[test]
    fn answers_and_events_seen_twice_send_nothing_twice() {
        let (mut p, _) = start(&["A"]);
        assert_eq!(p.reserve_answered(&sku("A"), Ok(())).len(), 1);
        assert!(p.reserve_answered(&sku("A"), Ok(())).is_empty());
        p.confirmed();
        assert_eq!(p.paid("e-paid").len(), 1);
        assert!(p.paid("e-paid").is_empty());
        assert_eq!(p.taken(&sku("A")).len(), 1);
        assert!(p.taken(&sku("A")).is_empty());
        assert_eq!(p.cancelled("e-cancel").len(), 1);
        assert!(p.cancelled("e-cancel").is_empty());
    }

    /// Out of stock on one line of three: the order is cancelled with a reason naming the
    /// line, and its cancellation releases the other two.
    #[test]
    fn a_line_out_of_stock_cancels_the_order_and_releases_the_others() {
        let (mut p, _) = start(&["A", "B", "C"]);
        assert!(p.reserve_answered(&sku("A"), Ok(())).is_empty());
        assert!(
            p.reserve_answered(
                &sku("B"),
                Err("insufficient stock: requested 2, available 1".into())
            )
            .is_empty()
        );
        let cancel = p.reserve_answered(&sku("C"), Ok(()));
        let [
            Dispatch::Order {
                key,
                command: OrderCommand::CancelOrder { reason },
                ..
            },
        ] = &cancel[..]
        else {
            panic!("{cancel:?}")
        };
        assert_eq!(key, "fulfil:e-placed:cancel-unreservable");
        assert!(
            reason
                .as_str()
                .starts_with("line 2 (B) could not be reserved: insufficient stock"),
            "{reason}"
        );
        let releases = p.cancelled("e-cancel");
        assert_eq!(
            keys(&releases),
            ["fulfil:e-cancel:release:A", "fulfil:e-cancel:release:C"]
        );
    }

    /// A payment that arrives before every line is reserved: the stock is taken once the
    /// reservation is confirmed.
    #[test]
    fn paid_before_reserved_takes_the_stock_after_the_confirmation() {
        let (mut p, _) = start(&["A"]);
        assert!(p.paid("e-paid").is_empty());
        assert_eq!(p.reserve_answered(&sku("A"), Ok(())).len(), 1);
        let takes = p.confirmed();
        assert_eq!(keys(&takes), ["fulfil:e-paid:take:A"]);
        assert!(p.due(5_000).is_empty());
    }

    #[test]
    fn the_deadline_cancels_an_unpaid_order_once_it_passed() {
        let (mut p, _) = start(&["A"]);
        p.reserve_answered(&sku("A"), Ok(()));
        p.confirmed();
        assert!(p.due(999).is_empty());
        let cancel = p.due(1_000);
        assert!(matches!(
            &cancel[..],
            [Dispatch::Order { command: OrderCommand::CancelUnpaidOrder { .. }, key, .. }]
                if key == "fulfil:e-placed:deadline"
        ));
        // The cancellation's event releases the reservation; the deadline is done.
        assert_eq!(
            keys(&p.cancelled("e-cancel")),
            ["fulfil:e-cancel:release:A"]
        );
        assert!(p.due(5_000).is_empty());
    }

    /// A cancellation after the stock was taken out returns it; one while a reservation
    /// or a take is on its way settles that line when its answer comes.
    #[test]
    fn a_late_cancellation_returns_taken_stock_and_settles_answers_in_flight() {
        let (mut p, _) = start(&["A", "B"]);
        p.reserve_answered(&sku("A"), Ok(()));
        p.reserve_answered(&sku("B"), Ok(()));
        p.confirmed();
        p.paid("e-paid");
        p.taken(&sku("A"));
        let settle = p.cancelled("e-cancel");
        assert_eq!(
            keys(&settle),
            ["fulfil:e-cancel:return:A", "fulfil:e-cancel:release:B"]
        );
        // B's take was on its way and went through after all: its stock comes back too.
        assert_eq!(keys(&p.taken(&sku("B"))), ["fulfil:e-cancel:return:B"]);

        let (mut q, _) = start(&["A"]);
        assert!(q.cancelled("e-cancel").is_empty(), "nothing reserved yet");
        assert_eq!(
            keys(&q.reserve_answered(&sku("A"), Ok(()))),
            ["fulfil:e-cancel:release:A"]
        );
    }

    #[test]
    fn the_state_reads_back() {
        let (mut p, _) = start(&["A", "B"]);
        p.reserve_answered(&sku("B"), Err("product is discontinued".into()));
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Process>(&json).unwrap(), p);
    }
}
