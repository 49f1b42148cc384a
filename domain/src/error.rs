use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::money::Currency;

/// A value that failed validation: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The field that is invalid, as the client named it (`lines[2].quantity`).
    pub field: String,
    /// Why it is invalid, in words a client can act on.
    pub reason: String,
}

impl ValidationError {
    /// A validation error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error, with its field placed under `parent` (`lines[2]` + `quantity`).
    #[must_use]
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_owned()
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

/// The business rule a command broke. Each variant names exactly one rule.
///
/// Serialised (in idempotency receipts) by the rule's name, as [`DomainError::rule`] gives
/// it, with the variant's fields.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DomainError {
    /// A field of the command is invalid.
    #[error("invalid input: {0}")]
    #[serde(rename = "invalid_input")]
    Invalid(#[from] ValidationError),

    /// The product is already registered under this SKU.
    #[error("product is already registered")]
    ProductAlreadyRegistered,
    /// The product has not been registered.
    #[error("product is not registered")]
    ProductNotRegistered,
    /// The product is discontinued and accepts no more changes of stock or price.
    #[error("product is discontinued")]
    ProductDiscontinued,
    /// Reserving would take stock below zero.
    #[error("insufficient stock: requested {requested}, available {available}")]
    InsufficientStock {
        /// Units requested.
        requested: u64,
        /// Units on hand and not reserved.
        available: u64,
    },
    /// The order already holds a reservation of a different quantity for this product.
    #[error("order {order_id} already reserved {reserved} units, not {requested}")]
    ReservationConflict {
        /// The order holding the reservation.
        order_id: String,
        /// Units it holds.
        reserved: u64,
        /// Units now requested.
        requested: u64,
    },

    /// The order holds no reservation of this product to take out of stock.
    #[error("order {order_id} has no units of this product reserved")]
    NothingReserved {
        /// The order.
        order_id: String,
    },
    /// No units of this product were taken out of stock for the order.
    #[error("no units of this product were taken out of stock for order {order_id}")]
    NothingTaken {
        /// The order.
        order_id: String,
    },

    /// The customer is already registered under this id.
    #[error("customer is already registered")]
    CustomerAlreadyRegistered,
    /// The customer has not been registered.
    #[error("customer is not registered")]
    CustomerNotRegistered,

    /// An order with this id has already been placed.
    #[error("order has already been placed")]
    OrderAlreadyPlaced,
    /// No order with this id has been placed.
    #[error("order has not been placed")]
    OrderNotPlaced,
    /// A money amount is in a different currency than the one it must match.
    #[error("currency mismatch: expected {expected}, got {actual}")]
    CurrencyMismatch {
        /// The currency required.
        expected: Currency,
        /// The currency given.
        actual: Currency,
    },
    /// The payment would take the amount paid above the order's total.
    #[error("overpayment: outstanding {outstanding_minor}, attempted {attempted_minor}")]
    Overpayment {
        /// Minor units still to pay.
        outstanding_minor: i64,
        /// Minor units the payment carried.
        attempted_minor: i64,
    },
    /// A payment with this reference has already been recorded for the order.
    #[error("payment {payment_ref} has already been recorded")]
    PaymentAlreadyRecorded {
        /// The payment reference.
        payment_ref: String,
    },
    /// The order cannot ship before it is fully paid.
    #[error("order is not paid")]
    OrderNotPaid,
    /// The order has already shipped.
    #[error("order has already shipped")]
    OrderAlreadyShipped,
    /// The order has been cancelled.
    #[error("order is cancelled")]
    OrderCancelled,
    /// The order is fully paid: only its customer may cancel it now.
    #[error("order is already paid")]
    OrderAlreadyPaid,
    /// The order's stock is not reserved yet, so it cannot be taken out for packing.
    #[error("order's stock is not reserved")]
    StockNotReserved,
    /// The order is paid but the fulfilment process has not marked it ready to ship (its
    /// stock is not yet taken out for it).
    #[error("order is not ready to ship: its stock is not taken out for it yet")]
    OrderNotReadyToShip,
}

impl DomainError {
    /// The stable, machine-readable name of the rule that was broken (`insufficient_stock`).
    pub fn rule(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_input",
            Self::ProductAlreadyRegistered => "product_already_registered",
            Self::ProductNotRegistered => "product_not_registered",
            Self::ProductDiscontinued => "product_discontinued",
            Self::InsufficientStock { .. } => "insufficient_stock",
            Self::ReservationConflict { .. } => "reservation_conflict",
            Self::NothingReserved { .. } => "nothing_reserved",
            Self::NothingTaken { .. } => "nothing_taken",
            Self::CustomerAlreadyRegistered => "customer_already_registered",
            Self::CustomerNotRegistered => "customer_not_registered",
            Self::OrderAlreadyPlaced => "order_already_placed",
            Self::OrderNotPlaced => "order_not_placed",
            Self::CurrencyMismatch { .. } => "currency_mismatch",
            Self::Overpayment { .. } => "overpayment",
            Self::PaymentAlreadyRecorded { .. } => "payment_already_recorded",
            Self::OrderNotPaid => "order_not_paid",
            Self::OrderAlreadyShipped => "order_already_shipped",
            Self::OrderCancelled => "order_cancelled",
            Self::OrderAlreadyPaid => "order_already_paid",
            Self::StockNotReserved => "stock_not_reserved",
            Self::OrderNotReadyToShip => "order_not_ready_to_ship",
        }
    }

    /// True when the command addressed a stream that does not exist yet.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::ProductNotRegistered | Self::CustomerNotRegistered | Self::OrderNotPlaced
        )
    }
}
