//! # keel-discovery
//!
//! Where the instances of a service come from, and how a service announces its own.
//!
//! - [`Discover`]: a watch on a service's set: a [`Live`](keel_core::Live) snapshot (one
//!   lock-free load per request) plus [`Changes`], and an adapter to `tower::discover::Discover`
//!   ([`InstanceWatch::into_tower`]).
//! - [`Registry`]: [`register`](Registry::register) returns a [`Registration`] that heartbeats in
//!   the background, re-registers by itself after the registry restarts or the lease is lost,
//!   [`drain`](Registration::drain)s and [`deregister`](Registration::deregister)s.
//! - Backends: [`MemoryDiscovery`] (the embedded default), [`StaticDiscovery`],
//!   [`FileDiscovery`], [`DnsDiscovery`], [`RedisDiscovery`], [`EtcdDiscovery`];
//!   [`from_config`] builds the one the `[discovery]` section names.
//! - Registry-loss safety ([`ShrinkGuard`]): the last known set is kept while a backend is
//!   unreachable, an empty answer or a large shrink is believed only once it persists, and the
//!   last good set can be cached on disk for a start while the backend is down.
//! - Active health checks ([`HealthChecker`]), HTTP or TCP with HAProxy's `fall`/`rise`
//!   semantics, publishing a [`HealthMap`](keel_core::HealthMap).
//!
//! **Passive health** (nginx `max_fails` within `fail_timeout`) is not here: it is implemented in
//! keel-balance, which sees every response. The per-instance parameters it uses are carried on
//! [`Instance::params`](keel_core::Instance).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keel_discovery::DiscoveryError> {
//! use keel_core::{Instance, ServiceName, Shutdown};
//! use keel_discovery::{from_config, DiscoveryConfig};
//!
//! // No configuration: the in-memory backend.
//! let discovery = from_config(&DiscoveryConfig::default(), Shutdown::new()).await?;
//! let payments = ServiceName::new("payments").unwrap();
//! let watch = discovery.watch(&payments)?;
//! let me = Instance::new(payments.clone(), "127.0.0.1:8066".parse().unwrap());
//! let registration = discovery.register(me).await?;
//! assert_eq!(watch.live().load().len(), 1);
//! registration.drain().await?;
//! registration.deregister().await?;
//! assert!(watch.snapshot().is_empty());
//! # Ok(()) }
//! ```
//!
//! Key layouts of the Redis and etcd backends are documented on [`RedisDiscovery`] and
//! [`EtcdDiscovery`].
//!
//! The DNS, Redis and etcd backends are behind the `dns`, `redis` and `etcd` features (default
//! on); [`from_config`] refuses a backend left out of the build.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// Helpers shared by the Redis, etcd and DNS backends are unused in a build without them.
#![cfg_attr(
    not(all(feature = "redis", feature = "etcd", feature = "dns")),
    allow(dead_code)
)]

mod config;
#[cfg(feature = "dns")]
mod dns;
mod error;
#[cfg(feature = "etcd")]
mod etcd;
mod file;
mod health;
mod memory;
mod publish;
#[cfg(feature = "redis")]
mod redis;
mod registration;
mod setup;
mod snapshot;
mod static_discovery;
pub mod telemetry;
mod traits;

pub use self::{
    config::{
        Backend, CheckKind, DiscoveryConfig, DnsConfig, DnsRecord, HealthCheckConfig,
        StaticEndpoint, MIN_DNS_TTL,
    },
    error::DiscoveryError,
    file::{parse_file, FileDiscovery, FileSets},
    health::{HealthChecker, Probe},
    memory::MemoryDiscovery,
    publish::{GuardDecision, ShrinkGuard},
    registration::Registration,
    setup::{from_config, watch_with_health},
    snapshot::{diff, Change, Changes, InstanceWatch, TowerDiscover},
    static_discovery::StaticDiscovery,
    traits::{BoxFuture, Discover, Discovery, Registry},
};

#[cfg(feature = "dns")]
pub use self::dns::DnsDiscovery;
#[cfg(feature = "etcd")]
pub use self::etcd::EtcdDiscovery;
#[cfg(feature = "redis")]
pub use self::redis::RedisDiscovery;
