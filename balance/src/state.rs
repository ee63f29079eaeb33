//! What the balancer learns about each instance: in-flight count, peak EWMA latency, nginx
//! passive-health failures and effective weight, Envoy outlier counters and ejections.
//!
//! It is kept in atomics keyed by the stable `InstanceId`, beside the pick tables and never inside
//! them, so a reload or a weight change keeps it. Times are nanoseconds since the balancer's
//! [`Clock`] base, read from `tokio::time::Instant` so tests can pause and advance time.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::time::Instant;

/// Monotonic nanoseconds since a base instant. 0 means "never", so `now()` is at least 1.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    base: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    #[inline]
    pub(crate) fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }
}

pub(crate) fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX / 4)) as u64
}

/// Per-instance state. Fields are public to the crate: the picker, the outlier detector and the
/// snapshot read and write them. The fields a pick reads come first, on one cache line.
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct InstanceState {
    pub(crate) in_flight: AtomicU32,
    pub(crate) passive_until: AtomicU64,
    pub(crate) ejected_until: AtomicU64,
    /// Peak EWMA of the RTT in ns, as `f64` bits. 0 = no observation yet.
    pub(crate) ewma_bits: AtomicU64,
    /// When the EWMA was last updated (ns since the clock base).
    ewma_at: AtomicU64,
    /// Start of the slow-start ramp (0 = none).
    pub(crate) ramp_start: AtomicU64,
    /// Active health kept it out at the last rebuild: its return ramps up (slow start).
    pub(crate) active_down: AtomicBool,
    /// nginx SWRR `effective_weight`, lowered by failures and raised by one per pick.
    pub(crate) effective_weight: AtomicI64,
    /// Serialises EWMA updates.
    ewma_update: Mutex<()>,
    // nginx passive health.
    pub(crate) fails: AtomicU32,
    pub(crate) fail_window_start: AtomicU64,
    // Envoy outlier detection.
    pub(crate) consecutive_5xx: AtomicU32,
    pub(crate) consecutive_gateway: AtomicU32,
    pub(crate) window_success: AtomicU64,
    pub(crate) window_total: AtomicU64,
    pub(crate) times_ejected: AtomicU32,
    pub(crate) ejections_total: AtomicU64,
    pub(crate) reason: Mutex<Option<Arc<str>>>,
}

impl InstanceState {
    pub(crate) fn new(weight: u32, ramp_start: u64) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            ewma_bits: AtomicU64::new(0),
            ewma_at: AtomicU64::new(0),
            ewma_update: Mutex::new(()),
            fails: AtomicU32::new(0),
            fail_window_start: AtomicU64::new(0),
            passive_until: AtomicU64::new(0),
            effective_weight: AtomicI64::new(i64::from(weight)),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            window_success: AtomicU64::new(0),
            window_total: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            times_ejected: AtomicU32::new(0),
            ejections_total: AtomicU64::new(0),
            ramp_start: AtomicU64::new(ramp_start),
            active_down: AtomicBool::new(false),
            reason: Mutex::new(None),
        }
    }

    /// The EWMA in ns, or `default` before the first observation.
    #[inline]
    pub(crate) fn ewma_ns(&self, default: f64) -> f64 {
        let b = self.ewma_bits.load(Relaxed);
        if b == 0 {
            default
        } else {
            f64::from_bits(b)
        }
    }

    /// The EWMA as a pick sees it at `now`: decayed towards zero by `exp(-idle / decay)` since
    /// the last observation, as tower's and linkerd's `PeakEwma` do, so an instance that stopped
    /// being picked because it was slow is tried again once its peak has faded, instead of being
    /// shunned forever. (`exp` is skipped while the last observation is under 1% of `decay` old.)
    #[inline]
    pub(crate) fn ewma_cost_ns(&self, default: f64, now: u64, decay_ns: f64) -> f64 {
        let b = self.ewma_bits.load(Relaxed);
        if b == 0 {
            return default;
        }
        let v = f64::from_bits(b);
        let idle = now.saturating_sub(self.ewma_at.load(Relaxed)) as f64;
        if idle < decay_ns * 0.01 {
            v
        } else {
            v * (-idle / decay_ns).exp()
        }
    }

    /// A lower bound of a latency (an attempt abandoned after waiting `waited`): the estimate as
    /// a pick sees it now ([`ewma_cost_ns`](Self::ewma_cost_ns), decay included) becomes
    /// `waited` if that is longer, and is left alone otherwise.
    pub(crate) fn raise_rtt(&self, waited: Duration, now: u64, decay_ns: f64, default: f64) {
        let waited = waited.as_nanos() as f64;
        let _serial = keel_core::lock(&self.ewma_update);
        if waited > self.ewma_cost_ns(default, now, decay_ns) {
            self.ewma_at.store(now, Relaxed);
            self.ewma_bits.store(waited.max(1.0).to_bits(), Relaxed);
        }
    }

    /// Peak EWMA (Finagle's `PeakEwma`, as in linkerd and tower's `PeakEwma`): a sample above
    /// the estimate replaces it at once (be quick to notice a slow instance); below, the estimate
    /// decays towards it with weight `exp(-elapsed / decay)` (be slow to trust a recovery).
    pub(crate) fn observe_rtt(&self, rtt: Duration, now: u64, decay: Duration, default: f64) {
        let rtt = rtt.as_nanos() as f64;
        let _serial = keel_core::lock(&self.ewma_update);
        let prev = self.ewma_ns(default);
        let next = if rtt > prev {
            rtt
        } else {
            let elapsed = now.saturating_sub(self.ewma_at.load(Relaxed)) as f64;
            let w = (-elapsed / decay.as_nanos().max(1) as f64).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_at.store(now, Relaxed);
        self.ewma_bits.store(next.max(1.0).to_bits(), Relaxed);
    }

    #[inline]
    pub(crate) fn outlier_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Relaxed) > now
    }

    #[inline]
    pub(crate) fn passive_out(&self, now: u64) -> bool {
        self.passive_until.load(Relaxed) > now
    }

    pub(crate) fn set_reason(&self, reason: Option<String>) {
        let mut r = keel_core::lock(&self.reason);
        *r = reason.map(Arc::from);
    }

    pub(crate) fn reason(&self) -> Option<Arc<str>> {
        keel_core::lock(&self.reason).clone()
    }
}

/// Envoy slow-start factor `max(min, (t / window)^(1 / aggression))`, 1 outside the ramp.
#[inline]
pub(crate) fn slow_start_factor(
    ramp_start: u64,
    now: u64,
    window: u64,
    aggression: f64,
    min: f64,
) -> f64 {
    if ramp_start == 0 || window == 0 {
        return 1.0;
    }
    let t = now.saturating_sub(ramp_start);
    if t >= window {
        return 1.0;
    }
    let f = (t as f64 / window as f64).powf(1.0 / aggression);
    f.max(min).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let s = InstanceState::new(1, 0);
        let decay = Duration::from_secs(10);
        s.observe_rtt(Duration::from_millis(10), 1, decay, 30e6);
        assert!(
            (s.ewma_ns(0.0) - 30e6).abs() < 1.0,
            "below the default: decays from it"
        );
        s.observe_rtt(Duration::from_millis(100), 2, decay, 30e6);
        assert_eq!(s.ewma_ns(0.0), 100e6, "peak is taken at once");
        s.observe_rtt(Duration::from_millis(10), 2 + 10_000_000_000, decay, 30e6);
        let v = s.ewma_ns(0.0);
        let expected = 100e6 * (-1f64).exp() + 10e6 * (1.0 - (-1f64).exp());
        assert!((v - expected).abs() < 1.0, "{v} vs {expected}");
    }

    #[test]
    fn slow_start_ramp() {
        let w = 100;
        assert_eq!(slow_start_factor(0, 50, w, 1.0, 0.1), 1.0);
        assert_eq!(slow_start_factor(1, 1, w, 1.0, 0.1), 0.1);
        assert!((slow_start_factor(1, 51, w, 1.0, 0.1) - 0.5).abs() < 1e-9);
        assert!((slow_start_factor(1, 26, w, 2.0, 0.1) - 0.5).abs() < 1e-9);
        assert_eq!(slow_start_factor(1, 200, w, 1.0, 0.1), 1.0);
    }
}
