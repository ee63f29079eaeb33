//! What a watcher of a service holds: one [`Live`] snapshot, and changes derived from it.
//!
//! Every backend publishes whole sets (sorted by id) into a `Live<Vec<Instance>>`. A balancer on
//! the hot path reads the set with one lock-free load; code that wants increments (tower's
//! `Discover`, logs) asks for [`Changes`], which are computed by diffing consecutive snapshots.
//! Diffing snapshots instead of forwarding backend events means a slow consumer never falls
//! behind or misses an event: it skips straight to the newest set.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::{stream::BoxStream, Stream, StreamExt};
use keel_core::{Instance, InstanceId, Live, ServiceName};
use tokio::sync::watch;

use crate::DiscoveryError;

/// One change to the set of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An instance appeared, or changed (weight, state, tags...): replace what you had.
    Insert(Instance),
    /// An instance left.
    Remove(InstanceId),
}

/// The changes that turn `old` into `new`; both must be sorted by id (as published sets are).
pub fn diff(old: &[Instance], new: &[Instance]) -> Vec<Change> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if o.id == n.id => {
                if o != n {
                    out.push(Change::Insert(n.clone()));
                }
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o.id < n.id => {
                out.push(Change::Remove(o.id.clone()));
                i += 1;
            }
            (Some(_), Some(n)) | (None, Some(n)) => {
                out.push(Change::Insert(n.clone()));
                j += 1;
            }
            (Some(o), None) => {
                out.push(Change::Remove(o.id.clone()));
                i += 1;
            }
            (None, None) => break,
        }
    }
    out
}

/// Sorts a set by id and drops duplicate ids (the last one read wins).
///
/// Sets usually arrive sorted (Redis and memory keep them by id), so that is checked first in
/// one pass; otherwise indices are sorted rather than 200-byte instances.
pub(crate) fn normalize(set: Vec<Instance>) -> Vec<Instance> {
    if set.windows(2).all(|w| w[0].id < w[1].id) {
        return set;
    }
    // Sort compact (key, index) pairs, not the instances: fewer bytes moved, better locality.
    // Ties (duplicate ids) put the later one first, so dedup keeps the last one read.
    let mut keys: Vec<(&str, u32)> = set
        .iter()
        .enumerate()
        .map(|(i, x)| (x.id.as_str(), i as u32))
        .collect();
    keys.sort_unstable_by(|a, b| a.0.cmp(b.0).then(b.1.cmp(&a.1)));
    let order: Vec<u32> = keys.into_iter().map(|(_, i)| i).collect();
    let mut slots: Vec<Option<Instance>> = set.into_iter().map(Some).collect();
    let mut out: Vec<Instance> = Vec::with_capacity(slots.len());
    for i in order {
        if let Some(inst) = slots[i as usize].take() {
            if out.last().is_some_and(|l| l.id == inst.id) {
                continue;
            }
            out.push(inst);
        }
    }
    out
}

/// Replaces a live set, freeing the old one off the calling task when it is large: dropping
/// 10,000 instances (their strings and maps) costs more than building the new set.
pub(crate) fn publish(live: &Live<Vec<Instance>>, set: Vec<Instance>) {
    let old = live.get();
    live.store(set);
    drop_later(old);
}

fn drop_later(old: Arc<Vec<Instance>>) {
    use std::sync::{mpsc, Mutex, OnceLock};
    type Dropper = Mutex<Option<mpsc::Sender<Arc<Vec<Instance>>>>>;
    static DROPPER: OnceLock<Dropper> = OnceLock::new();
    if old.len() < 1_000 || Arc::strong_count(&old) > 1 {
        return;
    }
    let dropper = DROPPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Arc<Vec<Instance>>>();
        let spawned = std::thread::Builder::new()
            .name("keel-discovery-drop".into())
            .spawn(move || while rx.recv().is_ok() {});
        Mutex::new(spawned.ok().map(|_| tx))
    });
    let guard = keel_core::lock(dropper);
    if let Some(tx) = guard.as_ref() {
        // If the thread is gone, the value comes back in the error and is dropped here.
        let _ = tx.send(old);
    }
}

/// A watch on one service: the current set as a [`Live`] snapshot, plus [`Changes`].
///
/// Cloning is cheap; every clone sees the same set.
#[derive(Clone, Debug)]
pub struct InstanceWatch {
    service: ServiceName,
    set: Live<Vec<Instance>>,
    ready: watch::Receiver<bool>,
}

impl InstanceWatch {
    pub(crate) fn new(
        service: ServiceName,
        set: Live<Vec<Instance>>,
        ready: watch::Receiver<bool>,
    ) -> Self {
        Self {
            service,
            set,
            ready,
        }
    }

    /// The service watched.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// The live set: `load()` once per request for a consistent view, `subscribe()` to be told
    /// of changes. Sorted by instance id.
    pub fn live(&self) -> &Live<Vec<Instance>> {
        &self.set
    }

    /// The current set, owned (for holding across `.await`).
    pub fn snapshot(&self) -> Arc<Vec<Instance>> {
        self.set.get()
    }

    /// Waits until the backend has answered once, or failed once (the on-disk cache, if any,
    /// is then in force), so that an empty set means "no instances" rather than "not read yet".
    pub async fn ready(&self) {
        let mut rx = self.ready.clone();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Whether the backend has answered once.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// A stream of changes, starting with an `Insert` for every instance present now.
    pub fn changes(&self) -> Changes {
        struct State {
            set: Live<Vec<Instance>>,
            rx: watch::Receiver<u64>,
            last: Arc<Vec<Instance>>,
            queue: VecDeque<Change>,
        }
        let state = State {
            rx: self.set.subscribe(),
            set: self.set.clone(),
            last: Arc::new(Vec::new()),
            queue: VecDeque::new(),
        };
        let stream = futures_util::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(c) = s.queue.pop_front() {
                    return Some((c, s));
                }
                let current = s.set.get();
                if !Arc::ptr_eq(&current, &s.last) {
                    s.queue.extend(diff(&s.last, &current));
                    s.last = current;
                    continue;
                }
                s.rx.changed().await.ok()?;
            }
        });
        Changes {
            inner: stream.boxed(),
        }
    }

    /// An adapter to [`tower::discover::Discover`], keyed by instance id, for tower's balancers.
    pub fn into_tower(self) -> TowerDiscover {
        TowerDiscover {
            changes: self.changes(),
        }
    }
}

/// Changes to a watched set, computed by diffing snapshots; see [`InstanceWatch::changes`].
pub struct Changes {
    inner: BoxStream<'static, Change>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes").finish_non_exhaustive()
    }
}

impl Stream for Changes {
    type Item = Change;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Change>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// [`tower::discover::Discover`] over a watched set: `Change::Insert(InstanceId, Instance)` and
/// `Change::Remove(InstanceId)`. An instance that changes is inserted again under the same key.
#[derive(Debug)]
pub struct TowerDiscover {
    changes: Changes,
}

impl Stream for TowerDiscover {
    type Item = Result<tower::discover::Change<InstanceId, Instance>, DiscoveryError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.changes.poll_next_unpin(cx).map(|c| {
            c.map(|c| {
                Ok(match c {
                    Change::Insert(i) => tower::discover::Change::Insert(i.id.clone(), i),
                    Change::Remove(id) => tower::discover::Change::Remove(id),
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn inst(port: u16, weight: u32) -> Instance {
        Instance::new(
            ServiceName::new("svc").unwrap(),
            format!("127.0.0.1:{port}").parse().unwrap(),
        )
        .with_weight(weight)
    }

    fn apply(old: &[Instance], changes: &[Change]) -> Vec<Instance> {
        let mut m: std::collections::BTreeMap<InstanceId, Instance> =
            old.iter().map(|i| (i.id.clone(), i.clone())).collect();
        for c in changes {
            match c {
                Change::Insert(i) => {
                    m.insert(i.id.clone(), i.clone());
                }
                Change::Remove(id) => {
                    m.remove(id);
                }
            }
        }
        m.into_values().collect()
    }

    #[test]
    fn normalize_sorts_and_keeps_the_last_duplicate() {
        let set = vec![inst(3, 1), inst(1, 1), inst(3, 2), inst(2, 1)];
        let n = normalize(set);
        assert_eq!(n, vec![inst(1, 1), inst(2, 1), inst(3, 2)]);
        assert_eq!(normalize(n.clone()), n);
    }

    proptest! {
        #[test]
        fn diff_turns_old_into_new(
            a in proptest::collection::vec((1u16..40, 1u32..3), 0..30),
            b in proptest::collection::vec((1u16..40, 1u32..3), 0..30),
        ) {
            let old = normalize(a.into_iter().map(|(p, w)| inst(p, w)).collect());
            let new = normalize(b.into_iter().map(|(p, w)| inst(p, w)).collect());
            let changes = diff(&old, &new);
            prop_assert_eq!(apply(&old, &changes), new.clone());
            prop_assert!(diff(&new, &new).is_empty());
        }
    }

    #[tokio::test]
    async fn changes_and_tower_adapter_follow_the_live_set() {
        use tower::discover::Discover as _;
        let set = Live::new(vec![inst(1, 1)]);
        let (_tx, rx) = watch::channel(true);
        let w = InstanceWatch::new(ServiceName::new("svc").unwrap(), set.clone(), rx);
        let mut changes = w.changes();
        assert_eq!(changes.next().await, Some(Change::Insert(inst(1, 1))));
        set.store(vec![inst(2, 1)]);
        let mut got = [changes.next().await.unwrap(), changes.next().await.unwrap()];
        got.sort_by_key(|c| matches!(c, Change::Insert(_)));
        assert_eq!(got[0], Change::Remove(inst(1, 1).id));
        let mut tower = Box::pin(w.clone().into_tower());
        let first = std::future::poll_fn(|cx| tower.as_mut().poll_discover(cx))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(first, tower::discover::Change::Insert(id, _) if id == inst(2, 1).id));
    }
}
