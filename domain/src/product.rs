//! The product aggregate (id = SKU): catalogue entry, price and stock.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::{OrderId, Quantity, Text};
use crate::money::Money;
use crate::{Aggregate, DomainError, DomainEvent, ValidationError};

/// Commands a product accepts.
#[derive(Clone, Debug, PartialEq)]
pub enum ProductCommand {
    /// Adds the product to the catalogue.
    RegisterProduct {
        /// Display name.
        name: Text,
        /// Unit price, greater than zero.
        price: Money,
    },
    /// Sets a new unit price.
    ChangePrice {
        /// The new price, greater than zero.
        price: Money,
    },
    /// Adds units to the stock on hand.
    Restock {
        /// Units added.
        quantity: Quantity,
    },
    /// Holds units for an order; stock available never goes below zero.
    ReserveStock {
        /// The order the units are held for.
        order_id: OrderId,
        /// Units held.
        quantity: Quantity,
    },
    /// Releases an order's reservation. Releasing what is not reserved changes nothing.
    ReleaseStock {
        /// The order whose units are released.
        order_id: OrderId,
    },
    /// Takes an order's reserved units out of the stock on hand (the order is paid and
    /// goes to be packed). Taking them again changes nothing.
    TakeReservedStock {
        /// The order whose reserved units are taken.
        order_id: OrderId,
    },
    /// Puts the units taken out for an order back into the stock on hand (the order was
    /// cancelled after they were taken). Returning them again changes nothing.
    ReturnTakenStock {
        /// The order whose units come back.
        order_id: OrderId,
    },
    /// Takes the product out of the catalogue for good.
    Discontinue,
}

/// Events of a product.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum ProductEvent {
    /// The product was added to the catalogue.
    ProductRegistered {
        /// Display name.
        name: Text,
        /// Unit price.
        price: Money,
    },
    /// The unit price changed.
    ProductPriceChanged {
        /// The new price.
        price: Money,
    },
    /// Units were added to the stock on hand.
    ProductRestocked {
        /// Units added.
        quantity: Quantity,
    },
    /// Units were held for an order.
    StockReserved {
        /// The order.
        order_id: OrderId,
        /// Units held.
        quantity: Quantity,
    },
    /// An order's held units were released.
    StockReleased {
        /// The order.
        order_id: OrderId,
        /// Units released.
        quantity: Quantity,
    },
    /// The product was discontinued.
    ProductDiscontinued {},
    /// An order's reserved units left the stock on hand.
    ReservedStockTaken {
        /// The order.
        order_id: OrderId,
        /// Units taken.
        quantity: Quantity,
    },
    /// The units taken out for an order came back into the stock on hand.
    TakenStockReturned {
        /// The order.
        order_id: OrderId,
        /// Units returned.
        quantity: Quantity,
    },
}

impl DomainEvent for ProductEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::ProductRegistered { .. } => "ProductRegistered",
            Self::ProductPriceChanged { .. } => "ProductPriceChanged",
            Self::ProductRestocked { .. } => "ProductRestocked",
            Self::StockReserved { .. } => "StockReserved",
            Self::StockReleased { .. } => "StockReleased",
            Self::ProductDiscontinued {} => "ProductDiscontinued",
            Self::ReservedStockTaken { .. } => "ReservedStockTaken",
            Self::TakenStockReturned { .. } => "TakenStockReturned",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }
}

/// A registered product's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductState {
    /// Display name.
    pub name: Text,
    /// Unit price.
    pub price: Money,
    /// Units physically in stock, reserved or not.
    pub on_hand: u64,
    /// Units held per order.
    pub reservations: BTreeMap<OrderId, u64>,
    /// Units taken out of stock per order (reserved, then taken when the order was paid):
    /// an order here reserves nothing again.
    #[serde(default)]
    pub taken: BTreeMap<OrderId, u64>,
    /// Orders whose taken units came back into stock: they are not returned twice.
    #[serde(default)]
    pub returned: BTreeSet<OrderId>,
    /// True once discontinued.
    pub discontinued: bool,
}

impl ProductState {
    /// Units held for orders.
    pub fn reserved(&self) -> u64 {
        self.reservations.values().sum()
    }

    /// Units on hand and not held for any order.
    pub fn available(&self) -> u64 {
        self.on_hand.saturating_sub(self.reserved())
    }
}

/// A product: not yet registered, or registered with its state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Product {
    /// No product with this SKU exists.
    #[default]
    Unregistered,
    /// The product exists.
    Registered(ProductState),
}

fn positive_price(price: Money) -> Result<(), DomainError> {
    if price.is_positive() {
        Ok(())
    } else {
        Err(ValidationError::new("price.amount_minor", "must be greater than zero").into())
    }
}

impl Aggregate for Product {
    const TYPE: &'static str = "product";
    const EVENT_TYPES: &'static [(&'static str, u32)] = &[
        ("ProductRegistered", 1),
        ("ProductPriceChanged", 1),
        ("ProductRestocked", 1),
        ("StockReserved", 1),
        ("StockReleased", 1),
        ("ProductDiscontinued", 1),
        ("ReservedStockTaken", 1),
        ("TakenStockReturned", 1),
    ];
    type Command = ProductCommand;
    type Event = ProductEvent;

    fn decide(&self, command: &ProductCommand) -> Result<Vec<ProductEvent>, DomainError> {
        use ProductCommand as C;
        use ProductEvent as E;
        let state = match (self, command) {
            (Product::Unregistered, C::RegisterProduct { name, price }) => {
                positive_price(*price)?;
                return Ok(vec![E::ProductRegistered {
                    name: name.clone(),
                    price: *price,
                }]);
            }
            (Product::Registered(_), C::RegisterProduct { .. }) => {
                return Err(DomainError::ProductAlreadyRegistered);
            }
            (Product::Unregistered, _) => return Err(DomainError::ProductNotRegistered),
            (Product::Registered(state), _) => state,
        };
        match command {
            C::RegisterProduct { .. } => Err(DomainError::ProductAlreadyRegistered),
            C::ReleaseStock { order_id } => Ok(state
                .reservations
                .get(order_id)
                .and_then(|&held| Quantity::parse("quantity", held).ok())
                .map(|quantity| E::StockReleased {
                    order_id: order_id.clone(),
                    quantity,
                })
                .into_iter()
                .collect()),
            // Taking and returning stock finish what a reservation started, so a product
            // discontinued meanwhile still takes them.
            C::TakeReservedStock { order_id } => {
                if let Some(&held) = state.reservations.get(order_id) {
                    let quantity = Quantity::parse("quantity", held).map_err(DomainError::from)?;
                    return Ok(vec![E::ReservedStockTaken {
                        order_id: order_id.clone(),
                        quantity,
                    }]);
                }
                if state.taken.contains_key(order_id) {
                    return Ok(vec![]);
                }
                Err(DomainError::NothingReserved {
                    order_id: order_id.to_string(),
                })
            }
            C::ReturnTakenStock { order_id } => {
                if state.returned.contains(order_id) {
                    return Ok(vec![]);
                }
                let Some(&taken) = state.taken.get(order_id) else {
                    return Err(DomainError::NothingTaken {
                        order_id: order_id.to_string(),
                    });
                };
                let quantity = Quantity::parse("quantity", taken).map_err(DomainError::from)?;
                Ok(vec![E::TakenStockReturned {
                    order_id: order_id.clone(),
                    quantity,
                }])
            }
            // The order's units were taken out already: reserving them again would hold
            // them twice.
            C::ReserveStock { order_id, .. } if state.taken.contains_key(order_id) => Ok(vec![]),
            _ if state.discontinued => Err(DomainError::ProductDiscontinued),
            C::ChangePrice { price } => {
                positive_price(*price)?;
                if *price == state.price {
                    return Ok(vec![]);
                }
                Ok(vec![E::ProductPriceChanged { price: *price }])
            }
            C::Restock { quantity } => Ok(vec![E::ProductRestocked {
                quantity: *quantity,
            }]),
            C::ReserveStock { order_id, quantity } => {
                if let Some(&held) = state.reservations.get(order_id) {
                    if held == quantity.get() {
                        return Ok(vec![]);
                    }
                    return Err(DomainError::ReservationConflict {
                        order_id: order_id.to_string(),
                        reserved: held,
                        requested: quantity.get(),
                    });
                }
                if quantity.get() > state.available() {
                    return Err(DomainError::InsufficientStock {
                        requested: quantity.get(),
                        available: state.available(),
                    });
                }
                Ok(vec![E::StockReserved {
                    order_id: order_id.clone(),
                    quantity: *quantity,
                }])
            }
            C::Discontinue => Ok(vec![E::ProductDiscontinued {}]),
        }
    }

    fn evolve(self, event: &ProductEvent) -> Self {
        use ProductEvent as E;
        match (self, event) {
            (_, E::ProductRegistered { name, price }) => Product::Registered(ProductState {
                name: name.clone(),
                price: *price,
                on_hand: 0,
                reservations: BTreeMap::new(),
                taken: BTreeMap::new(),
                returned: BTreeSet::new(),
                discontinued: false,
            }),
            (Product::Unregistered, _) => Product::Unregistered,
            (Product::Registered(mut s), event) => {
                match event {
                    E::ProductRegistered { .. } => {}
                    E::ProductPriceChanged { price } => s.price = *price,
                    E::ProductRestocked { quantity } => {
                        s.on_hand = s.on_hand.saturating_add(quantity.get());
                    }
                    E::StockReserved { order_id, quantity } => {
                        s.reservations.insert(order_id.clone(), quantity.get());
                    }
                    E::StockReleased { order_id, .. } => {
                        s.reservations.remove(order_id);
                    }
                    E::ProductDiscontinued {} => s.discontinued = true,
                    E::ReservedStockTaken { order_id, quantity } => {
                        s.reservations.remove(order_id);
                        s.on_hand = s.on_hand.saturating_sub(quantity.get());
                        s.taken.insert(order_id.clone(), quantity.get());
                    }
                    E::TakenStockReturned { order_id, quantity } => {
                        s.on_hand = s.on_hand.saturating_add(quantity.get());
                        s.returned.insert(order_id.clone());
                    }
                }
                Product::Registered(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use crate::testing::given;

    use ProductCommand as C;
    use ProductEvent as E;

    fn eur(n: i64) -> Money {
        Money::new(n, Currency::parse("EUR").unwrap()).unwrap()
    }
    fn q(n: u64) -> Quantity {
        Quantity::parse("quantity", n).unwrap()
    }
    fn order(id: &str) -> OrderId {
        OrderId::parse(id).unwrap()
    }
    fn registered() -> E {
        E::ProductRegistered {
            name: Text::parse("name", "Mug").unwrap(),
            price: eur(1299),
        }
    }

    #[test]
    fn register_a_new_product() {
        given::<Product>([])
            .when(C::RegisterProduct {
                name: Text::parse("name", "Mug").unwrap(),
                price: eur(1299),
            })
            .then([registered()]);
    }

    #[test]
    fn register_twice_is_refused() {
        given::<Product>([registered()])
            .when(C::RegisterProduct {
                name: Text::parse("name", "Mug").unwrap(),
                price: eur(1299),
            })
            .then_err(DomainError::ProductAlreadyRegistered);
    }

    #[test]
    fn register_needs_a_positive_price() {
        let err = given::<Product>([])
            .when(C::RegisterProduct {
                name: Text::parse("name", "Mug").unwrap(),
                price: eur(0),
            })
            .error();
        assert_eq!(err.rule(), "invalid_input");
    }

    #[test]
    fn commands_on_an_unknown_product_are_refused() {
        for command in [
            C::ChangePrice { price: eur(5) },
            C::Restock { quantity: q(1) },
            C::ReserveStock {
                order_id: order("o-1"),
                quantity: q(1),
            },
            C::ReleaseStock {
                order_id: order("o-1"),
            },
            C::TakeReservedStock {
                order_id: order("o-1"),
            },
            C::ReturnTakenStock {
                order_id: order("o-1"),
            },
            C::Discontinue,
        ] {
            given::<Product>([])
                .when(command)
                .then_err(DomainError::ProductNotRegistered);
        }
    }

    #[test]
    fn change_price() {
        given::<Product>([registered()])
            .when(C::ChangePrice { price: eur(1499) })
            .then([E::ProductPriceChanged { price: eur(1499) }]);
    }

    #[test]
    fn change_to_the_same_price_changes_nothing() {
        given::<Product>([registered()])
            .when(C::ChangePrice { price: eur(1299) })
            .then([]);
    }

    #[test]
    fn restock_adds_to_stock() {
        given::<Product>([registered()])
            .when(C::Restock { quantity: q(10) })
            .then([E::ProductRestocked { quantity: q(10) }]);
    }

    #[test]
    fn reserve_within_available_stock() {
        given::<Product>([registered(), E::ProductRestocked { quantity: q(5) }])
            .when(C::ReserveStock {
                order_id: order("o-1"),
                quantity: q(5),
            })
            .then([E::StockReserved {
                order_id: order("o-1"),
                quantity: q(5),
            }]);
    }

    #[test]
    fn reserve_never_goes_below_zero() {
        given::<Product>([
            registered(),
            E::ProductRestocked { quantity: q(5) },
            E::StockReserved {
                order_id: order("o-1"),
                quantity: q(3),
            },
        ])
        .when(C::ReserveStock {
            order_id: order("o-2"),
            quantity: q(3),
        })
        .then_err(DomainError::InsufficientStock {
            requested: 3,
            available: 2,
        });
    }

    #[test]
    fn reserving_again_for_the_same_order_is_idempotent_or_a_conflict() {
        let history = [
            registered(),
            E::ProductRestocked { quantity: q(5) },
            E::StockReserved {
                order_id: order("o-1"),
                quantity: q(3),
            },
        ];
        given::<Product>(history.clone())
            .when(C::ReserveStock {
                order_id: order("o-1"),
                quantity: q(3),
            })
            .then([]);
        given::<Product>(history)
            .when(C::ReserveStock {
                order_id: order("o-1"),
                quantity: q(2),
            })
            .then_err(DomainError::ReservationConflict {
                order_id: "o-1".into(),
                reserved: 3,
                requested: 2,
            });
    }

    #[test]
    fn release_frees_the_reservation_and_is_idempotent() {
        let history = vec![
            registered(),
            E::ProductRestocked { quantity: q(5) },
            E::StockReserved {
                order_id: order("o-1"),
                quantity: q(3),
            },
        ];
        given::<Product>(history.clone())
            .when(C::ReleaseStock {
                order_id: order("o-1"),
            })
            .then([E::StockReleased {
                order_id: order("o-1"),
                quantity: q(3),
            }]);
        let mut released = history;
        released.push(E::StockReleased {
            order_id: order("o-1"),
            quantity: q(3),
        });
        given::<Product>(released)
            .when(C::ReleaseStock {
                order_id: order("o-1"),
            })
            .then([]);
    }

    #[test]
    fn discontinued_products_take_no_stock_or_price_changes_but_release() {
        let history = vec![
            registered(),
            E::ProductRestocked { quantity: q(5) },
            E::StockReserved {
                order_id: order("o-1"),
                quantity: q(1),
            },
            E::ProductDiscontinued {},
        ];
        for command in [
            C::ChangePrice { price: eur(5) },
            C::Restock { quantity: q(1) },
            C::ReserveStock {
                order_id: order("o-2"),
                quantity: q(1),
            },
            C::Discontinue,
        ] {
            given::<Product>(history.clone())
                .when(command)
                .then_err(DomainError::ProductDiscontinued);
        }
        given::<Product>(history)
            .when(C::ReleaseStock {
                order_id: order("o-1"),
            })
            .then([E::StockReleased {
                order_id: order("o-1"),
                quantity: q(1),
            }]);
    }

    fn reserved_3_of_5() -> Vec<E> {
        vec![
            registered(),
            E::ProductRestocked { quantity: q(5) },
            E::StockReserved {
                order_id: order("o-1"),
                quantity: q(3),
            },
        ]
    }

    fn taken(quantity: u64) -> E {
        E::ReservedStockTaken {
            order_id: order("o-1"),
            quantity: q(quantity),
        }
    }

    #[test]
    fn taking_reserved_stock_leaves_stock_on_hand_once() {
        let product = given::<Product>(reserved_3_of_5())
            .when(C::TakeReservedStock {
                order_id: order("o-1"),
            })
            .then([taken(3)]);
        let Product::Registered(state) = &product else {
            panic!("registered")
        };
        assert_eq!(
            (state.on_hand, state.reserved(), state.available()),
            (2, 0, 2)
        );
        let mut history = reserved_3_of_5();
        history.push(taken(3));
        given::<Product>(history.clone())
            .when(C::TakeReservedStock {
                order_id: order("o-1"),
            })
            .then([]);
        // Reserving again for an order whose units were taken holds nothing twice.
        given::<Product>(history)
            .when(C::ReserveStock {
                order_id: order("o-1"),
                quantity: q(3),
            })
            .then([]);
    }

    #[test]
    fn taking_what_was_never_reserved_is_refused() {
        given::<Product>(reserved_3_of_5())
            .when(C::TakeReservedStock {
                order_id: order("o-2"),
            })
            .then_err(DomainError::NothingReserved {
                order_id: "o-2".into(),
            });
        let mut released = reserved_3_of_5();
        released.push(E::StockReleased {
            order_id: order("o-1"),
            quantity: q(3),
        });
        given::<Product>(released)
            .when(C::TakeReservedStock {
                order_id: order("o-1"),
            })
            .then_err(DomainError::NothingReserved {
                order_id: "o-1".into(),
            });
    }

    #[test]
    fn taken_stock_comes_back_once_and_a_discontinued_product_still_settles() {
        let mut history = reserved_3_of_5();
        history.push(E::ProductDiscontinued {});
        let product = given::<Product>(history.clone())
            .when(C::TakeReservedStock {
                order_id: order("o-1"),
            })
            .then([taken(3)]);
        assert!(matches!(&product, Product::Registered(s) if s.on_hand == 2));
        history.push(taken(3));
        given::<Product>(history.clone())
            .when(C::ReleaseStock {
                order_id: order("o-1"),
            })
            .then([]);
        given::<Product>(history.clone())
            .when(C::ReturnTakenStock {
                order_id: order("o-1"),
            })
            .then([E::TakenStockReturned {
                order_id: order("o-1"),
                quantity: q(3),
            }]);
        history.push(E::TakenStockReturned {
            order_id: order("o-1"),
            quantity: q(3),
        });
        let Product::Registered(state) = Product::fold(&history) else {
            panic!("registered")
        };
        assert_eq!((state.on_hand, state.reserved()), (5, 0));
        given::<Product>(history)
            .when(C::ReturnTakenStock {
                order_id: order("o-1"),
            })
            .then([]);
        given::<Product>(reserved_3_of_5())
            .when(C::ReturnTakenStock {
                order_id: order("o-1"),
            })
            .then_err(DomainError::NothingTaken {
                order_id: "o-1".into(),
            });
    }

    #[test]
    fn a_snapshot_from_before_stock_was_taken_reads_back() {
        let now = Product::fold(&reserved_3_of_5());
        let mut old = serde_json::to_value(&now).unwrap();
        let fields = old.as_object_mut().unwrap();
        assert!(fields.remove("taken").is_some() && fields.remove("returned").is_some());
        let product: Product = serde_json::from_value(old).unwrap();
        assert_eq!(product, now);
    }

    #[test]
    fn discontinue() {
        given::<Product>([registered()])
            .when(C::Discontinue)
            .then([E::ProductDiscontinued {}]);
    }
}
