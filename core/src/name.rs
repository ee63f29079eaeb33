use std::{fmt, str::FromStr, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::error::InvalidName;

/// The name of a service: `orders`, `payments-eu`, `billing.v2`.
///
/// 1 to 63 characters of lowercase ASCII letters, digits, `-`, `_` and `.`, starting with a letter
/// or digit: a name that is safe as a DNS label, a Redis key segment, an etcd path segment and a
/// metric label alike. Cloning is cheap (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(Arc<str>);

impl ServiceName {
    /// The longest name accepted.
    pub const MAX_LEN: usize = 63;

    /// Validates and wraps a name.
    pub fn new(name: impl AsRef<str>) -> Result<Self, InvalidName> {
        let name = name.as_ref();
        let invalid = |reason: &'static str| InvalidName {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("is empty"));
        }
        if name.len() > Self::MAX_LEN {
            return Err(invalid("is longer than 63 characters"));
        }
        let first = name.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(invalid("must start with a lowercase letter or a digit"));
        }
        if !name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        }) {
            return Err(invalid(
                "may hold only lowercase letters, digits, '-', '_' and '.'",
            ));
        }
        Ok(Self(Arc::from(name)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for ServiceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for ServiceName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for ServiceName {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<&str> for ServiceName {
    type Error = InvalidName;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<ServiceName> for String {
    fn from(n: ServiceName) -> String {
        n.0.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_rejects() {
        assert!(ServiceName::new("orders").is_ok());
        assert!(ServiceName::new("payments-eu.v2_x").is_ok());
        assert!(ServiceName::new("").is_err());
        assert!(ServiceName::new("Orders").is_err());
        assert!(ServiceName::new("-x").is_err());
        assert!(ServiceName::new("a b").is_err());
        assert!(ServiceName::new("a".repeat(64)).is_err());
        let err = ServiceName::new("Bad").unwrap_err();
        assert!(err.to_string().contains("Bad"), "{err}");
    }

    proptest! {
        #[test]
        fn never_panics(s in ".*") {
            let _ = ServiceName::new(&s);
        }

        #[test]
        fn valid_names_round_trip(s in "[a-z0-9][a-z0-9._-]{0,62}") {
            let n = ServiceName::new(&s).unwrap();
            let json = serde_json::to_string(&n).unwrap();
            let back: ServiceName = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, n);
        }
    }
}
