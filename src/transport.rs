//! The bottom of the client stack: one reqwest client (one connection pool) per instance.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
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
    /// `max_response_body_bytes`, read per call.
    max_body: Live<usize>,
}

/// Response extension: the answer's body was over `max_response_body_bytes` and was not read
/// (its head is kept, its body empty). The answer still counts by its status for the layers
/// above (a 200 is not a failure of the instance's); the client turns it into
/// [`ClientError::ResponseTooLarge`](crate::ClientError::ResponseTooLarge).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyOverLimit {
    pub(crate) limit: usize,
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
    /// `max_response_body_bytes`.
    pub(crate) max_response_body: Live<usize>,
    /// The service's name and breaker policy, for the per-instance breakers.
    pub(crate) service: Arc<str>,
    pub(crate) breaker: Live<BreakerConfig>,
    /// Told when an instance's breaker opens.
    pub(crate) balancer: Balancer,
    /// Every instance's breaker, kept for a while after the instance leaves (see
    /// [`TransportFactory::breaker_for`]).
    pub(crate) breakers: Arc<Mutex<KeptBreakers>>,
}

/// The per-instance breakers, by instance and address, and when they were last aged.
#[derive(Debug, Default)]
pub(crate) struct KeptBreakers {
    by_instance: HashMap<(InstanceId, SocketAddr), KeptBreaker>,
    aged: Option<tokio::time::Instant>,
}

/// A per-instance breaker, and since when no transport holds it (its instance left).
#[derive(Debug)]
struct KeptBreaker {
    breaker: Arc<Breaker>,
    gone_since: Option<tokio::time::Instant>,
}

/// How long the breaker of an instance that left is kept for its return, counted from when its
/// absence is noticed (see [`TransportFactory::breaker_for`]).
const KEEP_GONE: Duration = Duration::from_secs(300);
/// At most this many breakers of instances that left are kept (the longest gone are forgotten
/// first), whatever the churn.
const MAX_GONE: usize = 4096;
/// The breakers are aged at most this often, so that the many joins of one rebuild (a first
/// discovery answer of 10,000 instances) cost one pass, not one each.
const AGE_EVERY: Duration = Duration::from_secs(1);

impl TransportFactory {
    /// The breaker of `instance`: the one it had if it left and came back (same id, same
    /// address), so an instance whose registration lapses for a moment, or that an edit removes
    /// and restores, keeps its window and stays open if it was open. Otherwise a new one.
    ///
    /// Breakers are aged here, when instances join (at most once per [`AGE_EVERY`]): one that no
    /// transport holds any more is noticed as gone then, and forgotten [`KEEP_GONE`] after that,
    /// or earlier beyond [`MAX_GONE`] of them.
    fn breaker_for(&self, instance: &Instance) -> Arc<Breaker> {
        let mut kept = keel_core::lock(&self.breakers);
        let now = tokio::time::Instant::now();
        if kept
            .aged
            .is_none_or(|t| now.saturating_duration_since(t) >= AGE_EVERY)
        {
            kept.aged = Some(now);
            age(&mut kept.by_instance, now);
        }
        let key = (instance.id.clone(), instance.addr);
        let entry = kept.by_instance.entry(key).or_insert_with(|| KeptBreaker {
            breaker: Breaker::new(
                self.service.clone(),
                instance.id.as_str(),
                self.breaker.clone(),
            ),
            gone_since: None,
        });
        entry.gone_since = None;
        // Back in the set: its gauge shows its state again (a retired gauge ignores transitions).
        entry.breaker.publish();
        entry.breaker.clone()
    }
}

impl KeptBreakers {
    /// Sets the `keel_breaker_state` gauge of each instance in the set: forced open and disabled
    /// are configuration, not transitions, so only sampling shows them (`/metrics` calls this).
    pub(crate) fn publish(kept: &Mutex<Self>) {
        let kept = keel_core::lock(kept);
        // Gone first, then those in the set: the gauge is labelled by instance id alone, and an
        // instance that moved to another address has both a gone breaker and a held one.
        for k in kept.by_instance.values() {
            if Arc::strong_count(&k.breaker) == 1 {
                // Its instance left: it refuses nothing (see `Breaker::retire_gauge`).
                k.breaker.retire_gauge();
            }
        }
        for k in kept.by_instance.values() {
            if Arc::strong_count(&k.breaker) > 1 {
                k.breaker.publish();
            }
        }
    }
}

/// Notices the breakers no transport holds, and forgets those gone too long or too many.
fn age(kept: &mut HashMap<(InstanceId, SocketAddr), KeptBreaker>, now: tokio::time::Instant) {
    // Ids still in the set (at some address): their gauge is the held breaker's to set.
    let held: std::collections::HashSet<InstanceId> = kept
        .iter()
        .filter(|(_, k)| Arc::strong_count(&k.breaker) > 1)
        .map(|((id, _), _)| id.clone())
        .collect();
    kept.retain(|(id, _), k| {
        // Held by a transport besides this map: the instance is still in the set.
        if Arc::strong_count(&k.breaker) > 1 {
            k.gone_since = None;
            return true;
        }
        let since = *k.gone_since.get_or_insert_with(|| {
            if !held.contains(id) {
                k.breaker.retire_gauge();
            }
            now
        });
        now.saturating_duration_since(since) < KEEP_GONE
    });
    let gone = kept.values().filter(|k| k.gone_since.is_some()).count();
    if gone > MAX_GONE {
        let mut oldest: Vec<_> = kept
            .iter()
            .filter_map(|(key, k)| k.gone_since.map(|t| (t, key.clone())))
            .collect();
        oldest.sort_by_key(|(t, _)| *t);
        for (_, key) in oldest.into_iter().take(gone - MAX_GONE) {
            kept.remove(&key);
        }
    }
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
        let breaker = self.breaker_for(instance);
        // Back with its breaker still open: out of rotation for the rest of the open time, as
        // when it opened.
        if self.breaker.load().per_instance {
            if let Some(until) = breaker.open_until() {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                if !left.is_zero() {
                    self.balancer
                        .eject(&instance.id, left, "circuit breaker open");
                }
            }
        }
        match build(**self.connect_timeout.load()) {
            Ok(client) => Some(InstanceBreaker {
                inner: HttpTransport {
                    client: Arc::new(ArcSwap::from_pointee((
                        self.connect_timeout.generation(),
                        client,
                    ))),
                    connect_timeout: self.connect_timeout.clone(),
                    base,
                    max_body: self.max_response_body.clone(),
                },
                breaker,
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
        // A HEAD answer's `content-length` is that of the body a GET would get; it has none.
        let no_body = parts.method == http::Method::HEAD;
        let mut request = reqwest::Request::new(parts.method, url);
        *request.headers_mut() = headers;
        *request.body_mut() = Some(body.into());
        let send = client.execute(request);
        let limit = **self.max_body.load();
        Box::pin(async move {
            // The answer's head is moved, not copied; its body is read to the end, up to the
            // limit.
            let (mut head, body) =
                http::Response::from(send.await.map_err(normalize)?).into_parts();
            // 204 and 304 answers have no body whatever their `content-length` says, either.
            let no_body = no_body
                || head.status == http::StatusCode::NO_CONTENT
                || head.status == http::StatusCode::NOT_MODIFIED;
            let declared = head
                .headers
                .get(http::header::CONTENT_LENGTH)
                .filter(|_| !no_body)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            // Declared too large: not read at all (dropping the body closes the connection
            // rather than drain it).
            let body = if declared.is_some_and(|n| n > limit as u64) {
                None
            } else {
                let limited = http_body_util::Limited::new(body, limit);
                match http_body_util::BodyExt::collect(limited).await {
                    Ok(body) => Some(body.to_bytes()),
                    Err(e) if e.is::<http_body_util::LengthLimitError>() => None,
                    Err(e) => {
                        return Err(match e.downcast::<reqwest::Error>() {
                            Ok(e) => normalize(*e),
                            Err(e) => e,
                        })
                    }
                }
            };
            Ok(match body {
                Some(body) => http::Response::from_parts(head, body),
                None => {
                    head.extensions.insert(BodyOverLimit { limit });
                    http::Response::from_parts(head, Bytes::new())
                }
            })
        })
    }
}

/// One instance's circuit breaker, on when `breaker.per_instance` is (read per call): it fails
/// fast while open, and takes the instance out of the balancer's rotation for the open duration
/// (within `outlier.max_ejection_percent`), so calls go to the other instances instead of failing.
/// Its breaker outlives the instance's transport: an instance that leaves and comes back keeps it
/// if it returns within about five minutes (see [`TransportFactory::breaker_for`]).
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

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::ServiceName;

    fn factory() -> TransportFactory {
        let service = ServiceName::new("pay").unwrap();
        let balancer = Balancer::new(
            service,
            Live::new(Vec::new()),
            Live::new(keel_balance::BalanceConfig::default()),
        )
        .unwrap();
        TransportFactory {
            connect_timeout: Live::new(Duration::from_secs(1)),
            max_response_body: Live::new(crate::settings::DEFAULT_MAX_RESPONSE_BODY_BYTES),
            service: Arc::from("pay"),
            breaker: Live::new(BreakerConfig::default()),
            balancer,
            breakers: Arc::default(),
        }
    }

    fn instance(id: &str, port: u16) -> Instance {
        Instance::new(
            ServiceName::new("pay").unwrap(),
            SocketAddr::from(([127, 0, 0, 1], port)),
        )
        .with_id(id)
    }

    /// Time for the next join to age the breakers.
    async fn later(d: Duration) {
        tokio::time::advance(d + AGE_EVERY).await;
    }

    /// The `keel_breaker_state` value of instance `id` in a rendering.
    fn state_of(text: &str, id: &str) -> Option<String> {
        text.lines()
            .find(|l| {
                l.starts_with("keel_breaker_state{") && l.contains(&format!("instance=\"{id}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    }

    /// `keel_breaker_state` of an instance in the set shows forced open (3) once sampled, as the
    /// per-service breaker's does; an instance that left reads 0, even if its breaker is open.
    #[test]
    fn instance_breaker_gauges_are_sampled() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let mut f = factory();
            f.breaker = Live::new(BreakerConfig {
                forced_open: true,
                ..BreakerConfig::default()
            });
            let held = f.breaker_for(&instance("a", 1));
            drop(f.breaker_for(&instance("b", 2)));
            KeptBreakers::publish(&f.breakers);
            let text = handle.render();
            assert_eq!(state_of(&text, "a").as_deref(), Some("3"), "{text}");
            assert_eq!(state_of(&text, "b").as_deref(), Some("0"), "{text}");
            // An instance whose breaker opened, then left.
            f.breaker = Live::new(BreakerConfig {
                minimum_calls: 1,
                ..BreakerConfig::default()
            });
            let c = f.breaker_for(&instance("c", 3));
            c.clone()
                .try_acquire()
                .unwrap()
                .record(Outcome::Failure(FailureClass::Status(502)));
            KeptBreakers::publish(&f.breakers);
            assert_eq!(state_of(&handle.render(), "c").as_deref(), Some("1"));
            drop(c);
            KeptBreakers::publish(&f.breakers);
            assert_eq!(state_of(&handle.render(), "c").as_deref(), Some("0"));
            // Eight instances move to another address: each breaker at the old one is gone, the
            // new one opened; the gauge (labelled by id alone) shows the one in the set.
            let moved: Vec<_> = (0..8u16)
                .map(|i| {
                    let id = format!("m{i}");
                    drop(f.breaker_for(&instance(&id, 100 + i)));
                    let moved = f.breaker_for(&instance(&id, 200 + i));
                    moved
                        .clone()
                        .try_acquire()
                        .unwrap()
                        .record(Outcome::Failure(FailureClass::Status(502)));
                    moved
                })
                .collect();
            KeptBreakers::publish(&f.breakers);
            let text = handle.render();
            for i in 0..8 {
                assert_eq!(state_of(&text, &format!("m{i}")).as_deref(), Some("1"));
            }
            drop((held, moved));
        });
    }

    #[tokio::test(start_paused = true)]
    async fn breakers_of_instances_that_left_are_kept_for_a_while_then_forgotten() {
        let f = factory();
        let a = instance("a", 1);
        let first = f.make_service(&a).unwrap();
        let original = Arc::downgrade(&first.breaker);
        // Still in the set: the same breaker, however long.
        later(KEEP_GONE * 2).await;
        assert!(Arc::ptr_eq(
            &f.breaker_for(&a),
            &original.upgrade().unwrap()
        ));
        drop(first);
        // Gone (noticed when another instance joins), back within KEEP_GONE: the same one.
        later(Duration::ZERO).await;
        let b = f.make_service(&instance("b", 2)).unwrap();
        later(KEEP_GONE - AGE_EVERY * 2).await;
        let back = f.make_service(&a).unwrap();
        assert!(Arc::ptr_eq(&back.breaker, &original.upgrade().unwrap()));
        // Same id at another address: another instance, another breaker.
        let moved = f.make_service(&instance("a", 3)).unwrap();
        assert!(!Arc::ptr_eq(&back.breaker, &moved.breaker));
        drop((back, moved));
        // Gone longer than KEEP_GONE: forgotten, and a new breaker on return.
        later(Duration::ZERO).await;
        f.make_service(&instance("c", 4)).unwrap();
        later(KEEP_GONE).await;
        f.make_service(&instance("d", 5)).unwrap();
        assert!(original.upgrade().is_none(), "forgotten");
        drop(b);
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_gone_breakers_of_instances_that_left_are_kept() {
        let f = factory();
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        for i in 0..(MAX_GONE + 10) {
            // Each made and dropped at once: noticed as gone at the next aging.
            f.make_service(&instance(&format!("i{i}"), 1)).unwrap();
            if i % 1000 == 999 {
                later(Duration::ZERO).await;
            }
        }
        later(Duration::ZERO).await;
        f.make_service(&instance("last", 2)).unwrap();
        let kept = keel_core::lock(&f.breakers);
        let gone = kept
            .by_instance
            .values()
            .filter(|k| k.gone_since.is_some())
            .count();
        assert_eq!(gone, MAX_GONE);
        // The most recently gone are kept.
        let newest = (InstanceId::new(format!("i{}", MAX_GONE + 9)), addr);
        assert!(kept.by_instance.contains_key(&newest));
    }
}
