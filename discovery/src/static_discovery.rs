//! Endpoints written in configuration, with nginx's per-server parameters.
//!
//! The set of a service is whatever the configuration says now: the facade (or anyone) hands each
//! new `[[clients.X.endpoints]]` list to [`StaticDiscovery::set_endpoints`], or lets
//! [`StaticDiscovery::follow`] track a `Live` section. An invalid entry is skipped and logged;
//! it never empties the set.

use std::collections::BTreeMap;

use keel_core::{Instance, Live, ServiceName, Shutdown};
use tokio::task::JoinHandle;

use crate::{
    telemetry, BoxFuture, Discover, Discovery, DiscoveryError, InstanceWatch, MemoryDiscovery,
    Registration, Registry, StaticEndpoint,
};

/// Discovery from configured endpoints, hot-swapped.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use keel_core::ServiceName;
/// use keel_discovery::{Discover, StaticDiscovery, StaticEndpoint};
///
/// let d = StaticDiscovery::new();
/// let payments = ServiceName::new("payments").unwrap();
/// d.set_endpoints(&payments, &[StaticEndpoint::new("127.0.0.1:8066"), StaticEndpoint::new("bad")]);
/// assert_eq!(d.watch(&payments).unwrap().snapshot().len(), 1);
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct StaticDiscovery {
    memory: MemoryDiscovery,
}

impl StaticDiscovery {
    /// No services yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// From the `discovery.services` table.
    pub fn from_services(
        services: &BTreeMap<String, Vec<StaticEndpoint>>,
    ) -> Result<Self, DiscoveryError> {
        let this = Self::new();
        for (name, endpoints) in services {
            let service = ServiceName::new(name)
                .map_err(|e| DiscoveryError::Config(format!("discovery.services.{name}: {e}")))?;
            this.set_endpoints(&service, endpoints);
        }
        Ok(this)
    }

    /// Replaces a service's endpoints; invalid ones are skipped, logged and counted. Returns how
    /// many were accepted.
    pub fn set_endpoints(&self, service: &ServiceName, endpoints: &[StaticEndpoint]) -> usize {
        let set = to_instances(service, endpoints);
        let n = set.len();
        self.memory.replace(service, set);
        n
    }

    /// Keeps a service's set in step with a live list of endpoints until `shutdown`.
    pub fn follow(
        &self,
        service: ServiceName,
        endpoints: Live<Vec<StaticEndpoint>>,
        shutdown: Shutdown,
    ) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut rx = endpoints.subscribe();
            loop {
                this.set_endpoints(&service, &endpoints.load());
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = shutdown.triggered() => return,
                }
            }
        })
    }
}

pub(crate) fn to_instances(service: &ServiceName, endpoints: &[StaticEndpoint]) -> Vec<Instance> {
    endpoints
        .iter()
        .filter_map(|e| match e.to_instance(service) {
            Ok(i) => Some(i),
            Err(error) => {
                telemetry::malformed(service.as_str(), "static");
                tracing::warn!(%service, addr = %e.addr, %error, "skipping invalid endpoint");
                None
            }
        })
        .collect()
}

impl Discover for StaticDiscovery {
    fn watch(&self, service: &ServiceName) -> Result<InstanceWatch, DiscoveryError> {
        self.memory.watch(service)
    }
}

impl Registry for StaticDiscovery {
    /// Adds the instance to this process's view only (configuration owns the set).
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        self.memory.register(instance)
    }
}

impl Discovery for StaticDiscovery {
    fn backend(&self) -> &'static str {
        "static"
    }
}
