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
