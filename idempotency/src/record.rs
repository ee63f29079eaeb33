//! The stored form of an HTTP response: status, allow-listed headers, body, byte for byte.
//!
//! A small length-prefixed binary layout (`K1`, status, header count, then name/value pairs,
//! then the body) rather than JSON, so bodies are stored as they are, without base64.
//! Decoding checks every length and never panics on a corrupt record.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 2] = b"K1";

/// A response as stored for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) body: Bytes,
}

impl StoredResponse {
    /// Keeps the headers of `all` that are named in `allow` (case-insensitive; a name listed
    /// twice is kept once).
    pub(crate) fn new(status: StatusCode, all: &HeaderMap, allow: &[String], body: Bytes) -> Self {
        let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
        for (i, name) in allow.iter().enumerate() {
            if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                let seen = allow
                    .get(..i)
                    .unwrap_or_default()
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(n.as_str()));
                if seen {
                    continue;
                }
                for v in all.get_all(&n) {
                    headers.push((n.clone(), v.clone()));
                }
            }
        }
        Self {
            status,
            headers,
            body,
        }
    }

    pub(crate) fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(8 + self.body.len() + self.headers.len() * 32);
        b.put_slice(MAGIC);
        b.put_u16(self.status.as_u16());
        b.put_u16(u16::try_from(self.headers.len()).unwrap_or(u16::MAX));
        for (n, v) in self.headers.iter().take(usize::from(u16::MAX)) {
            let n = n.as_str().as_bytes();
            let v = v.as_bytes();
            b.put_u16(u16::try_from(n.len()).unwrap_or(0));
            b.put_slice(
                n.get(..usize::from(u16::try_from(n.len()).unwrap_or(0)))
                    .unwrap_or_default(),
            );
            b.put_u32(u32::try_from(v.len()).unwrap_or(0));
            b.put_slice(
                v.get(..usize::try_from(u32::try_from(v.len()).unwrap_or(0)).unwrap_or(0))
                    .unwrap_or_default(),
            );
        }
        b.put_slice(&self.body);
        b.freeze()
    }

    pub(crate) fn decode(raw: &Bytes) -> Option<Self> {
        let mut r = Reader { raw, at: 0 };
        if r.take(2)? != MAGIC {
            return None;
        }
        let status = StatusCode::from_u16(r.u16()?).ok()?;
        let count = r.u16()?;
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let nl = usize::from(r.u16()?);
            let n = HeaderName::from_bytes(r.take(nl)?).ok()?;
            let vl = usize::try_from(r.u32()?).ok()?;
            let v = HeaderValue::from_bytes(r.take(vl)?).ok()?;
            headers.push((n, v));
        }
        let body = raw.slice(r.at..);
        Some(Self {
            status,
            headers,
            body,
        })
    }
}

struct Reader<'a> {
    raw: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.raw.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        let s = self.take(2)?;
        Some(u16::from_be_bytes([*s.first()?, *s.get(1)?]))
    }
    fn u32(&mut self) -> Option<u32> {
        let s = self.take(4)?;
        Some(u32::from_be_bytes(s.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-secret", HeaderValue::from_static("no"));
        let s = StoredResponse::new(
            StatusCode::CREATED,
            &h,
            &["Content-Type".into()],
            Bytes::from_static(b"{\"id\":1}\x00\xff"),
        );
        assert_eq!(s.headers.len(), 1);
        assert_eq!(StoredResponse::decode(&s.encode()), Some(s));
    }

    /// `replay_headers = ["content-type", "Content-Type"]`: the replay must carry the header
    /// once, as the original did, not twice.
    #[test]
    fn a_header_named_twice_in_the_allow_list_is_kept_once() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.append("link", HeaderValue::from_static("<a>"));
        h.append("link", HeaderValue::from_static("<b>"));
        let allow = ["content-type", "Content-Type", "link", "LINK"].map(String::from);
        let s = StoredResponse::new(StatusCode::OK, &h, &allow, Bytes::new());
        let names: Vec<&str> = s.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "link", "link"]);
        let back = StoredResponse::decode(&s.encode()).unwrap();
        assert_eq!(back.headers, s.headers);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = StoredResponse::decode(&Bytes::from(bytes));
        }
    }
}
