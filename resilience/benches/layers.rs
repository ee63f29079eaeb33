//! Per-layer and whole-stack overhead on a no-op service, side by side with tower-resilience's
//! circuit breaker (also interleaved, round by round, as a ratio), plus allocations per call
//! (counted with dhat after the timings).
//!
//! `cargo bench -p keel-resilience --bench layers -- --warm-up-time 1 --measurement-time 2`

use std::{convert::Infallible, future::Future, hint::black_box, time::Duration};

use criterion::{BenchmarkId, Criterion};
use keel_core::Live;
use keel_resilience::{
    BreakerConfig, BulkheadConfig, BulkheadLayer, CircuitBreakerLayer, ClientStackLayer,
    DeadlineLayer, RateLimitConfig, RateLimitLayer, ResilienceConfig, RetryConfig, RetryLayer,
    TimeoutConfig, TimeoutLayer,
};
use tower::{Layer, Service, ServiceExt};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn noop() -> impl Service<
    http::Request<()>,
    Response = http::Response<()>,
    Error = Infallible,
    Future = std::future::Ready<Result<http::Response<()>, Infallible>>,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|_req: http::Request<()>| std::future::ready(Ok(http::Response::new(()))))
}

fn config() -> ResilienceConfig {
    ResilienceConfig {
        rate_limit: RateLimitConfig {
            enabled: true,
            rate: 1e9,
            burst: 1_000_000,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Runs `iters` calls inside one task, so the figure is the layer's cost, not block_on's.
fn run<S, F>(rt: &tokio::runtime::Runtime, svc: S, iters: u64) -> Duration
where
    S: Service<http::Request<()>, Future = F> + Clone,
    F: Future<Output = Result<S::Response, S::Error>>,
    S::Error: std::fmt::Debug,
{
    run_with(rt, svc, iters, || http::Request::new(()))
}

/// A request shaped as a client builds it: a few headers and an extension already present.
fn client_request() -> http::Request<()> {
    let mut r = http::Request::get("http://payments/charge")
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "keel")
        .body(())
        .unwrap();
    r.extensions_mut().insert(7u32);
    r
}

/// A client-shaped POST without an `Idempotency-Key`.
fn client_post() -> http::Request<()> {
    let mut r = client_request();
    *r.method_mut() = http::Method::POST;
    r
}

fn run_with<S, F>(
    rt: &tokio::runtime::Runtime,
    svc: S,
    iters: u64,
    make: fn() -> http::Request<()>,
) -> Duration
where
    S: Service<http::Request<()>, Future = F> + Clone,
    F: Future<Output = Result<S::Response, S::Error>>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async move {
        let mut svc = svc;
        let start = tokio::time::Instant::now();
        let cpu = on_cpu();
        for _ in 0..iters {
            let s = svc.ready().await.unwrap();
            let r = s.call(make()).await.unwrap();
            black_box(r);
        }
        match (cpu, on_cpu()) {
            // This thread's time on a CPU: the checkout is shared with other builds on 2 cores,
            // and wall-clock time would count their turns too.
            (Some(a), Some(b)) if std::env::var_os("KEEL_BENCH_WALL").is_none() => {
                Duration::from_nanos(b.saturating_sub(a))
            }
            _ => start.elapsed(),
        }
    })
}

/// Nanoseconds this thread has spent on a CPU (Linux `schedstat`), if readable.
fn on_cpu() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

macro_rules! layers {
    ($rt:expr, $f:ident) => {{
        let rt = $rt;
        let t = Live::new(TimeoutConfig::default());
        $f!("noop", noop());
        $f!("deadline", DeadlineLayer::new(t.clone()).layer(noop()));
        $f!(
            "per_try_timeout",
            TimeoutLayer::new(t.clone()).layer(noop())
        );
        $f!(
            "retry",
            RetryLayer::new("b", Live::new(RetryConfig::default())).layer(noop())
        );
        $f!(
            "breaker",
            CircuitBreakerLayer::new("b", Live::new(BreakerConfig::default())).layer(noop())
        );
        $f!(
            "tower_resilience_breaker",
            tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
                .failure_rate_threshold(0.5)
                .sliding_window_size(100)
                .build()
                .unwrap()
                .layer(noop())
        );
        $f!(
            "gcra",
            RateLimitLayer::new("b", Live::new(config().rate_limit)).layer(noop())
        );
        $f!(
            "bulkhead",
            BulkheadLayer::new("b", Live::new(BulkheadConfig::default())).layer(noop())
        );
        $f!(
            "whole_stack",
            ClientStackLayer::new("b", Live::new(config())).layer(noop())
        );
        let _ = rt;
    }};
}

fn main() {
    // A real recorder, so metric updates cost what they cost in production.
    let _ = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = Criterion::default().configure_from_args();
    {
        let mut g = c.benchmark_group("success_path");
        macro_rules! time {
            ($name:expr, $svc:expr) => {{
                let svc = $svc;
                g.bench_function(BenchmarkId::from_parameter($name), |b| {
                    b.iter_custom(|iters| run(&rt, svc.clone(), iters))
                });
            }};
        }
        layers!(&rt, time);
        g.finish();
    }
    c.final_summary();

    // The comparison the target is about, interleaved: criterion measures one function after
    // another, and on a shared 2-core machine the neighbours' load drifts between them. Here
    // rounds of the whole stack and of tower-resilience's breaker alternate, and the ratio of
    // each pair is kept; the median of those ratios is the figure.
    {
        let stack = ClientStackLayer::new("b", Live::new(config())).layer(noop());
        let theirs = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
            .failure_rate_threshold(0.5)
            .sliding_window_size(100)
            .build()
            .unwrap()
            .layer(noop());
        const ROUNDS: usize = 60;
        const CALLS: u64 = 20_000;
        // Wall-clock time per round (a round is too short for the on-CPU counter's resolution);
        // the alternation is what keeps the neighbours' load out of the ratio.
        let wall = |f: &dyn Fn()| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_nanos() as f64 / CALLS as f64
        };
        run(&rt, stack.clone(), CALLS);
        run(&rt, theirs.clone(), CALLS);
        let (mut ratios, mut ours_ns, mut theirs_ns) = (vec![], vec![], vec![]);
        for _ in 0..ROUNDS {
            let a = wall(&|| {
                run(&rt, stack.clone(), CALLS);
            });
            let b = wall(&|| {
                run(&rt, theirs.clone(), CALLS);
            });
            ratios.push(a / b);
            ours_ns.push(a);
            theirs_ns.push(b);
        }
        for v in [&mut ratios, &mut ours_ns, &mut theirs_ns] {
            v.sort_by(f64::total_cmp);
        }
        println!(
            "interleaved whole_stack / tower_resilience_breaker: median {:.3} (p10 {:.3}, p90 {:.3}) over {ROUNDS} rounds of {CALLS} calls; medians {:.0} ns vs {:.0} ns",
            ratios[ROUNDS / 2],
            ratios[ROUNDS / 10],
            ratios[ROUNDS * 9 / 10],
            ours_ns[ROUNDS / 2],
            theirs_ns[ROUNDS / 2],
        );
    }

    // Allocations per call, counted after the timings (dhat's counting is not free).
    let _profiler = dhat::Profiler::builder().testing().build();
    const N: u64 = 10_000;
    macro_rules! allocs {
        ($name:expr, $svc:expr) => {{
            let svc = $svc;
            run(&rt, svc.clone(), 100);
            let before = dhat::HeapStats::get().total_blocks;
            run(&rt, svc, N);
            let after = dhat::HeapStats::get().total_blocks;
            println!(
                "allocations/call {:<26} {:.2}",
                $name,
                (after - before) as f64 / N as f64
            );
        }};
    }
    layers!(&rt, allocs);

    // The same, with requests shaped as a client builds them (their own allocations subtracted).
    let count = |svc: &dyn Fn(u64) -> Duration| {
        svc(100);
        let before = dhat::HeapStats::get().total_blocks;
        svc(N);
        (dhat::HeapStats::get().total_blocks - before) as f64 / N as f64
    };
    let base = count(&|n| run_with(&rt, noop(), n, client_request));
    let stack = ClientStackLayer::new("b", Live::new(config())).layer(noop());
    let with = count(&|n| run_with(&rt, stack.clone(), n, client_request));
    println!(
        "allocations/call whole_stack, client-shaped request {:.2}",
        with - base
    );
    // The same POST without an Idempotency-Key: never retried, so no copy is kept.
    let base = count(&|n| run_with(&rt, noop(), n, client_post));
    let with = count(&|n| run_with(&rt, stack.clone(), n, client_post));
    println!(
        "allocations/call whole_stack, client-shaped POST (not retryable) {:.2}",
        with - base
    );
}
