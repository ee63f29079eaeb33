//! The `[discovery]` section and the static endpoints of `[[clients.X.endpoints]]`.
//!
//! Every key has a default, so an absent section means the embedded in-memory backend. The same
//! `validate` gate is used at start and on each hot reload.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use keel_core::{
    units::serde_duration, AdminState, Instance, InvalidInstance, Ratio, ServerParams, ServiceName,
};
use serde::{Deserialize, Serialize};

/// Which backend finds instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In-process (the default): one process, or tests.
    #[default]
    Memory,
    /// Endpoints from configuration.
    Static,
    /// A file listing instances, hot-reloaded.
    File,
    /// DNS A/AAAA or SRV records.
    Dns,
    /// Redis records with server-side TTL and a change stream.
    Redis,
    /// etcd 3.4+ through its JSON gateway, records on leases.
    Etcd,
}

impl Backend {
    /// The name used in configuration and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Static => "static",
            Backend::File => "file",
            Backend::Dns => "dns",
            Backend::Redis => "redis",
            Backend::Etcd => "etcd",
        }
    }
}

/// The `[discovery]` section.
///
/// ```toml
/// [discovery]
/// backend = "redis"
/// url = "redis://127.0.0.1:6379/"
/// ttl = "10s"
/// prefix = "keel"
/// max_shrink = "50%"
/// cache_path = "/var/cache/keel"
/// [discovery.health]
/// enabled = true
/// path = "/health"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// `memory` (default), `static`, `file`, `dns`, `redis` or `etcd`.
    pub backend: Backend,
    /// Where the backend is: a Redis URL, an etcd endpoint (`http://127.0.0.1:2379`), the path of
    /// the file, or the DNS server (`127.0.0.1:53`; empty means the system's resolvers).
    pub url: Option<String>,
    /// How long a registration lives without a heartbeat (heartbeats every `ttl / 3`). Default 10s.
    #[serde(with = "serde_duration")]
    pub ttl: Duration,
    /// Key prefix in Redis and etcd. Default `keel`.
    pub prefix: String,
    /// Largest shrink of a set applied in one step. Default 50%.
    pub max_shrink: Ratio,
    /// Reads in a row after which a larger shrink (or an empty set) is believed. Default 3.
    pub confirm_reads: u32,
    /// Full re-read of every watched service this often, besides change events. Default 30s.
    #[serde(with = "serde_duration")]
    pub resync: Duration,
    /// Directory for the on-disk cache of the last good set of each service; used at start when
    /// the backend cannot be reached. Default none.
    pub cache_path: Option<PathBuf>,
    /// Endpoints of each service for the `static` backend.
    pub services: BTreeMap<String, Vec<StaticEndpoint>>,
    /// DNS options.
    pub dns: DnsConfig,
    /// Active health checks.
    pub health: HealthCheckConfig,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Memory,
            url: None,
            ttl: Duration::from_secs(10),
            prefix: "keel".to_owned(),
            max_shrink: Ratio::new(0.5).unwrap_or(Ratio::ONE),
            confirm_reads: 3,
            resync: Duration::from_secs(30),
            cache_path: None,
            services: BTreeMap::new(),
            dns: DnsConfig::default(),
            health: HealthCheckConfig::default(),
        }
    }
}

impl DiscoveryConfig {
    /// Checks the whole section; the error names the bad key.
    pub fn validate(&self) -> Result<(), String> {
        let needs_url = matches!(self.backend, Backend::File | Backend::Redis | Backend::Etcd);
        if needs_url && self.url.as_deref().is_none_or(str::is_empty) {
            return Err(format!(
                "discovery.url is required for backend = \"{}\"",
                self.backend.as_str()
            ));
        }
        if self.ttl < Duration::from_millis(100) {
            return Err("discovery.ttl must be at least 100ms".to_owned());
        }
        if self.backend == Backend::Etcd && self.ttl < Duration::from_secs(2) {
            return Err(
                "discovery.ttl must be at least 2s for etcd (its minimum lease TTL)".to_owned(),
            );
        }
        if self.prefix.is_empty() || self.prefix.chars().any(char::is_whitespace) {
            return Err("discovery.prefix must be non-empty without whitespace".to_owned());
        }
        if self.confirm_reads == 0 {
            return Err("discovery.confirm_reads must be at least 1".to_owned());
        }
        if self.resync.is_zero() {
            return Err("discovery.resync must be greater than 0".to_owned());
        }
        for (service, endpoints) in &self.services {
            let name = ServiceName::new(service)
                .map_err(|e| format!("discovery.services.{service}: {e}"))?;
            for (n, e) in endpoints.iter().enumerate() {
                e.to_instance(&name)
                    .map_err(|e| format!("discovery.services.{service}[{n}]: {e}"))?;
            }
        }
        self.dns.validate()?;
        self.health.validate()
    }
}

/// Which DNS records name the instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsRecord {
    /// A and AAAA records, with `port` (the default).
    #[default]
    A,
    /// SRV records: port, priority (lowest are primaries, the rest backups) and weight.
    Srv,
}

/// `[discovery.dns]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// The name to resolve; `{service}` is replaced by the service name. Default `{service}`.
    /// For SRV, e.g. `_http._tcp.{service}.svc.cluster.local.`.
    pub name: String,
    /// `a` (default) or `srv`.
    pub record: DnsRecord,
    /// The port of A/AAAA instances. Default 80.
    pub port: u16,
    /// Re-resolve no sooner than this, whatever the TTL says (also the pause after a failed
    /// lookup). Default 1s; at least [`MIN_DNS_TTL`], so a zero TTL or a failing server does
    /// not turn the watcher into a busy loop.
    #[serde(with = "serde_duration")]
    pub min_ttl: Duration,
    /// Re-resolve at least this often, whatever the TTL says. Default 5 min.
    #[serde(with = "serde_duration")]
    pub max_ttl: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            name: "{service}".to_owned(),
            record: DnsRecord::A,
            port: 80,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
        }
    }
}

/// The least `discovery.dns.min_ttl`.
pub const MIN_DNS_TTL: Duration = Duration::from_millis(100);

impl DnsConfig {
    /// Checks the section.
    pub fn validate(&self) -> Result<(), String> {
        if !self.name.contains("{service}") {
            return Err("discovery.dns.name must contain {service}".to_owned());
        }
        if self.record == DnsRecord::A && self.port == 0 {
            return Err("discovery.dns.port must not be 0".to_owned());
        }
        if self.min_ttl < MIN_DNS_TTL {
            return Err(format!(
                "discovery.dns.min_ttl must be at least {}ms (a zero TTL would re-resolve without pause)",
                MIN_DNS_TTL.as_millis()
            ));
        }
        if self.min_ttl > self.max_ttl {
            return Err("discovery.dns.min_ttl must be <= max_ttl".to_owned());
        }
        Ok(())
    }
}

/// How an active check probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// `GET {path}`, passing on the expected status (default any 2xx or 3xx).
    #[default]
    Http,
    /// A TCP connect.
    Tcp,
}

/// `[discovery.health]`: active health checks with HAProxy's semantics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Run active checks on the instances of the services this process calls. Default false.
    pub enabled: bool,
    /// `http` (default) or `tcp`.
    pub kind: CheckKind,
    /// The HTTP path. Default `/health`.
    pub path: String,
    /// The status that passes; default any 2xx or 3xx.
    pub expected_status: Option<u16>,
    /// Time between checks of a stable instance (HAProxy `inter`). Default 2s.
    #[serde(with = "serde_duration")]
    pub interval: Duration,
    /// Time between checks while an instance is changing state (HAProxy `fastinter`). Default =
    /// `interval`.
    #[serde(with = "serde_duration::option")]
    pub fastinter: Option<Duration>,
    /// Time between checks while an instance is down (HAProxy `downinter`). Default = `interval`.
    #[serde(with = "serde_duration::option")]
    pub downinter: Option<Duration>,
    /// How long a check may take. Default 1s.
    #[serde(with = "serde_duration")]
    pub timeout: Duration,
    /// Consecutive failures that take an instance down (HAProxy `fall`). Default 3.
    pub fall: u32,
    /// Consecutive passes that bring it back (HAProxy `rise`). Default 2.
    pub rise: u32,
    /// Random spread of each interval, so that many checkers do not probe in step
    /// (HAProxy `spread-checks`). Default 10%.
    pub jitter: Ratio,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            kind: CheckKind::Http,
            path: "/health".to_owned(),
            expected_status: None,
            interval: Duration::from_secs(2),
            fastinter: None,
            downinter: None,
            timeout: Duration::from_secs(1),
            fall: 3,
            rise: 2,
            jitter: Ratio::new(0.1).unwrap_or(Ratio::ZERO),
        }
    }
}

impl HealthCheckConfig {
    /// Checks the section.
    pub fn validate(&self) -> Result<(), String> {
        if self.fall == 0 || self.rise == 0 {
            return Err("discovery.health.fall and rise must be at least 1".to_owned());
        }
        let zero = |d: Option<Duration>| d.is_some_and(|d| d.is_zero());
        if self.interval.is_zero() || zero(self.fastinter) || zero(self.downinter) {
            return Err("discovery.health intervals must be greater than 0".to_owned());
        }
        if self.timeout.is_zero() {
            return Err("discovery.health.timeout must be greater than 0".to_owned());
        }
        if !self.path.starts_with('/') {
            return Err("discovery.health.path must start with /".to_owned());
        }
        if let Some(s) = self.expected_status {
            if !(100..=599).contains(&s) {
                return Err("discovery.health.expected_status must be 100 to 599".to_owned());
            }
        }
        Ok(())
    }
}

/// One `[[clients.X.endpoints]]` entry, with nginx's per-server parameters.
///
/// ```
/// use keel_core::{AdminState, ServiceName};
/// use keel_discovery::StaticEndpoint;
///
/// let e: StaticEndpoint = toml::from_str(r#"
///     addr = "127.0.0.1:8066"
///     weight = 10
///     max_fails = 3
///     fail_timeout = "30s"
///     backup = true
/// "#).unwrap();
/// let i = e.to_instance(&ServiceName::new("payments").unwrap()).unwrap();
/// assert_eq!(i.weight, 10);
/// assert_eq!(i.state, AdminState::Backup);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticEndpoint {
    /// `ip:port`.
    pub addr: String,
    /// Relative weight. Default 1.
    #[serde(default = "one")]
    pub weight: u32,
    /// nginx `max_fails`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_fails: Option<u32>,
    /// nginx `fail_timeout`.
    #[serde(
        default,
        with = "serde_duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub fail_timeout: Option<Duration>,
    /// nginx `backup`: used only when no primary can serve.
    #[serde(default)]
    pub backup: bool,
    /// nginx `down`: never used.
    #[serde(default)]
    pub down: bool,
    /// nginx `slow_start`.
    #[serde(
        default,
        with = "serde_duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub slow_start: Option<Duration>,
    /// nginx `max_conns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_conns: Option<u32>,
    /// Zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Instance id; default `{service}-{addr}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

fn one() -> u32 {
    1
}

impl StaticEndpoint {
    /// An endpoint at `addr` with every default.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            weight: 1,
            max_fails: None,
            fail_timeout: None,
            backup: false,
            down: false,
            slow_start: None,
            max_conns: None,
            zone: None,
            version: None,
            tags: BTreeMap::new(),
            id: None,
        }
    }

    /// The instance this endpoint describes, validated.
    pub fn to_instance(&self, service: &ServiceName) -> Result<Instance, InvalidInstance> {
        let addr: SocketAddr = self.addr.trim().parse().map_err(|_| InvalidInstance {
            field: "addr".to_owned(),
            reason: format!(
                "{:?} is not ip:port (use the dns backend for host names)",
                self.addr
            ),
        })?;
        if self.backup && self.down {
            return Err(InvalidInstance {
                field: "backup".to_owned(),
                reason: "an endpoint cannot be both backup and down".to_owned(),
            });
        }
        let mut i = Instance::new(service.clone(), addr).with_weight(self.weight);
        if let Some(id) = &self.id {
            i = i.with_id(id.as_str());
        }
        i.zone = self.zone.clone();
        i.version = self.version.clone();
        i.tags = self.tags.clone();
        i.state = if self.down {
            AdminState::Down
        } else if self.backup {
            AdminState::Backup
        } else {
            AdminState::Up
        };
        i.params = ServerParams {
            max_fails: self.max_fails,
            fail_timeout: self.fail_timeout,
            slow_start: self.slow_start,
            max_conns: self.max_conns,
        };
        i.validate()?;
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn defaults_validate_and_unknown_keys_are_refused() {
        DiscoveryConfig::default().validate().unwrap();
        let c: DiscoveryConfig = toml::from_str(
            "backend = \"redis\"\nurl = \"redis://127.0.0.1/\"\nttl = \"600ms\"\nmax_shrink = \"30%\"\n[health]\nenabled = true\nfall = 2\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.ttl, Duration::from_millis(600));
        assert_eq!(c.max_shrink.get(), 0.3);
        assert!(toml::from_str::<DiscoveryConfig>("backendd = \"redis\"").is_err());
        let no_url: DiscoveryConfig = toml::from_str("backend = \"etcd\"").unwrap();
        assert!(no_url.validate().unwrap_err().contains("url"));
    }

    #[test]
    fn dns_re_resolves_no_more_often_than_the_floor() {
        let dns = |min: &str, max: &str| {
            toml::from_str::<DnsConfig>(&format!("min_ttl = \"{min}\"\nmax_ttl = \"{max}\""))
                .unwrap()
                .validate()
        };
        assert!(dns("0s", "5m").unwrap_err().contains("at least 100ms"));
        assert!(dns("99ms", "5m").unwrap_err().contains("min_ttl"));
        dns("100ms", "100ms").unwrap();
        assert!(dns("2s", "1s").unwrap_err().contains("<= max_ttl"));
    }

    #[test]
    fn static_endpoint_refuses_bad_input_by_field() {
        let svc = ServiceName::new("p").unwrap();
        let e = StaticEndpoint::new("localhost:80")
            .to_instance(&svc)
            .unwrap_err();
        assert_eq!(e.field, "addr");
        let mut z = StaticEndpoint::new("127.0.0.1:80");
        z.weight = 0;
        assert_eq!(z.to_instance(&svc).unwrap_err().field, "weight");
    }

    proptest! {
        #[test]
        fn arbitrary_endpoint_toml_never_panics(s in "[a-z_ =\"0-9.:\\n]{0,120}") {
            if let Ok(e) = toml::from_str::<StaticEndpoint>(&s) {
                let _ = e.to_instance(&ServiceName::new("p").unwrap());
            }
            let _ = toml::from_str::<DiscoveryConfig>(&s).map(|c| c.validate());
        }
    }
}
