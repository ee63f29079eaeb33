//! Request and response extensions through which keel's layers talk to each other without
//! depending on each other: the resilience layers above say which attempt this is and by when it
//! must finish; the balancer below says which instance served.

use std::net::SocketAddr;

use tokio::time::Instant;

use crate::InstanceId;

/// Request extension: the absolute deadline of the whole call, across every retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// Time left, zero if passed.
    pub fn remaining(&self) -> std::time::Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// Request extension: the route a server matched for the request (`/items/{id}`), set by the
/// server for a rate limit keyed by `path`, so that every URL of one route shares its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route(pub std::sync::Arc<str>);

/// Request extension: which attempt of a call this is. A balancer avoids the instances in
/// `avoid` (those that failed earlier attempts, or serve the other hedge) when it can.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first try, 2 for the first retry, ...
    pub number: u32,
    /// Whether this is a hedged (parallel) attempt.
    pub hedge: bool,
    /// Instances that earlier attempts of this call went to.
    pub avoid: Vec<InstanceId>,
}

/// Response (and error) extension: the instance that served the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedBy {
    /// Its id.
    pub id: InstanceId,
    /// Its address.
    pub addr: SocketAddr,
}

/// An error from one instance, with the instance it came from. Balancers wrap their inner
/// service's errors in it, so layers above (retry, per-instance breakers, outlier detection) can
/// tell which instance failed by downcasting, without depending on the balancer's crate.
#[derive(Debug, thiserror::Error)]
#[error("instance {} ({}) failed: {source}", served_by.id, served_by.addr)]
pub struct InstanceFailure {
    /// The instance.
    pub served_by: ServedBy,
    /// What went wrong.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The request was not sent: something below the balancer (an instance's own circuit breaker)
/// refused it before it left the process. A retry elsewhere is safe whatever the method, and it
/// says nothing about the upstream service as a whole, so service-wide breakers and limits do
/// not count it.
#[derive(Debug, thiserror::Error)]
#[error("not sent: {reason}")]
pub struct NotSent {
    /// Why.
    pub reason: String,
}

/// Whether an error (or any error in its source chain) is a [`NotSent`].
pub fn not_sent(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::find_in_chain::<NotSent>(err).is_some()
}

/// Request extension: a log the balancer appends each picked instance to, at pick time. Copies
/// of a request share it (extensions clone the `Arc`), so a hedge can send its attempt to
/// another instance while the first attempt is still running — before any answer says where
/// the first went.
#[derive(Debug, Clone, Default)]
pub struct Tried(std::sync::Arc<std::sync::Mutex<Vec<InstanceId>>>);

impl Tried {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a picked instance.
    pub fn record(&self, id: &InstanceId) {
        let mut v = crate::lock(&self.0);
        if !v.contains(id) {
            v.push(id.clone());
        }
    }

    /// The instances picked so far.
    pub fn snapshot(&self) -> Vec<InstanceId> {
        crate::lock(&self.0).clone()
    }
}

thread_local! {
    static ATTEMPT_END: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    /// The instance of the last attempt dropped unanswered on this thread ([`note_abandoned`]).
    static ABANDONED: std::cell::Cell<Option<ServedBy>> = const { std::cell::Cell::new(None) };
}

/// Notes that an attempt to `served_by` was dropped before it was answered. Balancers call it
/// from their pick's drop; a per-try timeout that has just dropped its attempt reads it with
/// [`take_abandoned`], so that its error names the instance that did not answer in time, and a
/// retry avoids it. Cold: nothing is noted for an attempt that is answered.
pub fn note_abandoned(served_by: ServedBy) {
    ABANDONED.with(|c| c.set(Some(served_by)));
}

/// Takes what [`note_abandoned`] noted last on this thread. Take it once before dropping an
/// attempt (to clear what an earlier one left) and once after.
pub fn take_abandoned() -> Option<ServedBy> {
    ABANDONED.with(std::cell::Cell::take)
}

/// Runs `f` (a synchronous `Service::call` of the layers below a per-try timeout) with `end` as
/// the end of the attempt being started, for the transport to read with [`attempt_end`] and send
/// downstream as the remaining budget. The effective end is the earlier of `end` and an end
/// already set around this call, so an attempt never claims more time than the one it is part
/// of. The previous value is restored when `f` returns or panics.
///
/// The bound travels on the thread rather than in the request: `call` is synchronous, so every
/// layer that builds its future in `call` runs inside this scope, and a layer that calls its
/// inner service later (a balancer waiting for an instance to be ready) keeps the value it read
/// here and runs that later `call` inside `with_attempt_end` again. Writing a header into a
/// request with no headers yet would allocate its map; the transport writes it instead, into
/// the map it builds anyway, with the time left when the request actually leaves.
///
/// ```
/// use keel_core::request::{attempt_end, with_attempt_end};
/// use tokio::time::{Duration, Instant};
///
/// let end = Instant::now() + Duration::from_millis(300);
/// assert_eq!(attempt_end(), None);
/// with_attempt_end(Some(end), || {
///     assert_eq!(attempt_end(), Some(end));
///     // A nested bound can only shorten the attempt.
///     with_attempt_end(Some(end + Duration::from_secs(1)), || assert_eq!(attempt_end(), Some(end)));
/// });
/// assert_eq!(attempt_end(), None);
/// ```
#[inline]
pub fn with_attempt_end<R>(end: Option<Instant>, f: impl FnOnce() -> R) -> R {
    let _scope = AttemptScope::enter(end);
    f()
}

/// The guard form of [`with_attempt_end`]: the bound applies until it is dropped. It cannot be
/// sent to another thread, so a `Send` future cannot hold it across an `.await` (where the
/// bound would leak into whatever else runs on the thread).
#[derive(Debug)]
#[must_use = "the bound applies only while the scope is alive"]
pub struct AttemptScope {
    outer: Option<Instant>,
    set: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl AttemptScope {
    /// Sets `end` (the earlier of it and any end already set) until the scope is dropped.
    #[inline]
    pub fn enter(end: Option<Instant>) -> Self {
        let Some(end) = end else {
            return Self {
                outer: None,
                set: false,
                _not_send: std::marker::PhantomData,
            };
        };
        let outer = ATTEMPT_END.with(|c| {
            let outer = c.get();
            c.set(Some(outer.map_or(end, |o| o.min(end))));
            outer
        });
        Self {
            outer,
            set: true,
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for AttemptScope {
    #[inline]
    fn drop(&mut self) {
        if self.set {
            ATTEMPT_END.with(|c| c.set(self.outer));
        }
    }
}

/// The end of the attempt being started on this thread, as set by [`with_attempt_end`] (by
/// keel-resilience's per-try timeout); `None` outside such a call or when it has no bound.
#[inline]
pub fn attempt_end() -> Option<Instant> {
    ATTEMPT_END.with(std::cell::Cell::get)
}
