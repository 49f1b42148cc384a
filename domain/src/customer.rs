//! The customer aggregate: profile and contact address.

use serde::{Deserialize, Serialize};

use crate::ids::{Email, Text};
use crate::{Aggregate, DomainError, DomainEvent};

/// Commands a customer accepts.
#[derive(Clone, Debug, PartialEq)]
pub enum CustomerCommand {
    /// Registers a new customer.
    RegisterCustomer {
        /// Contact address.
        email: Email,
        /// Display name.
        name: Text,
    },
    /// Changes the contact address. The same address again changes nothing.
    ChangeEmail {
        /// The new address.
        email: Email,
    },
}

/// Events of a customer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum CustomerEvent {
    /// A customer registered.
    CustomerRegistered {
        /// Contact address.
        email: Email,
        /// Display name.
        name: Text,
    },
    /// A customer's contact address changed.
    CustomerEmailChanged {
        /// The new address.
        email: Email,
    },
}

impl DomainEvent for CustomerEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::CustomerRegistered { .. } => "CustomerRegistered",
            Self::CustomerEmailChanged { .. } => "CustomerEmailChanged",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }
}

/// A customer: not yet registered, or registered with a profile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Customer {
    /// No customer with this id exists.
    #[default]
    Unregistered,
    /// The customer exists.
    Registered {
        /// Contact address.
        email: Email,
        /// Display name.
        name: Text,
    },
}

impl Aggregate for Customer {
    const TYPE: &'static str = "customer";
    const EVENT_TYPES: &'static [(&'static str, u32)] =
        &[("CustomerRegistered", 1), ("CustomerEmailChanged", 1)];
    type Command = CustomerCommand;
    type Event = CustomerEvent;

    fn decide(&self, command: &CustomerCommand) -> Result<Vec<CustomerEvent>, DomainError> {
        match (self, command) {
            (Customer::Unregistered, CustomerCommand::RegisterCustomer { email, name }) => {
                Ok(vec![CustomerEvent::CustomerRegistered {
                    email: email.clone(),
                    name: name.clone(),
                }])
            }
            (Customer::Registered { .. }, CustomerCommand::RegisterCustomer { .. }) => {
                Err(DomainError::CustomerAlreadyRegistered)
            }
            (Customer::Unregistered, CustomerCommand::ChangeEmail { .. }) => {
                Err(DomainError::CustomerNotRegistered)
            }
            (
                Customer::Registered { email: current, .. },
                CustomerCommand::ChangeEmail { email },
            ) => {
                if current == email {
                    Ok(vec![])
                } else {
                    Ok(vec![CustomerEvent::CustomerEmailChanged {
                        email: email.clone(),
                    }])
                }
            }
        }
    }

    fn evolve(self, event: &CustomerEvent) -> Self {
        match (self, event) {
            (_, CustomerEvent::CustomerRegistered { email, name }) => Customer::Registered {
                email: email.clone(),
                name: name.clone(),
            },
            (Customer::Registered { name, .. }, CustomerEvent::CustomerEmailChanged { email }) => {
                Customer::Registered {
                    email: email.clone(),
                    name,
                }
            }
            (Customer::Unregistered, CustomerEvent::CustomerEmailChanged { .. }) => {
                Customer::Unregistered
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;

    fn email(s: &str) -> Email {
        Email::parse(s).unwrap()
    }
    fn registered() -> CustomerEvent {
        CustomerEvent::CustomerRegistered {
            email: email("ada@example.com"),
            name: Text::parse("name", "Ada").unwrap(),
        }
    }

    #[test]
    fn register() {
        given::<Customer>([])
            .when(CustomerCommand::RegisterCustomer {
                email: email("ada@example.com"),
                name: Text::parse("name", "Ada").unwrap(),
            })
            .then([registered()]);
    }

    #[test]
    fn register_twice_is_refused() {
        given::<Customer>([registered()])
            .when(CustomerCommand::RegisterCustomer {
                email: email("ada@example.com"),
                name: Text::parse("name", "Ada").unwrap(),
            })
            .then_err(DomainError::CustomerAlreadyRegistered);
    }

    #[test]
    fn change_email() {
        given::<Customer>([registered()])
            .when(CustomerCommand::ChangeEmail {
                email: email("ada@lovelace.org"),
            })
            .then([CustomerEvent::CustomerEmailChanged {
                email: email("ada@lovelace.org"),
            }]);
    }

    #[test]
    fn change_to_the_same_email_changes_nothing() {
        given::<Customer>([registered()])
            .when(CustomerCommand::ChangeEmail {
                email: email("ada@example.com"),
            })
            .then([]);
    }

    #[test]
    fn change_email_of_an_unknown_customer_is_refused() {
        given::<Customer>([])
            .when(CustomerCommand::ChangeEmail {
                email: email("ada@example.com"),
            })
            .then_err(DomainError::CustomerNotRegistered);
    }
}
