//! W3C Trace Context (`traceparent`) carried across calls.
//!
//! The server side reads `traceparent` from each request (or starts a new trace), opens a
//! `keel.server` span with the trace id, and runs the handler with the context in a task-local;
//! keel's client reads it from there and sends a child `traceparent` on every outgoing call, so a
//! trace crosses services without the handler passing anything along.
//!
//! Format (version 00): `00-{trace-id: 32 hex}-{parent-id: 16 hex}-{flags: 2 hex}`; all-zero ids
//! are invalid and a malformed header starts a new trace rather than failing the request, as a
//! request with more than one `traceparent` field does.

use std::fmt;

use rand::Rng;

/// The name of the header.
pub const TRACEPARENT: &str = "traceparent";

/// [`TRACEPARENT`] as a header name, made once (a `&str` name is parsed on every insert).
pub(crate) const TRACEPARENT_NAME: http::HeaderName = http::HeaderName::from_static(TRACEPARENT);

/// A W3C trace context: which trace, which span is the parent, whether it is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace id (16 bytes, never all zero).
    pub trace_id: [u8; 16],
    /// The id of the calling span (8 bytes, never all zero).
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

/// What the server side knows about the request a task is serving, for the calls it makes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Inherited {
    pub(crate) trace: TraceContext,
    pub(crate) deadline: Option<keel_core::request::Deadline>,
}

tokio::task_local! {
    static CURRENT: Inherited;
}

/// The deadline of the request being served by this task, if its caller sent one.
pub(crate) fn current_deadline() -> Option<keel_core::request::Deadline> {
    CURRENT.try_with(|c| c.deadline).ok().flatten()
}

/// Runs `fut` with this context (and the caller's deadline) as the current one.
pub(crate) async fn scope_with<F: std::future::Future>(
    trace: TraceContext,
    deadline: Option<keel_core::request::Deadline>,
    fut: F,
) -> F::Output {
    CURRENT.scope(Inherited { trace, deadline }, fut).await
}

impl TraceContext {
    /// A new trace with a random id, sampled.
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        while trace_id == [0; 16] {
            rng.fill(&mut trace_id);
        }
        while span_id == [0; 8] {
            rng.fill(&mut span_id);
        }
        Self {
            trace_id,
            span_id,
            flags: 1,
        }
    }

    /// A child of this context: same trace, new span id.
    pub fn child(&self) -> Self {
        let mut rng = rand::rng();
        let mut span_id = [0u8; 8];
        while span_id == [0; 8] {
            rng.fill(&mut span_id);
        }
        Self {
            trace_id: self.trace_id,
            span_id,
            flags: self.flags,
        }
    }

    /// Parses a `traceparent` header value; `None` when malformed.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2
            || version == "ff"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        // Version 00 has exactly four fields; later versions may add more.
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex_into(trace, &mut trace_id)?;
        hex_into(span, &mut span_id)?;
        let mut f = [0u8; 1];
        hex_into(flags, &mut f)?;
        // Lowercase hex like the other fields (`from_str_radix` would take `+0`, `0A`, `FF`).
        hex_into(version, &mut [0u8; 1])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags: f[0],
        })
    }

    /// The context a request carries: its one `traceparent` field, parsed. `None` when there is
    /// none, when it is malformed, and when there are several (W3C Trace Context: a request with
    /// more than one is invalid, and starts a new trace, whichever of them would parse).
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let mut fields = headers.get_all(TRACEPARENT_NAME).iter();
        let only = fields.next()?;
        if fields.next().is_some() {
            return None;
        }
        Self::parse(only.to_str().ok()?)
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        let mut out = [0u8; 32];
        hex_to(&self.trace_id, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The `traceparent` header value, written into a buffer on the stack (no allocation).
    pub fn encode(&self) -> [u8; 55] {
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex_to(&self.trace_id, &mut out[3..35]);
        hex_to(&self.span_id, &mut out[36..52]);
        hex_to(&[self.flags], &mut out[53..55]);
        out
    }

    /// The context of the request being served by this task, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(|c| c.trace).ok()
    }

    /// Runs `fut` with this context as the current one (keeping the current deadline, if any).
    pub async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        scope_with(self, current_deadline(), fut).await
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let out = self.encode();
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

/// Bytes shown as lowercase hex, written without an allocation (for span fields).
pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0u8; 2];
        for b in self.0 {
            hex_to(std::slice::from_ref(b), &mut buf);
            f.write_str(std::str::from_utf8(&buf).map_err(|_| std::fmt::Error)?)?;
        }
        Ok(())
    }
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex_to(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

fn hex_into(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_child() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(v).unwrap();
        assert_eq!(c.to_string(), v);
        assert_eq!(&c.encode()[..], v.as_bytes());
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = c.child();
        assert_eq!(child.trace_id, c.trace_id);
        assert_ne!(child.span_id, c.span_id);
        assert!(
            TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01")
                .is_none()
        );
        assert!(
            TraceContext::parse("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01")
                .is_none()
        );
        assert!(
            TraceContext::parse("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .is_none()
        );
        assert!(TraceContext::parse("garbage").is_none());
        // The version is two lowercase hex digits, and never ff, whatever its case.
        for version in ["+0", "FF", "Ff", "0A", " 0"] {
            let v = format!("{version}-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
            assert!(TraceContext::parse(&v).is_none(), "{v}");
        }
        let root = TraceContext::new_root();
        assert_eq!(TraceContext::parse(&root.to_string()), Some(root));
    }

    /// One `traceparent` is read (whatever its name's case); two are invalid together, even
    /// when each would parse alone, as the W3C test suite has it (`test_traceparent_duplicated`).
    #[test]
    fn several_traceparent_fields_start_a_new_trace() {
        let a = "00-12345678901234567890123456789011-1234567890123456-01";
        let b = "00-12345678901234567890123456789012-1234567890123456-01";
        let headers = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append("TraceParent", v.parse().unwrap());
            }
            h
        };
        assert_eq!(
            TraceContext::from_headers(&headers(&[a])),
            TraceContext::parse(a)
        );
        assert_eq!(TraceContext::from_headers(&headers(&[])), None);
        assert_eq!(TraceContext::from_headers(&headers(&[a, b])), None);
        assert_eq!(TraceContext::from_headers(&headers(&[a, a])), None);
        assert_eq!(TraceContext::from_headers(&headers(&["garbage", a])), None);
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = TraceContext::parse(&s);
        }
    }
}
