//! The shop domain of Keel: products, customers and orders.
//!
//! Everything here is pure and synchronous: `decide(&state, &command)` returns the
//! events a command produces or the rule it breaks, and `evolve(state, &event)` folds
//! one event into the state. No I/O, no clock, no randomness: callers pass those in.

mod aggregate;
pub mod customer;
mod error;
pub mod fulfilment;
pub mod ids;
pub mod money;
pub mod order;
pub mod product;
mod registry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use aggregate::{Aggregate, DomainEvent};
pub use error::{DomainError, ValidationError};
pub use registry::{
    AggregateFn, AggregateVisitor, AnyEvent, ShopAggregate, visit_aggregates, with_aggregate,
};

/// The stream types of the shop, one Kafka topic each.
pub const STREAM_TYPES: [&str; 3] = [
    product::Product::TYPE,
    customer::Customer::TYPE,
    order::Order::TYPE,
];
