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
            let response = send.await?;
            let mut builder = http::Response::builder()
                .status(response.status())
                .version(response.version());
            if let Some(headers) = builder.headers_mut() {
                *headers = response.headers().clone();
            }
            let body = response.bytes().await?;
            Ok(builder.body(body)?)
        })
    }
}
