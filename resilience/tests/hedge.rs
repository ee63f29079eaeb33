//! Hedging against real HTTP backends on loopback: a tail of slow answers, cut by hedges.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use keel_core::{request::Attempt, Live};
use keel_resilience::{BoxError, HedgeConfig, HedgeLayer, RetryBudget, RetryConfig};
use keel_testkit::HttpBackend;
use tower::{service_fn, Layer, ServiceExt};

/// A stand-in for the balancer: every 10th first attempt goes to the slow instance (the tail);
/// hedges go to the fast one.
fn balancer(
    slow: std::net::SocketAddr,
    fast: std::net::SocketAddr,
) -> impl tower::Service<
    http::Request<()>,
    Response = http::Response<()>,
    Error = BoxError,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let client = reqwest::Client::new();
    let n = Arc::new(AtomicU64::new(0));
    service_fn(move |req: http::Request<()>| {
        let hedge = req.extensions().get::<Attempt>().is_some_and(|a| a.hedge);
        let i = n.fetch_add(1, Ordering::Relaxed);
        let addr = if !hedge && i % 10 == 0 { slow } else { fast };
        let client = client.clone();
        async move {
            let r = client.get(format!("http://{addr}/work")).send().await?;
            Ok::<_, BoxError>(
                http::Response::builder()
                    .status(r.status())
                    .body(())
                    .unwrap(),
            )
        }
    })
}

async fn p99<S>(svc: S) -> Duration
where
    S: tower::Service<http::Request<()>, Response = http::Response<()>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let mut all = Vec::new();
    for _ in 0..10 {
        let batch: Vec<_> = (0..10)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    let t = tokio::time::Instant::now();
                    let r = svc.oneshot(http::Request::new(())).await.unwrap();
                    assert_eq!(r.status(), 200);
                    t.elapsed()
                })
            })
            .collect();
        for t in batch {
            all.push(t.await.unwrap());
        }
    }
    all.sort();
    all[98]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_cuts_p99_and_cancels_the_loser() {
    let slow = HttpBackend::start("slow").await;
    let fast = HttpBackend::start("fast").await;
    slow.set_latency(Duration::from_millis(300));
    fast.set_latency(Duration::from_millis(2));

    let plain = p99(balancer(slow.addr, fast.addr)).await;

    let budget = Arc::new(RetryBudget::new(Live::new(RetryConfig::default())));
    let hedge = HedgeLayer::new(
        "svc",
        Live::new(HedgeConfig {
            enabled: true,
            delay: Duration::from_millis(30),
            percentile: None,
        }),
        Some(budget),
    );
    let hedged = p99(hedge.layer(balancer(slow.addr, fast.addr))).await;
    eprintln!("p99 without hedging {plain:?}, with {hedged:?}");
    assert!(plain >= Duration::from_millis(290), "{plain:?}");
    assert!(hedged * 2 < plain, "{hedged:?} is not well below {plain:?}");
    // The slow attempts that lost were cancelled on the server.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cancelled = slow.behaviour.cancelled.load(Ordering::Relaxed);
    assert!(cancelled >= 5, "cancelled {cancelled}");
}
