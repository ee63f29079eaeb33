use std::sync::Arc;

/// Everything that can go wrong when building or running a keel service.
///
/// Each crate's own error converts into it; ask [`Error::is_retryable`] rather than matching
/// messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] keel_core::ConfigError),
    /// A reload was refused (shared, because the same failure is also kept for the admin page).
    #[error(transparent)]
    Reload(#[from] Arc<keel_core::ConfigError>),
    /// The service name is not valid.
    #[error(transparent)]
    Name(#[from] keel_core::InvalidName),
    /// Discovery could not be set up, or registration failed.
    #[error(transparent)]
    Discovery(#[from] keel_discovery::DiscoveryError),
    /// The idempotency store could not be set up.
    #[error(transparent)]
    Idempotency(#[from] keel_idempotency::IdempotencyError),
    /// A client could not be built.
    #[error(transparent)]
    Client(#[from] crate::ClientError),
    /// Binding or serving failed.
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether trying the same thing again may succeed (a transient I/O failure), as opposed to
    /// a mistake that must be fixed first (a bad configuration or name).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io(_) => true,
            Error::Client(c) => c.is_retryable(),
            Error::Discovery(e) => e.is_retryable(),
            Error::Idempotency(e) => e.is_retryable(),
            _ => false,
        }
    }
}
