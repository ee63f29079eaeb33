//! Calls through the whole client stack, for instruction counts and profiles.
//!
//! Instructions are what a shared, noisy machine cannot blur: run it under callgrind twice, with
//! 0 and with N calls, and divide the difference by N (1,000 warm-up calls run either way):
//!
//! ```sh
//! cargo build --release -p keel-resilience --example stack_calls
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/stack_calls 0
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/stack_calls 100000
//! ```
//!
//! `noop` as a second argument calls the no-op service directly (the loop's own cost). The
//! stack is the one `cargo bench --bench layers` measures as `whole_stack`: the default policy,
//! a local GCRA, a Prometheus recorder installed.

use std::convert::Infallible;

use keel_core::Live;
use keel_resilience::{ClientStackLayer, RateLimitConfig, ResilienceConfig};
use tower::{Layer, Service, ServiceExt};

async fn calls<S>(mut svc: S, n: u64) -> Result<(), S::Error>
where
    S: Service<http::Request<()>>,
{
    for _ in 0..n {
        let ready = svc.ready().await?;
        let response = ready.call(http::Request::new(())).await?;
        std::hint::black_box(response);
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(Ok(100_000), |v| v.parse())?;
    let noop_only = args.next().as_deref() == Some("noop");
    let _ = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let noop = tower::service_fn(|_req: http::Request<()>| {
        std::future::ready(Ok::<_, Infallible>(http::Response::new(())))
    });
    if noop_only {
        rt.block_on(calls(noop, 1_000 + n))?;
        return Ok(());
    }
    let config = ResilienceConfig {
        rate_limit: RateLimitConfig {
            enabled: true,
            rate: 1e9,
            burst: 1_000_000,
            ..Default::default()
        },
        ..Default::default()
    };
    let stack = ClientStackLayer::new("b", Live::new(config)).layer(noop);
    rt.block_on(calls(stack, 1_000 + n))?;
    Ok(())
}
