//! # keel
//!
//! Service governance inside the process: configuration that changes while the service runs,
//! discovery and registration, client-side load balancing with health checks, fault-tolerant
//! calls and idempotent endpoints — assembled by one builder, with no proxy hop and no sidecar.
//!
//! ```no_run
//! use serde::Deserialize;
//!
//! #[derive(Debug, PartialEq, Deserialize, Default)]
//! #[serde(deny_unknown_fields, default)]
//! struct Shop {
//!     discount_percent: u32,
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), keel::Error> {
//!     let keel = keel::Keel::builder("orders")
//!         .config_file("keel.toml")          // optional; KEEL__* env vars layer on top
//!         .settings::<Shop>("shop")          // the application's own section
//!         .build()
//!         .await?;
//!     let shop = keel.settings::<Shop>("shop")?;   // hot: edit keel.toml, the next load sees it
//!     println!("discount: {}%", shop.load().discount_percent);
//!     Ok(())
//! }
//! ```
//!
//! ## The order of things
//!
//! An outgoing call (`keel.client("payments")?.post(..).send()`), outermost first: total
//! deadline → retry with budget → hedge → circuit breaker → bulkhead → rate limit → per-try
//! timeout → chaos → balancer (strategy, health, ejection; retries avoid instances already
//! tried) → one connection pool per instance. See `keel_resilience`'s stack docs for why each
//! sits where it does.
//!
//! An incoming request (`keel.serve(router)`): deadline check (504 when the caller has given up)
//! → shedding (503) → rate limit (429) → trace context (`traceparent`, and the caller's deadline
//! for the handler's own calls) → the application's routes and their own layers (idempotency
//! where a route asks for it). `/healthz`, `/readyz`, `/metrics` and `/keel/status` sit beside
//! them, not behind the limits.
//!
//! The crates behind it are usable alone: [`keel_core`] (live values, layered config, hot
//! reload), `keel_discovery`, `keel_balance`, `keel_resilience` and `keel_idempotency`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod builder;
mod client;
mod error;
mod server;
mod settings;
mod stack;
pub mod trace;
mod transport;

pub(crate) use keel_core::{find_in_chain, lock};

pub use keel_balance;
pub use keel_core;
pub use keel_core::{Live, ServiceName};
pub use keel_discovery;
pub use keel_idempotency;
pub use keel_resilience;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use self::{
    builder::{process_memory_discovery, Keel, KeelBuilder},
    client::{Client, ClientError, RequestBuilder, Response},
    error::Error,
    settings::{default_config_toml, ClientConfig, ClientsSection, InboundConfig},
};
