#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashMap;

use keel_balance::{BalanceConfig, Balancer, Outcome, RequestInfo, Strategy};
use keel_core::{Instance, Live, ServiceName};

pub fn svc() -> ServiceName {
    ServiceName::new("payments").unwrap()
}

pub fn inst(id: &str, port: u16, weight: u32) -> Instance {
    Instance::new(svc(), format!("127.0.0.1:{port}").parse().unwrap())
        .with_id(id)
        .with_weight(weight)
}

pub fn weighted(weights: &[u32]) -> Vec<Instance> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| inst(&format!("i{i}"), 20_000 + i as u16, w))
        .collect()
}

pub fn cfg(strategy: Strategy) -> BalanceConfig {
    BalanceConfig {
        strategy,
        ..BalanceConfig::default()
    }
}

pub fn balancer(
    instances: Vec<Instance>,
    config: BalanceConfig,
) -> (Balancer, Live<Vec<Instance>>, Live<BalanceConfig>) {
    let i = Live::new(instances);
    let c = Live::new(config);
    let b = Balancer::new(svc(), i.clone(), c.clone())
        .unwrap()
        .with_seed(42);
    (b, i, c)
}

/// Picks `n` times, completing each at once with the default RTT (so every instance is equally
/// fast and only weights differ); counts per id.
pub fn counts(
    b: &Balancer,
    n: usize,
    info: impl Fn(usize) -> Option<u64>,
) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for k in 0..n {
        let ri = RequestInfo {
            hash_key: info(k),
            ..RequestInfo::default()
        };
        let p = b.pick(&ri).expect("an instance");
        *c.entry(p.id().to_string()).or_insert(0) += 1;
        p.complete_with(Outcome::Success, std::time::Duration::from_millis(30));
    }
    c
}

pub fn share(c: &HashMap<String, usize>, id: &str) -> f64 {
    let total: usize = c.values().sum();
    *c.get(id).unwrap_or(&0) as f64 / total as f64
}
