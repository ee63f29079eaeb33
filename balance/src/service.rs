//! The tower side: [`Balance`] routes each `http::Request` to the inner service of the picked
//! instance, one inner service (one connection pool) per instance.
//!
//! Inner services are made by a [`MakeInstanceService`] when an instance appears and dropped when
//! it leaves. Routing depends on the request (hash keys, canary headers, `Attempt::avoid`), so the
//! pick happens in `call`, not in `poll_ready`; the picked instance's service is driven to
//! readiness inside the response future. Errors are boxed (like tower's own `Balance`): a
//! [`BalanceError`] when nothing could be picked, a [`keel_core::request::InstanceFailure`] naming
//! the instance when its service failed. Responses carry [`keel_core::request::ServedBy`].

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use arc_swap::ArcSwap;
use keel_core::{
    request::{InstanceFailure, ServedBy, Tried},
    Instance, InstanceId,
};
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    classify::{Classify, HttpClassifier, Outcome},
    error::BalanceError,
    picker::{Balancer, RequestInfo},
};

/// Makes the inner service of one instance (e.g. a client bound to its address).
/// Any `Fn(&Instance) -> S` is one; returning `None` leaves the instance unroutable for now.
/// It runs for the first call that sees the instance, before that call's pick, so it may take
/// the instance out of rotation ([`Balancer::eject`]) and no call is routed to it meanwhile.
pub trait MakeInstanceService {
    /// The per-instance service.
    type Service;
    /// The service for `instance`.
    fn make_service(&self, instance: &Instance) -> Option<Self::Service>;
}

impl<S, F: Fn(&Instance) -> S> MakeInstanceService for F {
    type Service = S;
    fn make_service(&self, instance: &Instance) -> Option<S> {
        Some(self(instance))
    }
}

/// The per-instance services, for one generation of the balancer's tables.
struct Services<S> {
    generation: u64,
    by_id: HashMap<InstanceId, S>,
}

/// The services in use (read without a lock on every request) and a lock that only rebuilds
/// take, when the instance set changes.
struct Shared<S> {
    current: ArcSwap<Services<S>>,
    rebuild: Mutex<()>,
}

/// Routes each request to the inner service of the instance the [`Balancer`] picks.
pub struct Balance<F: MakeInstanceService, C = HttpClassifier> {
    balancer: Balancer,
    factory: Arc<F>,
    services: Arc<Shared<F::Service>>,
    classifier: C,
}

impl<F: MakeInstanceService, C: Clone> Clone for Balance<F, C> {
    fn clone(&self) -> Self {
        Self {
            balancer: self.balancer.clone(),
            factory: self.factory.clone(),
            services: self.services.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<F: MakeInstanceService, C> std::fmt::Debug for Balance<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balance")
            .field("balancer", &self.balancer)
            .finish_non_exhaustive()
    }
}

impl<F: MakeInstanceService> Balance<F> {
    /// Routes through `balancer`, making per-instance services with `factory`.
    pub fn new(balancer: Balancer, factory: F) -> Self {
        Self::with_classifier(balancer, factory, HttpClassifier::default())
    }
}

impl<F: MakeInstanceService, C> Balance<F, C> {
    /// With a custom response classifier.
    pub fn with_classifier(balancer: Balancer, factory: F, classifier: C) -> Self {
        Self {
            balancer,
            factory: Arc::new(factory),
            services: Arc::new(Shared {
                current: ArcSwap::from_pointee(Services {
                    generation: u64::MAX,
                    by_id: HashMap::new(),
                }),
                rebuild: Mutex::new(()),
            }),
            classifier,
        }
    }

    /// The balancer (for snapshots).
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }
}

impl<F: MakeInstanceService, C> Balance<F, C>
where
    F::Service: Clone,
{
    /// The inner service of `id`, syncing the per-instance services with the tables first. The
    /// common case (tables unchanged, service made) takes no lock.
    fn service_for(&self, id: Option<&InstanceId>) -> Option<F::Service> {
        let r = self.balancer.roster();
        let stale = |s: &Services<F::Service>| {
            s.generation != r.generation || id.is_some_and(|id| !s.by_id.contains_key(id))
        };
        {
            let current = self.services.current.load();
            if !stale(&current) {
                return current.by_id.get(id?).cloned();
            }
        }
        let _rebuilding = keel_core::lock(&self.services.rebuild);
        // Rebuilds are serialised and each reads the tables anew under the lock, so the stored
        // set only moves forward (a caller holding older tables must not undo a newer rebuild).
        let r = self.balancer.roster();
        let stale = |s: &Services<F::Service>| {
            s.generation != r.generation || id.is_some_and(|id| !s.by_id.contains_key(id))
        };
        let mut current = self.services.current.load_full();
        // Another caller may have rebuilt while this one waited.
        if stale(&current) {
            let mut next = HashMap::with_capacity(r.entries.len());
            for e in &r.entries {
                let id = &e.instance.id;
                let svc = match current.by_id.get(id) {
                    Some(s) => Some(s.clone()),
                    None => self.factory.make_service(&e.instance),
                };
                if let Some(s) = svc {
                    next.insert(id.clone(), s);
                }
            }
            current = Arc::new(Services {
                generation: r.generation,
                by_id: next,
            });
            self.services.current.store(current.clone());
        }
        current.by_id.get(id?).cloned()
    }
}

/// The future of [`Balance`].
pub type ResponseFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<S, F, C, B, RB> Service<http::Request<B>> for Balance<F, C>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    F: MakeInstanceService<Service = S>,
    C: Classify<http::Response<RB>>,
    B: Send + 'static,
    RB: 'static,
{
    type Response = http::Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<http::Response<RB>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Services for instances that joined since the last call are made before the pick:
        // making one may take its instance out of rotation (an instance back with a breaker
        // that is still open), and a pick made first could choose it. This also drops the
        // services of instances that left, even when nothing can be picked.
        let _ = self.service_for(None);
        let picked = match self.balancer.try_pick(&RequestInfo::from_request(&req)) {
            Ok(p) => p,
            Err(e) => return Box::pin(async move { Err(e.into()) }),
        };
        if let Some(tried) = req.extensions().get::<Tried>() {
            tried.record(picked.id());
        }
        let served_by = ServedBy {
            id: picked.id().clone(),
            addr: picked.addr(),
        };
        // Made by the sync above, unless the tables moved between it and the pick.
        let made = self.services.current.load().by_id.get(picked.id()).cloned();
        let Some(svc) = made.or_else(|| self.service_for(Some(picked.id()))) else {
            let err = BalanceError::NoService {
                service: self.balancer.service().clone(),
                id: picked.id().clone(),
            };
            return Box::pin(async move { Err(err.into()) });
        };
        let classifier = self.classifier.clone();
        tracing::trace!(instance = %served_by.id, "routed");
        // The attempt's end, set around this `call` by a per-try timeout above: the instance's
        // service is called later, once ready, and its transport reads the end there.
        let end = keel_core::request::attempt_end();
        Box::pin(async move {
            let mut svc = svc;
            let ready = std::future::poll_fn(|cx| svc.poll_ready(cx).map_err(Into::into)).await;
            let called = match ready {
                Ok(()) => keel_core::request::with_attempt_end(end, || svc.call(req))
                    .await
                    .map_err(Into::into),
                Err(e) => Err(e),
            };
            match called {
                Ok(mut res) => {
                    let outcome = classifier.classify_response(&res, picked.elapsed());
                    picked.complete(outcome);
                    res.extensions_mut().insert(served_by);
                    Ok(res)
                }
                Err(e) => {
                    let outcome = classifier.classify_error(&*e);
                    picked.complete(if outcome == Outcome::Cancelled {
                        Outcome::GatewayFailure
                    } else {
                        outcome
                    });
                    Err(Box::new(InstanceFailure {
                        served_by,
                        source: e,
                    }) as BoxError)
                }
            }
        })
    }
}

/// Wraps a per-instance service factory into a [`Balance`].
#[derive(Debug, Clone)]
pub struct BalanceLayer<C = HttpClassifier> {
    balancer: Balancer,
    classifier: C,
}

impl BalanceLayer {
    /// A layer routing through `balancer`.
    pub fn new(balancer: Balancer) -> Self {
        Self {
            balancer,
            classifier: HttpClassifier::default(),
        }
    }
}

impl<C> BalanceLayer<C> {
    /// With a custom classifier.
    pub fn with_classifier<C2>(self, classifier: C2) -> BalanceLayer<C2> {
        BalanceLayer {
            balancer: self.balancer,
            classifier,
        }
    }
}

impl<F: MakeInstanceService, C: Clone> Layer<F> for BalanceLayer<C> {
    type Service = Balance<F, C>;

    fn layer(&self, factory: F) -> Self::Service {
        Balance::with_classifier(self.balancer.clone(), factory, self.classifier.clone())
    }
}
