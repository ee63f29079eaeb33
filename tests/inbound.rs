//! The inbound side of keel.serve on real sockets: shedding, rate limits, deadlines, drain.

mod common;

use std::{sync::Arc, time::Duration};

use axum::{
    extract::ws::{CloseFrame, Message, WebSocketUpgrade},
    response::IntoResponse,
    routing::get,
    Router,
};
use common::start;
use futures::{SinkExt, StreamExt};
use keel::{keel_core::Shutdown, Keel};
use tokio_tungstenite::tungstenite;

async fn build(name: &str, sets: &[(&str, &str)]) -> (Keel, Shutdown) {
    let shutdown = Shutdown::new();
    let mut b = Keel::builder(name)
        .shutdown(shutdown.clone())
        .set("service.drain_grace", "0s");
    for (k, v) in sets {
        b = b.set(*k, *v);
    }
    (b.build().await.unwrap(), shutdown)
}

/// After `drain_timeout`, a request still in flight is ended: serve has returned, and the
/// caller is not left waiting on a connection nobody will finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_ends_requests_still_in_flight() {
    let (keel, shutdown) = build("drain-timeout", &[("service.drain_timeout", "100ms")]).await;
    let entered = Arc::new(tokio::sync::Notify::new());
    let e2 = entered.clone();
    let app = Router::new().route(
        "/forever",
        get(move || {
            let e2 = e2.clone();
            async move {
                e2.notify_one();
                std::future::pending::<&'static str>().await
            }
        }),
    );
    let (addr, task) = start(&keel, app).await;
    let call = tokio::spawn(async move {
        reqwest::Client::new()
            .get(format!("http://{addr}/forever"))
            .send()
            .await
    });
    entered.notified().await;
    shutdown.trigger();
    task.await.unwrap().unwrap();
    // Hang guard only: the connection must be closed once serve has returned.
    let r = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the request outlived serve: its connection was never closed")
        .unwrap();
    assert!(r.is_err(), "{r:?}");
}

/// A WebSocket open at shutdown is given the drain: its handler, told by the shutdown, says
/// goodbye, sends a close frame (1001) and waits for the peer's answer, and `serve` returns only
/// once the connection has closed (`drain_timeout` is long: nothing is cut here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_an_open_websocket_to_close() {
    let (keel, shutdown) = build("drain-ws", &[("service.drain_timeout", "60s")]).await;
    // Set by the handler once its socket has closed, before the socket is dropped.
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let (c2, r2, s2) = (closed.clone(), release.clone(), shutdown.clone());
    let app = Router::new().route(
        "/ws",
        get(move |up: WebSocketUpgrade| {
            let (closed, release, shutdown) = (c2.clone(), r2.clone(), s2.clone());
            async move {
                up.on_upgrade(move |mut socket| async move {
                    loop {
                        tokio::select! {
                            msg = socket.recv() => match msg {
                                Some(Ok(Message::Text(t))) => {
                                    let _ = socket.send(Message::Text(t)).await;
                                }
                                _ => return,
                            },
                            _ = shutdown.triggered() => break,
                        }
                    }
                    // Draining: say so, finish what is in hand (here: until the test says), then
                    // close the WebSocket and wait for the peer's close.
                    let _ = socket.send(Message::Text("draining".into())).await;
                    let _ = release.acquire().await.map(|p| p.forget());
                    let _ = socket
                        .send(Message::Close(Some(CloseFrame {
                            code: 1001,
                            reason: "going away".into(),
                        })))
                        .await;
                    while let Some(Ok(_)) = socket.recv().await {}
                    closed.store(true, std::sync::atomic::Ordering::SeqCst);
                })
                .into_response()
            }
        }),
    );
    let (addr, task) = start(&keel, app).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    ws.send(tungstenite::Message::text("ping")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        tungstenite::Message::text("ping")
    );
    // `serve`'s return, and whether the WebSocket had closed by then.
    let c3 = closed.clone();
    let served = tokio::spawn(async move {
        let r = task.await.unwrap();
        (r, c3.load(std::sync::atomic::Ordering::SeqCst))
    });
    shutdown.trigger();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        tungstenite::Message::text("draining")
    );
    release.add_permits(1);
    match ws.next().await.unwrap().unwrap() {
        tungstenite::Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 1001, "{frame:?}");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    // tungstenite answers the close; the stream then ends.
    while let Some(Ok(_)) = ws.next().await {}
    let (result, closed_first) = served.await.unwrap();
    result.unwrap();
    assert!(
        closed_first,
        "serve returned while the WebSocket was still open: the drain did not wait for it"
    );
}

/// A WebSocket whose handler never lets go (and never reads it) is closed at `drain_timeout`:
/// `serve` returns, and the peer sees the connection end rather than an open socket nobody
/// serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_a_websocket_that_stays_open() {
    let (keel, shutdown) = build("drain-ws-cut", &[("service.drain_timeout", "200ms")]).await;
    let app = Router::new().route(
        "/ws",
        get(|up: WebSocketUpgrade| async move {
            up.on_upgrade(|socket| async move {
                // Holds the socket without ever polling it.
                let _socket = socket;
                std::future::pending::<()>().await
            })
            .into_response()
        }),
    );
    let (addr, task) = start(&keel, app).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    shutdown.trigger();
    task.await.unwrap().unwrap();
    // Hang guard only: once serve has returned, the connection must be closed.
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the WebSocket outlived serve: its connection was never closed");
    assert!(
        !matches!(end, Some(Ok(tungstenite::Message::Text(_)))),
        "{end:?}"
    );
}

/// `inbound.bulkhead.max_wait` lets a request wait for a slot instead of a 503 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_max_wait_is_honoured() {
    let (keel, shutdown) = build(
        "shed-wait",
        &[
            ("inbound.bulkhead.max_concurrent", "1"),
            ("inbound.bulkhead.min_limit", "1"),
            ("inbound.bulkhead.max_wait", "30s"),
        ],
    )
    .await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(tokio::sync::Notify::new());
    let (g2, e2) = (gate.clone(), entered.clone());
    let app = Router::new().route(
        "/slow",
        get(move || {
            let (g2, e2) = (g2.clone(), e2.clone());
            async move {
                e2.notify_one();
                g2.acquire().await.unwrap().forget();
                "done"
            }
        }),
    );
    let (addr, task) = start(&keel, app).await;
    let http = reqwest::Client::new();
    let first = tokio::spawn(http.get(format!("http://{addr}/slow")).send());
    entered.notified().await;
    let second = tokio::spawn(http.get(format!("http://{addr}/slow")).send());
    // Let the second arrive and wait (not an assertion: a slow arrival only passes it).
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.add_permits(2);
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(second.await.unwrap().unwrap().status(), 200);
    shutdown.trigger();
    task.await.unwrap().unwrap();
}

/// `key = "path"` keys by route: `/items/1` and `/items/2` share `/items/{id}`'s limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_key_is_the_route() {
    let (keel, shutdown) = build(
        "rl-route",
        &[
            ("inbound.rate_limit.enabled", "true"),
            ("inbound.rate_limit.rate", "0.001"),
            ("inbound.rate_limit.burst", "2"),
            ("inbound.rate_limit.key", "path"),
        ],
    )
    .await;
    let app = Router::new()
        .route("/items/{id}", get(|| async { "item" }))
        .route("/other", get(|| async { "other" }));
    let (addr, task) = start(&keel, app).await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut answers = Vec::new();
    for i in 0..4 {
        let r = http
            .get(format!("http://{addr}/items/{i}"))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        answers.push(r);
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
    // The current draft's fields (docs/CONFIG.md): 2 at once, refilled in 2,000 s.
    let field = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        field(&answers[0], "ratelimit-policy").as_deref(),
        Some("\"keel\";q=2;w=2000")
    );
    assert_eq!(
        field(&answers[0], "ratelimit").as_deref(),
        Some("\"keel\";r=1;t=1000")
    );
    let refused = &answers[2];
    assert_eq!(
        field(refused, "ratelimit").as_deref(),
        Some("\"keel\";r=0;t=2000")
    );
    assert_eq!(field(refused, "retry-after").as_deref(), Some("1000"));
    assert_eq!(
        field(refused, "ratelimit-limit"),
        None,
        "the old draft's field"
    );
    let r = http
        .get(format!("http://{addr}/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "another route has its own limit");
    shutdown.trigger();
    task.await.unwrap().unwrap();
}

/// A request with two `traceparent` fields is invalid (W3C Trace Context): it starts a new
/// trace rather than joining whichever came first; one field is joined, in any case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_traceparent_fields_start_a_new_trace() {
    let (keel, shutdown) = build("trace-twice", &[]).await;
    let app = Router::new().route(
        "/trace",
        get(|| async {
            keel::trace::TraceContext::current()
                .map(|c| c.trace_id_hex())
                .unwrap_or_default()
        }),
    );
    let (addr, task) = start(&keel, app).await;
    let http = reqwest::Client::new();
    const A: &str = "00-12345678901234567890123456789011-1234567890123456-01";
    const B: &str = "00-12345678901234567890123456789012-1234567890123456-01";
    let trace_of = |values: &'static [&'static str]| {
        let mut req = http.get(format!("http://{addr}/trace"));
        for v in values {
            req = req.header("traceparent", *v);
        }
        async move { req.send().await.unwrap().text().await.unwrap() }
    };
    assert_eq!(trace_of(&[A]).await, "12345678901234567890123456789011");
    let joined = trace_of(&[A, B]).await;
    assert_eq!(joined.len(), 32, "{joined}");
    assert!(
        !joined.starts_with("123456789012345678901234567890"),
        "joined a trace of the two: {joined}"
    );
    shutdown.trigger();
    task.await.unwrap().unwrap();
}

/// With `key = "path"`, requests that match no route share one limit: a flood of made-up paths
/// (each a 404) cannot fill the limiter's keys and push the real routes into the shared
/// overflow cell, where the flood would spend their allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_key_gives_unmatched_paths_one_limit() {
    let (keel, shutdown) = build(
        "rl-unmatched",
        &[
            ("inbound.rate_limit.enabled", "true"),
            ("inbound.rate_limit.rate", "0.001"),
            ("inbound.rate_limit.burst", "1"),
            ("inbound.rate_limit.key", "path"),
            ("inbound.rate_limit.max_keys", "4"),
        ],
    )
    .await;
    let app = Router::new().route("/items/{id}", get(|| async { "item" }));
    let (addr, task) = start(&keel, app).await;
    let http = reqwest::Client::new();
    let mut flood = Vec::new();
    for i in 0..10 {
        let r = http
            .get(format!("http://{addr}/made-up/{i}"))
            .send()
            .await
            .unwrap();
        flood.push(r.status().as_u16());
    }
    let r = http
        .get(format!("http://{addr}/items/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the real route kept its own limit");
    assert_eq!(flood[0], 404);
    assert!(flood[1..].iter().all(|s| *s == 429), "one limit: {flood:?}");
    shutdown.trigger();
    task.await.unwrap().unwrap();
}
