//! One typed configuration document, layered and hot.
//!
//! ## Layers
//! `defaults < files < environment < overrides in code`, later layers winning key by key:
//!
//! 1. **Defaults** are the `#[serde(default)]`s of each section's type.
//! 2. **Files**, in the order given, TOML, YAML or JSON by extension (`.toml`, `.yaml`/`.yml`,
//!    `.json`).
//! 3. **Environment**: `KEEL__SECTION__KEY=value` (prefix configurable, double underscore between
//!    levels, case-insensitive): `KEEL__CLIENTS__PAYMENTS__TIMEOUT=2s`.
//! 4. **Overrides** set in code with [`ConfigLoader::with_override`].
//!
//! ## Sections
//! The document is a set of top-level *sections*, each registered with its type by whoever uses it
//! (keel's crates register `service`, `discovery`, `clients`, `idempotency`; the application
//! registers its own, such as `shop`). A key that no registered section knows is an error, at any
//! depth (use `#[serde(deny_unknown_fields)]` on section types). Every error names its
//! [`Origin`] (file and line, environment variable, or override) and the full key path.
//!
//! ## Reloads
//! [`Config::reload`] reads every layer again, parses and validates **every** section, and only if
//! all of them are good publishes each one to its [`Live`](crate::Live). A refused document changes nothing:
//! the last good document stays, the error is logged at `warn`, counted in
//! `keel_config_reloads_total{outcome="rejected"}` and kept for [`Config::last_error`]. A section
//! whose value did not change is not republished, so its readers' generation does not move.
//! [`ConfigWatcher`] calls reload when files change and on SIGHUP.

mod loader;
mod origin;
mod redact;
mod service;
mod watch;

pub use self::{
    loader::{
        Config, ConfigLoader, EnvMap, OverrideValue, ReloadFailure, ReloadOutcome, Validator,
    },
    origin::Origin,
    redact::redact_userinfo,
    service::ServiceSection,
    watch::{file_event_may_change, ConfigWatcher, WatchOptions},
};

#[cfg(test)]
mod tests;
