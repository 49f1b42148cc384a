//! Money: integer minor units with an ISO 4217 currency code. No floats anywhere.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// The largest amount accepted, in minor units (10^15: sums of many stay far from overflow).
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

/// A three-letter upper-case currency code, such as `EUR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// Parses a currency code: exactly three upper-case ASCII letters.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        match s.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|x| x.is_ascii_uppercase()) => Ok(Self([*a, *b, *c])),
            _ => Err(ValidationError::new(
                "currency",
                "must be three upper-case letters (ISO 4217), e.g. EUR",
            )),
        }
    }

    /// The code as a string slice.
    pub fn as_str(&self) -> &str {
        // Only ASCII upper-case letters can be stored.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl TryFrom<String> for Currency {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.as_str().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A non-negative amount of money in minor units (cents) of one currency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawMoney")]
pub struct Money {
    amount_minor: i64,
    currency: Currency,
}

#[derive(Deserialize)]
struct RawMoney {
    amount_minor: i64,
    currency: Currency,
}

impl TryFrom<RawMoney> for Money {
    type Error = ValidationError;
    fn try_from(raw: RawMoney) -> Result<Self, Self::Error> {
        Self::new(raw.amount_minor, raw.currency)
    }
}

impl Money {
    /// An amount from 0 to [`MAX_AMOUNT_MINOR`] minor units.
    pub fn new(amount_minor: i64, currency: Currency) -> Result<Self, ValidationError> {
        if !(0..=MAX_AMOUNT_MINOR).contains(&amount_minor) {
            return Err(ValidationError::new(
                "amount_minor",
                format!("must be between 0 and {MAX_AMOUNT_MINOR}"),
            ));
        }
        Ok(Self {
            amount_minor,
            currency,
        })
    }

    /// Zero in `currency`.
    pub fn zero(currency: Currency) -> Self {
        Self {
            amount_minor: 0,
            currency,
        }
    }

    /// The amount in minor units.
    pub fn amount_minor(&self) -> i64 {
        self.amount_minor
    }

    /// The currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// True for an amount greater than zero.
    pub fn is_positive(&self) -> bool {
        self.amount_minor > 0
    }

    /// The sum, or `None` on a currency mismatch or when it exceeds [`MAX_AMOUNT_MINOR`].
    pub fn checked_add(self, other: Money) -> Option<Money> {
        if self.currency != other.currency {
            return None;
        }
        let sum = self.amount_minor.checked_add(other.amount_minor)?;
        Money::new(sum, self.currency).ok()
    }

    /// The difference, or `None` on a currency mismatch or a negative result.
    pub fn checked_sub(self, other: Money) -> Option<Money> {
        if self.currency != other.currency {
            return None;
        }
        Money::new(
            self.amount_minor.checked_sub(other.amount_minor)?,
            self.currency,
        )
        .ok()
    }

    /// The amount times `n`, or `None` when it exceeds [`MAX_AMOUNT_MINOR`].
    pub fn checked_mul(self, n: u64) -> Option<Money> {
        let n = i64::try_from(n).ok()?;
        Money::new(self.amount_minor.checked_mul(n)?, self.currency).ok()
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount_minor, self.currency)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn eur(n: i64) -> Money {
        Money::new(n, Currency::parse("EUR").unwrap()).unwrap()
    }

    #[test]
    fn currency_codes() {
        assert!(Currency::parse("EUR").is_ok());
        for bad in ["eur", "EU", "EURO", "E1R", ""] {
            assert!(Currency::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn money_rejects_negative_and_huge_amounts_on_the_wire() {
        assert!(serde_json::from_str::<Money>(r#"{"amount_minor":-1,"currency":"EUR"}"#).is_err());
        assert!(serde_json::from_str::<Money>(r#"{"amount_minor":1.5,"currency":"EUR"}"#).is_err());
        assert!(serde_json::from_str::<Money>(r#"{"amount_minor":1,"currency":"usd"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Money>(r#"{"amount_minor":1299,"currency":"EUR"}"#).unwrap(),
            eur(1299)
        );
    }

    #[test]
    fn arithmetic_refuses_mixed_currencies() {
        let usd = Money::new(1, Currency::parse("USD").unwrap()).unwrap();
        assert_eq!(eur(1).checked_add(usd), None);
        assert_eq!(eur(1).checked_sub(eur(2)), None);
        assert_eq!(eur(MAX_AMOUNT_MINOR).checked_add(eur(1)), None);
    }

    proptest! {
        #[test]
        fn add_then_sub_is_identity(a in 0..MAX_AMOUNT_MINOR / 2, b in 0..MAX_AMOUNT_MINOR / 2) {
            let sum = eur(a).checked_add(eur(b)).unwrap();
            prop_assert_eq!(sum.checked_sub(eur(b)).unwrap(), eur(a));
        }
    }
}
