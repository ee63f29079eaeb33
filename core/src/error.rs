use std::path::PathBuf;

use crate::config::Origin;

/// A service name that is not acceptable, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid service name {name:?}: {reason}")]
pub struct InvalidName {
    /// The rejected name.
    pub name: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

/// An instance that is not acceptable: names the field and says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid instance: `{field}` {reason}")]
pub struct InvalidInstance {
    /// The offending field, e.g. `weight` or `tags[2]`.
    pub field: String,
    /// Why it was rejected.
    pub reason: String,
}

/// Why a configuration document was refused.
///
/// Every variant that concerns a value names where it came from ([`Origin`]: the file and, where
/// the parser gives it, the line; the environment variable; or an override in code) and the key
/// path (`clients.payments.timeout`). A refused document changes nothing: the last good one stays.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A configuration file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file's extension does not name a supported format.
    #[error("config file {}: unsupported format (use .toml, .yaml, .yml or .json)", path.display())]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
    },
    /// A file is not well-formed TOML, YAML or JSON.
    #[error("config file {}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line, where the parser gives it.
        line: Option<u32>,
        /// What the parser said.
        message: String,
    },
    /// A key that no registered section knows.
    #[error("unknown key `{key}` ({origin})")]
    UnknownKey {
        /// The full key path.
        key: String,
        /// Where the key came from.
        origin: Origin,
    },
    /// A value of the wrong type or out of range, or a section that failed its validation.
    #[error("invalid value at `{key}` ({origin}): {reason}")]
    Invalid {
        /// The full key path.
        key: String,
        /// Where the value came from.
        origin: Origin,
        /// Why it was refused.
        reason: String,
    },
    /// A section was asked for with a type other than the one it was registered with.
    #[error("section `{section}` is registered with another type")]
    SectionType {
        /// The section name.
        section: String,
    },
    /// A section name is registered twice, or is not a valid key.
    #[error("section `{section}`: {reason}")]
    Section {
        /// The section name.
        section: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The file watcher could not be set up.
    #[error("cannot watch config files: {0}")]
    Watch(#[from] notify::Error),
    /// Several problems in one document; each is reported.
    #[error("{} problems: {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Many(Vec<ConfigError>),
}

impl ConfigError {
    /// Every key path named by this error (several for [`ConfigError::Many`]).
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Self::UnknownKey { key, .. } | Self::Invalid { key, .. } => vec![key.as_str()],
            Self::Many(all) => all.iter().flat_map(|e| e.keys()).collect(),
            _ => Vec::new(),
        }
    }

    /// Every origin named by this error.
    pub fn origins(&self) -> Vec<&Origin> {
        match self {
            Self::UnknownKey { origin, .. } | Self::Invalid { origin, .. } => vec![origin],
            Self::Many(all) => all.iter().flat_map(|e| e.origins()).collect(),
            _ => Vec::new(),
        }
    }
}
