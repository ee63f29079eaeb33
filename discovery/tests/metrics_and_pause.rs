//! A Redis that stops answering (SIGSTOP): the last known set is served, staleness is exported,
//! and everything resumes when it answers again. Runs in its own test binary because it installs
//! a global metrics recorder.

mod common;

use std::time::Duration;

use common::*;
use keel_core::Shutdown;
use keel_discovery::{telemetry, Backend, Discover, DiscoveryConfig, RedisDiscovery, Registry};
use keel_testkit::RedisServer;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[tokio::test]
async fn a_frozen_redis_keeps_the_last_set_and_reports_staleness() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
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
    let stale = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find_map(|(k, _, _, v)| {
            let key = k.key();
            let ours = key.name() == telemetry::STALENESS_SECONDS
                && key
                    .labels()
                    .any(|l| l.key() == "service" && l.value() == "frozen");
            match v {
                DebugValue::Gauge(g) if ours => Some(g.into_inner()),
                _ => None,
            }
        })
        .expect("staleness gauge exported");
    assert!(stale > 1.0, "staleness grows while frozen: {stale}");

    server.resume();
    let _c = d.register(inst(&s, 9803)).await.unwrap();
    wait_len(&w, 3, Duration::from_secs(10)).await;
    let held_or_applied = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .any(|(k, _, _, v)| {
            k.key().name() == telemetry::UPDATES_TOTAL
                && matches!(v, DebugValue::Counter(n) if n > 0)
        });
    assert!(held_or_applied);
}
