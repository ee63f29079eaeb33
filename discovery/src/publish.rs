//! Registry-loss safety: what stands between a backend's answer and the set clients use.
//!
//! A registry that restarts empty, a network partition, or a bug in a resolver all look the same
//! from here: a sudden answer with far fewer instances. Believing it would turn a registry outage
//! into a full outage of every client. So, like Eureka's self-preservation, a published set never
//! becomes empty and never shrinks by more than `max_shrink` in one step unless the smaller answer
//! persists across `confirm_reads` consecutive reads. While a backend is unreachable the last known
//! set stays in force and `keel_discovery_staleness_seconds` grows. Optionally the last good set
//! is written to disk and used at start when the backend cannot be reached.

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use keel_core::{Instance, Live, Ratio, ServiceName};
use tokio::{sync::watch, time::Instant};

use crate::{
    snapshot::{normalize, publish},
    telemetry, DiscoveryError, InstanceWatch,
};

/// The self-preservation rule: whether to apply a smaller set now or wait for confirmation.
///
/// ```
/// use keel_discovery::{GuardDecision, ShrinkGuard};
/// use keel_core::Ratio;
///
/// let mut g = ShrinkGuard::new(Ratio::new(0.5).unwrap(), 3);
/// assert_eq!(g.check(10, 6), GuardDecision::Apply);  // -40%: fine
/// assert_eq!(g.check(10, 0), GuardDecision::Hold);   // empty: wait
/// assert_eq!(g.check(10, 0), GuardDecision::Hold);
/// assert_eq!(g.check(10, 0), GuardDecision::Apply);  // third read in a row: believe it
/// ```
#[derive(Debug, Clone)]
pub struct ShrinkGuard {
    max_shrink: f64,
    confirm_reads: u32,
    pending: u32,
}

/// What [`ShrinkGuard::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardDecision {
    /// Publish the new set.
    Apply,
    /// Keep the current set; the new one is suspicious until it persists.
    Hold,
}

impl ShrinkGuard {
    /// A guard allowing shrinks of at most `max_shrink` per step, and larger ones (or empty
    /// sets) once seen on `confirm_reads` consecutive reads (at least 1).
    pub fn new(max_shrink: Ratio, confirm_reads: u32) -> Self {
        Self {
            max_shrink: max_shrink.get(),
            confirm_reads: confirm_reads.max(1),
            pending: 0,
        }
    }

    /// Decides for a read that would take the set from `current` to `candidate` instances.
    pub fn check(&mut self, current: usize, candidate: usize) -> GuardDecision {
        let suspicious = current > 0
            && (candidate == 0
                || (current.saturating_sub(candidate)) as f64 / current as f64 > self.max_shrink);
        if !suspicious {
            self.pending = 0;
            return GuardDecision::Apply;
        }
        self.pending += 1;
        if self.pending >= self.confirm_reads {
            self.pending = 0;
            GuardDecision::Apply
        } else {
            GuardDecision::Hold
        }
    }
}

/// What became of a set offered to a [`Publisher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    Applied,
    Held,
    Unchanged,
}

/// Options of the safety layer, from the `[discovery]` section.
#[derive(Debug, Clone)]
pub(crate) struct SafetyOptions {
    pub(crate) max_shrink: Ratio,
    pub(crate) confirm_reads: u32,
    pub(crate) cache_dir: Option<PathBuf>,
}

impl Default for SafetyOptions {
    fn default() -> Self {
        Self {
            max_shrink: Ratio::new(0.5).unwrap_or(Ratio::ONE),
            confirm_reads: 3,
            cache_dir: None,
        }
    }
}

struct State {
    guard: ShrinkGuard,
    last_ok: Option<Instant>,
    cache_tried: bool,
}

/// One service's published set, with the guard, staleness and cache in front of it.
pub(crate) struct Publisher {
    service: ServiceName,
    set: Live<Vec<Instance>>,
    ready: watch::Sender<bool>,
    state: Mutex<State>,
    cache: Option<PathBuf>,
}

impl Publisher {
    pub(crate) fn new(service: ServiceName, options: &SafetyOptions) -> Arc<Self> {
        let (ready, _) = watch::channel(false);
        Arc::new(Self {
            cache: options
                .cache_dir
                .as_ref()
                .map(|d| d.join(format!("{service}.json"))),
            service,
            set: Live::new(Vec::new()),
            ready,
            state: Mutex::new(State {
                guard: ShrinkGuard::new(options.max_shrink, options.confirm_reads),
                last_ok: None,
                cache_tried: false,
            }),
        })
    }

    pub(crate) fn watch(&self) -> InstanceWatch {
        InstanceWatch::new(
            self.service.clone(),
            self.set.clone(),
            self.ready.subscribe(),
        )
    }

    pub(crate) fn service(&self) -> &ServiceName {
        &self.service
    }

    /// The set in force now.
    #[cfg(test)]
    pub(crate) fn current(&self) -> Arc<Vec<Instance>> {
        self.set.get()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        keel_core::lock(&self.state)
    }

    /// A whole set as read from the backend (one "read" for the guard).
    pub(crate) fn offer(&self, set: Vec<Instance>) -> Offer {
        let set = normalize(set);
        let service = self.service.to_string();
        metrics::counter!(telemetry::READS_TOTAL, "service" => service.clone(), "outcome" => "ok")
            .increment(1);
        metrics::gauge!(telemetry::STALENESS_SECONDS, "service" => service.clone()).set(0.0);
        let outcome = {
            let mut st = self.state();
            st.last_ok = Some(Instant::now());
            let current = self.set.load();
            if **current == set {
                // The set in force, read again: a run of suspicious reads is broken, so separate
                // blips never add up to a "persisting" shrink.
                st.guard.pending = 0;
                Offer::Unchanged
            } else {
                match st.guard.check(current.len(), set.len()) {
                    GuardDecision::Hold => Offer::Held,
                    GuardDecision::Apply => Offer::Applied,
                }
            }
        };
        match outcome {
            Offer::Held => {
                tracing::warn!(service = %self.service, current = self.set.load().len(), offered = set.len(),
                    "discovery answer shrinks the set too much; keeping the last known set until it persists");
            }
            Offer::Applied => {
                metrics::gauge!(telemetry::INSTANCES, "service" => service.clone())
                    .set(set.len() as f64);
                tracing::debug!(service = %self.service, instances = set.len(), "instance set updated");
                self.write_cache(&set);
                publish(&self.set, set);
            }
            Offer::Unchanged => {}
        }
        let label = match outcome {
            Offer::Applied => "applied",
            Offer::Held => "held",
            Offer::Unchanged => "unchanged",
        };
        metrics::counter!(telemetry::UPDATES_TOTAL, "service" => service, "outcome" => label)
            .increment(1);
        self.ready.send_replace(true);
        outcome
    }

    /// The backend could not be read: keep the set, grow the staleness, and at start fall back
    /// to the on-disk cache.
    pub(crate) fn failed(&self, error: &DiscoveryError) {
        let service = self.service.to_string();
        metrics::counter!(telemetry::READS_TOTAL, "service" => service.clone(), "outcome" => "error")
            .increment(1);
        let (stale, try_cache) = {
            let mut st = self.state();
            let try_cache = st.last_ok.is_none() && !st.cache_tried;
            st.cache_tried = true;
            (st.last_ok.map(|t| t.elapsed().as_secs_f64()), try_cache)
        };
        if let Some(s) = stale {
            metrics::gauge!(telemetry::STALENESS_SECONDS, "service" => service).set(s);
        }
        tracing::warn!(service = %self.service, %error, "discovery backend unreachable; keeping the last known set");
        if try_cache {
            if let Some(set) = self.read_cache() {
                tracing::warn!(service = %self.service, instances = set.len(), "using the on-disk cache of the last good set");
                self.set.store(normalize(set));
            }
            self.ready.send_replace(true);
        }
    }

    fn read_cache(&self) -> Option<Vec<Instance>> {
        let path = self.cache.as_ref()?;
        let bytes = std::fs::read(path).ok()?;
        match serde_json::from_slice::<Vec<Instance>>(&bytes) {
            Ok(v) => Some(v.into_iter().filter(|i| i.validate().is_ok()).collect()),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "ignoring unreadable discovery cache");
                None
            }
        }
    }

    fn write_cache(&self, set: &[Instance]) {
        let Some(path) = self.cache.clone() else {
            return;
        };
        if set.is_empty() {
            return;
        }
        let Ok(json) = serde_json::to_vec(set) else {
            return;
        };
        let write = move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, json)?;
            std::fs::rename(&tmp, &path)
        };
        // Small and rare (only when the set changes): written in place, before publishing.
        if let Err(error) = write() {
            tracing::warn!(%error, "cannot write the discovery cache");
        }
    }
}

/// The last step of reading a record from a backend: an instance that is valid and belongs to
/// `service` is kept; anything else is skipped, counted as malformed and logged, so one bad
/// record never stops a watcher nor empties a set.
pub(crate) fn accept_record(
    service: &ServiceName,
    backend: &'static str,
    key: &str,
    parsed: Result<Instance, String>,
) -> Option<Instance> {
    let checked = parsed.and_then(|i| {
        i.validate().map_err(|e| e.to_string())?;
        if &i.service == service {
            Ok(i)
        } else {
            Err(format!("belongs to service {}", i.service))
        }
    });
    match checked {
        Ok(i) => Some(i),
        Err(reason) => {
            telemetry::malformed(service.as_str(), backend);
            tracing::warn!(%service, key, %reason, "skipping malformed discovery record");
            None
        }
    }
}

/// The publishers of a backend, one per watched service.
pub(crate) type Publishers = Mutex<BTreeMap<ServiceName, Arc<Publisher>>>;

/// The watch of `service`: the existing publisher's, or a new publisher whose backend watcher
/// (`watcher(publisher)`) is spawned on the current runtime inside a `keel.discovery.watch` span.
pub(crate) fn watch_or_spawn<F, Fut>(
    publishers: &Publishers,
    service: &ServiceName,
    safety: &SafetyOptions,
    backend: &'static str,
    watcher: F,
) -> Result<InstanceWatch, DiscoveryError>
where
    F: FnOnce(Arc<Publisher>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument;
    let mut ps = keel_core::lock(publishers);
    if let Some(p) = ps.get(service) {
        return Ok(p.watch());
    }
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        DiscoveryError::Config("watch must be called inside a tokio runtime".into())
    })?;
    let p = Publisher::new(service.clone(), safety);
    ps.insert(service.clone(), p.clone());
    let span = tracing::info_span!("keel.discovery.watch", backend, %service);
    handle.spawn(watcher(p.clone()).instrument(span));
    Ok(p.watch())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn inst(port: u16) -> Instance {
        Instance::new(
            ServiceName::new("svc").unwrap(),
            format!("127.0.0.1:{port}").parse().unwrap(),
        )
    }

    proptest! {
        #[test]
        fn guard_never_applies_an_empty_set_on_first_read(current in 1usize..1000) {
            let mut g = ShrinkGuard::new(Ratio::new(0.5).unwrap(), 2);
            prop_assert_eq!(g.check(current, 0), GuardDecision::Hold);
            prop_assert_eq!(g.check(current, current), GuardDecision::Apply);
        }
    }

    #[tokio::test]
    async fn publisher_holds_a_bogus_empty_answer_and_uses_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SafetyOptions {
            cache_dir: Some(dir.path().to_owned()),
            ..Default::default()
        };
        let p = Publisher::new(ServiceName::new("svc").unwrap(), &opts);
        let four: Vec<_> = (1..=4).map(inst).collect();
        assert_eq!(p.offer(four.clone()), Offer::Applied);
        assert_eq!(p.offer(four.clone()), Offer::Unchanged);
        assert_eq!(p.offer(vec![]), Offer::Held);
        assert_eq!(p.offer(vec![inst(1)]), Offer::Held);
        assert_eq!(p.current().len(), 4);
        assert_eq!(
            p.offer(vec![inst(1), inst(2)]),
            Offer::Applied,
            "-50% is allowed"
        );
        // A fresh publisher whose backend is down uses the cache.
        let q = Publisher::new(ServiceName::new("svc").unwrap(), &opts);
        let w = q.watch();
        assert!(!w.is_ready());
        q.failed(&DiscoveryError::unavailable("redis", "down"));
        assert!(w.is_ready());
        assert_eq!(w.snapshot().len(), 2);
    }

    #[test]
    fn separate_blips_are_not_a_persisting_shrink() {
        let p = Publisher::new(ServiceName::new("svc").unwrap(), &SafetyOptions::default());
        let four: Vec<_> = (1..=4).map(inst).collect();
        assert_eq!(p.offer(four.clone()), Offer::Applied);
        // An empty answer now and then, the full set read in between: never three in a row.
        for _ in 0..5 {
            assert_eq!(p.offer(vec![]), Offer::Held);
            assert_eq!(p.offer(four.clone()), Offer::Unchanged);
        }
        assert_eq!(p.current().len(), 4);
    }
}
