//! [`IdempotencyLayer`]: puts [`Idempotency`] on a route, with per-route overrides of the live
//! `[idempotency]` policy.

use std::{sync::Arc, time::Duration};

use keel_core::Live;
use tower_layer::Layer;

use crate::{
    config::{Fingerprint, IdempotencyConfig, OnCancel, OnConflict, OnStoreError, StorePolicy},
    service::Idempotency,
    store::IdempotencyStore,
};

/// Per-route settings that win over the live configuration.
#[derive(Debug, Clone, Default)]
pub(crate) struct Overrides {
    pub(crate) required: Option<bool>,
    pub(crate) on_conflict: Option<OnConflict>,
    pub(crate) on_store_error: Option<OnStoreError>,
    pub(crate) on_cancel: Option<OnCancel>,
    pub(crate) store_policy: Option<StorePolicy>,
    pub(crate) fingerprint: Option<Fingerprint>,
    pub(crate) lease: Option<Duration>,
    pub(crate) ttl: Option<Duration>,
}

/// Applies the `Idempotency-Key` contract to the services (routes) it wraps.
///
/// Apply it per route, so only the routes that need it pay for it and handlers do not change:
///
/// ```no_run
/// # use std::sync::Arc;
/// # use axum::{routing::post, Router};
/// # use keel_core::Live;
/// # use keel_idempotency::{IdempotencyConfig, IdempotencyLayer, MemoryStore};
/// let store = Arc::new(MemoryStore::new(10_000));
/// let cfg = Live::new(IdempotencyConfig::default());
/// let app: Router = Router::new().route(
///     "/payments",
///     post(|| async { "paid" }).layer(IdempotencyLayer::new(store, cfg).required(true)),
/// );
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) config: Live<IdempotencyConfig>,
    pub(crate) overrides: Arc<Overrides>,
}

impl std::fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("overrides", &self.overrides)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// A layer on `store`, reading its policy from `config` on every request.
    pub fn new(store: Arc<dyn IdempotencyStore>, config: Live<IdempotencyConfig>) -> Self {
        Self {
            store,
            config,
            overrides: Arc::new(Overrides::default()),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Overrides)) -> Self {
        f(Arc::make_mut(&mut self.overrides));
        self
    }

    /// Refuse requests without a key (400) on this route.
    #[must_use]
    pub fn required(self, yes: bool) -> Self {
        self.with(|o| o.required = Some(yes))
    }

    /// What duplicates get while the first runs, on this route.
    #[must_use]
    pub fn on_conflict(self, v: OnConflict) -> Self {
        self.with(|o| o.on_conflict = Some(v))
    }

    /// Fail closed (503) or open when the store is down, on this route.
    #[must_use]
    pub fn on_store_error(self, v: OnStoreError) -> Self {
        self.with(|o| o.on_store_error = Some(v))
    }

    /// Release the key or let it expire when the client goes away, on this route.
    #[must_use]
    pub fn on_cancel(self, v: OnCancel) -> Self {
        self.with(|o| o.on_cancel = Some(v))
    }

    /// Which responses are stored, on this route.
    #[must_use]
    pub fn store_policy(self, v: StorePolicy) -> Self {
        self.with(|o| o.store_policy = Some(v))
    }

    /// What makes two requests "the same", on this route.
    #[must_use]
    pub fn fingerprint(self, v: Fingerprint) -> Self {
        self.with(|o| o.fingerprint = Some(v))
    }

    /// The lease, on this route (for handlers known to be slow). At least 30 ms
    /// ([`MIN_LEASE`](crate::MIN_LEASE)): a shorter one counts as that.
    #[must_use]
    pub fn lease(self, v: Duration) -> Self {
        self.with(|o| o.lease = Some(v))
    }

    /// The retention of completed responses, on this route. At least the lease: a shorter one
    /// counts as the lease.
    #[must_use]
    pub fn ttl(self, v: Duration) -> Self {
        self.with(|o| o.ttl = Some(v))
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(inner, self.clone())
    }
}
