//! Slow replica: three real HTTP backends on loopback, one made 50 ms slower. Prints p50/p99 per
//! strategy and the share of requests the slow one got.
//!
//! `cargo bench -p keel-balance --bench slow_replica`

use std::time::{Duration, Instant};

use keel_balance::{Balance, BalanceConfig, Balancer, Strategy};
use keel_core::{Instance, Live, ServiceName};
use keel_testkit::HttpBackend;
use tower::{util::BoxCloneSyncService, ServiceExt};

type Client =
    BoxCloneSyncService<http::Request<String>, http::Response<reqwest::Body>, reqwest::Error>;

const REQUESTS: usize = 3_000;
const CONCURRENCY: usize = 16;

fn factory(i: &Instance) -> Client {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let addr = i.addr;
    Client::new(tower::service_fn(move |req: http::Request<String>| {
        let client = client.clone();
        async move {
            let url = format!("http://{addr}{}", req.uri().path());
            Ok(http::Response::from(client.get(url).send().await?))
        }
    }))
}

async fn run(strategy: Strategy, backends: &[HttpBackend]) -> (Duration, Duration, f64) {
    let svc = ServiceName::new("slow-replica").unwrap();
    let instances = backends
        .iter()
        .map(|b| Instance::new(svc.clone(), b.addr).with_id(b.name.as_str()))
        .collect();
    let cfg = BalanceConfig {
        strategy,
        ..BalanceConfig::default()
    };
    let balancer = Balancer::new(svc, Live::new(instances), Live::new(cfg)).unwrap();
    let service = Balance::new(balancer, factory);
    let slow_before = backends[0].served();
    let total_before: u64 = backends.iter().map(|b| b.served()).sum();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let per_task = REQUESTS / CONCURRENCY;
    for _ in 0..CONCURRENCY {
        let (service, tx) = (service.clone(), tx.clone());
        tokio::spawn(async move {
            for _ in 0..per_task {
                let req = http::Request::get("/work").body(String::new()).unwrap();
                let t = Instant::now();
                let res = service.clone().oneshot(req).await.unwrap();
                assert!(res.status().is_success());
                let _ = tx.send(t.elapsed());
            }
        });
    }
    drop(tx);
    let mut lat = Vec::with_capacity(REQUESTS);
    while let Some(l) = rx.recv().await {
        lat.push(l);
    }
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let slow = (backends[0].served() - slow_before) as f64;
    let total = (backends.iter().map(|b| b.served()).sum::<u64>() - total_before) as f64;
    (q(0.5), q(0.99), slow / total)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let backends = [
        HttpBackend::start("slow").await,
        HttpBackend::start("fast-1").await,
        HttpBackend::start("fast-2").await,
    ];
    backends[0].set_latency(Duration::from_millis(50));
    println!("slow replica: 3 backends on loopback, one +50 ms; {REQUESTS} requests, {CONCURRENCY} concurrent");
    println!(
        "{:<14} {:>10} {:>10} {:>10} {:>14}",
        "strategy", "p50 ms", "p99 ms", "slow %", "p99 / rr p99"
    );
    let mut rows = Vec::new();
    for s in [
        Strategy::RoundRobin,
        Strategy::P2cEwma,
        Strategy::LeastRequest,
        Strategy::Random,
    ] {
        rows.push((s, run(s, &backends).await));
    }
    let rr_p99 = rows[0].1 .1.as_secs_f64();
    for (s, (p50, p99, slow)) in rows {
        println!(
            "{:<14} {:>10.2} {:>10.2} {:>9.2}% {:>14.3}",
            s.as_str(),
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            slow * 100.0,
            p99.as_secs_f64() / rr_p99
        );
    }
}
