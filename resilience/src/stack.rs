//! The client stack the facade puts in front of the balancer, and the inbound set in front of a
//! server. The order is fixed, and each position has a reason:
//!
//! ```text
//! caller
//!   -> Deadline      total deadline over everything below (the earlier of `timeout.total`
//!                    and a Deadline extension the request carries)
//!   -> Retry         retries within the budget, never past the deadline
//!   -> Hedge         a second attempt when the first is late (same budget)
//!   -> CircuitBreaker / AdaptiveThrottle   per service; sees every attempt, fails fast
//!   -> Bulkhead      bounds attempts in flight (fixed, Gradient2 or AIMD)
//!   -> RateLimit     GCRA, local or Redis
//!   -> Timeout       each attempt: min(per_try, remaining), handed to the transport, which
//!                    sends the time left as keel-deadline-ms
//!   -> Chaos         injected faults look like upstream faults to everything above
//!   -> inner         the balancer (per-instance breakers, outlier ejection), then the client
//! ```
//!
//! - The deadline is outermost so that retries, backoff and hedges all fit in it.
//! - Retry is above the breaker so that a breaker refusal (`BreakerOpen`, a keel rejection) ends
//!   the call instead of being retried into a storm, and each attempt is counted by the breaker.
//! - The bulkhead is below the breaker so an open breaker costs no slot, and above the rate limit
//!   so calls waiting for a slot do not spend rate.
//! - The per-try timeout is innermost so it measures the upstream only.
//!
//! [`ClientStack`] keeps this order but is one service, not nested layers: see its docs.
//!
//! Inbound ([`ServerStackLayer`]): deadline check (504 for work whose caller has given up) ->
//! shedding (503 + `Retry-After`) -> rate limit (429 + `Retry-After` + RateLimit headers) ->
//! the application.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use keel_core::{request::Deadline as DeadlineExt, Live, LiveCache};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    breaker::Breaker,
    breaker::{End, RawPermit},
    budget::RetryBudget,
    bulkhead::Slot,
    bulkhead::{ConcurrencyLimiter, LoadShed, LoadShedLayer},
    chaos::{Chaos, ChaosLayer},
    classify::Classifier,
    classify::{HttpClassifier, Outcome},
    config::{BulkheadConfig, RateLimitConfig, ResilienceConfig},
    deadline::{DeadlineCheck, DeadlineCheckLayer},
    error::{BoxError, InvalidConfig, ResilienceError},
    hedge::{Hedge, HedgeLayer},
    per_try::{Gate, PerTry, PerTryLayer},
    ratelimit::{request_key, RateLimiter, ServerRateLimit, ServerRateLimitLayer},
    retry::BoxResponseFuture,
    retry::{is_retry_safe, Ctx, ReplayBody, RetryLayer, RetryShared},
    scope::{self, CallContext},
};

/// The inbound stack over an application service `S`.
pub type ServerStack<S> = DeadlineCheck<LoadShed<ServerRateLimit<S>>>;

/// Builds the client stack for one upstream service from its live `[clients.NAME]` section.
///
/// Each layer reads its own projection of the section per call; the state (breaker window,
/// retry budget, limits) is created once here and shared by every service this layer builds,
/// so cloning the built service or building it twice shares one breaker and one budget.
///
/// ```
/// use keel_core::Live;
/// use keel_resilience::{BoxError, ClientStackLayer, ResilienceConfig};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let config = Live::new(ResilienceConfig::default());
/// let stack = ClientStackLayer::try_new("payments", config).unwrap();
/// let balancer = service_fn(|_req: http::Request<String>| async {
///     Ok::<_, BoxError>(http::Response::new(String::from("ok")))
/// });
/// let client = stack.layer(balancer);
/// let res = client.oneshot(http::Request::get("/charge").body(String::new()).unwrap()).await;
/// assert_eq!(res.unwrap().into_body(), "ok");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ClientStackLayer {
    service: Arc<str>,
    config: Live<ResilienceConfig>,
    retry: RetryLayer,
    hedge: HedgeLayer,
    per_try: PerTryLayer,
    chaos: ChaosLayer,
    /// The clock origin of the retry budget and the rate limiter: a call's time since it is
    /// computed once and serves both.
    base: Instant,
}

impl ClientStackLayer {
    /// The stack for `service`, following `config`. The configuration is assumed valid (a hot
    /// reload is validated before it is published); see [`try_new`](Self::try_new).
    pub fn new(service: impl Into<Arc<str>>, config: Live<ResilienceConfig>) -> Self {
        let service: Arc<str> = service.into();
        let timeout = config.project(|c| c.timeout.clone());
        let retry_cfg = config.project(|c| c.retry.clone());
        let base = Instant::now();
        let retry = RetryLayer::for_stack(service.clone(), retry_cfg, timeout.clone(), base);
        let hedge = HedgeLayer::new(
            service.clone(),
            config.project(|c| c.hedge.clone()),
            Some(retry.budget()),
        );
        let per_try = PerTryLayer::new(
            Breaker::new(service.clone(), "", config.project(|c| c.breaker.clone())),
            ConcurrencyLimiter::new(service.clone(), config.project(|c| c.bulkhead.clone())),
            RateLimiter::with_base(
                service.clone(),
                config.project(|c| c.rate_limit.clone()),
                base,
            ),
            timeout,
        );
        Self {
            retry,
            hedge,
            per_try,
            chaos: ChaosLayer::new(config.project(|c| c.chaos.clone())),
            service,
            config,
            base,
        }
    }

    /// As [`new`](Self::new), refusing an invalid configuration.
    pub fn try_new(
        service: impl Into<Arc<str>>,
        config: Live<ResilienceConfig>,
    ) -> Result<Self, InvalidConfig> {
        config.load().validate().map_err(InvalidConfig)?;
        Ok(Self::new(service, config))
    }

    /// The upstream service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The live configuration.
    pub fn config(&self) -> &Live<ResilienceConfig> {
        &self.config
    }

    /// The per-service breaker (for the admin endpoint).
    pub fn breaker(&self) -> &Arc<Breaker> {
        self.per_try.breaker()
    }

    /// The retry budget (shared with hedges).
    pub fn budget(&self) -> Arc<RetryBudget> {
        self.retry.budget()
    }

    /// The bulkhead's limiter.
    pub fn bulkhead(&self) -> &Arc<ConcurrencyLimiter> {
        self.per_try.bulkhead()
    }

    /// The rate limiter.
    pub fn rate_limiter(&self) -> &Arc<RateLimiter> {
        self.per_try.rate_limiter()
    }

    /// Sets the metrics sampled rather than updated per call: the bulkhead's calls in flight,
    /// the breaker's state (forced open and disabled are set by configuration, not by a
    /// transition), and the stack's first attempts (`keel_retry_attempts_total{outcome="first"}`, the calls
    /// its retry budget has counted). Call it before metrics are exported; the facade does, on
    /// each `/metrics` request.
    pub fn publish_gauges(&self) {
        self.per_try.bulkhead().publish();
        self.per_try.breaker().publish();
        self.retry.shared().publish_first();
    }
}

impl<S: Clone> Layer<S> for ClientStackLayer {
    type Service = ClientStack<S>;
    fn layer(&self, inner: S) -> ClientStack<S> {
        let per_try = self.per_try.layer(self.chaos.layer(inner.clone()));
        ClientStack {
            config: self.config.cache(),
            parts: Arc::new(Parts {
                retry: self.retry.shared().clone(),
                gate: self.per_try.gate().clone(),
                hedged: self.hedge.layer(per_try.clone()),
                per_try,
                svc: inner.clone(),
                config: self.config.clone(),
                base: self.base,
            }),
            inner,
        }
    }
}

/// What every clone of a [`ClientStack`] shares.
#[derive(Debug)]
struct Parts<S> {
    retry: Arc<RetryShared>,
    gate: Arc<Gate>,
    /// The layered path, for attempts that hedge.
    hedged: Hedge<PerTry<Chaos<S>>>,
    /// The layered path, for attempts that wait (bulkhead, Redis) or inject faults.
    per_try: PerTry<Chaos<S>>,
    /// An unpolled copy of the inner service, cloned for retries.
    svc: S,
    config: Live<ResilienceConfig>,
    /// The clock origin of the retry budget and the rate limiter.
    base: Instant,
}

/// The client stack over `S`: deadline → retry → hedge → breaker → bulkhead → rate limit →
/// per-try timeout → chaos → `S`, built by [`ClientStackLayer`].
///
/// It behaves as the separate layers stacked in that order (and uses them, sharing their state,
/// for hedged attempts, attempts that wait for a bulkhead slot or a Redis rate decision, and
/// injected faults), but the common attempt (no hedge, no chaos, a free slot, a local rate
/// decision) runs fused: the whole `[clients.NAME]` section is read once per call through a
/// [`LiveCache`], the clock is read once at the start and once at the end, the result is
/// classified once per concern, the deadline needs no request extension, and the call's state is
/// one future.
#[derive(Debug)]
pub struct ClientStack<S> {
    inner: S,
    parts: Arc<Parts<S>>,
    config: LiveCache<ResilienceConfig>,
}

impl<S: Clone> Clone for ClientStack<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            parts: self.parts.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S, B, T> Service<http::Request<B>> for ClientStack<S>
where
    S: Service<http::Request<B>, Response = http::Response<T>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send + 'static,
    B: ReplayBody + Send + 'static,
    T: Default + Send + 'static,
{
    type Response = http::Response<T>;
    type Error = BoxError;
    type Future = ClientFuture<S, B, T>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline(always)]
    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let cfg = self.config.load();
        let parts = &*self.parts;
        let now = Instant::now();
        let since = now.saturating_duration_since(parts.base);
        parts.retry.budget.deposit_since(since);
        let inherited = req.extensions().get::<DeadlineExt>().map(|d| d.0);
        let deadline = crate::deadline::total_deadline(inherited, now, cfg.timeout.total);
        // The time left, known without clock arithmetic when the call sets its own deadline.
        let left = match inherited {
            None => (!cfg.timeout.total.is_zero()).then_some(cfg.timeout.total),
            Some(_) => deadline.map(|d| d.saturating_duration_since(now)),
        };
        // Built first and filled in place: the future is what `call` returns, so the attempt's
        // state is written where it will live instead of being moved there. From here on its
        // drop gives back whatever the attempt holds and uncounts the call (counted in flight
        // by `begin`), also if the inner `call` panics.
        let mut fut = ClientFuture {
            fast: None,
            held: Held::default(),
            other: None,
            parts: self.parts.clone(),
            svc: None,
            ctx: Ctx::begin(
                &parts.retry,
                &cfg.retry,
                HttpClassifier::default(),
                &req,
                deadline,
            ),
        };
        fut.ctx.span = crate::retry::attempt_span(&parts.retry.service, 1, false);
        let started = {
            let _entered = fut.ctx.span.enter();
            let at = At {
                now,
                since,
                deadline,
                left,
            };
            attempt(&mut self.inner, parts, cfg, req, at, &mut fut.held)
        };
        match started {
            Ok(f) => fut.fast = Some(f),
            Err(other) => fut.other = Some(other),
        }
        fut
    }
}

/// When an attempt starts: the clock reading, the call's total deadline and the time left to it.
#[derive(Debug, Clone, Copy)]
struct At {
    now: Instant,
    /// `now` less the stack's clock origin (for the rate limiter).
    since: std::time::Duration,
    deadline: Option<Instant>,
    left: Option<std::time::Duration>,
}

impl At {
    /// A later attempt of a call with this `deadline`, starting now.
    fn later<S>(parts: &Parts<S>, deadline: Option<Instant>) -> Self {
        let now = Instant::now();
        Self {
            now,
            since: now.saturating_duration_since(parts.base),
            deadline,
            left: deadline.map(|d| d.saturating_duration_since(now)),
        }
    }
}

/// Starts one attempt on `svc` (ready): fused when it can be (its future, with the permits it
/// holds written into `held`), else through the layered path or refused (nothing held).
#[inline(always)]
fn attempt<S, B, T>(
    svc: &mut S,
    parts: &Parts<S>,
    cfg: &ResilienceConfig,
    req: http::Request<B>,
    at: At,
    held: &mut Held,
) -> Result<S::Future, Other<T>>
where
    S: Service<http::Request<B>, Response = http::Response<T>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: ReplayBody + Send + 'static,
    T: Default + Send + 'static,
{
    let At {
        now,
        since,
        deadline,
        left,
    } = at;
    if left.is_some_and(|l| l.is_zero()) {
        let e = ResilienceError::DeadlineExceeded;
        crate::deadline::deadline_metric(&e);
        return Err(Other::Failed(Some(e)));
    }
    let call = CallContext { now, deadline };
    if cfg.hedge.enabled && is_retry_safe(&req) {
        return Err(layered(parts.hedged.clone(), req, call));
    }
    if cfg.chaos.enabled || RateLimiter::is_distributed(&cfg.rate_limit) {
        return Err(layered(parts.per_try.clone(), req, call));
    }
    let gate = &parts.gate;
    let breaker = gate
        .breaker
        .take(&cfg.breaker, now)
        .map_err(|e| Other::Failed(Some(e)))?;
    let Some(slot) = gate.bulkhead.take(&cfg.bulkhead, Some(now)) else {
        gate.breaker.release_raw(breaker);
        if cfg.bulkhead.max_wait.is_zero() {
            return Err(Other::Failed(Some(gate.bulkhead.shed())));
        }
        // Waits for a slot: the layered path takes its own permits.
        return Err(layered(parts.per_try.clone(), req, call));
    };
    // Held from here, so given back by the future's drop if anything below panics (the inner
    // service's `call`, say): a lost half-open permit would keep the breaker refusing calls.
    held.breaker = Some(breaker);
    held.slot = Some(slot);
    let rl = &cfg.rate_limit;
    if rl.enabled {
        let admitted = gate
            .rate
            .admit_local_since(rl, request_key(&rl.key, &req), since);
        if let Err(retry_after) = admitted {
            held.release(gate);
            return Err(Other::Failed(Some(ResilienceError::RateLimited {
                retry_after,
            })));
        }
    }
    match crate::deadline::attempt_bound(left, cfg.timeout.per_try) {
        Ok(bound) => {
            let end = bound.map(|b| now + b);
            held.end = end;
            held.bound = bound;
            let _scope = keel_core::request::AttemptScope::enter(end);
            Ok(svc.call(req))
        }
        Err(e) => {
            held.release(gate);
            crate::deadline::deadline_metric(&e);
            Err(Other::Failed(Some(e)))
        }
    }
}

/// An attempt through layered services (boxed: hedging, waiting, Redis and chaos are rare or slow
/// next to the boxing).
fn layered<L, B, T>(mut svc: L, req: http::Request<B>, call: CallContext) -> Other<T>
where
    L: Service<http::Request<B>, Response = http::Response<T>, Error = BoxError> + Send + 'static,
    L::Future: Send + 'static,
    B: Send + 'static,
{
    Other::Boxed(Box::pin(async move {
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
        let call = CallContext {
            now: Instant::now(),
            ..call
        };
        scope::enter(call, || svc.call(req)).await
    }))
}

/// What a fused attempt holds while it runs: its permits, its timer and its end.
#[derive(Debug, Default)]
struct Held {
    breaker: Option<RawPermit>,
    slot: Option<Slot>,
    // Created on the first `Pending` only: an answer that is ready at once needs no timer.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    end: Option<Instant>,
    /// The longest the attempt may take (`end` less its start), for the breaker's slow-call
    /// check without clock arithmetic.
    bound: Option<std::time::Duration>,
}

impl Held {
    /// Gives the permits back unused (the attempt was refused, or dropped).
    fn release(&mut self, gate: &Gate) {
        if let Some(p) = self.breaker.take() {
            gate.breaker.release_raw(p);
        }
        if let Some(s) = self.slot.take() {
            gate.bulkhead.release(s);
        }
        self.sleep = None;
    }

    /// Records the attempt's result with the breaker and the bulkhead.
    fn settle<T>(&mut self, gate: &Gate, res: &Result<http::Response<T>, BoxError>) {
        let outcome = match self.breaker.take() {
            Some(p) => gate
                .breaker
                .settle(p, res, self.bound.map_or_else(End::now, End::Within)),
            None => HttpClassifier::default().classify(res),
        };
        if let Some(s) = self.slot.take() {
            gate.bulkhead.settle(s, &outcome);
        }
        self.sleep = None;
    }
}

/// An attempt that is not fused: boxed through the layered services, or refused.
enum Other<T> {
    Boxed(BoxResponseFuture<http::Response<T>>),
    Failed(Option<ResilienceError>),
}

impl<T> std::fmt::Debug for Other<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Boxed(_) => f.write_str("Boxed"),
            Self::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}

pin_project! {
    /// The response future of [`ClientStack`]: the current attempt (fused, or another kind), the
    /// backoff, and the retry state.
    pub struct ClientFuture<S, B, T>
    where
        S: Service<http::Request<B>>,
    {
        #[pin]
        fast: Option<S::Future>,
        held: Held,
        other: Option<Other<T>>,
        parts: Arc<Parts<S>>,
        svc: Option<S>,
        ctx: Ctx<HttpClassifier, B>,
    }

    impl<S, B, T> PinnedDrop for ClientFuture<S, B, T>
    where
        S: Service<http::Request<B>>,
    {
        fn drop(this: Pin<&mut Self>) {
            // A call dropped mid-attempt (its caller gave up): give the permits back.
            let this = this.project();
            this.held.release(&this.parts.gate);
            this.parts.retry.end_call();
        }
    }
}

impl<S, B, T> Future for ClientFuture<S, B, T>
where
    S: Service<http::Request<B>, Response = http::Response<T>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send + 'static,
    B: ReplayBody + Send + 'static,
    T: Default + Send + 'static,
{
    type Output = Result<http::Response<T>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let res = if let Some(fut) = this.fast.as_mut().as_pin_mut() {
                let polled = {
                    let _entered = this.ctx.span.enter();
                    fut.poll(cx)
                };
                let res = match polled {
                    Poll::Ready(r) => r.map_err(Into::into),
                    Poll::Pending => {
                        let held = &mut *this.held;
                        let e = std::task::ready!(crate::per_try::poll_timer(
                            &mut held.sleep,
                            held.end,
                            this.ctx.deadline,
                            cx
                        ));
                        Err(crate::per_try::timer_error(e, || this.fast.set(None)))
                    }
                };
                this.fast.set(None);
                this.held.settle(&this.parts.gate, &res);
                Some(res)
            } else {
                match this.other.as_mut() {
                    Some(Other::Boxed(fut)) => {
                        let polled = {
                            let _entered = this.ctx.span.enter();
                            fut.as_mut().poll(cx)
                        };
                        let res = std::task::ready!(polled);
                        *this.other = None;
                        Some(res)
                    }
                    Some(Other::Failed(e)) => {
                        let e = e.take().unwrap_or(ResilienceError::DeadlineExceeded);
                        *this.other = None;
                        Some(Err(Box::new(e) as BoxError))
                    }
                    None => None,
                }
            };
            if let Some(res) = res {
                match this.ctx.classify(&res) {
                    Outcome::Success => return Poll::Ready(res),
                    Outcome::Rejected if !crate::retry::not_sent(&res) => {
                        return Poll::Ready(res); // keel refused the call: never retried
                    }
                    _ => {}
                }
                // Only a failure needs the policy: read it now, as a reload may have changed it.
                let cfg = this.parts.config.load();
                if let Some(done) = this.ctx.after(&this.parts.retry, &cfg.retry, res) {
                    return Poll::Ready(done);
                }
            }
            std::task::ready!(this.ctx.poll_backoff(cx))?;
            let parts = this.parts.clone();
            let svc = this.svc.get_or_insert_with(|| parts.svc.clone());
            let req = std::task::ready!(this.ctx.poll_next(svc, &parts.retry.service, cx))?;
            let ctx = &mut *this.ctx;
            // A reload between attempts applies to the next one.
            let cfg = parts.config.load();
            let started = {
                let _entered = ctx.span.enter();
                attempt(
                    svc,
                    &parts,
                    &cfg,
                    req,
                    At::later(&parts, ctx.deadline),
                    this.held,
                )
            };
            match started {
                Ok(fut) => this.fast.set(Some(fut)),
                Err(other) => *this.other = Some(other),
            }
        }
    }
}

/// Builds the inbound stack: deadline check, shedding, rate limit.
#[derive(Debug, Clone)]
pub struct ServerStackLayer {
    deadline: DeadlineCheckLayer,
    shed: LoadShedLayer,
    rate_limit: ServerRateLimitLayer,
}

impl ServerStackLayer {
    /// For this service (`service` names its metrics), with its shedding and rate limit policies.
    pub fn new(
        service: impl Into<Arc<str>>,
        shed: Live<BulkheadConfig>,
        rate_limit: Live<RateLimitConfig>,
    ) -> Self {
        let service = service.into();
        Self {
            deadline: DeadlineCheckLayer::new(),
            shed: LoadShedLayer::new(service.clone(), shed),
            rate_limit: ServerRateLimitLayer::new(service, rate_limit),
        }
    }
}

impl ServerStackLayer {
    /// The shedding limiter (to [`publish`](ConcurrencyLimiter::publish) its gauges).
    pub fn shed_limiter(&self) -> &Arc<ConcurrencyLimiter> {
        self.shed.limiter()
    }
}

impl<S> Layer<S> for ServerStackLayer {
    type Service = ServerStack<S>;
    fn layer(&self, inner: S) -> ServerStack<S> {
        self.deadline
            .layer(self.shed.layer(self.rate_limit.layer(inner)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{error::BoxError, BreakerState, ResilienceError};
    use std::{
        sync::atomic::{AtomicU32, Ordering},
        time::Duration,
    };
    use tower::{service_fn, Service, ServiceExt};

    #[tokio::test(start_paused = true)]
    async fn composes_in_order_and_reloads_without_losing_state() {
        let config = Live::new(ResilienceConfig::default());
        let stack = ClientStackLayer::try_new("payments", config.clone()).unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let c2 = calls.clone();
        // The transport writes the header (here the layer for other transports does).
        let client = stack.layer(crate::PropagateDeadlineLayer.layer(service_fn(
            move |req: http::Request<()>| {
                c2.fetch_add(1, Ordering::SeqCst);
                assert!(req.headers().contains_key("keel-deadline-ms"));
                // The deadline reaches the attempt through the call context, not an extension map.
                assert!(req
                    .extensions()
                    .get::<keel_core::request::Deadline>()
                    .is_none());
                async {
                    let mut r = http::Response::new(());
                    *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                    Ok::<_, BoxError>(r)
                }
            },
        )));
        let mut next = config.load().as_ref().clone();
        next.breaker.minimum_calls = 4;
        next.breaker.size = 4;
        next.retry.max_attempts = 2;
        config.store(next);
        // Two calls x two attempts: the breaker (now minimum 4) opens on the fourth failure.
        for _ in 0..2 {
            let r = client
                .clone()
                .oneshot(http::Request::new(()))
                .await
                .unwrap();
            assert_eq!(r.status(), 502);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(stack.breaker().state(), BreakerState::Open);
        // Open breaker: refused without a call, and not retried.
        let e = client
            .clone()
            .oneshot(http::Request::new(()))
            .await
            .unwrap_err();
        assert!(matches!(
            ResilienceError::find(e.as_ref()),
            Some(ResilienceError::BreakerOpen { .. })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // A reload of an unrelated key keeps the breaker open (state beside policy).
        let mut next = config.load().as_ref().clone();
        next.retry.max_attempts = 3;
        config.store(next);
        assert_eq!(stack.breaker().state(), BreakerState::Open);
    }

    /// A backend that answers 502 and, on its first call, reloads `max_attempts` to `reload_to`.
    async fn attempts_with_a_reload(start: u32, reload_to: u32) -> usize {
        let mut cfg = ResilienceConfig::default();
        cfg.retry.max_attempts = start;
        cfg.retry.backoff_base = Duration::ZERO;
        cfg.breaker.minimum_calls = 100;
        let config = Live::new(cfg);
        let stack = ClientStackLayer::try_new("reloaded", config.clone()).unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = calls.clone();
        let client = stack.layer(service_fn(move |_req: http::Request<()>| {
            if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                let mut next = config.load().as_ref().clone();
                next.retry.max_attempts = reload_to;
                config.store(next);
            }
            async {
                let mut r = http::Response::new(());
                *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                Ok::<_, BoxError>(r)
            }
        }));
        let r = client.oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(r.status(), 502);
        calls.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_mid_call_may_lower_its_attempts_never_raise_them() {
        assert_eq!(
            attempts_with_a_reload(2, 5).await,
            2,
            "raised: for new calls"
        );
        assert_eq!(attempts_with_a_reload(3, 1).await, 1, "lowered: at once");
        assert_eq!(attempts_with_a_reload(4, 2).await, 2);
    }

    fn slow_backend(
        delay: Duration,
        seen: Arc<std::sync::Mutex<Vec<u64>>>,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<()>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        crate::PropagateDeadlineLayer.layer(service_fn(move |req: http::Request<()>| {
            let ms = crate::remaining_from_header(req.headers()).map(|d| d.as_millis() as u64);
            seen.lock().unwrap().push(ms.unwrap_or(0));
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, BoxError>(http::Response::new(()))
            }
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn every_attempt_fits_in_the_total_deadline_and_times_out_count_as_failures() {
        let mut cfg = ResilienceConfig::default();
        cfg.timeout.total = Duration::from_millis(250);
        cfg.timeout.per_try = Duration::from_millis(100);
        cfg.retry.backoff_base = Duration::ZERO;
        cfg.retry.max_attempts = 5;
        cfg.breaker.minimum_calls = 100;
        let config = Live::new(cfg);
        let stack = ClientStackLayer::try_new("slow", config).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = stack.layer(slow_backend(Duration::from_secs(5), seen.clone()));
        let t0 = tokio::time::Instant::now();
        let e = client.oneshot(http::Request::new(())).await.unwrap_err();
        assert_eq!(
            ResilienceError::find(e.as_ref()),
            Some(&ResilienceError::DeadlineExceeded)
        );
        // 100 + 100 + the 50 ms left: the third attempt is told, and held to, what remains.
        assert_eq!(tokio::time::Instant::now() - t0, Duration::from_millis(250));
        assert_eq!(*seen.lock().unwrap(), vec![100, 100, 50]);
        // The two per-try timeouts are upstream failures for the breaker; the last attempt,
        // cut by the caller's own deadline, is not.
        let (calls, failures, _) = stack.breaker().window_counts();
        assert_eq!((calls, failures), (2, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_inherited_deadline_wins_when_earlier() {
        let config = Live::new(ResilienceConfig::default());
        let stack = ClientStackLayer::try_new("inherit", config).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = stack.layer(slow_backend(Duration::ZERO, seen.clone()));
        let mut req = http::Request::new(());
        req.extensions_mut().insert(keel_core::request::Deadline(
            tokio::time::Instant::now() + Duration::from_millis(40),
        ));
        client.oneshot(req).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![40]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bulkhead_waits_within_max_wait_then_sheds() {
        let mut cfg = ResilienceConfig::default();
        cfg.bulkhead.max_concurrent = 1;
        cfg.bulkhead.min_limit = 1;
        cfg.bulkhead.initial_limit = 1;
        cfg.bulkhead.max_wait = Duration::from_millis(50);
        let config = Live::new(cfg);
        let stack = ClientStackLayer::try_new("narrow", config.clone()).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = stack.layer(slow_backend(Duration::from_millis(30), seen.clone()));
        let first = tokio::spawn(client.clone().oneshot(http::Request::new(())));
        tokio::task::yield_now().await;
        // Waits for the first call's slot (30 ms < 50 ms), then runs.
        let second = client.clone().oneshot(http::Request::new(())).await;
        assert!(second.is_ok());
        assert!(first.await.unwrap().is_ok());
        // Without waiting, the same contention is shed at once (a reload, no new stack).
        let mut next = config.load().as_ref().clone();
        next.bulkhead.max_wait = Duration::ZERO;
        config.store(next);
        let first = tokio::spawn(client.clone().oneshot(http::Request::new(())));
        tokio::task::yield_now().await;
        let e = client.oneshot(http::Request::new(())).await.unwrap_err();
        assert_eq!(
            ResilienceError::find(e.as_ref()),
            Some(&ResilienceError::Shed)
        );
        assert!(first.await.unwrap().is_ok());
        assert_eq!(stack.bulkhead().in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_call_gives_its_slot_back() {
        let mut cfg = ResilienceConfig::default();
        cfg.bulkhead.max_concurrent = 1;
        cfg.bulkhead.min_limit = 1;
        cfg.bulkhead.initial_limit = 1;
        let stack = ClientStackLayer::try_new("cancel", Live::new(cfg)).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = stack.layer(slow_backend(Duration::from_secs(1), seen));
        let call = tokio::spawn(client.clone().oneshot(http::Request::new(())));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(stack.bulkhead().in_flight(), 1);
        call.abort();
        let _ = call.await;
        assert_eq!(stack.bulkhead().in_flight(), 0);
        // The slot is usable again, and the breaker saw nothing.
        assert!(client.oneshot(http::Request::new(())).await.is_ok());
        assert_eq!(stack.breaker().window_counts().0, 1);
    }

    #[tokio::test]
    async fn a_call_that_panics_gives_its_permits_back() {
        let mut cfg = ResilienceConfig::default();
        cfg.bulkhead.max_concurrent = 1;
        cfg.bulkhead.min_limit = 1;
        cfg.bulkhead.initial_limit = 1;
        let stack = ClientStackLayer::try_new("panics", Live::new(cfg)).unwrap();
        let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut client = stack.layer(service_fn(move |_req: http::Request<()>| {
            assert!(
                !first.swap(false, Ordering::SeqCst),
                "the inner call panics once"
            );
            async { Ok::<_, BoxError>(http::Response::new(())) }
        }));
        std::future::poll_fn(|cx| client.poll_ready(cx))
            .await
            .unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(client.call(http::Request::new(())));
        }));
        assert!(panicked.is_err());
        assert_eq!(stack.bulkhead().in_flight(), 0, "the slot came back");
        assert!(client.oneshot(http::Request::new(())).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn layers_that_wait_keep_the_deadline_for_the_per_try_layer() {
        use crate::{BulkheadLayer, RetryLayer, TimeoutLayer};
        let timeout = Live::new(crate::TimeoutConfig {
            total: Duration::from_millis(200),
            per_try: Duration::ZERO,
        });
        let bulkhead = Live::new(BulkheadConfig {
            max_concurrent: 1,
            min_limit: 1,
            initial_limit: 1,
            max_wait: Duration::from_secs(1),
            ..Default::default()
        });
        let retry = Live::new(crate::RetryConfig {
            max_attempts: 1,
            ..Default::default()
        });
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let inner = slow_backend(Duration::from_millis(150), seen.clone());
        let svc = RetryLayer::with_deadline("w", retry, timeout.clone()).layer(
            BulkheadLayer::new("w", bulkhead).layer(TimeoutLayer::new(timeout).layer(inner)),
        );
        let t0 = tokio::time::Instant::now();
        let first = tokio::spawn(svc.clone().oneshot(http::Request::new(())));
        tokio::task::yield_now().await;
        // Waits 150 ms for the slot, then has 50 ms of its deadline left: told so, held to it.
        let e = svc.oneshot(http::Request::new(())).await.unwrap_err();
        assert_eq!(
            ResilienceError::find(e.as_ref()),
            Some(&ResilienceError::DeadlineExceeded)
        );
        assert_eq!(tokio::time::Instant::now() - t0, Duration::from_millis(200));
        assert!(first.await.unwrap().is_ok());
        assert_eq!(*seen.lock().unwrap(), vec![200, 50]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_inherits_the_deadline() {
        let mut cfg = ResilienceConfig::default();
        cfg.timeout.total = Duration::from_millis(500);
        cfg.hedge.enabled = true;
        cfg.hedge.delay = Duration::from_millis(100);
        let config = Live::new(cfg);
        let stack = ClientStackLayer::try_new("hedged", config).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = stack.layer(slow_backend(Duration::from_millis(300), seen.clone()));
        client.oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![500, 400]);
    }

    #[tokio::test(start_paused = true)]
    async fn server_stack_answers_for_itself() {
        let shed = Live::new(BulkheadConfig::default());
        let rl = Live::new(RateLimitConfig {
            enabled: true,
            rate: 1.0,
            burst: 1,
            ..Default::default()
        });
        let app =
            ServerStackLayer::new("me", shed, rl).layer(service_fn(|_: http::Request<()>| async {
                Ok::<_, BoxError>(http::Response::new(String::new()))
            }));
        let expired = http::Request::builder()
            .header("keel-deadline-ms", "0")
            .body(())
            .unwrap();
        assert_eq!(app.clone().oneshot(expired).await.unwrap().status(), 504);
        assert_eq!(
            app.clone()
                .oneshot(http::Request::new(()))
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            app.clone()
                .oneshot(http::Request::new(()))
                .await
                .unwrap()
                .status(),
            429
        );
    }

    /// Durations that pass validation must not panic later: an instant plus a huge
    /// `timeout.total` (or `per_try`, `max_wait`, `open_duration_max`) overflowed.
    #[tokio::test]
    async fn huge_durations_are_refused_or_harmless() {
        // The config reader refuses such text already (`keel_core::units::MAX_DURATION`); a
        // policy built in code meets the same bound in `validate`.
        let huge = Duration::from_secs(300_000_000_000 * 31_557_600);
        let mut policies = Vec::new();
        let mut c = ResilienceConfig::default();
        c.timeout.total = huge;
        policies.push(("timeout.total", c));
        let mut c = ResilienceConfig::default();
        c.timeout.total = Duration::ZERO;
        c.timeout.per_try = huge;
        policies.push(("timeout.per_try", c));
        let mut c = ResilienceConfig::default();
        c.bulkhead.max_wait = huge;
        policies.push(("bulkhead.max_wait", c));
        let mut c = ResilienceConfig::default();
        c.breaker.open_duration_max = huge;
        policies.push(("breaker.open_duration_max", c));
        for (key, cfg) in policies {
            let Ok(stack) = ClientStackLayer::try_new("huge", Live::new(cfg)) else {
                continue; // refused: fine
            };
            assert!(!key.starts_with('b'), "{key}: accepted");
            let client = stack.layer(service_fn(|_: http::Request<()>| async {
                Ok::<_, BoxError>(http::Response::new(()))
            }));
            let call = tokio::spawn(client.oneshot(http::Request::new(())));
            assert!(call.await.is_ok(), "{key}: the call panicked");
        }
    }

    /// `keel_breaker_state` says 3 while the breaker is forced open and 4 while it is disabled
    /// (docs/METRICS.md), as sampled when metrics are rendered.
    #[test]
    fn the_breaker_state_gauge_shows_forced_open_and_disabled() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let config = Live::new(ResilienceConfig::default());
            let stack = ClientStackLayer::try_new("gauged", config.clone()).unwrap();
            let state = |stack: &ClientStackLayer| {
                stack.publish_gauges();
                let text = handle.render();
                text.lines()
                    .find(|l| l.starts_with("keel_breaker_state{service=\"gauged\"}"))
                    .map(|l| l.rsplit(' ').next().unwrap().to_owned())
            };
            let set = |f: fn(&mut crate::BreakerConfig)| {
                let mut next = config.load().as_ref().clone();
                f(&mut next.breaker);
                config.store(next);
            };
            assert_eq!(state(&stack).as_deref(), Some("0"));
            set(|b| b.forced_open = true);
            assert_eq!(stack.breaker().state(), BreakerState::ForcedOpen);
            assert_eq!(state(&stack).as_deref(), Some("3"));
            set(|b| b.disabled = true);
            assert_eq!(state(&stack).as_deref(), Some("4"));
            set(|b| {
                b.disabled = false;
                b.forced_open = false;
            });
            assert_eq!(state(&stack).as_deref(), Some("0"));
        });
    }

    /// The inbound rate limit's own 429s are keel refusing work, not the server being
    /// overloaded: they must not shrink the shedding limit in front of it.
    #[tokio::test(start_paused = true)]
    async fn the_servers_own_429s_do_not_shrink_its_adaptive_limit() {
        let shed = Live::new(BulkheadConfig {
            adaptive: crate::AdaptiveAlgorithm::Aimd,
            max_concurrent: 100,
            min_limit: 1,
            initial_limit: 20,
            ..Default::default()
        });
        let rl = Live::new(RateLimitConfig {
            enabled: true,
            rate: 1.0,
            burst: 1,
            ..Default::default()
        });
        let layer = ServerStackLayer::new("own429", shed, rl);
        let app = layer.layer(service_fn(|_: http::Request<()>| async {
            Ok::<_, BoxError>(http::Response::new(String::new()))
        }));
        let status = |app: &ServerStack<_>| {
            let app = app.clone();
            async move { app.oneshot(http::Request::new(())).await.unwrap().status() }
        };
        assert_eq!(status(&app).await, 200);
        for _ in 0..10 {
            assert_eq!(status(&app).await, 429);
        }
        assert_eq!(layer.shed_limiter().limit(), 20);
    }

    /// The cap on concurrent retries holds in the fused stack, whether its bulkhead is on or
    /// off, and nothing stays counted after the calls end.
    #[tokio::test(start_paused = true)]
    async fn concurrent_retries_are_capped_with_or_without_the_bulkhead() {
        for bulkhead in [true, false] {
            let mut cfg: ResilienceConfig = toml::from_str(
                r#"
                retry = { concurrent_ratio = "0%", concurrent_min = 1, backoff_base = "0s" }
            "#,
            )
            .unwrap();
            cfg.bulkhead.enabled = bulkhead;
            let stack = ClientStackLayer::try_new("cap", Live::new(cfg)).unwrap();
            // A first attempt fails at once; a retry takes a second.
            let client = stack.layer(service_fn(|req: http::Request<()>| async move {
                let retry = req
                    .extensions()
                    .get::<keel_core::request::Attempt>()
                    .is_some_and(|a| a.number > 1);
                let mut r = http::Response::new(());
                if retry {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } else {
                    *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, BoxError>(r)
            }));
            let first = tokio::spawn(client.clone().oneshot(http::Request::new(())));
            tokio::time::sleep(Duration::from_millis(10)).await;
            // One retry is in flight: the cap (at least 1) is reached, so this one is not retried.
            let second = client
                .clone()
                .oneshot(http::Request::new(()))
                .await
                .unwrap();
            assert_eq!(second.status(), 503, "bulkhead {bulkhead}");
            assert_eq!(
                second.extensions().get::<crate::RetryStopped>(),
                Some(&crate::RetryStopped(ResilienceError::BudgetExhausted)),
                "bulkhead {bulkhead}"
            );
            assert_eq!(first.await.unwrap().unwrap().status(), 200);
            assert_eq!(stack.bulkhead().in_flight(), 0);
            assert_eq!(stack.retry.shared().active(), 0, "bulkhead {bulkhead}");
        }
    }
}
