//! The client stack the facade puts in front of the balancer, and the inbound set in front of a
//! server. The order is fixed, and each position has a reason:
//!
//! ```text
//! caller
//!   -> Deadline      total deadline over everything below (sets the Deadline extension;
//!                    done by the retry layer before it copies the request, see ClientStack)
//!   -> Retry         retries within the budget, never past the deadline
//!   -> Hedge         a second attempt when the first is late (same budget)
//!   -> CircuitBreaker / AdaptiveThrottle   per service; sees every attempt, fails fast
//!   -> Bulkhead      bounds attempts in flight (fixed, Gradient2 or AIMD)
//!   -> RateLimit     GCRA, local or Redis
//!   -> Timeout       each attempt: min(per_try, remaining); keel-deadline-ms header
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
//! Inbound ([`ServerStackLayer`]): deadline check (504 for work whose caller has given up) ->
//! shedding (503 + `Retry-After`) -> rate limit (429 + `Retry-After` + RateLimit headers) ->
//! the application.

use std::sync::Arc;

use keel_core::Live;
use tower_layer::Layer;

use crate::{
    breaker::Breaker,
    budget::RetryBudget,
    bulkhead::{ConcurrencyLimiter, LoadShed, LoadShedLayer},
    chaos::{Chaos, ChaosLayer},
    config::{BulkheadConfig, RateLimitConfig, ResilienceConfig},
    deadline::{DeadlineCheck, DeadlineCheckLayer},
    error::InvalidConfig,
    hedge::{Hedge, HedgeLayer},
    per_try::{PerTry, PerTryLayer},
    ratelimit::{RateLimiter, ServerRateLimit, ServerRateLimitLayer},
    retry::{Retry, RetryLayer},
};

/// The composed client stack over an inner service `S` (see the module docs for the order).
///
/// The total deadline is set by the retry layer itself ([`RetryLayer::with_deadline`]), before
/// it copies the request for replay, and handed to the attempt below without a request
/// extension. Below the hedge, one [`PerTry`] does the breaker, bulkhead, rate limit and per-try
/// timeout of each attempt as one future (same order, same behaviour as the separate layers).
pub type ClientStack<S> = Retry<Hedge<PerTry<Chaos<S>>>>;

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
}

impl ClientStackLayer {
    /// The stack for `service`, following `config`. The configuration is assumed valid (a hot
    /// reload is validated before it is published); see [`try_new`](Self::try_new).
    pub fn new(service: impl Into<Arc<str>>, config: Live<ResilienceConfig>) -> Self {
        let service: Arc<str> = service.into();
        let timeout = config.project(|c| c.timeout.clone());
        let retry_cfg = config.project(|c| c.retry.clone());
        let retry = RetryLayer::with_deadline(service.clone(), retry_cfg, timeout.clone());
        let hedge = HedgeLayer::new(
            service.clone(),
            config.project(|c| c.hedge.clone()),
            Some(retry.budget()),
        );
        let per_try = PerTryLayer::new(
            Breaker::new(service.clone(), "", config.project(|c| c.breaker.clone())),
            ConcurrencyLimiter::new(service.clone(), config.project(|c| c.bulkhead.clone())),
            RateLimiter::new(service.clone(), config.project(|c| c.rate_limit.clone())),
            timeout,
        );
        Self {
            retry,
            hedge,
            per_try,
            chaos: ChaosLayer::new(config.project(|c| c.chaos.clone())),
            service,
            config,
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
}

impl<S: Clone> Layer<S> for ClientStackLayer {
    type Service = ClientStack<S>;
    fn layer(&self, inner: S) -> ClientStack<S> {
        let s = self.chaos.layer(inner);
        let s = self.per_try.layer(s);
        let s = self.hedge.layer(s);
        self.retry.layer(s)
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
        let client = stack.layer(service_fn(move |req: http::Request<()>| {
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
        }));
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
        service_fn(move |req: http::Request<()>| {
            let ms = crate::remaining_from_header(req.headers()).map(|d| d.as_millis() as u64);
            seen.lock().unwrap().push(ms.unwrap_or(0));
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, BoxError>(http::Response::new(()))
            }
        })
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
}
