use std::{path::PathBuf, sync::Arc};

use keel_core::{InvalidInstance, ServiceName};

/// What went wrong in discovery or registration.
///
/// Ask [`DiscoveryError::is_retryable`] whether trying again later may help: a backend that is
/// down or slow may come back, a bad configuration or a bad instance will not.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The registry could not be reached or answered with an error (network, timeout, restart).
    #[error("{backend} is unavailable: {reason}")]
    Unavailable {
        /// `redis`, `etcd`, `dns`, `file`.
        backend: &'static str,
        /// What happened, for people.
        reason: String,
    },
    /// The instance to register is not valid.
    #[error("invalid instance: {0}")]
    InvalidInstance(#[from] InvalidInstance),
    /// The discovery configuration is not valid.
    #[error("invalid discovery configuration: {0}")]
    Config(String),
    /// A record read from a backend could not be understood (it is skipped).
    #[error("malformed record {key:?} from {backend}: {reason}")]
    Malformed {
        /// Where it came from.
        backend: &'static str,
        /// The key, file entry or DNS name.
        key: String,
        /// Why it was refused.
        reason: String,
    },
    /// A file (the file backend, or the on-disk cache) could not be read or written.
    #[error("cannot use {path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: Arc<str>,
    },
    /// The backend does not do this (for example, registering with DNS).
    #[error("{backend} discovery does not support {what}")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// The operation.
        what: &'static str,
    },
    /// The service was not known and the backend cannot learn it.
    #[error("unknown service {0}")]
    UnknownService(ServiceName),
    /// The registration was already removed.
    #[error("registration was already removed")]
    Deregistered,
}

impl DiscoveryError {
    /// Whether trying the same thing again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Io { .. })
    }

    pub(crate) fn unavailable(backend: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            backend,
            reason: reason.to_string(),
        }
    }

    pub(crate) fn malformed(
        backend: &'static str,
        key: impl Into<String>,
        reason: impl std::fmt::Display,
    ) -> Self {
        Self::Malformed {
            backend,
            key: key.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.into(),
            reason: Arc::from(reason.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_is_answered_by_kind() {
        assert!(DiscoveryError::unavailable("redis", "connection refused").is_retryable());
        assert!(!DiscoveryError::Config("bad".into()).is_retryable());
        assert!(!DiscoveryError::malformed("etcd", "k", "not json").is_retryable());
    }
}
