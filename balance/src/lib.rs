//! # keel-balance
//!
//! Which instance serves this request. A client-side load balancer for the instances of one
//! service, usable alone (the [`Balancer`] picker) or as a tower service ([`Balance`] +
//! [`BalanceLayer`]) that routes each `http::Request` to a per-instance inner service.
//!
//! ## Why client-side, and why these algorithms
//!
//! The client sees every response, so it learns latency and failures without any extra probe
//! traffic; it can react within one request. The strategies are the ones the field has settled on:
//!
//! | `strategy`      | source                                                     | use it for                  |
//! |-----------------|------------------------------------------------------------|-----------------------------|
//! | `p2c-ewma`      | Finagle / linkerd: power of two choices on peak EWMA        | default: latency-aware      |
//! | `least-request` | Envoy `LEAST_REQUEST`: P2C on in-flight, `weight/(a+1)^bias` | uniform, short requests     |
//! | `round-robin`   | nginx smooth weighted round robin (`ngx_http_upstream_round_robin.c`) | exact weighted sequences |
//! | `random`        | weighted random (Vose alias table)                         | many clients, no state      |
//! | `ring-hash`     | ketama consistent hashing, 160 points per weight unit      | affinity, few moves         |
//! | `maglev`        | Eisenbud et al., *Maglev*, NSDI 2016                       | affinity, O(1) lookup       |
//! | `least-conn`    | nginx `least_conn`                                         | long-lived connections      |
//!
//! `round-robin` over equal weights costs O(1) per pick (an atomic rotation that replays nginx's
//! exact sequence while no weight is lowered, no health changes and no instance is avoided);
//! with unequal weights, slow start or `max_conns` it walks every member, as nginx does, and so
//! does `least-conn`.
//!
//! Hash strategies take an optional bounded load (`hash_balance_factor`, HAProxy's
//! `hash-balance-factor`, after Mirrokni et al., *Consistent Hashing with Bounded Loads*).
//!
//! Around every strategy: nginx semantics per instance (`weight`, `down`, `backup`, `max_conns`,
//! `max_fails`/`fail_timeout`), Envoy slow start, Envoy outlier detection, Envoy's panic threshold,
//! zone-aware routing with spill-over and canary subsets. See [`BalanceConfig`].
//!
//! ## Hot configuration, stable state
//!
//! Instances come in as a [`keel_core::Live`]`<Vec<Instance>>`, active health as a
//! `Live<HealthMap>`, the policy as a `Live<BalanceConfig>`. Each pick loads them once (lock-free)
//! and, when any of them changed, rebuilds the pick tables; per-instance state (EWMA, in-flight,
//! ejections, effective weights) lives beside the tables, keyed by the stable `InstanceId`, so a
//! reload or a weight change never forgets what was learned. A removed instance is never picked
//! after the `store` that removed it returns.
//!
//! ```
//! use keel_balance::{BalanceConfig, Balancer, Outcome, RequestInfo};
//! use keel_core::{Instance, Live, ServiceName};
//!
//! let svc = ServiceName::new("payments").unwrap();
//! let instances = Live::new(vec![
//!     Instance::new(svc.clone(), "127.0.0.1:8001".parse().unwrap()),
//!     Instance::new(svc.clone(), "127.0.0.1:8002".parse().unwrap()).with_weight(2),
//! ]);
//! let balancer = Balancer::new(svc, instances, Live::new(BalanceConfig::default())).unwrap();
//! let picked = balancer.pick(&RequestInfo::default()).expect("two instances");
//! println!("sending to {}", picked.addr());
//! picked.complete(Outcome::Success);
//! ```
//!
//! ## As a tower service
//!
//! [`Balance`] (or [`BalanceLayer`] over a factory) makes one inner service per instance with a
//! user factory `Fn(&Instance) -> S` when the instance appears, and drops it when it leaves. Each
//! call reads the request's [`keel_core::request::Attempt`] (instances to avoid) and
//! [`HashKey`], picks, drives the instance's service, classifies the response
//! ([`HttpClassifier`] by default) and adds [`keel_core::request::ServedBy`] to it.
//!
//! ## Failure modes
//!
//! - Nothing can take the request (no instance, all `down`, all at `max_conns`): the call fails
//!   at once with [`BalanceError::NoInstance`], retryable. Unhealthy instances alone are not a
//!   reason: below the panic threshold the balancer uses them anyway.
//! - The picked instance's service fails: the error comes back as a
//!   [`keel_core::request::InstanceFailure`] naming the instance, counted as a gateway failure
//!   (passive health, outlier detection, EWMA).
//! - A policy that fails [`BalanceConfig::validate`] is refused at construction; published later
//!   anyway, it is logged and the last good one stays in force.
//! - Metric handles are registered when an instance first appears: install the recorder before
//!   building balancers, and call [`telemetry::describe`] once.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod classify;
mod config;
mod discover;
mod error;
mod hash;
mod outlier;
mod picker;
mod roster;
mod service;
mod snapshot;
mod state;
mod tables;
pub mod telemetry;

pub use self::{
    classify::{Classify, HttpClassifier, Outcome},
    config::{
        BalanceConfig, CanaryConfig, HashKeySource, HeaderMatch, OutlierConfig,
        PassiveHealthConfig, SlowStartConfig, Strategy, ZoneConfig,
    },
    discover::{from_discover, DiscoveredServices},
    error::BalanceError,
    hash::{hash_bytes, HashKey},
    picker::{Balancer, Picked, RequestInfo},
    service::{Balance, BalanceLayer, MakeInstanceService, ResponseFuture},
    snapshot::{BalancerSnapshot, InstanceSnapshot},
    tables::{Maglev, Ring},
};
