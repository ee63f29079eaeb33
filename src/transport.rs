//! The bottom of the client stack: one reqwest client (one connection pool) per instance.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use keel_balance::{Balancer, MakeInstanceService};
use keel_core::{Instance, InstanceId, Live};
use keel_resilience::{Breaker, BreakerConfig, BreakerPermit, FailureClass, Outcome};
use tower::Service;

/// Errors cross the tower stack boxed, as tower's own middleware expects.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sends a buffered request to one instance and buffers the answer.
///
/// Buffered bodies are what make retries, hedging and idempotent replays possible; keel's client
/// is for service-to-service calls, where bodies are small documents.
#[derive(Clone, Debug)]
pub(crate) struct HttpTransport {
    /// Shared by every clone of this instance's transport: the client and the generation of
    /// `connect_timeout` it was built for. A change of the timeout rebuilds it on the next call.
    /// Read without a lock on every call.
    client: Arc<ArcSwap<(u64, reqwest::Client)>>,
    connect_timeout: Live<Duration>,
    /// `http://ADDR`, parsed once: a call sets its path and query on a copy instead of parsing a
    /// whole URL (host included) again.
    base: Arc<reqwest::Url>,
}

fn build(connect_timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        // Calls go to the instance the balancer picked, never through an HTTP proxy from the
        // environment: a proxy would defeat per-instance pools, timeouts and ServedBy.
        .no_proxy()
        .build()
}

impl HttpTransport {
    fn client(&self) -> Result<reqwest::Client, BoxError> {
        let generation = self.connect_timeout.generation();
        let current = self.client.load();
        if current.0 == generation {
            return Ok(current.1.clone());
        }
        // Two callers may both rebuild after a change; either client is right.
        let client = build(**self.connect_timeout.load())?;
        self.client.store(Arc::new((generation, client.clone())));
        Ok(client)
    }
}

/// Makes the transport of each instance the balancer routes to.
pub(crate) struct TransportFactory {
    pub(crate) connect_timeout: Live<Duration>,
    /// The service's name and breaker policy, for the per-instance breakers.
    pub(crate) service: Arc<str>,
    pub(crate) breaker: Live<BreakerConfig>,
    /// Told when an instance's breaker opens.
    pub(crate) balancer: Balancer,
}

impl MakeInstanceService for TransportFactory {
    type Service = InstanceBreaker<HttpTransport>;

    fn make_service(&self, instance: &Instance) -> Option<Self::Service> {
        let base = match reqwest::Url::parse(&format!("http://{}", instance.addr)) {
            Ok(url) => Arc::new(url),
            Err(error) => {
                tracing::error!(instance = %instance.id, %error, "address is not a valid URL authority; the instance stays unroutable");
                return None;
            }
        };
        match build(**self.connect_timeout.load()) {
            Ok(client) => Some(InstanceBreaker {
                inner: HttpTransport {
                    client: Arc::new(ArcSwap::from_pointee((
                        self.connect_timeout.generation(),
                        client,
                    ))),
                    connect_timeout: self.connect_timeout.clone(),
                    base,
                },
                breaker: Breaker::new(
                    self.service.clone(),
                    instance.id.as_str(),
                    self.breaker.clone(),
                ),
                balancer: self.balancer.clone(),
                id: instance.id.clone(),
            }),
            Err(error) => {
                tracing::error!(instance = %instance.id, %error, "cannot build an HTTP client; the instance stays unroutable");
                None
            }
        }
    }
}

impl Service<http::Request<Bytes>> for HttpTransport {
    type Response = http::Response<Bytes>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Bytes>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let client = match self.client() {
            Ok(c) => c,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        // The path and query were checked when the `http::Uri` was built; setting them on the
        // instance's base keeps its host, whatever the path holds.
        let mut url = reqwest::Url::clone(&self.base);
        url.set_path(parts.uri.path());
        url.set_query(parts.uri.query());
        let mut headers = parts.headers;
        // The time left of this attempt, as the per-try timeout above bounded it.
        keel_resilience::write_deadline_header(&mut headers);
        // Built whole rather than through reqwest's builder, which would copy every header into
        // a map of its own.
        let mut request = reqwest::Request::new(parts.method, url);
        *request.headers_mut() = headers;
        *request.body_mut() = Some(body.into());
        let send = client.execute(request);
        Box::pin(async move {
            // The answer's head is moved, not copied; its body is read to the end.
            let (head, body) = http::Response::from(send.await.map_err(normalize)?).into_parts();
            let body = http_body_util::BodyExt::collect(body)
                .await
                .map_err(normalize)?
                .to_bytes();
            Ok(http::Response::from_parts(head, body))
        })
    }
}

/// One instance's circuit breaker, on when `breaker.per_instance` is (read per call): it fails
/// fast while open, and takes the instance out of the balancer's rotation for the open duration
/// (within `outlier.max_ejection_percent`), so calls go to the other instances instead of failing.
/// Its breaker lives as long as the instance's transport: an instance that leaves and comes back
/// starts closed.
#[derive(Clone, Debug)]
pub(crate) struct InstanceBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
    balancer: Balancer,
    id: InstanceId,
}

impl Service<http::Request<Bytes>> for InstanceBreaker<HttpTransport> {
    type Response = http::Response<Bytes>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Bytes>) -> Self::Future {
        if !self.breaker.policy().load().per_instance {
            return self.inner.call(request);
        }
        let Ok(permit) = self.breaker.try_acquire() else {
            // Not sent: the stack above retries it elsewhere (if it may be retried) and does
            // not count it against the service.
            let e = keel_core::request::NotSent {
                reason: format!("circuit breaker of instance `{}` is open", self.id),
            };
            return Box::pin(async move { Err(Box::new(e) as BoxError) });
        };
        // The attempt's own bound, as the per-try timeout above set it: if the attempt is dropped
        // at that time, it timed out, and this instance's breaker counts it.
        let bound = keel_core::request::attempt_end();
        let fut = self.inner.call(request);
        let mut attempt = Attempt {
            permit: Some(permit),
            bound,
            breaker: self.breaker.clone(),
            balancer: self.balancer.clone(),
            id: self.id.clone(),
        };
        Box::pin(async move {
            let res = fut.await;
            if let Some(p) = attempt.permit.take() {
                let failed = p.classify_and_record(&res, None).is_failure();
                attempt.eject_if_open(failed);
            }
            res
        })
    }
}

/// An attempt through an instance's breaker: records a timeout if it is dropped at its bound.
struct Attempt {
    permit: Option<BreakerPermit>,
    bound: Option<tokio::time::Instant>,
    breaker: Arc<Breaker>,
    balancer: Balancer,
    id: InstanceId,
}

impl Attempt {
    fn eject_if_open(&self, failed: bool) {
        if !failed {
            return;
        }
        if let Some(until) = self.breaker.open_until() {
            let open_for = until.saturating_duration_since(tokio::time::Instant::now());
            self.balancer
                .eject(&self.id, open_for, "circuit breaker open");
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        // The per-try timer fires at the bound (the attempt's end, exact; timers run on
        // millisecond ticks, so allow one); dropped earlier, the caller gave up (a hedge won,
        // say): nothing to count.
        let timed_out = self
            .bound
            .is_some_and(|b| tokio::time::Instant::now() + Duration::from_millis(1) >= b);
        if timed_out {
            permit.record(Outcome::Failure(FailureClass::Timeout));
            self.eject_if_open(true);
        }
    }
}

/// Gives transport failures an `io::ErrorKind`, which is what the resilience layers classify
/// by (connect failure, reset, timeout) without knowing the HTTP client in use. The original
/// error stays inside, as the source.
fn normalize(e: reqwest::Error) -> BoxError {
    use std::io::{Error, ErrorKind};
    if let Some(kind) = crate::find_in_chain::<Error>(&e).map(Error::kind) {
        return Box::new(Error::new(kind, e));
    }
    let kind = if e.is_timeout() {
        ErrorKind::TimedOut
    } else if e.is_connect() {
        ErrorKind::ConnectionRefused
    } else if e.is_request() || e.is_body() {
        // The connection broke while the request or the answer was on the wire (the peer died
        // or closed it): a reset. Whether it may be retried is decided above, by method and
        // Idempotency-Key.
        ErrorKind::ConnectionReset
    } else {
        return Box::new(e);
    };
    Box::new(Error::new(kind, e))
}
