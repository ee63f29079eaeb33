//! The admin view of a balancer: JSON-serialisable, one consistent read of the tables.

use std::{net::SocketAddr, sync::atomic::Ordering::Relaxed};

use keel_core::{AdminState, HealthSource, HealthStatus, InstanceId, ServiceName};
use serde::Serialize;

use crate::{config::Strategy, picker::Balancer};

/// One instance as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceSnapshot {
    /// Its id.
    pub id: InstanceId,
    /// Its address.
    pub addr: SocketAddr,
    /// Its zone.
    pub zone: Option<String>,
    /// Its version.
    pub version: Option<String>,
    /// Configured weight.
    pub weight: u32,
    /// Weight in effect now: slow start applied, and nginx's SWRR penalty for `round-robin`.
    pub effective_weight: f64,
    /// Administrative state.
    pub state: AdminState,
    /// Observed health.
    pub health: HealthStatus,
    /// Who decided the health, when not plainly healthy.
    pub health_source: Option<HealthSource>,
    /// Why, when not plainly healthy.
    pub reason: Option<String>,
    /// Requests in flight (open connections for `least-conn`).
    pub in_flight: u32,
    /// Peak EWMA latency in ms (the default RTT before any observation).
    pub ewma_ms: f64,
    /// Times ejected by outlier detection, ever.
    pub ejections: u64,
    /// When the current ejection (passive or outlier) ends, in ms from now.
    pub ejected_for_ms: Option<u64>,
    /// Failures counted towards `max_fails`.
    pub passive_fails: u32,
}

/// Every instance of one client's balancer, for the admin endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BalancerSnapshot {
    /// The service.
    pub service: ServiceName,
    /// The strategy in force.
    pub strategy: Strategy,
    /// Generation of the tables.
    pub generation: u64,
    /// Instances.
    pub instances: Vec<InstanceSnapshot>,
}

impl BalancerSnapshot {
    pub(crate) fn of(b: &Balancer) -> Self {
        let r = b.roster();
        let now = b.shared.clock.now();
        let instances = r
            .entries
            .iter()
            .map(|e| {
                let st = &e.state;
                let outlier = st.ejected_until.load(Relaxed);
                let passive = if r.lone {
                    0
                } else {
                    st.passive_until.load(Relaxed)
                };
                let until = [outlier, passive].into_iter().filter(|&u| u > now).max();
                let (health, source, reason) = if outlier > now {
                    (
                        HealthStatus::Ejected,
                        Some(HealthSource::Outlier),
                        st.reason(),
                    )
                } else if passive > now {
                    (
                        HealthStatus::Ejected,
                        Some(HealthSource::Passive),
                        st.reason(),
                    )
                } else if let Some(h) = &e.active {
                    (h.status, Some(h.source), h.reason.clone())
                } else {
                    (HealthStatus::Healthy, None, None)
                };
                let mut ew = f64::from(e.weight) * r.slow_factor(e, now);
                if r.config.strategy == Strategy::RoundRobin {
                    ew = ew.min(st.effective_weight.load(Relaxed) as f64);
                }
                InstanceSnapshot {
                    id: e.instance.id.clone(),
                    addr: e.instance.addr,
                    zone: e.instance.zone.clone(),
                    version: e.instance.version.clone(),
                    weight: e.weight,
                    effective_weight: ew,
                    state: e.instance.state,
                    health,
                    health_source: source,
                    reason: reason.map(|r| r.to_string()),
                    in_flight: st.in_flight.load(Relaxed),
                    ewma_ms: st.ewma_ns(r.default_rtt_ns) / 1e6,
                    ejections: st.ejections_total.load(Relaxed),
                    ejected_for_ms: until.map(|u| (u - now) / 1_000_000),
                    passive_fails: st.fails.load(Relaxed),
                }
            })
            .collect();
        Self {
            service: b.service().clone(),
            strategy: r.config.strategy,
            generation: r.generation,
            instances,
        }
    }
}
