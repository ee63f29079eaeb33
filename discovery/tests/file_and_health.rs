//! The file backend on a real file replaced the way editors do, active health checks against a
//! real HTTP backend that flips its health endpoint, and `from_config`.

mod common;

use std::time::Duration;

use common::*;
use keel_core::{HealthSource, HealthStatus, Shutdown};
use keel_discovery::{
    from_config, watch_with_health, Backend, CheckKind, Discover, DiscoveryConfig, FileDiscovery,
    HealthCheckConfig, HealthChecker, MemoryDiscovery, Registry, StaticEndpoint,
};
use keel_testkit::HttpBackend;

const LIMIT: Duration = Duration::from_secs(10);

fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn file_changes_are_picked_up_and_a_broken_file_keeps_the_last_good_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.toml");
    replace(&path, "[[payments]]\naddr = \"127.0.0.1:8001\"\n[[payments]]\naddr = \"127.0.0.1:8002\"\nweight = 5\n");
    let shutdown = Shutdown::new();
    let d = FileDiscovery::start(&path, shutdown.clone()).unwrap();
    let w = d.watch(&svc("payments")).unwrap();
    wait_len(&w, 2, LIMIT).await;

    replace(&path, "[[payments]]\naddr = \"127.0.0.1:8001\"\n[[payments]]\naddr = \"127.0.0.1:8002\"\n[[payments]]\naddr = \"127.0.0.1:8003\"\nbackup = true\n[[payments]]\naddr = \"oops\"\n");
    wait_len(&w, 3, LIMIT).await;

    // Half-written: unparsable. Nothing changes.
    replace(&path, "[[payments]\naddr = ");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ports(&w), vec![8001, 8002, 8003]);
    shutdown.trigger();
}

#[tokio::test]
async fn active_http_checks_take_a_real_backend_down_and_bring_it_back() {
    let good = HttpBackend::start("good").await;
    let flaky = HttpBackend::start("flaky").await;
    let registry = MemoryDiscovery::new();
    let s = svc("catalog");
    let _g = registry
        .register(keel_core::Instance::new(s.clone(), good.addr))
        .await
        .unwrap();
    let f = keel_core::Instance::new(s.clone(), flaky.addr);
    let flaky_id = f.id.clone();
    let _f = registry.register(f).await.unwrap();
    let config = HealthCheckConfig {
        enabled: true,
        kind: CheckKind::Http,
        path: "/health".into(),
        interval: Duration::from_millis(100),
        fastinter: Some(Duration::from_millis(50)),
        timeout: Duration::from_millis(500),
        fall: 3,
        rise: 2,
        ..Default::default()
    };
    let checker = HealthChecker::spawn(registry.watch(&s).unwrap(), config, Shutdown::new());
    let health = checker.health();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(health.load().is_empty());

    flaky.set_healthy(false);
    let h = health.clone();
    let id = flaky_id.clone();
    eventually(LIMIT, "flaky down", move || {
        let m = h.get();
        let id = id.clone();
        async move { m.get(&id).is_some_and(|x| x.status == HealthStatus::Down) }
    })
    .await;
    let m = health.get();
    let down = &m[&flaky_id];
    assert_eq!(down.source, HealthSource::Active);
    assert!(down.reason.as_deref().unwrap().contains("503"), "{down:?}");
    assert_eq!(m.len(), 1, "the good one stays up");

    flaky.set_healthy(true);
    let h = health.clone();
    eventually(LIMIT, "flaky up again", move || {
        let empty = h.load().is_empty();
        async move { empty }
    })
    .await;

    // TCP checks see a stopped backend.
    let tcp = HealthChecker::spawn(
        registry.watch(&s).unwrap(),
        HealthCheckConfig {
            kind: CheckKind::Tcp,
            interval: Duration::from_millis(50),
            fall: 2,
            ..Default::default()
        },
        Shutdown::new(),
    );
    flaky.stop();
    let h = tcp.health();
    eventually(LIMIT, "stopped backend down by TCP", move || {
        let n = h.load().len();
        async move { n == 1 }
    })
    .await;
}

#[tokio::test]
async fn from_config_defaults_to_memory_and_builds_static() {
    let shutdown = Shutdown::new();
    let d = from_config(&DiscoveryConfig::default(), shutdown.clone())
        .await
        .unwrap();
    assert_eq!(d.backend(), "memory");

    let mut cfg = DiscoveryConfig {
        backend: Backend::Static,
        ..Default::default()
    };
    cfg.services.insert(
        "payments".into(),
        vec![
            StaticEndpoint::new("127.0.0.1:8066"),
            StaticEndpoint::new("127.0.0.1:8067"),
        ],
    );
    let d = from_config(&cfg, shutdown.clone()).await.unwrap();
    assert_eq!(d.backend(), "static");
    let (w, checker, _health) = watch_with_health(&*d, &svc("payments"), &cfg, shutdown).unwrap();
    assert!(checker.is_none());
    assert_eq!(ports(&w), vec![8066, 8067]);

    let bad = DiscoveryConfig {
        backend: Backend::Redis,
        ..Default::default()
    };
    let err = from_config(&bad, Shutdown::new()).await.err().unwrap();
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn static_endpoints_follow_a_live_section() {
    let d = keel_discovery::StaticDiscovery::new();
    let s = svc("payments");
    let section = keel_core::Live::new(vec![StaticEndpoint::new("127.0.0.1:8066")]);
    let shutdown = Shutdown::new();
    let task = d.follow(s.clone(), section.clone(), shutdown.clone());
    let w = d.watch(&s).unwrap();
    wait_len(&w, 1, LIMIT).await;
    let mut backup = StaticEndpoint::new("127.0.0.1:8067");
    backup.backup = true;
    section.store(vec![
        StaticEndpoint::new("127.0.0.1:8066"),
        backup,
        StaticEndpoint::new("nope"),
    ]);
    wait_len(&w, 2, LIMIT).await;
    assert_eq!(w.snapshot()[1].state, keel_core::AdminState::Backup);
    shutdown.trigger();
    task.await.unwrap();
}

/// The backend's own reads raise open and close events in the directory it watches; taken for
/// changes, each read would cause the next, forever. Counted from outside over a quiet second:
/// at most the 2 s backstop poll opens the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_file_does_not_cause_another_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.toml");
    replace(&path, "[[payments]]\naddr = \"127.0.0.1:8001\"\n");
    let opens = keel_testkit::FileOpens::watch(dir.path());
    let shutdown = Shutdown::new();
    let d = FileDiscovery::start(&path, shutdown.clone()).unwrap();
    let w = d.watch(&svc("payments")).unwrap();
    wait_len(&w, 1, LIMIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = opens.during(Duration::from_secs(1)).await;
    assert!(
        during <= 1,
        "the file was opened {during} times in a quiet second"
    );
    shutdown.trigger();
}
