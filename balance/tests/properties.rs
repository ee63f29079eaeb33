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

/// What one step of a round-robin run does.
#[derive(Debug, Clone, Copy)]
enum RrStep {
    Ok,
    Fail,
    Avoid(usize),
    /// Takes an instance out (for longer than the run): a health change.
    Eject(usize),
}

/// nginx smooth weighted round robin, written plainly: the reference the balancer's lock-free
/// rotation must match pick for pick.
struct Swrr {
    weight: i64,
    max_fails: i64,
    effective: Vec<i64>,
    current: Vec<i64>,
    out: Vec<bool>,
}

impl Swrr {
    fn pick(&mut self, avoid: Option<usize>) -> usize {
        let mut total = 0;
        let mut best: Option<usize> = None;
        for k in 0..self.current.len() {
            if avoid == Some(k) || self.out[k] {
                continue;
            }
            let mut ew = self.effective[k].clamp(0, self.weight);
            self.current[k] += ew;
            total += ew;
            if ew < self.weight {
                ew += 1;
            }
            self.effective[k] = ew;
            if best.is_none_or(|b| self.current[k] > self.current[b]) {
                best = Some(k);
            }
        }
        let Some(b) = best else {
            // Nobody but the avoided one: the balancer asks again without avoiding.
            return self.pick(None);
        };
        self.current[b] -= total;
        b
    }

    fn fail(&mut self, k: usize) {
        self.effective[k] = (self.effective[k] - self.weight / self.max_fails).max(0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Equal weights: round robin rotates without its lock while nothing is penalized, avoided
    /// or taken out, and hands over to the weighted walk (and back) so that the sequence is
    /// exactly nginx's, failures, avoided and ejected instances included.
    #[test]
    fn round_robin_rotation_is_exactly_smooth_weighted_round_robin(
        n in 2usize..9,
        weight in 4u32..9,
        steps in proptest::collection::vec(
            prop_oneof![
                12 => Just(RrStep::Ok),
                1 => Just(RrStep::Fail),
                1 => proptest::strategy::Strategy::prop_map(0usize..8, RrStep::Avoid),
                1 => proptest::strategy::Strategy::prop_map(0usize..8, RrStep::Eject),
            ],
            1..400,
        ),
    ) {
        let params = keel_core::ServerParams {
            max_fails: Some(4),
            ..keel_core::ServerParams::default()
        };
        let instances: Vec<_> = (0..n)
            .map(|i| inst(&format!("i{i}"), 21_000 + i as u16, weight).with_params(params.clone()))
            .collect();
        let mut config = cfg(Strategy::RoundRobin);
        // Only the weight penalty: no ejection may take an instance out during the run.
        config.outlier.enabled = false;
        config.outlier.max_ejection_percent = Ratio::new(0.5).unwrap();
        let (b, _, _) = balancer(instances, config);
        let mut model = Swrr {
            weight: i64::from(weight),
            max_fails: 4,
            effective: vec![i64::from(weight); n],
            current: vec![0; n],
            out: vec![false; n],
        };
        // Failures in a row per instance: kept under max_fails, so none is marked down.
        let mut streak = vec![0u32; n];
        for step in steps {
            if let RrStep::Eject(k) = step {
                let k = k % n;
                // Fewer than half out, or the panic threshold would let everyone back in.
                let out = model.out.iter().filter(|o| **o).count();
                if !model.out[k] && (out + 1) * 2 <= n
                    && b.eject(&InstanceId::new(format!("i{k}")), Duration::from_secs(3600), "test")
                {
                    model.out[k] = true;
                }
                continue;
            }
            let avoid = match step {
                RrStep::Avoid(k) => Some(k % n),
                _ => None,
            };
            let ids: Vec<InstanceId> = avoid
                .map(|k| InstanceId::new(format!("i{k}")))
                .into_iter()
                .collect();
            let info = RequestInfo { avoid: &ids, ..RequestInfo::default() };
            let p = b.pick(&info).unwrap();
            let want = model.pick(avoid);
            prop_assert_eq!(p.id().as_str(), format!("i{want}"));
            let fail = matches!(step, RrStep::Fail) && streak[want] < 3;
            if fail {
                streak[want] += 1;
                model.fail(want);
                p.complete(Outcome::Failure);
            } else {
                streak[want] = 0;
                p.complete(Outcome::Success);
            }
        }
    }
}
