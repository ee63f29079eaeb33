//! Hedged requests, from Dean and Barroso, "The Tail at Scale" (CACM 2013): when an answer is
//! late — later than a fixed delay, or than the observed p95 — send the same request again and
//! take whichever answer comes first. The slow one is dropped, which cancels it (its connection
//! is closed, so the server stops working on it). A few percent more requests buy a much shorter
//! tail, provided the hedges are bounded: they are drawn from the retry budget, and only
//! idempotent requests (or those with an `Idempotency-Key`) are hedged.
//!
//! The hedge carries `Attempt { number: 2, hedge: true, .. }` so the balancer below can send it
//! elsewhere and so traces show it.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use keel_core::{
    request::{Attempt, Tried},
    Live,
};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::{
    budget::RetryBudget,
    classify::{Classifier, HttpClassifier},
    config::HedgeConfig,
    error::BoxError,
    metrics as m,
    retry::{is_retry_safe, replay_request, ReplayBody},
};

const RING: usize = 512;

#[derive(Debug)]
struct Latencies {
    ring: Vec<u64>,
    next: usize,
    since: usize,
}

/// Latencies seen recently, and the delay they suggest.
#[derive(Debug)]
pub(crate) struct HedgeShared {
    policy: Live<HedgeConfig>,
    budget: Option<Arc<RetryBudget>>,
    lat: Mutex<Latencies>,
    /// The last computed percentile, in microseconds (0 = not enough samples yet).
    observed_us: AtomicU64,
    service: Arc<str>,
}

impl HedgeShared {
    fn observe(&self, d: Duration, pct: Option<f64>) {
        let Some(p) = pct else { return };
        let mut l = keel_core::lock(&self.lat);
        let us = d.as_micros() as u64;
        if l.ring.len() < RING {
            l.ring.push(us);
        } else {
            let i = l.next;
            l.ring[i] = us;
        }
        l.next = (l.next + 1) % RING;
        l.since += 1;
        if l.since >= 32 && l.ring.len() >= 32 {
            l.since = 0;
            let mut v = l.ring.clone();
            drop(l);
            let idx = ((v.len() as f64 * p) as usize).min(v.len() - 1);
            let (_, x, _) = v.select_nth_unstable(idx);
            self.observed_us.store(*x, Ordering::Relaxed);
        }
    }

    /// The delay before a hedge: the fixed delay, or the observed percentile (at least `delay`).
    fn delay(&self, cfg: &HedgeConfig) -> Duration {
        match cfg.percentile {
            None => cfg.delay,
            Some(_) => cfg.delay.max(Duration::from_micros(
                self.observed_us.load(Ordering::Relaxed),
            )),
        }
    }
}

/// Sends a second attempt when the first is late; first answer wins.
#[derive(Debug, Clone)]
pub struct Hedge<S, C = HttpClassifier> {
    inner: S,
    shared: Arc<HedgeShared>,
    classifier: C,
}

/// Builds [`Hedge`]s.
#[derive(Debug, Clone)]
pub struct HedgeLayer<C = HttpClassifier> {
    shared: Arc<HedgeShared>,
    classifier: C,
}

impl HedgeLayer {
    /// A hedge layer; `budget` (usually [`RetryLayer::budget`](crate::RetryLayer::budget)) pays
    /// for the hedges, `None` means unbudgeted.
    pub fn new(
        service: impl Into<Arc<str>>,
        policy: Live<HedgeConfig>,
        budget: Option<Arc<RetryBudget>>,
    ) -> Self {
        Self {
            shared: Arc::new(HedgeShared {
                policy,
                budget,
                lat: Mutex::new(Latencies {
                    ring: Vec::with_capacity(RING),
                    next: 0,
                    since: 0,
                }),
                observed_us: AtomicU64::new(0),
                service: service.into(),
            }),
            classifier: HttpClassifier::default(),
        }
    }
}

impl<C> HedgeLayer<C> {
    /// The delay a hedge would wait now.
    pub fn current_delay(&self) -> Duration {
        self.shared.delay(&self.shared.policy.load())
    }
}

impl<S, C: Clone> Layer<S> for HedgeLayer<C> {
    type Service = Hedge<S, C>;
    fn layer(&self, inner: S) -> Hedge<S, C> {
        Hedge {
            inner,
            shared: self.shared.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// [`Hedge`]'s future: the inner call directly, or the hedging race.
pub type ResponseFuture<F, T> = futures_either::Either<F, crate::retry::BoxResponseFuture<T>>;

/// A two-way future, so the unhedged path costs no allocation.
pub mod futures_either {
    use std::{
        future::Future,
        pin::Pin,
        task::{Context, Poll},
    };

    use pin_project_lite::pin_project;

    use crate::error::BoxError;

    pin_project! {
        /// Either future `A` or future `B`.
        pub struct Either<A, B> {
            #[pin]
            inner: Inner<A, B>,
        }
    }

    pin_project! {
        #[project = Proj]
        enum Inner<A, B> {
            Left { #[pin] fut: A },
            Right { #[pin] fut: B },
        }
    }

    impl<A, B> Either<A, B> {
        /// The first.
        pub fn left(fut: A) -> Self {
            Self {
                inner: Inner::Left { fut },
            }
        }
        /// The second.
        pub fn right(fut: B) -> Self {
            Self {
                inner: Inner::Right { fut },
            }
        }
    }

    impl<A, B, T, E> Future for Either<A, B>
    where
        A: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
        B: Future<Output = Result<T, BoxError>>,
    {
        type Output = Result<T, BoxError>;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.project().inner.project() {
                Proj::Left { fut } => fut.poll(cx).map_err(Into::into),
                Proj::Right { fut } => fut.poll(cx),
            }
        }
    }
}

impl<S, C, B, T> Service<http::Request<B>> for Hedge<S, C>
where
    S: Service<http::Request<B>, Response = http::Response<T>> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send + 'static,
    C: Classifier<http::Response<T>>,
    B: ReplayBody + Send + 'static,
    T: Send + 'static,
{
    type Response = http::Response<T>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, http::Response<T>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let cfg = self.shared.policy.load();
        let replay = if cfg.enabled && is_retry_safe(&req) {
            replay_request(&req)
        } else {
            None
        };
        let Some(mut replay) = replay else {
            return futures_either::Either::left(self.inner.call(req));
        };
        // The retry layer's deadline, for the second attempt too (see `crate::scope`).
        let ctx = crate::scope::handoff();
        // The balancer below records where the first attempt goes; the hedge avoids it.
        let tried = Tried::new();
        let mut req = req;
        req.extensions_mut().insert(tried.clone());
        let delay = self.shared.delay(&cfg);
        let pct = cfg.percentile.map(|p| p.get());
        drop(cfg);
        let shared = self.shared.clone();
        let classifier = self.classifier.clone();
        let mut second = self.inner.clone();
        let first = self.inner.call(req);
        futures_either::Either::right(Box::pin(async move {
            let start = Instant::now();
            let first = first.instrument(tracing::debug_span!("keel.attempt", service = %shared.service, attempt = 1u32, hedge = false));
            tokio::pin!(first);
            tokio::select! {
                r = &mut first => {
                    shared.observe(start.elapsed(), pct);
                    return r.map_err(Into::into);
                }
                _ = tokio::time::sleep(delay) => {}
            }
            let prev = replay
                .extensions()
                .get::<Attempt>()
                .cloned()
                .unwrap_or_default();
            let mut avoid = prev.avoid;
            for id in tried.snapshot() {
                if !avoid.contains(&id) {
                    avoid.push(id);
                }
            }
            replay.extensions_mut().insert(Attempt {
                number: prev.number.max(1) + 1,
                hedge: true,
                avoid,
            });
            // The second attempt's service must be ready before the budget pays for it (a hedge
            // that cannot be sent costs nothing), and the first answer is taken meanwhile.
            let ready = tokio::select! {
                r = &mut first => {
                    shared.observe(start.elapsed(), pct);
                    return r.map_err(Into::into);
                }
                ready = std::future::poll_fn(|cx| second.poll_ready(cx)) => ready.is_ok(),
            };
            let paid = ready
                && shared.budget.as_ref().is_none_or(|b| {
                    let paid = b.try_withdraw().is_ok();
                    if !paid {
                        m::counter(m::RETRY_ATTEMPTS_TOTAL, &shared.service, "budget_exhausted")
                            .increment(1);
                    }
                    paid
                });
            if !paid {
                // Cannot hedge: wait for the first. `second` is dropped unused, so whatever its
                // readiness reserved is given back.
                drop(second);
                let r = first.await.map_err(Into::into);
                shared.observe(start.elapsed(), pct);
                return r;
            }
            m::counter(m::HEDGE_TOTAL, &shared.service, "sent").increment(1);
            m::counter(m::RETRY_ATTEMPTS_TOTAL, &shared.service, "hedge").increment(1);
            let hedge = crate::scope::resume(ctx, || second.call(replay))
                    .instrument(tracing::debug_span!("keel.attempt", service = %shared.service, attempt = 2u32, hedge = true));
            tokio::pin!(hedge);
            let good = |r: &Result<http::Response<T>, BoxError>| match r {
                Ok(x) => !classifier.classify_response(x).is_failure(),
                Err(_) => false,
            };
            // First good answer wins; the other future is dropped (cancelled) on return.
            let (r, hedge_won) = tokio::select! {
                r = &mut first => {
                    let r = r.map_err(Into::into);
                    if good(&r) { (r, false) } else { (hedge.await.map_err(Into::into), true) }
                }
                r = &mut hedge => {
                    let r = r.map_err(Into::into);
                    if good(&r) { (r, true) } else { (first.await.map_err(Into::into), false) }
                }
            };
            if hedge_won {
                m::counter(m::HEDGE_TOTAL, &shared.service, "won").increment(1);
            }
            shared.observe(start.elapsed(), pct);
            r
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::Ratio;
    use std::{future::Future, pin::Pin, sync::atomic::AtomicU32};
    use tower::{service_fn, ServiceExt};

    /// A hedge layer after 1 ms (or the percentile), paid from a budget with this floor.
    fn hedging(min_per_second: u32, percentile: Option<Ratio>) -> (HedgeLayer, Arc<RetryBudget>) {
        let budget = Arc::new(RetryBudget::new(Live::new(crate::RetryConfig {
            min_per_second,
            ..Default::default()
        })));
        let layer = HedgeLayer::new(
            "svc",
            Live::new(HedgeConfig {
                enabled: true,
                delay: Duration::from_millis(1),
                percentile,
            }),
            Some(budget.clone()),
        );
        (layer, budget)
    }

    /// Ready for its first poll only (the caller's), never after: a hedge can never be sent.
    #[derive(Clone)]
    struct ReadyOnce {
        polls: Arc<AtomicU32>,
        calls: Arc<AtomicU32>,
    }

    impl Service<http::Request<()>> for ReadyOnce {
        type Response = http::Response<()>;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<http::Response<()>, BoxError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            if self.polls.fetch_add(1, Ordering::Relaxed) == 0 {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(http::Response::new(()))
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_that_cannot_be_sent_costs_no_budget_and_does_not_hold_the_answer() {
        let (layer, budget) = hedging(5, None);
        let inner = ReadyOnce {
            polls: Arc::new(AtomicU32::new(0)),
            calls: Arc::new(AtomicU32::new(0)),
        };
        let svc = layer.layer(inner.clone());
        let before = budget.balance();
        let t = Instant::now();
        svc.oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(
            t.elapsed(),
            Duration::from_millis(50),
            "the first answer, on time"
        );
        assert_eq!(inner.calls.load(Ordering::Relaxed), 1, "no hedge was sent");
        assert_eq!(budget.balance(), before, "and none was paid for");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_the_budget_refuses_is_not_sent() {
        // No floor and no deposits: the budget pays for nothing.
        let (layer, budget) = hedging(0, None);
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let svc = layer.layer(service_fn(move |_req: http::Request<()>| {
            seen.fetch_add(1, Ordering::Relaxed);
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, BoxError>(http::Response::new(()))
            }
        }));
        let t = Instant::now();
        svc.oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_millis(50));
        assert_eq!(calls.load(Ordering::Relaxed), 1, "refused: not sent");
        assert_eq!(budget.balance(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn percentile_delay_follows_observed_latency_and_spends_budget() {
        let n = Arc::new(AtomicU32::new(0));
        let n2 = n.clone();
        // 10 ms answers, except every 20th first attempt which takes 1 s.
        let inner = service_fn(move |req: http::Request<()>| {
            let i = n2.fetch_add(1, Ordering::Relaxed);
            let hedge = req.extensions().get::<Attempt>().is_some_and(|a| a.hedge);
            async move {
                let ms = if !hedge && i % 20 == 0 { 1000 } else { 10 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, BoxError>(http::Response::new(()))
            }
        });
        let (layer, budget) = hedging(100, Some(Ratio::new(0.9).unwrap()));
        let svc = layer.layer(inner);
        for _ in 0..200 {
            budget.deposit();
            let t = Instant::now();
            svc.clone().oneshot(http::Request::new(())).await.unwrap();
            assert!(
                t.elapsed() < Duration::from_millis(1000),
                "the slow tail was hedged"
            );
        }
        let d = layer.current_delay();
        assert!(
            d >= Duration::from_millis(10) && d < Duration::from_millis(50),
            "{d:?}"
        );
        // Not hedged: a POST without an Idempotency-Key waits for its only attempt.
        let before = n.load(Ordering::Relaxed);
        let post = http::Request::post("/").body(()).unwrap();
        svc.clone().oneshot(post).await.unwrap();
        assert_eq!(n.load(Ordering::Relaxed), before + 1);
    }
}
