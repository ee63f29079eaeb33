//! A registration is a handle plus a background heartbeat.
//!
//! The heartbeat does not trust that what it wrote is still there: every beat rewrites (Redis)
//! or re-checks (etcd lease keepalive) the record, so a registry that restarted empty, or a lease
//! that expired while the process was paused, is repaired on the next beat without anyone
//! noticing the loss. Failed beats are retried sooner than the normal interval.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use keel_core::{AdminState, Instance};
use tokio::{sync::Notify, task::JoinHandle};

use crate::{telemetry, BoxFuture, DiscoveryError};

/// What one write of a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// The record was there and was refreshed.
    Refreshed,
    /// The record (or its lease) was gone and has been written again.
    Reregistered,
}

/// How a backend keeps one record alive.
pub(crate) trait Lease: Send + Sync + 'static {
    /// Writes or refreshes the record. `changed` says the instance's contents changed (drain).
    fn put<'a>(
        &'a self,
        instance: &'a Instance,
        changed: bool,
    ) -> BoxFuture<'a, Result<Beat, DiscoveryError>>;
    /// Removes the record.
    fn remove<'a>(&'a self, instance: &'a Instance) -> BoxFuture<'a, Result<(), DiscoveryError>>;
    /// Time between heartbeats; `None` for backends without expiry.
    fn interval(&self) -> Option<Duration>;
    /// Called when the handle is dropped without deregistering.
    fn dropped(&self, _instance: &Instance) {}
}

struct Shared {
    instance: Mutex<(Instance, bool)>,
    lease: Arc<dyn Lease>,
    kick: Notify,
}

/// A registered instance. Heartbeats run in the background while this handle lives.
///
/// - [`drain`](Registration::drain) marks it `Draining` (clients stop sending new work),
/// - [`deregister`](Registration::deregister) removes it,
/// - dropping it stops the heartbeats: the record then expires after its TTL (Redis, etcd) or,
///   for in-process backends, is removed at once.
pub struct Registration {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
    armed: bool,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("instance", &self.instance().id)
            .finish()
    }
}

impl Registration {
    /// Writes the record once (so a registry that is down is reported to the caller), then
    /// heartbeats in the background.
    pub(crate) async fn start(
        lease: Arc<dyn Lease>,
        instance: Instance,
    ) -> Result<Self, DiscoveryError> {
        instance.validate()?;
        lease.put(&instance, true).await?;
        tracing::info!(service = %instance.service, instance = %instance.id, addr = %instance.addr, "registered");
        let shared = Arc::new(Shared {
            instance: Mutex::new((instance, false)),
            lease,
            kick: Notify::new(),
        });
        let task = shared
            .lease
            .interval()
            .map(|every| tokio::spawn(heartbeat(shared.clone(), every)));
        Ok(Self {
            shared,
            task,
            armed: true,
        })
    }

    /// The instance as registered now.
    pub fn instance(&self) -> Instance {
        keel_core::lock(&self.shared.instance).0.clone()
    }

    /// Marks the instance `Draining` in the registry: clients stop sending it new requests while
    /// it finishes in-flight ones. Heartbeats continue.
    pub async fn drain(&self) -> Result<(), DiscoveryError> {
        self.set_state(AdminState::Draining).await
    }

    /// Changes the administrative state in the registry (`Up` again after a drain, `Down`...).
    pub async fn set_state(&self, state: AdminState) -> Result<(), DiscoveryError> {
        let instance = {
            let mut g = keel_core::lock(&self.shared.instance);
            g.0.state = state;
            g.0.clone()
        };
        let r = self.shared.lease.put(&instance, true).await;
        if r.is_err() {
            // Let the heartbeat write it when the registry is back.
            keel_core::lock(&self.shared.instance).1 = true;
            self.shared.kick.notify_one();
        }
        r.map(|_| ())
    }

    /// Stops heartbeats and removes the record.
    pub async fn deregister(mut self) -> Result<(), DiscoveryError> {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        // An orderly removal: the drop hook has nothing left to do.
        self.armed = false;
        let instance = self.instance();
        let r = self.shared.lease.remove(&instance).await;
        tracing::info!(service = %instance.service, instance = %instance.id, ok = r.is_ok(), "deregistered");
        r
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if self.armed {
            let instance = keel_core::lock(&self.shared.instance).0.clone();
            self.shared.lease.dropped(&instance);
        }
    }
}

async fn heartbeat(shared: Arc<Shared>, every: Duration) {
    let retry = (every / 4).max(Duration::from_millis(50));
    let mut wait = every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.kick.notified() => {}
        }
        let (instance, changed) = {
            let mut g = keel_core::lock(&shared.instance);
            let changed = std::mem::replace(&mut g.1, false);
            (g.0.clone(), changed)
        };
        let labels = [
            ("service", instance.service.to_string()),
            ("instance", instance.id.to_string()),
        ];
        match shared.lease.put(&instance, changed).await {
            Ok(beat) => {
                let outcome = match beat {
                    Beat::Refreshed => "ok",
                    Beat::Reregistered => {
                        tracing::warn!(service = %instance.service, instance = %instance.id, "registration was lost; registered again");
                        "reregistered"
                    }
                };
                metrics::counter!(
                    telemetry::HEARTBEATS_TOTAL,
                    "service" => labels[0].1.clone(),
                    "instance" => labels[1].1.clone(),
                    "outcome" => outcome
                )
                .increment(1);
                wait = every;
            }
            Err(error) => {
                if changed {
                    keel_core::lock(&shared.instance).1 = true;
                }
                metrics::counter!(
                    telemetry::HEARTBEATS_TOTAL,
                    "service" => labels[0].1.clone(),
                    "instance" => labels[1].1.clone(),
                    "outcome" => "error"
                )
                .increment(1);
                tracing::warn!(service = %instance.service, instance = %instance.id, %error, "heartbeat failed; retrying");
                wait = retry;
            }
        }
    }
}

/// For backends whose set is owned by an operator (file, DNS): registering is accepted and does
/// nothing, so the same service code runs on every backend.
pub(crate) struct LocalLease;

impl Lease for LocalLease {
    fn put<'a>(&'a self, _: &'a Instance, _: bool) -> BoxFuture<'a, Result<Beat, DiscoveryError>> {
        Box::pin(async { Ok(Beat::Refreshed) })
    }
    fn remove<'a>(&'a self, _: &'a Instance) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(async { Ok(()) })
    }
    fn interval(&self) -> Option<Duration> {
        None
    }
}
