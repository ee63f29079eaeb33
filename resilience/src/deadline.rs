//! Deadlines and timeouts: a total deadline over the whole call (retries and backoff included),
//! a per-try timeout of `min(per_try, remaining)`, and the remaining budget carried downstream.
//!
//! Why a deadline and not only timeouts: a timeout per hop lets a call that has already been
//! abandoned upstream keep consuming every service below it. Carrying the *remaining* budget (as
//! gRPC does with `grpc-timeout`, here the `keel-deadline-ms` header, relative so no clock
//! agreement is needed) lets each hop give up as soon as the original caller has, and lets a
//! server refuse work whose caller is already gone ([`DeadlineCheck`], 504).
//!
//! The deadline itself travels inside the process as the [`keel_core::request::Deadline`]
//! request extension (or, between the retry layer and the per-try timeout, the call context), so
//! the retry layer caps its backoff and the per-try timeout caps each attempt without knowing
//! about each other. The per-try timeout hands the attempt's end to the transport through
//! [`keel_core::request::with_attempt_end`]; the transport writes the header
//! ([`write_deadline_header`], or [`PropagateDeadline`] over any HTTP client) with the time left
//! when the request actually leaves, after any wait in the balancer.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderName, HeaderValue};
use keel_core::{request::Deadline as DeadlineExt, Live};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use tower_layer::Layer;
use tower_service::Service;

use crate::{
    config::TimeoutConfig,
    error::{BoxError, ResilienceError},
};

/// The header that carries the remaining budget downstream, in milliseconds.
pub const DEADLINE_HEADER: HeaderName = HeaderName::from_static("keel-deadline-ms");

/// Sets the total deadline of a call (the earlier of `timeout.total` and any deadline the request
/// already carries, e.g. one inherited from the inbound request) and, if `enforce`, ends the call
/// with [`ResilienceError::DeadlineExceeded`] when it passes.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    policy: Live<TimeoutConfig>,
    enforce: bool,
}

/// Builds [`Deadline`].
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    policy: Live<TimeoutConfig>,
    enforce: bool,
}

impl DeadlineLayer {
    /// A layer that sets and enforces the total deadline.
    pub fn new(policy: Live<TimeoutConfig>) -> Self {
        Self {
            policy,
            enforce: true,
        }
    }

    /// Only sets the deadline extension, leaving enforcement to a [`Timeout`] below (which caps
    /// every attempt at the time remaining) and to the retry layer (which never sleeps past it).
    /// Saves one timer per call; [`ClientStackLayer`](crate::ClientStackLayer) uses it.
    #[must_use]
    pub fn propagate_only(mut self) -> Self {
        self.enforce = false;
        self
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            policy: self.policy.clone(),
            enforce: self.enforce,
        }
    }
}

impl<S, B> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let now = Instant::now();
        let inherited = req.extensions().get::<DeadlineExt>().map(|d| d.0);
        let deadline = total_deadline(inherited, now, self.policy.load().total);
        if deadline != inherited {
            if let Some(d) = deadline {
                req.extensions_mut().insert(DeadlineExt(d));
            }
        }
        if let Some(d) = deadline {
            if d <= now {
                return ResponseFuture::failed(ResilienceError::DeadlineExceeded);
            }
        }
        let end = deadline.filter(|_| self.enforce);
        ResponseFuture::new(self.inner.call(req), end, None, false)
    }
}

/// Caps each attempt at `min(per_try, remaining deadline)`, and hands that bound to the transport
/// below (which sends the time left as `keel-deadline-ms`, see [`write_deadline_header`]). The deadline comes from a [`Retry`](crate::Retry)
/// directly above (see [`RetryLayer::with_deadline`](crate::RetryLayer::with_deadline)) or from the
/// request's [`Deadline`](keel_core::request::Deadline) extension. Expiry is [`ResilienceError::Timeout`] (retryable,
/// an upstream failure) or, once the total deadline has passed,
/// [`ResilienceError::DeadlineExceeded`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    policy: Live<TimeoutConfig>,
}

/// Builds [`Timeout`].
#[derive(Debug, Clone)]
pub struct TimeoutLayer {
    policy: Live<TimeoutConfig>,
}

impl TimeoutLayer {
    /// A per-try timeout layer.
    pub fn new(policy: Live<TimeoutConfig>) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            policy: self.policy.clone(),
        }
    }
}

impl<S, B> Service<http::Request<B>> for Timeout<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (now, deadline) = crate::scope::take_for(&req);
        match attempt_end(now, deadline, self.policy.load().per_try) {
            Ok(end) => {
                let inner = &mut self.inner;
                let fut = keel_core::request::with_attempt_end(end, || inner.call(req));
                ResponseFuture::new(fut, end, deadline, true)
            }
            // Counted when the future is polled.
            Err(e) => ResponseFuture::failed(e),
        }
    }
}

/// A call's total deadline: the earlier of one it inherited (the request's
/// [`Deadline`](keel_core::request::Deadline)) and `now + total` (`total` zero: none of its own).
pub(crate) fn total_deadline(
    inherited: Option<Instant>,
    now: Instant,
    total: Duration,
) -> Option<Instant> {
    let own = (!total.is_zero()).then(|| now + total);
    match (inherited, own) {
        (Some(i), Some(o)) => Some(i.min(o)),
        (a, b) => a.or(b),
    }
}

/// The end of an attempt starting `now`: `min(now + per_try, deadline)` (`None`: no bound);
/// `DeadlineExceeded` if it has already passed (not counted here: the caller's future counts
/// what it returns). The caller runs the inner `call` inside
/// [`with_attempt_end`](keel_core::request::with_attempt_end), so the transport sends the
/// time left downstream ([`write_deadline_header`]).
pub(crate) fn attempt_end(
    now: Instant,
    deadline: Option<Instant>,
    per_try: Duration,
) -> Result<Option<Instant>, ResilienceError> {
    let left = deadline.map(|d| d.saturating_duration_since(now));
    Ok(attempt_bound(left, per_try)?.map(|bound| now + bound))
}

/// The longest an attempt may take: `min(per_try, left)` (`left`: the time left to the call's
/// deadline; `None`: no bound); `DeadlineExceeded` if nothing is left. The one rule for both:
/// [`attempt_end`] is this, as an instant.
pub(crate) fn attempt_bound(
    left: Option<Duration>,
    per_try: Duration,
) -> Result<Option<Duration>, ResilienceError> {
    let per_try = (!per_try.is_zero()).then_some(per_try);
    match (left, per_try) {
        (Some(l), _) if l.is_zero() => Err(ResilienceError::DeadlineExceeded),
        (Some(l), Some(p)) => Ok(Some(l.min(p))),
        (a, b) => Ok(a.or(b)),
    }
}

/// For a transport: writes the time left of the attempt being sent into the `keel-deadline-ms`
/// header (whole milliseconds, at least 1), reading the attempt's end that a per-try timeout
/// above set around this `call` ([`keel_core::request::attempt_end`]). Returns whether there
/// was one. keel's own HTTP transport calls it; [`PropagateDeadline`] does it for any other.
///
/// ```
/// use keel_core::request::with_attempt_end;
/// use keel_resilience::{remaining_from_header, write_deadline_header};
/// use tokio::time::{Duration, Instant};
///
/// let mut headers = http::HeaderMap::new();
/// assert!(!write_deadline_header(&mut headers)); // no attempt bound: nothing written
/// let end = Instant::now() + Duration::from_secs(2);
/// with_attempt_end(Some(end), || write_deadline_header(&mut headers));
/// let left = remaining_from_header(&headers).unwrap();
/// assert!(left <= Duration::from_secs(2) && left > Duration::from_secs(1));
/// ```
pub fn write_deadline_header(headers: &mut http::HeaderMap) -> bool {
    let Some(end) = keel_core::request::attempt_end() else {
        return false;
    };
    let left = end.saturating_duration_since(Instant::now());
    let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
    headers.insert(DEADLINE_HEADER, header_value(ms));
    true
}

thread_local! {
    /// The last header value made on this thread: the budget is usually `per_try` exactly, so
    /// most calls reuse it (a reference-count increment instead of an allocation).
    static LAST: std::cell::RefCell<Option<(u64, HeaderValue)>> = const { std::cell::RefCell::new(None) };
}

fn header_value(ms: u64) -> HeaderValue {
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((m, v)) if *m == ms => v.clone(),
            _ => {
                let v = HeaderValue::from(ms);
                *last = Some((ms, v.clone()));
                v
            }
        }
    })
}

/// Writes `keel-deadline-ms` ([`write_deadline_header`]) into each request before calling the
/// transport it wraps: put it directly above an HTTP client that is not keel's own, below the
/// per-try timeout (or the balancer), so the next hop learns the time left.
#[derive(Debug, Clone)]
pub struct PropagateDeadline<S> {
    inner: S,
}

/// Builds [`PropagateDeadline`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PropagateDeadlineLayer;

impl<S> Layer<S> for PropagateDeadlineLayer {
    type Service = PropagateDeadline<S>;
    fn layer(&self, inner: S) -> PropagateDeadline<S> {
        PropagateDeadline { inner }
    }
}

impl<S, B> Service<http::Request<B>> for PropagateDeadline<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        write_deadline_header(req.headers_mut());
        self.inner.call(req)
    }
}

pin_project! {
    /// Response future of [`Deadline`] and [`Timeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        fut: Option<F>,
        #[pin]
        sleep: Option<Sleep>,
        end: Option<Instant>,
        deadline: Option<Instant>,
        per_try: bool,
        error: Option<ResilienceError>,
    }
}

impl<F> ResponseFuture<F> {
    fn new(fut: F, end: Option<Instant>, deadline: Option<Instant>, per_try: bool) -> Self {
        Self {
            fut: Some(fut),
            sleep: None,
            end,
            deadline,
            per_try,
            error: None,
        }
    }
    fn failed(e: ResilienceError) -> Self {
        Self {
            fut: None,
            sleep: None,
            end: None,
            deadline: None,
            per_try: false,
            error: Some(e),
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(fut) = this.fut.as_pin_mut() else {
            let e = this
                .error
                .take()
                .unwrap_or(ResilienceError::DeadlineExceeded);
            deadline_metric(&e);
            return Poll::Ready(Err(Box::new(e)));
        };
        if let Poll::Ready(r) = fut.poll(cx) {
            return Poll::Ready(r.map_err(Into::into));
        }
        // The timer is created on the first Pending only: an answer that is ready at once (a
        // cache, a rejection below) costs no timer registration.
        if this.sleep.is_none() {
            if let Some(end) = *this.end {
                this.sleep.set(Some(tokio::time::sleep_until(end)));
            }
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            if sleep.poll(cx).is_ready() {
                let e = match this.deadline {
                    _ if !*this.per_try => ResilienceError::DeadlineExceeded,
                    Some(d) if *d <= Instant::now() => ResilienceError::DeadlineExceeded,
                    _ => ResilienceError::Timeout,
                };
                deadline_metric(&e);
                return Poll::Ready(Err(Box::new(e)));
            }
        }
        Poll::Pending
    }
}

pub(crate) fn deadline_metric(e: &ResilienceError) {
    metrics::counter!(crate::metrics::DEADLINE_TOTAL, "outcome" => e.as_str()).increment(1);
}

/// Server side: reads `keel-deadline-ms`, answers 504 at once if the caller's budget is already
/// spent, and otherwise sets the [`keel_core::request::Deadline`] extension so the handler's own
/// outgoing calls inherit what is left.
#[derive(Debug, Clone)]
pub struct DeadlineCheck<S> {
    inner: S,
}

/// Builds [`DeadlineCheck`].
#[derive(Debug, Clone, Default)]
pub struct DeadlineCheckLayer;

impl DeadlineCheckLayer {
    /// The layer.
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for DeadlineCheckLayer {
    type Service = DeadlineCheck<S>;
    fn layer(&self, inner: S) -> DeadlineCheck<S> {
        DeadlineCheck { inner }
    }
}

/// Reads the remaining budget a caller sent, if any: the smallest of every `keel-deadline-ms`
/// value on the request, whether sent as several fields or as one comma-separated list (which a
/// proxy may make of them, RFC 9110 §5.3). A value that is not whole milliseconds in decimal
/// digits is ignored, as a lone malformed header always was (the request is served without that
/// bound rather than refused): the budget that holds is the tightest one that can be read, so
/// no hop on the way can lengthen what an earlier one set. A budget beyond
/// [`MAX_DURATION`](keel_core::units::MAX_DURATION) (100 years) counts as that.
///
/// ```
/// use keel_resilience::remaining_from_header;
/// use std::time::Duration;
///
/// let mut h = http::HeaderMap::new();
/// h.append("keel-deadline-ms", "800".parse().unwrap());
/// h.append("keel-deadline-ms", "250, 900".parse().unwrap());
/// h.append("keel-deadline-ms", "soon".parse().unwrap());
/// assert_eq!(remaining_from_header(&h), Some(Duration::from_millis(250)));
/// ```
pub fn remaining_from_header(h: &http::HeaderMap) -> Option<Duration> {
    h.get_all(DEADLINE_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(parse_ms)
        .min()
        .map(|ms| Duration::from_millis(ms).min(keel_core::units::MAX_DURATION))
}

/// One `keel-deadline-ms` element: decimal digits only (no sign, no fraction), surrounding
/// whitespace allowed; a number too long for `u64` is as good as no bound and reads as
/// `u64::MAX`.
fn parse_ms(s: &str) -> Option<u64> {
    let s = s.trim_matches([' ', '\t']);
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(u64::MAX))
}

impl<S, B, RB> Service<http::Request<B>> for DeadlineCheck<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = crate::util::EitherResponse<S::Future, RB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some(left) = remaining_from_header(req.headers()) {
            if left.is_zero() {
                metrics::counter!(crate::metrics::DEADLINE_TOTAL, "outcome" => "rejected_expired")
                    .increment(1);
                let mut res = http::Response::new(RB::default());
                *res.status_mut() = http::StatusCode::GATEWAY_TIMEOUT;
                return crate::util::EitherResponse::ready(res);
            }
            // `left` is at most 100 years, which every clock can add; were it not, the request
            // would go on with no bound of its own rather than panic.
            if let Some(d) = Instant::now().checked_add(left) {
                let earlier = match req.extensions().get::<DeadlineExt>() {
                    Some(old) => old.0.min(d),
                    None => d,
                };
                req.extensions_mut().insert(DeadlineExt(earlier));
            }
        }
        crate::util::EitherResponse::inner(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    fn policy(total: u64, per_try: u64) -> Live<TimeoutConfig> {
        Live::new(TimeoutConfig {
            total: Duration::from_millis(total),
            per_try: Duration::from_millis(per_try),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_is_min_of_per_try_and_remaining_and_travels_in_header() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let inner = PropagateDeadlineLayer.layer(service_fn(move |req: http::Request<()>| {
            s2.lock()
                .unwrap()
                .push(remaining_from_header(req.headers()).unwrap());
            async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, BoxError>(())
            }
        }));
        let svc = DeadlineLayer::new(policy(1000, 300))
            .layer(TimeoutLayer::new(policy(1000, 300)).layer(inner));
        let t0 = Instant::now();
        let e = svc
            .clone()
            .oneshot(http::Request::new(()))
            .await
            .unwrap_err();
        assert_eq!(
            ResilienceError::find(e.as_ref()),
            Some(&ResilienceError::Timeout)
        );
        assert_eq!(Instant::now() - t0, Duration::from_millis(300));
        // Only 100ms left of an inherited deadline: the attempt gets 100ms, then deadline exceeded.
        let mut req = http::Request::new(());
        req.extensions_mut()
            .insert(DeadlineExt(Instant::now() + Duration::from_millis(100)));
        let e = svc.clone().oneshot(req).await.unwrap_err();
        assert_eq!(
            ResilienceError::find(e.as_ref()),
            Some(&ResilienceError::DeadlineExceeded)
        );
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Duration::from_millis(300), Duration::from_millis(100)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn total_deadline_enforced_alone() {
        let inner = service_fn(|_req: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, BoxError>(())
        });
        let svc = DeadlineLayer::new(policy(500, 0)).layer(inner);
        let e = svc.oneshot(http::Request::new(())).await.unwrap_err();
        assert_eq!(
            ResilienceError::find(e.as_ref()),
            Some(&ResilienceError::DeadlineExceeded)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn server_rejects_expired_work_and_sets_deadline() {
        let inner = service_fn(|req: http::Request<()>| async move {
            let left = req.extensions().get::<DeadlineExt>().unwrap().remaining();
            Ok::<_, BoxError>(http::Response::new(left.as_millis().to_string()))
        });
        let svc = DeadlineCheckLayer::new().layer(inner);
        let req = |ms: &str| {
            http::Request::builder()
                .header("keel-deadline-ms", ms)
                .body(())
                .unwrap()
        };
        let r = svc.clone().oneshot(req("0")).await.unwrap();
        assert_eq!(r.status(), 504);
        let r = svc.clone().oneshot(req("250")).await.unwrap();
        assert_eq!(r.into_body(), "250");
    }

    /// Several `keel-deadline-ms` on one request (as fields, or one list a proxy joined): the
    /// tightest readable budget holds, whichever comes first; unreadable values are ignored as a
    /// lone one is.
    #[tokio::test(start_paused = true)]
    async fn the_smallest_of_several_deadlines_holds() {
        let inner = service_fn(|req: http::Request<()>| async move {
            let left = req.extensions().get::<DeadlineExt>().map(|d| d.remaining());
            Ok::<_, BoxError>(http::Response::new(format!("{left:?}")))
        });
        let svc = DeadlineCheckLayer::new().layer(inner);
        let req = |values: &[&str]| {
            let mut b = http::Request::builder();
            for v in values {
                b = b.header("keel-deadline-ms", *v);
            }
            b.body(()).unwrap()
        };
        let left = |ms: u64| format!("{:?}", Some(Duration::from_millis(ms)));
        for (values, want) in [
            (&["800", "250"][..], left(250)),
            (&["900, 300 ,700"], left(300)),
            (&["500", "soon", "-1", "+5", "1.5", ""], left(500)),
            (&["soon", "400"], left(400)),
            // Too long for a u64: no bound of its own, so the other one holds.
            (&["99999999999999999999999", "600"], left(600)),
        ] {
            let r = svc.clone().oneshot(req(values)).await.unwrap();
            assert_eq!(r.status(), 200, "{values:?}");
            assert_eq!(r.into_body(), want, "{values:?}");
        }
        let r = svc.clone().oneshot(req(&["soon", "junk"])).await.unwrap();
        assert_eq!(
            r.into_body(),
            "None",
            "nothing readable: no deadline, as with one"
        );
        // A spent budget anywhere in the list is spent.
        for values in [&["800", "0"][..], &["800, 0"]] {
            let r = svc.clone().oneshot(req(values)).await.unwrap();
            assert_eq!(r.status(), 504, "{values:?}");
        }
        // The largest budget a header can say is read as 100 years, not added to the clock whole.
        let r = svc
            .clone()
            .oneshot(req(&["18446744073709551615"]))
            .await
            .unwrap();
        assert_eq!(
            r.into_body(),
            format!("{:?}", Some(keel_core::units::MAX_DURATION))
        );
    }
}
