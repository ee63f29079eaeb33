//! What a keel client costs per call next to a bare `reqwest` client: the same backend on
//! loopback, the same runtime, the two alternating round by round.
//!
//! The keel client runs its whole path: request building, trace context, the balancer
//! (`p2c-ewma` over one static endpoint), the resilience stack (total deadline, retry budget,
//! breaker, bulkhead, per-try timeout, metrics into a Prometheus recorder), the deadline header,
//! and a buffered body. The bare client sends the same GET to the same address.
//!
//! `cargo bench --bench client_overhead`; `KEEL_BENCH_SECS` (default 2) per run,
//! `KEEL_BENCH_ROUNDS` (default 5) rounds, medians reported. For a profile of one side,
//! `KEEL_BENCH_ONLY=keel` (or `reqwest`) runs that client alone, c=32, for the whole time.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use keel::{keel_core::Shutdown, Keel};
use keel_testkit::HttpBackend;
use support::{cpu_seconds, env, runtime};

const CONCURRENCY: usize = 32;

/// One call: a GET of `/x`, its body read. Returns whether it succeeded.
type Call = Arc<dyn Fn() -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

/// Sequential calls for `secs`: (calls per second, p50 µs, p99 µs).
async fn sequential(call: &Call, secs: f64) -> (f64, f64, f64) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut lat = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        assert!(call().await, "a call failed");
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    (
        rate,
        lat[lat.len() / 2],
        lat[(lat.len() * 99 / 100).min(lat.len() - 1)],
    )
}

/// `CONCURRENCY` callers for `secs`: (calls per second, CPU µs per call, client and backend
/// together, requests the backend served per call).
async fn concurrent(call: &Call, secs: f64, backend: &HttpBackend) -> (f64, f64, f64) {
    let served = backend.served();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let cpu = cpu_seconds();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < end {
                    assert!(call().await, "a call failed");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    let cpu = cpu_seconds() - cpu;
    (
        n as f64 / start.elapsed().as_secs_f64(),
        cpu / n.max(1) as f64 * 1e6,
        (backend.served() - served) as f64 / n.max(1) as f64,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let secs = env("KEEL_BENCH_SECS", 2) as f64;
    let rounds = env("KEEL_BENCH_ROUNDS", 5) as usize;
    runtime().block_on(async move {
        let backend = HttpBackend::start("b").await;
        let dir = std::env::temp_dir().join(format!("keel-client-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keel.toml");
        std::fs::write(
            &path,
            format!("[[clients.b.endpoints]]\naddr = \"{}\"\n", backend.addr),
        )
        .unwrap();
        let keel = Keel::builder("bench")
            .config_file(&path)
            .shutdown(Shutdown::new())
            .build()
            .await
            .unwrap();
        let client = keel.client("b").unwrap();
        let keel_call: Call = Arc::new(move || {
            let client = client.clone();
            Box::pin(async move {
                match client.get("/x").send().await {
                    Ok(r) => r.status() == 200,
                    Err(_) => false,
                }
            })
        });
        let raw = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .unwrap();
        let url = format!("http://{}/x", backend.addr);
        let raw_call: Call = Arc::new(move || {
            let raw = raw.clone();
            let url = url.clone();
            Box::pin(async move {
                match raw.get(&url).send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                }
            })
        });
        // Warm both: connections, tables, caches.
        sequential(&raw_call, 0.3).await;
        sequential(&keel_call, 0.3).await;
        if let Ok(only) = std::env::var("KEEL_BENCH_ONLY") {
            let call = if only == "keel" { &keel_call } else { &raw_call };
            let (rate, cpu, _) = concurrent(call, secs * rounds as f64, &backend).await;
            println!("client_overhead: {only} alone, c={CONCURRENCY}: {rate:.0} calls/s, {cpu:.1} us CPU per call");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        println!(
            "client_overhead: {rounds} alternating rounds, {secs}s per run, c=1 and c={CONCURRENCY}, one backend on 127.0.0.1"
        );
        let (mut seq_raw, mut seq_keel, mut con_raw, mut con_keel) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut ratio_seq, mut ratio_con) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let a = sequential(&raw_call, secs).await;
            let b = sequential(&keel_call, secs).await;
            let c = concurrent(&raw_call, secs, &backend).await;
            let d = concurrent(&keel_call, secs, &backend).await;
            ratio_seq.push(b.0 / a.0);
            ratio_con.push(d.0 / c.0);
            seq_raw.push(a);
            seq_keel.push(b);
            con_raw.push(c);
            con_keel.push(d);
        }
        let show = |name: &str, v: &[(f64, f64, f64)], con: &[(f64, f64, f64)]| {
            println!(
                "  {name:<8} c=1: {:>7.0} calls/s, p50 {:>5.0} us, p99 {:>6.0} us;  c={CONCURRENCY}: {:>7.0} calls/s, {:>5.1} us CPU per call, {:.3} requests served per call",
                median(v.iter().map(|x| x.0).collect()),
                median(v.iter().map(|x| x.1).collect()),
                median(v.iter().map(|x| x.2).collect()),
                median(con.iter().map(|x| x.0).collect()),
                median(con.iter().map(|x| x.1).collect()),
                median(con.iter().map(|x| x.2).collect()),
            );
        };
        show("reqwest", &seq_raw, &con_raw);
        show("keel", &seq_keel, &con_keel);
        let p50 = |v: &[(f64, f64, f64)]| median(v.iter().map(|x| x.1).collect());
        println!(
            "  keel / reqwest throughput, median of per-round ratios: c=1 {:.2}, c={CONCURRENCY} {:.2}; added p50 at c=1: {:.0} us",
            median(ratio_seq),
            median(ratio_con),
            p50(&seq_keel) - p50(&seq_raw)
        );
        let _ = std::fs::remove_dir_all(&dir);
    });
}
