//! Every projection of the shop, as data: the projector implements each one, the query
//! API serves them.

/// What a projection is, apart from how it applies events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectionSpec {
    /// The projection's name, also its main view's name.
    pub name: &'static str,
    /// The version of the projection's code. A change means its tables must be rebuilt.
    pub version: i32,
    /// The stream types whose topics it reads.
    pub stream_types: &'static [&'static str],
    /// Its tables, without the generation suffix; each is also a view of the live
    /// generation under this name.
    pub tables: &'static [&'static str],
}

/// Orders: summary, status, totals.
pub const ORDERS: ProjectionSpec = ProjectionSpec {
    name: "orders",
    // 2: the fulfilment column.
    version: 2,
    stream_types: &["order"],
    tables: &["orders"],
};

/// Products: catalogue and stock.
pub const PRODUCTS: ProjectionSpec = ProjectionSpec {
    name: "products",
    version: 1,
    stream_types: &["product"],
    tables: &["products"],
};

/// Customers: profile and lifetime value.
pub const CUSTOMERS: ProjectionSpec = ProjectionSpec {
    name: "customers",
    version: 1,
    stream_types: &["customer", "order"],
    tables: &["customers", "customer_orders"],
};

/// Sales per day and currency.
pub const DAILY_SALES: ProjectionSpec = ProjectionSpec {
    name: "daily_sales",
    // 2: items and revenue are numeric, so no day's sum overflows.
    version: 2,
    stream_types: &["order"],
    tables: &["daily_sales"],
};

/// Payments at or above the review threshold.
pub const FLAGGED_PAYMENTS: ProjectionSpec = ProjectionSpec {
    name: "flagged_payments",
    version: 1,
    stream_types: &["order"],
    tables: &["flagged_payments"],
};

/// Every event with its full metadata and position.
pub const AUDIT_LOG: ProjectionSpec = ProjectionSpec {
    name: "audit_log",
    // 2: the commit's signature (key id and value) is kept with each event.
    version: 2,
    stream_types: &keel_domain::STREAM_TYPES,
    tables: &["audit_log"],
};

/// Every projection, in the order the projector starts them.
pub const PROJECTIONS: &[ProjectionSpec] = &[
    ORDERS,
    PRODUCTS,
    CUSTOMERS,
    DAILY_SALES,
    FLAGGED_PAYMENTS,
    AUDIT_LOG,
];

/// Order fulfilment: a process manager, not a view. It reads the log through the gate like
/// a projection and shares its partitions like one, but its tables hold what the commands
/// it sent answered (one row per order it follows, and the commands still to send), so it
/// is never rebuilt: the projector runs it only when asked (`projector run --process
/// fulfilment`), and `rebuild` does not know it.
pub const FULFILMENT: ProjectionSpec = ProjectionSpec {
    name: "fulfilment",
    version: 1,
    stream_types: &["order"],
    tables: &["fulfilment", "fulfilment_outbox"],
};

/// Every process manager.
pub const PROCESSES: &[ProjectionSpec] = &[FULFILMENT];

/// The projection named `name`.
pub fn find(name: &str) -> Option<&'static ProjectionSpec> {
    PROJECTIONS.iter().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_read_known_stream_types() {
        for (i, p) in PROJECTIONS.iter().enumerate() {
            assert!(
                PROJECTIONS[i + 1..].iter().all(|q| q.name != p.name),
                "{} twice",
                p.name
            );
            assert!(
                !p.stream_types.is_empty() && !p.tables.is_empty(),
                "{}",
                p.name
            );
            for t in p.stream_types {
                assert!(keel_domain::STREAM_TYPES.contains(t), "{}: {t}", p.name);
            }
        }
        assert_eq!(find("orders"), Some(&ORDERS));
        assert_eq!(find("nope"), None);
    }
}
