//! How `keel.client(name)` is assembled, outermost first:
//!
//! ```text
//! keel_resilience::ClientStackLayer, in its documented order:
//!   total deadline        [clients.NAME.timeout.total]
//!   → retry with budget   [clients.NAME.retry]
//!   → hedge               [clients.NAME.hedge]
//!   → circuit breaker     [clients.NAME.breaker]
//!   → bulkhead            [clients.NAME.bulkhead]
//!   → rate limit          [clients.NAME.rate_limit]
//!   → per-try timeout     [clients.NAME.timeout.per_try]
//!   → chaos               [clients.NAME.chaos]
//! → keel_balance::Balance [clients.NAME.balance]
//!     over the live instance set (static endpoints or discovery) and active health
//!     ([clients.NAME.health], else [discovery.health]); retries and hedges avoid instances
//!     already tried
//! → one HTTP connection pool per instance (reqwest)
//! ```
//!
//! Every layer reads its policy per call from a projection of `[clients.NAME]`, so an edit
//! applies to the next call while windows, budgets and EWMA stay.

use keel_balance::{Balance, Balancer};
use keel_core::{HealthMap, Live, ServiceName, Shutdown};
use keel_discovery::{HealthCheckConfig, HealthChecker, InstanceWatch, StaticDiscovery};
use keel_resilience::ClientStackLayer;
use tower::Layer;

use crate::{
    client::{Client, ClientParts, Stack},
    settings::ClientConfig,
    transport::{KeptBreakers, TransportFactory},
    ClientError, Keel,
};

pub(crate) fn build_client(keel: &Keel, name: &str) -> Result<Client, ClientError> {
    let unknown = |reason: String| ClientError::Unknown {
        name: name.to_owned(),
        reason,
    };
    let key = name.to_owned();
    let cfg: Live<ClientConfig> = keel
        .inner()
        .clients_cfg
        .project(move |all| all.get(&key).cloned().unwrap_or_default());
    let initial = cfg.get();
    let service = ServiceName::new(initial.service.as_deref().unwrap_or(name))
        .map_err(|e| unknown(e.to_string()))?;
    let shutdown = keel.shutdown().clone();

    // Where instances come from: the client's own endpoints (live), or discovery.
    let watch: InstanceWatch = if initial.endpoints.is_empty() {
        keel.inner()
            .discovery
            .watch(&service)
            .map_err(|e| unknown(e.to_string()))?
    } else {
        use keel_discovery::Discover;
        let statics = StaticDiscovery::new();
        statics.set_endpoints(&service, &initial.endpoints);
        // Emptying the list means moving this client to discovery, which takes a restart (and
        // is reported): until then the last endpoints stay in force rather than none.
        let last = std::sync::Mutex::new(initial.endpoints.clone());
        let endpoints = cfg.project(move |c| {
            let mut last = crate::lock(&last);
            if !c.endpoints.is_empty() {
                *last = c.endpoints.clone();
            }
            last.clone()
        });
        statics.follow(service.clone(), endpoints, shutdown.clone());
        statics
            .watch(&service)
            .map_err(|e| unknown(e.to_string()))?
    };
    // `[discovery.health]` (read when the client is built, like the rest of `[discovery]`)
    // checks the instances of every service called, unless the client turns on checks of its own.
    let discovery_health = keel.inner().discovery_cfg.load().health.clone();
    let health_cfg = cfg.project(move |c| {
        if c.health.enabled {
            c.health.clone()
        } else {
            discovery_health.clone()
        }
    });
    let health = follow_health(watch.clone(), health_cfg, shutdown);

    let balancer = Balancer::new(
        service.clone(),
        watch.live().clone(),
        cfg.project(|c| c.balance.clone()),
    )
    .map_err(|e| unknown(e.to_string()))?
    .with_health(health);
    let instance_breakers = std::sync::Arc::<std::sync::Mutex<KeptBreakers>>::default();
    let balance = Balance::new(
        balancer.clone(),
        TransportFactory {
            connect_timeout: cfg.project(|c| c.connect_timeout),
            max_response_body: cfg.project(|c| c.max_response_body_bytes),
            service: std::sync::Arc::from(service.as_str()),
            breaker: cfg.project(|c| c.resilience().breaker.clone()),
            balancer: balancer.clone(),
            breakers: instance_breakers.clone(),
        },
    );

    let resilience = ClientStackLayer::try_new(service.as_str(), cfg.project(|c| c.resilience()))
        .map_err(|e| unknown(e.to_string()))?;
    let stack: Stack = resilience.layer(balance);
    Ok(Client::new(ClientParts {
        name: name.to_owned(),
        stack,
        balancer,
        resilience,
        instance_breakers,
        watch: watch.clone(),
        static_endpoints: !initial.endpoints.is_empty(),
        target: initial.service.clone(),
        config: cfg,
    }))
}

/// Active health checks that follow `[clients.NAME.health]` live: a change restarts the checker;
/// the balancer keeps reading one `Live<HealthMap>` throughout.
fn follow_health(
    watch: InstanceWatch,
    cfg: Live<HealthCheckConfig>,
    shutdown: Shutdown,
) -> Live<HealthMap> {
    let out: Live<HealthMap> = Live::new(HealthMap::new());
    let published = out.clone();
    tokio::spawn(async move {
        let mut changes = cfg.subscribe();
        loop {
            let current = cfg.get();
            let checker = current
                .enabled
                .then(|| HealthChecker::spawn(watch.clone(), (*current).clone(), shutdown.clone()));
            let mut health_changes = checker.as_ref().map(|c| c.health().subscribe());
            // A new checker starts knowing nothing: keep what the old one learned until the new
            // one has published its first results. Checks switched off: nothing is down.
            match &checker {
                None => {
                    published.store_if_changed(HealthMap::new());
                }
                // Results published before we subscribed.
                Some(c) if c.health().generation() > 0 => published.store_arc(c.health().get()),
                Some(_) => {}
            }
            loop {
                tokio::select! {
                    _ = shutdown.triggered() => return,
                    r = changes.changed() => {
                        if r.is_err() { return; }
                        break;
                    }
                    _ = async {
                        match health_changes.as_mut() {
                            Some(rx) => { let _ = rx.changed().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => {
                        if let Some(c) = &checker {
                            published.store_arc(c.health().get());
                        }
                    }
                }
            }
        }
    });
    out
}
