//! Keeping credentials out of error messages and logs, which `/keel/status` and log pipelines
//! show to people who must not see them.

use std::borrow::Cow;

/// `text` with the userinfo of every URL in it masked: `redis://:secret@host:6379/` becomes
/// `redis://:***@host:6379/`, `redis://user:secret@host` becomes `redis://user:***@host`, and
/// `https://token@host` becomes `https://***@host`. Text without `://` is returned as it is.
///
/// Meant for messages that quote a configured URL (possibly malformed, possibly `Debug`-quoted):
/// everything between `://` and the last `@` before the end of the quoted value is taken as
/// userinfo, so a malformed URL is masked too, at worst more than needed.
pub fn redact_userinfo(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The character before the scheme, if a quote, opened the value: only that quote closes
        // it (`'` and `` ` `` are legal inside userinfo, so they cannot end every value).
        let scheme = rest[..i]
            .trim_end_matches(|c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        let opener = scheme
            .chars()
            .next_back()
            .filter(|c| matches!(c, '\'' | '`'));
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The value ends at whitespace, at its opening quote, or at an unescaped `"` (`\"`
        // inside a `Debug` string is part of the value; a URL holds no bare `"`).
        let mut end = tail.len();
        let mut prev = '\0';
        for (j, c) in tail.char_indices() {
            if c.is_whitespace() || Some(c) == opener || (c == '"' && prev != '\\') {
                end = j;
                break;
            }
            prev = c;
        }
        let value = &tail[..end];
        match value.rfind('@') {
            Some(at) => {
                let userinfo = &value[..at];
                if let Some(colon) = userinfo.find(':') {
                    out.push_str(&userinfo[..=colon]);
                }
                out.push_str("***");
                out.push_str(&value[at..]);
            }
            None => out.push_str(value),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::redact_userinfo;

    #[test]
    fn userinfo_is_masked_and_the_rest_kept() {
        for (given, want) in [
            ("redis://:secret@host:6379/", "redis://:***@host:6379/"),
            ("redis://user:secret@host", "redis://user:***@host"),
            ("https://token@host/x?y=1", "https://***@host/x?y=1"),
            ("redis://host:6379/0", "redis://host:6379/0"),
            ("no url here", "no url here"),
            (
                "url \"redis://:se\\\"c@ret@h:1/\" and http://a:b@c, redis://x",
                "url \"redis://:***@h:1/\" and http://a:***@c, redis://x",
            ),
            ("redis://:pa/ss@host", "redis://:***@host"),
            ("\"http://:pa'ss@h/\"", "\"http://:***@h/\""),
            ("redis://:p`w@h", "redis://:***@h"),
            (
                "'redis://:pw@h' or `redis://u:pw@h`",
                "'redis://:***@h' or `redis://u:***@h`",
            ),
        ] {
            assert_eq!(redact_userinfo(given), want, "{given}");
        }
    }
}
