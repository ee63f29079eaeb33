use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

/// What [`Live::load`] returns: a cheap, short-lived view of the current value.
///
/// Hold it for one unit of work, never across an `.await`: a held guard keeps the old value alive
/// and, past a handful per thread, makes loads slower.
pub type LiveGuard<T> = arc_swap::Guard<Arc<T>>;

/// A receiver of change notifications: the value is the generation of the [`Live`].
pub type LiveWatch = watch::Receiver<u64>;

type Child<T> = Box<dyn Fn(&Arc<T>) -> bool + Send + Sync>;

struct Shared<T> {
    value: Arc<ArcSwap<T>>,
    generation: watch::Sender<u64>,
    /// The generation again, as one atomic load for hot paths (the watch takes a read lock).
    version: AtomicU64,
    /// Serialises writers, and holds the projections to update on each write.
    writers: Mutex<Vec<Child<T>>>,
}

/// A hot value: read on every call with one lock-free load, replaced whole by a reload.
///
/// Readers see either the old value or the new one, never a mix. Every write bumps the
/// generation and wakes [`subscribe`](Live::subscribe)rs. A component that needs only a part of
/// a larger document takes a [`project`](Live::project)ion, which changes only when its part does.
///
/// Cloning a `Live` is cheap and yields another handle to the same value.
///
/// ```
/// use keel_core::Live;
///
/// #[derive(Debug, PartialEq)]
/// struct Doc { timeout_ms: u64, name: &'static str }
///
/// let doc = Live::new(Doc { timeout_ms: 800, name: "a" });
/// let timeout = doc.project(|d| d.timeout_ms);
/// assert_eq!(**timeout.load(), 800);
///
/// doc.store(Doc { timeout_ms: 800, name: "b" });
/// assert_eq!(timeout.generation(), 0, "the projected part did not change");
/// doc.store(Doc { timeout_ms: 250, name: "b" });
/// assert_eq!(**timeout.load(), 250);
/// assert_eq!(doc.generation(), 2);
/// ```
pub struct Live<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live")
            .field("generation", &self.generation())
            .field("value", &**self.load())
            .finish()
    }
}

impl<T: Default> Default for Live<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> Live<T> {
    /// A live value starting at `value`, generation 0.
    pub fn new(value: T) -> Self {
        Self::from_arc(Arc::new(value))
    }

    /// A live value that nobody is expected to change: for tests and for fixed policies.
    /// It is an ordinary `Live` (a test may still [`store`](Live::store) into it).
    pub fn constant(value: T) -> Self {
        Self::new(value)
    }

    /// A live value starting at an already shared value.
    pub fn from_arc(value: Arc<T>) -> Self {
        let (generation, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                value: Arc::new(ArcSwap::new(value)),
                generation,
                version: AtomicU64::new(0),
                writers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The current value: one lock-free load. Load once per unit of work and keep the guard for
    /// that unit only, so the whole unit sees one consistent value.
    #[inline]
    pub fn load(&self) -> LiveGuard<T> {
        self.shared.value.load()
    }

    /// A cache for the hottest paths: its `load` is a generation check (about a nanosecond)
    /// while the value is unchanged. Each thread or component keeps its own (`load` takes
    /// `&mut self`); it holds the value it last saw alive until it loads again.
    pub fn cache(&self) -> LiveCache<T> {
        LiveCache {
            cache: arc_swap::Cache::new(self.shared.value.clone()),
        }
    }

    /// The current value as an owned `Arc`, for holding across `.await` points.
    #[inline]
    pub fn get(&self) -> Arc<T> {
        self.shared.value.load_full()
    }

    /// How many times the value has been replaced: one atomic load, cheap enough to check per
    /// call whether something derived from the value still holds.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.shared.version.load(Ordering::Acquire)
    }

    /// A receiver that is told each time the value is replaced (it carries the generation).
    pub fn subscribe(&self) -> LiveWatch {
        self.shared.generation.subscribe()
    }

    /// Replaces the value; readers see it on their next load.
    pub fn store(&self, value: T) {
        self.store_arc(Arc::new(value));
    }

    /// Replaces the value with an already shared one.
    pub fn store_arc(&self, value: Arc<T>) {
        let mut children = crate::lock(&self.shared.writers);
        self.shared.value.store(value.clone());
        // After the value: whoever reads generation `g` then loads sees at least value `g`.
        self.shared.version.fetch_add(1, Ordering::Release);
        self.shared.generation.send_modify(|g| *g += 1);
        children.retain(|update| update(&value));
    }

    /// Replaces the value only if `value` differs from the current one; says whether it did.
    pub fn store_if_changed(&self, value: T) -> bool
    where
        T: PartialEq,
    {
        if **self.load() == value {
            return false;
        }
        self.store(value);
        true
    }

    /// A live view of a part of this value. It is updated whenever this value is stored, and
    /// bumps its own generation only when the part actually changed.
    pub fn project<U, F>(&self, f: F) -> Live<U>
    where
        U: PartialEq + Send + Sync + 'static,
        F: Fn(&T) -> U + Send + Sync + 'static,
        T: Send + Sync + 'static,
    {
        let mut children = crate::lock(&self.shared.writers);
        let child = Live::new(f(&self.load()));
        let weak: Weak<Shared<U>> = Arc::downgrade(&child.shared);
        children.push(Box::new(move |parent: &Arc<T>| match weak.upgrade() {
            Some(shared) => {
                Live { shared }.store_if_changed(f(parent));
                true
            }
            None => false,
        }));
        child
    }

    /// Waits until the value is replaced after `seen` (a generation), and returns the new
    /// generation. Returns at once if it already was.
    pub async fn changed_since(&self, seen: u64) -> u64 {
        let mut rx = self.subscribe();
        let seen_now = rx.wait_for(|g| *g > seen).await.map(|g| *g);
        // The sender lives in `self`, so it cannot be closed while we hold `self`.
        seen_now.unwrap_or_else(|_| self.generation())
    }
}

/// A per-thread cache of a [`Live`] value; see [`Live::cache`].
pub struct LiveCache<T> {
    cache: arc_swap::Cache<Arc<ArcSwap<T>>, Arc<T>>,
}

impl<T> LiveCache<T> {
    /// The current value; cheap while it has not changed.
    #[inline]
    pub fn load(&mut self) -> &Arc<T> {
        self.cache.load()
    }
}

impl<T> Clone for LiveCache<T> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for LiveCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveCache").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        thread,
    };

    #[test]
    fn cache_follows_stores() {
        let l = Live::new(1);
        let mut c = l.cache();
        assert_eq!(**c.load(), 1);
        l.store(2);
        assert_eq!(**c.load(), 2);
    }

    #[test]
    fn store_and_generation() {
        let l = Live::new(1);
        assert_eq!(**l.load(), 1);
        assert_eq!(l.generation(), 0);
        l.store(2);
        assert_eq!(*l.get(), 2);
        assert_eq!(l.generation(), 1);
        assert!(!l.store_if_changed(2));
        assert!(l.store_if_changed(3));
        assert_eq!(l.generation(), 2);
    }

    #[tokio::test]
    async fn subscribe_sees_changes() {
        let l = Live::new("a");
        let mut rx = l.subscribe();
        let l2 = l.clone();
        let t = tokio::spawn(async move { l2.changed_since(0).await });
        l.store("b");
        assert_eq!(t.await.unwrap(), 1);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), 1);
    }

    #[test]
    fn projections_follow_and_are_pruned() {
        #[derive(Debug, Clone, PartialEq)]
        struct Doc {
            a: u32,
            b: u32,
        }
        let doc = Live::new(Doc { a: 1, b: 1 });
        let a = doc.project(|d| d.a);
        {
            let b = doc.project(|d| d.b);
            doc.store(Doc { a: 1, b: 2 });
            assert_eq!(**b.load(), 2);
        }
        assert_eq!(a.generation(), 0);
        doc.store(Doc { a: 5, b: 2 });
        assert_eq!(**a.load(), 5);
        assert_eq!(a.generation(), 1);
        // The dropped projection of `b` was pruned on that store.
        assert_eq!(doc.shared.writers.lock().unwrap().len(), 1);
        // Projection of a projection.
        let a2 = a.project(|v| v * 2);
        doc.store(Doc { a: 7, b: 2 });
        assert_eq!(**a2.load(), 14);
    }

    #[test]
    fn readers_never_see_a_torn_value() {
        // Two fields that a writer always keeps equal; readers check they always are.
        let l = Live::new((0u64, 0u64));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let l = l.clone();
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut n = 0u64;
                    // At least 1,000 reads each, however the threads get scheduled.
                    while n < 1_000 || !stop.load(Ordering::Relaxed) {
                        let v = l.load();
                        assert_eq!(v.0, v.1);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        for i in 1..=2_000 {
            l.store((i, i));
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
        assert_eq!(l.generation(), 2_000);
    }
}
