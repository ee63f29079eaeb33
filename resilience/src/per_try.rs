//! One attempt of the client stack, fused: circuit breaker → bulkhead → rate limit → per-try
//! timeout, in that order and with the same behaviour as [`CircuitBreaker`](crate::CircuitBreaker)
//! over [`Bulkhead`](crate::Bulkhead) over [`RateLimit`](crate::RateLimit) over
//! [`Timeout`](crate::Timeout), but as one service with one future.
//!
//! Stacked, the four layers each read the clock, each classify the result, each wrap the future
//! below in their own (so every return moves a deeper future), and a retry above must clone all
//! four for every call. Fused, an attempt takes the retry layer's clock reading (see
//! [`crate::scope`]), reads the clock once more when it ends, classifies once, and costs one
//! reference count to clone. The rare paths (waiting for a bulkhead slot, asking Redis for a rate
//! decision) are one boxed future each, as in the separate layers.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use keel_core::Live;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    breaker::{Breaker, BreakerPermit},
    bulkhead::{ConcurrencyLimiter, ConcurrencyPermit},
    config::TimeoutConfig,
    deadline::{attempt_end, deadline_metric},
    error::{BoxError, ResilienceError},
    ratelimit::{request_key, RateLimiter},
    retry::BoxResponseFuture,
};

/// The state an attempt is checked against, shared by every clone.
#[derive(Debug)]
pub(crate) struct Gate {
    pub(crate) breaker: Arc<Breaker>,
    pub(crate) bulkhead: Arc<ConcurrencyLimiter>,
    pub(crate) rate: Arc<RateLimiter>,
    timeout: Live<TimeoutConfig>,
}

/// Builds [`PerTry`] services that share one breaker, bulkhead and rate limiter.
#[derive(Debug, Clone)]
pub struct PerTryLayer {
    gate: Arc<Gate>,
}

impl PerTryLayer {
    /// A layer over these components; `timeout.per_try` caps each attempt.
    pub fn new(
        breaker: Arc<Breaker>,
        bulkhead: Arc<ConcurrencyLimiter>,
        rate: Arc<RateLimiter>,
        timeout: Live<TimeoutConfig>,
    ) -> Self {
        Self {
            gate: Arc::new(Gate {
                breaker,
                bulkhead,
                rate,
                timeout,
            }),
        }
    }

    /// The circuit breaker.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.gate.breaker
    }

    pub(crate) fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// The bulkhead's limiter.
    pub fn bulkhead(&self) -> &Arc<ConcurrencyLimiter> {
        &self.gate.bulkhead
    }

    /// The rate limiter.
    pub fn rate_limiter(&self) -> &Arc<RateLimiter> {
        &self.gate.rate
    }
}

impl<S> Layer<S> for PerTryLayer {
    type Service = PerTry<S>;
    fn layer(&self, inner: S) -> PerTry<S> {
        PerTry {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// One attempt's protections over `S`: breaker, bulkhead, rate limit and per-try timeout (see the
/// module docs). Refusals are [`ResilienceError`]s, as from the separate layers.
#[derive(Debug, Clone)]
pub struct PerTry<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S, B, T> Service<http::Request<B>> for PerTry<S>
where
    S: Service<http::Request<B>, Response = http::Response<T>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
    T: Send + 'static,
{
    type Response = http::Response<T>;
    type Error = BoxError;
    type Future = PerTryFuture<S::Future, T>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (now, deadline) = crate::scope::take_for(&req);
        let gate = &self.gate;
        let breaker = match gate.breaker.try_acquire_at(now) {
            Ok(p) => p,
            Err(e) => return PerTryFuture::failed(e),
        };
        let bulkhead = match gate.bulkhead.try_acquire() {
            Some(p) => Some(p),
            None if gate.bulkhead.policy().load().max_wait.is_zero() => {
                return PerTryFuture::failed(gate.bulkhead.shed());
            }
            None => None,
        };
        let rl = gate.rate.policy().load();
        let distributed = RateLimiter::is_distributed(&rl);
        if bulkhead.is_none() || distributed {
            // Wait for a slot (and only then spend rate), or ask Redis: asynchronous.
            drop(rl);
            return self.gated(req, breaker, bulkhead, deadline);
        }
        if rl.enabled {
            let d = gate
                .rate
                .check_local_at(&rl, request_key(&rl.key, &req), now);
            if !d.allowed {
                return PerTryFuture::failed(ResilienceError::RateLimited {
                    retry_after: d.retry_after,
                });
            }
        }
        drop(rl);
        let per_try = gate.timeout.load().per_try;
        start(
            &mut self.inner,
            req,
            breaker,
            bulkhead,
            now,
            deadline,
            per_try,
        )
    }
}

impl<S> PerTry<S> {
    /// The slow path: a slot to wait for, or a rate decision from Redis, then the attempt.
    fn gated<B, T>(
        &mut self,
        req: http::Request<B>,
        breaker: BreakerPermit,
        bulkhead: Option<ConcurrencyPermit>,
        deadline: Option<Instant>,
    ) -> PerTryFuture<S::Future, T>
    where
        S: Service<http::Request<B>, Response = http::Response<T>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Send + 'static,
        T: Send + 'static,
    {
        let gate = self.gate.clone();
        // The ready service is not used; this copy is polled ready after the wait.
        let mut svc = self.inner.clone();
        PerTryFuture {
            state: State::Boxed {
                fut: Box::pin(async move {
                    let bulkhead = match bulkhead {
                        Some(p) => p,
                        None => gate.bulkhead.acquire_before(deadline).await?,
                    };
                    let rl = gate.rate.policy().get();
                    if rl.enabled {
                        let key = request_key(&rl.key, &req);
                        let d = if RateLimiter::is_distributed(&rl) {
                            gate.rate.check_with(&rl, key).await
                        } else {
                            gate.rate.check_local(&rl, key)
                        };
                        if !d.allowed {
                            return Err(Box::new(ResilienceError::RateLimited {
                                retry_after: d.retry_after,
                            }) as BoxError);
                        }
                    }
                    std::future::poll_fn(|cx| svc.poll_ready(cx))
                        .await
                        .map_err(Into::into)?;
                    let now = Instant::now();
                    let per_try = gate.timeout.load().per_try;
                    start(
                        &mut svc,
                        req,
                        breaker,
                        Some(bulkhead),
                        now,
                        deadline,
                        per_try,
                    )
                    .await
                }),
            },
        }
    }
}

/// Sets the per-try timeout (`min(per_try, deadline)`), hands it to the transport below
/// ([`with_attempt_end`](keel_core::request::with_attempt_end)), and calls `inner`, which must
/// be ready.
#[allow(clippy::too_many_arguments)]
#[inline]
fn start<S, B, T>(
    inner: &mut S,
    req: http::Request<B>,
    breaker: BreakerPermit,
    bulkhead: Option<ConcurrencyPermit>,
    now: Instant,
    deadline: Option<Instant>,
    per_try: std::time::Duration,
) -> PerTryFuture<S::Future, T>
where
    S: Service<http::Request<B>, Response = http::Response<T>>,
{
    let end = match attempt_end(now, deadline, per_try) {
        Ok(end) => end,
        Err(e) => {
            deadline_metric(&e);
            return PerTryFuture::failed(e);
        }
    };
    PerTryFuture {
        state: State::Called {
            fut: keel_core::request::with_attempt_end(end, || inner.call(req)),
            sleep: None,
            end,
            deadline,
            breaker: Some(breaker),
            bulkhead,
        },
    }
}

/// The error of an attempt its timer ended. `drop_attempt` drops the attempt first, so that a
/// balancer below notes the instance it went to ([`keel_core::request::note_abandoned`]); the
/// error is then wrapped in an [`InstanceFailure`] naming it, so that it says which instance did
/// not answer and a retry avoids it.
///
/// [`InstanceFailure`]: keel_core::request::InstanceFailure
pub(crate) fn timer_error(e: ResilienceError, drop_attempt: impl FnOnce()) -> BoxError {
    let _ = keel_core::request::take_abandoned(); // what an earlier drop left
    drop_attempt();
    match keel_core::request::take_abandoned() {
        Some(served_by) => Box::new(keel_core::request::InstanceFailure {
            served_by,
            source: Box::new(e),
        }),
        None => Box::new(e),
    }
}

/// The per-try timer of a pending attempt, made on its first `Pending` (an answer ready at once
/// needs no timer): `Ready(error)` once it fires — `DeadlineExceeded` past the total deadline
/// (the call is over), `Timeout` before it (only this try is) — counted in the deadline metric.
pub(crate) fn poll_timer(
    sleep: &mut Option<Pin<Box<Sleep>>>,
    end: Option<Instant>,
    deadline: Option<Instant>,
    cx: &mut Context<'_>,
) -> Poll<ResilienceError> {
    if sleep.is_none() {
        if let Some(end) = end {
            *sleep = Some(Box::pin(tokio::time::sleep_until(end)));
        }
    }
    let Some(s) = sleep.as_mut() else {
        return Poll::Pending;
    };
    std::task::ready!(s.as_mut().poll(cx));
    let e = match deadline {
        Some(d) if d <= Instant::now() => ResilienceError::DeadlineExceeded,
        _ => ResilienceError::Timeout,
    };
    deadline_metric(&e);
    Poll::Ready(e)
}

pin_project! {
    /// The response future of [`PerTry`].
    pub struct PerTryFuture<F, T> {
        #[pin]
        state: State<F, T>,
    }
}

pin_project! {
    #[project = Proj]
    enum State<F, T> {
        Called {
            #[pin]
            fut: F,
            // Created on the first `Pending` only: an answer that is ready at once needs no
            // timer. Boxed, as it is much larger than the rest and the future moves up the stack.
            sleep: Option<Pin<Box<Sleep>>>,
            end: Option<Instant>,
            deadline: Option<Instant>,
            breaker: Option<BreakerPermit>,
            bulkhead: Option<ConcurrencyPermit>,
        },
        Boxed { fut: BoxResponseFuture<http::Response<T>> },
        Failed { error: Option<ResilienceError> },
    }
}

impl<F, T> PerTryFuture<F, T> {
    pub(crate) fn failed(e: ResilienceError) -> Self {
        Self {
            state: State::Failed { error: Some(e) },
        }
    }
}

impl<F, T, E> Future for PerTryFuture<F, T>
where
    F: Future<Output = Result<http::Response<T>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<T>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        let (res, breaker, bulkhead, end) = match state.as_mut().project() {
            Proj::Called {
                fut,
                sleep,
                end,
                deadline,
                breaker,
                bulkhead,
            } => match fut.poll(cx) {
                Poll::Ready(r) => (r.map_err(Into::into), breaker.take(), bulkhead.take(), *end),
                Poll::Pending => {
                    let e = std::task::ready!(poll_timer(sleep, *end, *deadline, cx));
                    let held = (breaker.take(), bulkhead.take(), *end);
                    let err = timer_error(e, || state.set(State::Failed { error: None }));
                    (Err(err), held.0, held.1, held.2)
                }
            },
            Proj::Boxed { fut } => return fut.as_mut().poll(cx),
            Proj::Failed { error } => {
                return Poll::Ready(Err(Box::new(
                    error.take().unwrap_or(ResilienceError::DeadlineExceeded),
                )))
            }
        };
        // The breaker's classification (its `failure_codes`) feeds the bulkhead too.
        let outcome = match breaker {
            Some(p) => p.classify_and_record(&res, end),
            None => crate::classify::Classifier::classify(
                &crate::classify::HttpClassifier::default(),
                &res,
            ),
        };
        if let Some(mut p) = bulkhead {
            p.record(&outcome);
        }
        Poll::Ready(res)
    }
}
