//! Small shared pieces: a future that is either the inner one or a ready response.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project_lite::pin_project;

pin_project! {
    /// Either the inner service's future or a response made by the layer itself (a rejection
    /// turned into HTTP: 429, 503, 504).
    pub struct EitherResponse<F, RB, E> {
        #[pin]
        fut: Option<F>,
        ready: Option<http::Response<RB>>,
        _e: std::marker::PhantomData<fn() -> E>,
    }
}

impl<F, RB, E> EitherResponse<F, RB, E> {
    pub(crate) fn inner(fut: F) -> Self {
        Self {
            fut: Some(fut),
            ready: None,
            _e: std::marker::PhantomData,
        }
    }
    pub(crate) fn ready(res: http::Response<RB>) -> Self {
        Self {
            fut: None,
            ready: Some(res),
            _e: std::marker::PhantomData,
        }
    }
}

impl<F, RB, E> Future for EitherResponse<F, RB, E>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    RB: Default,
{
    type Output = Result<http::Response<RB>, E>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.fut.as_pin_mut() {
            Some(f) => f.poll(cx),
            None => Poll::Ready(Ok(this.ready.take().unwrap_or_default())),
        }
    }
}
