//! Client-side adaptive throttling, from Google's *Site Reliability Engineering*, chapter 21
//! ("Handling Overload"): each client keeps, over a sliding window, the requests it attempted
//! and the requests the backend accepted, and rejects locally with probability
//! `max(0, (requests - K * accepts) / (requests + 1))`. Unlike a breaker there is no state to
//! flip: throttling rises smoothly with the backend's rejection rate and falls as it recovers.
//! K = 2 is the book's choice; lower is more aggressive.

use std::sync::Mutex;

use rand::{rngs::SmallRng, Rng, SeedableRng};
use tokio::time::Instant;

use super::window::Window;
use crate::config::{BreakerConfig, WindowKind};

/// The SRE throttle: requests and accepts over a window, and a local rejection probability.
#[derive(Debug)]
pub struct AdaptiveThrottle {
    inner: Mutex<(Window, SmallRng)>,
    base: Instant,
}

impl AdaptiveThrottle {
    /// A throttle with a fixed RNG seed.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            inner: Mutex::new((
                Window::new(WindowKind::Time, 60),
                SmallRng::seed_from_u64(seed),
            )),
            base: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_secs()
    }

    fn with<R>(
        &self,
        cfg: &BreakerConfig,
        f: impl FnOnce(&mut Window, &mut SmallRng, u64) -> R,
    ) -> R {
        let now = self.now();
        let mut g = keel_core::lock(&self.inner);
        let secs = cfg.adaptive_window.as_secs().clamp(1, 3600) as u32;
        if !g.0.matches(WindowKind::Time, secs) {
            g.0 = g.0.resized(WindowKind::Time, secs, now);
        }
        let (w, rng) = &mut *g;
        f(w, rng, now)
    }

    /// The current local rejection probability.
    pub fn rejection_probability(&self, cfg: &BreakerConfig) -> f64 {
        self.with(cfg, |w, _, now| {
            let t = w.totals(now);
            p(t.calls, t.calls - t.failures, cfg.adaptive_k)
        })
    }

    /// Whether to send a call; a local rejection is counted as a request not accepted.
    pub fn try_acquire(&self, cfg: &BreakerConfig) -> bool {
        self.with(cfg, |w, rng, now| {
            let t = w.totals(now);
            let p = p(t.calls, t.calls - t.failures, cfg.adaptive_k);
            if p > 0.0 && rng.random::<f64>() < p {
                w.record(now, true, false);
                false
            } else {
                true
            }
        })
    }

    /// Records a sent call: `accepted` unless the backend failed it.
    pub fn record(&self, cfg: &BreakerConfig, accepted: bool) {
        self.with(cfg, |w, _, now| w.record(now, !accepted, false));
    }
}

fn p(requests: u32, accepts: u32, k: f64) -> f64 {
    ((requests as f64 - k * accepts as f64) / (requests as f64 + 1.0)).max(0.0)
}
