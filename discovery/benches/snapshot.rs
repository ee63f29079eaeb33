//! Snapshot rebuild for 10,000 instances of one service, the diff that tower's adapter computes,
//! and the memory a 10,000-instance set takes.
//!
//! `cargo bench -p keel-discovery --bench snapshot`

use std::{hint::black_box, time::Duration};

use criterion::{criterion_group, Criterion};
use keel_core::{Instance, ServiceName};
use keel_discovery::{diff, MemoryDiscovery};

fn fleet(n: usize, gen: u32) -> Vec<Instance> {
    fleet_with(n, gen, true)
}

fn fleet_with(n: usize, gen: u32, tagged: bool) -> Vec<Instance> {
    let svc = ServiceName::new("payments").unwrap();
    (0..n)
        .map(|i| {
            let ip = format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256);
            let i2 = Instance::new(svc.clone(), ip.parse().unwrap())
                .with_weight(1 + (i as u32 + gen) % 10)
                .with_zone(format!("eu-1{}", ["a", "b", "c"][i % 3]))
                .with_version("2.1.0");
            if tagged {
                i2.with_tag("pool", "main")
            } else {
                i2
            }
        })
        .rev() // arrive unsorted, as backends deliver them
        .collect()
}

fn bench(c: &mut Criterion) {
    let svc = ServiceName::new("payments").unwrap();
    let d = MemoryDiscovery::new();
    let a = fleet(10_000, 0);
    let b = fleet(10_000, 1);
    let mut g = c.benchmark_group("snapshot");
    g.measurement_time(Duration::from_secs(5));
    let mut flip = false;
    g.bench_function("rebuild_10k (sort, compare, publish)", |bench| {
        bench.iter_batched(
            || {
                flip = !flip;
                if flip {
                    a.clone()
                } else {
                    b.clone()
                }
            },
            |set| black_box(d.replace(&svc, set)),
            criterion::BatchSize::LargeInput,
        )
    });
    let mut sa = a.clone();
    sa.sort_by(|x, y| x.id.cmp(&y.id));
    let mut sb = sa.clone();
    sb[5_000].weight += 1;
    g.bench_function("diff_10k_one_change", |bench| {
        bench.iter(|| black_box(diff(&sa, &sb)))
    });
    g.bench_function("load_10k (reader hot path)", |bench| {
        let w = keel_discovery::Discover::watch(&d, &svc).unwrap();
        bench.iter(|| black_box(w.live().load().len()))
    });
    g.finish();
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<usize>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

fn memory() {
    const COPIES: usize = 20;
    let mut keep = Vec::new(); // keep every set alive, so freed memory is not reused and hidden
    for tagged in [false, true] {
        let before = rss_bytes();
        let sets: Vec<Vec<Instance>> = (0..COPIES)
            .map(|g| fleet_with(10_000, g as u32, tagged))
            .collect();
        let after = rss_bytes();
        black_box(&sets);
        println!(
            "memory ({}): {:.2} MiB per 10,000 instances (RSS growth over {COPIES} sets; Instance is {} bytes inline)",
            if tagged { "id, zone, version, one tag" } else { "id, zone, version, no tags" },
            (after.saturating_sub(before)) as f64 / COPIES as f64 / (1024.0 * 1024.0),
            std::mem::size_of::<Instance>()
        );
        keep.push(sets);
    }
}

/// Nanoseconds this thread has been on a CPU (`/proc/thread-self/schedstat`): unlike wall time it
/// does not grow while other work on a busy machine holds the cores.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn rebuild_cpu_time() {
    let svc = ServiceName::new("payments").unwrap();
    let d = MemoryDiscovery::new();
    let inputs: Vec<Vec<Instance>> = (0..2).map(|g| fleet(10_000, g)).collect();
    const ROUNDS: usize = 200;
    let mut total = 0u64;
    let mut worst = 0u64;
    for r in 0..ROUNDS {
        let set = inputs[r % 2].clone();
        let t = thread_cpu_ns();
        black_box(d.replace(&svc, set));
        let dt = thread_cpu_ns() - t;
        total += dt;
        worst = worst.max(dt);
    }
    println!(
        "rebuild_10k on-CPU time of the publishing thread: mean {:.2} ms, max {:.2} ms over {ROUNDS} rounds",
        total as f64 / ROUNDS as f64 / 1e6,
        worst as f64 / 1e6
    );
}

criterion_group!(benches, bench);

fn main() {
    memory();
    rebuild_cpu_time();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
