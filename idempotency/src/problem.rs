//! Errors as RFC 9457 `application/problem+json` documents, so clients can tell a missing key
//! from a conflict from a mismatch without parsing prose.

use axum::body::Body;
use http::{header, HeaderValue, Response, StatusCode};

/// Builds a problem response; `retry_after` in seconds adds `Retry-After`.
pub(crate) fn problem(
    status: StatusCode,
    kind: &str,
    title: &str,
    detail: &str,
    retry_after: Option<u64>,
) -> Response<Body> {
    let doc = serde_json::json!({
        "type": format!("https://keel.invalid/problems/idempotency/{kind}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut r = Response::new(Body::from(doc.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(s) = retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
    }
    r
}
