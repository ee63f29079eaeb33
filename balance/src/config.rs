//! `[clients.X.balance]`: the balancing policy of one client, hot-swappable.
//!
//! Every default is the one of the system the behaviour comes from: nginx for passive health
//! (`max_fails = 1`, `fail_timeout = 10s`), Envoy for outlier detection, slow start and the panic
//! threshold, linkerd/Finagle for the EWMA decay (10 s) and default RTT (30 ms), Google's Maglev
//! paper for the table size (65537, a prime).

use std::{collections::BTreeMap, time::Duration};

use keel_core::{units::serde_duration, Ratio};
use serde::{Deserialize, Serialize};

/// Which algorithm picks among the instances that may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Power of two choices on peak EWMA latency × (in-flight + 1).
    #[default]
    P2cEwma,
    /// Power of two choices on in-flight requests (Envoy `LEAST_REQUEST`).
    LeastRequest,
    /// nginx smooth weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
    /// ketama consistent hashing.
    RingHash,
    /// Maglev consistent hashing.
    Maglev,
    /// Fewest open connections per weight (nginx `least_conn`), for long-lived connections.
    LeastConn,
}

impl Strategy {
    /// The name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::P2cEwma => "p2c-ewma",
            Strategy::LeastRequest => "least-request",
            Strategy::RoundRobin => "round-robin",
            Strategy::Random => "random",
            Strategy::RingHash => "ring-hash",
            Strategy::Maglev => "maglev",
            Strategy::LeastConn => "least-conn",
        }
    }
}

/// Where the hash strategies find the key of a request. An explicit
/// [`HashKey`](crate::HashKey) request extension always wins; a request without a key is
/// balanced at random.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HashKeySource {
    /// The value of this header (`{ header = "x-user-id" }`).
    Header(String),
    /// The n-th segment of the path, from 0 (`{ path_segment = 1 }`: `/users/42` → `42`).
    PathSegment(usize),
    /// The value of this cookie (`{ cookie = "session" }`).
    Cookie(String),
    /// Only the [`HashKey`](crate::HashKey) extension set by the caller (`"explicit"`).
    Explicit,
}

/// nginx passive health: `max_fails` failures within `fail_timeout` take an instance out for
/// `fail_timeout`. Per-instance `params` override these. A lone instance is never taken out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveHealthConfig {
    /// Failures that take the instance out; 0 disables passive health.
    pub max_fails: u32,
    /// The window in which failures count, and how long the instance then stays out.
    #[serde(with = "serde_duration")]
    pub fail_timeout: Duration,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        Self {
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
        }
    }
}

/// Envoy slow start: a new or recovered instance gets
/// `weight × max(min_weight_percent, (t / window)^(1 / aggression))`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlowStartConfig {
    /// Length of the ramp; zero disables slow start (per-instance `slow_start` overrides).
    #[serde(with = "serde_duration")]
    pub window: Duration,
    /// 1.0 is linear; larger ramps faster at first.
    pub aggression: f64,
    /// The floor of the ramp.
    pub min_weight_percent: Ratio,
}

impl Default for SlowStartConfig {
    fn default() -> Self {
        Self {
            window: Duration::ZERO,
            aggression: 1.0,
            min_weight_percent: Ratio::new(0.1).unwrap_or(Ratio::ZERO),
        }
    }
}

/// Envoy outlier detection, with Envoy's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Whether outlier detection runs at all.
    pub enabled: bool,
    /// How often success-rate and failure-percentage are evaluated (10 s).
    #[serde(with = "serde_duration")]
    pub interval: Duration,
    /// Ejection time is this × times ejected (30 s) ...
    #[serde(with = "serde_duration")]
    pub base_ejection_time: Duration,
    /// ... capped at this (300 s).
    #[serde(with = "serde_duration")]
    pub max_ejection_time: Duration,
    /// At most this share of instances ejected at once (10%); at least one may always be.
    pub max_ejection_percent: Ratio,
    /// Consecutive 5xx (or connection errors) that eject (5; 0 disables).
    pub consecutive_5xx: u32,
    /// Consecutive gateway failures (502, 503, 504, connection errors) that eject (5).
    pub consecutive_gateway_failure: u32,
    /// Envoy enforces gateway-failure ejection at 0% by default; `true` enforces it.
    pub enforce_consecutive_gateway_failure: bool,
    /// Success-rate ejection: enforce it (Envoy: 100%).
    pub enforce_success_rate: bool,
    /// Success-rate needs this many instances with enough volume (5).
    pub success_rate_minimum_hosts: u32,
    /// Requests an instance needs in one interval to count (100).
    pub success_rate_request_volume: u32,
    /// Ejected when below mean − factor × stdev (1.9).
    pub success_rate_stdev_factor: f64,
    /// Failure-percentage ejection: enforce it (Envoy: 0%, off).
    pub enforce_failure_percentage: bool,
    /// Ejected at or above this failure share (85%).
    pub failure_percentage_threshold: Ratio,
    /// Failure-percentage needs this many instances with enough volume (5).
    pub failure_percentage_minimum_hosts: u32,
    /// Requests an instance needs in one interval to count (50).
    pub failure_percentage_request_volume: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: Ratio::new(0.1).unwrap_or(Ratio::ZERO),
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            enforce_consecutive_gateway_failure: false,
            enforce_success_rate: true,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1.9,
            enforce_failure_percentage: false,
            failure_percentage_threshold: Ratio::new(0.85).unwrap_or(Ratio::ONE),
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
        }
    }
}

/// Zone-aware routing: prefer instances in `local_zone`; spill over to every zone when fewer than
/// `min_local_healthy` of the local ones are healthy (network isolation first, availability
/// always).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZoneConfig {
    /// The caller's zone; `None` disables zone-aware routing.
    pub local_zone: Option<String>,
    /// Spill over below this healthy share of local instances (70%, after Envoy's
    /// overprovisioning factor of 1.4).
    pub min_local_healthy: Ratio,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        Self {
            local_zone: None,
            min_local_healthy: Ratio::new(0.7).unwrap_or(Ratio::ONE),
        }
    }
}

/// A header whose value routes a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name (case-insensitive).
    pub name: String,
    /// Exact value.
    pub value: String,
}

/// A canary subset: the instances matching `version` and `tags` take `weight` of the traffic,
/// plus every request matching `header`. Rolled back by removing the table (or weight = 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CanaryConfig {
    /// Instances with this version are the canary.
    pub version: Option<String>,
    /// Instances with all these tags are the canary.
    pub tags: BTreeMap<String, String>,
    /// Share of ordinary traffic sent to the canary (`5%`).
    pub weight: Ratio,
    /// Requests matching this header always go to the canary.
    pub header: Option<HeaderMatch>,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        Self {
            version: None,
            tags: BTreeMap::new(),
            weight: Ratio::ZERO,
            header: None,
        }
    }
}

impl CanaryConfig {
    pub(crate) fn matches(&self, i: &keel_core::Instance) -> bool {
        if let Some(v) = &self.version {
            if i.version.as_deref() != Some(v.as_str()) {
                return false;
            }
        }
        self.tags.iter().all(|(k, v)| i.tags.get(k) == Some(v))
    }
}

/// The `[clients.X.balance]` table.
///
/// ```
/// use keel_balance::{BalanceConfig, Strategy};
/// let c: BalanceConfig = toml::from_str(r#"
///     strategy = "maglev"
///     hash_key = { header = "x-user" }
///     hash_balance_factor = 1.25
///     [canary]
///     version = "2"
///     weight = "5%"
/// "#).unwrap();
/// assert_eq!(c.strategy, Strategy::Maglev);
/// c.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceConfig {
    /// The algorithm.
    pub strategy: Strategy,
    /// Time constant of the peak EWMA (10 s).
    #[serde(with = "serde_duration")]
    pub ewma_decay: Duration,
    /// RTT assumed for an instance with no observation yet (30 ms).
    #[serde(with = "serde_duration")]
    pub default_rtt: Duration,
    /// Envoy's active-request bias for `least-request` (1.0).
    pub least_request_bias: f64,
    /// Where the hash strategies find the key.
    pub hash_key: Option<HashKeySource>,
    /// Bounded load for hash strategies: no instance above `factor ×` the average (> 1.0).
    pub hash_balance_factor: Option<f64>,
    /// Maglev lookup table size, a prime (65537).
    pub maglev_table_size: u32,
    /// ketama points per unit of (relative) weight (160).
    pub ring_points_per_weight: u32,
    /// `least-conn`: a connection older than this should be closed so load moves onto new
    /// instances ([`Picked::should_close`](crate::Picked::should_close)).
    #[serde(with = "serde_duration::option")]
    pub max_connection_age: Option<Duration>,
    /// nginx passive health defaults.
    pub passive: PassiveHealthConfig,
    /// Envoy slow start.
    pub slow_start: SlowStartConfig,
    /// Envoy outlier detection.
    pub outlier: OutlierConfig,
    /// Below this healthy share, balance across every instance regardless of health (50%).
    pub panic_threshold: Ratio,
    /// Zone-aware routing.
    pub zone: ZoneConfig,
    /// Canary subset.
    pub canary: Option<CanaryConfig>,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            ewma_decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
            least_request_bias: 1.0,
            hash_key: None,
            hash_balance_factor: None,
            maglev_table_size: 65_537,
            ring_points_per_weight: 160,
            max_connection_age: None,
            passive: PassiveHealthConfig::default(),
            slow_start: SlowStartConfig::default(),
            outlier: OutlierConfig::default(),
            panic_threshold: Ratio::new(0.5).unwrap_or(Ratio::ZERO),
            zone: ZoneConfig::default(),
            canary: None,
        }
    }
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

impl BalanceConfig {
    /// Checks every key; the error names the first bad one. The balancer runs this at
    /// construction; a reload must pass it before it is published.
    pub fn validate(&self) -> Result<(), String> {
        if self.ewma_decay.is_zero() {
            return Err("ewma_decay must be more than 0".into());
        }
        if !(self.least_request_bias.is_finite() && (0.0..=10.0).contains(&self.least_request_bias))
        {
            return Err(format!(
                "least_request_bias must be between 0 and 10, got {}",
                self.least_request_bias
            ));
        }
        if let Some(f) = self.hash_balance_factor {
            if !(f.is_finite() && f > 1.0) {
                return Err(format!(
                    "hash_balance_factor must be more than 1.0, got {f}"
                ));
            }
        }
        if !is_prime(self.maglev_table_size) || self.maglev_table_size < 7 {
            return Err(format!(
                "maglev_table_size must be a prime of at least 7 (65537 is good), got {}",
                self.maglev_table_size
            ));
        }
        if self.maglev_table_size > 5_000_011 {
            return Err("maglev_table_size must be at most 5000011".into());
        }
        if !(1..=10_000).contains(&self.ring_points_per_weight) {
            return Err("ring_points_per_weight must be 1 to 10000".into());
        }
        if self.passive.max_fails > 0 && self.passive.fail_timeout.is_zero() {
            return Err("passive.fail_timeout must be more than 0 when max_fails > 0".into());
        }
        let s = &self.slow_start;
        if !(s.aggression.is_finite() && s.aggression > 0.0) {
            return Err(format!(
                "slow_start.aggression must be more than 0, got {}",
                s.aggression
            ));
        }
        let o = &self.outlier;
        if o.enabled {
            if o.interval.is_zero() {
                return Err("outlier.interval must be more than 0".into());
            }
            if o.base_ejection_time.is_zero() {
                return Err("outlier.base_ejection_time must be more than 0".into());
            }
            if o.max_ejection_time < o.base_ejection_time {
                return Err("outlier.max_ejection_time must be at least base_ejection_time".into());
            }
            if !(o.success_rate_stdev_factor.is_finite() && o.success_rate_stdev_factor >= 0.0) {
                return Err("outlier.success_rate_stdev_factor must be 0 or more".into());
            }
        }
        if let Some(z) = &self.zone.local_zone {
            if z.is_empty() {
                return Err("zone.local_zone must not be empty".into());
            }
        }
        if let Some(c) = &self.canary {
            if c.version.is_none() && c.tags.is_empty() {
                return Err("canary needs a version or tags to select its instances".into());
            }
            if let Some(h) = &c.header {
                if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                    return Err(format!(
                        "canary.header.name {:?} is not a header name",
                        h.name
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_round_trip() {
        let c = BalanceConfig::default();
        c.validate().unwrap();
        let s = toml::to_string(&c).unwrap();
        let back: BalanceConfig = toml::from_str(&s).unwrap();
        assert_eq!(back, c);
        let empty: BalanceConfig = toml::from_str("").unwrap();
        assert_eq!(empty, c);
    }

    #[test]
    fn parses_every_knob() {
        let c: BalanceConfig = toml::from_str(
            r#"
            strategy = "least-request"
            ewma_decay = "5s"
            default_rtt = "10ms"
            hash_key = { path_segment = 1 }
            max_connection_age = "10m"
            panic_threshold = "30%"
            [passive]
            max_fails = 3
            fail_timeout = "30s"
            [slow_start]
            window = "60s"
            aggression = 2.0
            [outlier]
            consecutive_5xx = 3
            [zone]
            local_zone = "eu-1a"
            [canary]
            tags = { track = "canary" }
            weight = 0.05
            header = { name = "x-canary", value = "1" }
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.hash_key, Some(HashKeySource::PathSegment(1)));
        assert_eq!(c.passive.max_fails, 3);
        assert_eq!(c.slow_start.window, Duration::from_secs(60));
        let e: BalanceConfig = toml::from_str(r#"hash_key = "explicit""#).unwrap();
        assert_eq!(e.hash_key, Some(HashKeySource::Explicit));
    }

    #[test]
    fn refuses_bad_values() {
        assert!(toml::from_str::<BalanceConfig>("strategy = \"fastest\"").is_err());
        assert!(toml::from_str::<BalanceConfig>("nope = 1").is_err());
        let bad = |f: fn(&mut BalanceConfig)| {
            let mut c = BalanceConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(|c| c.maglev_table_size = 65_536).contains("maglev_table_size"));
        assert!(bad(|c| c.hash_balance_factor = Some(0.9)).contains("hash_balance_factor"));
        assert!(bad(|c| c.ewma_decay = Duration::ZERO).contains("ewma_decay"));
        assert!(bad(|c| c.canary = Some(CanaryConfig::default())).contains("canary"));
    }
}
