//! DNS: A/AAAA records (with a configured port) or SRV records, re-resolved on their TTL.
//!
//! The re-resolve interval follows the answer's TTL, bounded by `min_ttl` (at least 100 ms, so
//! a zero TTL or a failing server does not become a busy loop) and `max_ttl` (so a day-long TTL
//! does not hide changes for a day).
//! SRV records map as nginx's `resolve service=` does: the lowest priority among the usable
//! records are the primaries, every higher priority is `AdminState::Backup`; the SRV weight
//! becomes the weight (0 counts as 1). SRV targets are resolved from the additional section when
//! the server sent it, else by an A/AAAA lookup. A record that cannot become an instance (port 0,
//! a target that does not resolve) is skipped and counted; an empty or failed answer goes through
//! the registry-loss guard like every other backend.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use hickory_resolver::{
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, RecordType},
    TokioResolver,
};
use keel_core::{AdminState, Instance, ServiceName, Shutdown};

use crate::{
    publish::{Publisher, SafetyOptions},
    registration::LocalLease,
    telemetry, BoxFuture, Discover, Discovery, DiscoveryConfig, DiscoveryError, DnsConfig,
    DnsRecord, InstanceWatch, Registration, Registry,
};

const BACKEND: &str = "dns";

struct Inner {
    resolver: TokioResolver,
    config: DnsConfig,
    safety: SafetyOptions,
    shutdown: Shutdown,
    publishers: crate::publish::Publishers,
}

/// Discovery from DNS A/AAAA or SRV records.
#[derive(Clone)]
pub struct DnsDiscovery {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DnsDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsDiscovery")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl DnsDiscovery {
    /// A resolver on `cfg.url` (`ip:port` of a DNS server, UDP then TCP), or on the system's
    /// resolvers when `url` is empty; names and TTL bounds from `cfg.dns`.
    pub fn from_config(cfg: &DiscoveryConfig, shutdown: Shutdown) -> Result<Self, DiscoveryError> {
        let bad = |e: &dyn std::fmt::Display| DiscoveryError::Config(format!("dns: {e}"));
        // The section as the loader checks it: a section built in code gets the same bounds
        // (a zero `min_ttl` would re-resolve without pause).
        cfg.dns.validate().map_err(DiscoveryError::Config)?;
        let mut builder = match cfg.url.as_deref().filter(|u| !u.is_empty()) {
            Some(given) => {
                let url = given.trim_start_matches("dns://").trim_end_matches('/');
                let server: SocketAddr = url
                    .parse()
                    .or_else(|_| url.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| {
                        DiscoveryError::Config(format!(
                            "discovery.url {:?} must be ip or ip:port of a DNS server",
                            keel_core::config::redact_userinfo(given)
                        ))
                    })?;
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                let ns = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio().map_err(|e| bad(&e))?,
        };
        let opts = builder.options_mut();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        // Both families: a dual-stack service lists its A and its AAAA records.
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let resolver = builder.build().map_err(|e| bad(&e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                resolver,
                config: cfg.dns.clone(),
                safety: crate::setup::safety(cfg),
                shutdown,
                publishers: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// Resolves a service once: its instances and how long the answer may be kept.
    pub async fn resolve(
        &self,
        service: &ServiceName,
    ) -> Result<(Vec<Instance>, Duration), DiscoveryError> {
        resolve(&self.inner, service).await
    }
}

fn skip(service: &ServiceName, what: &str, reason: impl std::fmt::Display) {
    telemetry::malformed(service.as_str(), BACKEND);
    tracing::warn!(%service, record = what, %reason, "skipping unusable DNS record");
}

async fn resolve(
    inner: &Inner,
    service: &ServiceName,
) -> Result<(Vec<Instance>, Duration), DiscoveryError> {
    let name = inner.config.name.replace("{service}", service.as_str());
    let err = |e: hickory_resolver::net::NetError| {
        if e.is_no_records_found() {
            None
        } else {
            Some(DiscoveryError::unavailable(BACKEND, format!("{name}: {e}")))
        }
    };
    inner.resolver.clear_cache();
    match inner.config.record {
        DnsRecord::A => {
            let lookup = match inner.resolver.lookup_ip(name.as_str()).await {
                Ok(l) => l,
                Err(e) => match err(e) {
                    Some(e) => return Err(e),
                    None => return Ok((Vec::new(), inner.config.min_ttl)),
                },
            };
            let ttl = lookup
                .valid_until()
                .saturating_duration_since(std::time::Instant::now());
            let set = lookup
                .iter()
                .map(|ip| Instance::new(service.clone(), SocketAddr::new(ip, inner.config.port)))
                .filter(|i| match i.validate() {
                    Ok(()) => true,
                    Err(e) => {
                        skip(service, &name, e);
                        false
                    }
                })
                .collect();
            Ok((set, ttl))
        }
        DnsRecord::Srv => {
            let lookup = match inner.resolver.lookup(name.as_str(), RecordType::SRV).await {
                Ok(l) => l,
                Err(e) => match err(e) {
                    Some(e) => return Err(e),
                    None => return Ok((Vec::new(), inner.config.min_ttl)),
                },
            };
            let mut ttl = lookup
                .valid_until()
                .saturating_duration_since(std::time::Instant::now());
            let srvs: Vec<_> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(srv) => Some(srv.clone()),
                    _ => None,
                })
                .collect();
            let mut usable = Vec::new();
            for srv in srvs {
                if srv.port == 0 {
                    skip(service, &srv.target.to_string(), "port 0");
                    continue;
                }
                let mut ips: Vec<IpAddr> = lookup
                    .additionals()
                    .iter()
                    .filter(|r| r.name == srv.target)
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    })
                    .collect();
                if ips.is_empty() {
                    match inner.resolver.lookup_ip(srv.target.clone()).await {
                        Ok(l) => {
                            ttl = ttl.min(
                                l.valid_until()
                                    .saturating_duration_since(std::time::Instant::now()),
                            );
                            ips = l.iter().collect();
                        }
                        Err(e) => {
                            skip(service, &srv.target.to_string(), e);
                            continue;
                        }
                    }
                }
                for ip in ips {
                    let i = Instance::new(service.clone(), SocketAddr::new(ip, srv.port))
                        .with_weight(u32::from(srv.weight.max(1)))
                        .with_tag("srv_priority", srv.priority.to_string());
                    match i.validate() {
                        Ok(()) => usable.push((srv.priority, i)),
                        Err(e) => skip(service, &srv.target.to_string(), e),
                    }
                }
            }
            Ok((by_priority(usable), ttl))
        }
    }
}

/// As nginx's `resolve service=`: the lowest priority among the records that became instances
/// are the primaries, every higher priority is `Backup`. Chosen after the unusable records are
/// skipped, so that a lowest priority made only of those does not turn every instance into a
/// backup. An address named twice (two records for one target and port, or one address in
/// the answer's additional section twice) is one instance, at its lowest priority.
fn by_priority(mut usable: Vec<(u16, Instance)>) -> Vec<Instance> {
    let primary = usable.iter().map(|(p, _)| *p).min();
    let mut lowest: std::collections::HashMap<SocketAddr, u16> = std::collections::HashMap::new();
    for (p, i) in &usable {
        let e = lowest.entry(i.addr).or_insert(*p);
        *e = (*e).min(*p);
    }
    usable.retain(|(p, i)| lowest.get(&i.addr) == Some(p) && lowest.remove(&i.addr).is_some());
    usable
        .into_iter()
        .map(|(p, i)| {
            i.with_state(if Some(p) == primary {
                AdminState::Up
            } else {
                AdminState::Backup
            })
        })
        .collect()
}

async fn watcher(inner: Arc<Inner>, publisher: Arc<Publisher>) {
    let service = publisher.service().clone();
    loop {
        // Bounds checked by `from_config`: `min_ttl <= max_ttl`.
        let wait = match resolve(&inner, &service).await {
            Ok((set, ttl)) => {
                publisher.offer(set);
                ttl.clamp(inner.config.min_ttl, inner.config.max_ttl)
            }
            Err(error) => {
                publisher.failed(&error);
                inner.config.min_ttl
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = inner.shutdown.triggered() => return,
        }
    }
}

impl Discover for DnsDiscovery {
    fn watch(&self, service: &ServiceName) -> Result<InstanceWatch, DiscoveryError> {
        let inner = self.inner.clone();
        crate::publish::watch_or_spawn(
            &self.inner.publishers,
            service,
            &self.inner.safety,
            BACKEND,
            move |p| watcher(inner, p),
        )
    }
}

impl Registry for DnsDiscovery {
    /// Accepted and ignored: DNS is managed elsewhere.
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        Box::pin(Registration::start(Arc::new(LocalLease), instance))
    }
}

impl Discovery for DnsDiscovery {
    fn backend(&self) -> &'static str {
        BACKEND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_usable_priority_is_primary() {
        let s = ServiceName::new("api").unwrap();
        let at = |p: u16| Instance::new(s.clone(), SocketAddr::from(([127, 0, 0, 1], p)));
        // Priority 5 had only unusable records: they never get here.
        let set = by_priority(vec![(10, at(1)), (20, at(2)), (10, at(3))]);
        let states: Vec<_> = set.iter().map(|i| (i.addr.port(), i.state)).collect();
        assert_eq!(
            states,
            vec![
                (1, AdminState::Up),
                (2, AdminState::Backup),
                (3, AdminState::Up)
            ]
        );
        assert!(by_priority(Vec::new()).is_empty());
        // One address twice: once, at its lowest priority, in its first place at that priority.
        let set = by_priority(vec![(20, at(1)), (10, at(2)), (10, at(1)), (10, at(1))]);
        let states: Vec<_> = set.iter().map(|i| (i.addr.port(), i.state)).collect();
        assert_eq!(states, vec![(2, AdminState::Up), (1, AdminState::Up)]);
    }

    #[test]
    fn a_refused_url_is_quoted_without_its_password() {
        let cfg = DiscoveryConfig {
            backend: crate::Backend::Dns,
            url: Some("dns://admin:hunter2@10.0.0.2:53".to_owned()),
            ..Default::default()
        };
        let e = DnsDiscovery::from_config(&cfg, Shutdown::new())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("dns://admin:***@10.0.0.2:53"), "{e}");
    }

    /// A section built in code is held to the loader's bounds: no busy loop on a zero TTL, no
    /// crossed bounds for the watcher's clamp.
    #[tokio::test]
    async fn a_section_built_in_code_is_checked() {
        for (min, max) in [(0, 300_000), (2_000, 1_000)] {
            let mut cfg = DiscoveryConfig {
                backend: crate::Backend::Dns,
                url: Some("127.0.0.1:53".to_owned()),
                ..Default::default()
            };
            cfg.dns.min_ttl = Duration::from_millis(min);
            cfg.dns.max_ttl = Duration::from_millis(max);
            let e = DnsDiscovery::from_config(&cfg, Shutdown::new())
                .unwrap_err()
                .to_string();
            assert!(e.contains("min_ttl"), "{e}");
        }
    }
}
