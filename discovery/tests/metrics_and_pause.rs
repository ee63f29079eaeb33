//! A Redis that stops answering (SIGSTOP): the last known set is served, staleness is exported,
//! and everything resumes when it answers again. Runs in its own test binary because it installs
//! a global metrics recorder.
#![cfg(all(feature = "redis", feature = "etcd"))]

mod common;

use std::time::Duration;

use common::*;
use keel_core::Shutdown;
use keel_discovery::{telemetry, Backend, Discover, DiscoveryConfig, RedisDiscovery, Registry};
use keel_testkit::RedisServer;
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};

/// A recorder that keeps the last value of every counter and gauge, keyed `name{k=v,...}`.
#[derive(Clone, Default)]
struct Memory(Arc<Mutex<HashMap<String, Arc<Cell>>>>);

#[derive(Default)]
struct Cell(AtomicU64);

impl CounterFn for Cell {
    fn increment(&self, v: u64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    fn absolute(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, v: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::Relaxed)) + v);
    }
    fn decrement(&self, v: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::Relaxed)) - v);
    }
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
}

impl Memory {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.0.lock().unwrap().entry(name).or_default().clone()
    }
    fn raw(&self, name: &str) -> Option<u64> {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map(|c| c.0.load(Ordering::Relaxed))
    }
}

impl Recorder for Memory {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test]
async fn a_frozen_redis_keeps_the_last_set_and_reports_staleness() {
    let recorder = Memory::default();
    metrics::set_global_recorder(recorder.clone()).unwrap();
    telemetry::describe();

    let server = RedisServer::start();
    let cfg = DiscoveryConfig {
        backend: Backend::Redis,
        url: Some(server.url()),
        ttl: Duration::from_secs(6), // long enough that nothing expires while frozen
        ..Default::default()
    };
    let d = RedisDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let s = svc("frozen");
    let w = d.watch(&s).unwrap();
    let _a = d.register(inst(&s, 9801)).await.unwrap();
    let _b = d.register(inst(&s, 9802)).await.unwrap();
    wait_len(&w, 2, Duration::from_secs(10)).await;

    server.pause();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        w.snapshot().len(),
        2,
        "the last known set is served while frozen"
    );
    let stale = recorder
        .raw(&format!(
            "{}{{service=frozen}}",
            telemetry::STALENESS_SECONDS
        ))
        .map(f64::from_bits)
        .expect("staleness gauge exported");
    assert!(stale > 1.0, "staleness grows while frozen: {stale}");

    server.resume();
    let _c = d.register(inst(&s, 9803)).await.unwrap();
    wait_len(&w, 3, Duration::from_secs(10)).await;
    let applied = recorder
        .raw(&format!(
            "{}{{service=frozen,outcome=applied}}",
            telemetry::UPDATES_TOTAL
        ))
        .unwrap_or(0);
    // Registrations may arrive in one batch: at least one update before the freeze, one after.
    assert!(applied >= 2, "applied updates counted: {applied}");
}
