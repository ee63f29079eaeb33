//! Chaos: inject failures (a status, e.g. 503, without reaching the upstream) and latency at a
//! configured rate, switched on and off by configuration while the service runs — to show a
//! breaker opening in a demo, or to rehearse an incident (Netflix's Chaos Monkey / Envoy's fault
//! filter, here in-process). Placed innermost, injected failures are seen by every layer above
//! exactly as real upstream failures would be. Off by default, and a no-op when off.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use keel_core::Live;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use tower_layer::Layer;
use tower_service::Service;

use crate::{config::ChaosConfig, error::BoxError, metrics as m};

#[derive(Debug)]
struct Shared {
    policy: Live<ChaosConfig>,
    rng: Mutex<SmallRng>,
}

/// Injects failures and latency into calls to `S`.
#[derive(Debug, Clone)]
pub struct Chaos<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Builds [`Chaos`].
#[derive(Debug, Clone)]
pub struct ChaosLayer {
    shared: Arc<Shared>,
}

impl ChaosLayer {
    /// A chaos layer following `policy`.
    pub fn new(policy: Live<ChaosConfig>) -> Self {
        Self::with_seed(policy, rand::random())
    }

    /// With a fixed RNG seed, for reproducible tests.
    pub fn with_seed(policy: Live<ChaosConfig>, seed: u64) -> Self {
        Self {
            shared: Arc::new(Shared {
                policy,
                rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            }),
        }
    }
}

impl<S> Layer<S> for ChaosLayer {
    type Service = Chaos<S>;
    fn layer(&self, inner: S) -> Chaos<S> {
        Chaos {
            inner,
            shared: self.shared.clone(),
        }
    }
}

type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'static>>;

/// [`Chaos`]'s future.
pub type ResponseFuture<F, T> = crate::hedge::futures_either::Either<F, BoxFut<T>>;

impl<S, B, RB> Service<http::Request<B>> for Chaos<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, http::Response<RB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use crate::hedge::futures_either::Either;
        let cfg = self.shared.policy.load();
        if !cfg.enabled {
            return Either::left(self.inner.call(req));
        }
        let (fail, delay) = {
            let mut rng = keel_core::lock(&self.shared.rng);
            (
                rng.random::<f64>() < cfg.failure_rate.get(),
                rng.random::<f64>() < cfg.latency_rate.get(),
            )
        };
        let latency = if delay {
            cfg.latency
        } else {
            Default::default()
        };
        if delay {
            metrics::counter!(m::CHAOS_INJECTED_TOTAL, "outcome" => "latency").increment(1);
        }
        if fail {
            metrics::counter!(m::CHAOS_INJECTED_TOTAL, "outcome" => "failure").increment(1);
            let status = http::StatusCode::from_u16(cfg.status)
                .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
            return Either::right(Box::pin(async move {
                tokio::time::sleep(latency).await;
                let mut r = http::Response::new(RB::default());
                *r.status_mut() = status;
                Ok(r)
            }));
        }
        if latency.is_zero() {
            return Either::left(self.inner.call(req));
        }
        // The inner service is called after the delay: take what the layers above handed to
        // this call along (the call context and the attempt's end, which the transport sends).
        let ctx = crate::scope::handoff();
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        Either::right(Box::pin(async move {
            tokio::time::sleep(latency).await;
            std::future::poll_fn(|cx| svc.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            crate::scope::resume(ctx, || svc.call(req))
                .await
                .map_err(Into::into)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tower::{service_fn, ServiceExt};

    /// A delayed call still reaches the inner service inside the attempt's end set around the
    /// chaos layer's `call`, so the transport below still sends the time left.
    #[tokio::test(start_paused = true)]
    async fn injected_latency_keeps_the_attempt_end() {
        let policy = Live::new(ChaosConfig {
            enabled: true,
            latency: Duration::from_millis(50),
            latency_rate: keel_core::Ratio::new(1.0).unwrap(),
            ..Default::default()
        });
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let mut svc =
            ChaosLayer::with_seed(policy, 5).layer(service_fn(move |_: http::Request<()>| {
                s2.lock().unwrap().push(keel_core::request::attempt_end());
                async { Ok::<_, BoxError>(http::Response::new(String::new())) }
            }));
        let end = tokio::time::Instant::now() + Duration::from_secs(1);
        svc.ready().await.unwrap();
        let fut =
            keel_core::request::with_attempt_end(Some(end), || svc.call(http::Request::new(())));
        fut.await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![Some(end)]);
    }

    #[tokio::test(start_paused = true)]
    async fn injects_at_the_configured_rate_when_switched_on() {
        let policy = Live::new(ChaosConfig::default());
        let svc = ChaosLayer::with_seed(policy.clone(), 5).layer(service_fn(
            |_: http::Request<()>| async { Ok::<_, BoxError>(http::Response::new(String::new())) },
        ));
        for _ in 0..100 {
            assert_eq!(
                svc.clone()
                    .oneshot(http::Request::new(()))
                    .await
                    .unwrap()
                    .status(),
                200
            );
        }
        policy.store(ChaosConfig {
            enabled: true,
            failure_rate: keel_core::Ratio::new(0.3).unwrap(),
            latency: Duration::from_millis(100),
            latency_rate: keel_core::Ratio::new(0.5).unwrap(),
            ..Default::default()
        });
        let t0 = tokio::time::Instant::now();
        let mut failed = 0;
        for _ in 0..1000 {
            if svc
                .clone()
                .oneshot(http::Request::new(()))
                .await
                .unwrap()
                .status()
                == 503
            {
                failed += 1;
            }
        }
        assert!((250..350).contains(&failed), "{failed}");
        let delayed = (tokio::time::Instant::now() - t0).as_millis() / 100;
        assert!((450..550).contains(&delayed), "{delayed}");
    }
}
