//! Retries: on which failures, for which requests, how long to wait, and how many in all.
//!
//! - **Which requests**: only idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE, RFC 9110
//!   §9.2.2) or requests carrying an `Idempotency-Key` (IETF draft
//!   `draft-ietf-httpapi-idempotency-key-header`), whose server deduplicates them. A bare POST is
//!   never sent twice: it may have been executed even if its answer was lost.
//! - **Which failures**: the classes in `retry_on` (connect, reset, per-try timeout, status
//!   codes); a 429 or 503 with `Retry-After` waits that long (if the deadline allows).
//! - **How long to wait**: full-jitter exponential backoff, `uniform(0, min(max, base * 2^n))`
//!   (AWS Architecture Blog, "Exponential Backoff And Jitter"): spreads retries of many clients
//!   instead of synchronising them. Never past the total deadline.
//! - **How many**: a [`RetryBudget`] (20% of requests + a floor per second, over 10 s) and a cap
//!   on concurrent retries (20% of calls in flight, at least 3); see [`crate::budget`].
//! - **Where**: each retry carries an [`Attempt`] extension whose `avoid` lists the instances
//!   earlier attempts went to (learned from [`ServedBy`] in the response extensions, or from an
//!   [`InstanceFailure`] in the error chain), so the balancer below picks another.
//!
//! The body must be sent again, so the layer is generic over [`ReplayBody`]; a body that cannot
//! be replayed is not retried (counted as `not_replayable`), never a panic.

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

use bytes::Bytes;
use keel_core::{
    request::{Attempt, Deadline as DeadlineExt, InstanceFailure, ServedBy},
    InstanceId, Live,
};
use pin_project_lite::pin_project;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    budget::RetryBudget,
    classify::{Classifier, FailureClass, HttpClassifier, Outcome},
    config::{RetryConfig, RetryOn, TimeoutConfig},
    error::{BoxError, ResilienceError, RetriesStopped, RetryStopped},
    metrics as m,
    scope::{self, CallContext},
};

/// The request header that makes a non-idempotent request safe to retry.
pub const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// A request body that can be sent again.
pub trait ReplayBody: Sized {
    /// A copy to send again, or `None` if this body cannot be replayed (e.g. a stream).
    fn try_replay(&self) -> Option<Self>;
}

macro_rules! replay_by_clone {
    ($($t:ty),*) => {$(
        impl ReplayBody for $t {
            fn try_replay(&self) -> Option<Self> { Some(self.clone()) }
        }
    )*};
}
replay_by_clone!((), String, Vec<u8>, Bytes, &'static str, &'static [u8]);

impl<D: Clone> ReplayBody for http_body_util::Full<D> {
    fn try_replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D> ReplayBody for http_body_util::Empty<D> {
    fn try_replay(&self) -> Option<Self> {
        Some(http_body_util::Empty::new())
    }
}

impl<B: ReplayBody> ReplayBody for Option<B> {
    fn try_replay(&self) -> Option<Self> {
        match self {
            Some(b) => b.try_replay().map(Some),
            None => Some(None),
        }
    }
}

/// Whether a request may be sent more than once: an idempotent method, or an `Idempotency-Key`.
pub fn is_retry_safe<B>(req: &http::Request<B>) -> bool {
    use http::Method;
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || req.headers().contains_key(IDEMPOTENCY_KEY)
}

/// A copy of a request for another attempt, or `None` if its body cannot be replayed.
#[inline]
pub fn replay_request<B: ReplayBody>(req: &http::Request<B>) -> Option<http::Request<B>> {
    let body = req.body().try_replay()?;
    let mut r = http::Request::new(body);
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    *r.extensions_mut() = req.extensions().clone();
    Some(r)
}

/// What a retry needs to send a request again: its parts and a replayable body, kept as they are
/// (no request is built unless a retry is sent).
#[derive(Debug)]
pub(crate) struct Replay<B> {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    extensions: http::Extensions,
    body: B,
}

impl<B: ReplayBody> Replay<B> {
    /// A copy of `req`'s parts, or `None` if its body cannot be replayed.
    #[inline]
    pub(crate) fn capture(req: &http::Request<B>) -> Option<Self> {
        Some(Self {
            body: req.body().try_replay()?,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            // An empty map is made anew (cloning it still walks its vectors).
            headers: if req.headers().is_empty() {
                http::HeaderMap::new()
            } else {
                req.headers().clone()
            },
            extensions: if req.extensions().is_empty() {
                http::Extensions::new()
            } else {
                req.extensions().clone()
            },
        })
    }

    /// A request to send, leaving this copy for another time.
    fn request(&self) -> Option<http::Request<B>> {
        let mut r = http::Request::new(self.body.try_replay()?);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        *r.extensions_mut() = self.extensions.clone();
        Some(r)
    }

    /// The last request to send: this copy itself.
    fn into_request(self) -> http::Request<B> {
        let mut r = http::Request::new(self.body);
        *r.method_mut() = self.method;
        *r.uri_mut() = self.uri;
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers;
        *r.extensions_mut() = self.extensions;
        r
    }
}

/// Whether an attempt failed without its request being sent.
pub(crate) fn not_sent<T>(res: &Result<http::Response<T>, BoxError>) -> bool {
    matches!(res, Err(e) if keel_core::request::not_sent(e.as_ref()))
}

/// The instance that served (or failed) an attempt, if the balancer said.
pub fn served_by<T>(res: &Result<http::Response<T>, BoxError>) -> Option<InstanceId> {
    match res {
        Ok(r) => r.extensions().get::<ServedBy>().map(|s| s.id.clone()),
        Err(e) => {
            keel_core::find_in_chain::<InstanceFailure>(e.as_ref()).map(|f| f.served_by.id.clone())
        }
    }
}

fn wants_retry(on: &RetryOn, o: &Outcome) -> bool {
    match o {
        Outcome::Success | Outcome::Rejected => false,
        Outcome::Throttled { .. } => on.codes.contains(&429),
        Outcome::Failure(c) => match c {
            FailureClass::Connect => on.connect,
            FailureClass::Reset => on.reset,
            FailureClass::Timeout => on.timeout,
            FailureClass::Status(s) => on.codes.contains(s),
            FailureClass::Other => on.error,
        },
    }
}

/// State shared by every clone of a [`Retry`]: budget, counters, RNG.
#[derive(Debug)]
pub(crate) struct RetryShared {
    pub(crate) policy: Live<RetryConfig>,
    pub(crate) budget: Arc<RetryBudget>,
    active: AtomicUsize,
    active_retries: AtomicUsize,
    rng: Mutex<SmallRng>,
    pub(crate) service: Arc<str>,
    first: metrics::Counter,
    /// Set by [`RetryLayer::with_deadline`]: the retry layer also sets the total deadline.
    deadline: Option<Live<TimeoutConfig>>,
}

impl RetryShared {
    fn backoff(&self, cfg: &RetryConfig, retry: u32) -> Duration {
        let cap = cfg
            .backoff_base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(cfg.backoff_max);
        if cap.is_zero() {
            return cap;
        }
        let mut rng = keel_core::lock(&self.rng);
        cap.mul_f64(rng.random::<f64>())
    }

    fn count(&self, outcome: &'static str) {
        m::counter(m::RETRY_ATTEMPTS_TOTAL, &self.service, outcome).increment(1);
    }

    /// Sets `keel_retry_attempts_total{outcome="first"}` to the requests the budget has counted,
    /// for a caller that does not count first attempts per call (the client stack: the budget
    /// already counts every call, so a second count would be the same number again).
    pub(crate) fn publish_first(&self) {
        self.first.absolute(self.budget.requests());
    }
}

/// Retries failed attempts of `S` within a budget.
#[derive(Debug, Clone)]
pub struct Retry<S, C = HttpClassifier> {
    inner: S,
    /// An unpolled copy of `inner`, cloned for a retry only when one is sent: a call that
    /// succeeds at once then costs one reference count instead of a clone of every layer below.
    template: Arc<S>,
    shared: Arc<RetryShared>,
    classifier: C,
}

/// Builds [`Retry`]s that share one budget.
#[derive(Debug, Clone)]
pub struct RetryLayer<C = HttpClassifier> {
    shared: Arc<RetryShared>,
    classifier: C,
}

impl RetryLayer {
    /// A retry layer for `service` with a fresh budget.
    pub fn new(service: impl Into<Arc<str>>, policy: Live<RetryConfig>) -> Self {
        Self::with_seed(service, policy, rand::random())
    }

    /// As [`new`](Self::new), with a fixed seed for the backoff jitter.
    pub fn with_seed(service: impl Into<Arc<str>>, policy: Live<RetryConfig>, seed: u64) -> Self {
        Self::build(
            service.into(),
            policy,
            seed,
            None,
            tokio::time::Instant::now(),
        )
    }

    /// A retry layer that also sets the total deadline (`timeout.total`, or an earlier one the
    /// request already carries as a [`Deadline`](keel_core::request::Deadline) extension). It
    /// never waits past it, and hands it to the per-try [`Timeout`](crate::Timeout) below through
    /// the call context rather than a request extension, which saves three allocations per call.
    /// [`ClientStackLayer`](crate::ClientStackLayer) uses it.
    pub fn with_deadline(
        service: impl Into<Arc<str>>,
        policy: Live<RetryConfig>,
        timeout: Live<TimeoutConfig>,
    ) -> Self {
        Self::build(
            service.into(),
            policy,
            rand::random(),
            Some(timeout),
            tokio::time::Instant::now(),
        )
    }

    /// As [`with_deadline`](Self::with_deadline), with the budget's seconds counted from `base`
    /// (the client stack's clock origin, shared with its rate limiter).
    pub(crate) fn for_stack(
        service: Arc<str>,
        policy: Live<RetryConfig>,
        timeout: Live<TimeoutConfig>,
        base: tokio::time::Instant,
    ) -> Self {
        Self::build(service, policy, rand::random(), Some(timeout), base)
    }

    fn build(
        service: Arc<str>,
        policy: Live<RetryConfig>,
        seed: u64,
        deadline: Option<Live<TimeoutConfig>>,
        base: tokio::time::Instant,
    ) -> Self {
        let budget = Arc::new(RetryBudget::with_base(policy.clone(), base));
        Self {
            shared: Arc::new(RetryShared {
                first: m::counter(m::RETRY_ATTEMPTS_TOTAL, &service, "first"),
                policy,
                budget,
                active: AtomicUsize::new(0),
                active_retries: AtomicUsize::new(0),
                rng: Mutex::new(SmallRng::seed_from_u64(seed)),
                service,
                deadline,
            }),
            classifier: HttpClassifier::default(),
        }
    }
}

impl<C> RetryLayer<C> {
    /// Uses another classifier.
    pub fn with_classifier<C2>(self, classifier: C2) -> RetryLayer<C2> {
        RetryLayer {
            shared: self.shared,
            classifier,
        }
    }

    /// The budget, to share with a [`Hedge`](crate::Hedge).
    pub fn budget(&self) -> Arc<RetryBudget> {
        self.shared.budget.clone()
    }

    pub(crate) fn shared(&self) -> &Arc<RetryShared> {
        &self.shared
    }
}

impl<S: Clone, C: Clone> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;
    fn layer(&self, inner: S) -> Retry<S, C> {
        Retry {
            template: Arc::new(inner.clone()),
            inner,
            shared: self.shared.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// The span of one attempt (`keel.attempt`, debug level). Not made at all when debug is off:
/// with no subscriber, tracing's `log` compatibility would otherwise still format it.
#[inline]
pub(crate) fn attempt_span(service: &str, attempt: u32, hedge: bool) -> tracing::Span {
    if tracing::level_enabled!(tracing::Level::DEBUG) {
        tracing::debug_span!("keel.attempt", service = %service, attempt, hedge)
    } else {
        tracing::Span::none()
    }
}

/// A boxed response future, as the hedge and chaos layers return on their slow paths.
pub type BoxResponseFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'static>>;

/// Counts a call in flight for the concurrency cap; holds the shared state.
#[derive(Debug)]
pub(crate) struct Active(Arc<RetryShared>);

impl RetryShared {
    /// Counts a call in flight; [`end_call`](Self::end_call) (or dropping the returned guard's
    /// equivalent) must follow.
    fn begin_call(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// The end of a call counted by `begin_call`.
    pub(crate) fn end_call(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Calls in flight, as `begin_call` and `end_call` count them.
    #[cfg(test)]
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.end_call();
    }
}

/// Counts a retry in flight for the concurrency cap.
#[derive(Debug)]
struct Retrying(Arc<RetryShared>);

impl Drop for Retrying {
    fn drop(&mut self) {
        self.0.active_retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a retry future knows besides its futures (the policy is passed in when deciding).
#[derive(Debug)]
pub(crate) struct Ctx<C, B> {
    classifier: C,
    pub(crate) attempt: u32,
    /// `max_attempts` when the call began: a reload may lower it for this call (to stop a
    /// retry storm at once), never raise it (the call may not have kept a copy to retry).
    max: u32,
    safe: bool,
    replay: Option<Replay<B>>,
    pub(crate) deadline: Option<tokio::time::Instant>,
    pending: bool,
    last: bool,
    /// What only a call whose attempt failed needs, made then: a call that succeeds at once
    /// never allocates it, and the future this sits in (moved on every return up the stack)
    /// stays small.
    later: Option<Box<Later>>,
    pub(crate) span: tracing::Span,
}

/// The retry state of a call after its first failed attempt.
#[derive(Debug, Default)]
struct Later {
    /// Instances earlier attempts went to.
    avoid: Vec<InstanceId>,
    retrying: Option<Retrying>,
    /// The wait before the attempt `decide` chose.
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set when a wanted retry was refused by the budget: the result then says so.
    stopped: Option<ResilienceError>,
}

impl<C, B: ReplayBody> Ctx<C, B> {
    /// The bookkeeping of a new call, which the caller has deposited in the budget: counts it
    /// in flight (the caller calls [`RetryShared::end_call`] when it ends) and keeps a copy of
    /// the request if it may be retried. The caller sets the first attempt's span.
    #[inline]
    pub(crate) fn begin(
        shared: &Arc<RetryShared>,
        cfg: &RetryConfig,
        classifier: C,
        req: &http::Request<B>,
        deadline: Option<tokio::time::Instant>,
    ) -> Self {
        shared.begin_call();
        let safe = cfg.max_attempts > 1 && is_retry_safe(req);
        let replay = if safe { Replay::capture(req) } else { None };
        Self {
            classifier,
            attempt: 1,
            max: cfg.max_attempts,
            safe,
            replay,
            deadline,
            pending: false,
            last: false,
            later: None,
            span: tracing::Span::none(),
        }
    }

    /// Whether another attempt may follow this one (a copy of the request is kept).
    pub(crate) fn may_retry(&self) -> bool {
        self.replay.is_some()
    }

    /// Classifies an attempt's result as the retry policy sees it.
    pub(crate) fn classify<T>(&self, res: &Result<http::Response<T>, BoxError>) -> Outcome
    where
        C: Classifier<http::Response<T>>,
    {
        self.classifier.classify(res)
    }

    /// After an attempt: `None` to return its result, or the wait before the next attempt (then
    /// [`next_request`](Self::next_request) makes its request).
    fn decide<T>(
        &mut self,
        shared: &Arc<RetryShared>,
        cfg: &RetryConfig,
        res: &Result<http::Response<T>, BoxError>,
    ) -> Option<Duration>
    where
        C: Classifier<http::Response<T>>,
    {
        if let Some(later) = self.later.as_mut() {
            later.retrying = None;
        }
        let outcome = self.classifier.classify(res);
        // A request that never left (an instance's own breaker refused it) may go elsewhere.
        let wanted = wants_retry(&cfg.retry_on, &outcome) || not_sent(res);
        let max = self.max.min(cfg.max_attempts);
        if self.attempt >= max || !wanted {
            return None;
        }
        if !self.safe {
            shared.count("not_idempotent");
            return None;
        }
        if self.replay.is_none() {
            shared.count("not_replayable");
            return None;
        }
        let remaining = self
            .deadline
            .map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
        let header = match res {
            Ok(r) => crate::classify::retry_after_header(r.headers()),
            Err(_) => None,
        };
        let wait = match (outcome, header) {
            (
                Outcome::Throttled {
                    retry_after: Some(ra),
                },
                _,
            )
            | (_, Some(ra)) => {
                if ra > cfg.max_retry_after {
                    return None;
                }
                ra
            }
            _ => shared.backoff(cfg, self.attempt),
        };
        // A retry must start before the deadline; timers fire on millisecond ticks, so keep one.
        if remaining.is_some_and(|left| wait + Duration::from_millis(1) >= left) {
            shared.count("deadline");
            return None;
        }
        // A request that was never sent adds no load when sent elsewhere: it costs no budget
        // and no retry slot (amplification counts attempts that reached an upstream).
        let sent = !not_sent(res);
        // From here on the call has failed and wants a retry: it needs its retry state.
        let later = self.later.get_or_insert_with(Box::default);
        if sent {
            let active = shared.active.load(Ordering::Relaxed);
            let cap = ((active as f64 * cfg.concurrent_ratio.get()) as usize)
                .max(cfg.concurrent_min as usize);
            if shared.active_retries.fetch_add(1, Ordering::AcqRel) >= cap {
                shared.active_retries.fetch_sub(1, Ordering::AcqRel);
                shared.count("concurrency_capped");
                later.stopped = Some(ResilienceError::BudgetExhausted);
                return None;
            }
            let retrying = Retrying(shared.clone());
            if shared.budget.try_withdraw().is_err() {
                shared.count("budget_exhausted");
                later.stopped = Some(ResilienceError::BudgetExhausted);
                return None;
            }
            later.retrying = Some(retrying);
        }
        if let Some(id) = served_by(res) {
            if !later.avoid.contains(&id) {
                later.avoid.push(id);
            }
        }
        self.attempt += 1;
        self.pending = true;
        self.last = self.attempt >= max;
        shared.count(if sent { "retry" } else { "not_sent" });
        Some(wait)
    }

    /// The call's result, once [`decide`](Self::decide) chose no further attempt: as it came,
    /// or, if a wanted retry was refused, marked with why (see [`RetriesStopped`]).
    fn conclude<T>(
        &mut self,
        res: Result<http::Response<T>, BoxError>,
    ) -> Result<http::Response<T>, BoxError> {
        let Some(reason) = self.later.as_mut().and_then(|l| l.stopped.take()) else {
            return res;
        };
        match res {
            Ok(mut r) => {
                r.extensions_mut().insert(RetryStopped(reason));
                Ok(r)
            }
            Err(source) => Err(Box::new(RetriesStopped {
                reason,
                attempts: self.attempt,
                source,
            })),
        }
    }

    /// After an attempt: the call's result if it is over (see [`conclude`](Self::conclude)), or
    /// `None` when another attempt follows (after its backoff, kept here).
    pub(crate) fn after<T>(
        &mut self,
        shared: &Arc<RetryShared>,
        cfg: &RetryConfig,
        res: Result<http::Response<T>, BoxError>,
    ) -> Option<Result<http::Response<T>, BoxError>>
    where
        C: Classifier<http::Response<T>>,
    {
        match self.decide(shared, cfg, &res) {
            None => Some(self.conclude(res)),
            Some(wait) => {
                if !wait.is_zero() {
                    self.later.get_or_insert_with(Box::default).backoff =
                        Some(Box::pin(tokio::time::sleep(wait)));
                }
                None
            }
        }
    }

    /// Waits out the backoff, readies `svc` and makes the next attempt's request and span
    /// (`service` names it). An error ends the call: polled after completion, or the service
    /// failed (then nothing is sent if polled again).
    pub(crate) fn poll_next<S>(
        &mut self,
        svc: &mut S,
        service: &str,
        cx: &mut Context<'_>,
    ) -> Poll<Result<http::Request<B>, BoxError>>
    where
        S: Service<http::Request<B>>,
        S::Error: Into<BoxError>,
    {
        if let Err(e) = std::task::ready!(svc.poll_ready(cx)) {
            self.pending = false;
            return Poll::Ready(Err(e.into()));
        }
        let req = self.next_request().map_err(|e| Box::new(e) as BoxError)?;
        self.span = attempt_span(service, self.attempt, false);
        Poll::Ready(Ok(req))
    }

    /// Waits out the backoff; `Err` if no attempt is pending (polled after completion).
    pub(crate) fn poll_backoff(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if let Some(later) = self.later.as_mut() {
            if let Some(sleep) = later.backoff.as_mut() {
                std::task::ready!(sleep.as_mut().poll(cx));
                later.backoff = None;
            }
        }
        if !self.pending {
            return Poll::Ready(Err(Box::new(ResilienceError::BudgetExhausted)));
        }
        Poll::Ready(Ok(()))
    }

    /// The request of the attempt [`decide`](Self::decide) chose, made only once it is sent (the
    /// last one takes the kept copy itself). It carries an [`Attempt`] extension naming the
    /// instances to avoid.
    fn next_request(&mut self) -> Result<http::Request<B>, ResilienceError> {
        self.pending = false;
        let next = if self.last {
            self.replay.take().map(Replay::into_request)
        } else {
            self.replay.as_ref().and_then(Replay::request)
        };
        let Some(mut next) = next else {
            return Err(ResilienceError::BodyNotReplayable);
        };
        next.extensions_mut().insert(Attempt {
            number: self.attempt,
            hedge: false,
            avoid: self
                .later
                .as_ref()
                .map(|l| l.avoid.clone())
                .unwrap_or_default(),
        });
        Ok(next)
    }
}

pin_project! {
    /// The retry layer's response future: a state machine (attempt, backoff, next attempt), so
    /// a call that succeeds at once costs no allocation here.
    pub struct ResponseFuture<S, B, C>
    where
        S: Service<http::Request<B>>,
    {
        #[pin]
        fut: Option<S::Future>,
        // The service for retries: cloned from the template when the first retry is sent.
        template: Option<Arc<S>>,
        active: Active,
        failed: Option<ResilienceError>,
        svc: Option<S>,
        ctx: Ctx<C, B>,
    }
}

impl<S, C, B, T> Future for ResponseFuture<S, B, C>
where
    S: Service<http::Request<B>, Response = http::Response<T>> + Clone,
    S::Error: Into<BoxError>,
    C: Classifier<http::Response<T>>,
    B: ReplayBody,
{
    type Output = Result<http::Response<T>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Err(Box::new(e)));
        }
        loop {
            if let Some(fut) = this.fut.as_mut().as_pin_mut() {
                let polled = {
                    let _entered = this.ctx.span.enter();
                    fut.poll(cx)
                };
                let res = match polled {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r.map_err(Into::into),
                };
                this.fut.set(None);
                // Only a failure needs the policy: read it now, as a reload may have changed it.
                let cfg = this.active.0.policy.load();
                if let Some(done) = this.ctx.after(&this.active.0, &cfg, res) {
                    return Poll::Ready(done);
                }
            }
            std::task::ready!(this.ctx.poll_backoff(cx))?;
            if this.svc.is_none() {
                *this.svc = this.template.as_deref().cloned();
            }
            let Some(svc) = this.svc.as_mut() else {
                return Poll::Ready(Err(Box::new(ResilienceError::BudgetExhausted)));
            };
            {
                let req = std::task::ready!(this.ctx.poll_next(svc, &this.active.0.service, cx))?;
                let ctx = &mut *this.ctx;
                let call = CallContext {
                    now: tokio::time::Instant::now(),
                    deadline: ctx.deadline,
                };
                let fut = {
                    let _entered = ctx.span.enter();
                    scope::enter(call, || svc.call(req))
                };
                this.fut.set(Some(fut));
            }
        }
    }
}

impl<S, C, B, T> Service<http::Request<B>> for Retry<S, C>
where
    S: Service<http::Request<B>, Response = http::Response<T>> + Clone,
    S::Error: Into<BoxError>,
    C: Classifier<http::Response<T>>,
    B: ReplayBody,
{
    type Response = http::Response<T>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let shared = &self.shared;
        let inherited = req.extensions().get::<DeadlineExt>().map(|d| d.0);
        let now = tokio::time::Instant::now();
        let total = shared
            .deadline
            .as_ref()
            .map_or(Duration::ZERO, |t| t.load().total);
        let deadline = crate::deadline::total_deadline(inherited, now, total);
        // With a deadline of its own, an inherited one already spent ends the call here.
        let failed = (!total.is_zero() && deadline.is_some_and(|d| d <= now))
            .then_some(ResilienceError::DeadlineExceeded);
        if let Some(e) = &failed {
            // Counted as the fused stack counts it.
            crate::deadline::deadline_metric(e);
        }
        let cfg = shared.policy.load();
        shared.first.increment(1);
        shared.budget.deposit_at(now);
        let mut ctx = Ctx::begin(shared, &cfg, self.classifier.clone(), &req, deadline);
        ctx.span = attempt_span(&shared.service, 1, false);
        let fut = if failed.is_none() {
            let _entered = ctx.span.enter();
            let call = CallContext { now, deadline };
            // The ready service takes the first attempt; retries use a copy of the template.
            Some(scope::enter(call, || self.inner.call(req)))
        } else {
            None
        };
        ResponseFuture {
            fut,
            template: ctx.may_retry().then(|| self.template.clone()),
            active: Active(shared.clone()),
            failed,
            svc: None,
            ctx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use tower::{service_fn, ServiceExt};

    fn cfg() -> RetryConfig {
        RetryConfig {
            backoff_base: Duration::from_millis(10),
            ..Default::default()
        }
    }

    fn counting(
        status: u16,
    ) -> (
        Arc<AtomicU32>,
        impl Service<
                http::Request<String>,
                Response = http::Response<()>,
                Error = BoxError,
                Future = impl Send,
            > + Clone
            + Send
            + 'static,
    ) {
        let n = Arc::new(AtomicU32::new(0));
        let n2 = n.clone();
        (
            n,
            service_fn(move |req: http::Request<String>| {
                n2.fetch_add(1, Ordering::SeqCst);
                let a = req
                    .extensions()
                    .get::<Attempt>()
                    .map(|a| a.number)
                    .unwrap_or(1);
                async move {
                    let mut r = http::Response::new(());
                    *r.status_mut() =
                        http::StatusCode::from_u16(if a >= 3 { 200 } else { status }).unwrap();
                    Ok::<_, BoxError>(r)
                }
            }),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn never_resends_a_bare_post_but_does_with_idempotency_key() {
        let (n, inner) = counting(503);
        let svc = RetryLayer::with_seed("svc", Live::new(cfg()), 1).layer(inner);
        let post = http::Request::post("/orders")
            .body("{}".to_string())
            .unwrap();
        let r = svc.clone().oneshot(post).await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(n.load(Ordering::SeqCst), 1, "bare POST sent once");
        let keyed = http::Request::post("/orders")
            .header("Idempotency-Key", "k1")
            .body("{}".to_string())
            .unwrap();
        let r = svc.clone().oneshot(keyed).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(n.load(Ordering::SeqCst), 4, "keyed POST retried twice");
        let get = http::Request::get("/orders").body(String::new()).unwrap();
        assert_eq!(svc.oneshot(get).await.unwrap().status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_mid_call_lowers_its_attempts_never_raises_them() {
        for (start, reload_to, attempts) in [(2, 5, 2), (3, 1, 1), (4, 2, 2)] {
            let policy = Live::new(RetryConfig {
                max_attempts: start,
                ..cfg()
            });
            let n = Arc::new(AtomicU32::new(0));
            let (n2, p2) = (n.clone(), policy.clone());
            let inner = service_fn(move |_req: http::Request<String>| {
                if n2.fetch_add(1, Ordering::SeqCst) == 0 {
                    let mut next = p2.load().as_ref().clone();
                    next.max_attempts = reload_to;
                    p2.store(next);
                }
                async {
                    let mut r = http::Response::new(());
                    *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                    Ok::<_, BoxError>(r)
                }
            });
            let svc = RetryLayer::with_seed("svc", policy, 1).layer(inner);
            let get = http::Request::get("/").body(String::new()).unwrap();
            assert_eq!(svc.oneshot(get).await.unwrap().status(), 503);
            assert_eq!(n.load(Ordering::SeqCst), attempts, "{start} -> {reload_to}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn honours_retry_after_and_avoids_failed_instance() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let inner = service_fn(move |req: http::Request<()>| {
            let a = req
                .extensions()
                .get::<Attempt>()
                .cloned()
                .unwrap_or_default();
            s2.lock()
                .unwrap()
                .push((tokio::time::Instant::now(), a.avoid.clone()));
            async move {
                if a.number < 2 {
                    let mut r = http::Response::new(());
                    *r.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
                    r.headers_mut()
                        .insert("retry-after", http::HeaderValue::from_static("2"));
                    r.extensions_mut().insert(ServedBy {
                        id: InstanceId::from("i1"),
                        addr: "127.0.0.1:1".parse().unwrap(),
                    });
                    Ok::<_, BoxError>(r)
                } else {
                    Ok(http::Response::new(()))
                }
            }
        });
        let svc = RetryLayer::with_seed("svc", Live::new(cfg()), 1).layer(inner);
        let r = svc.oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(r.status(), 200);
        let seen = seen.lock().unwrap();
        assert_eq!(seen[1].0 - seen[0].0, Duration::from_secs(2));
        assert_eq!(seen[1].1, vec![InstanceId::from("i1")]);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_amplification_under_total_failure() {
        let (n, inner) = counting(503);
        let n2 = n.clone();
        let _ = n2;
        let inner = inner.map_response(|mut r: http::Response<()>| {
            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            r
        });
        let c = RetryConfig {
            max_attempts: 3,
            min_per_second: 10,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(1),
            ..Default::default()
        };
        let svc = RetryLayer::with_seed("svc", Live::new(c), 3).layer(inner);
        let requests = 1000u32;
        // 1000 requests within one second (sequential, so the concurrency cap is not the limit).
        for _ in 0..requests {
            let r = svc
                .clone()
                .oneshot(http::Request::new(String::new()))
                .await
                .unwrap();
            assert_eq!(r.status(), 503);
        }
        let attempts = n.load(Ordering::SeqCst);
        let bound = 1.2 * requests as f64 + 10.0;
        assert!(attempts as f64 <= bound, "attempts {attempts} > {bound}");
        assert!(attempts > requests + 150, "the budget was used: {attempts}");
        // Now spent: the upstream's 503 comes back as it is, marked with why it was not retried.
        let r = svc
            .clone()
            .oneshot(http::Request::new(String::new()))
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.extensions().get::<RetryStopped>(),
            Some(&RetryStopped(ResilienceError::BudgetExhausted))
        );
    }

    /// A call whose inherited deadline is already spent is counted in `keel_deadline_total`, as
    /// the fused stack counts it.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_spent_inherited_deadline_is_counted() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let layer = RetryLayer::for_stack(
            Arc::from("spent"),
            Live::new(RetryConfig::default()),
            Live::new(crate::TimeoutConfig::default()),
            tokio::time::Instant::now(),
        );
        let inner = service_fn(|_req: http::Request<String>| async {
            Ok::<_, BoxError>(http::Response::new(()))
        });
        let mut req = http::Request::new(String::new());
        req.extensions_mut()
            .insert(DeadlineExt(tokio::time::Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        let e = layer.layer(inner).oneshot(req).await.unwrap_err();
        assert_eq!(
            ResilienceError::find(e.as_ref()),
            Some(&ResilienceError::DeadlineExceeded)
        );
        let text = handle.render();
        assert!(
            text.lines().any(|l| l
                .starts_with("keel_deadline_total{outcome=\"deadline_exceeded\"}")
                && l.ends_with(" 1")),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_is_the_typed_reason_and_keeps_the_upstream_error() {
        let n = Arc::new(AtomicU32::new(0));
        let n2 = n.clone();
        let inner = service_fn(move |_req: http::Request<String>| {
            n2.fetch_add(1, Ordering::SeqCst);
            async {
                Err::<http::Response<()>, BoxError>(Box::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )))
            }
        });
        let c = RetryConfig {
            min_per_second: 0,
            budget_ratio: keel_core::Ratio::new(0.0).unwrap(),
            backoff_base: Duration::ZERO,
            ..Default::default()
        };
        let svc = RetryLayer::with_seed("svc", Live::new(c), 3).layer(inner);
        let e = svc
            .oneshot(http::Request::new(String::new()))
            .await
            .unwrap_err();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(
            ResilienceError::find(e.as_ref()),
            Some(&ResilienceError::BudgetExhausted)
        );
        assert!(!ResilienceError::BudgetExhausted.is_retryable());
        let io = keel_core::find_in_chain::<std::io::Error>(e.as_ref()).unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().contains("after 1 attempt"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn non_replayable_body_is_not_retried() {
        struct Stream;
        impl ReplayBody for Stream {
            fn try_replay(&self) -> Option<Self> {
                None
            }
        }
        let n = Arc::new(AtomicU32::new(0));
        let n2 = n.clone();
        let inner = service_fn(move |_req: http::Request<Stream>| {
            n2.fetch_add(1, Ordering::SeqCst);
            async {
                Err::<http::Response<()>, BoxError>(Box::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )))
            }
        });
        let svc = RetryLayer::with_seed("svc", Live::new(cfg()), 1).layer(inner);
        let e = svc
            .oneshot(http::Request::put("/x").body(Stream).unwrap())
            .await
            .unwrap_err();
        assert_eq!(classify_kind(&e), Outcome::Failure(FailureClass::Connect));
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn never_backs_off_past_the_deadline() {
        let (n, inner) = counting(503);
        let c = RetryConfig {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(1),
            ..Default::default()
        };
        let timeout = Live::new(TimeoutConfig {
            total: Duration::from_millis(100),
            per_try: Duration::ZERO,
        });
        let svc = RetryLayer::with_deadline("svc", Live::new(c), timeout).layer(inner);
        // The jittered backoff is uniform below 1 s: a retry happens only when the draw fits
        // in the time left (about one in ten), and no call ever outlives its deadline.
        let mut retried = 0;
        for _ in 0..20 {
            let before = n.load(Ordering::SeqCst);
            let t = tokio::time::Instant::now();
            let r = svc
                .clone()
                .oneshot(http::Request::new(String::new()))
                .await
                .unwrap();
            assert!(t.elapsed() < Duration::from_millis(100));
            assert!(r.status() == 503 || r.status() == 200);
            retried += n.load(Ordering::SeqCst) - before - 1;
        }
        assert!(
            retried < 20,
            "retried {retried} times within a 100 ms deadline"
        );
    }

    fn classify_kind(e: &BoxError) -> Outcome {
        crate::classify::classify_error(e.as_ref())
    }
}
