//! Retry storm: a backend with capacity C (one worker, 1 ms per request) is offered 2C requests
//! per second. It queues at most 50 requests and refuses the rest with 503 at once; a refusal
//! still costs the worker 5% of a request (accept, parse, refuse), so refused retries eat into
//! the capacity left for real work. Naive retries (3 retries, no budget) against the budgeted
//! retry layer (20% of requests + 10/s, at most 20% of calls in flight retrying).
//!
//! Simulated with `tokio::time::pause`, through the real `Retry` layer:
//! `cargo bench -p keel-resilience --bench retry_storm`

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use keel_core::{Live, Ratio};
use keel_resilience::{BoxError, RetryConfig, RetryLayer};
use tower::{service_fn, Layer, Service};

const CAPACITY: f64 = 1000.0; // requests per second: 1 ms of work each
const QUEUE: u64 = 50;
const REFUSAL_COST: f64 = 0.05;
const SECONDS: u64 = 20;

struct Backend {
    busy_until: tokio::time::Instant,
    queued: u64,
}

struct Result_ {
    requests: u64,
    attempts: u64,
    ok: u64,
}

async fn simulate(cfg: RetryConfig) -> Result_ {
    let backend = Arc::new(Mutex::new(Backend {
        busy_until: tokio::time::Instant::now(),
        queued: 0,
    }));
    let attempts = Arc::new(AtomicU64::new(0));
    let work = Duration::from_secs_f64(1.0 / CAPACITY);
    let (b, a) = (backend.clone(), attempts.clone());
    let inner = service_fn(move |_req: http::Request<()>| {
        a.fetch_add(1, Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        let mut g = b.lock().unwrap();
        let start = g.busy_until.max(now);
        let done = if g.queued >= QUEUE {
            g.busy_until = start + work.mul_f64(REFUSAL_COST);
            None
        } else {
            g.queued += 1;
            g.busy_until = start + work;
            Some(g.busy_until)
        };
        drop(g);
        let b = b.clone();
        async move {
            let mut r = http::Response::new(());
            match done {
                None => *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE,
                Some(t) => {
                    tokio::time::sleep_until(t).await;
                    b.lock().unwrap().queued -= 1;
                }
            }
            Ok::<_, BoxError>(r)
        }
    });
    let svc = RetryLayer::with_seed("storm", Live::new(cfg), 42).layer(inner);
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let offered = 2.0 * CAPACITY;
    // tokio's timer has millisecond resolution: arrivals come in per-millisecond batches.
    let per_ms = (offered / 1000.0) as u64;
    let n = per_ms * 1000 * SECONDS;
    for i in 0..n {
        let ok = ok.clone();
        // Retry's future is a boxed `Send` future; the service is always ready.
        let fut = svc.clone().call(http::Request::new(()));
        tasks.push(tokio::spawn(async move {
            let r = fut.await.unwrap();
            if r.status() == 200 {
                ok.fetch_add(1, Ordering::Relaxed);
            }
        }));
        if (i + 1) % per_ms == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    Result_ {
        requests: n,
        attempts: attempts.load(Ordering::Relaxed),
        ok: ok.load(Ordering::Relaxed),
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let base = RetryConfig {
        max_attempts: 4,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
        ..Default::default()
    };
    let naive = RetryConfig {
        budget_ratio: Ratio::ONE,
        min_per_second: u32::MAX,
        concurrent_ratio: Ratio::ONE,
        concurrent_min: u32::MAX,
        ..base.clone()
    };
    let none = RetryConfig {
        max_attempts: 1,
        ..base.clone()
    };
    println!(
        "capacity {CAPACITY}/s, offered {}/s, {SECONDS} s simulated, refusal costs {REFUSAL_COST} of a request",
        2.0 * CAPACITY
    );
    println!(
        "{:<28} {:>9} {:>9} {:>13} {:>10}",
        "policy", "requests", "attempts", "amplification", "goodput"
    );
    for (name, cfg) in [
        ("no retries", none),
        ("naive 3 retries", naive),
        ("budget 20% + 10/s", base),
    ] {
        let r = rt.block_on(simulate(cfg));
        let goodput = r.ok as f64 / (CAPACITY * SECONDS as f64);
        println!(
            "{:<28} {:>9} {:>9} {:>13.3} {:>10.3}",
            name,
            r.requests,
            r.attempts,
            r.attempts as f64 / r.requests as f64,
            goodput
        );
    }
}
