//! Response classification: what one response teaches the balancer.
//!
//! The outcome feeds the peak EWMA (every outcome carries its latency), nginx passive health
//! (failures count towards `max_fails`) and Envoy outlier detection (5xx and gateway failures
//! count towards the consecutive limits and the success rate). The default follows Envoy: any
//! 5xx is a failure, 502/503/504 and connection errors are gateway failures.

use std::time::Duration;

/// How a request ended, as far as balancing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Served well.
    Success = 0,
    /// Served, but slower than the classifier's threshold: a success for health, and the
    /// latency still lands in the EWMA.
    Slow = 1,
    /// The instance failed the request (5xx).
    Failure = 2,
    /// The instance could not be reached or its gateway failed (connect error, 502, 503, 504).
    GatewayFailure = 3,
    /// The caller gave up before the end (hedge lost, deadline): teaches nothing.
    Cancelled = 4,
}

impl Outcome {
    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Slow => "slow",
            Outcome::Failure => "failure",
            Outcome::GatewayFailure => "gateway_failure",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// Whether this counts as a failure of the instance.
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Failure | Outcome::GatewayFailure)
    }
}

/// Classifies responses and errors of the inner service into an [`Outcome`].
pub trait Classify<Res>: Clone + Send + Sync + 'static {
    /// A response, with the time it took.
    fn classify_response(&self, res: &Res, latency: Duration) -> Outcome;
    /// An error of the inner service (no response at all).
    fn classify_error(&self, err: &(dyn std::error::Error + 'static)) -> Outcome;
}

/// The default classifier for `http::Response`: 502/503/504 are gateway failures, other 5xx
/// failures, a success slower than `slow_after` is slow, and every inner error is a gateway
/// failure (it is nearly always a connect or I/O error).
#[derive(Debug, Clone, Default)]
pub struct HttpClassifier {
    /// Successes slower than this are [`Outcome::Slow`].
    pub slow_after: Option<Duration>,
}

impl HttpClassifier {
    /// Classifies a status code.
    pub fn classify_status(&self, status: http::StatusCode, latency: Duration) -> Outcome {
        match status.as_u16() {
            502..=504 => Outcome::GatewayFailure,
            500..=599 => Outcome::Failure,
            _ if self.slow_after.is_some_and(|s| latency > s) => Outcome::Slow,
            _ => Outcome::Success,
        }
    }
}

impl<B> Classify<http::Response<B>> for HttpClassifier {
    fn classify_response(&self, res: &http::Response<B>, latency: Duration) -> Outcome {
        self.classify_status(res.status(), latency)
    }

    fn classify_error(&self, _err: &(dyn std::error::Error + 'static)) -> Outcome {
        Outcome::GatewayFailure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let c = HttpClassifier {
            slow_after: Some(Duration::from_millis(100)),
        };
        let ms = Duration::from_millis;
        let s = |code: u16, l| c.classify_status(http::StatusCode::from_u16(code).unwrap(), l);
        assert_eq!(s(200, ms(1)), Outcome::Success);
        assert_eq!(s(404, ms(1)), Outcome::Success);
        assert_eq!(s(200, ms(200)), Outcome::Slow);
        assert_eq!(s(500, ms(1)), Outcome::Failure);
        assert_eq!(s(503, ms(1)), Outcome::GatewayFailure);
        assert!(Outcome::GatewayFailure.is_failure() && !Outcome::Slow.is_failure());
    }
}
