use std::{sync::atomic::AtomicUsize, time::Duration};

use super::*;
use crate::classify::FailureClass;

const FAIL: Outcome = Outcome::Failure(FailureClass::Status(503));

fn cfg() -> BreakerConfig {
    BreakerConfig {
        size: 10,
        minimum_calls: 10,
        failure_rate_threshold: keel_core::Ratio::new(0.5).unwrap(),
        permitted_in_half_open: 3,
        open_duration: Duration::from_secs(10),
        ..Default::default()
    }
}

fn calls(b: &Arc<Breaker>, n: usize, o: Outcome) {
    for _ in 0..n {
        b.try_acquire().unwrap().record(o);
    }
}

#[tokio::test(start_paused = true)]
async fn transitions_closed_open_half_open_closed() {
    let b = Breaker::with_seed("svc", "", Live::new(cfg()), 1);
    calls(&b, 5, Outcome::Success);
    calls(&b, 4, FAIL);
    assert_eq!(b.state(), BreakerState::Closed, "9 calls < minimum_calls");
    calls(&b, 1, FAIL);
    assert_eq!(b.state(), BreakerState::Open, "5/10 failed");
    let e = b.try_acquire().unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(10)));
    // Rejections are not recorded anywhere.
    tokio::time::advance(Duration::from_secs(10)).await;
    let p1 = b.try_acquire().unwrap();
    assert_eq!(b.state(), BreakerState::HalfOpen);
    let p2 = b.try_acquire().unwrap();
    let p3 = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_err(), "only 3 probes");
    p1.record(Outcome::Success);
    p2.record(Outcome::Success);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    p3.record(FAIL);
    assert_eq!(b.state(), BreakerState::Closed, "1/3 < 50%");
    assert_eq!(b.window_counts(), (0, 0, 0));
    // Half-open that fails reopens.
    calls(&b, 10, FAIL);
    tokio::time::advance(Duration::from_secs(10)).await;
    for _ in 0..3 {
        b.try_acquire().unwrap().record(FAIL);
    }
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn exactly_n_half_open_permits_under_100_concurrent_callers() {
    let b = Breaker::with_seed("svc", "", Live::new(cfg()), 1);
    calls(&b, 10, FAIL);
    tokio::time::advance(Duration::from_secs(11)).await;
    let granted = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (b, granted, barrier) = (b.clone(), granted.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            if let Ok(p) = b.try_acquire() {
                granted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                p.record(Outcome::Success);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(granted.load(Ordering::SeqCst), 3);
    assert_eq!(b.state(), BreakerState::Closed);

    // Same on OS threads, for real contention.
    calls(&b, 10, FAIL);
    tokio::time::advance(Duration::from_secs(11)).await;
    let granted = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(Mutex::new(Vec::new()));
    let rt = tokio::runtime::Handle::current();
    std::thread::scope(|s| {
        for _ in 0..100 {
            let (b, granted, held, rt) = (&b, &granted, &held, &rt);
            s.spawn(move || {
                let _enter = rt.enter();
                if let Ok(p) = b.try_acquire() {
                    granted.fetch_add(1, Ordering::SeqCst);
                    held.lock().unwrap().push(p);
                }
            });
        }
    });
    assert_eq!(granted.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn dropped_half_open_permit_is_given_back() {
    let b = Breaker::with_seed("svc", "", Live::new(cfg()), 1);
    calls(&b, 10, FAIL);
    tokio::time::advance(Duration::from_secs(10)).await;
    let ps: Vec<_> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
    assert!(b.try_acquire().is_err());
    drop(ps);
    calls(&b, 3, Outcome::Success);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn open_duration_grows_and_resets() {
    let mut c = cfg();
    c.open_duration_growth = 2.0;
    c.open_duration_max = Duration::from_secs(35);
    let b = Breaker::with_seed("svc", "", Live::new(c), 1);
    calls(&b, 10, FAIL);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let wait = b.try_acquire().unwrap_err().retry_after().unwrap();
        seen.push(wait.as_secs());
        tokio::time::advance(wait).await;
        for _ in 0..3 {
            b.try_acquire().unwrap().record(FAIL);
        }
    }
    assert_eq!(seen, vec![10, 20, 35, 35]);
    tokio::time::advance(Duration::from_secs(35)).await;
    calls(&b, 3, Outcome::Success);
    assert_eq!(b.state(), BreakerState::Closed);
    calls(&b, 10, FAIL);
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(10))
    );
}

#[tokio::test(start_paused = true)]
async fn threshold_change_mid_run_keeps_window() {
    let live = Live::new(cfg());
    let b = Breaker::with_seed("svc", "", live.clone(), 1);
    calls(&b, 7, Outcome::Success);
    calls(&b, 3, FAIL);
    assert_eq!(b.state(), BreakerState::Closed, "30% < 50%");
    assert_eq!(b.window_counts(), (10, 3, 0));
    live.store(BreakerConfig {
        failure_rate_threshold: keel_core::Ratio::new(0.3).unwrap(),
        ..cfg()
    });
    // The next call is judged against the new threshold with the old counts: 10 calls, 3 failed
    // of which the oldest success rolls out -> 3/10 >= 30%.
    calls(&b, 1, Outcome::Success);
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn resizing_the_window_migrates_counts() {
    let live = Live::new(cfg());
    let b = Breaker::with_seed("svc", "", live.clone(), 1);
    calls(&b, 6, Outcome::Success);
    calls(&b, 3, FAIL);
    live.store(BreakerConfig {
        size: 20,
        minimum_calls: 12,
        ..cfg()
    });
    calls(&b, 1, Outcome::Success);
    assert_eq!(b.window_counts(), (10, 3, 0));
    live.store(BreakerConfig {
        window: crate::config::WindowKind::Time,
        size: 30,
        ..cfg()
    });
    calls(&b, 1, Outcome::Success);
    assert_eq!(b.window_counts(), (11, 3, 0));
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open() {
    let mut c = cfg();
    c.slow_call_duration = Duration::from_millis(100);
    c.slow_call_rate_threshold = keel_core::Ratio::new(0.5).unwrap();
    let b = Breaker::with_seed("svc", "", Live::new(c), 1);
    for _ in 0..10 {
        let p = b.try_acquire().unwrap();
        tokio::time::advance(Duration::from_millis(150)).await;
        p.record(Outcome::Success);
    }
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn forced_open_disabled_and_rejections_ignored() {
    let live = Live::new(cfg());
    let b = Breaker::with_seed("svc", "", live.clone(), 1);
    calls(&b, 20, Outcome::Rejected);
    assert_eq!(b.window_counts(), (0, 0, 0));
    live.store(BreakerConfig {
        forced_open: true,
        ..cfg()
    });
    assert_eq!(b.state(), BreakerState::ForcedOpen);
    assert!(matches!(
        b.try_acquire(),
        Err(ResilienceError::BreakerOpen { .. })
    ));
    live.store(BreakerConfig {
        disabled: true,
        ..cfg()
    });
    calls(&b, 20, FAIL);
    assert_eq!(b.state(), BreakerState::Disabled);
    live.store(cfg());
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn adaptive_throttle_rejects_in_proportion() {
    let c = BreakerConfig {
        mode: BreakerMode::Adaptive,
        adaptive_k: 2.0,
        ..cfg()
    };
    let b = Breaker::with_seed("svc", "", Live::new(c.clone()), 7);
    // Backend refusing everything: the throttle converges to rejecting almost all calls
    // locally (p = 1 - K * accepts / requests).
    let mut rejected = 0u32;
    for _ in 0..1000u32 {
        match b.try_acquire() {
            Ok(p) => p.record(FAIL),
            Err(e) => {
                assert_eq!(e, ResilienceError::Throttled);
                rejected += 1;
            }
        }
    }
    assert!(rejected > 900, "rejected {rejected}");
    // Half the calls accepted: K = 2 means no throttling at all.
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(b.throttle().rejection_probability(&c), 0.0);
    for i in 0..1000u32 {
        let p = b
            .try_acquire()
            .expect("accepts = requests / 2 is within K = 2");
        p.record(if i % 2 == 0 { Outcome::Success } else { FAIL });
    }
    assert!(b.throttle().rejection_probability(&c) < 0.01);
}

#[tokio::test(start_paused = true)]
async fn service_records_outcomes_and_rejects_without_calling() {
    use tower::{service_fn, ServiceExt};
    let layer = CircuitBreakerLayer::new("svc", Live::new(cfg()));
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let svc = layer.layer(service_fn(move |_req: ()| {
        h.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(http::Response::builder().status(503).body(()).unwrap()) }
    }));
    for _ in 0..10 {
        let r = svc.clone().oneshot(()).await.unwrap();
        assert_eq!(r.status(), 503);
    }
    let e = svc.clone().oneshot(()).await.unwrap_err();
    assert!(matches!(
        ResilienceError::find(e.as_ref()),
        Some(ResilienceError::BreakerOpen { .. })
    ));
    assert_eq!(hits.load(Ordering::SeqCst), 10);
    let reg = BreakerRegistry::new("svc", Live::new(cfg()));
    let a = reg.get(&InstanceId::from("a"));
    assert!(Arc::ptr_eq(&a, &reg.get(&InstanceId::from("a"))));
    reg.retain(|_| false);
    assert!(reg.is_empty());
}
