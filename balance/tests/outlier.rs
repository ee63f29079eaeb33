//! Envoy outlier detection through the picker, on tokio's paused clock.

mod common;

use std::time::Duration;

use common::*;
use keel_balance::{Balancer, Outcome, RequestInfo, Strategy};
use keel_core::{HealthSource, HealthStatus, Ratio};

fn report(b: &Balancer, n: usize, mut fail: impl FnMut(&str) -> bool) {
    for _ in 0..n {
        let p = b.pick(&RequestInfo::default()).unwrap();
        let o = if fail(p.id().as_str()) {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        p.complete_with(o, Duration::from_millis(30));
    }
}

fn ejected(b: &Balancer) -> Vec<String> {
    b.snapshot()
        .instances
        .iter()
        .filter(|i| {
            i.health == HealthStatus::Ejected && i.health_source == Some(HealthSource::Outlier)
        })
        .map(|i| i.id.to_string())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn success_rate_ejects_below_mean_minus_stdev() {
    let mut c = cfg(Strategy::RoundRobin);
    c.passive.max_fails = 0;
    c.outlier.consecutive_5xx = 0;
    c.outlier.max_ejection_percent = Ratio::new(0.2).unwrap();
    let (b, _, _) = balancer(weighted(&[1; 6]), c);
    report(&b, 1, |_| false);
    // One interval of 150 requests each; i0 fails 30% of its requests.
    let mut k = 0;
    report(&b, 900, |id| {
        k += 1;
        id == "i0" && k % 3 == 0
    });
    tokio::time::advance(Duration::from_secs(11)).await;
    report(&b, 1, |_| false);
    assert_eq!(ejected(&b), vec!["i0".to_string()]);
    let snap = b.snapshot();
    assert!(snap.instances[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("success_rate"));
    assert_eq!(snap.instances[0].ejected_for_ms, Some(30_000));
}

#[tokio::test(start_paused = true)]
async fn ejection_time_grows_and_is_capped_and_share_is_limited() {
    let mut c = cfg(Strategy::RoundRobin);
    c.passive.max_fails = 0;
    c.outlier.base_ejection_time = Duration::from_secs(100);
    c.outlier.max_ejection_time = Duration::from_secs(250);
    let (b, _, _) = balancer(weighted(&[1; 4]), c);
    // Everyone fails: only one of four may be out (10% rounds down, at least one).
    report(&b, 40, |_| true);
    assert_eq!(ejected(&b).len(), 1);
    let first = ejected(&b)[0].clone();
    for expect in [100_000, 200_000, 250_000] {
        let snap = b.snapshot();
        let i = snap
            .instances
            .iter()
            .find(|i| i.id.as_str() == first)
            .unwrap();
        assert_eq!(i.ejected_for_ms, Some(expect), "{i:?}");
        tokio::time::advance(Duration::from_millis(expect + 1)).await;
        // Back, and failing again: ejected again for longer, capped.
        let mut k = 0;
        while !ejected(&b).contains(&first) && k < 200 {
            report(&b, 1, |id| id == first);
            k += 1;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn failure_percentage_when_enforced() {
    let mut c = cfg(Strategy::RoundRobin);
    c.passive.max_fails = 0;
    c.outlier.consecutive_5xx = 0;
    c.outlier.enforce_success_rate = false;
    c.outlier.enforce_failure_percentage = true;
    c.outlier.max_ejection_percent = Ratio::new(0.5).unwrap();
    let (b, _, _) = balancer(weighted(&[1; 5]), c);
    report(&b, 1, |_| false);
    let mut k = 0;
    report(&b, 500, |id| {
        k += 1;
        id == "i3" && k % 10 != 0
    });
    tokio::time::advance(Duration::from_secs(11)).await;
    report(&b, 1, |_| false);
    assert_eq!(ejected(&b), vec!["i3".to_string()]);
}
