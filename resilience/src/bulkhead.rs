//! Bulkheads and adaptive concurrency limits.
//!
//! Why: a dependency that slows down holds every caller's task and connection while it thinks;
//! without a bound, one slow upstream takes the whole process with it (the bulkhead of a ship:
//! Nygard, *Release It!*). [`Bulkhead`] bounds calls in flight and either refuses at once or
//! lets a call wait up to `max_wait` for a slot.
//!
//! A fixed bound is either too low (wasted capacity) or too high (no protection). With
//! `adaptive = "gradient2"` or `"aimd"` the bound is found by [`AdaptiveConcurrency`], after
//! Netflix's concurrency-limits (<https://github.com/Netflix/concurrency-limits>): Gradient2
//! compares a long-term RTT average with the latest RTT and shrinks the limit as queueing
//! inflates latency (`gradient = clamp(tolerance * long / short, 0.5, 1)`, `new = limit *
//! gradient + sqrt(limit)`, smoothed); AIMD adds one while calls succeed near the limit and
//! multiplies by `backoff_ratio` on a drop (timeout, 503, 429), as TCP congestion control does.
//!
//! Inbound, [`LoadShed`] applies the same limiter to a server and answers 503 with `Retry-After`.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use keel_core::Live;
use pin_project_lite::pin_project;
use tokio::{sync::Notify, time::Instant};
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    classify::{Classifier, FailureClass, HttpClassifier, Outcome},
    config::{AdaptiveAlgorithm, BulkheadConfig},
    error::{BoxError, ResilienceError},
    metrics as m,
    ratelimit::OwnRefusal,
};

/// The limit-finding algorithms (Gradient2, AIMD). Feed it samples; read `limit()`.
#[derive(Debug)]
pub struct AdaptiveConcurrency {
    limit: f64,
    long_rtt: f64,
    samples: u64,
}

impl AdaptiveConcurrency {
    /// Starts at `initial`.
    pub fn new(initial: u32) -> Self {
        Self {
            limit: initial.max(1) as f64,
            long_rtt: 0.0,
            samples: 0,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.limit as u32
    }

    /// One sample: the call's round trip, the calls in flight when it started, and whether it
    /// was dropped (timed out or refused for overload).
    pub fn sample(&mut self, cfg: &BulkheadConfig, rtt: Duration, in_flight: usize, dropped: bool) {
        let (min, max) = (cfg.min_limit as f64, cfg.max_concurrent as f64);
        match cfg.adaptive {
            AdaptiveAlgorithm::Off => {}
            AdaptiveAlgorithm::Aimd => {
                if dropped || rtt >= cfg.timeout {
                    self.limit = (self.limit * cfg.backoff_ratio).floor();
                } else if in_flight as f64 * 2.0 >= self.limit {
                    self.limit += 1.0;
                }
            }
            AdaptiveAlgorithm::Gradient2 => {
                let short = rtt.as_secs_f64().max(1e-6);
                self.samples += 1;
                // Long-term RTT: an exponential average over ~600 samples (warming up faster).
                let n = (self.samples as f64).min(600.0);
                self.long_rtt = if self.samples == 1 {
                    short
                } else {
                    self.long_rtt + (short - self.long_rtt) / n
                };
                // Recover quickly when the long average is far above what we see now.
                if self.long_rtt / short > 2.0 {
                    self.long_rtt *= 0.95;
                }
                // App-limited: not enough load to learn anything.
                if (in_flight as f64) < self.limit / 2.0 && !dropped {
                    return;
                }
                let gradient = (cfg.tolerance * self.long_rtt / short).clamp(0.5, 1.0);
                let queue = self.limit.sqrt();
                let mut new = self.limit * gradient + queue;
                if dropped {
                    new = self.limit * 0.5_f64.max(cfg.backoff_ratio.min(gradient));
                }
                self.limit = self.limit * (1.0 - cfg.smoothing) + new * cfg.smoothing;
            }
        }
        self.limit = self.limit.clamp(min, max);
    }
}

/// The shared state of a bulkhead: calls in flight, the limit, waiters.
///
/// The `keel_bulkhead_in_flight` gauge is sampled by [`publish`](Self::publish) (the facade calls
/// it when `/metrics` is rendered) rather than set on every call: a gauge is read only when it is
/// scraped, and setting it twice per call cost more than the bulkhead itself.
#[derive(Debug)]
pub struct ConcurrencyLimiter {
    policy: Live<BulkheadConfig>,
    in_flight: AtomicUsize,
    adaptive: Mutex<AdaptiveConcurrency>,
    adaptive_limit: AtomicUsize,
    notify: Notify,
    rejected: metrics::Counter,
    in_flight_gauge: metrics::Gauge,
    limit_gauge: metrics::Gauge,
    /// Callers waiting for a slot: a release wakes one only if there are any.
    waiting: AtomicUsize,
}

/// A slot in a bulkhead, released on drop.
#[derive(Debug)]
pub struct ConcurrencyPermit {
    limiter: Arc<ConcurrencyLimiter>,
    slot: Slot,
}

/// A slot without a handle on its limiter: whoever holds it gives it back
/// ([`ConcurrencyLimiter::settle`], [`ConcurrencyLimiter::release`]).
#[derive(Debug)]
pub(crate) struct Slot {
    /// When the call started, for the adaptive limit (`None` with a fixed limit).
    start: Option<Instant>,
    /// Calls in flight with this one; `usize::MAX` when the bulkhead is off (nothing to give
    /// back), 0 once given back.
    in_flight: usize,
}

impl ConcurrencyLimiter {
    /// A limiter for `service`.
    pub fn new(service: impl Into<Arc<str>>, policy: Live<BulkheadConfig>) -> Arc<Self> {
        let service = service.into();
        let initial = {
            let c = policy.load();
            c.initial_limit.clamp(c.min_limit, c.max_concurrent)
        };
        Arc::new(Self {
            policy,
            in_flight: AtomicUsize::new(0),
            adaptive: Mutex::new(AdaptiveConcurrency::new(initial)),
            adaptive_limit: AtomicUsize::new(initial as usize),
            notify: Notify::new(),
            rejected: m::counter(m::BULKHEAD_REJECTED_TOTAL, &service, "shed"),
            in_flight_gauge: m::gauge(m::BULKHEAD_IN_FLIGHT, &service, ""),
            limit_gauge: m::gauge(m::CONCURRENCY_LIMIT, &service, ""),
            waiting: AtomicUsize::new(0),
        })
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        let cfg = self.policy.load();
        self.limit_for(&cfg)
    }

    fn limit_for(&self, cfg: &BulkheadConfig) -> usize {
        match cfg.adaptive {
            AdaptiveAlgorithm::Off => cfg.max_concurrent as usize,
            // Within the policy's bounds as loaded now: a reload that lowers `max_concurrent`
            // (or raises `min_limit`) applies to the next call, not after the next sample.
            _ => self
                .adaptive_limit
                .load(Ordering::Relaxed)
                .min(cfg.max_concurrent as usize)
                .max(cfg.min_limit as usize),
        }
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Sets the `keel_bulkhead_in_flight` and `keel_concurrency_limit` gauges to their values
    /// now. Call it before metrics are exported (the facade does, on each `/metrics` request).
    pub fn publish(&self) {
        self.in_flight_gauge.set(self.in_flight() as f64);
        self.limit_gauge.set(self.limit() as f64);
    }

    /// A slot now, or `None`.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConcurrencyPermit> {
        self.try_acquire_with(&self.policy.load())
    }

    /// As [`try_acquire`](Self::try_acquire), under `cfg`: the policy the caller has already
    /// loaded for this call.
    pub fn try_acquire_with(self: &Arc<Self>, cfg: &BulkheadConfig) -> Option<ConcurrencyPermit> {
        Some(ConcurrencyPermit {
            limiter: self.clone(),
            slot: self.take(cfg, None)?,
        })
    }

    /// A raw slot under `cfg`; `now` is the caller's clock reading, if it has one.
    pub(crate) fn take(&self, cfg: &BulkheadConfig, now: Option<Instant>) -> Option<Slot> {
        if !cfg.enabled {
            return Some(Slot {
                start: None,
                in_flight: usize::MAX,
            });
        }
        let limit = self.limit_for(cfg);
        // SeqCst, as the release's decrement and its read of `waiting`: with a waiter's
        // increment of `waiting` before this re-check, one of the two sees the other.
        let mut cur = self.in_flight.load(Ordering::SeqCst);
        loop {
            if cur >= limit {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        let adaptive = cfg.adaptive != AdaptiveAlgorithm::Off;
        Some(Slot {
            start: adaptive.then(|| now.unwrap_or_else(Instant::now)),
            in_flight: cur + 1,
        })
    }

    /// Feeds the adaptive limit with the call's outcome, and gives the slot back.
    pub(crate) fn settle(&self, mut slot: Slot, outcome: &Outcome) {
        self.adapt(&mut slot, outcome);
        self.release(slot);
    }

    /// Gives a slot back.
    pub(crate) fn release(&self, mut slot: Slot) {
        let n = std::mem::take(&mut slot.in_flight);
        if n != 0 && n != usize::MAX {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if self.waiting.load(Ordering::SeqCst) > 0 {
                self.notify.notify_one();
            }
        }
    }

    fn adapt(&self, slot: &mut Slot, outcome: &Outcome) {
        let Some(start) = slot.start.take() else {
            return;
        };
        let cfg = self.policy.load();
        let dropped = matches!(
            outcome,
            Outcome::Throttled { .. }
                | Outcome::Failure(FailureClass::Timeout)
                | Outcome::Failure(FailureClass::Status(503))
        );
        let mut a = keel_core::lock(&self.adaptive);
        a.sample(&cfg, start.elapsed(), slot.in_flight, dropped);
        let limit = a.limit() as usize;
        drop(a);
        let old = self.adaptive_limit.swap(limit, Ordering::Relaxed);
        if old != limit {
            self.limit_gauge.set(limit as f64);
            if limit > old {
                self.notify.notify_waiters();
            }
        }
    }

    /// A slot, waiting up to the policy's `max_wait`; [`ResilienceError::Shed`] otherwise.
    pub async fn acquire(self: &Arc<Self>) -> Result<ConcurrencyPermit, ResilienceError> {
        if let Some(p) = self.try_acquire() {
            return Ok(p);
        }
        let wait = self.policy.load().max_wait;
        let deadline = Instant::now() + wait;
        // Counted before the re-check below, so a release either sees this waiter or leaves a
        // slot the re-check finds.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(self);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(p) = self.try_acquire() {
                return Ok(p);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.rejected.increment(1);
                return Err(ResilienceError::Shed);
            }
        }
    }

    /// As [`acquire`](Self::acquire), giving up at `deadline` (the call's total deadline) if
    /// that comes before `max_wait` ends: [`ResilienceError::DeadlineExceeded`].
    pub async fn acquire_before(
        self: &Arc<Self>,
        deadline: Option<Instant>,
    ) -> Result<ConcurrencyPermit, ResilienceError> {
        let Some(d) = deadline else {
            return self.acquire().await;
        };
        match tokio::time::timeout_at(d, self.acquire()).await {
            Ok(r) => r,
            Err(_) => {
                let e = ResilienceError::DeadlineExceeded;
                crate::deadline::deadline_metric(&e);
                Err(e)
            }
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Live<BulkheadConfig> {
        &self.policy
    }

    /// Counts a refusal and returns its error.
    pub(crate) fn shed(&self) -> ResilienceError {
        self.rejected.increment(1);
        ResilienceError::Shed
    }
}

/// Uncounts a waiter however its wait ends.
struct Waiting<'a>(&'a ConcurrencyLimiter);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ConcurrencyPermit {
    /// Feeds the adaptive limit with this call's outcome (a no-op with a fixed limit).
    pub fn record(&mut self, outcome: &Outcome) {
        self.limiter.adapt(&mut self.slot, outcome);
    }
}

impl Drop for ConcurrencyPermit {
    fn drop(&mut self) {
        let slot = Slot {
            start: None,
            in_flight: std::mem::take(&mut self.slot.in_flight),
        };
        self.limiter.release(slot);
    }
}

/// Bounds calls in flight to `S` (fixed or adaptive), refusing with [`ResilienceError::Shed`].
#[derive(Debug, Clone)]
pub struct Bulkhead<S, C = HttpClassifier> {
    inner: S,
    limiter: Arc<ConcurrencyLimiter>,
    classifier: C,
}

/// Builds [`Bulkhead`]s sharing one [`ConcurrencyLimiter`].
#[derive(Debug, Clone)]
pub struct BulkheadLayer<C = HttpClassifier> {
    limiter: Arc<ConcurrencyLimiter>,
    classifier: C,
}

impl BulkheadLayer {
    /// A layer with a new limiter.
    pub fn new(service: impl Into<Arc<str>>, policy: Live<BulkheadConfig>) -> Self {
        Self {
            limiter: ConcurrencyLimiter::new(service, policy),
            classifier: HttpClassifier::default(),
        }
    }
}

impl<C> BulkheadLayer<C> {
    /// The shared limiter.
    pub fn limiter(&self) -> &Arc<ConcurrencyLimiter> {
        &self.limiter
    }
}

impl<S, C: Clone> Layer<S> for BulkheadLayer<C> {
    type Service = Bulkhead<S, C>;
    fn layer(&self, inner: S) -> Bulkhead<S, C> {
        Bulkhead {
            inner,
            limiter: self.limiter.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'static>>;

pin_project! {
    /// [`Bulkhead`]'s future.
    pub struct ResponseFuture<F, C, T> {
        #[pin]
        state: State<F, C, T>,
    }
}

pin_project! {
    #[project = Proj]
    enum State<F, C, T> {
        Inner { #[pin] fut: F, permit: ConcurrencyPermit, classifier: C },
        Refused,
        Boxed { fut: BoxFut<T> },
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C, T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classifier<T>,
{
    type Output = Result<T, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            Proj::Inner {
                fut,
                permit,
                classifier,
            } => {
                let r = std::task::ready!(fut.poll(cx)).map_err(Into::into);
                if permit.slot.start.is_some() {
                    // Refused by a keel layer below: the upstream was not called, no sample.
                    if !refused_below(&r) {
                        permit.record(&classifier.classify(&r));
                    }
                }
                Poll::Ready(r)
            }
            Proj::Refused => Poll::Ready(Err(Box::new(ResilienceError::Shed))),
            Proj::Boxed { fut } => fut.as_mut().poll(cx),
        }
    }
}

/// Whether a keel layer below refused the call before it reached the upstream (a breaker, a
/// throttle, a shed, a rate limit, an instance's own breaker): its round trip says nothing
/// about the upstream, so the adaptive limit does not learn from it (as in the client stack).
fn refused_below<T>(r: &Result<T, BoxError>) -> bool {
    let Err(e) = r else { return false };
    keel_core::request::not_sent(e.as_ref())
        || matches!(
            ResilienceError::find(e.as_ref()),
            Some(
                ResilienceError::BreakerOpen { .. }
                    | ResilienceError::Throttled
                    | ResilienceError::RateLimited { .. }
                    | ResilienceError::Shed
            )
        )
}

impl<S, C, Req> Service<Req> for Bulkhead<S, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    C: Classifier<S::Response>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(permit) = self.limiter.try_acquire() {
            return ResponseFuture {
                state: State::Inner {
                    fut: self.inner.call(req),
                    permit,
                    classifier: self.classifier.clone(),
                },
            };
        }
        if self.limiter.policy.load().max_wait.is_zero() {
            self.limiter.shed();
            return ResponseFuture {
                state: State::Refused,
            };
        }
        let limiter = self.limiter.clone();
        let classifier = self.classifier.clone();
        let ctx = crate::scope::handoff();
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            state: State::Boxed {
                fut: Box::pin(async move {
                    let mut permit = limiter.acquire_before(ctx.deadline()).await?;
                    let r = crate::scope::resume(ctx, || svc.call(req))
                        .await
                        .map_err(Into::into);
                    if !refused_below(&r) {
                        permit.record(&classifier.classify(&r));
                    }
                    r
                }),
            },
        }
    }
}

/// Inbound shedding: a concurrency limit (fixed or adaptive) in front of a server, answering
/// 503 with `Retry-After: 1` when full (after waiting up to `max_wait` for a slot, and no
/// longer than the caller's deadline: 504 if that passes first).
#[derive(Debug, Clone)]
pub struct LoadShed<S> {
    inner: S,
    limiter: Arc<ConcurrencyLimiter>,
}

/// Builds [`LoadShed`].
#[derive(Debug, Clone)]
pub struct LoadShedLayer {
    limiter: Arc<ConcurrencyLimiter>,
}

impl LoadShedLayer {
    /// A layer with a new limiter (`service`: this service's name, for metrics).
    pub fn new(service: impl Into<Arc<str>>, policy: Live<BulkheadConfig>) -> Self {
        Self {
            limiter: ConcurrencyLimiter::new(service, policy),
        }
    }

    /// The shared limiter.
    pub fn limiter(&self) -> &Arc<ConcurrencyLimiter> {
        &self.limiter
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;
    fn layer(&self, inner: S) -> LoadShed<S> {
        LoadShed {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// A request waiting for a slot (`max_wait`), then the inner service's future.
type WaitFut<RB, E> = Pin<Box<dyn Future<Output = Result<http::Response<RB>, E>> + Send>>;

pin_project! {
    /// [`LoadShed`]'s future.
    pub struct ShedFuture<F, RB, E> {
        #[pin]
        inner: crate::util::EitherResponse<F, RB, E>,
        permit: Option<ConcurrencyPermit>,
        waiting: Option<WaitFut<RB, E>>,
    }
}

/// How an inbound response feeds the adaptive limit (`None`: the rate limit below refused the
/// request, which says nothing about the load).
fn inbound_outcome<RB, E>(r: &Result<http::Response<RB>, E>) -> Option<Outcome> {
    match r {
        Ok(res) if res.extensions().get::<OwnRefusal>().is_some() => None,
        Ok(res) => Some(HttpClassifier::default().classify_response(res)),
        Err(_) => Some(Outcome::Failure(FailureClass::Other)),
    }
}

/// The answer to a request refused without a slot: 503 with `Retry-After: 1`, or 504 when the
/// caller's deadline passed while it waited.
fn refusal<RB: Default>(status: http::StatusCode) -> http::Response<RB> {
    let mut res = http::Response::new(RB::default());
    *res.status_mut() = status;
    if status == http::StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
    }
    res
}

impl<F, RB, E> Future for ShedFuture<F, RB, E>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    RB: Default,
{
    type Output = Result<http::Response<RB>, E>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(waiting) = this.waiting {
            return waiting.as_mut().poll(cx);
        }
        let r = std::task::ready!(this.inner.poll(cx));
        if let Some(mut p) = this.permit.take() {
            // The rate limit below refused it: no sample (the slot is given back on drop).
            if let Some(o) = inbound_outcome(&r) {
                p.record(&o);
            }
        }
        Poll::Ready(r)
    }
}

impl<S, B, RB> Service<http::Request<B>> for LoadShed<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = ShedFuture<S::Future, RB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(permit) = self.limiter.try_acquire() {
            return ShedFuture {
                inner: crate::util::EitherResponse::inner(self.inner.call(req)),
                permit: Some(permit),
                waiting: None,
            };
        }
        if self.limiter.policy.load().max_wait.is_zero() {
            self.limiter.shed();
            return ShedFuture {
                inner: crate::util::EitherResponse::ready(refusal(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                )),
                permit: None,
                waiting: None,
            };
        }
        // Waits up to `max_wait` for a slot, and no longer than the caller's deadline.
        let deadline = req
            .extensions()
            .get::<keel_core::request::Deadline>()
            .map(|d| d.0);
        let limiter = self.limiter.clone();
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        let waiting: WaitFut<RB, S::Error> = Box::pin(async move {
            let mut permit = match limiter.acquire_before(deadline).await {
                Ok(p) => p,
                Err(ResilienceError::DeadlineExceeded) => {
                    return Ok(refusal(http::StatusCode::GATEWAY_TIMEOUT))
                }
                Err(_) => return Ok(refusal(http::StatusCode::SERVICE_UNAVAILABLE)),
            };
            let r = svc.call(req).await;
            if let Some(o) = inbound_outcome(&r) {
                permit.record(&o);
            }
            r
        });
        ShedFuture {
            inner: crate::util::EitherResponse::ready(http::Response::new(RB::default())),
            permit: None,
            waiting: Some(waiting),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    fn policy(max: u32, wait_ms: u64) -> Live<BulkheadConfig> {
        Live::new(BulkheadConfig {
            max_concurrent: max,
            min_limit: 1,
            max_wait: Duration::from_millis(wait_ms),
            ..Default::default()
        })
    }

    fn slow(
    ) -> impl Service<(), Response = http::Response<()>, Error = BoxError, Future = impl Send>
           + Clone
           + Send
           + 'static {
        service_fn(|_: ()| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, BoxError>(http::Response::new(()))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn rejects_or_waits_up_to_bound() {
        let layer = BulkheadLayer::new("svc", policy(2, 0));
        let svc = layer.layer(slow());
        let a = tokio::spawn(svc.clone().oneshot(()));
        let b = tokio::spawn(svc.clone().oneshot(()));
        tokio::task::yield_now().await;
        let e = svc.clone().oneshot(()).await.unwrap_err();
        assert_eq!(
            ResilienceError::find(e.as_ref()),
            Some(&ResilienceError::Shed)
        );
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();

        let layer = BulkheadLayer::new("svc", policy(1, 150));
        let svc = layer.layer(slow());
        let a = tokio::spawn(svc.clone().oneshot(()));
        tokio::task::yield_now().await;
        // Waits ~100 ms for the slot, within the 150 ms bound.
        svc.clone().oneshot(()).await.unwrap();
        a.await.unwrap().unwrap();
        assert_eq!(layer.limiter().in_flight(), 0);
    }

    #[test]
    fn aimd_and_gradient2_move_the_limit() {
        let mut cfg = BulkheadConfig {
            adaptive: AdaptiveAlgorithm::Aimd,
            initial_limit: 20,
            min_limit: 2,
            max_concurrent: 100,
            ..Default::default()
        };
        let mut a = AdaptiveConcurrency::new(20);
        for _ in 0..10 {
            a.sample(&cfg, Duration::from_millis(10), 15, false);
        }
        assert_eq!(a.limit(), 30);
        a.sample(&cfg, Duration::from_millis(10), 15, true);
        assert_eq!(a.limit(), 27);

        cfg.adaptive = AdaptiveAlgorithm::Gradient2;
        let mut g = AdaptiveConcurrency::new(20);
        for _ in 0..200 {
            g.sample(&cfg, Duration::from_millis(10), 20, false);
        }
        let grown = g.limit();
        assert!(
            grown > 20,
            "steady latency at full load grows the limit: {grown}"
        );
        // Latency triples under load: the limit shrinks.
        for _ in 0..50 {
            g.sample(&cfg, Duration::from_millis(30), grown as usize, false);
        }
        assert!(g.limit() < grown, "{} >= {grown}", g.limit());
        assert!(g.limit() >= cfg.min_limit);
    }

    #[test]
    fn a_reload_bounds_the_adaptive_limit_on_the_next_call() {
        let policy = Live::new(BulkheadConfig {
            adaptive: AdaptiveAlgorithm::Aimd,
            initial_limit: 50,
            min_limit: 2,
            max_concurrent: 100,
            ..Default::default()
        });
        let limiter = ConcurrencyLimiter::new("svc", policy.clone());
        assert_eq!(limiter.limit(), 50);
        policy.store(BulkheadConfig {
            max_concurrent: 3,
            ..BulkheadConfig::clone(&policy.load())
        });
        assert_eq!(limiter.limit(), 3, "lowered max_concurrent applies at once");
        let held: Vec<_> = (0..3).map(|_| limiter.try_acquire()).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(
            limiter.try_acquire().is_none(),
            "a fourth call is over the new bound"
        );
        drop(held);
        policy.store(BulkheadConfig {
            max_concurrent: 100,
            min_limit: 60,
            ..BulkheadConfig::clone(&policy.load())
        });
        assert_eq!(limiter.limit(), 60, "raised min_limit applies at once");
    }

    #[tokio::test(start_paused = true)]
    async fn inbound_shedding_answers_503_with_retry_after() {
        let inner = service_fn(|_: http::Request<()>| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, BoxError>(http::Response::new(String::new()))
        });
        let svc = LoadShedLayer::new("me", policy(1, 0)).layer(inner);
        let a = tokio::spawn(svc.clone().oneshot(http::Request::new(())));
        tokio::task::yield_now().await;
        let r = svc.clone().oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(a.await.unwrap().unwrap().status(), 200);
    }

    /// A call a keel layer below refused (here the rate limit) never reached the upstream: it
    /// teaches the adaptive limit nothing, as in the client stack, where a rate-limited attempt
    /// gives its slot back unsampled. Counted, its near-zero round trip read as a fast upstream
    /// near the limit and grew it (and dragged Gradient2's long-term RTT down).
    #[tokio::test(start_paused = true)]
    async fn refusals_below_do_not_move_the_adaptive_limit() {
        let run = |refusals: usize| async move {
            let layer = BulkheadLayer::new(
                "svc",
                Live::new(BulkheadConfig {
                    adaptive: AdaptiveAlgorithm::Gradient2,
                    max_concurrent: 100,
                    min_limit: 1,
                    initial_limit: 1,
                    ..Default::default()
                }),
            );
            let rl = crate::RateLimitLayer::new(
                "svc",
                Live::new(crate::RateLimitConfig {
                    enabled: true,
                    rate: 1.0,
                    burst: 1,
                    key: crate::KeySource::Path,
                    ..Default::default()
                }),
            );
            let svc = layer.layer(rl.layer(service_fn(|_: http::Request<()>| async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok::<_, BoxError>(http::Response::new(()))
            })));
            let get = |path: &str| http::Request::get(path).body(()).unwrap();
            assert!(svc.clone().oneshot(get("/a")).await.is_ok());
            for _ in 0..refusals {
                assert!(svc.clone().oneshot(get("/a")).await.is_err());
            }
            assert!(svc.clone().oneshot(get("/b")).await.is_ok());
            layer.limiter().limit()
        };
        assert_eq!(run(20).await, run(0).await);
    }
}
