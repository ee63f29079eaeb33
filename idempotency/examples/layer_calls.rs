//! Requests through the idempotency layer on the Redis store, in process (no HTTP), for
//! instruction counts: what the layer costs the service's own CPU per first request, with
//! Redis's work left out (it runs in its own process).
//!
//! Run it under callgrind twice, with 0 and with N requests, and divide the difference by N:
//!
//! ```sh
//! cargo build --release -p keel-idempotency --example layer_calls
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/layer_calls 0
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/layer_calls 20000
//! ```
//!
//! Requests go 32 at a time (as the HTTP benchmark's `wrk -c32`), each with a new key, a 30-byte
//! JSON body and a 36-byte answer. `plain` as a second argument calls the handler without the
//! layer (the loop's own cost); `memory` puts the layer on the memory store instead (the layer's
//! own work, no store I/O). `KEEL_CALLS_PROMETHEUS=1` installs the Prometheus recorder a keel
//! service runs with (without one, metrics cost next to nothing). Needs `redis-server` (a
//! private one is started).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{convert::Infallible, sync::Arc};

use axum::body::Body;
use futures_util::future::join_all;
use http::{Request, Response, StatusCode};
use keel_core::Live;
use keel_idempotency::{
    IdempotencyConfig, IdempotencyLayer, IdempotencyStore, MemoryStore, RedisStore,
};
use keel_testkit::RedisServer;
use tower::{service_fn, Layer, Service, ServiceExt};

const CONCURRENCY: u64 = 32;

async fn handler(_req: Request<Body>) -> Result<Response<Body>, Infallible> {
    let mut res = Response::new(Body::from("{\"id\":\"ord_1\",\"status\":\"created\"}"));
    *res.status_mut() = StatusCode::CREATED;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

fn request(n: u64) -> Request<Body> {
    Request::post("/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", format!("\"k-{n}\""))
        .body(Body::from("{\"amount\":10,\"currency\":\"EUR\"}"))
        .unwrap()
}

async fn calls<S>(svc: S, from: u64, n: u64)
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone,
    S::Error: std::fmt::Debug,
{
    let mut i = 0;
    while i < n {
        let batch = CONCURRENCY.min(n - i);
        let answers =
            join_all((0..batch).map(|j| svc.clone().oneshot(request(from + i + j)))).await;
        for a in answers {
            assert_eq!(a.unwrap().status(), StatusCode::CREATED);
        }
        i += batch;
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mode = std::env::args().nth(2).unwrap_or_default();
    // KEEL_CALLS_PROMETHEUS=1: with the Prometheus recorder a keel service installs, so the
    // metrics cost what they cost in a service (without a recorder they are no-ops).
    if std::env::var("KEEL_CALLS_PROMETHEUS").is_ok_and(|v| v == "1") {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .unwrap();
    }
    // Only a Redis store needs a server.
    let redis = (mode != "memory").then(RedisServer::start);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store: Arc<dyn IdempotencyStore> = if mode == "memory" {
            Arc::new(MemoryStore::new(1_000_000))
        } else {
            let url = redis.as_ref().map(RedisServer::url).unwrap();
            Arc::new(RedisStore::open(&url, "calls:").await.unwrap())
        };
        let layered = IdempotencyLayer::new(store, Live::new(IdempotencyConfig::default()))
            .layer(service_fn(handler));
        let bare = service_fn(handler);
        // Warm-up either way: connections, scripts, allocator.
        calls(layered.clone(), 0, 1_000).await;
        if mode == "plain" {
            calls(bare, 1_000, n).await;
        } else {
            calls(layered, 1_000, n).await;
        }
    });
}
