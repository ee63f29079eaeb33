//! The bottom of the client stack: one reqwest client (one connection pool) per instance.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use keel_core::Instance;
use tower::Service;

/// Errors cross the tower stack boxed, as tower's own middleware expects.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sends a buffered request to one instance and buffers the answer.
///
/// Buffered bodies are what make retries, hedging and idempotent replays possible; keel's client
/// is for service-to-service calls, where bodies are small documents.
#[derive(Clone, Debug)]
pub(crate) struct HttpTransport {
    client: reqwest::Client,
    base: String,
}

impl HttpTransport {
    pub(crate) fn new(instance: &Instance, connect_timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            client,
            base: format!("http://{}", instance.addr),
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
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let send = self
            .client
            .request(parts.method, format!("{}{path}", self.base))
            .headers(parts.headers)
            .body(body)
            .send();
        Box::pin(async move {
            let response = send.await.map_err(normalize)?;
            let mut builder = http::Response::builder()
                .status(response.status())
                .version(response.version());
            if let Some(headers) = builder.headers_mut() {
                *headers = response.headers().clone();
            }
            let body = response.bytes().await.map_err(normalize)?;
            Ok(builder.body(body)?)
        })
    }
}

/// Gives transport failures an `io::ErrorKind`, which is what the resilience layers classify
/// by (connect failure, reset, timeout) without knowing the HTTP client in use. The original
/// error stays inside, as the source.
fn normalize(e: reqwest::Error) -> BoxError {
    use std::io::{Error, ErrorKind};
    if let Some(kind) = io_kind(&e) {
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

fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur = e.source();
    while let Some(s) = cur {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = s.source();
    }
    None
}
