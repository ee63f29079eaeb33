//! The one error of this crate. Each variant says whether trying again may help, so the retry
//! layer above never matches on strings.

use keel_core::{InstanceId, ServiceName};

/// Why the balancer could not route a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BalanceError {
    /// No instance could take the request: none known, all down, or all at `max_conns`.
    #[error("no instance of {service} can take the request")]
    NoInstance {
        /// The service.
        service: ServiceName,
    },
    /// The picked instance has no inner service (a tower `Discover` has not delivered it yet).
    #[error("instance {id} of {service} has no service yet")]
    NoService {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
    },
    /// The configuration was refused; the reason names the bad key.
    #[error("invalid balance configuration: {0}")]
    InvalidConfig(String),
}

impl BalanceError {
    /// Whether trying again (later, or on another attempt) may succeed.
    ///
    /// `NoInstance` may: instances come back, ejections expire, connections free up.
    /// `NoService` may: the discovery stream is about to deliver it. `InvalidConfig` never does.
    pub fn is_retryable(&self) -> bool {
        match self {
            BalanceError::NoInstance { .. } | BalanceError::NoService { .. } => true,
            BalanceError::InvalidConfig(_) => false,
        }
    }
}
