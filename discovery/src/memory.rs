//! The embedded default: every service's set lives in this process.
//!
//! It is what a service runs on with no configuration at all, what tests use, and what the demo
//! runs a whole fleet on. Clones share one registry. There is no expiry: liveness is the
//! [`Registration`] handle itself, so dropping it removes the instance at once.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use keel_core::{Instance, InstanceId, Live, ServiceName};
use tokio::sync::watch;

use crate::{
    registration::{Beat, Lease},
    snapshot::{normalize, publish},
    BoxFuture, Discover, Discovery, DiscoveryError, InstanceWatch, Registration, Registry,
};

#[derive(Default)]
struct Inner {
    services: Mutex<BTreeMap<ServiceName, Live<Vec<Instance>>>>,
}

/// In-process discovery and registry, shared by clones.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_discovery::DiscoveryError> {
/// use keel_core::{Instance, ServiceName};
/// use keel_discovery::{Discover, MemoryDiscovery, Registry};
///
/// let registry = MemoryDiscovery::new();
/// let payments = ServiceName::new("payments").unwrap();
/// let watch = registry.watch(&payments)?;
/// let reg = registry
///     .register(Instance::new(payments.clone(), "127.0.0.1:8066".parse().unwrap()))
///     .await?;
/// assert_eq!(watch.live().load().len(), 1);
/// reg.deregister().await?;
/// assert!(watch.live().load().is_empty());
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct MemoryDiscovery {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDiscovery").finish_non_exhaustive()
    }
}

impl MemoryDiscovery {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn set(&self, service: &ServiceName) -> Live<Vec<Instance>> {
        let mut m = keel_core::lock(&self.inner.services);
        m.entry(service.clone()).or_default().clone()
    }

    /// Replaces the whole set of a service (what the static backend does on each reload).
    /// Returns whether it changed.
    pub fn replace(&self, service: &ServiceName, instances: Vec<Instance>) -> bool {
        let live = self.set(service);
        let set = normalize(instances);
        if **live.load() == set {
            return false;
        }
        publish(&live, set);
        true
    }

    /// Adds or replaces one instance.
    pub fn upsert(&self, instance: Instance) {
        let live = self.set(&instance.service);
        let _serialise = self.inner.services.lock();
        let mut v = (*live.get()).clone();
        v.retain(|i| i.id != instance.id);
        v.push(instance);
        live.store(normalize(v));
    }

    /// Removes one instance; says whether it was there.
    pub fn remove(&self, service: &ServiceName, id: &InstanceId) -> bool {
        let live = self.set(service);
        let _serialise = self.inner.services.lock();
        let mut v = (*live.get()).clone();
        let before = v.len();
        v.retain(|i| &i.id != id);
        let removed = v.len() != before;
        if removed {
            live.store(v);
        }
        removed
    }
}

impl Discover for MemoryDiscovery {
    fn watch(&self, service: &ServiceName) -> Result<InstanceWatch, DiscoveryError> {
        let (tx, rx) = watch::channel(true);
        drop(tx);
        Ok(InstanceWatch::new(service.clone(), self.set(service), rx))
    }
}

impl Registry for MemoryDiscovery {
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        let lease = Arc::new(MemoryLease(self.clone()));
        Box::pin(Registration::start(lease, instance))
    }
}

impl Discovery for MemoryDiscovery {
    fn backend(&self) -> &'static str {
        "memory"
    }
}

struct MemoryLease(MemoryDiscovery);

impl Lease for MemoryLease {
    fn put<'a>(
        &'a self,
        instance: &'a Instance,
        _changed: bool,
    ) -> BoxFuture<'a, Result<Beat, DiscoveryError>> {
        self.0.upsert(instance.clone());
        Box::pin(async { Ok(Beat::Refreshed) })
    }
    fn remove<'a>(&'a self, instance: &'a Instance) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        self.0.remove(&instance.service, &instance.id);
        Box::pin(async { Ok(()) })
    }
    fn interval(&self) -> Option<Duration> {
        None
    }
    fn dropped(&self, instance: &Instance) {
        self.0.remove(&instance.service, &instance.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::AdminState;

    #[tokio::test]
    async fn register_drain_drop_in_another_task() {
        let d = MemoryDiscovery::new();
        let svc = ServiceName::new("orders").unwrap();
        let w = d.watch(&svc).unwrap();
        let mut rx = w.live().subscribe();
        let d2 = d.clone();
        let svc2 = svc.clone();
        let reg = tokio::spawn(async move {
            d2.register(Instance::new(svc2, "127.0.0.1:9001".parse().unwrap()))
                .await
                .unwrap()
        })
        .await
        .unwrap();
        rx.changed().await.unwrap();
        assert_eq!(w.snapshot().len(), 1);
        reg.drain().await.unwrap();
        assert_eq!(w.snapshot()[0].state, AdminState::Draining);
        drop(reg);
        assert!(w.snapshot().is_empty(), "dropping removes in-process");
        let bad = Instance::new(svc, "0.0.0.0:1".parse().unwrap());
        assert!(matches!(
            d.register(bad).await,
            Err(DiscoveryError::InvalidInstance(_))
        ));
    }
}
