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

#[tokio::test(start_paused = true)]
async fn the_layer_counts_the_policys_failure_codes() {
    use tower::{service_fn, ServiceExt};
    let policy = Live::new(BreakerConfig {
        failure_codes: vec![500],
        ..cfg()
    });
    let layer = CircuitBreakerLayer::new("svc", policy.clone());
    let svc = layer.layer(service_fn(|_req: ()| async {
        Ok::<_, BoxError>(http::Response::builder().status(500).body(()).unwrap())
    }));
    for _ in 0..10 {
        assert_eq!(svc.clone().oneshot(()).await.unwrap().status(), 500);
    }
    let e = svc.clone().oneshot(()).await.unwrap_err();
    assert!(matches!(
        ResilienceError::find(e.as_ref()),
        Some(ResilienceError::BreakerOpen { .. })
    ));
    // The same through `CircuitBreaker::new` over the layer's breaker, with the codes reloaded:
    // a 500 is no failure any more.
    policy.store(cfg());
    let fresh = Breaker::new("svc2", "", policy.clone());
    let svc = CircuitBreaker::new(
        service_fn(|_req: ()| async {
            Ok::<_, BoxError>(http::Response::builder().status(500).body(()).unwrap())
        }),
        fresh.clone(),
    );
    for _ in 0..20 {
        assert_eq!(svc.clone().oneshot(()).await.unwrap().status(), 500);
    }
    assert_eq!(fresh.state(), BreakerState::Closed);
}

fn ok(status: u16) -> Result<http::Response<()>, crate::error::BoxError> {
    let mut r = http::Response::new(());
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
    Ok(r)
}

/// Calls of `ms` milliseconds each, recorded with their end.
fn timed(b: &Arc<Breaker>, n: usize, o: Outcome, ms: u64) {
    for _ in 0..n {
        let p = b.try_acquire().unwrap();
        p.record_at(o, Instant::now() + Duration::from_millis(ms));
    }
}

#[tokio::test(start_paused = true)]
async fn a_clean_window_still_sees_reloads_of_slow_duration_and_failure_codes() {
    let policy = Live::new(BreakerConfig {
        slow_call_duration: Duration::from_millis(100),
        slow_call_rate_threshold: keel_core::Ratio::new(1.0).unwrap(),
        ..cfg()
    });
    let b = Breaker::with_seed("svc", "", policy.clone(), 1);
    // Full and clean: these successes go by without the lock, and change nothing.
    timed(&b, 30, Outcome::Success, 50);
    assert_eq!(b.window_counts(), (10, 0, 0));
    // The same 50 ms success is slow under the reloaded policy.
    policy.store(BreakerConfig {
        slow_call_duration: Duration::from_millis(40),
        ..(**policy.load()).clone()
    });
    timed(&b, 1, Outcome::Success, 50);
    assert_eq!(b.window_counts(), (10, 0, 1));
    // Clean again after ten fast calls; then 200 becomes a failure code.
    timed(&b, 10, Outcome::Success, 10);
    assert_eq!(b.window_counts(), (10, 0, 0));
    policy.store(BreakerConfig {
        failure_codes: vec![200],
        ..(**policy.load()).clone()
    });
    let outcome = b.try_acquire().unwrap().classify_and_record(&ok(200), None);
    assert!(outcome.is_failure());
    assert_eq!(b.window_counts(), (10, 1, 0));
    // A time window has no lock-free path: every call counts.
    policy.store(BreakerConfig {
        window: crate::config::WindowKind::Time,
        failure_codes: Vec::new(),
        minimum_calls: 1_000,
        ..(**policy.load()).clone()
    });
    let before = b.window_counts().0;
    timed(&b, 5, Outcome::Success, 1);
    assert_eq!(b.window_counts().0, before + 5);
}

/// Steps of the reference run: a call's outcome and whether it was slow.
#[derive(Debug, Clone, Copy)]
enum Step {
    Fast,
    Slow,
    Fail,
}

proptest::proptest! {
    /// With the lock-free success path, a breaker's window and state follow a plain model of
    /// Resilience4j's count window call for call.
    #[test]
    fn lock_free_successes_match_the_model(
        size in 1u32..12,
        minimum in 1u32..12,
        steps in proptest::collection::vec(
            proptest::prop_oneof![
                8 => proptest::strategy::Just(Step::Fast),
                1 => proptest::strategy::Just(Step::Slow),
                1 => proptest::strategy::Just(Step::Fail),
            ],
            0..200,
        ),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        let _rt = rt.enter();
        let b = Breaker::with_seed("svc", "", Live::new(BreakerConfig {
            size,
            minimum_calls: minimum,
            failure_rate_threshold: keel_core::Ratio::new(0.5).unwrap(),
            slow_call_rate_threshold: keel_core::Ratio::new(0.5).unwrap(),
            slow_call_duration: Duration::from_millis(100),
            ..BreakerConfig::default()
        }), 1);
        let mut ring: std::collections::VecDeque<(bool, bool)> = Default::default();
        for step in steps {
            let (outcome, ms) = match step {
                Step::Fast => (Outcome::Success, 5),
                Step::Slow => (Outcome::Success, 150),
                Step::Fail => (FAIL, 5),
            };
            timed(&b, 1, outcome, ms);
            if ring.len() == size as usize {
                ring.pop_front();
            }
            ring.push_back((matches!(step, Step::Fail), matches!(step, Step::Slow)));
            let calls = ring.len() as u32;
            let failures = ring.iter().filter(|c| c.0).count() as u32;
            let slow = ring.iter().filter(|c| c.1).count() as u32;
            let opens = (calls >= minimum || calls >= size)
                && (failures * 2 >= calls || slow * 2 >= calls);
            if opens {
                proptest::prop_assert_eq!(b.state(), BreakerState::Open);
                break;
            }
            proptest::prop_assert_eq!(b.state(), BreakerState::Closed);
            proptest::prop_assert_eq!(b.window_counts(), (calls, failures, slow));
        }
    }
}

/// A threshold of 0% (accepted as a ratio) opened the breaker on calls that all succeeded, and
/// no half-open probe could close it again (0 >= 0): Resilience4j refuses such thresholds, and
/// so does validation.
#[tokio::test(start_paused = true)]
async fn a_zero_rate_threshold_is_refused() {
    for zero in [
        BreakerConfig {
            failure_rate_threshold: keel_core::Ratio::ZERO,
            ..cfg()
        },
        BreakerConfig {
            slow_call_rate_threshold: keel_core::Ratio::ZERO,
            ..cfg()
        },
    ] {
        let b = Breaker::with_seed("svc", "", Live::new(zero.clone()), 1);
        calls(&b, 10, Outcome::Success);
        assert_eq!(b.state(), BreakerState::Open, "opened on successes alone");
        assert!(zero.validate().is_err(), "{zero:?}");
    }
    cfg().validate().unwrap();
}

#[test]
fn a_registry_resets_the_gauge_of_an_instance_it_forgets() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let reg = BreakerRegistry::new(
            "reg",
            Live::new(BreakerConfig {
                minimum_calls: 1,
                ..cfg()
            }),
        );
        let gone = InstanceId::new("gone");
        calls(&reg.get(&gone), 1, FAIL);
        let state_of = |id: &str| {
            handle
                .render()
                .lines()
                .find(|l| l.starts_with("keel_breaker_state{") && l.contains(&format!("\"{id}\"")))
                .and_then(|l| l.rsplit(' ').next().map(str::to_owned))
        };
        let state = || state_of("gone");
        assert_eq!(state().as_deref(), Some("1"), "opened");
        // A caller still holds the breaker of an instance that is closed when it is forgotten.
        let other = InstanceId::new("other");
        let held = reg.get(&other);
        reg.retain(|_| false);
        assert_eq!(state().as_deref(), Some("0"), "forgotten: refuses nothing");
        assert!(reg.is_empty());
        let other_state = || state_of("other");
        // The instance is back, with a new breaker; the caller's old one opens meanwhile: the
        // gauge stays with the breaker that answers for the id now.
        let now = reg.get(&other);
        calls(&held, 1, FAIL);
        assert_eq!(held.state(), BreakerState::Open);
        assert_eq!(
            other_state().as_deref(),
            Some("0"),
            "a forgotten breaker stays out"
        );
        calls(&now, 1, FAIL);
        assert_eq!(other_state().as_deref(), Some("1"), "the new breaker shows");
        now.publish();
        held.publish();
        assert_eq!(other_state().as_deref(), Some("1"), "published on purpose");
    });
}
