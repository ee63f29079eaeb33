//! # keel-core
//!
//! The ground floor of keel, on which every other keel crate stands. It depends on no other keel
//! crate and is useful alone:
//!
//! - [`ServiceName`] and [`Instance`]: who serves, where, with which weight, zone, version and
//!   administrative state; validated on construction and on deserialization, naming the bad field.
//! - [`Live<T>`]: a hot value. One lock-free `load()` per read (arc-swap), a generation number
//!   and change notification ([`Live::subscribe`]), and projection ([`Live::project`]) so that a
//!   component holds only its own section of a larger document.
//! - [`config`]: one typed document, layered `defaults < files < env < overrides`, assembled from
//!   *sections* registered by whoever uses them, validated whole before anything is published, and
//!   kept live by a [`ConfigWatcher`] that survives every way editors and Kubernetes replace files.
//! - [`Shutdown`]: one signal for SIGTERM/SIGINT and for programmatic stops.
//! - [`telemetry`]: the names of every metric keel emits, in one place.
//!
//! ```
//! use keel_core::{Live, config::ConfigLoader};
//! use serde::Deserialize;
//!
//! #[derive(Debug, Deserialize, PartialEq)]
//! #[serde(deny_unknown_fields)]
//! struct Shop {
//!     #[serde(default)]
//!     discount_percent: u32,
//! }
//!
//! # fn main() -> Result<(), keel_core::ConfigError> {
//! let mut loader = ConfigLoader::new().with_override("shop.discount_percent", 15);
//! loader.register::<Shop>("shop")?;
//! let config = loader.load()?;
//! let shop: Live<Shop> = config.section("shop")?;
//! assert_eq!(shop.load().discount_percent, 15);
//! assert_eq!(config.generation(), 1);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
mod error;
pub mod health;
mod instance;
mod live;
mod name;
pub mod request;
mod shutdown;
pub mod telemetry;
pub mod units;

/// Locks `m`, taking the data even if a panicking holder poisoned it: every value keel keeps
/// behind a mutex is valid after any single update, so a panic elsewhere must not turn into a
/// panic (or a silently skipped update) here.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The first error of type `E` in `err`'s source chain, `err` included: how keel's layers
/// recognise each other's errors (e.g. `InstanceFailure`) without string matching.
pub fn find_in_chain<'a, E: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    std::iter::successors(Some(err), |e| e.source()).find_map(|e| e.downcast_ref::<E>())
}

pub use self::{
    config::{Config, ConfigLoader, ConfigWatcher, Origin},
    error::{ConfigError, InvalidInstance, InvalidName},
    health::{Health, HealthMap, HealthSource, HealthStatus},
    instance::{AdminState, Instance, InstanceId, ServerParams},
    live::{Live, LiveCache, LiveGuard, LiveWatch},
    name::ServiceName,
    shutdown::Shutdown,
    units::Ratio,
};
