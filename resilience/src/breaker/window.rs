//! Sliding windows of call outcomes (Resilience4j's count-based ring and time-based buckets),
//! resizable without losing what they hold.

use std::collections::VecDeque;

use crate::config::WindowKind;

/// Calls, failures and slow calls in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

impl Totals {
    fn add(&mut self, o: Totals) {
        self.calls += o.calls;
        self.failures += o.failures;
        self.slow += o.slow;
    }
    fn sub(&mut self, o: Totals) {
        self.calls = self.calls.saturating_sub(o.calls);
        self.failures = self.failures.saturating_sub(o.failures);
        self.slow = self.slow.saturating_sub(o.slow);
    }
    fn one(failure: bool, slow: bool) -> Self {
        Totals {
            calls: 1,
            failures: failure as u32,
            slow: slow as u32,
        }
    }
}

const FAIL: u8 = 1;
const SLOW: u8 = 2;

/// A count-based or time-based window.
#[derive(Debug)]
pub(crate) enum Window {
    Count {
        ring: VecDeque<u8>,
        size: usize,
        totals: Totals,
    },
    Time {
        /// (second, totals of that second), oldest first.
        buckets: VecDeque<(u64, Totals)>,
        secs: u64,
        totals: Totals,
    },
}

impl Window {
    pub(crate) fn new(kind: WindowKind, size: u32) -> Self {
        match kind {
            WindowKind::Count => Window::Count {
                ring: VecDeque::with_capacity(size as usize),
                size: size.max(1) as usize,
                totals: Totals::default(),
            },
            WindowKind::Time => Window::Time {
                buckets: VecDeque::new(),
                secs: size.max(1) as u64,
                totals: Totals::default(),
            },
        }
    }

    pub(crate) fn matches(&self, kind: WindowKind, size: u32) -> bool {
        match self {
            Window::Count { size: s, .. } => kind == WindowKind::Count && *s == size as usize,
            Window::Time { secs, .. } => kind == WindowKind::Time && *secs == size as u64,
        }
    }

    /// A count window holding its full `size` calls, none failed or slow: recording a fast
    /// success into it changes nothing (a clean call replaces a clean call).
    pub(crate) fn full_and_clean(&self) -> bool {
        match self {
            Window::Count { ring, size, totals } => {
                ring.len() == *size && totals.failures == 0 && totals.slow == 0
            }
            Window::Time { .. } => false,
        }
    }

    /// Records one call at second `now`.
    pub(crate) fn record(&mut self, now: u64, failure: bool, slow: bool) {
        match self {
            Window::Count { ring, size, totals } => {
                if ring.len() == *size {
                    if let Some(old) = ring.pop_front() {
                        totals.sub(Totals::one(old & FAIL != 0, old & SLOW != 0));
                    }
                }
                ring.push_back((failure as u8 * FAIL) | (slow as u8 * SLOW));
                totals.add(Totals::one(failure, slow));
            }
            Window::Time {
                buckets, totals, ..
            } => {
                let t = Totals::one(failure, slow);
                match buckets.back_mut() {
                    Some((s, b)) if *s == now => b.add(t),
                    _ => buckets.push_back((now, t)),
                }
                totals.add(t);
                self.expire(now);
            }
        }
    }

    fn expire(&mut self, now: u64) {
        if let Window::Time {
            buckets,
            secs,
            totals,
        } = self
        {
            while let Some((s, b)) = buckets.front() {
                if s + *secs <= now {
                    totals.sub(*b);
                    buckets.pop_front();
                } else {
                    break;
                }
            }
        }
    }

    /// The totals as of second `now`.
    pub(crate) fn totals(&mut self, now: u64) -> Totals {
        self.expire(now);
        match self {
            Window::Count { totals, .. } | Window::Time { totals, .. } => *totals,
        }
    }

    pub(crate) fn clear(&mut self) {
        match self {
            Window::Count { ring, totals, .. } => {
                ring.clear();
                *totals = Totals::default();
            }
            Window::Time {
                buckets, totals, ..
            } => {
                buckets.clear();
                *totals = Totals::default();
            }
        }
    }

    /// A window of another kind or size holding what this one holds: a count window keeps its
    /// most recent calls; a time window keeps its buckets still inside the new span. Between
    /// kinds, the totals move (a count window's calls land in the current second; a time
    /// window's totals become the newest calls of the ring, in proportion).
    pub(crate) fn resized(&mut self, kind: WindowKind, size: u32, now: u64) -> Window {
        let mut new = Window::new(kind, size);
        match (std::mem::replace(self, Window::new(kind, size)), &mut new) {
            (Window::Count { ring, .. }, Window::Count { .. }) => {
                for b in ring {
                    new.record(now, b & FAIL != 0, b & SLOW != 0);
                }
            }
            (Window::Time { buckets, .. }, Window::Time { .. }) => {
                for (s, b) in buckets {
                    if let Window::Time {
                        buckets: nb,
                        totals,
                        ..
                    } = &mut new
                    {
                        nb.push_back((s, b));
                        totals.add(b);
                    }
                }
                new.expire(now);
            }
            (Window::Count { ring, .. }, Window::Time { .. }) => {
                for b in ring {
                    new.record(now, b & FAIL != 0, b & SLOW != 0);
                }
            }
            (Window::Time { mut totals, .. }, Window::Count { size, .. }) => {
                // Spread the aggregate over the ring, failures and slow calls interleaved.
                let n = (totals.calls as usize).min(*size);
                let scale = |x: u32| (x as u64 * n as u64 / totals.calls.max(1) as u64) as u32;
                totals = Totals {
                    calls: n as u32,
                    failures: scale(totals.failures),
                    slow: scale(totals.slow),
                };
                for i in 0..totals.calls {
                    new.record(now, i < totals.failures, i < totals.slow);
                }
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn count_window_rolls() {
        let mut w = Window::new(WindowKind::Count, 3);
        w.record(0, true, false);
        w.record(0, false, true);
        w.record(0, false, false);
        w.record(0, false, false);
        assert_eq!(
            w.totals(0),
            Totals {
                calls: 3,
                failures: 0,
                slow: 1
            }
        );
    }

    #[test]
    fn time_window_expires() {
        let mut w = Window::new(WindowKind::Time, 2);
        w.record(0, true, false);
        w.record(1, false, false);
        assert_eq!(w.totals(1).calls, 2);
        assert_eq!(
            w.totals(2),
            Totals {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
        assert_eq!(w.totals(5).calls, 0);
    }

    proptest! {
        #[test]
        fn resizing_keeps_recent_counts(outcomes in proptest::collection::vec(any::<(bool, bool)>(), 0..200), a in 1u32..100, b in 1u32..100) {
            let mut w = Window::new(WindowKind::Count, a);
            for (f, s) in &outcomes { w.record(0, *f, *s); }
            let mut w2 = w.resized(WindowKind::Count, b, 0);
            let keep = outcomes.len().min(a as usize).min(b as usize);
            let tail = &outcomes[outcomes.len() - keep..];
            let expect = Totals {
                calls: keep as u32,
                failures: tail.iter().filter(|o| o.0).count() as u32,
                slow: tail.iter().filter(|o| o.1).count() as u32,
            };
            prop_assert_eq!(w2.totals(0), expect);
            // Count -> time -> count keeps the totals when they fit.
            let mut t = w2.resized(WindowKind::Time, 10, 0);
            prop_assert_eq!(t.totals(0), expect);
            let mut back = t.resized(WindowKind::Count, 200, 0);
            prop_assert_eq!(back.totals(0), expect);
        }
    }
}
