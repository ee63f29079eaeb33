//! One error type for the crate. Each variant answers the question a caller asks first: *may I
//! try again?* ([`IdempotencyError::is_retryable`]), so nobody matches on strings.

use std::time::Duration;

/// What went wrong with an idempotent operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// The store could not be reached. Retrying later may help.
    #[error("idempotency store unavailable: {0}")]
    Unavailable(String),
    /// The store did not answer in time. The operation may still take effect after this error
    /// (a claim would then hold its key until given back or until its lease ends). Retrying
    /// later may help.
    #[error("idempotency store did not answer in time")]
    TimedOut,
    /// Fewer replicas acknowledged a claim than the durability policy asks for. The claim was
    /// released; retrying later may help.
    #[error("idempotency claim acknowledged by {acked} replica(s), {wanted} required")]
    Durability {
        /// Replicas that acknowledged.
        acked: u32,
        /// Replicas required.
        wanted: u32,
    },
    /// The memory store is full of claims in progress (completed answers are evicted to make
    /// room; claims in progress never are), or a completed answer cannot fit beside them: in the
    /// part of the store the key belongs to, whose number of claims in progress it holds.
    /// Retrying later may help.
    #[error(
        "idempotency memory store is full of claims in progress ({0} claims in progress in the key's part)"
    )]
    Full(usize),
    /// The store answered something this version cannot read. Retrying will not help.
    #[error("idempotency store answered unexpectedly: {0}")]
    Protocol(String),
    /// The configuration is invalid. Retrying will not help.
    #[error("invalid idempotency configuration: {0}")]
    Config(String),
    /// Another execution holds the key. Retrying after `retry_after` may help.
    #[error("idempotency key is in progress elsewhere")]
    InProgress {
        /// How long the current lease still runs, when known.
        retry_after: Option<Duration>,
    },
    /// The key was used before with a different request. Retrying will not help.
    #[error("idempotency key was used with a different request")]
    Mismatch,
    /// This execution lost its lease before completing: its result was not stored. Retrying
    /// returns the result of whoever holds the key now.
    #[error("idempotency lease lost before completion (stale owner)")]
    StaleOwner,
    /// A result could not be (de)serialized. Retrying will not help.
    #[error("idempotency result could not be serialized: {0}")]
    Serde(String),
}

impl IdempotencyError {
    /// Whether the same call, made again later, may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_)
                | Self::TimedOut
                | Self::Durability { .. }
                | Self::Full(_)
                | Self::InProgress { .. }
                | Self::StaleOwner
        )
    }

    /// Whether the error comes from the store being down or overloaded (as opposed to a
    /// decision about this key).
    pub fn is_store_failure(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_)
                | Self::TimedOut
                | Self::Durability { .. }
                | Self::Full(_)
                | Self::Protocol(_)
        )
    }
}

#[cfg(feature = "redis")]
impl From<redis::RedisError> for IdempotencyError {
    fn from(e: redis::RedisError) -> Self {
        if e.is_timeout() {
            Self::TimedOut
        } else {
            Self::Unavailable(e.to_string())
        }
    }
}
