use std::{fmt, path::PathBuf, sync::Arc};

use keel_core::{
    config::{ConfigLoader, EnvMap, OverrideValue, ServiceSection, WatchOptions},
    Config, ConfigWatcher, Live, ServiceName, Shutdown,
};
use serde::de::DeserializeOwned;

use crate::Error;

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

    /// Loads and validates the whole configuration and starts watching it.
    pub async fn build(self) -> Result<Keel, Error> {
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
        for register in self.sections {
            register(&mut loader)?;
        }
        let config = loader.load()?;
        let shutdown = self.shutdown.unwrap_or_else(Shutdown::on_signals);
        let watcher = if config.files().is_empty() {
            None
        } else {
            Some(ConfigWatcher::spawn(
                config.clone(),
                self.watch.unwrap_or_default(),
                shutdown.clone(),
            )?)
        };
        let service = config.section::<ServiceSection>("service")?;
        Ok(Keel {
            inner: Arc::new(Inner {
                name,
                config,
                service,
                shutdown,
                _watcher: watcher,
            }),
        })
    }
}

struct Inner {
    name: ServiceName,
    config: Config,
    service: Live<ServiceSection>,
    shutdown: Shutdown,
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
}
