//! The pick tables: one immutable snapshot of who may be picked, rebuilt whenever the instance
//! set, the active health or the policy changes, and swapped in whole (arc-swap).
//!
//! Instances are sorted into groups once per rebuild, not once per pick: subset (canary or
//! stable) × zone (local or all) × tier (primary or nginx `backup`). Each group keeps its own
//! alias table, SWRR position and (lazily, for the strategy in use) its ring or Maglev table.
//! What changes between rebuilds (ejections, in-flight, EWMA) is read from the per-instance
//! atomics at pick time.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
        Arc, Mutex, OnceLock, Weak,
    },
};

use keel_core::{AdminState, Health, HealthMap, HealthStatus, Instance, InstanceId, ServiceName};
use metrics::{Counter, Histogram};

use crate::{
    classify::Outcome,
    config::BalanceConfig,
    picker::Shared,
    state::{ns, slow_start_factor, Clock, InstanceState},
    tables::{Alias, Maglev, Ring},
    telemetry,
};

/// Per-instance state and metric handles, kept across rebuilds by id.
pub(crate) type States = HashMap<InstanceId, (Arc<InstanceState>, Arc<EntryMetrics>)>;

/// Pre-registered metric handles of one instance.
#[derive(Debug)]
pub(crate) struct EntryMetrics {
    requests: [Counter; 5],
    pub(crate) duration: Histogram,
}

impl EntryMetrics {
    fn new(service: &ServiceName, id: &InstanceId) -> Self {
        let c = |o: Outcome| {
            metrics::counter!(telemetry::REQUESTS_TOTAL,
                "service" => service.to_string(), "instance" => id.to_string(), "outcome" => o.as_str())
        };
        Self {
            requests: [
                c(Outcome::Success),
                c(Outcome::Slow),
                c(Outcome::Failure),
                c(Outcome::GatewayFailure),
                c(Outcome::Cancelled),
            ],
            duration: metrics::histogram!(telemetry::REQUEST_DURATION_SECONDS,
                "service" => service.to_string(), "instance" => id.to_string()),
        }
    }

    pub(crate) fn request(&self, o: Outcome) {
        self.requests[o as usize].increment(1);
    }
}

/// What a [`Picked`](crate::Picked) needs of its balancer, held by each entry so a pick clones
/// one `Arc` (the entry) rather than two.
#[derive(Debug, Clone)]
pub(crate) struct Backref {
    pub(crate) shared: Weak<Shared>,
    pub(crate) clock: Clock,
    pub(crate) total_in_flight: Arc<AtomicU64>,
}

/// One instance in the tables. The fields a pick reads come first.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Entry {
    pub(crate) state: Arc<InstanceState>,
    pub(crate) max_conns: u32,
    pub(crate) weight: u32,
    /// Whether active health allows picking it.
    pub(crate) active_ok: bool,
    /// Whether it is in any group (admin `up`/`backup`, not draining).
    pub(crate) pickable: bool,
    pub(crate) slow_window: u64,
    pub(crate) max_fails: u32,
    pub(crate) fail_timeout: u64,
    pub(crate) instance: Instance,
    /// Active health from discovery, when it is not plain healthy.
    pub(crate) active: Option<Health>,
    pub(crate) metrics: Arc<EntryMetrics>,
    pub(crate) backref: Backref,
}

/// What a draw reads of one member, packed beside the others so a draw touches this array and
/// the member's state line, not the whole entry.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) state: Arc<InstanceState>,
    /// Index into the roster's entries.
    pub(crate) idx: u32,
    pub(crate) max_conns: u32,
    pub(crate) active_ok: bool,
    /// Slow start may apply.
    pub(crate) slow: bool,
}

/// A set of members that one strategy picks among.
#[derive(Debug)]
pub(crate) struct Group {
    /// Indices into the roster's entries.
    pub(crate) members: Vec<u32>,
    /// The same members, packed for draws (same order).
    pub(crate) hot: Vec<Member>,
    pub(crate) alias: Alias,
    pub(crate) swrr: Mutex<Vec<i64>>,
    /// Every member has the same weight, no slow start and no `max_conns`: round robin over
    /// them is a rotation whenever nothing is penalized, avoided or out (see `Balancer::rotate`).
    pub(crate) uniform: bool,
    /// Non-zero while round robin may rotate without the lock: the picker's penalty count plus
    /// one, as it was when the rotation was set up.
    pub(crate) steady: AtomicU64,
    /// The picker's health epoch when the rotation was set up.
    pub(crate) steady_epoch: AtomicU64,
    /// The rotation's next turn: turn `t` goes to the member at position `order[t % members]`.
    pub(crate) rr: AtomicU64,
    /// The members' positions in the order the rotation visits them.
    pub(crate) order: Box<[AtomicU32]>,
    maglev: OnceLock<Maglev>,
    ring: OnceLock<Ring>,
    /// `(epoch + 1) << 32 | healthy members`, recomputed when the epoch moves.
    health: AtomicU64,
    pub(crate) weight_sum: u64,
}

impl Group {
    fn new(entries: &[Arc<Entry>], members: Vec<u32>) -> Self {
        let weights: Vec<f64> = members
            .iter()
            .map(|&m| f64::from(entries[m as usize].weight))
            .collect();
        let hot = members
            .iter()
            .map(|&m| {
                let e = &entries[m as usize];
                Member {
                    state: e.state.clone(),
                    idx: m,
                    max_conns: e.max_conns,
                    active_ok: e.active_ok,
                    slow: e.slow_window != 0,
                }
            })
            .collect::<Vec<Member>>();
        // `max_conns` would make a member's turn depend on its load: not a rotation.
        let uniform = hot.iter().all(|h| !h.slow && h.max_conns == 0)
            && weights.windows(2).all(|w| w[0] == w[1]);
        Self {
            hot,
            alias: Alias::new(&weights),
            swrr: Mutex::new(vec![0; members.len()]),
            uniform,
            steady: AtomicU64::new(0),
            steady_epoch: AtomicU64::new(0),
            rr: AtomicU64::new(0),
            order: (0..members.len()).map(|_| AtomicU32::new(0)).collect(),
            weight_sum: weights.iter().sum::<f64>() as u64,
            members,
            maglev: OnceLock::new(),
            ring: OnceLock::new(),
            health: AtomicU64::new(0),
        }
    }

    pub(crate) fn maglev(&self, r: &Roster) -> &Maglev {
        self.maglev.get_or_init(|| {
            Maglev::build(
                self.members.iter().map(|&m| {
                    let e = &r.entries[m as usize];
                    (e.instance.id.as_str(), e.weight)
                }),
                r.config.maglev_table_size,
            )
        })
    }

    pub(crate) fn ring(&self, r: &Roster) -> &Ring {
        self.ring.get_or_init(|| {
            Ring::build(
                self.members.iter().map(|&m| {
                    let e = &r.entries[m as usize];
                    (e.instance.id.as_str(), e.weight)
                }),
                r.config.ring_points_per_weight,
            )
        })
    }

    /// `(healthy, total)` members, cached per health epoch.
    pub(crate) fn health(
        &self,
        r: &Roster,
        epoch: u64,
        next_expiry: &AtomicU64,
        now: u64,
    ) -> (usize, usize) {
        let tag = (epoch + 1) & 0xffff_ffff;
        let c = self.health.load(Relaxed);
        if c >> 32 == tag {
            return ((c & 0xffff_ffff) as usize, self.members.len());
        }
        let mut healthy = 0usize;
        for &m in &self.members {
            let e = &r.entries[m as usize];
            if r.healthy(e, now) {
                healthy += 1;
            } else {
                for until in [
                    e.state.ejected_until.load(Relaxed),
                    e.state.passive_until.load(Relaxed),
                ] {
                    if until > now {
                        next_expiry.fetch_min(until, Relaxed);
                    }
                }
            }
        }
        self.health.store(tag << 32 | healthy as u64, Relaxed);
        (healthy, self.members.len())
    }
}

/// Primaries, and nginx backups used only when no primary can serve.
#[derive(Debug)]
pub(crate) struct Tier {
    pub(crate) primary: Group,
    pub(crate) backup: Group,
}

impl Tier {
    fn new(entries: &[Arc<Entry>], members: &[u32]) -> Self {
        let (backup, primary): (Vec<u32>, Vec<u32>) = members
            .iter()
            .partition(|&&m| entries[m as usize].instance.state == AdminState::Backup);
        Self {
            primary: Group::new(entries, primary),
            backup: Group::new(entries, backup),
        }
    }
}

/// One subset, with its local-zone part when zone-aware routing is on.
#[derive(Debug)]
pub(crate) struct Zoned {
    pub(crate) local: Option<Tier>,
    pub(crate) all: Tier,
}

impl Zoned {
    fn new(entries: &[Arc<Entry>], members: Vec<u32>, local_zone: Option<&str>) -> Self {
        let local = local_zone.and_then(|z| {
            let l: Vec<u32> = members
                .iter()
                .copied()
                .filter(|&m| entries[m as usize].instance.zone.as_deref() == Some(z))
                .collect();
            (!l.is_empty()).then(|| Tier::new(entries, &l))
        });
        Self {
            local,
            all: Tier::new(entries, &members),
        }
    }
}

/// The whole snapshot a pick reads.
#[derive(Debug)]
pub(crate) struct Roster {
    pub(crate) config: Arc<BalanceConfig>,
    pub(crate) entries: Vec<Arc<Entry>>,
    pub(crate) stable: Zoned,
    pub(crate) canary: Option<Zoned>,
    /// Only one primary: nginx ignores `max_fails` for it.
    pub(crate) lone: bool,
    pub(crate) generation: u64,
    /// The input stamp these tables were built at.
    pub(crate) stamp: u64,
    pub(crate) default_rtt_ns: f64,
    pub(crate) ewma_decay_ns: f64,
    pub(crate) slow_aggression: f64,
    pub(crate) slow_min: f64,
    pub(crate) canary_header: Option<(http::HeaderName, http::HeaderValue)>,
    pub(crate) hash_header: Option<http::HeaderName>,
}

impl Roster {
    /// Builds the tables, reusing the state of instances already known (by id) and creating state
    /// for new ones. State of instances that left is dropped from `states`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build(
        service: &ServiceName,
        instances: Arc<Vec<Instance>>,
        health: Option<Arc<HealthMap>>,
        config: Arc<BalanceConfig>,
        states: &mut States,
        now: u64,
        first: bool,
        generation: u64,
        stamp: u64,
        backref: &Backref,
    ) -> Self {
        let mut seen = HashSet::new();
        let mut entries = Vec::with_capacity(instances.len());
        for i in instances.iter() {
            if !seen.insert(i.id.clone()) {
                tracing::warn!(service = %service, instance = %i.id, "duplicate instance id ignored");
                continue;
            }
            let weight = i.weight.clamp(1, Instance::MAX_WEIGHT);
            let (state, metrics) = states
                .entry(i.id.clone())
                .or_insert_with(|| {
                    (
                        Arc::new(InstanceState::new(weight, if first { 0 } else { now })),
                        Arc::new(EntryMetrics::new(service, &i.id)),
                    )
                })
                .clone();
            let active = health.as_ref().and_then(|h| h.get(&i.id)).cloned();
            let status = active.as_ref().map_or(HealthStatus::Healthy, |h| h.status);
            let active_ok = status.is_available();
            // Back from an active-health outage: ramp up as a new instance does (Envoy and
            // nginx slow-start a recovered host too).
            if state.active_down.swap(!active_ok, Relaxed) && active_ok {
                state.ramp_start.store(now.max(1), Relaxed);
            }
            let pickable = matches!(i.state, AdminState::Up | AdminState::Backup)
                && status != HealthStatus::Draining;
            entries.push(Arc::new(Entry {
                metrics,
                backref: backref.clone(),
                instance: i.clone(),
                state,
                active: active.filter(|h| h.status != HealthStatus::Healthy),
                active_ok,
                pickable,
                weight,
                max_conns: i.params.max_conns.unwrap_or(0),
                max_fails: i.params.max_fails.unwrap_or(config.passive.max_fails),
                fail_timeout: ns(i.params.fail_timeout.unwrap_or(config.passive.fail_timeout)),
                slow_window: ns(i.params.slow_start.unwrap_or(config.slow_start.window)),
            }));
        }
        states.retain(|id, _| seen.contains(id));

        let pickable: Vec<u32> = (0..entries.len() as u32)
            .filter(|&m| entries[m as usize].pickable)
            .collect();
        let primaries = pickable
            .iter()
            .filter(|&&m| entries[m as usize].instance.state == AdminState::Up)
            .count();
        let local_zone = config.zone.local_zone.as_deref();
        let (stable, canary) = match &config.canary {
            Some(c) => {
                let (can, stab): (Vec<u32>, Vec<u32>) = pickable
                    .iter()
                    .partition(|&&m| c.matches(&entries[m as usize].instance));
                if can.is_empty() {
                    (Zoned::new(&entries, pickable, local_zone), None)
                } else {
                    (
                        Zoned::new(&entries, stab, local_zone),
                        Some(Zoned::new(&entries, can, local_zone)),
                    )
                }
            }
            None => (Zoned::new(&entries, pickable, local_zone), None),
        };
        let canary_header = config
            .canary
            .as_ref()
            .and_then(|c| c.header.as_ref())
            .and_then(|h| {
                Some((
                    http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                    http::HeaderValue::from_str(&h.value).ok()?,
                ))
            });
        let hash_header = match &config.hash_key {
            Some(crate::config::HashKeySource::Header(h)) => {
                http::HeaderName::from_bytes(h.as_bytes()).ok()
            }
            _ => None,
        };
        metrics::gauge!(telemetry::INSTANCES, "service" => service.to_string(), "outcome" => "pickable")
            .set(pickable_count(&entries) as f64);
        metrics::gauge!(telemetry::INSTANCES, "service" => service.to_string(), "outcome" => "unavailable")
            .set((entries.len() - pickable_count(&entries)) as f64);
        Self {
            default_rtt_ns: config.default_rtt.as_nanos() as f64,
            ewma_decay_ns: config.ewma_decay.as_nanos().max(1) as f64,
            slow_aggression: config.slow_start.aggression,
            slow_min: config.slow_start.min_weight_percent.get(),
            entries,
            stable,
            canary,
            lone: primaries <= 1,
            generation,
            stamp,
            canary_header,
            hash_header,
            config,
        }
    }

    /// Whether health allows picking `e` now (panic mode ignores this).
    #[inline]
    pub(crate) fn healthy(&self, e: &Entry, now: u64) -> bool {
        e.active_ok && (self.lone || !e.state.passive_out(now)) && !e.state.outlier_ejected(now)
    }

    /// Slow-start factor of `e` now.
    #[inline]
    pub(crate) fn slow_factor(&self, e: &Entry, now: u64) -> f64 {
        if e.slow_window == 0 {
            return 1.0;
        }
        slow_start_factor(
            e.state.ramp_start.load(Relaxed),
            now,
            e.slow_window,
            self.slow_aggression,
            self.slow_min,
        )
    }

    pub(crate) fn entry(&self, id: &InstanceId) -> Option<&Arc<Entry>> {
        self.entries.iter().find(|e| &e.instance.id == id)
    }
}

fn pickable_count(entries: &[Arc<Entry>]) -> usize {
    entries.iter().filter(|e| e.pickable).count()
}
