//! # keel-resilience
//!
//! Tower layers that make a call survive a bad day, each usable alone, whose policy is read per
//! call from a [`keel_core::Live`] and whose state (windows, buckets, budgets, limits) lives
//! beside the policy: a reload changes behaviour on the next call and keeps what was learned.
//!
//! | layer | what | why |
//! |---|---|---|
//! | [`Deadline`] / [`Timeout`] / [`PropagateDeadline`] | total deadline, per-try `min(per_try, remaining)`, time left sent as `keel-deadline-ms` by the transport | a call that cannot finish in time should stop consuming anyone's resources |
//! | [`Retry`] | classes, full-jitter backoff, retry budget, concurrent-retry cap, idempotent only | retries without a budget multiply load exactly when the upstream is weakest |
//! | [`CircuitBreaker`] / [`AdaptiveThrottle`] | Resilience4j breaker; SRE adaptive throttling | fail fast and give the upstream room |
//! | [`Bulkhead`] / [`AdaptiveConcurrency`] | fixed or Gradient2/AIMD concurrency limit | one slow dependency must not take every thread |
//! | [`RateLimit`] | GCRA, local (lock-free, per key) or on Redis (one `EVALSHA`) | protect upstreams and share quotas across a fleet |
//! | [`Hedge`] | a second attempt after a delay or observed percentile | cut the tail ("The Tail at Scale") |
//! | [`Fallback`] | a closure on open breaker, shed, limit or deadline | degrade instead of failing |
//! | [`Chaos`] | injected failures and latency | demos and game days |
//!
//! [`ClientStackLayer`] composes them for the facade in a fixed, documented order (total deadline
//! → retry/hedge → breaker/throttle → bulkhead → rate limit → per-try timeout → inner, see
//! [`ClientStack`]), fused into one service and one future for the common attempt;
//! [`PerTry`] is the per-attempt half (breaker, bulkhead, rate limit, per-try timeout) as one
//! layer; [`ServerStackLayer`] is the inbound set (deadline check, shedding, rate limit).
//!
//! Refusals are typed: [`ResilienceError`] (`BreakerOpen`, `Throttled`, `RateLimited {
//! retry_after }`, `Shed`, `DeadlineExceeded`, `Timeout`, `BudgetExhausted`, ...) with
//! [`is_retryable`](ResilienceError::is_retryable) and
//! [`retry_after`](ResilienceError::retry_after). When a wanted retry is refused by the budget,
//! the upstream's error comes back inside [`RetriesStopped`] (found by
//! [`ResilienceError::find`] as `BudgetExhausted`), and a response carries [`RetryStopped`].
//!
//! ```
//! use keel_core::Live;
//! use keel_resilience::{BoxError, ClientStackLayer, ResilienceConfig, ResilienceError};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
//! // `[clients.payments]`, hot-swappable: a store() changes behaviour on the next call.
//! let config: Live<ResilienceConfig> = Live::new(toml::from_str(r#"
//!     timeout = { total = "2s", per_try = "500ms" }
//!     retry = { max_attempts = 3, budget_ratio = "20%" }
//!     breaker = { failure_rate_threshold = "50%", minimum_calls = 20 }
//! "#)?);
//! let stack = ClientStackLayer::try_new("payments", config.clone())?;
//! let balancer = service_fn(|_req: http::Request<bytes::Bytes>| async {
//!     Ok::<_, BoxError>(http::Response::new(String::from("charged")))
//! });
//! let client = stack.layer(balancer);
//! let req = http::Request::put("/charges/42").body(bytes::Bytes::from_static(b"{}"))?;
//! match client.oneshot(req).await {
//!     Ok(res) => assert_eq!(res.into_body(), "charged"),
//!     Err(e) => match ResilienceError::find(e.as_ref()) {
//!         Some(r) if r.is_retryable() => { /* later: r.retry_after() */ }
//!         _ => return Err(e),
//!     },
//! }
//! # Ok(()) }
//! ```
//!
//! Errors: every layer's error is a [`BoxError`]; keel's own refusals are a [`ResilienceError`]
//! in it ([`ResilienceError::find`]), which says whether a retry may help and after how long.
//! Layers talk to each other and to the balancer through `keel_core::request` extensions:
//! `Deadline` (set by the deadline, read by the per-try timeout and retry), `Attempt` (set on
//! retries and hedges, with `avoid` = instances already tried) and `ServedBy` / `InstanceFailure`
//! (set by the balancer, read by the retry). The per-try timeout hands the attempt's end to the
//! transport on the thread ([`keel_core::request::with_attempt_end`]); the transport writes
//! `keel-deadline-ms` with the time left ([`write_deadline_header`], or [`PropagateDeadline`]
//! over an HTTP client that is not keel's).
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod breaker;
mod budget;
mod bulkhead;
mod chaos;
mod classify;
mod config;
mod deadline;
mod error;
mod fallback;
mod hedge;
pub mod metrics;
mod per_try;
mod ratelimit;
mod retry;
mod scope;
mod stack;
mod util;

#[cfg(feature = "redis")]
pub use self::ratelimit::{RedisGcra, Source as DecisionSource};
pub use self::{
    breaker::{
        AdaptiveThrottle, Breaker, BreakerPermit, BreakerRegistry, BreakerState, CircuitBreaker,
        CircuitBreakerLayer, ResponseFuture as CircuitBreakerFuture,
    },
    budget::RetryBudget,
    bulkhead::{
        AdaptiveConcurrency, Bulkhead, BulkheadLayer, ConcurrencyLimiter, ConcurrencyPermit,
        LoadShed, LoadShedLayer, ResponseFuture as BulkheadFuture, ShedFuture,
    },
    chaos::{Chaos, ChaosLayer, ResponseFuture as ChaosFuture},
    classify::{
        classify_error, retry_after_header, Classifier, FailureClass, HttpClassifier, Outcome,
        PolicyClassifier,
    },
    config::{
        AdaptiveAlgorithm, BreakerConfig, BreakerMode, BulkheadConfig, ChaosConfig, HedgeConfig,
        KeySource, RateLimitConfig, RateLimitScope, ResilienceConfig, RetryConfig, RetryOn,
        TimeoutConfig, WindowKind,
    },
    deadline::{
        remaining_from_header, write_deadline_header, Deadline, DeadlineCheck, DeadlineCheckLayer,
        DeadlineLayer, PropagateDeadline, PropagateDeadlineLayer, ResponseFuture as DeadlineFuture,
        Timeout, TimeoutLayer, DEADLINE_HEADER,
    },
    error::{BoxError, InvalidConfig, ResilienceError, RetriesStopped, RetryStopped},
    fallback::{triggers_fallback, Fallback, FallbackLayer, ResponseFuture as FallbackFuture},
    hedge::{futures_either, Hedge, HedgeLayer, ResponseFuture as HedgeFuture},
    per_try::{PerTry, PerTryFuture, PerTryLayer},
    ratelimit::{
        limit_header, policy_header, request_key, write_headers, Decision, LocalGcra, Quota,
        RateLimit, RateLimitLayer, RateLimiter, ResponseFuture as RateLimitFuture, ServerRateLimit,
        ServerRateLimitLayer, POLICY_NAME, RATELIMIT, RATELIMIT_POLICY,
    },
    retry::{
        is_retry_safe, replay_request, served_by, BoxResponseFuture, ReplayBody,
        ResponseFuture as RetryFuture, Retry, RetryLayer, IDEMPOTENCY_KEY,
    },
    stack::{ClientStack, ClientStackLayer, ServerStack, ServerStackLayer},
    util::EitherResponse,
};
