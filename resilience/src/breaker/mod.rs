//! Circuit breaker with Resilience4j semantics, and Google SRE adaptive throttling as a mode.
//!
//! Why a breaker: a failing upstream answered with more calls fails longer; failing fast gives it
//! room and gives the caller an answer now. The semantics follow Resilience4j's
//! `CircuitBreaker` (<https://resilience4j.readme.io/docs/circuitbreaker>): a count- or
//! time-based sliding window; no rate before `minimum_calls`; open when the failure rate or the
//! slow-call rate reaches its threshold; after `open_duration`, half-open lets *exactly*
//! `permitted_in_half_open` probes through (a mutex-guarded counter, so 100 concurrent callers
//! still get exactly N), whose results close or reopen it. Unlike Resilience4j, the open
//! duration may grow on consecutive openings (with jitter, so a fleet does not probe in step),
//! and the policy is read per call from a [`Live`]: a reload changes thresholds on the next call
//! and a resized window migrates its counts ([`window`]) instead of starting empty.
//!
//! With `mode = "adaptive"` the breaker is replaced by [`AdaptiveThrottle`] (Site Reliability
//! Engineering, ch. 21, "Client-side throttling", as go-zero's breaker): no states, a rejection
//! probability `max(0, (requests - K * accepts) / (requests + 1))` over a sliding window.
//!
//! Recording a success takes no lock while the closed-state count window is full and clean (no
//! failure, no slow call): the success would replace a success, so nothing changes. The breaker
//! keeps that fact in one atomic word with the policy generation it holds for; any failure, slow
//! call, transition or reload sends the next record through the lock, which sets the word again.
//!
//! A breaker is per service (the [`CircuitBreakerLayer`]) or per instance ([`BreakerRegistry`],
//! used below the balancer through [`Breaker::try_acquire`] / [`BreakerPermit::record`]).

mod throttle;
mod window;

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use keel_core::{InstanceId, Live};
use pin_project_lite::pin_project;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

pub use self::throttle::AdaptiveThrottle;
use self::window::Window;
use crate::{
    classify::{Classifier, HttpClassifier, Outcome, PolicyClassifier},
    config::{BreakerConfig, BreakerMode},
    error::{BoxError, ResilienceError},
    metrics as m,
};

/// The state of a classic breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow; outcomes are recorded.
    Closed,
    /// Calls are refused until the open duration has passed.
    Open,
    /// A fixed number of probes flow.
    HalfOpen,
    /// Refusing everything by configuration.
    ForcedOpen,
    /// Letting everything through by configuration.
    Disabled,
}

const CLOSED: u8 = 0;
const OTHER: u8 = 1;

#[derive(Debug)]
enum St {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        issued: u32,
        done: u32,
        failures: u32,
        slow: u32,
    },
}

/// What the breaker's lock guards: its state, and its own cached view of the policy (a pointer
/// comparison per call while the policy has not changed, instead of a shared load).
#[derive(Debug)]
struct Locked {
    cfg: keel_core::LiveCache<BreakerConfig>,
    s: Inner,
}

#[derive(Debug)]
struct Inner {
    st: St,
    window: Window,
    consecutive_opens: u32,
    rng: SmallRng,
}

/// One breaker: its state and window, beside a live policy.
#[derive(Debug)]
pub struct Breaker {
    policy: Live<BreakerConfig>,
    hint: AtomicU8,
    epoch: AtomicU64,
    /// Non-zero while a fast success may skip the lock: see [`Clean`].
    clean: AtomicU64,
    inner: Mutex<Locked>,
    throttle: AdaptiveThrottle,
    base: Instant,
    gauge: metrics::Gauge,
    /// Set by [`retire_gauge`](Breaker::retire_gauge), cleared by [`publish`](Breaker::publish):
    /// while set, transitions leave the gauge alone. Written under `inner`'s lock, as
    /// transitions are, so a transition cannot slip a stale state in after a retire.
    retired: AtomicBool,
    service: Arc<str>,
    instance: Arc<str>,
}

/// The right to make one call; record its outcome, or drop it (a dropped half-open permit is
/// given back).
#[derive(Debug)]
pub struct BreakerPermit {
    breaker: Arc<Breaker>,
    raw: RawPermit,
}

/// A permit without a handle on its breaker: whoever holds it settles it or releases it on the
/// breaker it came from ([`Breaker::settle`], [`Breaker::release_raw`]).
#[derive(Debug)]
pub(crate) struct RawPermit {
    kind: PermitKind,
    epoch: u64,
    start: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PermitKind {
    Closed,
    HalfOpen,
    Adaptive,
    Done,
}

impl Breaker {
    /// A breaker for `service` (and `instance`, empty for a per-service breaker).
    pub fn new(
        service: impl Into<Arc<str>>,
        instance: &str,
        policy: Live<BreakerConfig>,
    ) -> Arc<Self> {
        Self::with_seed(service, instance, policy, rand::random())
    }

    /// As [`new`](Self::new), with a fixed seed for the open-duration jitter and the throttle.
    pub fn with_seed(
        service: impl Into<Arc<str>>,
        instance: &str,
        policy: Live<BreakerConfig>,
        seed: u64,
    ) -> Arc<Self> {
        let service = service.into();
        let cfg = policy.load();
        let window = Window::new(cfg.window, cfg.size);
        let throttle = AdaptiveThrottle::with_seed(seed ^ 0x9e37_79b9_7f4a_7c15);
        drop(cfg);
        let gauge = m::gauge(m::BREAKER_STATE, &service, instance);
        gauge.set(0.0);
        Arc::new(Self {
            hint: AtomicU8::new(CLOSED),
            epoch: AtomicU64::new(0),
            clean: AtomicU64::new(0),
            inner: Mutex::new(Locked {
                cfg: policy.cache(),
                s: Inner {
                    st: St::Closed,
                    window,
                    consecutive_opens: 0,
                    rng: SmallRng::seed_from_u64(seed),
                },
            }),
            throttle,
            base: Instant::now(),
            gauge,
            retired: AtomicBool::new(false),
            service,
            instance: Arc::from(instance),
            policy,
        })
    }

    /// The policy handle.
    pub fn policy(&self) -> &Live<BreakerConfig> {
        &self.policy
    }

    /// The adaptive throttle used in `adaptive` mode.
    pub fn throttle(&self) -> &AdaptiveThrottle {
        &self.throttle
    }

    /// The current state (as configuration and time make it).
    pub fn state(&self) -> BreakerState {
        let cfg = self.policy.load();
        if cfg.disabled {
            return BreakerState::Disabled;
        }
        if cfg.forced_open {
            return BreakerState::ForcedOpen;
        }
        match keel_core::lock(&self.inner).s.st {
            St::Closed => BreakerState::Closed,
            St::Open { .. } => BreakerState::Open,
            St::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Sets the `keel_breaker_state` gauge to the state now. Transitions set it as they happen;
    /// forced open and disabled are configuration, not transitions, so only this shows them.
    /// Call it before metrics are exported (the client stack's
    /// [`publish_gauges`](crate::ClientStackLayer::publish_gauges) does). It also undoes
    /// [`retire_gauge`](Self::retire_gauge): the instance is back.
    pub fn publish(&self) {
        let cfg = self.policy.load();
        let g = keel_core::lock(&self.inner);
        self.retired.store(false, Ordering::Release);
        self.gauge.set(if cfg.disabled {
            4.0
        } else if cfg.forced_open {
            3.0
        } else {
            match g.s.st {
                St::Closed => 0.0,
                St::Open { .. } => 1.0,
                St::HalfOpen { .. } => 2.0,
            }
        });
    }

    /// Sets the `keel_breaker_state` gauge to 0 (closed), the breaker itself unchanged, and
    /// keeps it there through later transitions until [`publish`](Self::publish): for the
    /// breaker of an instance that left, so that its last state (open, say) does not stay in
    /// `/metrics` as if it still refused calls, nor come back there from a caller that still
    /// holds this breaker while a new one answers for the instance's id.
    pub fn retire_gauge(&self) {
        let _g = keel_core::lock(&self.inner);
        self.retired.store(true, Ordering::Release);
        self.gauge.set(0.0);
    }

    /// When an open breaker will let a probe through (`None` unless it is open).
    pub fn open_until(&self) -> Option<Instant> {
        match keel_core::lock(&self.inner).s.st {
            St::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Calls, failures and slow calls in the closed-state window now.
    pub fn window_counts(&self) -> (u32, u32, u32) {
        let now = self.now_sec();
        let t = keel_core::lock(&self.inner).s.window.totals(now);
        (t.calls, t.failures, t.slow)
    }

    fn now_sec(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_secs()
    }

    fn reject(&self, e: ResilienceError) -> ResilienceError {
        m::counter(m::BREAKER_REJECTED_TOTAL, &self.service, e.as_str()).increment(1);
        e
    }

    /// Asks to make a call. `Err(BreakerOpen | Throttled)` means fail fast.
    pub fn try_acquire(self: &Arc<Self>) -> Result<BreakerPermit, ResilienceError> {
        self.try_acquire_at(Instant::now())
    }

    /// As [`try_acquire`](Self::try_acquire), with the caller's clock reading (`now`).
    pub fn try_acquire_at(
        self: &Arc<Self>,
        now: Instant,
    ) -> Result<BreakerPermit, ResilienceError> {
        self.try_acquire_with(&self.policy.load(), now)
    }

    /// As [`try_acquire_at`](Self::try_acquire_at), under `cfg`: the policy the caller has
    /// already loaded for this call (the same value [`policy`](Self::policy) holds).
    pub fn try_acquire_with(
        self: &Arc<Self>,
        cfg: &BreakerConfig,
        now: Instant,
    ) -> Result<BreakerPermit, ResilienceError> {
        Ok(BreakerPermit {
            breaker: self.clone(),
            raw: self.take(cfg, now)?,
        })
    }

    /// A raw permit under `cfg` (see [`try_acquire_with`](Self::try_acquire_with)).
    pub(crate) fn take(
        &self,
        cfg: &BreakerConfig,
        now: Instant,
    ) -> Result<RawPermit, ResilienceError> {
        let permit = |kind, epoch| RawPermit {
            kind,
            epoch,
            start: now,
        };
        if cfg.disabled {
            return Ok(permit(PermitKind::Done, 0));
        }
        if cfg.forced_open {
            return Err(self.reject(ResilienceError::BreakerOpen { retry_after: None }));
        }
        if cfg.mode == BreakerMode::Adaptive {
            return match self.throttle.try_acquire(cfg) {
                true => Ok(permit(PermitKind::Adaptive, 0)),
                false => Err(self.reject(ResilienceError::Throttled)),
            };
        }
        if self.hint.load(Ordering::Acquire) == CLOSED {
            return Ok(permit(
                PermitKind::Closed,
                self.epoch.load(Ordering::Acquire),
            ));
        }
        let mut guard = keel_core::lock(&self.inner);
        let g = &mut guard.s;
        match &mut g.st {
            St::Closed => Ok(permit(
                PermitKind::Closed,
                self.epoch.load(Ordering::Acquire),
            )),
            St::Open { until } if now >= *until => {
                g.st = St::HalfOpen {
                    issued: 1,
                    done: 0,
                    failures: 0,
                    slow: 0,
                };
                let epoch = self.transition(BreakerState::HalfOpen);
                Ok(permit(PermitKind::HalfOpen, epoch))
            }
            St::Open { until } => {
                let retry_after = Some(*until - now);
                drop(guard);
                Err(self.reject(ResilienceError::BreakerOpen { retry_after }))
            }
            St::HalfOpen { issued, .. } if *issued < cfg.permitted_in_half_open => {
                *issued += 1;
                Ok(permit(
                    PermitKind::HalfOpen,
                    self.epoch.load(Ordering::Acquire),
                ))
            }
            St::HalfOpen { .. } => {
                drop(guard);
                Err(self.reject(ResilienceError::BreakerOpen { retry_after: None }))
            }
        }
    }

    fn transition(&self, to: BreakerState) -> u64 {
        let (hint, v, name) = match to {
            BreakerState::Closed => (CLOSED, 0.0, "closed"),
            BreakerState::Open => (OTHER, 1.0, "open"),
            BreakerState::HalfOpen => (OTHER, 2.0, "half_open"),
            BreakerState::ForcedOpen => (OTHER, 3.0, "forced_open"),
            BreakerState::Disabled => (OTHER, 4.0, "disabled"),
        };
        self.hint.store(hint, Ordering::Release);
        self.clean.store(0, Ordering::Release);
        if !self.retired.load(Ordering::Acquire) {
            self.gauge.set(v);
        }
        m::counter(m::BREAKER_TRANSITIONS_TOTAL, &self.service, name).increment(1);
        tracing::info!(service = %self.service, instance = %self.instance, state = name, "circuit breaker transition");
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn open(&self, g: &mut Inner, cfg: &BreakerConfig) {
        g.consecutive_opens = g.consecutive_opens.saturating_add(1);
        let growth = cfg
            .open_duration_growth
            .powi(g.consecutive_opens.saturating_sub(1).min(64) as i32);
        let mut d = cfg.open_duration.as_secs_f64() * growth;
        d = d.min(cfg.open_duration_max.as_secs_f64());
        let j = cfg.open_duration_jitter.get();
        if j > 0.0 {
            d *= 1.0 + g.rng.random_range(-j..=j);
        }
        g.st = St::Open {
            until: Instant::now() + Duration::from_secs_f64(d.max(0.0)),
        };
        g.window.clear();
        self.transition(BreakerState::Open);
    }

    /// Records a call's outcome against `raw`; `classify` makes the outcome under the policy in
    /// force (read here, under the breaker's lock, from its cached view).
    fn record(
        &self,
        raw: RawPermit,
        end: End,
        classify: impl FnOnce(&BreakerConfig) -> Outcome,
    ) -> Outcome {
        let RawPermit { kind, epoch, start } = raw;
        match kind {
            PermitKind::Done => return classify(&self.policy.load()),
            PermitKind::Adaptive => {
                let cfg = self.policy.load();
                let outcome = classify(&cfg);
                self.throttle.record(&cfg, !outcome.is_failure());
                return outcome;
            }
            PermitKind::Closed | PermitKind::HalfOpen => {}
        }
        let mut guard = keel_core::lock(&self.inner);
        // Read before the policy: a word set for this generation is never newer than the policy
        // it describes.
        let generation = self.policy.generation();
        let Locked { cfg, s: g } = &mut *guard;
        let cfg: &BreakerConfig = cfg.load();
        let outcome = classify(cfg);
        let outcome = self.record_locked(g, cfg, outcome, epoch, start, end);
        let word = Clean::of(g, cfg, generation);
        if self.clean.load(Ordering::Relaxed) != word {
            self.clean.store(word, Ordering::Release);
        }
        outcome
    }

    /// Whether a success recorded against `raw`, ended at `end`, may skip the lock: a
    /// closed-state permit, the window full and clean under the policy in force, and the call
    /// not slow.
    #[inline]
    fn clean_success(&self, raw: &RawPermit, end: End) -> bool {
        if raw.kind != PermitKind::Closed {
            return false;
        }
        let start = raw.start;
        let word = self.clean.load(Ordering::Acquire);
        if word == 0 {
            return false;
        }
        let Some(slow) = Clean::slow_for(word, self.policy.generation()) else {
            return false;
        };
        let elapsed = match end {
            End::Within(max) if max < slow => return true,
            End::Before(cap) if cap.saturating_duration_since(start) < slow => return true,
            End::At(at) => at.saturating_duration_since(start),
            End::Within(_) | End::Before(_) => Instant::now().saturating_duration_since(start),
        };
        elapsed < slow
    }

    /// The window and state machine part of [`record`](Self::record), under the lock.
    fn record_locked(
        &self,
        g: &mut Inner,
        cfg: &BreakerConfig,
        outcome: Outcome,
        epoch: u64,
        start: Instant,
        end: End,
    ) -> Outcome {
        if self.epoch.load(Ordering::Acquire) != epoch {
            return outcome; // a call from an earlier state: it says nothing about this one
        }
        let (at, elapsed) = match end {
            End::At(at) => (at, at.saturating_duration_since(start)),
            // A call capped below the slow-call duration cannot be slow, and a count window has
            // no use for the time: no clock read.
            End::Before(cap)
                if cfg.window == crate::config::WindowKind::Count
                    && cap.saturating_duration_since(start) < cfg.slow_call_duration =>
            {
                (start, Duration::ZERO)
            }
            End::Within(max)
                if cfg.window == crate::config::WindowKind::Count
                    && max < cfg.slow_call_duration =>
            {
                (start, Duration::ZERO)
            }
            End::Before(_) | End::Within(_) => {
                let at = Instant::now();
                (at, at.saturating_duration_since(start))
            }
        };
        let counted = matches!(outcome, Outcome::Success | Outcome::Failure(_));
        let failure = outcome.is_failure();
        let slow = elapsed >= cfg.slow_call_duration;
        let matches = g.window.matches(cfg.window, cfg.size);
        // The second only places a call in a time window: a count window has no use for it.
        let now = if cfg.window == crate::config::WindowKind::Time || !matches {
            at.saturating_duration_since(self.base).as_secs()
        } else {
            0
        };
        if !matches {
            g.window = g.window.resized(cfg.window, cfg.size, now);
        }
        match &mut g.st {
            St::Closed if counted => {
                g.window.record(now, failure, slow);
                let t = g.window.totals(now);
                let min = cfg.minimum_calls.max(1);
                if t.calls >= min
                    || (cfg.window == crate::config::WindowKind::Count && t.calls >= cfg.size)
                {
                    let fr = t.failures as f64 / t.calls as f64;
                    let sr = t.slow as f64 / t.calls as f64;
                    if fr >= cfg.failure_rate_threshold.get()
                        || sr >= cfg.slow_call_rate_threshold.get()
                    {
                        self.open(g, cfg);
                    }
                }
            }
            St::HalfOpen {
                issued,
                done,
                failures,
                slow: slows,
            } => {
                if !counted {
                    *issued = issued.saturating_sub(1);
                    return outcome;
                }
                *done += 1;
                *failures += failure as u32;
                *slows += slow as u32;
                if *done >= cfg.permitted_in_half_open {
                    let n = *done as f64;
                    let fr = *failures as f64 / n;
                    let sr = *slows as f64 / n;
                    if fr >= cfg.failure_rate_threshold.get()
                        || sr >= cfg.slow_call_rate_threshold.get()
                    {
                        self.open(g, cfg);
                    } else {
                        g.st = St::Closed;
                        g.consecutive_opens = 0;
                        g.window.clear();
                        self.transition(BreakerState::Closed);
                    }
                }
            }
            _ => {}
        }
        outcome
    }

    /// Classifies an HTTP result as [`PolicyClassifier`](crate::PolicyClassifier) does (the
    /// policy's `failure_codes` on top of [`HttpClassifier`]) and records it against `raw`;
    /// `cap` is the time a timer would have ended the call by, if any (the clock is then read
    /// only if the duration can matter).
    pub(crate) fn settle<T>(
        &self,
        raw: RawPermit,
        res: &Result<http::Response<T>, crate::error::BoxError>,
        end: End,
    ) -> Outcome {
        // Under 400 is a success whatever the policy's failure codes, while the word is set
        // (it is set only for policies whose failure codes are all 400 or above).
        if res.as_ref().is_ok_and(|r| r.status().as_u16() < 400) && self.clean_success(&raw, end) {
            return Outcome::Success;
        }
        self.record(raw, end, |cfg| match res {
            Ok(r) if cfg.failure_codes.contains(&r.status().as_u16()) && r.status() != 429 => {
                Outcome::Failure(crate::classify::FailureClass::Status(r.status().as_u16()))
            }
            _ => HttpClassifier::default().classify(res),
        })
    }

    /// Gives back a permit whose call did not happen (or was cancelled).
    pub(crate) fn release_raw(&self, raw: RawPermit) {
        if raw.kind == PermitKind::HalfOpen {
            self.release(raw.epoch);
        }
    }

    fn release(&self, epoch: u64) {
        let mut g = keel_core::lock(&self.inner);
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if let St::HalfOpen { issued, .. } = &mut g.s.st {
            *issued = issued.saturating_sub(1);
        }
    }
}

impl BreakerPermit {
    /// Records the call's outcome (its duration is measured from the permit).
    pub fn record(self, outcome: Outcome) {
        self.record_at(outcome, Instant::now());
    }

    /// As [`record`](Self::record), with the caller's clock reading at the end of the call.
    pub fn record_at(self, outcome: Outcome, end: Instant) {
        self.finish(outcome, End::At(end));
    }

    /// As [`record`](Self::record), for a call that a timer would have ended by `cap` (its
    /// per-try timeout): the clock is read only if the duration can matter.
    pub fn record_capped(self, outcome: Outcome, cap: Instant) {
        self.finish(outcome, End::Before(cap));
    }

    /// Classifies an HTTP result as [`PolicyClassifier`](crate::PolicyClassifier) does (the
    /// policy's `failure_codes` on top of [`HttpClassifier`]) and records it as
    /// [`record_capped`](Self::record_capped) does (or [`record`](Self::record) without a cap),
    /// reading the policy once for both.
    pub fn classify_and_record<T>(
        mut self,
        res: &Result<http::Response<T>, crate::error::BoxError>,
        cap: Option<Instant>,
    ) -> Outcome {
        let raw = self.take_raw();
        let end = match cap {
            Some(cap) => End::Before(cap),
            None => End::At(Instant::now()),
        };
        self.breaker.settle(raw, res, end)
    }

    fn finish(mut self, outcome: Outcome, end: End) {
        let raw = self.take_raw();
        if outcome == Outcome::Success && self.breaker.clean_success(&raw, end) {
            return;
        }
        self.breaker.record(raw, end, |_| outcome);
    }

    /// The permit's state, leaving this one settled (its drop then does nothing).
    fn take_raw(&mut self) -> RawPermit {
        RawPermit {
            kind: std::mem::replace(&mut self.raw.kind, PermitKind::Done),
            epoch: self.raw.epoch,
            start: self.raw.start,
        }
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        let raw = self.take_raw();
        self.breaker.release_raw(raw);
    }
}

/// The lock-free success word: the low 32 bits of the policy generation it holds for (plus one,
/// so a set word is never zero), and the slow-call duration in whole milliseconds (rounded down,
/// so a call under it is never slow). Zero when a success must take the lock.
struct Clean;

impl Clean {
    fn of(g: &Inner, cfg: &BreakerConfig, generation: u64) -> u64 {
        let fast = matches!(g.st, St::Closed)
            && cfg.window == crate::config::WindowKind::Count
            && g.window.matches(cfg.window, cfg.size)
            && g.window.full_and_clean()
            && cfg.failure_codes.iter().all(|c| *c >= 400);
        if !fast {
            return 0;
        }
        let ms = u32::try_from(cfg.slow_call_duration.as_millis()).unwrap_or(u32::MAX);
        (u64::from((generation as u32).wrapping_add(1)) << 32) | u64::from(ms)
    }

    /// The slow-call duration the word holds, if it holds for `generation`.
    #[inline]
    fn slow_for(word: u64, generation: u64) -> Option<Duration> {
        ((word >> 32) as u32 == (generation as u32).wrapping_add(1))
            .then(|| Duration::from_millis(word & 0xffff_ffff))
    }
}

/// When a call ended: read, or only known to be before a bound (an instant, or a duration from
/// the permit's start).
#[derive(Debug, Clone, Copy)]
pub(crate) enum End {
    At(Instant),
    Before(Instant),
    Within(Duration),
}

impl End {
    /// Ended now (reads the clock).
    pub(crate) fn now() -> Self {
        End::At(Instant::now())
    }
}

/// Per-instance breakers sharing one policy, for use below the balancer.
#[derive(Debug, Clone)]
pub struct BreakerRegistry {
    service: Arc<str>,
    policy: Live<BreakerConfig>,
    map: Arc<Mutex<HashMap<InstanceId, Arc<Breaker>>>>,
}

impl BreakerRegistry {
    /// An empty registry.
    pub fn new(service: impl Into<Arc<str>>, policy: Live<BreakerConfig>) -> Self {
        Self {
            service: service.into(),
            policy,
            map: Arc::default(),
        }
    }

    /// The breaker of `instance`, created on first use.
    pub fn get(&self, instance: &InstanceId) -> Arc<Breaker> {
        let mut map = keel_core::lock(&self.map);
        map.entry(instance.clone())
            .or_insert_with(|| {
                Breaker::new(self.service.clone(), instance.as_str(), self.policy.clone())
            })
            .clone()
    }

    /// Forgets instances for which `keep` is false (e.g. gone from discovery).
    pub fn retain(&self, mut keep: impl FnMut(&InstanceId) -> bool) {
        if let Ok(mut map) = self.map.lock() {
            map.retain(|id, b| {
                let kept = keep(id);
                if !kept {
                    b.retire_gauge();
                }
                kept
            });
        }
    }

    /// How many instances have a breaker.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no instance has a breaker.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A per-service circuit breaker (or adaptive throttle) around `S`.
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S, C = PolicyClassifier> {
    inner: S,
    breaker: Arc<Breaker>,
    classifier: C,
}

impl<S> CircuitBreaker<S> {
    /// Wraps `inner` with `breaker`, classifying with the HTTP classifier plus the breaker
    /// policy's live `failure_codes`.
    pub fn new(inner: S, breaker: Arc<Breaker>) -> Self {
        Self {
            inner,
            classifier: PolicyClassifier::new(breaker.policy().clone()),
            breaker,
        }
    }
}

impl<S, C> CircuitBreaker<S, C> {
    /// The breaker.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }
}

/// Builds [`CircuitBreaker`]s that share one [`Breaker`].
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = PolicyClassifier> {
    breaker: Arc<Breaker>,
    classifier: C,
}

impl CircuitBreakerLayer {
    /// A layer with a new breaker for `service`, classifying with the HTTP classifier plus the
    /// policy's live `failure_codes`.
    pub fn new(service: impl Into<Arc<str>>, policy: Live<BreakerConfig>) -> Self {
        Self {
            classifier: PolicyClassifier::new(policy.clone()),
            breaker: Breaker::new(service, "", policy),
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// A layer over an existing breaker.
    pub fn from_breaker(breaker: Arc<Breaker>, classifier: C) -> Self {
        Self {
            breaker,
            classifier,
        }
    }

    /// The shared breaker.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;
    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classifier<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.breaker.try_acquire() {
            Ok(permit) => {
                ResponseFuture::called(self.inner.call(req), permit, self.classifier.clone())
            }
            Err(e) => ResponseFuture::rejected(e),
        }
    }
}

pin_project! {
    /// The breaker's response future: records the outcome when the call ends.
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F, C>,
    }
}

pin_project! {
    #[project = Proj]
    enum State<F, C> {
        Called { #[pin] fut: F, permit: Option<BreakerPermit>, classifier: C },
        Rejected { error: Option<ResilienceError> },
    }
}

impl<F, C> ResponseFuture<F, C> {
    fn called(fut: F, permit: BreakerPermit, classifier: C) -> Self {
        Self {
            state: State::Called {
                fut,
                permit: Some(permit),
                classifier,
            },
        }
    }
    fn rejected(e: ResilienceError) -> Self {
        Self {
            state: State::Rejected { error: Some(e) },
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classifier<T>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            Proj::Called {
                fut,
                permit,
                classifier,
            } => {
                let res = std::task::ready!(fut.poll(cx)).map_err(Into::into);
                if let Some(p) = permit.take() {
                    let outcome = classifier.classify(&res);
                    p.record(outcome);
                }
                Poll::Ready(res)
            }
            Proj::Rejected { error } => Poll::Ready(Err(Box::new(
                error
                    .take()
                    .unwrap_or(ResilienceError::BreakerOpen { retry_after: None }),
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
