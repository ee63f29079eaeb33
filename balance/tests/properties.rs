//! Property tests: whatever the instances, health and policy, a pick never panics, never returns
//! an instance that is `down` or draining, and `backup` only when no primary is healthy.

mod common;

use std::time::Duration;

use common::*;
use keel_balance::{HashKey, Outcome, RequestInfo, Strategy};
use keel_core::{
    AdminState, Health, HealthMap, HealthSource, HealthStatus, InstanceId, Live, Ratio,
};
use proptest::prelude::*;

fn strategy() -> impl proptest::strategy::Strategy<Value = Strategy> {
    prop_oneof![
        Just(Strategy::P2cEwma),
        Just(Strategy::LeastRequest),
        Just(Strategy::RoundRobin),
        Just(Strategy::Random),
        Just(Strategy::RingHash),
        Just(Strategy::Maglev),
        Just(Strategy::LeastConn),
    ]
}

fn admin() -> impl proptest::strategy::Strategy<Value = AdminState> {
    prop_oneof![
        4 => Just(AdminState::Up),
        1 => Just(AdminState::Down),
        1 => Just(AdminState::Backup),
        1 => Just(AdminState::Draining),
    ]
}

fn status() -> impl proptest::strategy::Strategy<Value = Option<HealthStatus>> {
    prop_oneof![
        4 => Just(None),
        1 => Just(Some(HealthStatus::Down)),
        1 => Just(Some(HealthStatus::Degraded)),
        1 => Just(Some(HealthStatus::Draining)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn picks_respect_admin_state(
        s in strategy(),
        members in proptest::collection::vec((1u32..20, admin(), status(), 0u8..3), 0..12),
        keys in proptest::collection::vec(any::<u64>(), 1..30),
        panic in 0.0f64..1.0,
        fail_every in 2usize..6,
    ) {
        let zones = ["a", "b", "c"];
        let instances: Vec<_> = members
            .iter()
            .enumerate()
            .map(|(i, (w, st, _, z))| {
                inst(&format!("i{i}"), 20_000 + i as u16, *w)
                    .with_state(*st)
                    .with_zone(zones[*z as usize])
            })
            .collect();
        let health: HealthMap = members
            .iter()
            .enumerate()
            .filter_map(|(i, (_, _, h, _))| {
                h.map(|h| (InstanceId::new(format!("i{i}")), Health::new(h, HealthSource::Active, "p")))
            })
            .collect();
        let mut conf = cfg(s);
        conf.panic_threshold = Ratio::new(panic).unwrap();
        conf.zone.local_zone = Some("a".into());
        conf.maglev_table_size = 1_009;
        conf.hash_balance_factor = Some(1.5);
        let (b, _, _) = balancer(instances.clone(), conf);
        let b = b.with_health(Live::new(health.clone()));
        let never = |id: &InstanceId| {
            let i = instances.iter().find(|i| &i.id == id).unwrap();
            matches!(i.state, AdminState::Down | AdminState::Draining)
                || health.get(id).is_some_and(|h| h.status == HealthStatus::Draining)
        };
        let primary_healthy = instances.iter().any(|i| {
            i.state == AdminState::Up
                && health.get(&i.id).is_none_or(|h| h.status.is_available())
        });
        let mut held = Vec::new();
        // Failures take primaries out (passive health, outlier detection), and then backups
        // may serve: the backup rule is checked until the first failure.
        let mut failed_any = false;
        for (k, key) in keys.iter().enumerate() {
            let mut req = http::Request::new(());
            req.extensions_mut().insert(HashKey(*key));
            match b.pick(&RequestInfo::from_request(&req)) {
                Some(p) => {
                    prop_assert!(!never(p.id()), "picked {}", p.id());
                    let st = instances.iter().find(|i| &i.id == p.id()).unwrap().state;
                    if primary_healthy && !failed_any {
                        prop_assert_ne!(st, AdminState::Backup);
                    }
                    if k % fail_every == 0 {
                        failed_any = true;
                        p.complete_with(Outcome::GatewayFailure, Duration::from_millis(1));
                    } else if k % 3 == 0 {
                        held.push(p);
                    } else {
                        p.complete(Outcome::Success);
                    }
                }
                None => prop_assert!(instances.iter().all(|i| never(&i.id))),
            }
        }
        let snap = b.snapshot();
        prop_assert_eq!(snap.instances.len(), instances.len());
        drop(held);
        prop_assert!(b.snapshot().instances.iter().all(|i| i.in_flight == 0));
    }
}
