//! An adapter from any `tower::discover::Discover` to the balancer's inputs, so keel-balance
//! works over the tower ecosystem's discovery as well as over keel-discovery.
//!
//! tower's `Discover` yields `(key, service)` pairs; the balancer wants a `Live<Vec<Instance>>`
//! and a way to get each instance's service. [`from_discover`] returns both, plus the future that
//! drives the stream (spawn it).

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
    task::Poll,
};

use keel_core::{Instance, InstanceId, Live};
use tower::discover::{Change, Discover};

use crate::service::MakeInstanceService;

/// The services delivered by a tower `Discover`, by instance id: a [`MakeInstanceService`] for
/// [`Balance`](crate::Balance).
#[derive(Debug)]
pub struct DiscoveredServices<S> {
    by_id: Arc<Mutex<HashMap<InstanceId, S>>>,
}

impl<S> Clone for DiscoveredServices<S> {
    fn clone(&self) -> Self {
        Self {
            by_id: self.by_id.clone(),
        }
    }
}

impl<S: Clone> MakeInstanceService for DiscoveredServices<S> {
    type Service = S;
    fn make_service(&self, instance: &Instance) -> Option<S> {
        keel_core::lock(&self.by_id).get(&instance.id).cloned()
    }
}

/// Adapts a tower `Discover`: `describe` turns each key (and its service) into an [`Instance`]
/// (at least an address and an id). Returns the live instance set, the services for
/// [`Balance`](crate::Balance), and the future to spawn; it ends when the stream ends or fails.
#[allow(clippy::type_complexity)] // three plain parts, named in the docs
pub fn from_discover<D, K, S, T>(
    discover: D,
    describe: T,
) -> (
    Live<Vec<Instance>>,
    DiscoveredServices<S>,
    impl Future<Output = Result<(), D::Error>>,
)
where
    D: Discover<Key = K, Service = S> + Unpin,
    K: Hash + Eq + Clone,
    S: Clone,
    T: Fn(&K, &S) -> Instance,
{
    let live = Live::new(Vec::new());
    let services = DiscoveredServices {
        by_id: Arc::new(Mutex::new(HashMap::new())),
    };
    let (l, s) = (live.clone(), services.clone());
    let drive = async move {
        let mut discover = discover;
        let mut keys: HashMap<K, Instance> = HashMap::new();
        let apply = |change: Change<K, S>, keys: &mut HashMap<K, Instance>| match change {
            Change::Insert(k, svc) => {
                let inst = describe(&k, &svc);
                keel_core::lock(&s.by_id).insert(inst.id.clone(), svc);
                keys.insert(k, inst);
            }
            Change::Remove(k) => {
                if let Some(inst) = keys.remove(&k) {
                    keel_core::lock(&s.by_id).remove(&inst.id);
                }
            }
        };
        while let Some(change) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut discover).poll_discover(cx)).await
        {
            apply(change?, &mut keys);
            // Take every change already waiting before publishing: a burst (a thousand inserts
            // at start-up) is one new set and one table rebuild, not a thousand.
            let mut ended = false;
            loop {
                let next = std::future::poll_fn(|cx| {
                    Poll::Ready(match std::pin::Pin::new(&mut discover).poll_discover(cx) {
                        Poll::Pending => Some(None),
                        Poll::Ready(c) => c.map(Some),
                    })
                })
                .await;
                match next {
                    Some(Some(Ok(change))) => apply(change, &mut keys),
                    Some(Some(Err(e))) => {
                        // Publish what was applied before giving up on the stream.
                        l.store(keys.values().cloned().collect());
                        return Err(e);
                    }
                    Some(None) => break,
                    None => {
                        ended = true;
                        break;
                    }
                }
            }
            l.store(keys.values().cloned().collect());
            if ended {
                return Ok(());
            }
        }
        Ok(())
    };
    (live, services, drive)
}
