//! Observed health of instances, shared between the crates that learn it (active checks in
//! keel-discovery, passive health and outlier detection in keel-balance) and the ones that act
//! on it (balancers, the admin endpoint).

use std::{collections::BTreeMap, fmt, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::InstanceId;

/// How an instance is doing, as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Serving well.
    #[default]
    Healthy,
    /// Serving, but worse than it should (slow, some failures): pick less often.
    Degraded,
    /// Leaving: finish in-flight work, send nothing new.
    Draining,
    /// Taken out for a while by passive health or outlier detection; comes back by itself.
    Ejected,
    /// Failing its checks: not picked until it passes them again.
    Down,
}

impl HealthStatus {
    /// Whether new requests may be sent to an instance in this state.
    pub fn is_available(self) -> bool {
        matches!(self, HealthStatus::Healthy | HealthStatus::Degraded)
    }
}

/// Who decided an instance's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthSource {
    /// Active checks (HTTP or TCP probes).
    Active,
    /// Passive health (failures of real requests, nginx `max_fails`).
    Passive,
    /// Outlier detection (Envoy semantics).
    Outlier,
    /// The registry or an operator.
    Registry,
}

/// An instance's observed health, with the reason and who decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The status.
    pub status: HealthStatus,
    /// Who decided it.
    pub source: HealthSource,
    /// Why, in words for people (`"3 checks failed: HTTP 503"`).
    pub reason: Option<Arc<str>>,
}

impl Health {
    /// A health with a reason.
    pub fn new(status: HealthStatus, source: HealthSource, reason: impl fmt::Display) -> Self {
        Self {
            status,
            source,
            reason: Some(Arc::from(reason.to_string())),
        }
    }
}

/// The observed health of every instance of a service that has any; an instance absent from the
/// map is healthy. Published through a [`Live`](crate::Live), so readers take one snapshot.
pub type HealthMap = BTreeMap<InstanceId, Health>;
