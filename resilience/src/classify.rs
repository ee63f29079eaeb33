//! One classifier for every layer: the breaker, the retry, the throttle and the adaptive limit
//! all ask the same question ("did the upstream fail, and how?") and must agree on the answer.
//!
//! keel's own rejections (an open breaker, a rate limit, a shed call) are never upstream failures:
//! counting them would keep a breaker open on its own refusals.

use std::time::Duration;

use crate::error::{BoxError, ResilienceError};

/// How a transport-level or status failure happened, for retry policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The connection could not be established.
    Connect,
    /// The connection was reset or aborted.
    Reset,
    /// The attempt timed out.
    Timeout,
    /// The upstream answered with a failure status.
    Status(u16),
    /// Any other error.
    Other,
}

/// What a call's result means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream did its job.
    Success,
    /// The upstream failed; counts against it.
    Failure(FailureClass),
    /// The upstream asked us to slow down (429); not a health failure, may be retried later.
    Throttled {
        /// Its `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// A keel layer refused the call; says nothing about the upstream.
    Rejected,
}

impl Outcome {
    /// Whether this outcome counts as an upstream failure (breaker, throttle, limits).
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failure(_))
    }
}

/// Decides what a response or an error means.
pub trait Classifier<Res>: Clone + Send + Sync + 'static {
    /// Classifies a response.
    fn classify_response(&self, res: &Res) -> Outcome;

    /// Classifies an error; the default walks the error chain (see [`classify_error`]).
    fn classify_error(&self, err: &BoxError) -> Outcome {
        classify_error(err.as_ref())
    }

    /// Classifies the result of a call: the response, or the error.
    fn classify(&self, res: &Result<Res, BoxError>) -> Outcome {
        match res {
            Ok(r) => self.classify_response(r),
            Err(e) => self.classify_error(e),
        }
    }
}

/// The default HTTP classifier: 502, 503 and 504 (plus any configured codes) are failures, 429 is
/// `Throttled`, everything else is a success. Errors: see [`classify_error`].
#[derive(Debug, Clone, Default)]
pub struct HttpClassifier {
    extra: Vec<u16>,
}

impl HttpClassifier {
    /// The default classifier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also counts these status codes as failures (e.g. 500).
    #[must_use]
    pub fn with_failure_codes(mut self, codes: impl IntoIterator<Item = u16>) -> Self {
        self.extra.extend(codes);
        self
    }
}

impl<B> Classifier<http::Response<B>> for HttpClassifier {
    fn classify_response(&self, res: &http::Response<B>) -> Outcome {
        let code = res.status().as_u16();
        match code {
            502..=504 => Outcome::Failure(FailureClass::Status(code)),
            429 => Outcome::Throttled {
                retry_after: retry_after_header(res.headers()),
            },
            c if self.extra.contains(&c) => Outcome::Failure(FailureClass::Status(c)),
            _ => Outcome::Success,
        }
    }
}

/// [`HttpClassifier`] plus the breaker policy's live `failure_codes`: an edit of
/// `breaker.failure_codes` applies to the next response.
#[derive(Debug, Clone)]
pub struct PolicyClassifier {
    policy: keel_core::Live<crate::BreakerConfig>,
}

impl PolicyClassifier {
    /// Reads the extra failure codes from `policy` on every response.
    pub fn new(policy: keel_core::Live<crate::BreakerConfig>) -> Self {
        Self { policy }
    }
}

impl<B> Classifier<http::Response<B>> for PolicyClassifier {
    fn classify_response(&self, res: &http::Response<B>) -> Outcome {
        let code = res.status().as_u16();
        if self.policy.load().failure_codes.contains(&code) && code != 429 {
            return Outcome::Failure(FailureClass::Status(code));
        }
        HttpClassifier::default().classify_response(res)
    }
}

/// Reads `Retry-After`, in delta-seconds or as an HTTP-date (RFC 9110); a date in the past is
/// zero.
pub fn retry_after_header(h: &http::HeaderMap) -> Option<Duration> {
    let v = h.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // The other form RFC 9110 allows: an HTTP-date; a date in the past means "now".
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Walks an error chain: a [`ResilienceError`] or a [`keel_core::request::NotSent`] is
/// `Rejected` (but a per-try
/// [`ResilienceError::Timeout`] is an upstream `Timeout` failure); an `io::Error` is `Connect`,
/// `Reset` or `Timeout` by its kind; a tokio `Elapsed` is `Timeout`; anything else is `Other`.
pub fn classify_error(err: &(dyn std::error::Error + 'static)) -> Outcome {
    use std::io::ErrorKind as K;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<keel_core::request::NotSent>() {
            return Outcome::Rejected;
        }
        if let Some(r) = e.downcast_ref::<ResilienceError>() {
            return match r {
                ResilienceError::Timeout => Outcome::Failure(FailureClass::Timeout),
                ResilienceError::Injected => Outcome::Failure(FailureClass::Other),
                _ => Outcome::Rejected,
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Outcome::Failure(match io.kind() {
                K::ConnectionRefused | K::AddrNotAvailable | K::NotConnected => {
                    FailureClass::Connect
                }
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                    FailureClass::Reset
                }
                K::TimedOut => FailureClass::Timeout,
                _ => FailureClass::Other,
            });
        }
        if e.is::<tokio::time::error::Elapsed>() {
            return Outcome::Failure(FailureClass::Timeout);
        }
        cur = e.source();
    }
    Outcome::Failure(FailureClass::Other)
}

#[cfg(test)]
mod retry_after_tests {
    use super::*;

    fn h(v: &str) -> http::HeaderMap {
        let mut m = http::HeaderMap::new();
        m.insert(http::header::RETRY_AFTER, v.parse().unwrap());
        m
    }

    #[test]
    fn policy_failure_codes_are_live() {
        let policy = keel_core::Live::new(crate::BreakerConfig::default());
        let c = PolicyClassifier::new(policy.clone());
        let res = |code: u16| http::Response::builder().status(code).body(()).unwrap();
        assert_eq!(c.classify_response(&res(500)), Outcome::Success);
        assert!(c.classify_response(&res(503)).is_failure());
        policy.store(crate::BreakerConfig {
            failure_codes: vec![500, 429],
            ..Default::default()
        });
        assert!(c.classify_response(&res(500)).is_failure());
        assert!(
            !c.classify_response(&res(429)).is_failure(),
            "429 is never a failure"
        );
    }

    #[test]
    fn seconds_and_http_dates() {
        assert_eq!(retry_after_header(&h("7")), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let d = retry_after_header(&h(&httpdate::fmt_http_date(later))).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(
            retry_after_header(&h("Sun, 06 Nov 1994 08:49:37 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after_header(&h("soon")), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        let c = HttpClassifier::new().with_failure_codes([500]);
        let r = |s: u16| http::Response::builder().status(s).body(()).unwrap();
        assert_eq!(c.classify_response(&r(200)), Outcome::Success);
        assert_eq!(c.classify_response(&r(404)), Outcome::Success);
        assert!(c.classify_response(&r(503)).is_failure());
        assert!(c.classify_response(&r(500)).is_failure());
        let mut t = r(429);
        t.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("3"),
        );
        assert_eq!(
            c.classify_response(&t),
            Outcome::Throttled {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        let e: BoxError = Box::new(ResilienceError::Shed);
        assert_eq!(
            Classifier::<http::Response<()>>::classify_error(&c, &e),
            Outcome::Rejected
        );
        let e: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(
            Classifier::<http::Response<()>>::classify_error(&c, &e),
            Outcome::Failure(FailureClass::Connect)
        );
        let wrapped: BoxError = Box::new(keel_core::request::InstanceFailure {
            served_by: keel_core::request::ServedBy {
                id: keel_core::InstanceId::from("a"),
                addr: "127.0.0.1:1".parse().unwrap(),
            },
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        });
        assert_eq!(
            classify_error(wrapped.as_ref()),
            Outcome::Failure(FailureClass::Reset)
        );
    }
}
