//! The two small, stable traits, kept apart from the backends that implement them: balancers
//! depend on [`Discover`], a serving process on [`Registry`], the facade on both ([`Discovery`]).
//! They are object safe (`Arc<dyn Discovery>`), so futures are boxed.

use std::{future::Future, pin::Pin};

use keel_core::{Instance, ServiceName};

use crate::{DiscoveryError, InstanceWatch, Registration};

/// A boxed, `Send` future, as returned by the object-safe traits of this crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the instances of a service are found.
pub trait Discover: Send + Sync + 'static {
    /// A watch on a service: a live snapshot of its set and the changes to it. The backend's
    /// watcher for the service is started on the first call and shared by later ones. Must be
    /// called inside a tokio runtime.
    fn watch(&self, service: &ServiceName) -> Result<InstanceWatch, DiscoveryError>;
}

/// Where a service announces its own instances.
pub trait Registry: Send + Sync + 'static {
    /// Registers an instance and keeps it registered (heartbeats, re-registration after the
    /// registry restarts or the lease is lost) until the returned handle is deregistered or
    /// dropped. Register only once the service is ready to serve.
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, DiscoveryError>>;
}

/// A backend that does both; what [`from_config`](crate::from_config) returns.
pub trait Discovery: Discover + Registry {
    /// The backend's name: `memory`, `static`, `file`, `dns`, `redis` or `etcd`.
    fn backend(&self) -> &'static str;
}
