//! The one constructor the facade calls: the backend named by `[discovery]`.

use std::sync::Arc;

use keel_core::{HealthMap, Live, ServiceName, Shutdown};

use crate::{
    publish::SafetyOptions, Backend, Discovery, DiscoveryConfig, DiscoveryError, FileDiscovery,
    HealthChecker, MemoryDiscovery, StaticDiscovery,
};

pub(crate) fn safety(cfg: &DiscoveryConfig) -> SafetyOptions {
    SafetyOptions {
        max_shrink: cfg.max_shrink,
        confirm_reads: cfg.confirm_reads.max(1),
        cache_dir: cfg.cache_path.clone(),
    }
}

/// Builds the backend the `[discovery]` section names (the in-memory one by default), after
/// validating the section. Background watchers stop on `shutdown`. Must be called inside a tokio
/// runtime.
pub async fn from_config(
    cfg: &DiscoveryConfig,
    shutdown: Shutdown,
) -> Result<Arc<dyn Discovery>, DiscoveryError> {
    cfg.validate().map_err(DiscoveryError::Config)?;
    Ok(match cfg.backend {
        Backend::Memory => Arc::new(MemoryDiscovery::new()),
        Backend::Static => Arc::new(StaticDiscovery::from_services(&cfg.services)?),
        Backend::File => {
            let path = cfg.url.clone().unwrap_or_default();
            Arc::new(FileDiscovery::with_safety(
                path.into(),
                safety(cfg),
                shutdown,
            )?)
        }
        #[cfg(feature = "dns")]
        Backend::Dns => Arc::new(crate::DnsDiscovery::from_config(cfg, shutdown)?),
        #[cfg(feature = "redis")]
        Backend::Redis => Arc::new(crate::RedisDiscovery::from_config(cfg, shutdown)?),
        #[cfg(feature = "etcd")]
        Backend::Etcd => Arc::new(crate::EtcdDiscovery::from_config(cfg, shutdown)?),
        #[allow(unreachable_patterns)]
        other => return Err(not_built(other)),
    })
}

/// The error for a backend this build left out.
#[allow(dead_code)]
fn not_built(backend: Backend) -> DiscoveryError {
    let name = format!("{backend:?}").to_lowercase();
    DiscoveryError::Config(format!(
        "backend: `{name}` is not in this build (enable keel-discovery's `{name}` feature)"
    ))
}

/// Watches `service` on `discovery` and, when `cfg.health.enabled`, starts active checks on its
/// instances: the set and its health, as a balancer wants them.
pub fn watch_with_health(
    discovery: &dyn Discovery,
    service: &ServiceName,
    cfg: &DiscoveryConfig,
    shutdown: Shutdown,
) -> Result<(crate::InstanceWatch, Option<HealthChecker>, Live<HealthMap>), DiscoveryError> {
    let watch = discovery.watch(service)?;
    if cfg.health.enabled {
        let checker = HealthChecker::spawn(watch.clone(), cfg.health.clone(), shutdown);
        let health = checker.health();
        Ok((watch, Some(checker), health))
    } else {
        Ok((watch, None, Live::new(HealthMap::new())))
    }
}
