//! Units as people write them in configuration: durations `800ms`, `5s`, `1m30s`; ratios `0.2`
//! or `20%`.
//!
//! Use [`serde_duration`] on `Duration` fields (`#[serde(with = "keel_core::units::serde_duration")]`,
//! or `serde_duration::option` for `Option<Duration>`), and [`Ratio`] for fractions.

use std::{fmt, str::FromStr, time::Duration};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// The longest duration [`parse_duration`] accepts: `100y` (years of 365.25 days). Anything longer means "never" to
/// whoever wrote it, and cannot be added to a clock reading (`Instant::now() + d` panics for
/// durations near `u64::MAX` seconds), so it is refused rather than left to fail at first use.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Parses `800ms`, `5s`, `1m30s`, `2h`, `250us`. A bare number is refused: a unit is required,
/// because `5` could mean seconds to one reader and milliseconds to another. Durations longer
/// than [`MAX_DURATION`] are refused.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(UnitError::Duration {
            input: s.to_owned(),
            reason: "is empty",
        });
    }
    if t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(UnitError::Duration {
            input: s.to_owned(),
            reason: "needs a unit, e.g. 800ms or 5s",
        });
    }
    let d = humantime::parse_duration(t).map_err(|_| UnitError::Duration {
        input: s.to_owned(),
        reason: "is not a duration like 800ms, 5s or 1m30s",
    })?;
    if d > MAX_DURATION {
        return Err(UnitError::Duration {
            input: s.to_owned(),
            reason: "is longer than 100 years",
        });
    }
    Ok(d)
}

/// Formats a duration the way [`parse_duration`] reads it (`1s 500ms` → `1s500ms`).
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    humantime::format_duration(d).to_string().replace(' ', "")
}

/// A unit that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnitError {
    /// Not a duration.
    #[error("duration {input:?} {reason}")]
    Duration {
        /// What was given.
        input: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// Not a ratio.
    #[error("ratio {input:?} {reason}")]
    Ratio {
        /// What was given.
        input: String,
        /// Why it was refused.
        reason: &'static str,
    },
}

/// Serde for `Duration` written as `800ms` / `5s`.
pub mod serde_duration {
    use super::*;

    /// Serializes as `800ms`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    /// Deserializes `800ms` / `5s`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl de::Visitor<'_> for DurationVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"800ms\" or \"5s\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            if v == 0 {
                Ok(Duration::ZERO)
            } else {
                Err(E::custom(format!(
                    "duration {v} needs a unit, e.g. \"{v}ms\" or \"{v}s\""
                )))
            }
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "duration {v} needs a unit, e.g. \"{v}s\""
            )))
        }
    }

    /// Serde for `Option<Duration>`.
    pub mod option {
        use super::*;

        /// Serializes `Some(d)` as `800ms`, `None` as nothing.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&format_duration(*d)),
                None => s.serialize_none(),
            }
        }

        /// Deserializes an optional `800ms`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct W(#[serde(with = "super")] Duration);
            Option::<W>::deserialize(d).map(|o| o.map(|w| w.0))
        }
    }
}

/// A fraction between 0 and 1, written `0.2` or `20%`.
///
/// ```
/// use keel_core::Ratio;
/// assert_eq!("20%".parse::<Ratio>().unwrap().get(), 0.2);
/// assert_eq!("0.2".parse::<Ratio>().unwrap(), Ratio::new(0.2).unwrap());
/// assert!("120%".parse::<Ratio>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Ratio(f64);

impl Ratio {
    /// Zero.
    pub const ZERO: Ratio = Ratio(0.0);
    /// One.
    pub const ONE: Ratio = Ratio(1.0);

    /// A ratio in `[0, 1]`.
    pub fn new(v: f64) -> Result<Self, UnitError> {
        if v.is_finite() && (0.0..=1.0).contains(&v) {
            Ok(Self(v))
        } else {
            Err(UnitError::Ratio {
                input: v.to_string(),
                reason: "must be between 0 and 1 (or 0% and 100%)",
            })
        }
    }

    /// The value in `[0, 1]`.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0 * 100.0)
    }
}

impl FromStr for Ratio {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let t = s.trim();
        let bad = |reason| UnitError::Ratio {
            input: s.to_owned(),
            reason,
        };
        let v = if let Some(p) = t.strip_suffix('%') {
            p.trim()
                .parse::<f64>()
                .map_err(|_| bad("is not a number followed by %"))?
                / 100.0
        } else {
            t.parse::<f64>()
                .map_err(|_| bad("is not a number like 0.2 or 20%"))?
        };
        Ratio::new(v).map_err(|_| bad("must be between 0 and 1 (or 0% and 100%)"))
    }
}

impl Serialize for Ratio {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Ratio;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a ratio such as 0.2 or \"20%\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ratio, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Ratio, E> {
                Ratio::new(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ratio, E> {
                Ratio::new(v as f64).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ratio, E> {
                Ratio::new(v as f64).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("800ms").unwrap(), Duration::from_millis(800));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
    }

    #[test]
    fn durations_too_long_for_a_clock_are_refused() {
        // Accepted by humantime, but `Instant::now() + d` panics: every call would.
        for s in ["18446744073709551615s", "584942417355y", "101y"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
        assert_eq!(parse_duration("100y").unwrap(), MAX_DURATION);
    }

    #[test]
    fn ratios() {
        assert_eq!("20%".parse::<Ratio>().unwrap().get(), 0.2);
        assert_eq!(" 0.25 ".parse::<Ratio>().unwrap().get(), 0.25);
        assert!("1.5".parse::<Ratio>().is_err());
        assert!("-1%".parse::<Ratio>().is_err());
        assert!("NaN".parse::<Ratio>().is_err());
        assert!("x%".parse::<Ratio>().is_err());
    }

    proptest! {
        #[test]
        fn duration_round_trips(ms in 0u64..10_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }

        #[test]
        fn every_accepted_duration_can_be_added_to_the_clock(secs in any::<u64>(), unit in prop_oneof!["s", "m", "h", "d", "y", "ms"]) {
            if let Ok(d) = parse_duration(&format!("{secs}{unit}")) {
                prop_assert!(tokio::time::Instant::now().checked_add(d).is_some());
                prop_assert!(std::time::Instant::now().checked_add(d * 2).is_some());
            }
        }

        #[test]
        fn parsers_never_panic(s in ".{0,40}") {
            let _ = parse_duration(&s);
            let _ = s.parse::<Ratio>();
        }
    }
}
