//! The one error this crate raises, and the answers a caller needs from it without matching
//! strings: may a retry help, and after how long (pingora-error and hyper style).

use std::time::Duration;

/// A boxed error, as tower layers pass them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a resilience layer refused or ended a call.
///
/// These are keel's own decisions, never the upstream's: the shared [`Classifier`](crate::Classifier)
/// does not count them as upstream failures (except [`ResilienceError::Timeout`], an attempt that
/// the upstream did not answer in time).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResilienceError {
    /// The circuit breaker is open (or forced open); calls fail fast until `retry_after`.
    #[error("circuit breaker open (retry after {retry_after:?})")]
    BreakerOpen {
        /// When the breaker will let a probe through, if known.
        retry_after: Option<Duration>,
    },
    /// Adaptive throttling dropped the call locally, because the upstream refuses many calls.
    #[error("call throttled locally: upstream is rejecting requests")]
    Throttled,
    /// A rate limit refused the call.
    #[error("rate limited (retry after {retry_after:?})")]
    RateLimited {
        /// How long until a call would be allowed.
        retry_after: Duration,
    },
    /// The bulkhead or the adaptive concurrency limit is full.
    #[error("load shed: concurrency limit reached")]
    Shed,
    /// The total deadline of the call has passed.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// One attempt did not finish within its per-try timeout.
    #[error("attempt timed out")]
    Timeout,
    /// A retry was wanted but the retry budget (or the concurrent-retry cap) is spent.
    #[error("retry budget exhausted")]
    BudgetExhausted,
    /// A retry was wanted but the request body cannot be sent twice.
    #[error("request body cannot be replayed; not retried")]
    BodyNotReplayable,
    /// A failure injected by the chaos layer.
    #[error("failure injected by chaos layer")]
    Injected,
}

impl ResilienceError {
    /// Whether trying again (later, or elsewhere) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::BreakerOpen { .. }
            | Self::Throttled
            | Self::RateLimited { .. }
            | Self::Shed
            | Self::Timeout
            | Self::Injected => true,
            Self::DeadlineExceeded | Self::BudgetExhausted | Self::BodyNotReplayable => false,
        }
    }

    /// How long to wait before trying again, when the layer knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::BreakerOpen { retry_after } => *retry_after,
            Self::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// Short stable name, used as the `outcome` label of metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::BreakerOpen { .. } => "breaker_open",
            Self::Throttled => "throttled",
            Self::RateLimited { .. } => "rate_limited",
            Self::Shed => "shed",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Timeout => "timeout",
            Self::BudgetExhausted => "budget_exhausted",
            Self::BodyNotReplayable => "body_not_replayable",
            Self::Injected => "injected",
        }
    }

    /// Finds a `ResilienceError` in an error or anywhere in its source chain (for a
    /// [`RetriesStopped`], its reason).
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a ResilienceError> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(r) = e.downcast_ref::<ResilienceError>() {
                return Some(r);
            }
            if let Some(s) = e.downcast_ref::<RetriesStopped>() {
                return Some(&s.reason);
            }
            cur = e.source();
        }
        None
    }
}

/// The last attempt's error, returned when a retry was wanted but refused: `reason` says why
/// ([`ResilienceError::BudgetExhausted`]: the retry budget or the concurrent-retry cap), and the
/// source is what the upstream did. [`ResilienceError::find`] finds the reason, so the call
/// reads as refused by keel and not worth retrying at once; the source chain still holds the
/// upstream's error.
///
/// A response (a 503, say) is returned as it came, with the reason as a [`RetryStopped`]
/// response extension.
#[derive(Debug, thiserror::Error)]
#[error("{reason} after {attempts} attempt(s): {source}")]
pub struct RetriesStopped {
    /// Why no further attempt was made.
    pub reason: ResilienceError,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's error.
    #[source]
    pub source: BoxError,
}

/// Response extension: a retry was wanted for this response but refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryStopped(pub ResilienceError);

/// A configuration value that failed [`validate`](crate::ResilienceConfig::validate).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resilience configuration: {0}")]
pub struct InvalidConfig(pub String);
