//! # keel-idempotency
//!
//! A request done once, however often it arrives. This crate implements the IETF
//! `Idempotency-Key` contract (`draft-ietf-httpapi-idempotency-key-header`, as Stripe runs it) as
//! a tower layer put on individual axum routes, a function API for work that is not HTTP, and two
//! stores: memory (the embedded default) and Redis.
//!
//! ```no_run
//! use std::sync::Arc;
//! use axum::{routing::post, Router, Extension};
//! use keel_core::Live;
//! use keel_idempotency::{store_from_config, FencingToken, IdempotencyConfig, IdempotencyLayer};
//!
//! # async fn run() -> Result<(), keel_idempotency::IdempotencyError> {
//! let cfg = Live::new(IdempotencyConfig::default());
//! let store = store_from_config(&cfg.get()).await?;
//! let app: Router = Router::new().route(
//!     "/payments",
//!     post(|Extension(fence): Extension<FencingToken>| async move { format!("paid, fence {}", fence.0) })
//!         .layer(IdempotencyLayer::new(store, cfg).required(true)),
//! );
//! # Ok(()) }
//! ```
//!
//! ## The guarantee, honestly
//!
//! - **What you get**: for one key (per scope, method and route), among requests that reach a
//!   healthy store, the handler runs to a stored answer at most once; duplicates get that answer
//!   byte for byte, a 409 while it runs, or a 422 if the request differs. A handler that fails
//!   (5xx, panic, dropped connection with `on_cancel = "release"`) frees the key so the client may
//!   retry: the contract is "at most one *completed* execution", and a failed execution may have
//!   left partial effects behind, as with any retry.
//! - **Leases**: a claim holds the key for `lease`, renewed every `lease / 3`. If the process
//!   stalls longer than the lease, another request may claim the key and run; the stall victim's
//!   completion is then refused (**owner-checked**: AWS Powertools' Redis layer completes and
//!   deletes unconditionally, so a slow original overwrites its successor; keel does not), and its
//!   handler was told through [`LeaseLost`]. What it already wrote downstream cannot be undone by
//!   the store: for that, pass the [`FencingToken`] to the downstream and have it refuse lower
//!   tokens.
//! - **What Redis alone gives**: atomic claims on one primary. Asynchronous replication can lose
//!   an acknowledged claim or completion on failover; `durability.replicas` (`WAIT`) narrows that
//!   window and fails closed, but Redis is not a consensus store. **For money movement**, make the
//!   effect itself idempotent too: a unique constraint on the idempotency key (or fencing token)
//!   in the same database transaction as the effect. Treat this crate as the fast path that spares
//!   that constraint nearly all duplicates, not as its replacement. The Redis store needs Redis
//!   7.0 or later (a claim is `SET ... NX GET`), and fencing tokens that grow need Redis's clock
//!   not to step back by more than the time between two claims of a key (they are its clock).
//! - **Store down**: fail closed by default (503 + `Retry-After`): no request runs whose duplicate
//!   could not be ruled out. Fail open only per route, for handlers idempotent by themselves. A
//!   completion that could not be stored leaves the key claimed until its lease expires; a retry
//!   after that runs again (the store never recorded the first run).
//! - **The memory store is bounded** (`memory_capacity` keys, `memory_max_bytes` bytes). When
//!   full it evicts completed answers, the one whose retention ends first first (counted in
//!   `keel_idempotency_memory_evictions_total`): **an evicted key can execute again**. Claims in
//!   progress are never evicted; when they alone fill it, new claims get 503 (`store-full`),
//!   or run without idempotency on a route that fails open. Use Redis when evictions happen.
//!
//! ## Order of work
//!
//! See [`Idempotency`]'s module documentation: method filter → key → body limit and fingerprint →
//! claim → replay | 409 | 422 | 503 | handler with watchdog → owner-checked completion or release.
//!
//! ## Metrics
//!
//! `keel_idempotency_claims_total{outcome}`, `keel_idempotency_lease_renewals_total{result}`,
//! `keel_idempotency_completes_total{result}`, `keel_idempotency_store_duration_seconds{op}`,
//! `keel_idempotency_fail_open_total`, `keel_idempotency_memory_evictions_total` (names in
//! [`telemetry`]). Logs and spans carry a prefix of
//! the hashed storage key, never the client's key.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod config;
mod error;
mod func;
mod future;
mod key;
mod layer;
mod lease;
mod problem;
mod record;
mod service;
mod store;
pub mod telemetry;
#[cfg(test)]
mod testing;

#[cfg(feature = "redis")]
pub use self::store::RedisStore;
pub use self::{
    config::{
        Durability, Fingerprint, IdempotencyConfig, OnCancel, OnConflict, OnStoreError, StoreKind,
        StorePolicy, MIN_LEASE,
    },
    error::IdempotencyError,
    func::{Idempotent, RunError},
    future::ResponseFuture,
    key::{fingerprint, key_from_headers, parse_key, storage_key, KeyError, MAX_KEY_LEN},
    layer::IdempotencyLayer,
    lease::{FencingToken, LeaseLost},
    service::{Idempotency, IdempotencyScope, REPLAYED_HEADER},
    store::{
        new_owner, store_from_config, BoxFuture, Claim, IdempotencyStore, MemoryStore, Ownership,
        DEFAULT_MEMORY_MAX_BYTES,
    },
};
