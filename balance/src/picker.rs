//! The picker: one pick reads one snapshot of the tables and the per-instance atomics, allocates
//! nothing, and returns a guard that reports how the request ended.
//!
//! Order of a pick (each step documented where it is configured):
//! 1. subset: the canary when the request matches its header or wins its weighted coin;
//! 2. zone: the local zone while at least `min_local_healthy` of it is healthy, else every zone;
//! 3. tier: primaries; nginx `backup` instances only when no primary is healthy;
//! 4. panic: when fewer than `panic_threshold` of the tier are healthy, health is ignored and the
//!    strategy spreads load over every instance of the tier (Envoy), rather than crushing the few
//!    survivors;
//! 5. strategy, skipping instances at `max_conns` and (while others can serve) those in the
//!    request's `Attempt::avoid`.
//!
//! The two-choice strategies draw their two candidates in proportion to weight (Vose alias
//! table, slow start by rejection) and keep the one with the lower cost. For `p2c-ewma` the cost
//! is peak EWMA × (in-flight + 1), as in Finagle's `P2CPeakEwma` and linkerd; for
//! `least-request` it is the in-flight count (Envoy, with its `(active + 1)^bias` weight damping
//! applied as a rejection). Two random choices get almost all the benefit of looking at every
//! instance (Mitzenmacher, *The Power of Two Choices in Randomized Load Balancing*, 2001) at O(1)
//! cost.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{
            AtomicU64,
            Ordering::{AcqRel, Acquire, Relaxed, Release},
        },
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use keel_core::{request::Attempt, HealthMap, Instance, InstanceId, Live, ServiceName};
use metrics::Counter;

use crate::{
    classify::Outcome,
    config::{BalanceConfig, HashKeySource, Strategy},
    error::BalanceError,
    hash::{fmix64, hash_bytes, HashKey, Rng},
    outlier,
    roster::{Backref, Entry, Group, Member, Roster, States, Tier, Zoned},
    snapshot::BalancerSnapshot,
    state::{Clock, InstanceState},
    telemetry,
};

/// What the picker may look at in a request. Cheap to build; borrows from the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestInfo<'a> {
    /// The request headers (hash keys, canary header match).
    pub headers: Option<&'a http::HeaderMap>,
    /// The request path (hash key from a path segment).
    pub path: &'a str,
    /// An explicit hash key (wins over the configured source).
    pub hash_key: Option<u64>,
    /// Instances to avoid when others can serve (earlier attempts of this call).
    pub avoid: &'a [InstanceId],
}

impl<'a> RequestInfo<'a> {
    /// Reads headers, path, the [`HashKey`] and [`Attempt`] extensions of a request.
    pub fn from_request<B>(req: &'a http::Request<B>) -> Self {
        Self {
            headers: Some(req.headers()),
            path: req.uri().path(),
            hash_key: req.extensions().get::<HashKey>().map(|k| k.0),
            avoid: req
                .extensions()
                .get::<Attempt>()
                .map_or(&[][..], |a| a.avoid.as_slice()),
        }
    }

    /// With an explicit hash key.
    #[must_use]
    pub fn with_hash_key(mut self, key: u64) -> Self {
        self.hash_key = Some(key);
        self
    }

    /// Avoiding these instances when others can serve.
    #[must_use]
    pub fn with_avoid(mut self, avoid: &'a [InstanceId]) -> Self {
        self.avoid = avoid;
        self
    }

    /// With these headers.
    #[must_use]
    pub fn with_headers(mut self, headers: &'a http::HeaderMap) -> Self {
        self.headers = Some(headers);
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Healthy,
    Panic,
}

pub(crate) struct Shared {
    pub(crate) service: ServiceName,
    instances: Live<Vec<Instance>>,
    health: Option<Live<HealthMap>>,
    config: Live<BalanceConfig>,
    pub(crate) roster: ArcSwap<Roster>,
    /// Bumped by every store into an input (through the projections below), before `store`
    /// returns; a pick compares it with the stamp its tables were built at: one atomic load
    /// instead of three pointer loads.
    stamp: Arc<AtomicU64>,
    /// Projections of the inputs whose only job is to bump `stamp`; dropped with the balancer.
    _hooks: Vec<Live<u64>>,
    states: Mutex<(States, u64)>,
    rng: Rng,
    pub(crate) clock: Clock,
    /// Bumped whenever an instance's health changes, so cached group health is recomputed.
    pub(crate) epoch: AtomicU64,
    /// Earliest end of a current ejection (ns); when passed, the epoch is bumped.
    pub(crate) next_expiry: AtomicU64,
    pub(crate) total_in_flight: Arc<AtomicU64>,
    /// Bumped by every failure that lowers an instance's effective weight (round robin then
    /// leaves its lock-free rotation).
    pub(crate) penalties: AtomicU64,
    me: Weak<Shared>,
    pub(crate) last_sweep: Mutex<u64>,
    no_instance: Counter,
    panic: Counter,
    rebuilds: Counter,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("service", &self.service)
            .field("generation", &self.roster.load().generation)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn bump_epoch(&self, until: u64) {
        if until > 0 {
            self.next_expiry.fetch_min(until, Relaxed);
        }
        self.epoch.fetch_add(1, Relaxed);
    }
}

/// The picker for one service: strategies, per-instance state and health, over live inputs.
/// Cheap to clone (one `Arc`); clones share everything.
#[derive(Debug, Clone)]
pub struct Balancer {
    pub(crate) shared: Arc<Shared>,
}

impl Balancer {
    /// A balancer over a live instance set and a live policy, with a seed from the clock.
    /// Refuses an invalid policy.
    pub fn new(
        service: ServiceName,
        instances: Live<Vec<Instance>>,
        config: Live<BalanceConfig>,
    ) -> Result<Self, BalanceError> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x5eed, |d| d.as_nanos() as u64);
        Self::build(service, instances, None, config, seed)
    }

    /// Adds active health (from discovery's checks); an instance absent from the map is healthy.
    /// A construction step: call it before the first pick (it starts afresh).
    #[must_use]
    pub fn with_health(self, health: Live<HealthMap>) -> Self {
        let s = &self.shared;
        Self::build(
            s.service.clone(),
            s.instances.clone(),
            Some(health),
            s.config.clone(),
            s.rng.next_u64(),
        )
        .unwrap_or(self)
    }

    /// Replaces the random source with a seeded one, for deterministic tests.
    /// A construction step: call it before the first pick (it starts afresh).
    #[must_use]
    pub fn with_seed(self, seed: u64) -> Self {
        let s = &self.shared;
        Self::build(
            s.service.clone(),
            s.instances.clone(),
            s.health.clone(),
            s.config.clone(),
            seed,
        )
        .unwrap_or(self)
    }

    fn build(
        service: ServiceName,
        instances: Live<Vec<Instance>>,
        health: Option<Live<HealthMap>>,
        config: Live<BalanceConfig>,
        seed: u64,
    ) -> Result<Self, BalanceError> {
        let cfg = config.get();
        cfg.validate().map_err(BalanceError::InvalidConfig)?;
        let stamp = Arc::new(AtomicU64::new(0));
        fn hook<T: Send + Sync + 'static>(live: &Live<T>, stamp: &Arc<AtomicU64>) -> Live<u64> {
            let stamp = stamp.clone();
            live.project(move |_: &T| stamp.fetch_add(1, Relaxed) + 1)
        }
        let mut hooks = vec![hook(&instances, &stamp), hook(&config, &stamp)];
        if let Some(h) = &health {
            hooks.push(hook(h, &stamp));
        }
        let clock = Clock::new();
        let mut states = HashMap::new();
        // Stamp first, inputs second (as in `rebuild`).
        let stamp0 = stamp.load(Relaxed);
        let cfg = Some(config.get())
            .filter(|c| c.validate().is_ok())
            .unwrap_or(cfg);
        let total_in_flight = Arc::new(AtomicU64::new(0));
        let label = service.to_string();
        Ok(Self {
            shared: Arc::new_cyclic(|me| {
                let backref = Backref {
                    shared: me.clone(),
                    clock,
                    total_in_flight: total_in_flight.clone(),
                };
                let roster = Roster::build(
                    &service,
                    instances.get(),
                    health.as_ref().map(|h| h.get()),
                    cfg,
                    &mut states,
                    clock.now(),
                    true,
                    0,
                    stamp0,
                    &backref,
                );
                Shared {
                    no_instance: metrics::counter!(telemetry::NO_INSTANCE_TOTAL, "service" => label.clone()),
                    panic: metrics::counter!(telemetry::PANIC_TOTAL, "service" => label.clone()),
                    rebuilds: metrics::counter!(telemetry::REBUILDS_TOTAL, "service" => label),
                    service,
                    instances,
                    health,
                    config,
                    roster: ArcSwap::from_pointee(roster),
                    stamp,
                    _hooks: hooks,
                    states: Mutex::new((states, 0)),
                    rng: Rng::new(seed),
                    clock,
                    epoch: AtomicU64::new(0),
                    next_expiry: AtomicU64::new(u64::MAX),
                    total_in_flight,
                    penalties: AtomicU64::new(0),
                    me: me.clone(),
                    last_sweep: Mutex::new(0),
                }
            }),
        })
    }

    /// The service balanced.
    pub fn service(&self) -> &ServiceName {
        &self.shared.service
    }

    /// The current tables, rebuilt first if the instances, health or policy changed.
    pub(crate) fn roster(&self) -> arc_swap::Guard<Arc<Roster>> {
        let s = &self.shared;
        let r = s.roster.load();
        if r.stamp == s.stamp.load(Relaxed) {
            return r;
        }
        drop(r);
        self.rebuild();
        s.roster.load()
    }

    #[cold]
    fn rebuild(&self) {
        let s = &self.shared;
        let mut guard = keel_core::lock(&s.states);
        let (states, generation) = &mut *guard;
        // Read the stamp before the inputs: a store racing with this rebuild leaves the stamp
        // ahead of the tables, and the next pick rebuilds again.
        let stamp = s.stamp.load(Relaxed);
        let current = s.roster.load();
        if current.stamp == stamp {
            return;
        }
        let instances = s.instances.get();
        let config = s.config.get();
        let health = s.health.as_ref().map(|h| h.get());
        // The facade validates before publishing; should a bad policy slip through, keep the
        // last good one rather than balance by nonsense.
        let config = match config.validate() {
            Ok(()) => config,
            Err(e) => {
                tracing::error!(service = %s.service, error = %e, "invalid balance config ignored");
                current.config.clone()
            }
        };
        *generation += 1;
        let roster = Roster::build(
            &s.service,
            instances,
            health,
            config,
            states,
            s.clock.now(),
            false,
            *generation,
            stamp,
            &Backref {
                shared: s.me.clone(),
                clock: s.clock,
                total_in_flight: s.total_in_flight.clone(),
            },
        );
        tracing::debug!(service = %s.service, generation = *generation, instances = roster.entries.len(), "balancer tables rebuilt");
        s.roster.store(Arc::new(roster));
        s.rebuilds.increment(1);
        s.epoch.fetch_add(1, Relaxed);
    }

    /// The generation of the tables (bumped by each rebuild).
    pub fn generation(&self) -> u64 {
        self.roster().generation
    }

    /// Picks an instance, or `None` when no instance can take the request.
    #[inline]
    pub fn pick(&self, info: &RequestInfo<'_>) -> Option<Picked> {
        self.try_pick(info).ok()
    }

    /// Picks an instance, or says why none can take the request.
    pub fn try_pick(&self, info: &RequestInfo<'_>) -> Result<Picked, BalanceError> {
        let r = self.roster();
        let now = self.shared.clock.now();
        match self.select(&r, info, now) {
            Some(e) => {
                let entry = r.entries[e as usize].clone();
                entry.state.in_flight.fetch_add(1, Relaxed);
                // The total is only read by the bounded-load check.
                let counted = r.config.hash_balance_factor.is_some();
                if counted {
                    self.shared.total_in_flight.fetch_add(1, Relaxed);
                }
                Ok(Picked {
                    entry,
                    start: now,
                    done: false,
                    counted,
                })
            }
            None => {
                self.shared.no_instance.increment(1);
                Err(BalanceError::NoInstance {
                    service: self.shared.service.clone(),
                })
            }
        }
    }

    /// Takes instance `id` out of rotation for `duration` on another component's word (the
    /// facade's per-instance circuit breakers use it), within `outlier.max_ejection_percent` as
    /// any ejection; it comes back by itself after `duration`. `reason` shows in the snapshot.
    /// Returns whether the instance is out (false: unknown, or too many are out already).
    pub fn eject(&self, id: &InstanceId, duration: std::time::Duration, reason: &str) -> bool {
        let r = self.roster();
        let Some(e) = r.entries.iter().find(|e| &e.instance.id == id) else {
            return false;
        };
        let now = self.shared.clock.now();
        crate::outlier::eject_for(
            &self.shared,
            &r,
            e,
            now,
            crate::state::ns(duration),
            reason.to_owned(),
        )
    }

    /// The admin view: every instance with its state, health, load and ejections.
    pub fn snapshot(&self) -> BalancerSnapshot {
        BalancerSnapshot::of(self)
    }

    /// The current instances known to the tables (admin `down` ones included).
    pub fn instances(&self) -> Vec<Instance> {
        self.roster()
            .entries
            .iter()
            .map(|e| e.instance.clone())
            .collect()
    }

    fn select(&self, r: &Roster, info: &RequestInfo<'_>, now: u64) -> Option<u32> {
        let s = &self.shared;
        if now >= s.next_expiry.load(Relaxed) {
            s.next_expiry.store(u64::MAX, Relaxed);
            s.epoch.fetch_add(1, Relaxed);
        }
        let canary_first = match (&r.canary, &r.config.canary) {
            (Some(_), Some(c)) => {
                let by_header = match (&r.canary_header, info.headers) {
                    (Some((name, value)), Some(h)) => h.get(name) == Some(value),
                    _ => false,
                };
                by_header || (c.weight.get() > 0.0 && s.rng.unit() < c.weight.get())
            }
            _ => false,
        };
        let (first, second) = if canary_first {
            (r.canary.as_ref(), Some(&r.stable))
        } else {
            (Some(&r.stable), r.canary.as_ref())
        };
        for z in [first, second].into_iter().flatten() {
            if let Some(e) = self.select_zoned(r, z, info, now) {
                return Some(e);
            }
        }
        None
    }

    fn select_zoned(&self, r: &Roster, z: &Zoned, info: &RequestInfo<'_>, now: u64) -> Option<u32> {
        if let Some(local) = &z.local {
            let (h, t) = self.health(r, &local.primary, now);
            if t > 0 && h as f64 >= r.config.zone.min_local_healthy.get() * t as f64 && h > 0 {
                if let Some(e) = self.select_tier(r, local, info, now) {
                    return Some(e);
                }
            }
        }
        self.select_tier(r, &z.all, info, now)
    }

    #[inline]
    fn health(&self, r: &Roster, g: &Group, now: u64) -> (usize, usize) {
        let s = &self.shared;
        g.health(r, s.epoch.load(Relaxed), &s.next_expiry, now)
    }

    fn select_tier(&self, r: &Roster, t: &Tier, info: &RequestInfo<'_>, now: u64) -> Option<u32> {
        let (h, total) = self.health(r, &t.primary, now);
        if h > 0 {
            let panic = (h as f64) < r.config.panic_threshold.get() * total as f64;
            let mode = if panic {
                self.shared.panic.increment(1);
                Mode::Panic
            } else {
                Mode::Healthy
            };
            if let Some(e) = self.pick_group(r, &t.primary, mode, info, now) {
                return Some(e);
            }
        }
        let (bh, _) = self.health(r, &t.backup, now);
        if bh > 0 {
            if let Some(e) = self.pick_group(r, &t.backup, Mode::Healthy, info, now) {
                return Some(e);
            }
        }
        // Nothing healthy at all: panic, primaries first.
        if !t.primary.members.is_empty() || !t.backup.members.is_empty() {
            self.shared.panic.increment(1);
        }
        self.pick_group(r, &t.primary, Mode::Panic, info, now)
            .or_else(|| self.pick_group(r, &t.backup, Mode::Panic, info, now))
    }

    fn pick_group(
        &self,
        r: &Roster,
        g: &Group,
        mode: Mode,
        info: &RequestInfo<'_>,
        now: u64,
    ) -> Option<u32> {
        if g.members.is_empty() {
            return None;
        }
        if !info.avoid.is_empty() {
            if let Some(e) = self.strategy(r, g, mode, info, info.avoid, now) {
                return Some(e);
            }
        }
        self.strategy(r, g, mode, info, &[], now)
    }

    #[inline]
    fn usable(&self, r: &Roster, e: &Entry, mode: Mode, avoid: &[InstanceId], now: u64) -> bool {
        if e.max_conns != 0 && e.state.in_flight.load(Relaxed) >= e.max_conns {
            return false;
        }
        if !avoid.is_empty() && avoid.contains(&e.instance.id) {
            return false;
        }
        mode == Mode::Panic || r.healthy(e, now)
    }

    fn strategy(
        &self,
        r: &Roster,
        g: &Group,
        mode: Mode,
        info: &RequestInfo<'_>,
        avoid: &[InstanceId],
        now: u64,
    ) -> Option<u32> {
        match r.config.strategy {
            Strategy::P2cEwma => self.p2c(r, g, mode, avoid, now, |st| {
                st.ewma_cost_ns(r.default_rtt_ns, now, r.ewma_decay_ns)
                    * f64::from(st.in_flight.load(Relaxed) + 1)
            }),
            Strategy::LeastRequest => self.p2c(r, g, mode, avoid, now, |st| {
                f64::from(st.in_flight.load(Relaxed))
            }),
            Strategy::Random => self.draw(r, g, mode, avoid, now),
            Strategy::RoundRobin => self
                .rotate(r, g, mode, avoid, now)
                .or_else(|| self.swrr(r, g, now, true, |e| self.usable(r, e, mode, avoid, now))),
            Strategy::LeastConn => self.least_conn(r, g, mode, avoid, now),
            Strategy::RingHash | Strategy::Maglev => match self.hash_key(r, info) {
                Some(key) => self.hashed(r, g, mode, avoid, now, key),
                None => self.draw(r, g, mode, avoid, now),
            },
        }
    }

    /// Whether a packed member may take the request (the same rule as [`Self::usable`]).
    #[inline]
    fn usable_member(
        &self,
        r: &Roster,
        h: &Member,
        mode: Mode,
        avoid: &[InstanceId],
        now: u64,
    ) -> bool {
        let st = &h.state;
        if h.max_conns != 0 && st.in_flight.load(Relaxed) >= h.max_conns {
            return false;
        }
        if !avoid.is_empty() && avoid.contains(&r.entries[h.idx as usize].instance.id) {
            return false;
        }
        mode == Mode::Panic
            || (h.active_ok && (r.lone || !st.passive_out(now)) && !st.outlier_ejected(now))
    }

    /// A weighted draw of a usable member (alias table, slow start and least-request damping by
    /// rejection); a scan from a random point when draws keep missing. Returns a position in
    /// the group.
    #[inline]
    fn draw_pos(
        &self,
        r: &Roster,
        g: &Group,
        mode: Mode,
        avoid: &[InstanceId],
        now: u64,
    ) -> Option<usize> {
        let rng = &self.shared.rng;
        let bias = if r.config.strategy == Strategy::LeastRequest {
            r.config.least_request_bias
        } else {
            0.0
        };
        for _ in 0..8 {
            let k = g.alias.sample(rng);
            let h = &g.hot[k];
            if !self.usable_member(r, h, mode, avoid, now) {
                continue;
            }
            let mut accept = if h.slow {
                r.slow_factor(&r.entries[h.idx as usize], now)
            } else {
                1.0
            };
            if bias > 0.0 {
                let active = h.state.in_flight.load(Relaxed);
                if active > 0 {
                    accept /= f64::from(active + 1).powf(bias);
                }
            }
            if accept < 1.0 && rng.unit() >= accept {
                continue;
            }
            return Some(k);
        }
        self.scan_pos(r, g, mode, avoid, now)
    }

    #[inline]
    fn draw(
        &self,
        r: &Roster,
        g: &Group,
        mode: Mode,
        avoid: &[InstanceId],
        now: u64,
    ) -> Option<u32> {
        self.draw_pos(r, g, mode, avoid, now).map(|k| g.members[k])
    }

    fn scan_pos(
        &self,
        r: &Roster,
        g: &Group,
        mode: Mode,
        avoid: &[InstanceId],
        now: u64,
    ) -> Option<usize> {
        let n = g.hot.len();
        let start = self.shared.rng.below(n);
        (0..n)
            .map(|j| (start + j) % n)
            .find(|&k| self.usable_member(r, &g.hot[k], mode, avoid, now))
    }

    fn scan(
        &self,
        r: &Roster,
        g: &Group,
        mode: Mode,
        avoid: &[InstanceId],
        now: u64,
    ) -> Option<u32> {
        self.scan_pos(r, g, mode, avoid, now).map(|k| g.members[k])
    }

    #[inline]
    fn p2c(
        &self,
        r: &Roster,
        g: &Group,
        mode: Mode,
        avoid: &[InstanceId],
        now: u64,
        cost: impl Fn(&InstanceState) -> f64,
    ) -> Option<u32> {
        let a = self.draw_pos(r, g, mode, avoid, now)?;
        if g.members.len() == 1 {
            return Some(g.members[a]);
        }
        let mut b = a;
        for _ in 0..4 {
            match self.draw_pos(r, g, mode, avoid, now) {
                Some(x) if x != a => {
                    b = x;
                    break;
                }
                _ => {}
            }
        }
        if b == a {
            // Unlucky draws (1 in 16 with two members): any other usable member will do.
            let n = g.hot.len();
            let start = self.shared.rng.below(n);
            if let Some(k) = (0..n)
                .map(|j| (start + j) % n)
                .find(|&k| k != a && self.usable_member(r, &g.hot[k], mode, avoid, now))
            {
                b = k;
            }
        }
        if b != a && cost(&g.hot[b].state) < cost(&g.hot[a].state) {
            Some(g.members[b])
        } else {
            Some(g.members[a])
        }
    }

    /// Round robin in O(1), when it gives what [`swrr`](Self::swrr) would: equal weights, no
    /// slow start or `max_conns`, no effective weight lowered and no health change since the
    /// rotation was set up, no instance to avoid, and the member whose turn it is can take the
    /// request. Over equal weights and a state whose spread is under `n × w`, smooth weighted
    /// round robin picks every member once per `n` picks, in the order of its state, and comes
    /// back to that state: `swrr` writes that order down and a counter replays it, with no lock
    /// and no walk. Anything else hands over to `swrr`, which rebuilds its state from the
    /// counter.
    #[inline]
    fn rotate(
        &self,
        r: &Roster,
        g: &Group,
        mode: Mode,
        avoid: &[InstanceId],
        now: u64,
    ) -> Option<u32> {
        if !g.uniform || !avoid.is_empty() {
            return None;
        }
        let steady = g.steady.load(Acquire);
        if steady == 0
            || steady != self.shared.penalties.load(Relaxed).wrapping_add(1)
            || g.steady_epoch.load(Relaxed) != self.shared.epoch.load(Relaxed)
        {
            return None;
        }
        let n = g.members.len() as u64;
        let mut turn = g.rr.load(Relaxed);
        loop {
            let k = g.order[(turn % n) as usize].load(Relaxed) as usize;
            let m = *g.members.get(k)?;
            if !self.usable(r, &r.entries[m as usize], mode, avoid, now) {
                // Its turn, but it cannot take the request: the weighted walk decides, from
                // here (the turn is not taken, so the walk does not count it as picked).
                return None;
            }
            match g
                .rr
                .compare_exchange_weak(turn, turn.wrapping_add(1), Relaxed, Relaxed)
            {
                Ok(_) => return Some(m),
                Err(now_at) => turn = now_at,
            }
        }
    }

    /// nginx smooth weighted round robin (`ngx_http_upstream_get_peer`), over the members
    /// `ok` accepts: each adds its effective weight to its current weight, the largest wins and
    /// gives back the total; an effective weight lowered by failures grows back by one per pick.
    /// With `rotation` (round robin itself, not a tie-break), it takes over from and hands back
    /// to [`rotate`](Self::rotate).
    fn swrr(
        &self,
        r: &Roster,
        g: &Group,
        now: u64,
        rotation: bool,
        ok: impl Fn(&Entry) -> bool,
    ) -> Option<u32> {
        let mut current = keel_core::lock(&g.swrr);
        // Read before the effective weights and health: a penalty or a health change after
        // these reads voids the rotation set up below.
        let penalties = self.shared.penalties.load(Acquire);
        let epoch = self.shared.epoch.load(Relaxed);
        let n = g.members.len();
        let w = g.weight_sum as i64 / n.max(1) as i64;
        if rotation && g.steady.swap(0, AcqRel) != 0 {
            // `p` turns into the rotation from the state it was set up at: every member has
            // gained `p × w`, and the first `p` in the order have given back `n × w` each.
            let p = (g.rr.load(Relaxed) % n as u64) as usize;
            for c in current.iter_mut() {
                *c += p as i64 * w;
            }
            for slot in &g.order[..p] {
                if let Some(c) = current.get_mut(slot.load(Relaxed) as usize) {
                    *c -= n as i64 * w;
                }
            }
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        let mut all_full = true;
        for (k, &m) in g.members.iter().enumerate() {
            let e = &r.entries[m as usize];
            if !ok(e) {
                all_full = false;
                continue;
            }
            let w = if e.slow_window == 0 {
                i64::from(e.weight)
            } else {
                ((f64::from(e.weight) * r.slow_factor(e, now)).round() as i64).max(1)
            };
            let seen = e.state.effective_weight.load(Relaxed);
            let mut ew = seen.clamp(0, w);
            current[k] += ew;
            total += ew;
            if ew < w {
                ew += 1;
            }
            all_full &= ew == w;
            if ew != seen {
                e.state.effective_weight.store(ew, Relaxed);
            }
            if best.is_none_or(|b| current[k] > current[b]) {
                best = Some(k);
            }
        }
        let b = best?;
        current[b] -= total;
        if rotation && g.uniform && all_full {
            self.set_up_rotation(g, &current, w, penalties, epoch);
        }
        Some(g.members[b])
    }

    /// With every member in at full weight: if the state's spread is under `n × w`, the next
    /// `n` picks are the members by state, largest first (ties: lower position first), after
    /// which the state is back where it is now. Writes that order for [`rotate`](Self::rotate).
    /// (At pick `j` every member has gained `j × w`; one already picked has also given back
    /// `n × w`, which puts it below every member still to come while the spread is under
    /// `n × w`. At exactly `n × w`, a picked member from the top ties the members still to come
    /// from the bottom, and the tie goes to the lower position: fine when theirs are lower.)
    fn set_up_rotation(&self, g: &Group, current: &[i64], w: i64, penalties: u64, epoch: u64) {
        let n = current.len();
        let (lo, hi) = current
            .iter()
            .fold((i64::MAX, i64::MIN), |(lo, hi), &c| (lo.min(c), hi.max(c)));
        let nw = n as i64 * w;
        if n == 0 || hi - lo > nw {
            return;
        }
        if hi - lo == nw {
            // A picked member at the top then ties the last members at the bottom: the lower
            // position wins, which must be theirs.
            let top_first = current.iter().position(|&c| c == hi);
            let bottom_last = current.iter().rposition(|&c| c == lo);
            if !matches!((bottom_last, top_first), (Some(b), Some(t)) if b < t) {
                return;
            }
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by_key(|&k| (std::cmp::Reverse(current[k]), k));
        for (slot, k) in g.order.iter().zip(order) {
            slot.store(k as u32, Relaxed);
        }
        g.rr.store(0, Relaxed);
        g.steady_epoch.store(epoch, Relaxed);
        g.steady.store(penalties.wrapping_add(1), Release);
    }

    /// nginx `least_conn`: fewest in-flight per weight; ties broken by smooth weighted round robin.
    fn least_conn(
        &self,
        r: &Roster,
        g: &Group,
        mode: Mode,
        avoid: &[InstanceId],
        now: u64,
    ) -> Option<u32> {
        let mut best: Option<(u64, u64)> = None; // (conns, weight)
        for &m in &g.members {
            let e = &r.entries[m as usize];
            if !self.usable(r, e, mode, avoid, now) {
                continue;
            }
            let c = u64::from(e.state.in_flight.load(Relaxed));
            let w = u64::from(e.weight);
            if best.is_none_or(|(bc, bw)| c * bw < bc * w) {
                best = Some((c, w));
            }
        }
        let (bc, bw) = best?;
        self.swrr(r, g, now, false, |e| {
            u64::from(e.state.in_flight.load(Relaxed)) * bw == bc * u64::from(e.weight)
                && self.usable(r, e, mode, avoid, now)
        })
        .or_else(|| self.scan(r, g, mode, avoid, now))
    }

    fn hash_key(&self, r: &Roster, info: &RequestInfo<'_>) -> Option<u64> {
        if let Some(k) = info.hash_key {
            return Some(k);
        }
        match r.config.hash_key.as_ref()? {
            HashKeySource::Header(_) => {
                let v = info.headers?.get(r.hash_header.as_ref()?)?;
                Some(hash_bytes(v.as_bytes(), 0))
            }
            HashKeySource::PathSegment(n) => {
                let seg = info.path.split('/').filter(|s| !s.is_empty()).nth(*n)?;
                Some(hash_bytes(seg.as_bytes(), 0))
            }
            HashKeySource::Cookie(name) => {
                let headers = info.headers?;
                headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .filter_map(|kv| kv.trim().split_once('='))
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| hash_bytes(v.as_bytes(), 0))
            }
            HashKeySource::Explicit => None,
        }
    }

    /// Whether `e` is within the bounded load: `in_flight + 1 ≤ ⌈c × (total + 1) × w / W⌉`
    /// (HAProxy `hash-balance-factor`; Mirrokni, Thorup, Zadimoghaddam 2018).
    #[inline]
    fn within_bound(&self, r: &Roster, g: &Group, e: &Entry) -> bool {
        let Some(c) = r.config.hash_balance_factor else {
            return true;
        };
        let total = self.shared.total_in_flight.load(Relaxed) as f64;
        let cap = (c * (total + 1.0) * f64::from(e.weight) / g.weight_sum.max(1) as f64).ceil();
        f64::from(e.state.in_flight.load(Relaxed) + 1) <= cap
    }

    fn hashed(
        &self,
        r: &Roster,
        g: &Group,
        mode: Mode,
        avoid: &[InstanceId],
        now: u64,
        key: u64,
    ) -> Option<u32> {
        let ok = |m: u32| {
            let e = &r.entries[m as usize];
            self.usable(r, e, mode, avoid, now) && self.within_bound(r, g, e)
        };
        let found = if r.config.strategy == Strategy::Maglev {
            let table = g.maglev(r);
            // The owner, else probe the table with rehashed keys (stable for the key, spread
            // over the others).
            (0..=(g.members.len() as u64 * 2).min(64))
                .filter_map(|salt| {
                    let h = if salt == 0 {
                        key
                    } else {
                        fmix64(key ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                    };
                    table.lookup(h)
                })
                .map(|k| g.members[k])
                .find(|&m| ok(m))
        } else {
            g.ring(r)
                .successors(key)
                .map(|k| g.members[k])
                .find(|&m| ok(m))
        };
        found.or_else(|| {
            // Everyone at the bound or unusable: the least loaded usable member.
            g.members
                .iter()
                .copied()
                .filter(|&m| self.usable(r, &r.entries[m as usize], mode, avoid, now))
                .min_by_key(|&m| r.entries[m as usize].state.in_flight.load(Relaxed))
        })
    }
}

/// A picked instance. Report how the request ended with [`complete`](Picked::complete).
/// Dropping it unreported (a per-try timeout, a hedge's loser, a caller gone) releases its
/// in-flight count, is counted `cancelled`, and raises the instance's latency estimate (as a
/// pick sees it, decay included) to the time it waited when that is longer: an abandoned
/// attempt's wait is a lower bound of its latency, so it may raise the estimate, never lower
/// it, and an instance that stops answering under a per-try timeout stops looking fast.
/// (Reporting [`Outcome::Cancelled`] through `complete` teaches nothing: the caller says the
/// time is not the instance's.)
#[derive(Debug)]
pub struct Picked {
    entry: Arc<Entry>,
    start: u64,
    done: bool,
    counted: bool,
}

impl Picked {
    /// The instance's id.
    pub fn id(&self) -> &InstanceId {
        &self.entry.instance.id
    }

    /// The instance's address.
    pub fn addr(&self) -> SocketAddr {
        self.entry.instance.addr
    }

    /// The instance.
    pub fn instance(&self) -> &Instance {
        &self.entry.instance
    }

    /// Time since the pick.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.entry.backref.clock.now().saturating_sub(self.start))
    }

    /// For long-lived connections (`least-conn`): whether this one should now be closed,
    /// because it is older than `max_connection_age` or its instance left or is draining.
    pub fn should_close(&self) -> bool {
        let Some(shared) = self.entry.backref.shared.upgrade() else {
            return true; // the balancer is gone
        };
        let r = Balancer { shared }.roster();
        let gone = r.entry(&self.entry.instance.id).is_none_or(|e| !e.pickable);
        gone || r
            .config
            .max_connection_age
            .is_some_and(|age| self.elapsed() >= age)
    }

    /// Reports the outcome; the latency is the time since the pick.
    pub fn complete(self, outcome: Outcome) {
        let latency = self.elapsed();
        self.complete_with(outcome, latency);
    }

    /// Reports the outcome with a measured latency.
    pub fn complete_with(mut self, outcome: Outcome, latency: Duration) {
        self.done = true;
        self.release();
        let Some(shared) = self.entry.backref.shared.upgrade() else {
            return;
        };
        let now = shared.clock.now();
        let b = Balancer { shared };
        let r = b.roster();
        outlier::on_complete(&b.shared, &r, &self.entry, outcome, latency, now);
    }

    fn release(&self) {
        self.entry.state.in_flight.fetch_sub(1, Relaxed);
        if self.counted {
            self.entry.backref.total_in_flight.fetch_sub(1, Relaxed);
        }
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        if !self.done {
            self.release();
            self.entry.metrics.request(Outcome::Cancelled);
            if let Some(shared) = self.entry.backref.shared.upgrade() {
                let r = Balancer { shared }.roster();
                let now = self.entry.backref.clock.now();
                let waited = Duration::from_nanos(now.saturating_sub(self.start));
                self.entry
                    .state
                    .raise_rtt(waited, now, r.ewma_decay_ns, r.default_rtt_ns);
            }
            // For a per-try timeout that dropped this attempt: which instance did not answer.
            keel_core::request::note_abandoned(keel_core::request::ServedBy {
                id: self.entry.instance.id.clone(),
                addr: self.entry.instance.addr,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BalanceConfig, Outcome, Strategy};
    use keel_core::ServerParams;

    fn round_robin(n: usize) -> Balancer {
        let svc = ServiceName::new("rr").unwrap();
        let params = ServerParams {
            max_fails: Some(4),
            ..ServerParams::default()
        };
        let instances = (0..n)
            .map(|i| {
                Instance::new(
                    svc.clone(),
                    format!("127.0.0.1:{}", 22_000 + i).parse().unwrap(),
                )
                .with_id(format!("i{i}"))
                .with_weight(4)
                .with_params(params.clone())
            })
            .collect();
        let mut config = BalanceConfig {
            strategy: Strategy::RoundRobin,
            ..BalanceConfig::default()
        };
        config.outlier.enabled = false;
        Balancer::new(svc, Live::new(instances), Live::new(config)).unwrap()
    }

    fn rotating(b: &Balancer) -> bool {
        b.roster().stable.all.primary.steady.load(Acquire) != 0
    }

    fn picks(b: &Balancer, n: usize, fail_first: bool) {
        for j in 0..n {
            let p = b.pick(&RequestInfo::default()).unwrap();
            p.complete(if fail_first && j == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            });
        }
    }

    #[test]
    fn an_abandoned_attempt_raises_the_latency_estimate_and_never_lowers_it() {
        let b = round_robin(1);
        let ewma_ms = || {
            let r = b.roster();
            r.entries[0].state.ewma_ns(r.default_rtt_ns) / 1e6
        };
        b.pick(&RequestInfo::default())
            .unwrap()
            .complete_with(Outcome::Success, Duration::from_millis(1));
        assert!(ewma_ms() < 60.0, "{}", ewma_ms());
        // A per-try timeout drops the attempt after 80 ms without an answer.
        let p = b.pick(&RequestInfo::default()).unwrap();
        std::thread::sleep(Duration::from_millis(80));
        drop(p);
        assert!(ewma_ms() >= 80.0, "the wait counts: {}", ewma_ms());
        // An attempt dropped at once tells nothing: the estimate stays.
        drop(b.pick(&RequestInfo::default()).unwrap());
        assert!(ewma_ms() >= 80.0, "not lowered: {}", ewma_ms());
        let r = b.roster();
        assert_eq!(r.entries[0].state.in_flight.load(Relaxed), 0);
    }

    #[test]
    fn an_abandoned_attempt_counts_against_a_faded_peak() {
        let b = round_robin(1);
        let mut config = b.shared.config.load().as_ref().clone();
        config.ewma_decay = Duration::from_millis(100);
        b.shared.config.store(config);
        let cost_ms = || {
            let r = b.roster();
            let now = b.shared.clock.now();
            r.entries[0]
                .state
                .ewma_cost_ns(r.default_rtt_ns, now, r.ewma_decay_ns)
                / 1e6
        };
        // A 3 s peak, faded to a few ms: the instance is picked again.
        b.pick(&RequestInfo::default())
            .unwrap()
            .complete_with(Outcome::Success, Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(600));
        assert!(cost_ms() < 20.0, "{}", cost_ms());
        // It stops answering: a 60 ms wait is below the stored peak, above what a pick sees.
        let p = b.pick(&RequestInfo::default()).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        drop(p);
        assert!(cost_ms() >= 30.0, "{}", cost_ms());
    }

    #[test]
    fn the_rotation_comes_back_after_a_penalty_and_an_avoided_pick() {
        let b = round_robin(5);
        picks(&b, 1, false);
        assert!(rotating(&b), "set up from the all-zero start");
        // A failure lowers a weight: the walk takes over, then hands back once the weight is
        // full again, although the state does not pass through zero any more.
        picks(&b, 1, true);
        picks(&b, 1, false);
        assert!(!rotating(&b));
        picks(&b, 20, false);
        assert!(rotating(&b), "back in rotation after the penalty");
        // A retry that avoids an instance goes through the walk, and the rotation comes back.
        let avoid = [InstanceId::new("i2")];
        let p = b
            .pick(&RequestInfo {
                avoid: &avoid,
                ..RequestInfo::default()
            })
            .unwrap();
        p.complete(Outcome::Success);
        assert!(!rotating(&b));
        picks(&b, 1, false);
        assert!(rotating(&b), "back in rotation after the avoided pick");
    }

    #[test]
    fn a_spread_of_exactly_n_w_rotates_only_when_the_tie_goes_the_right_way() {
        let b = round_robin(2);
        let r = b.roster();
        let g = &r.stable.all.primary;
        // From [4, -4] nginx picks 0, 0, 1 (0 wins the tie at [4, 4]): not a rotation.
        b.set_up_rotation(g, &[4, -4], 4, 0, 0);
        assert_eq!(g.steady.load(Acquire), 0);
        // From [-4, 4] it picks 1, 0, 1, 0: the rotation 1, 0.
        b.set_up_rotation(g, &[-4, 4], 4, 0, 0);
        assert_ne!(g.steady.load(Acquire), 0);
        assert_eq!(g.order[0].load(Relaxed), 1);
        assert_eq!(g.order[1].load(Relaxed), 0);
    }

    #[test]
    fn weighted_groups_and_max_conns_never_rotate() {
        let svc = ServiceName::new("rr").unwrap();
        let weighted = (0..3)
            .map(|i| {
                Instance::new(
                    svc.clone(),
                    format!("127.0.0.1:{}", 22_100 + i).parse().unwrap(),
                )
                .with_id(format!("w{i}"))
                .with_weight(1 + i as u32)
            })
            .collect();
        let config = BalanceConfig {
            strategy: Strategy::RoundRobin,
            ..BalanceConfig::default()
        };
        let b = Balancer::new(svc.clone(), Live::new(weighted), Live::new(config.clone())).unwrap();
        picks(&b, 30, false);
        assert!(!rotating(&b));
        let capped = (0..3)
            .map(|i| {
                Instance::new(
                    svc.clone(),
                    format!("127.0.0.1:{}", 22_200 + i).parse().unwrap(),
                )
                .with_id(format!("c{i}"))
                .with_params(ServerParams {
                    max_conns: Some(2),
                    ..ServerParams::default()
                })
            })
            .collect();
        let b = Balancer::new(svc, Live::new(capped), Live::new(config)).unwrap();
        picks(&b, 30, false);
        assert!(!rotating(&b));
    }
}
