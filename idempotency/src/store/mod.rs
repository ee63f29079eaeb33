//! The store contract: four owner-checked operations.
//!
//! A claim names its *owner*: a random token made fresh for each execution. `renew`, `complete`
//! and `release` act only while the key is in progress *and* still held by that owner. This is
//! the difference from AWS Powertools' Redis layer, which completes and deletes unconditionally:
//! there, an original that outlived its lease overwrites (or deletes) the record of the execution
//! that took over. Here the slow original is told it is a stale owner, and its result is dropped.
//!
//! Each claim also gets a *fencing token*: a number that grows with every claim of a key (Martin
//! Kleppmann's fencing, as in Redisson's leases). A lease alone cannot stop a paused process from
//! writing after its lease ran out; a downstream that remembers the highest token it saw, and
//! refuses lower ones, can.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;

use crate::{
    config::{IdempotencyConfig, StoreKind},
    IdempotencyError,
};

#[cfg(feature = "redis")]
mod conn;
mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use self::memory::{MemoryStore, DEFAULT_MEMORY_MAX_BYTES};
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

/// A boxed, `Send` future: what the object-safe [`IdempotencyStore`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key was free and is now held by the caller, with this fencing token.
    New {
        /// Grows with every claim of the key.
        fence: u64,
    },
    /// Someone else holds the key; their lease runs for about `retry_after` more.
    InProgress {
        /// Remaining lease, when the store knows it.
        retry_after: Option<Duration>,
    },
    /// The key completed; this is the stored record.
    Completed(Bytes),
    /// The key is in use (in progress or completed) for a request with another fingerprint.
    Mismatch,
}

/// What an owner-checked write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// The caller still held the key: the write was done.
    Owner,
    /// The caller no longer holds the key (lease expired, taken over, released): nothing done.
    Stale,
}

/// Where keys live. Object safe: hold it as `Arc<dyn IdempotencyStore>`.
///
/// Every implementation keeps the same semantics (the crate's conformance suite runs against
/// each): `claim` is atomic (of two concurrent claims of a free key exactly one gets
/// [`Claim::New`]), and `renew`/`complete`/`release` only act for the owner of an in-progress key.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for `owner` for `lease`, or reports what holds it.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        fingerprint: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, IdempotencyError>>;

    /// Extends the lease of an in-progress key held by `owner`.
    fn renew<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>>;

    /// Stores `record` as the key's result, kept for `retention`, if `owner` still holds it.
    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: Bytes,
        retention: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>>;

    /// Frees an in-progress key held by `owner`, so the next claim runs again.
    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>>;
}

impl<S: IdempotencyStore + ?Sized> IdempotencyStore for Arc<S> {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        fingerprint: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, IdempotencyError>> {
        (**self).claim(key, owner, fingerprint, lease)
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        (**self).renew(key, owner, lease)
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: Bytes,
        retention: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        (**self).complete(key, owner, record, retention)
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        (**self).release(key, owner)
    }
}

/// After a claim that timed out: gives the key back (owner-checked, so a no-op if the claim
/// never took effect) in the background. Without it, a claim that reached the store after its
/// timeout would hold the key for a whole lease with nobody running, and every retry would get
/// "in progress". On the same connection as the claim, the release is applied after it.
pub(crate) fn give_back_timed_out_claim(
    store: &Arc<dyn IdempotencyStore>,
    err: &IdempotencyError,
    key: &str,
    owner: &str,
) {
    if !matches!(err, IdempotencyError::TimedOut) {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (store, key, owner) = (store.clone(), key.to_owned(), owner.to_owned());
    rt.spawn(async move {
        let _ = store.release(&key, &owner).await;
    });
}

/// Releases the key (owner-checked) after an execution that is not to be stored (a 5xx, an
/// error, a panic), to the end even if the request is dropped meanwhile, and counts how it went:
/// `released`, `stale_owner` (the lease had been lost: the key is someone else's now) or `error`.
pub(crate) fn give_back(
    store: Arc<dyn IdempotencyStore>,
    key: String,
    owner: String,
) -> Detached<()> {
    detached(async move {
        crate::telemetry::complete(match store.release(&key, &owner).await {
            Ok(Ownership::Owner) => "released",
            Ok(Ownership::Stale) => "stale_owner",
            Err(_) => "error",
        });
    })
}

/// A store call that runs to its end even when the request that made it is dropped meanwhile
/// (a client disconnect): dropped unfinished, what is left of it is handed to the runtime. A
/// completion whose handler already ran must not be lost with the connection: the key would stay
/// claimed until its lease ran out, and then run again.
pub(crate) struct Detached<T: Send + 'static> {
    fut: Option<BoxFuture<'static, T>>,
}

/// Wraps `fut` in [`Detached`].
pub(crate) fn detached<T: Send + 'static>(
    fut: impl Future<Output = T> + Send + 'static,
) -> Detached<T> {
    Detached {
        fut: Some(Box::pin(fut)),
    }
}

impl<T: Send + 'static> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        let Some(fut) = self.fut.as_mut() else {
            return std::task::Poll::Pending;
        };
        let out = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        std::task::Poll::Ready(out)
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        if let (Some(fut), Ok(rt)) = (self.fut.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = fut.await;
            });
        }
    }
}

/// A fresh owner token: 128 random bits, hex.
pub fn new_owner() -> String {
    crate::key::to_hex(&rand::random::<u128>().to_be_bytes())
}

/// Builds the store the configuration names (validating it first).
pub async fn store_from_config(
    cfg: &IdempotencyConfig,
) -> Result<Arc<dyn IdempotencyStore>, IdempotencyError> {
    cfg.validate().map_err(IdempotencyError::Config)?;
    Ok(match cfg.store {
        StoreKind::Memory => Arc::new(
            MemoryStore::new(cfg.memory_capacity)
                .with_max_bytes(cfg.memory_max_bytes)
                // Room for the largest answer and its headers in every part.
                .with_largest_answer(cfg.max_body_bytes.saturating_add(64 << 10)),
        ),
        #[cfg(feature = "redis")]
        StoreKind::Redis => Arc::new(RedisStore::connect(cfg).await?),
        #[cfg(not(feature = "redis"))]
        StoreKind::Redis => {
            return Err(IdempotencyError::Config(
                "idempotency.store: \"redis\" is not in this build (enable keel-idempotency's `redis` feature)"
                    .to_owned(),
            ))
        }
    })
}
