//! Validated identifiers and short texts. Invalid values cannot be constructed.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// Longest identifier accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest free text accepted (names, carriers, reasons), in characters.
pub const MAX_TEXT_CHARS: usize = 200;

fn check_id(field: &str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if s.starts_with('.') {
        return Err(ValidationError::new(field, "must not start with '.'"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~')))
    {
        return Err(ValidationError::new(
            field,
            format!("may contain only letters, digits, '-', '_', '.' and '~' (found {c:?})"),
        ));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident, $field:literal, $max:expr) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses and validates the value.
            pub fn parse(s: impl Into<String>) -> Result<Self, ValidationError> {
                let s = s.into();
                check_id($field, &s, $max)?;
                Ok(Self(s))
            }

            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A product's stock-keeping unit, which is also the product's id.
    Sku, "sku", 64
);
string_id!(
    /// A customer's id.
    CustomerId, "customer_id", MAX_ID_LEN
);
string_id!(
    /// An order's id.
    OrderId, "order_id", MAX_ID_LEN
);

/// A short, non-blank free text: a name, a carrier, a tracking number, a reason.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Text(String);

impl Text {
    /// Parses a text for `field`: not blank, at most [`MAX_TEXT_CHARS`], no control characters.
    pub fn parse(field: &str, s: impl Into<String>) -> Result<Self, ValidationError> {
        let s = s.into();
        if s.trim().is_empty() {
            return Err(ValidationError::new(field, "must not be blank"));
        }
        if s.chars().count() > MAX_TEXT_CHARS {
            return Err(ValidationError::new(
                field,
                format!("must be at most {MAX_TEXT_CHARS} characters"),
            ));
        }
        if s.chars().any(char::is_control) {
            return Err(ValidationError::new(
                field,
                "must not contain control characters",
            ));
        }
        Ok(Self(s))
    }

    /// The text as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Text {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse("", s)
    }
}

impl From<Text> for String {
    fn from(v: Text) -> String {
        v.0
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An e-mail address: one `@`, a local part and a dotted domain, no spaces.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email(String);

impl Email {
    /// Parses and validates an e-mail address.
    pub fn parse(s: impl Into<String>) -> Result<Self, ValidationError> {
        let s = s.into();
        let bad = |reason: &str| Err(ValidationError::new("email", reason));
        if s.len() > 254 {
            return bad("must be at most 254 characters");
        }
        let Some((local, domain)) = s.split_once('@') else {
            return bad("must contain '@'");
        };
        if local.is_empty() || local.len() > 64 {
            return bad("the part before '@' must have 1 to 64 characters");
        }
        if local.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '@' | '<' | '>' | ',' | ';' | '"')
        }) {
            return bad("the part before '@' contains a character not allowed in an address");
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 {
            return bad("the domain must contain a '.'");
        }
        for label in labels {
            if label.is_empty()
                || label.len() > 63
                || label.starts_with('-')
                || label.ends_with('-')
                || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return bad("the domain is not a valid host name");
            }
        }
        Ok(Self(s))
    }

    /// The address as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Email {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<Email> for String {
    fn from(v: Email) -> String {
        v.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A positive count of units, at most [`Quantity::MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Quantity(u32);

impl Quantity {
    /// The largest quantity one command may carry.
    pub const MAX: u32 = 1_000_000;

    /// Parses a quantity for `field`: from 1 to [`Quantity::MAX`].
    pub fn parse(field: &str, n: u64) -> Result<Self, ValidationError> {
        match u32::try_from(n) {
            Ok(n) if (1..=Self::MAX).contains(&n) => Ok(Self(n)),
            _ => Err(ValidationError::new(
                field,
                format!("must be between 1 and {}", Self::MAX),
            )),
        }
    }

    /// The quantity as a number.
    pub fn get(self) -> u64 {
        u64::from(self.0)
    }
}

impl TryFrom<u64> for Quantity {
    type Error = ValidationError;
    fn try_from(n: u64) -> Result<Self, Self::Error> {
        Self::parse("quantity", n)
    }
}

impl From<Quantity> for u64 {
    fn from(q: Quantity) -> u64 {
        q.get()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ids_reject_empty_long_and_odd_characters() {
        assert!(Sku::parse("MUG-1").is_ok());
        assert_eq!(Sku::parse("").unwrap_err().field, "sku");
        assert!(Sku::parse("a".repeat(65)).is_err());
        assert!(OrderId::parse("o/42").is_err());
        assert!(OrderId::parse("..").is_err());
        assert!(CustomerId::parse("c 1").is_err());
    }

    #[test]
    fn emails_are_checked() {
        for ok in ["a@example.com", "ada.lovelace+shop@mail.example.co.uk"] {
            assert!(Email::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a",
            "a@",
            "@example.com",
            "a@example",
            "a b@example.com",
            "a@exa mple.com",
            "a@@example.com",
            "a@-x.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_rejects_blank_long_and_control() {
        assert!(Text::parse("name", "Mug").is_ok());
        assert_eq!(Text::parse("name", "  ").unwrap_err().field, "name");
        assert!(Text::parse("name", "x".repeat(201)).is_err());
        assert!(Text::parse("name", "a\nb").is_err());
    }

    #[test]
    fn quantity_bounds() {
        assert!(Quantity::parse("q", 0).is_err());
        assert_eq!(Quantity::parse("q", 1).unwrap().get(), 1);
        assert!(Quantity::parse("q", u64::from(Quantity::MAX) + 1).is_err());
        assert!(serde_json::from_str::<Quantity>("0").is_err());
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip_through_json(s in "[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,63}") {
            let sku = Sku::parse(s.clone()).unwrap();
            let json = serde_json::to_string(&sku).unwrap();
            prop_assert_eq!(serde_json::from_str::<Sku>(&json).unwrap(), sku);
        }

        #[test]
        fn any_string_either_parses_or_names_the_field(s in ".*") {
            match OrderId::parse(s.clone()) {
                Ok(id) => prop_assert_eq!(id.as_str(), s.as_str()),
                Err(e) => prop_assert_eq!(e.field, "order_id"),
            }
        }
    }
}
