//! Change propagation: `register()` called → the instance visible in a watcher's `Live` set, in
//! another discovery handle (as another process would be). Redis: the machine's server on 6379
//! (or `KEEL_TEST_REDIS_URL`); etcd: a private `etcd` on free ports.
//!
//! `cargo bench -p keel-discovery --bench propagation`

use std::time::{Duration, Instant};

use keel_core::{Instance, ServiceName, Shutdown};
use keel_discovery::{Backend, Discovery, DiscoveryConfig, EtcdDiscovery, RedisDiscovery};

const N: usize = 300;

async fn measure(name: &str, registry: &dyn Discovery, watcher: &dyn Discovery) {
    let svc = ServiceName::new("bench").unwrap();
    let w = watcher.watch(&svc).unwrap();
    w.ready().await;
    let mut samples = Vec::with_capacity(N);
    let mut regs = Vec::with_capacity(N);
    for i in 0..N {
        let inst = Instance::new(
            svc.clone(),
            format!("127.0.0.1:{}", 20_000 + i).parse().unwrap(),
        );
        let id = inst.id.clone();
        let mut rx = w.live().subscribe();
        let start = Instant::now();
        regs.push(registry.register(inst).await.unwrap());
        loop {
            if w.live().load().iter().any(|x| x.id == id) {
                break;
            }
            tokio::time::timeout(Duration::from_secs(5), rx.changed())
                .await
                .expect("visible within 5s")
                .unwrap();
        }
        samples.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "{name}: register -> visible at a watcher, n={N}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3
    );
    for r in regs {
        let _ = r.deregister().await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` / `--list`: nothing to run as a test
    }
    let prefix = keel_testkit::unique_prefix("bench");
    let cfg = DiscoveryConfig {
        backend: Backend::Redis,
        url: Some(keel_testkit::shared_redis_url()),
        prefix: prefix.trim_end_matches(':').to_owned(),
        ttl: Duration::from_secs(10),
        ..Default::default()
    };
    let a = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let b = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    measure("redis", &a, &b).await;

    let etcd = keel_testkit::EtcdServer::start();
    let cfg = DiscoveryConfig {
        backend: Backend::Etcd,
        url: Some(etcd.endpoint()),
        ttl: Duration::from_secs(10),
        ..Default::default()
    };
    let a = EtcdDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let b = EtcdDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    measure("etcd", &a, &b).await;
}
