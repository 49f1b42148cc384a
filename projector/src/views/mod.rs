//! The shop's read models.

mod audit_log;
mod customers;
mod daily_sales;
mod flagged_payments;
mod orders;
mod products;

use std::sync::Arc;

pub use audit_log::AuditLog;
pub use customers::Customers;
pub use daily_sales::DailySales;
pub use flagged_payments::{FLAG_THRESHOLD_MINOR, FlaggedPayments};
pub use orders::Orders;
pub use products::Products;

use crate::projection::Projection;

/// Every projection of the shop.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(Orders),
        Arc::new(Products),
        Arc::new(Customers),
        Arc::new(DailySales),
        Arc::new(FlaggedPayments),
        Arc::new(AuditLog),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_projection_of_the_read_contract_is_implemented_once() {
        let names: Vec<&str> = super::all().iter().map(|p| p.name()).collect();
        let contract: Vec<&str> = keel_views::PROJECTIONS.iter().map(|p| p.name).collect();
        assert_eq!(names, contract);
    }
}
