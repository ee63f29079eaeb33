//! Pick cost per strategy at N = 3, 16, 128, 1024, beside `tower::balance::p2c` in the same run;
//! Maglev lookup and rebuild.
//!
//! `cargo bench -p keel-balance --bench pick -- --warm-up-time 1 --measurement-time 2`

use std::{
    convert::Infallible,
    future::{ready, Future, Ready},
    hint::black_box,
    pin::pin,
    task::{Context, Poll},
    time::Duration,
};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use keel_balance::{hash_bytes, BalanceConfig, Balancer, Maglev, RequestInfo, Strategy};
use keel_core::{Instance, Live, ServiceName};
use tower::{
    balance::p2c,
    discover::ServiceList,
    load::{CompleteOnResponse, PeakEwmaDiscover},
    Service,
};

const SIZES: [usize; 4] = [3, 16, 128, 1024];

fn instances(n: usize) -> Vec<Instance> {
    let svc = ServiceName::new("bench").unwrap();
    (0..n)
        .map(|i| {
            let addr = format!("127.0.{}.{}:8080", i / 250, i % 250 + 1);
            Instance::new(svc.clone(), addr.parse().unwrap())
        })
        .collect()
}

fn balancer(n: usize, strategy: Strategy) -> Balancer {
    let cfg = BalanceConfig {
        strategy,
        ..BalanceConfig::default()
    };
    Balancer::new(
        ServiceName::new("bench").unwrap(),
        Live::new(instances(n)),
        Live::new(cfg),
    )
    .unwrap()
    .with_seed(7)
}

#[derive(Clone)]
struct Noop;

impl Service<()> for Noop {
    type Response = ();
    type Error = Infallible;
    type Future = Ready<Result<(), Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: ()) -> Self::Future {
        ready(Ok(()))
    }
}

fn picks(c: &mut Criterion) {
    let strategies = [
        Strategy::P2cEwma,
        Strategy::LeastRequest,
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::RingHash,
        Strategy::Maglev,
        Strategy::LeastConn,
    ];
    let mut g = c.benchmark_group("pick");
    for n in SIZES {
        for s in strategies {
            let b = balancer(n, s);
            let mut k = 0u64;
            // Warm the lazily built tables.
            drop(b.pick(&RequestInfo::default().with_hash_key(1)));
            g.bench_with_input(BenchmarkId::new(s.as_str(), n), &n, |bench, _| {
                bench.iter(|| {
                    k = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let p = b.pick(black_box(&RequestInfo::default().with_hash_key(k)));
                    black_box(p)
                })
            });
        }
        // tower's P2C over PeakEwma-wrapped services: poll_ready (picks) + call.
        let discover = PeakEwmaDiscover::new(
            ServiceList::new(vec![Noop; n]),
            Duration::from_millis(30),
            Duration::from_secs(10),
            CompleteOnResponse::default(),
        );
        let mut tower_p2c = p2c::Balance::new(discover);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let _ = tower_p2c.poll_ready(&mut cx);
        g.bench_with_input(
            BenchmarkId::new("tower-p2c-peak-ewma", n),
            &n,
            |bench, _| {
                bench.iter(|| {
                    let Poll::Ready(Ok(())) = tower_p2c.poll_ready(&mut cx) else {
                        panic!("tower p2c not ready")
                    };
                    let fut = pin!(tower_p2c.call(()));
                    black_box(fut.poll(&mut cx))
                })
            },
        );
    }
    g.finish();
}

fn maglev(c: &mut Criterion) {
    let names: Vec<String> = (0..100).map(|i| format!("bench-10.0.0.{i}:80")).collect();
    let members = || names.iter().map(|s| (s.as_str(), 1u32));
    let table = Maglev::build(members(), 65_537);
    let keys: Vec<u64> = (0..1024u64)
        .map(|k| hash_bytes(&k.to_le_bytes(), 0))
        .collect();
    let mut i = 0usize;
    c.bench_function("maglev/lookup-prehashed", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(table.lookup(black_box(keys[i])))
        })
    });
    c.bench_function("maglev/rebuild-m65537-n100", |b| {
        b.iter(|| black_box(Maglev::build(members(), 65_537)))
    });
    // Skewed weights: one member at the largest weight (1e6), the rest at 1. The build must cost
    // the same as with uniform weights, not M × N.
    let mut g = c.benchmark_group("maglev-rebuild-skew");
    g.sample_size(10);
    for (n, m) in [(2_000usize, 65_537u32), (400, 5_000_011)] {
        let names: Vec<String> = (0..n)
            .map(|i| format!("bench-10.0.{}.{}:80", i / 256, i % 256))
            .collect();
        for skewed in [false, true] {
            let members = || {
                names.iter().enumerate().map(move |(i, s)| {
                    (s.as_str(), if skewed && i == 0 { 1_000_000u32 } else { 1 })
                })
            };
            let id = format!("m{m}-n{n}-{}", if skewed { "skewed" } else { "uniform" });
            g.bench_function(id, |b| b.iter(|| black_box(Maglev::build(members(), m))));
        }
    }
    g.finish();
}

criterion_group!(benches, picks, maglev);
criterion_main!(benches);
