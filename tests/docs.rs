//! The documentation cannot drift from the code: the configuration reference is what the code's
//! defaults are (and loads as a valid configuration), and every metric name the code emits is
//! listed in docs/METRICS.md.

use std::path::{Path, PathBuf};

#[test]
fn config_reference_matches_the_defaults() {
    let doc = std::fs::read_to_string("docs/CONFIG.md").unwrap();
    let defaults = keel::default_config_toml();
    assert!(
        doc.contains(&defaults),
        "docs/CONFIG.md is out of date: paste the output of `cargo run --example config_defaults`"
    );
}

#[tokio::test]
async fn config_reference_is_a_valid_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(
        &path,
        keel::default_config_toml().replace("NAME", "payments"),
    )
    .unwrap();
    let keel = keel::Keel::builder("orders")
        .config_file(&path)
        .shutdown(keel::keel_core::Shutdown::new())
        .build()
        .await
        .unwrap();
    assert_eq!(keel.config().generation(), 1);
    keel.client("payments").unwrap();
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name != "target" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_metric_name_is_documented() {
    let doc = std::fs::read_to_string("docs/METRICS.md").unwrap();
    let mut files = Vec::new();
    for dir in [
        "src",
        "core/src",
        "discovery/src",
        "balance/src",
        "resilience/src",
        "idempotency/src",
    ] {
        rust_files(Path::new(dir), &mut files);
    }
    let mut missing = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, _) in text.match_indices("\"keel_") {
            let name: String = text[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // Metric names have at least three parts: keel_<area>_<what>.
            if name.matches('_').count() >= 2 && !doc.contains(&format!("`{name}`")) {
                missing.push(format!("{name} ({})", f.display()));
            }
        }
    }
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), "not in docs/METRICS.md: {missing:#?}");
}
