use std::{
    collections::HashMap,
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
};

use keel_core::{
    config::{ConfigLoader, EnvMap, OverrideValue, ServiceSection, WatchOptions},
    Config, ConfigWatcher, Live, ServiceName, Shutdown,
};
use keel_discovery::{Backend, Discovery, DiscoveryConfig, MemoryDiscovery, Registration};
use keel_idempotency::{IdempotencyConfig, IdempotencyLayer, IdempotencyStore};
use serde::de::DeserializeOwned;

use crate::{
    client::Client,
    server::ServerState,
    settings::{validate_clients, ClientsSection, InboundConfig},
    ClientError, Error,
};

/// The discovery every `backend = "memory"` keel in this process shares, so a whole fleet can
/// run in one process (tests, the demo).
pub fn process_memory_discovery() -> MemoryDiscovery {
    static MEMORY: OnceLock<MemoryDiscovery> = OnceLock::new();
    MEMORY.get_or_init(MemoryDiscovery::new).clone()
}

type Register = Box<dyn FnOnce(&mut ConfigLoader) -> Result<(), keel_core::ConfigError> + Send>;

/// Builds a [`Keel`]: which service this is, where its configuration comes from, and which
/// application sections it has.
///
/// Layers, lowest first: built-in defaults, the files in the order given, environment variables
/// `KEEL__SECTION__KEY` (prefix changeable with [`env_prefix`](KeelBuilder::env_prefix)), then
/// [`set`](KeelBuilder::set) overrides.
#[must_use]
pub struct KeelBuilder {
    name: String,
    files: Vec<PathBuf>,
    env_prefix: Option<String>,
    env: Option<EnvMap>,
    overrides: Vec<(String, OverrideValue)>,
    sections: Vec<Register>,
    watch: Option<WatchOptions>,
    shutdown: Option<Shutdown>,
    discovery: Option<Arc<dyn Discovery>>,
    idempotency_store: Option<Arc<dyn IdempotencyStore>>,
}

impl fmt::Debug for KeelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeelBuilder")
            .field("name", &self.name)
            .field("files", &self.files)
            .field("env_prefix", &self.env_prefix)
            .finish_non_exhaustive()
    }
}

impl KeelBuilder {
    /// Adds a configuration file (TOML, YAML or JSON by extension); later files win.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.files.push(path.into());
        self
    }

    /// Sets the environment prefix (default `KEEL`): variables are `PREFIX__SECTION__KEY`.
    pub fn env_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.env_prefix = Some(prefix.into());
        self
    }

    /// Reads environment variables from `env` instead of the process (for tests).
    pub fn env_map(mut self, env: EnvMap) -> Self {
        self.env = Some(env);
        self
    }

    /// Sets a key in code (`"clients.payments.timeout"`, `"2s"`); wins over files and env.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<OverrideValue>) -> Self {
        self.overrides.push((key.into(), value.into()));
        self
    }

    /// Declares an application section `name` of type `T`, read with [`Keel::settings`].
    /// Every load and reload checks it; a reload that breaks it is refused whole.
    pub fn settings<T>(self, name: &str) -> Self
    where
        T: DeserializeOwned + PartialEq + Send + Sync + 'static,
    {
        self.settings_with::<T>(name, |_| Ok(()))
    }

    /// Like [`settings`](KeelBuilder::settings), with a validation of the section's values.
    pub fn settings_with<T>(
        mut self,
        name: &str,
        validate: impl Fn(&T) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self
    where
        T: DeserializeOwned + PartialEq + Send + Sync + 'static,
    {
        let name = name.to_owned();
        self.sections
            .push(Box::new(move |l| l.register_with::<T>(&name, validate)));
        self
    }

    /// Sets how files are watched; by default they are, with [`WatchOptions::default`].
    pub fn watch_options(mut self, options: WatchOptions) -> Self {
        self.watch = Some(options);
        self
    }

    /// Uses `shutdown` instead of one listening for SIGTERM/SIGINT.
    pub fn shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// Uses `discovery` instead of the one `[discovery]` names.
    pub fn discovery(mut self, discovery: Arc<dyn Discovery>) -> Self {
        self.discovery = Some(discovery);
        self
    }

    /// Uses `store` instead of the one `[idempotency]` names.
    pub fn idempotency_store(mut self, store: Arc<dyn IdempotencyStore>) -> Self {
        self.idempotency_store = Some(store);
        self
    }

    /// Loads and validates the whole configuration, connects discovery and the idempotency
    /// store it names, and starts watching it.
    pub async fn build(self) -> Result<Keel, Error> {
        // The recorder first: the crates register metric handles as soon as their parts exist.
        crate::server::prometheus();
        let name = ServiceName::new(&self.name)?;
        let mut loader = ConfigLoader::new();
        if let Some(prefix) = &self.env_prefix {
            loader = loader.with_env_prefix(prefix.clone());
        }
        if let Some(env) = self.env {
            loader = loader.with_env_map(env);
        }
        for file in &self.files {
            loader = loader.with_file(file);
        }
        for (key, value) in self.overrides {
            loader = loader.with_override(key, value);
        }
        loader.register_with::<ServiceSection>("service", ServiceSection::validate)?;
        loader.register_with::<DiscoveryConfig>("discovery", DiscoveryConfig::validate)?;
        loader.register_with::<ClientsSection>("clients", validate_clients)?;
        loader.register_with::<InboundConfig>("inbound", InboundConfig::validate)?;
        loader.register_with::<IdempotencyConfig>("idempotency", IdempotencyConfig::validate)?;
        for register in self.sections {
            register(&mut loader)?;
        }
        let config = loader.load()?;
        let shutdown = self.shutdown.unwrap_or_else(Shutdown::on_signals);
        // Watched when there are files, and also without any when SIGHUP reloads (the
        // environment): unhandled, SIGHUP would end the process.
        let options = self.watch.unwrap_or_default();
        let watcher = if config.files().is_empty() && !options.sighup {
            None
        } else {
            Some(ConfigWatcher::spawn(
                config.clone(),
                options,
                shutdown.clone(),
            )?)
        };
        let service = config.section::<ServiceSection>("service")?;
        // `[service] name` (or KEEL__SERVICE__NAME) wins over the builder's name.
        let name = service.load().name.clone().unwrap_or(name);
        let discovery_cfg = config.section::<DiscoveryConfig>("discovery")?;
        let discovery = match self.discovery {
            Some(d) => d,
            None => discovery_from_config(&discovery_cfg.load(), shutdown.clone()).await?,
        };
        let idempotency = config.section::<IdempotencyConfig>("idempotency")?;
        let store = match self.idempotency_store {
            Some(s) => s,
            None => keel_idempotency::store_from_config(&idempotency.load()).await?,
        };
        let keel = Keel {
            inner: Arc::new(Inner {
                name,
                clients_cfg: config.section::<ClientsSection>("clients")?,
                inbound: config.section::<InboundConfig>("inbound")?,
                at_start: StartValues {
                    service: service.get(),
                    discovery: discovery_cfg.get(),
                    idempotency: idempotency.get(),
                },
                discovery_cfg,
                config,
                service,
                shutdown,
                discovery,
                idempotency,
                store,
                clients: Mutex::new(HashMap::new()),
                registration: tokio::sync::Mutex::new(None),
                server: ServerState::default(),
                _watcher: watcher,
            }),
        };
        keel.report_not_live_changes();
        Ok(keel)
    }
}

async fn discovery_from_config(
    cfg: &DiscoveryConfig,
    shutdown: Shutdown,
) -> Result<Arc<dyn Discovery>, Error> {
    Ok(match cfg.backend {
        Backend::Memory => Arc::new(process_memory_discovery()),
        _ => keel_discovery::from_config(cfg, shutdown).await?,
    })
}

/// Values that cannot change while the service runs; a reload that changes them is reported.
struct StartValues {
    service: Arc<ServiceSection>,
    discovery: Arc<DiscoveryConfig>,
    idempotency: Arc<IdempotencyConfig>,
}

pub(crate) struct Inner {
    name: ServiceName,
    config: Config,
    service: Live<ServiceSection>,
    shutdown: Shutdown,
    pub(crate) discovery: Arc<dyn Discovery>,
    pub(crate) discovery_cfg: Live<DiscoveryConfig>,
    pub(crate) clients_cfg: Live<ClientsSection>,
    pub(crate) inbound: Live<InboundConfig>,
    idempotency: Live<IdempotencyConfig>,
    store: Arc<dyn IdempotencyStore>,
    pub(crate) clients: Mutex<HashMap<String, Client>>,
    pub(crate) registration: tokio::sync::Mutex<Option<Registration>>,
    pub(crate) server: ServerState,
    at_start: StartValues,
    _watcher: Option<ConfigWatcher>,
}

/// A running keel: the service's configuration, kept live, and the governance built from it.
/// Cheap to clone.
#[derive(Clone)]
pub struct Keel {
    inner: Arc<Inner>,
}

impl fmt::Debug for Keel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keel")
            .field("name", &self.inner.name)
            .field("generation", &self.inner.config.generation())
            .finish_non_exhaustive()
    }
}

impl Keel {
    /// Starts building the service called `name`.
    pub fn builder(name: impl Into<String>) -> KeelBuilder {
        KeelBuilder {
            name: name.into(),
            files: Vec::new(),
            env_prefix: None,
            env: None,
            overrides: Vec::new(),
            sections: Vec::new(),
            watch: None,
            shutdown: None,
            discovery: None,
            idempotency_store: None,
        }
    }

    /// This service's name.
    pub fn name(&self) -> &ServiceName {
        &self.inner.name
    }

    /// The configuration: generation, last reload error, effective document, reload.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The `[service]` section, live.
    pub fn service(&self) -> Live<ServiceSection> {
        self.inner.service.clone()
    }

    /// The application's own section `name`, declared with [`KeelBuilder::settings`], live:
    /// `load()` it per use; a reload that breaks it is refused, so it is always valid.
    pub fn settings<T>(&self, name: &str) -> Result<Live<T>, Error>
    where
        T: Send + Sync + 'static,
    {
        Ok(self.inner.config.section::<T>(name)?)
    }

    /// The stop signal (SIGTERM/SIGINT unless another was given).
    pub fn shutdown(&self) -> &Shutdown {
        &self.inner.shutdown
    }

    /// The discovery this service registers in and discovers from.
    pub fn discovery(&self) -> Arc<dyn Discovery> {
        self.inner.discovery.clone()
    }

    /// Sets the gauges that are sampled rather than updated per call (bulkheads' calls in
    /// flight, outbound and inbound); `/metrics` does it before rendering.
    pub(crate) fn publish_gauges(&self) {
        let clients = crate::lock(&self.inner.clients).clone();
        for client in clients.values() {
            client.publish_gauges();
        }
        if let Some(shed) = self.server_state().shed.get() {
            shed.publish();
        }
    }

    /// A client for `service`: discovered (or `[clients.NAME].endpoints`), balanced, resilient.
    /// Built once per name and shared; its policies follow `[clients.NAME]` live.
    pub fn client(&self, service: &str) -> Result<Client, ClientError> {
        let mut clients = crate::lock(&self.inner.clients);
        if let Some(c) = clients.get(service) {
            return Ok(c.clone());
        }
        let client = crate::stack::build_client(self, service)?;
        clients.insert(service.to_owned(), client.clone());
        Ok(client)
    }

    /// The idempotency layer for routes that must run once per `Idempotency-Key`: put it on a
    /// route with `.route_layer(...)` or on a `MethodRouter` with `.layer(...)`. Policy follows
    /// `[idempotency]` live; refine per route with the layer's own methods (`required`, ...).
    pub fn idempotency(&self) -> IdempotencyLayer {
        IdempotencyLayer::new(self.inner.store.clone(), self.inner.idempotency.clone())
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    pub(crate) fn server_state(&self) -> &ServerState {
        &self.inner.server
    }

    /// Logs, at warn, every applied reload that changed keys which only a restart applies
    /// (they are also listed on `/keel/status`).
    fn report_not_live_changes(&self) {
        let Some(mut changes) = self.inner.config.subscribe() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.triggered() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                let Some(inner) = weak.upgrade() else { return };
                let keel = Keel { inner };
                for change in keel.not_live_changes() {
                    tracing::warn!(%change, "configuration change needs a restart");
                }
            }
        });
    }

    /// Keys changed in the files since start that take effect only after a restart.
    pub fn not_live_changes(&self) -> Vec<String> {
        let mut changes = Vec::new();
        let start = &self.inner.at_start;
        let now = self.service().get();
        if now.listen != start.service.listen {
            changes.push(format!(
                "service.listen changed to {} (serving on {} until restart)",
                now.listen, start.service.listen
            ));
        }
        if now.advertise != start.service.advertise || now.name != start.service.name {
            changes.push(
                "service.advertise or service.name changed (takes effect after restart)".to_owned(),
            );
        }
        let d = self.inner.discovery_cfg.load();
        if d.backend != start.discovery.backend
            || d.url != start.discovery.url
            || d.prefix != start.discovery.prefix
        {
            changes.push(format!(
                "discovery backend/url/prefix changed (still {} until restart)",
                start.discovery.backend.as_str()
            ));
        }
        // The store is built once, with these: its kind, URL, key prefix, round-trip timeout,
        // replication acknowledgement and memory capacity and byte budget.
        let i = self.inner.idempotency.load();
        let s = &start.idempotency;
        if i.store != s.store
            || i.url != s.url
            || i.prefix != s.prefix
            || i.store_timeout != s.store_timeout
            || i.durability != s.durability
            || i.memory_capacity != s.memory_capacity
            || i.memory_max_bytes != s.memory_max_bytes
        {
            changes.push(
                "idempotency store/url/prefix/store_timeout/durability/memory_capacity/memory_max_bytes changed (takes effect after restart)"
                    .to_owned(),
            );
        }
        let clients = crate::lock(&self.inner.clients).clone();
        let cfg = self.inner.clients_cfg.load();
        for (name, client) in clients {
            let now = cfg.get(&name).cloned().unwrap_or_default();
            if let Some(change) = client.not_live_change(&now) {
                changes.push(format!(
                    "clients.{name}: {change} (takes effect after restart)"
                ));
            }
        }
        changes
    }
}
