//! A `KEEL__*` variable whose value is not UTF-8 is refused, naming the variable, like any other
//! bad value (it was dropped without a word). In a binary of its own: it sets a process
//! environment variable.

#![cfg(unix)]

use std::{ffi::OsStr, os::unix::ffi::OsStrExt};

use keel_core::{config::ConfigLoader, ConfigError, Origin};
use serde::Deserialize;

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Shop {
    currency: String,
}

impl Default for Shop {
    fn default() -> Self {
        Self {
            currency: "EUR".to_owned(),
        }
    }
}

#[test]
fn a_value_that_is_not_utf8_is_refused_naming_the_variable() {
    const VAR: &str = "KEELNOTUTF8__SHOP__CURRENCY";
    std::env::set_var(VAR, OsStr::from_bytes(b"US\xffD"));
    let mut loader = ConfigLoader::new().with_env_prefix("KEELNOTUTF8");
    loader.register::<Shop>("shop").unwrap();
    let err = loader.load().unwrap_err();
    std::env::remove_var(VAR);
    match &err {
        ConfigError::Invalid { key, origin, .. } => {
            assert_eq!(key, "shop.currency");
            assert_eq!(origin, &Origin::Env { var: VAR.into() });
        }
        other => panic!("{other:?}"),
    }
}
