//! Fallback: degrade instead of failing. When a call is refused by keel itself — an open
//! breaker, a throttle, a shed, a rate limit, a passed deadline — a closure may answer in its
//! place (a cached value, a default, a reduced page), as Hystrix's `getFallback` did. Upstream
//! failures are not replaced: they are the upstream's answer, and hiding them hides outages.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    error::{BoxError, ResilienceError},
    metrics as m,
};

/// Whether a fallback applies to this rejection.
pub fn triggers_fallback(e: &ResilienceError) -> bool {
    matches!(
        e,
        ResilienceError::BreakerOpen { .. }
            | ResilienceError::Throttled
            | ResilienceError::Shed
            | ResilienceError::RateLimited { .. }
            | ResilienceError::DeadlineExceeded
            | ResilienceError::BudgetExhausted
    )
}

/// Calls `F` in place of `S` when `S` was refused by a resilience layer.
#[derive(Debug, Clone)]
pub struct Fallback<S, F> {
    inner: S,
    f: F,
}

/// Builds [`Fallback`].
#[derive(Debug, Clone)]
pub struct FallbackLayer<F> {
    f: F,
}

impl<F> FallbackLayer<F> {
    /// `f` receives the rejection and answers (or fails) in place of the upstream.
    pub fn new(f: F) -> Self {
        Self { f }
    }
}

impl<S, F: Clone> Layer<S> for FallbackLayer<F> {
    type Service = Fallback<S, F>;
    fn layer(&self, inner: S) -> Fallback<S, F> {
        Fallback {
            inner,
            f: self.f.clone(),
        }
    }
}

impl<S, F, Req> Service<Req> for Fallback<S, F>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    F: Fn(&ResilienceError) -> Result<S::Response, BoxError> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, F>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            fut: self.inner.call(req),
            f: self.f.clone(),
        }
    }
}

pin_project! {
    /// [`Fallback`]'s future.
    pub struct ResponseFuture<Fut, F> {
        #[pin]
        fut: Fut,
        f: F,
    }
}

impl<Fut, F, T, E> Future for ResponseFuture<Fut, F>
where
    Fut: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    F: Fn(&ResilienceError) -> Result<T, BoxError>,
{
    type Output = Result<T, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match std::task::ready!(this.fut.poll(cx)) {
            Ok(r) => Poll::Ready(Ok(r)),
            Err(e) => {
                let e: BoxError = e.into();
                match ResilienceError::find(e.as_ref()) {
                    Some(r) if triggers_fallback(r) => {
                        metrics::counter!(m::FALLBACK_TOTAL, "outcome" => r.as_str()).increment(1);
                        Poll::Ready((this.f)(r))
                    }
                    _ => Poll::Ready(Err(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    #[tokio::test]
    async fn answers_for_rejections_only() {
        let f = |e: &ResilienceError| Ok(format!("fallback: {}", e.as_str()));
        let shed = FallbackLayer::new(f).layer(service_fn(|_: ()| async {
            Err::<String, BoxError>(Box::new(ResilienceError::Shed))
        }));
        assert_eq!(shed.oneshot(()).await.unwrap(), "fallback: shed");
        let upstream = FallbackLayer::new(f).layer(service_fn(|_: ()| async {
            Err::<String, BoxError>("upstream broke".into())
        }));
        assert!(upstream.oneshot(()).await.is_err());
    }
}
