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
    /// The stored form of a response: `status`, the headers of `all` named in `allow`
    /// (case-insensitive; in the response's order, every value of a name, each name once however
    /// often `allow` lists it), then `body`. Written in one pass over the response's headers, with
    /// no header name parsed and nothing copied twice.
    pub(crate) fn encode(
        status: StatusCode,
        all: &HeaderMap,
        allow: &[String],
        body: &[u8],
    ) -> Bytes {
        let mut b = BytesMut::with_capacity(8 + body.len() + 64);
        b.put_slice(MAGIC);
        b.put_u16(status.as_u16());
        // The number of headers, written once they are counted.
        let count_at = b.len();
        b.put_u16(0);
        let mut count: u16 = 0;
        for (n, v) in all {
            let name = n.as_str();
            if !allow.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                continue;
            }
            // Names are shorter than 64 KiB (the `http` crate's bound); a value over 4 GiB
            // cannot be stored and is left out.
            let (Ok(nl), Ok(vl), Some(next)) = (
                u16::try_from(name.len()),
                u32::try_from(v.len()),
                count.checked_add(1),
            ) else {
                continue;
            };
            b.put_u16(nl);
            b.put_slice(name.as_bytes());
            b.put_u32(vl);
            b.put_slice(v.as_bytes());
            count = next;
        }
        b[count_at..count_at + 2].copy_from_slice(&count.to_be_bytes());
        b.put_slice(body);
        b.freeze()
    }

    pub(crate) fn decode(raw: &Bytes) -> Option<Self> {
        let mut r = Reader { raw, at: 0 };
        if r.take(2)? != MAGIC {
            return None;
        }
        let status = StatusCode::from_u16(r.u16()?).ok()?;
        let count = r.u16()?;
        // Sized by what the record can hold (a header takes at least six bytes), not by what
        // its count says: a corrupt count would otherwise reserve megabytes.
        let mut headers = Vec::with_capacity(usize::from(count).min(raw.len() / 6));
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
        let raw = StoredResponse::encode(
            StatusCode::CREATED,
            &h,
            &["Content-Type".into()],
            b"{\"id\":1}\x00\xff",
        );
        assert_eq!(
            StoredResponse::decode(&raw),
            Some(StoredResponse {
                status: StatusCode::CREATED,
                headers: vec![(
                    HeaderName::from_static("content-type"),
                    HeaderValue::from_static("application/json")
                )],
                body: Bytes::from_static(b"{\"id\":1}\x00\xff"),
            })
        );
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
        let back = StoredResponse::decode(&StoredResponse::encode(StatusCode::OK, &h, &allow, b""))
            .unwrap();
        let kept: Vec<(&str, &[u8])> = back
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            kept,
            [
                ("content-type", &b"application/json"[..]),
                ("link", b"<a>"),
                ("link", b"<b>")
            ]
        );
    }

    proptest! {
        /// A response reads back as its status, body, and exactly the values of its allowed
        /// headers, in the response's order.
        #[test]
        fn a_response_reads_back_as_stored(
            status in 100u16..1000,
            headers in proptest::collection::vec(
                (proptest::sample::select(&["content-type", "link", "x-a", "etag"][..]), "[ -~]{0,12}"),
                0..8,
            ),
            allow in proptest::collection::vec(
                proptest::sample::select(&["Content-Type", "link", "LINK", "etag", "x-b"][..]),
                0..4,
            ),
            body in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut all = HeaderMap::new();
            for (n, v) in &headers {
                all.append(*n, HeaderValue::from_str(v).unwrap());
            }
            let allow: Vec<String> = allow.into_iter().map(String::from).collect();
            let status = StatusCode::from_u16(status).unwrap();
            let back = StoredResponse::decode(&StoredResponse::encode(status, &all, &allow, &body))
                .unwrap();
            let wanted: Vec<(HeaderName, HeaderValue)> = all
                .iter()
                .filter(|(n, _)| allow.iter().any(|a| a.eq_ignore_ascii_case(n.as_str())))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            prop_assert_eq!(back, StoredResponse { status, headers: wanted, body: Bytes::from(body) });
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = StoredResponse::decode(&Bytes::from(bytes));
        }
    }
}
