//! A real axum server on 127.0.0.1 with idempotent routes, and stores to run the suite on.
#![allow(dead_code, missing_docs, unreachable_pub)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::post,
    Extension, Router,
};
use keel_core::Live;
use keel_idempotency::{
    BoxFuture, Claim, FencingToken, IdempotencyConfig, IdempotencyError, IdempotencyLayer,
    IdempotencyScope, IdempotencyStore, LeaseLost, MemoryStore, OnCancel, Ownership, RedisStore,
};

pub async fn memory_store() -> Arc<dyn IdempotencyStore> {
    Arc::new(MemoryStore::new(100_000))
}

pub async fn redis_store() -> Arc<dyn IdempotencyStore> {
    let prefix = keel_testkit::unique_prefix("idem");
    Arc::new(
        RedisStore::open(&keel_testkit::shared_redis_url(), &prefix)
            .await
            .unwrap(),
    )
}

/// Wraps a store; renewals fail while `block_renew` is set, everything fails while `down` is.
pub struct Faulty<S> {
    pub inner: S,
    pub block_renew: AtomicBool,
    pub down: AtomicBool,
}

impl<S> Faulty<S> {
    pub fn new(inner: S) -> Arc<Self> {
        Arc::new(Self {
            inner,
            block_renew: AtomicBool::new(false),
            down: AtomicBool::new(false),
        })
    }
    fn check(&self) -> Result<(), IdempotencyError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(IdempotencyError::Unavailable("test: down".into()));
        }
        Ok(())
    }
}

impl<S: IdempotencyStore> IdempotencyStore for Faulty<S> {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        fp: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, IdempotencyError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.claim(key, owner, fp, lease).await
        })
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        Box::pin(async move {
            self.check()?;
            if self.block_renew.load(Ordering::SeqCst) {
                return Err(IdempotencyError::Unavailable("test: renew blocked".into()));
            }
            self.inner.renew(key, owner, lease).await
        })
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: axum::body::Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.complete(key, owner, record, ttl).await
        })
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Ownership, IdempotencyError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.release(key, owner).await
        })
    }
}

/// What the handlers saw.
#[derive(Default)]
pub struct Seen {
    pub executions: AtomicUsize,
    pub per_key: Mutex<HashMap<String, usize>>,
    /// How long the next executions sleep, in ms (popped front to back; default `default_ms`).
    pub sleeps: Mutex<Vec<u64>>,
    pub default_ms: AtomicUsize,
    pub lease_lost_seen: AtomicUsize,
    pub fences: Mutex<Vec<u64>>,
    pub panics_left: AtomicUsize,
    pub fails_left: AtomicUsize,
}

impl Seen {
    pub fn execs(&self) -> usize {
        self.executions.load(Ordering::SeqCst)
    }
}

async fn work(
    State(seen): State<Arc<Seen>>,
    fence: Option<Extension<FencingToken>>,
    lost: Option<Extension<LeaseLost>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fence = fence.map(|f| f.0).unwrap_or(FencingToken(0));
    let lost = lost.map(|l| l.0).unwrap_or_default();
    let n = seen.executions.fetch_add(1, Ordering::SeqCst) + 1;
    let tag = headers
        .get("x-test-tag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    *seen.per_key.lock().unwrap().entry(tag).or_default() += 1;
    seen.fences.lock().unwrap().push(fence.0);
    if seen.panics_left.load(Ordering::SeqCst) > 0 {
        seen.panics_left.fetch_sub(1, Ordering::SeqCst);
        panic!("test handler panics");
    }
    let ms = {
        let mut s = seen.sleeps.lock().unwrap();
        if s.is_empty() {
            seen.default_ms.load(Ordering::SeqCst) as u64
        } else {
            s.remove(0)
        }
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    if lost.is_lost() {
        seen.lease_lost_seen.fetch_add(1, Ordering::SeqCst);
    }
    if seen.fails_left.load(Ordering::SeqCst) > 0 {
        seen.fails_left.fetch_sub(1, Ordering::SeqCst);
        return (StatusCode::INTERNAL_SERVER_ERROR, "try again").into_response();
    }
    (
        StatusCode::CREATED,
        [
            ("content-type", "application/json"),
            ("x-not-replayed", "1"),
        ],
        format!(
            "{{\"execution\":{n},\"fence\":{},\"len\":{}}}",
            fence.0,
            body.len()
        ),
    )
        .into_response()
}

async fn plain(State(seen): State<Arc<Seen>>) -> &'static str {
    seen.executions.fetch_add(1, Ordering::SeqCst);
    "plain"
}

/// Authentication stand-in: `x-tenant` becomes the request's IdempotencyScope.
async fn auth(mut req: Request, next: Next) -> Response {
    if let Some(t) = req.headers().get("x-tenant").and_then(|v| v.to_str().ok()) {
        let t = t.to_owned();
        req.extensions_mut().insert(IdempotencyScope(t));
    }
    next.run(req).await
}

pub struct App {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    pub config: Live<IdempotencyConfig>,
    pub server: tokio::task::JoinHandle<()>,
}

impl App {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Routes: `/work` (required key), `/optional` (key optional), `/orders/{id}/refund` (required
/// key, a route template), `/expire` (on_cancel expire, lease 600ms),
/// `/plain` (no layer).
pub async fn start(store: Arc<dyn IdempotencyStore>, cfg: IdempotencyConfig) -> App {
    let seen = Arc::new(Seen::default());
    let config = Live::new(cfg);
    let layer = IdempotencyLayer::new(store, config.clone());
    let app = Router::new()
        .route("/work", post(work).layer(layer.clone().required(true)))
        .route("/optional", post(work).layer(layer.clone()))
        .route(
            "/orders/{id}/refund",
            post(work).layer(layer.clone().required(true)),
        )
        .route(
            "/expire",
            post(work).layer(
                layer
                    .clone()
                    .required(true)
                    .on_cancel(OnCancel::Expire)
                    .lease(Duration::from_millis(600)),
            ),
        )
        .route("/plain", post(plain))
        .layer(middleware::from_fn(auth))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    App {
        addr,
        seen,
        config,
        server,
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap()
}

pub fn test_config() -> IdempotencyConfig {
    IdempotencyConfig {
        lease: Duration::from_millis(600),
        ..IdempotencyConfig::default()
    }
}
