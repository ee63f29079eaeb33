//! Reading the `Idempotency-Key` header, and turning it into a storage key and a fingerprint.
//!
//! The IETF draft (`draft-ietf-httpapi-idempotency-key-header`) makes the header an RFC 8941
//! structured-field *string*: `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`. Many
//! clients send the value bare, so a bare token is accepted too: RFC 9110 `tchar`s plus `:` and
//! `/` (RFC 8941 `sf-token` without its first-character rule, so a bare UUID passes). RFC 8941
//! parameters after a string (`"abc";v=1`) are checked and ignored, as the draft defines none.
//! Keys are at most 255 characters and never empty.
//!
//! The storage key hashes scope, method, route and key with length prefixes, so two tenants, two
//! routes or two methods never share a key, and the raw client key never reaches the store,
//! the logs or the spans.

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::Fingerprint;

/// Longest accepted key, in characters.
pub const MAX_KEY_LEN: usize = 255;

/// Why a key header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The header is present more than once.
    #[error("the idempotency key header appears more than once")]
    Repeated,
    /// Empty, too long, or not an sf-string or token.
    #[error("the idempotency key is not a structured-field string or token of 1..=255 characters")]
    Malformed,
}

/// Parses one header value: an RFC 8941 sf-string (`"abc"`, with `\"` and `\\` escapes),
/// optionally followed by RFC 8941 parameters (`"abc";v=1`, checked and ignored: the draft
/// defines none), or a bare token (without parameters). Never panics.
pub fn parse_key(value: &[u8]) -> Result<String, KeyError> {
    let v = trim_ows(value);
    let out = if v.first() == Some(&b'"') {
        let (out, rest) = sf_string(v)?;
        parameters(rest)?;
        out
    } else {
        // A bare token takes no parameters: `abc;x` and `abc;y` must not both become `abc`.
        if v.is_empty() || !v.iter().all(|&b| is_token_char(b)) {
            return Err(KeyError::Malformed);
        }
        // All ASCII, hence valid UTF-8.
        String::from_utf8(v.to_vec()).map_err(|_| KeyError::Malformed)?
    };
    if out.is_empty() || out.len() > MAX_KEY_LEN {
        return Err(KeyError::Malformed);
    }
    Ok(out)
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// An sf-string at the start of `v`, and what follows its closing quote.
fn sf_string(v: &[u8]) -> Result<(String, &[u8]), KeyError> {
    let mut out = String::new();
    let mut i = 1;
    loop {
        match v.get(i) {
            None => return Err(KeyError::Malformed),
            Some(b'\\') => match v.get(i + 1) {
                Some(&c @ (b'"' | b'\\')) => {
                    out.push(char::from(c));
                    i += 2;
                }
                _ => return Err(KeyError::Malformed),
            },
            Some(b'"') => return Ok((out, &v[i + 1..])),
            Some(&c) if (0x20..=0x7e).contains(&c) => {
                out.push(char::from(c));
                i += 1;
            }
            Some(_) => return Err(KeyError::Malformed),
        }
    }
}

/// RFC 8941 parameters (`*( ";" *SP key [ "=" bare-item ] )`) making up the whole of `v`.
fn parameters(mut v: &[u8]) -> Result<(), KeyError> {
    while let [b';', rest @ ..] = v {
        v = rest;
        while let [b' ', rest @ ..] = v {
            v = rest;
        }
        // key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )
        match v.first() {
            Some(b'a'..=b'z' | b'*') => {}
            _ => return Err(KeyError::Malformed),
        }
        let n = v
            .iter()
            .take_while(|&&b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*'))
            .count();
        v = &v[n..];
        if let [b'=', rest @ ..] = v {
            v = bare_item(rest)?;
        }
    }
    if v.is_empty() {
        Ok(())
    } else {
        Err(KeyError::Malformed)
    }
}

/// Skips one RFC 8941 bare item (integer, decimal, string, token, byte sequence, boolean).
fn bare_item(v: &[u8]) -> Result<&[u8], KeyError> {
    let count = |v: &[u8], f: fn(u8) -> bool| v.iter().take_while(|&&b| f(b)).count();
    match v.first() {
        Some(b'"') => sf_string(v).map(|(_, rest)| rest),
        Some(b'?') => match v.get(1) {
            Some(b'0' | b'1') => Ok(&v[2..]),
            _ => Err(KeyError::Malformed),
        },
        Some(b':') => {
            let n = count(&v[1..], |b| {
                b.is_ascii_alphanumeric() || b"+/=".contains(&b)
            });
            match v.get(1 + n) {
                Some(b':') => Ok(&v[2 + n..]),
                _ => Err(KeyError::Malformed),
            }
        }
        Some(c) if c.is_ascii_alphabetic() || *c == b'*' => {
            Ok(&v[1 + count(&v[1..], is_token_char)..])
        }
        Some(b'-' | b'0'..=b'9') => {
            let sign = usize::from(v[0] == b'-');
            let int = count(&v[sign..], |b| b.is_ascii_digit());
            let mut end = sign + int;
            if int == 0 || int > 15 {
                return Err(KeyError::Malformed);
            }
            if v.get(end) == Some(&b'.') {
                let frac = count(&v[end + 1..], |b| b.is_ascii_digit());
                if int > 12 || !(1..=3).contains(&frac) {
                    return Err(KeyError::Malformed);
                }
                end += 1 + frac;
            }
            Ok(&v[end..])
        }
        _ => Err(KeyError::Malformed),
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A character of an RFC 8941 token after its first: `tchar`, `:` or `/`.
fn is_token_char(b: u8) -> bool {
    is_tchar(b) || b == b':' || b == b'/'
}

/// Reads the key header from `headers`: `Ok(None)` when absent.
pub fn key_from_headers(headers: &HeaderMap, name: &str) -> Result<Option<String>, KeyError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    parse_key(first.as_bytes()).map(Some)
}

fn feed(h: &mut Sha256, part: &[u8]) {
    h.update((part.len() as u64).to_be_bytes());
    h.update(part);
}

/// The storage key: hex SHA-256 of scope, method, route and client key (length-prefixed).
pub fn storage_key(scope: &str, method: &str, route: &str, key: &str) -> String {
    storage_key_raw(scope.as_bytes(), method, route, key)
}

/// [`storage_key`] with the scope as raw bytes (a scope header need not be UTF-8): the same key
/// for a UTF-8 scope, and distinct keys for distinct byte strings.
pub(crate) fn storage_key_raw(scope: &[u8], method: &str, route: &str, key: &str) -> String {
    let mut h = Sha256::new();
    feed(&mut h, scope);
    for part in [method, route, key] {
        feed(&mut h, part.as_bytes());
    }
    to_hex(&h.finalize())
}

/// The fingerprint of a request, per policy: hex SHA-256 of its target (`path?query`) and of
/// what the policy selects. The storage key holds the route *template* (`/orders/{id}`), so the
/// target is what tells `/orders/1` from `/orders/2` under one key: a key reused for another
/// resource is a mismatch (422), not a replay of the first resource's answer. Only
/// [`Fingerprint::None`] leaves the target out (any request with the key is "the same").
pub fn fingerprint(policy: &Fingerprint, target: &str, headers: &HeaderMap, body: &[u8]) -> String {
    let mut h = Sha256::new();
    if *policy != Fingerprint::None {
        feed(&mut h, target.as_bytes());
    }
    match policy {
        Fingerprint::None => {}
        Fingerprint::Body => h.update(body),
        Fingerprint::JsonFields(fields) => {
            match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(serde_json::Value::Object(map)) => {
                    for f in fields {
                        feed(&mut h, f.as_bytes());
                        let v = map.get(f).unwrap_or(&serde_json::Value::Null);
                        feed(&mut h, v.to_string().as_bytes());
                    }
                }
                _ => h.update(body),
            }
        }
        Fingerprint::Headers(names) => {
            for n in names {
                feed(&mut h, n.to_ascii_lowercase().as_bytes());
                // The count of values, so a value cannot pass for the next header's name.
                let values = headers.get_all(n.as_str());
                h.update((values.iter().count() as u64).to_be_bytes());
                for v in values {
                    feed(&mut h, v.as_bytes());
                }
            }
        }
    }
    to_hex(&h.finalize())
}

/// Lower-case hex, with a table, written into a buffer sized once (the `hex` crate's char
/// iterator, and a push per byte, showed up in profiles).
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = vec![0u8; bytes.len() * 2];
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
    // Hex digits only: always UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// A short form of a storage key for logs and spans (already a hash: never the raw key).
pub(crate) fn short(storage_key: &str) -> &str {
    storage_key.get(..16).unwrap_or(storage_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(parse_key(b"\"abc\"").unwrap(), "abc");
        assert_eq!(parse_key(b" \"a\\\"b\\\\c\" ").unwrap(), "a\"b\\c");
        assert_eq!(
            parse_key(b"8e03978e-40d5-43e8-bc93-6894a57f9324").unwrap(),
            "8e03978e-40d5-43e8-bc93-6894a57f9324"
        );
        assert_eq!(parse_key(b"\"with space\"").unwrap(), "with space");
        // Parameters are checked and ignored.
        for (v, key) in [
            (&b"\"abc\";x=1"[..], "abc"),
            (
                b"\"abc\"; v=\"2\";flag;*w=?1;n=-1.5;t=tok/en;b=:aGk=:",
                "abc",
            ),
            (b"\"a;b\"", "a;b"),
        ] {
            assert_eq!(
                parse_key(v).as_deref(),
                Ok(key),
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
        for bad in [
            &b""[..],
            b"\"\"",
            b"\"abc",
            b"\"a\"b",
            b"a b",
            b"\"a\\x\"",
            b"\"\xc3\xa9\"",
            b"a,b",
            b"\"a\tb\"",
            b"\"abc\";",
            b"\"abc\";X=1",
            b"\"abc\";x=",
            b"\"abc\";x=1.",
            b"\"abc\";x=1234567890123456",
            b"\"abc\";x=\"open",
            b"\"abc\";x=?2",
            b"\"abc\";x=:aGk=",
            b"\"abc\" ;x=1",
            b";x=1",
            b"abc;x=1",
        ] {
            assert_eq!(
                parse_key(bad),
                Err(KeyError::Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("\"{}\"", "a".repeat(256));
        assert_eq!(parse_key(long.as_bytes()), Err(KeyError::Malformed));
        let ok = format!("\"{}\"", "a".repeat(255));
        assert!(parse_key(ok.as_bytes()).is_ok());
    }

    #[test]
    fn hex_matches_the_hex_crate() {
        let b: Vec<u8> = (0..=255).collect();
        assert_eq!(to_hex(&b), hex::encode(&b));
    }

    #[test]
    fn storage_keys_separate_parts() {
        assert_ne!(
            storage_key("ab", "POST", "/x", "k"),
            storage_key("a", "bPOST", "/x", "k")
        );
        assert_ne!(
            storage_key("t1", "POST", "/x", "k"),
            storage_key("t2", "POST", "/x", "k")
        );
        assert_eq!(storage_key("t", "POST", "/x", "k").len(), 64);
    }

    #[test]
    fn json_field_fingerprint_ignores_other_fields() {
        let p = Fingerprint::JsonFields(vec!["amount".into()]);
        let h = HeaderMap::new();
        assert_eq!(
            fingerprint(&p, "/x", &h, br#"{"amount":5,"note":"a"}"#),
            fingerprint(&p, "/x", &h, br#"{"note":"b","amount":5}"#)
        );
        assert_ne!(
            fingerprint(&p, "/x", &h, br#"{"amount":5}"#),
            fingerprint(&p, "/x", &h, br#"{"amount":6}"#)
        );
    }

    #[test]
    fn header_fingerprint_tells_which_header_holds_a_value() {
        let p = Fingerprint::Headers(vec!["x-a".into(), "x-b".into()]);
        let mut one = HeaderMap::new();
        one.insert("x-a", http::HeaderValue::from_static("x-b"));
        let mut other = HeaderMap::new();
        other.insert("x-b", http::HeaderValue::from_static("x-b"));
        assert_ne!(
            fingerprint(&p, "/x", &one, b""),
            fingerprint(&p, "/x", &other, b"")
        );
        let mut empty = HeaderMap::new();
        empty.insert("x-a", http::HeaderValue::from_static(""));
        assert_ne!(
            fingerprint(&p, "/x", &empty, b""),
            fingerprint(&p, "/x", &HeaderMap::new(), b"")
        );
    }

    #[test]
    fn the_target_is_part_of_the_fingerprint_unless_none() {
        let h = HeaderMap::new();
        for p in [
            Fingerprint::Body,
            Fingerprint::JsonFields(vec!["a".into()]),
            Fingerprint::Headers(vec!["x-a".into()]),
        ] {
            assert_ne!(
                fingerprint(&p, "/orders/1", &h, b"{}"),
                fingerprint(&p, "/orders/2", &h, b"{}")
            );
            assert_ne!(
                fingerprint(&p, "/work?x=1", &h, b"{}"),
                fingerprint(&p, "/work?x=2", &h, b"{}")
            );
        }
        assert_eq!(
            fingerprint(&Fingerprint::None, "/orders/1", &h, b"a"),
            fingerprint(&Fingerprint::None, "/orders/2", &h, b"b")
        );
    }

    fn serialize_sf_string(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }

    proptest! {
        #[test]
        fn parameters_never_panic(tail in proptest::collection::vec(
            prop_oneof![Just(b';'), Just(b'='), Just(b'"'), Just(b':'), Just(b'?'), Just(b'.'),
                Just(b'-'), Just(b' '), Just(b'\\'), b'a'..=b'z', b'0'..=b'9', any::<u8>()],
            0..60,
        )) {
            let mut v = b"\"k\";".to_vec();
            v.extend_from_slice(&tail);
            if let Ok(key) = parse_key(&v) {
                prop_assert_eq!(key, "k");
            }
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_key(&bytes);
        }

        #[test]
        fn sf_strings_round_trip(s in "[ -~]{1,255}") {
            prop_assert_eq!(parse_key(serialize_sf_string(&s).as_bytes()).unwrap(), s);
        }

        #[test]
        fn bare_tokens_accepted(s in "[A-Za-z0-9:/._~+*-]{1,255}") {
            prop_assert_eq!(parse_key(s.as_bytes()).unwrap(), s);
        }

        #[test]
        fn too_long_refused(s in "[a-z]{256,300}") {
            prop_assert!(parse_key(s.as_bytes()).is_err());
            prop_assert!(parse_key(serialize_sf_string(&s).as_bytes()).is_err());
        }

        #[test]
        fn accepted_keys_are_short_printable(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(k) = parse_key(&bytes) {
                prop_assert!(!k.is_empty() && k.len() <= 255);
                prop_assert!(k.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            }
        }
    }
}
