//! Strategies and per-instance semantics, driven through the picker.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use keel_balance::{
    BalanceConfig, CanaryConfig, HeaderMatch, Outcome, RequestInfo, Strategy, ZoneConfig,
};
use keel_core::{
    AdminState, Health, HealthMap, HealthSource, HealthStatus, InstanceId, Live, Ratio,
    ServerParams,
};

fn seq(b: &keel_balance::Balancer, n: usize) -> String {
    (0..n)
        .map(|_| {
            let p = b.pick(&RequestInfo::default()).unwrap();
            let id = p.id().to_string();
            p.complete(Outcome::Success);
            id
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn swrr_gives_nginx_sequence() {
    let (b, _, _) = balancer(
        vec![inst("a", 1001, 5), inst("b", 1002, 1), inst("c", 1003, 1)],
        cfg(Strategy::RoundRobin),
    );
    assert_eq!(seq(&b, 7), "a,a,b,a,c,a,a");
    assert_eq!(seq(&b, 7), "a,a,b,a,c,a,a", "and again, period 7");
}

#[test]
fn swrr_penalty_and_recovery() {
    // nginx: a failure lowers effective_weight by weight / max_fails; +1 back per pick.
    let params = ServerParams {
        max_fails: Some(4),
        ..ServerParams::default()
    };
    let (b, _, _) = balancer(
        vec![
            inst("a", 1001, 4).with_params(params.clone()),
            inst("b", 1002, 4).with_params(params),
        ],
        cfg(Strategy::RoundRobin),
    );
    assert_eq!(seq(&b, 4), "a,b,a,b");
    let p = b.pick(&RequestInfo::default()).unwrap();
    assert_eq!(p.id().as_str(), "a");
    p.complete(Outcome::Failure);
    let ew = |id: &str| {
        b.snapshot()
            .instances
            .iter()
            .find(|i| i.id.as_str() == id)
            .unwrap()
            .effective_weight
    };
    assert_eq!(ew("a"), 3.0, "4 - 4/4");
    assert_eq!(b.snapshot().instances[0].passive_fails, 1);
    // The penalised instance gets fewer picks while its weight grows back by one per pick.
    let s = seq(&b, 8);
    assert!(s.matches('b').count() > s.matches('a').count(), "{s}");
    assert_eq!(ew("a"), 4.0, "recovered");
    assert_eq!(
        b.snapshot().instances[0].passive_fails,
        0,
        "a success clears the count"
    );
}

fn assert_weighted(strategy: Strategy, hashed: bool) {
    let weights = [5, 1, 1, 3];
    let (b, _, _) = balancer(weighted(&weights), cfg(strategy));
    let c = counts(&b, 100_000, |k| {
        hashed.then(|| keel_balance::hash_bytes(&(k as u64).to_le_bytes(), 9))
    });
    for (i, w) in weights.iter().enumerate() {
        let want = f64::from(*w) / 10.0;
        let got = share(&c, &format!("i{i}"));
        assert!(
            (got - want).abs() <= 0.01,
            "{strategy:?}: i{i} got {got:.4} want {want} ({c:?})"
        );
    }
}

#[test]
fn weighted_distribution_within_one_percent() {
    for s in [
        Strategy::P2cEwma,
        Strategy::LeastRequest,
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::LeastConn,
        Strategy::Maglev,
    ] {
        assert_weighted(s, false);
    }
    assert_weighted(Strategy::Maglev, true);
}

#[test]
fn ring_hash_is_weighted() {
    // ketama's point placement is random: 160 points per weight unit gives a few percent of
    // spread, not 1% (the reason Maglev exists). Checked at 2%.
    let weights = [5, 1, 1, 3];
    let (b, _, _) = balancer(weighted(&weights), cfg(Strategy::RingHash));
    let c = counts(&b, 100_000, |k| {
        Some(keel_balance::hash_bytes(&(k as u64).to_le_bytes(), 9))
    });
    for (i, w) in weights.iter().enumerate() {
        let got = share(&c, &format!("i{i}"));
        assert!(
            (got - f64::from(*w) / 10.0).abs() <= 0.02,
            "i{i} {got} {c:?}"
        );
    }
}

fn health_of(ids: &[&str], status: HealthStatus) -> HealthMap {
    ids.iter()
        .map(|id| {
            (
                InstanceId::new(*id),
                Health::new(status, HealthSource::Active, "test"),
            )
        })
        .collect()
}

#[test]
fn backup_only_when_every_primary_is_down() {
    let health = Live::new(HealthMap::new());
    let instances = vec![
        inst("p1", 1001, 1),
        inst("p2", 1002, 1),
        inst("bk", 1003, 1).with_state(AdminState::Backup),
    ];
    let (b, _, _) = balancer(instances, cfg(Strategy::Random));
    let b = b.with_health(health.clone());
    let c = counts(&b, 2_000, |_| None);
    assert_eq!(c.get("bk"), None, "{c:?}");
    health.store(health_of(&["p1"], HealthStatus::Down));
    // One of two primaries down is below the 50% panic threshold? No: 1 of 2 is exactly 50%.
    let c = counts(&b, 2_000, |_| None);
    assert_eq!(c.get("bk"), None, "{c:?}");
    assert_eq!(c.get("p1"), None, "{c:?}");
    health.store(health_of(&["p1", "p2"], HealthStatus::Down));
    let c = counts(&b, 2_000, |_| None);
    assert_eq!(c.get("bk"), Some(&2_000), "{c:?}");
}

#[test]
fn admin_down_and_draining_are_never_picked() {
    let (b, _, _) = balancer(
        vec![
            inst("up", 1001, 1),
            inst("down", 1002, 1).with_state(AdminState::Down),
            inst("drain", 1003, 1).with_state(AdminState::Draining),
        ],
        cfg(Strategy::RoundRobin),
    );
    assert_eq!(counts(&b, 100, |_| None).get("up"), Some(&100));
}

#[test]
fn panic_threshold_spreads_over_all() {
    let health = Live::new(HealthMap::new());
    let (b, _, _) = balancer(weighted(&[1, 1, 1, 1]), cfg(Strategy::Random));
    let b = b.with_health(health.clone());
    // 3 of 4 down: 25% healthy < 50%: panic, every instance gets traffic.
    health.store(health_of(&["i0", "i1", "i2"], HealthStatus::Down));
    let c = counts(&b, 4_000, |_| None);
    assert_eq!(c.len(), 4, "{c:?}");
    // With the threshold lowered to 20%, the one healthy instance takes everything.
    let mut conf = cfg(Strategy::Random);
    conf.panic_threshold = Ratio::new(0.2).unwrap();
    let (b, _, _) = balancer(weighted(&[1, 1, 1, 1]), conf);
    let b = b.with_health(health.clone());
    let c = counts(&b, 4_000, |_| None);
    assert_eq!(c.get("i3"), Some(&4_000), "{c:?}");
}

#[test]
fn zone_aware_spills_over() {
    let health = Live::new(HealthMap::new());
    let mut conf = cfg(Strategy::P2cEwma);
    conf.zone = ZoneConfig {
        local_zone: Some("a".into()),
        ..ZoneConfig::default()
    };
    let instances = vec![
        inst("a1", 1001, 1).with_zone("a"),
        inst("a2", 1002, 1).with_zone("a"),
        inst("a3", 1003, 1).with_zone("a"),
        inst("b1", 1004, 1).with_zone("b"),
        inst("b2", 1005, 1).with_zone("b"),
    ];
    let (b, _, _) = balancer(instances, conf);
    let b = b.with_health(health.clone());
    let c = counts(&b, 3_000, |_| None);
    assert!(c.keys().all(|k| k.starts_with('a')), "local only: {c:?}");
    // 2 of 3 local healthy = 67% < 70%: spill over to every zone.
    health.store(health_of(&["a1"], HealthStatus::Down));
    let c = counts(&b, 3_000, |_| None);
    assert!(c.contains_key("b1") && c.contains_key("b2"), "{c:?}");
    assert!(!c.contains_key("a1"), "{c:?}");
}

#[test]
fn canary_split_and_header_routing() {
    let mut conf = cfg(Strategy::P2cEwma);
    conf.canary = Some(CanaryConfig {
        version: Some("2".into()),
        weight: Ratio::new(0.05).unwrap(),
        header: Some(HeaderMatch {
            name: "x-canary".into(),
            value: "yes".into(),
        }),
        tags: BTreeMap::new(),
    });
    let mut instances = weighted(&[1, 1, 1]);
    instances.push(inst("v2", 1009, 1).with_version("2"));
    let (b, _, live_conf) = balancer(instances, conf);
    let c = counts(&b, 100_000, |_| None);
    let got = share(&c, "v2");
    assert!((got - 0.05).abs() <= 0.01, "canary share {got}");
    // Header match: always the canary.
    let mut h = http::HeaderMap::new();
    h.insert("x-canary", "yes".parse().unwrap());
    for _ in 0..100 {
        let p = b.pick(&RequestInfo::default().with_headers(&h)).unwrap();
        assert_eq!(p.id().as_str(), "v2");
    }
    // Rolled back by config: no canary traffic at all.
    live_conf.store(cfg(Strategy::P2cEwma));
    let c = counts(&b, 10_000, |_| None);
    assert!(share(&c, "v2") > 0.2, "v2 is an ordinary instance again");
    let mut conf = cfg(Strategy::P2cEwma);
    conf.canary = Some(CanaryConfig {
        version: Some("2".into()),
        ..CanaryConfig::default()
    });
    live_conf.store(conf);
    assert_eq!(counts(&b, 10_000, |_| None).get("v2"), None);
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_a_new_instance() {
    let mut conf = cfg(Strategy::Random);
    conf.slow_start.window = Duration::from_secs(60);
    let (b, live, _) = balancer(vec![inst("old", 1001, 1)], conf);
    counts(&b, 10, |_| None);
    live.store(vec![inst("old", 1001, 1), inst("new", 1002, 1)]);
    // At t = 0 the new one has the 10% floor: 0.1 / 1.1 of picks.
    let c = counts(&b, 20_000, |_| None);
    assert!((share(&c, "new") - 0.1 / 1.1).abs() < 0.02, "{c:?}");
    tokio::time::advance(Duration::from_secs(30)).await;
    let c = counts(&b, 20_000, |_| None);
    assert!((share(&c, "new") - 0.5 / 1.5).abs() < 0.02, "{c:?}");
    tokio::time::advance(Duration::from_secs(31)).await;
    let c = counts(&b, 20_000, |_| None);
    assert!((share(&c, "new") - 0.5).abs() < 0.02, "{c:?}");
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_an_instance_back_from_an_active_health_outage() {
    let mut conf = cfg(Strategy::Random);
    conf.slow_start.window = Duration::from_secs(60);
    let health = Live::new(HealthMap::new());
    let (b, _, _) = balancer(vec![inst("a", 1001, 1), inst("b", 1002, 1)], conf);
    let b = b.with_health(health.clone());
    // Present from the start: no ramp.
    assert!((share(&counts(&b, 20_000, |_| None), "b") - 0.5).abs() < 0.02);
    health.store(health_of(&["b"], HealthStatus::Down));
    assert_eq!(counts(&b, 1_000, |_| None).get("b"), None);
    tokio::time::advance(Duration::from_secs(5)).await;
    health.store(HealthMap::new());
    // Back: the 10% floor, then the ramp, as a new instance.
    let c = counts(&b, 20_000, |_| None);
    assert!((share(&c, "b") - 0.1 / 1.1).abs() < 0.02, "{c:?}");
    tokio::time::advance(Duration::from_secs(30)).await;
    let c = counts(&b, 20_000, |_| None);
    assert!((share(&c, "b") - 0.5 / 1.5).abs() < 0.02, "{c:?}");
    tokio::time::advance(Duration::from_secs(31)).await;
    assert!((share(&counts(&b, 20_000, |_| None), "b") - 0.5).abs() < 0.02);
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_an_instance_back_from_max_fails() {
    let mut conf = cfg(Strategy::Random);
    conf.slow_start.window = Duration::from_secs(60);
    let params = ServerParams {
        max_fails: Some(1),
        fail_timeout: Some(Duration::from_secs(10)),
        ..ServerParams::default()
    };
    let (b, _, _) = balancer(
        vec![
            inst("a", 1001, 1).with_params(params.clone()),
            inst("b", 1002, 1).with_params(params),
        ],
        conf,
    );
    let fail_b = || loop {
        let p = b.pick(&RequestInfo::default()).unwrap();
        let is_b = p.id().as_str() == "b";
        p.complete(if is_b {
            Outcome::Failure
        } else {
            Outcome::Success
        });
        if is_b {
            break;
        }
    };
    fail_b();
    assert_eq!(
        counts(&b, 1_000, |_| None).get("b"),
        None,
        "out for fail_timeout"
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    let c = counts(&b, 20_000, |_| None);
    assert!((share(&c, "b") - 0.1 / 1.1).abs() < 0.02, "{c:?}");
    tokio::time::advance(Duration::from_secs(30)).await;
    let c = counts(&b, 20_000, |_| None);
    assert!((share(&c, "b") - 0.5 / 1.5).abs() < 0.02, "{c:?}");
}

#[test]
fn avoid_and_max_conns() {
    let params = ServerParams {
        max_conns: Some(1),
        ..ServerParams::default()
    };
    let (b, _, _) = balancer(
        vec![
            inst("a", 1001, 1).with_params(params.clone()),
            inst("b", 1002, 1).with_params(params),
        ],
        cfg(Strategy::P2cEwma),
    );
    let avoid = [InstanceId::new("a")];
    for _ in 0..50 {
        let p = b.pick(&RequestInfo::default().with_avoid(&avoid)).unwrap();
        assert_eq!(p.id().as_str(), "b");
    }
    // Avoid is a preference: with only `a` able to serve, `a` serves.
    let held = b.pick(&RequestInfo::default().with_avoid(&avoid)).unwrap();
    assert_eq!(held.id().as_str(), "b");
    let p = b.pick(&RequestInfo::default().with_avoid(&avoid)).unwrap();
    assert_eq!(p.id().as_str(), "a");
    // Both at max_conns: nothing.
    let err = b.try_pick(&RequestInfo::default()).unwrap_err();
    assert!(err.is_retryable());
    drop(p);
    assert!(b.pick(&RequestInfo::default()).is_some());
}

#[tokio::test(start_paused = true)]
async fn passive_health_nginx_semantics() {
    let (b, _, _) = balancer(weighted(&[1, 1]), cfg(Strategy::RoundRobin));
    let p = b.pick(&RequestInfo::default()).unwrap();
    let bad = p.id().clone();
    p.complete(Outcome::Failure);
    // max_fails = 1: out for fail_timeout (10s).
    let c = counts(&b, 100, |_| None);
    assert_eq!(c.get(bad.as_str()), None, "{c:?}");
    let snap = b.snapshot();
    let s = snap.instances.iter().find(|i| i.id == bad).unwrap();
    assert_eq!(s.health, HealthStatus::Ejected);
    assert!(s.reason.as_deref().unwrap().contains("passive"));
    tokio::time::advance(Duration::from_secs(11)).await;
    let c = counts(&b, 100, |_| None);
    assert!(
        c.contains_key(bad.as_str()),
        "back after fail_timeout: {c:?}"
    );

    // A lone instance is never taken out.
    let (b, _, _) = balancer(weighted(&[1]), cfg(Strategy::RoundRobin));
    for _ in 0..5 {
        b.pick(&RequestInfo::default())
            .unwrap()
            .complete(Outcome::Failure);
    }
    assert!(b.pick(&RequestInfo::default()).is_some());
}

#[test]
fn reload_keeps_state_and_removed_instance_is_gone() {
    let (b, live, conf) = balancer(weighted(&[1, 1, 1]), cfg(Strategy::P2cEwma));
    let p = b.pick(&RequestInfo::default()).unwrap();
    let id = p.id().clone();
    p.complete_with(Outcome::Success, Duration::from_millis(500));
    let ewma = |b: &keel_balance::Balancer| {
        b.snapshot()
            .instances
            .iter()
            .find(|i| i.id == id)
            .unwrap()
            .ewma_ms
    };
    assert_eq!(ewma(&b), 500.0);
    conf.store(cfg(Strategy::LeastRequest));
    let mut w = weighted(&[1, 1, 1]);
    w.iter_mut().for_each(|i| i.weight = 7);
    live.store(w);
    assert_eq!(
        ewma(&b),
        500.0,
        "state kept across policy and weight changes"
    );
    assert_eq!(b.snapshot().strategy, Strategy::LeastRequest);
    live.store(
        weighted(&[1, 1, 1])
            .into_iter()
            .filter(|i| i.id != id)
            .collect(),
    );
    let c = counts(&b, 1_000, |_| None);
    assert!(!c.contains_key(id.as_str()));
    let json = serde_json::to_value(b.snapshot()).unwrap();
    assert_eq!(json["instances"].as_array().unwrap().len(), 2);
}

#[test]
fn p2c_ewma_avoids_the_slow_instance() {
    let (b, _, _) = balancer(weighted(&[1, 1, 1]), cfg(Strategy::P2cEwma));
    let mut slow = 0;
    for _ in 0..3_000 {
        let p = b.pick(&RequestInfo::default()).unwrap();
        let lat = if p.id().as_str() == "i0" {
            slow += 1;
            Duration::from_millis(50)
        } else {
            Duration::from_millis(1)
        };
        p.complete_with(Outcome::Success, lat);
    }
    assert!(slow < 3_000 / 20, "slow instance got {slow} of 3000");
}

#[test]
fn invalid_config_is_refused() {
    let c = BalanceConfig {
        maglev_table_size: 100,
        ..BalanceConfig::default()
    };
    let err =
        keel_balance::Balancer::new(svc(), Live::new(weighted(&[1])), Live::new(c)).unwrap_err();
    assert!(!err.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn least_conn_counts_connections_ages_and_drains() {
    let mut conf = cfg(Strategy::LeastConn);
    conf.max_connection_age = Some(Duration::from_secs(60));
    let (b, live, _) = balancer(weighted(&[1, 1, 2]), conf);
    // Long-lived connections spread by open count per weight: 1 : 1 : 2.
    let held: Vec<_> = (0..40)
        .map(|_| b.pick(&RequestInfo::default()).unwrap())
        .collect();
    let open = |id: &str| held.iter().filter(|p| p.id().as_str() == id).count();
    assert_eq!((open("i0"), open("i1"), open("i2")), (10, 10, 20));
    // A new instance takes the next connections until it catches up.
    let mut more = weighted(&[1, 1, 2]);
    more.push(inst("new", 1099, 1));
    live.store(more);
    for _ in 0..5 {
        let p = b.pick(&RequestInfo::default()).unwrap();
        assert_eq!(p.id().as_str(), "new");
        std::mem::forget(p);
    }
    assert!(held.iter().all(|p| !p.should_close()));
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(
        held.iter().all(|p| p.should_close()),
        "older than max_connection_age"
    );
    // An instance that leaves: its connections should close (drain).
    let (b, live, _) = balancer(weighted(&[1, 1]), cfg(Strategy::LeastConn));
    let p = b.pick(&RequestInfo::default()).unwrap();
    assert!(!p.should_close());
    live.store(
        weighted(&[1, 1])
            .into_iter()
            .filter(|i| i.id != *p.id())
            .collect(),
    );
    assert!(p.should_close());
}

#[test]
fn fast_failures_do_not_attract_p2c_ewma() {
    let mut conf = cfg(Strategy::P2cEwma);
    conf.passive.max_fails = 0;
    conf.outlier.enabled = false;
    let (b, _, _) = balancer(weighted(&[1, 1, 1]), conf);
    let mut to_failing = 0;
    for _ in 0..3_000 {
        let p = b.pick(&RequestInfo::default()).unwrap();
        if p.id().as_str() == "i0" {
            to_failing += 1;
            p.complete_with(Outcome::GatewayFailure, Duration::from_micros(100));
        } else {
            p.complete_with(Outcome::Success, Duration::from_millis(5));
        }
    }
    assert!(
        to_failing < 3_000 / 10,
        "a fast-failing instance got {to_failing} of 3000"
    );
}

#[tokio::test(start_paused = true)]
async fn a_shunned_slow_instance_is_tried_again_once_its_peak_fades() {
    let (b, _, _) = balancer(weighted(&[1, 1]), cfg(Strategy::P2cEwma));
    let run = |n: usize, slow_ms: u64| {
        let mut to_i0 = 0;
        for _ in 0..n {
            let p = b.pick(&RequestInfo::default()).unwrap();
            let ms = if p.id().as_str() == "i0" {
                to_i0 += 1;
                slow_ms
            } else {
                5
            };
            p.complete_with(Outcome::Success, Duration::from_millis(ms));
        }
        to_i0
    };
    // Ten picks a second for a minute; i0 answers in 500 ms: shunned after its first answer.
    let mut shunned = 0;
    for _ in 0..60 {
        tokio::time::advance(Duration::from_secs(1)).await;
        shunned += run(10, 500);
    }
    assert!(shunned <= 3, "slow: shunned, got {shunned}");
    // i0 recovers, but only a pick can tell: its idle peak decays until it is tried again.
    let mut back = 0;
    for s in 0..120 {
        tokio::time::advance(Duration::from_secs(1)).await;
        let n = run(10, 5);
        if s >= 100 {
            back += n;
        }
    }
    assert!(back >= 10, "tried again: {back} of the last 200");
    let ewma = b.snapshot().instances[0].ewma_ms;
    assert!(ewma < 10.0, "and found fast again: {ewma} ms");
}
