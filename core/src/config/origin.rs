use std::{fmt, path::PathBuf};

use serde::Serialize;

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Origin {
    /// A file, and the line where it is known.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key, where it could be found.
        line: Option<u32>,
    },
    /// An environment variable.
    Env {
        /// The variable's name, e.g. `KEEL__CLIENTS__PAYMENTS__TIMEOUT`.
        var: String,
    },
    /// An override set in code.
    Override,
    /// A built-in default (the key was not set anywhere).
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File {
                path,
                line: Some(l),
            } => write!(f, "file {} line {l}", path.display()),
            Origin::File { path, line: None } => write!(f, "file {}", path.display()),
            Origin::Env { var } => write!(f, "environment variable {var}"),
            Origin::Override => f.write_str("override in code"),
            Origin::Default => f.write_str("built-in default"),
        }
    }
}

/// Finds the 1-based line of `key` (a dotted path) in a TOML, YAML or JSON text, best effort:
/// the last segment written as a key, preferring a place after its parent's table header.
pub(crate) fn line_of(text: &str, key: &str) -> Option<u32> {
    let segments: Vec<&str> = key.split('.').collect();
    let last = *segments.last()?;
    let parent = segments[..segments.len().saturating_sub(1)].join(".");
    let is_key_line = |line: &str| {
        let t = line.trim_start();
        let t = t.strip_prefix("- ").unwrap_or(t);
        let rest = match t.strip_prefix('"') {
            Some(r) => r.strip_prefix(last).and_then(|r| r.strip_prefix('"')),
            None => t.strip_prefix(last),
        };
        matches!(
            rest.and_then(|r| r.trim_start().chars().next()),
            Some('=' | ':')
        )
    };
    let lines: Vec<&str> = text.lines().collect();
    // A whole table: its header, `[a.b]` or `[[a.b]]`, when there is one.
    let header = format!("[{key}]");
    let array_header = format!("[[{key}]]");
    if let Some(i) = lines.iter().position(|l| {
        let t = l.trim();
        t == header || t == array_header
    }) {
        return u32::try_from(i + 1).ok();
    }
    let start = if parent.is_empty() {
        0
    } else {
        let header = format!("[{parent}]");
        let array_header = format!("[[{parent}]]");
        lines
            .iter()
            .position(|l| {
                let t = l.trim();
                t == header || t == array_header
            })
            .unwrap_or(0)
    };
    lines
        .iter()
        .enumerate()
        .skip(start)
        .chain(lines.iter().enumerate().take(start))
        .find(|(_, l)| is_key_line(l))
        .map(|(i, _)| u32::try_from(i + 1).unwrap_or(u32::MAX))
}
