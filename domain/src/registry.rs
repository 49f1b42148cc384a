//! The shop's aggregates, listed once. The services never name them one by one: they
//! visit them ([`visit_aggregates`]) or pick the one of a stream type ([`with_aggregate`]).
//! Adding an aggregate means writing it, its commands, an [`AnyEvent`] variant, and one
//! line in [`visit_aggregates`].

use serde::Serialize;

use crate::Aggregate;
use crate::customer::{Customer, CustomerEvent};
use crate::order::{Order, OrderEvent};
use crate::product::{Product, ProductEvent};

/// An event of any of the shop's aggregates.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyEvent {
    /// A product's event.
    Product(ProductEvent),
    /// A customer's event.
    Customer(CustomerEvent),
    /// An order's event.
    Order(OrderEvent),
}

impl From<ProductEvent> for AnyEvent {
    fn from(e: ProductEvent) -> Self {
        Self::Product(e)
    }
}

impl From<CustomerEvent> for AnyEvent {
    fn from(e: CustomerEvent) -> Self {
        Self::Customer(e)
    }
}

impl From<OrderEvent> for AnyEvent {
    fn from(e: OrderEvent) -> Self {
        Self::Order(e)
    }
}

/// An aggregate of the shop, as the services handle it: its state serialises and reads
/// back (time travel shows it, the command API's snapshots keep it), its commands and
/// events cross tasks, its events are [`AnyEvent`]s.
pub trait ShopAggregate:
    Aggregate<Command: Send + Sync + 'static, Event: Send + Sync + 'static + Into<AnyEvent>>
    + Serialize
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<T> ShopAggregate for T where
    T: Aggregate<Command: Send + Sync + 'static, Event: Send + Sync + 'static + Into<AnyEvent>>
        + Serialize
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// Work done once for each aggregate type.
pub trait AggregateVisitor {
    /// Does the work for `A`.
    fn visit<A: ShopAggregate>(&mut self);
}

/// Work done for the one aggregate type a stream type names.
pub trait AggregateFn {
    /// What the work gives.
    type Output;
    /// Does the work for `A`.
    fn call<A: ShopAggregate>(self) -> Self::Output;
}

/// Calls `visitor` for each of the shop's aggregates, in the order of
/// [`STREAM_TYPES`](crate::STREAM_TYPES): the one list of them.
pub fn visit_aggregates(visitor: &mut impl AggregateVisitor) {
    visitor.visit::<Product>();
    visitor.visit::<Customer>();
    visitor.visit::<Order>();
}

/// Calls `f` for the aggregate of `stream_type`; `None` when no aggregate has that type.
pub fn with_aggregate<F: AggregateFn>(stream_type: &str, f: F) -> Option<F::Output> {
    struct Pick<'a, F: AggregateFn> {
        stream_type: &'a str,
        f: Option<F>,
        out: Option<F::Output>,
    }
    impl<F: AggregateFn> AggregateVisitor for Pick<'_, F> {
        fn visit<A: ShopAggregate>(&mut self) {
            if A::TYPE == self.stream_type
                && let Some(f) = self.f.take()
            {
                self.out = Some(f.call::<A>());
            }
        }
    }
    let mut pick = Pick {
        stream_type,
        f: Some(f),
        out: None,
    };
    visit_aggregates(&mut pick);
    pick.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_types_are_the_visited_aggregates_in_order() {
        struct Types(Vec<&'static str>);
        impl AggregateVisitor for Types {
            fn visit<A: ShopAggregate>(&mut self) {
                self.0.push(A::TYPE);
            }
        }
        let mut types = Types(Vec::new());
        visit_aggregates(&mut types);
        assert_eq!(types.0, crate::STREAM_TYPES);
    }

    #[test]
    fn a_stream_type_picks_its_aggregate() {
        struct Name;
        impl AggregateFn for Name {
            type Output = &'static str;
            fn call<A: ShopAggregate>(self) -> &'static str {
                A::TYPE
            }
        }
        for t in crate::STREAM_TYPES {
            assert_eq!(with_aggregate(t, Name), Some(t));
        }
        assert_eq!(with_aggregate("widget", Name), None);
    }
}
