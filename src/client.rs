//! `keel.client("payments")`: a reqwest-like client whose every call goes through the
//! resilience stack and the balancer.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header::HeaderName, HeaderMap, HeaderValue, Method};
use keel_core::request::ServedBy;
use serde::{de::DeserializeOwned, Serialize};
use tower::ServiceExt;
use tracing::Instrument;

use crate::{trace::TraceContext, transport::BoxError};

/// The whole client stack, named rather than boxed: a call clones it (reference counts, no
/// allocation) and its future lives inside the caller's.
pub(crate) type Stack =
    keel_resilience::ClientStack<keel_balance::Balance<crate::transport::TransportFactory>>;

/// A client for one service: discovered, balanced and resilient. Cheap to clone.
///
/// ```no_run
/// # async fn f(keel: keel::Keel) -> Result<(), keel::ClientError> {
/// let payments = keel.client("payments")?;
/// let answer = payments
///     .post("/payments")
///     .idempotency_key("order-42")
///     .json(&serde_json::json!({"amount": 1200}))
///     .send()
///     .await?;
/// println!("{} from {:?}", answer.status(), answer.served_by());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    parts: Arc<ClientParts>,
    fallback: Option<Fallback>,
}

/// A degradation: given why keel refused a call, an answer to use instead (or `None`).
type Fallback = Arc<dyn Fn(&ClientError) -> Option<http::Response<Bytes>> + Send + Sync>;

/// What every clone of a client shares: its stack, and what it keeps to report its state.
pub(crate) struct ClientParts {
    pub(crate) name: String,
    pub(crate) stack: Stack,
    pub(crate) balancer: keel_balance::Balancer,
    pub(crate) resilience: keel_resilience::ClientStackLayer,
    /// The per-instance breakers (`breaker.per_instance`), for their sampled gauges.
    pub(crate) instance_breakers: std::sync::Arc<std::sync::Mutex<crate::transport::KeptBreakers>>,
    pub(crate) config: keel_core::Live<crate::settings::ClientConfig>,
    /// The instance set, to wait for discovery's first answer before the first call.
    pub(crate) watch: keel_discovery::InstanceWatch,
    /// Fixed when the client was built: where its instances come from.
    pub(crate) static_endpoints: bool,
    pub(crate) target: Option<String>,
}

impl Client {
    /// Sets this client's sampled gauges (its bulkhead's calls in flight, its breakers' states).
    pub(crate) fn publish_gauges(&self) {
        self.parts.resilience.publish_gauges();
        crate::transport::KeptBreakers::publish(&self.parts.instance_breakers);
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("service", &self.parts.name)
            .finish()
    }
}

impl Client {
    pub(crate) fn new(parts: ClientParts) -> Self {
        Self {
            parts: Arc::new(parts),
            fallback: None,
        }
    }

    /// This client with a degradation: when keel refuses a call (breaker open, throttled, rate
    /// limited, shed, deadline exceeded, retry budget spent), `fallback` may answer instead —
    /// a cached value, a default, a "try later" page. It is not called for upstream failures,
    /// which retries and ejection already handle, nor for bad requests.
    ///
    /// ```no_run
    /// # async fn f(keel: keel::Keel) -> Result<(), keel::ClientError> {
    /// let prices = keel.client("prices")?.with_fallback(|_why| {
    ///     Some(http::Response::new(bytes::Bytes::from_static(b"{\"price\":null}")))
    /// });
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with_fallback(
        mut self,
        fallback: impl Fn(&ClientError) -> Option<http::Response<Bytes>> + Send + Sync + 'static,
    ) -> Self {
        self.fallback = Some(Arc::new(fallback));
        self
    }

    /// The client's state for `/keel/status`: the balancer's instances (state, health, EWMA,
    /// in-flight, ejections) and the breaker.
    pub fn status(&self) -> serde_json::Value {
        let r = &self.parts.resilience;
        let breaker = r.breaker();
        let (calls, failures, slow) = breaker.window_counts();
        serde_json::json!({
            "service": self.parts.balancer.service().as_str(),
            "config_generation": self.parts.config.generation(),
            "balancer": serde_json::to_value(self.parts.balancer.snapshot()).unwrap_or_default(),
            "breaker": {
                "state": format!("{:?}", breaker.state()),
                "window": { "calls": calls, "failures": failures, "slow": slow },
            },
            "retry_budget": { "balance": r.budget().balance() },
            "rate_limit": {
                "enabled": r.rate_limiter().policy().load().enabled,
                "scope": format!("{:?}", r.rate_limiter().policy().load().scope).to_lowercase(),
                "tracked_keys": r.rate_limiter().tracked_keys(),
            },
            "bulkhead": { "limit": r.bulkhead().limit(), "in_flight": r.bulkhead().in_flight() },
        })
    }

    /// What in `now` differs from how this client was built in a way only a restart applies.
    pub(crate) fn not_live_change(
        &self,
        now: &crate::settings::ClientConfig,
    ) -> Option<&'static str> {
        if now.endpoints.is_empty() == self.parts.static_endpoints {
            Some("switched between static endpoints and discovery")
        } else if now.service != self.parts.target {
            Some("service changed")
        } else {
            None
        }
    }

    /// The balancer (for snapshots and custom picks).
    pub fn balancer(&self) -> &keel_balance::Balancer {
        &self.parts.balancer
    }

    /// The service this client calls.
    pub fn service(&self) -> &str {
        &self.parts.name
    }

    /// A request with any method.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let parsed = if path.starts_with('/') {
            path.parse::<http::Uri>()
        } else {
            format!("/{path}").parse()
        };
        let (uri, error) = match parsed {
            Ok(uri) => (uri, None),
            Err(e) => (
                http::Uri::from_static("/"),
                Some(ClientError::InvalidRequest {
                    reason: format!("path {path:?}: {e}"),
                }),
            ),
        };
        RequestBuilder {
            client: self.clone(),
            method,
            uri,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            extensions: http::Extensions::new(),
            error,
        }
    }

    /// A GET request.
    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    /// A POST request.
    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    /// A PUT request.
    pub fn put(&self, path: &str) -> RequestBuilder {
        self.request(Method::PUT, path)
    }

    /// A PATCH request.
    pub fn patch(&self, path: &str) -> RequestBuilder {
        self.request(Method::PATCH, path)
    }

    /// A DELETE request.
    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.request(Method::DELETE, path)
    }
}

/// A request being built; [`send`](RequestBuilder::send) it.
#[must_use]
pub struct RequestBuilder {
    client: Client,
    method: Method,
    /// The path (and query), parsed when the request was made.
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
    extensions: http::Extensions,
    error: Option<ClientError>,
}

impl fmt::Debug for RequestBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBuilder")
            .field("service", &self.client.parts.name)
            .field("method", &self.method)
            .field("path", &self.uri)
            .finish_non_exhaustive()
    }
}

impl RequestBuilder {
    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                self.headers.append(n, v);
            }
            _ => {
                self.error.get_or_insert(ClientError::InvalidRequest {
                    reason: format!("header {name:?} is not a valid header"),
                });
            }
        }
        self
    }

    /// Sets the body to `value` as JSON (and the content type).
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(bytes) => {
                self.body = Bytes::from(bytes);
                self.headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            Err(e) => {
                self.error.get_or_insert(ClientError::InvalidRequest {
                    reason: format!("body is not serializable as JSON: {e}"),
                });
            }
        }
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the `Idempotency-Key` header (as an RFC 8941 string): the request may then be
    /// retried and hedged even if its method is not idempotent, and the server runs it once.
    /// The key must be 1 to 255 printable ASCII characters.
    pub fn idempotency_key(mut self, key: &str) -> Self {
        let printable = key.bytes().all(|b| (0x20..=0x7e).contains(&b));
        if key.is_empty() || key.len() > 255 || !printable {
            self.error.get_or_insert(ClientError::InvalidRequest {
                reason: "idempotency key must be 1 to 255 printable ASCII characters".to_owned(),
            });
            return self;
        }
        let quoted = format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""));
        match HeaderValue::from_str(&quoted) {
            Ok(v) => {
                self.headers.insert("idempotency-key", v);
            }
            Err(_) => {
                self.error.get_or_insert(ClientError::InvalidRequest {
                    reason: "idempotency key is not a valid header value".to_owned(),
                });
            }
        }
        self
    }

    /// Sets the key that hash-based strategies (`ring-hash`, `maglev`) route by.
    pub fn hash_key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.extensions.insert(keel_balance::HashKey::new(key));
        self
    }

    /// Adds a request extension (for layers that read one).
    pub fn extension<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.extensions.insert(value);
        self
    }

    /// Sends the request through the client's stack.
    pub async fn send(self) -> Result<Response, ClientError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut request = http::Request::new(self.body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        *request.extensions_mut() = self.extensions;
        // A call made while serving a request inherits what is left of that request's deadline.
        if request
            .extensions()
            .get::<keel_core::request::Deadline>()
            .is_none()
        {
            if let Some(d) = crate::trace::current_deadline() {
                request.extensions_mut().insert(d);
            }
        }
        let ctx = TraceContext::current()
            .map(|c| c.child())
            .unwrap_or_else(TraceContext::new_root);
        if let Ok(v) = HeaderValue::from_bytes(&ctx.encode()) {
            request
                .headers_mut()
                .insert(crate::trace::TRACEPARENT_NAME, v);
        }
        // A client used right after it is built: give discovery its first answer (bounded by the
        // call's own deadline, and by 2 s) instead of failing with "no instance" at once.
        if !self.client.parts.watch.is_ready() {
            let wait = request
                .extensions()
                .get::<keel_core::request::Deadline>()
                .map_or(Duration::from_secs(2), |d| {
                    d.remaining().min(Duration::from_secs(2))
                });
            let _ = tokio::time::timeout(wait, self.client.parts.watch.ready()).await;
        }
        let span = tracing::info_span!(
            "keel.client",
            service = %self.client.parts.name,
            method = %self.method,
            path = %request.uri(),
            trace_id = %crate::trace::Hex(&ctx.trace_id),
            status = tracing::field::Empty,
        );
        let result = self
            .client
            .parts
            .stack
            .clone()
            .oneshot(request)
            .instrument(span.clone())
            .await;
        match result {
            Ok(response) => {
                span.record("status", response.status().as_u16());
                if let Some(over) = response
                    .extensions()
                    .get::<crate::transport::BodyOverLimit>()
                {
                    return Err(ClientError::ResponseTooLarge {
                        service: self.client.parts.name.clone(),
                        status: response.status(),
                        limit: over.limit,
                    });
                }
                Ok(Response { inner: response })
            }
            Err(source) => {
                let error = ClientError::from_box(self.client.parts.name.clone(), source);
                if let (ClientError::Refused { .. }, Some(fallback)) =
                    (&error, &self.client.fallback)
                {
                    if let Some(answer) = fallback(&error) {
                        tracing::debug!(service = %self.client.parts.name, %error, "fallback answered");
                        return Ok(Response { inner: answer });
                    }
                }
                Err(error)
            }
        }
    }
}

/// A buffered response: its whole body, read up to `clients.NAME.max_response_body_bytes`.
#[derive(Debug)]
pub struct Response {
    inner: http::Response<Bytes>,
}

impl Response {
    /// The status.
    pub fn status(&self) -> http::StatusCode {
        self.inner.status()
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        self.inner.headers()
    }

    /// The instance that answered.
    pub fn served_by(&self) -> Option<&ServedBy> {
        self.inner.extensions().get::<ServedBy>()
    }

    /// The body.
    pub fn bytes(&self) -> &Bytes {
        self.inner.body()
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(self.inner.body()).into_owned()
    }

    /// The body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(self.inner.body()).map_err(|e| ClientError::InvalidResponse {
            reason: format!("body is not the expected JSON: {e}"),
        })
    }

    /// The underlying `http::Response`.
    pub fn into_http(self) -> http::Response<Bytes> {
        self.inner
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No client is configured or discoverable under that name.
    #[error("no client named `{name}`: {reason}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// Why.
        reason: String,
    },
    /// The request could not be built.
    #[error("invalid request: {reason}")]
    InvalidRequest {
        /// Why.
        reason: String,
    },
    /// The response was not what the caller asked for.
    #[error("invalid response: {reason}")]
    InvalidResponse {
        /// Why.
        reason: String,
    },
    /// The answer's body was larger than `clients.NAME.max_response_body_bytes` (the client
    /// buffers whole bodies); the rest of it was not read. Trying again gets the same answer.
    #[error("answer from `{service}` ({status}) has a body over the {limit}-byte limit (clients.{service}.max_response_body_bytes)")]
    ResponseTooLarge {
        /// The client.
        service: String,
        /// The answer's status.
        status: http::StatusCode,
        /// The limit in force, in bytes.
        limit: usize,
    },
    /// keel itself refused the call (breaker open, rate limited, shed, deadline, budget).
    #[error("call to `{service}` refused: {source}")]
    Refused {
        /// The service.
        service: String,
        /// The resilience layer's reason.
        #[source]
        source: BoxError,
        /// When a retry may help, after how long.
        retry_after: Option<Duration>,
        /// Whether trying again later may help.
        retryable: bool,
    },
    /// No instance could take the call.
    #[error("no instance of `{service}` available: {source}")]
    NoInstance {
        /// The service.
        service: String,
        /// The balancer's reason.
        #[source]
        source: BoxError,
    },
    /// The upstream failed (connection, reset, timeout) after all attempts.
    #[error("call to `{service}` failed: {source}")]
    Upstream {
        /// The service.
        service: String,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
}

impl ClientError {
    fn from_box(service: String, source: BoxError) -> Self {
        if let Some(r) = keel_resilience::ResilienceError::find(&*source) {
            // A per-try timeout or an injected fault stands for the upstream failing, not for
            // keel refusing the call.
            if matches!(
                r,
                keel_resilience::ResilienceError::Timeout
                    | keel_resilience::ResilienceError::Injected
            ) {
                return ClientError::Upstream { service, source };
            }
            let (retry_after, retryable) = (r.retry_after(), r.is_retryable());
            return ClientError::Refused {
                service,
                source,
                retry_after,
                retryable,
            };
        }
        if crate::find_in_chain::<keel_balance::BalanceError>(&*source).is_some() {
            return ClientError::NoInstance { service, source };
        }
        if keel_core::request::not_sent(&*source) {
            // Refused below the balancer (an instance's own breaker), on every instance tried.
            return ClientError::Refused {
                service,
                source,
                retry_after: None,
                retryable: true,
            };
        }
        ClientError::Upstream { service, source }
    }

    /// Whether trying again (later) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Refused { retryable, .. } => *retryable,
            ClientError::NoInstance { .. } | ClientError::Upstream { .. } => true,
            _ => false,
        }
    }

    /// When keel refused the call, the time after which a retry may succeed.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> BoxError {
        Box::new(e)
    }

    #[test]
    fn errors_are_classified_by_what_failed() {
        let refused = ClientError::from_box(
            "pay".into(),
            boxed(keel_resilience::ResilienceError::RateLimited {
                retry_after: Duration::from_secs(3),
            }),
        );
        assert!(
            matches!(refused, ClientError::Refused { .. }),
            "{refused:?}"
        );
        assert_eq!(refused.retry_after(), Some(Duration::from_secs(3)));

        let timeout = ClientError::from_box(
            "pay".into(),
            boxed(keel_resilience::ResilienceError::Timeout),
        );
        assert!(
            matches!(timeout, ClientError::Upstream { .. }),
            "{timeout:?}"
        );
        assert!(timeout.is_retryable());

        let none = ClientError::from_box(
            "pay".into(),
            boxed(keel_balance::BalanceError::NoInstance {
                service: keel_core::ServiceName::new("pay").unwrap(),
            }),
        );
        assert!(matches!(none, ClientError::NoInstance { .. }), "{none:?}");

        let io = ClientError::from_box(
            "pay".into(),
            boxed(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "refused",
            )),
        );
        assert!(matches!(io, ClientError::Upstream { .. }));
    }
}
