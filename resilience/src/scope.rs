//! The call context a retry layer hands to the per-try layers below it: the clock reading it
//! took and the call's total deadline.
//!
//! `Service::call` is synchronous, so while the retry layer is inside `inner.call(req)` every
//! layer below it that builds its future in `call` (the breaker, bulkhead, rate limit and per-try
//! timeout of [`ClientStack`](crate::ClientStack)) runs on this thread, inside this scope. Handing
//! the deadline over here instead of as a `Deadline` request extension saves the extension map
//! (three allocations per call), and handing the clock reading over saves a clock read per layer.
//!
//! A consumer *takes* the context, so it applies to the one attempt it was set for; a layer that
//! finds none (used without a retry layer above, or behind one that defers its call, such as a
//! buffer) falls back to the request's `Deadline` extension and its own clock reading.

use std::cell::Cell;

use tokio::time::Instant;

/// What a per-try layer needs from above: when the attempt starts, and the total deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallContext {
    pub(crate) now: Instant,
    pub(crate) deadline: Option<Instant>,
}

thread_local! {
    static CURRENT: Cell<Option<CallContext>> = const { Cell::new(None) };
}

/// Restores the previous context on drop (also when `call` panics).
struct Restore(Option<CallContext>);

impl Drop for Restore {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Runs `f` (a synchronous `call` of the layers below) with `ctx` available to them.
pub(crate) fn enter<R>(ctx: CallContext, f: impl FnOnce() -> R) -> R {
    let _restore = Restore(CURRENT.with(|c| c.replace(Some(ctx))));
    f()
}

/// Takes the context set for this attempt, if any.
pub(crate) fn take() -> Option<CallContext> {
    CURRENT.with(Cell::take)
}

/// The attempt's start and total deadline: the context set for it, taken, or else the clock now
/// and the request's [`Deadline`](keel_core::request::Deadline) extension.
pub(crate) fn take_for<B>(req: &http::Request<B>) -> (Instant, Option<Instant>) {
    match take() {
        Some(c) => (c.now, c.deadline),
        None => (
            Instant::now(),
            req.extensions()
                .get::<keel_core::request::Deadline>()
                .map(|d| d.0),
        ),
    }
}

/// The context set for this attempt, if any, without taking it.
#[cfg(test)]
pub(crate) fn peek() -> Option<CallContext> {
    CURRENT.with(Cell::get)
}

/// What a layer that calls its inner service later (after waiting for a slot, a Redis
/// decision, or a delay) takes along from its own `call`: the call context set above it, and
/// the attempt's end ([`keel_core::request::attempt_end`]) that the transport below sends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Handoff {
    call: Option<CallContext>,
    end: Option<Instant>,
}

impl Handoff {
    /// The call's total deadline, if a layer above set one.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.call.and_then(|c| c.deadline)
    }
}

/// The handoff of the `call` being made now (see [`Handoff`]).
pub(crate) fn handoff() -> Handoff {
    Handoff {
        call: CURRENT.with(Cell::get),
        end: keel_core::request::attempt_end(),
    }
}

/// Runs that later `call` as it would have run in the original one: in the same call context
/// (the same deadline, the clock read anew), so the per-try layer below still finds it, and
/// inside the same attempt end.
pub(crate) fn resume<R>(h: Handoff, f: impl FnOnce() -> R) -> R {
    keel_core::request::with_attempt_end(h.end, || match h.call {
        Some(c) => enter(
            CallContext {
                now: Instant::now(),
                deadline: c.deadline,
            },
            f,
        ),
        None => f(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn taken_once_and_restored_after() {
        let t = Instant::now();
        let outer = CallContext {
            now: t,
            deadline: Some(t + Duration::from_secs(1)),
        };
        let inner = CallContext {
            now: t,
            deadline: None,
        };
        assert_eq!(take(), None);
        enter(outer, || {
            assert_eq!(peek(), Some(outer));
            enter(inner, || {
                assert_eq!(take(), Some(inner));
                assert_eq!(take(), None);
            });
            // The nested scope ends: the outer context is back for its own consumer.
            assert_eq!(take(), Some(outer));
        });
        assert_eq!(take(), None);
    }
}
