//! Quickstart: one service whose settings change while it runs.
//!
//! It writes a config file to a temporary directory, starts keel on it, and then edits the file
//! the way people and tools do (in place, write-and-rename, a broken edit, a fix), printing each
//! change as the service sees it. A broken edit is refused and the last good settings stay.
//!
//!     cargo run --example quickstart
//!     cargo run --example quickstart -- --watch path/to/keel.toml   # edit it yourself; Ctrl-C ends
use std::{sync::Arc, time::Duration};

use serde::Deserialize;

/// The application's own section, `[shop]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Shop {
    greeting: String,
    discount_percent: u32,
    #[serde(with = "keel::keel_core::units::serde_duration")]
    checkout_timeout: Duration,
}

impl Default for Shop {
    fn default() -> Self {
        Self {
            greeting: "hello".into(),
            discount_percent: 0,
            checkout_timeout: Duration::from_secs(2),
        }
    }
}

fn validate(shop: &Shop) -> Result<(), String> {
    if shop.discount_percent > 90 {
        // "key: reason" names the key inside the section, so the error points at its line.
        return Err(format!(
            "discount_percent: must be at most 90, got {}",
            shop.discount_percent
        ));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--watch") {
        let path = args.get(i + 1).ok_or("--watch needs a file")?;
        return watch_forever(path).await;
    }

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keel.toml");
    std::fs::write(
        &path,
        "[service]\nzone = \"eu-1a\"\n\n[shop]\ngreeting = \"hello\"\ndiscount_percent = 5\ncheckout_timeout = \"2s\"\n",
    )?;
    let keel = keel::Keel::builder("shop")
        .config_file(&path)
        .settings_with::<Shop>("shop", validate)
        .build()
        .await?;
    let shop = keel.settings::<Shop>("shop")?;
    println!(
        "keel quickstart: service `{}`, config {}",
        keel.name(),
        path.display()
    );
    println!(
        "  generation {}: {:?}",
        keel.config().generation(),
        *shop.load()
    );

    let edits: [(&str, &str); 4] = [
        (
            "edit in place",
            "[shop]\ngreeting = \"bonjour\"\ndiscount_percent = 10\ncheckout_timeout = \"2s\"\n",
        ),
        (
            "write a temp file and rename it over",
            "[shop]\ngreeting = \"bonjour\"\ndiscount_percent = 15\ncheckout_timeout = \"800ms\"\n",
        ),
        (
            "a broken edit (discount too high)",
            "[shop]\ngreeting = \"oops\"\ndiscount_percent = 95\ncheckout_timeout = \"800ms\"\n",
        ),
        (
            "the fix",
            "[shop]\ngreeting = \"hallo\"\ndiscount_percent = 20\ncheckout_timeout = \"1s\"\n",
        ),
    ];
    for (i, (what, text)) in edits.iter().enumerate() {
        println!("\n> {what}");
        let before = keel.config().generation();
        // A refusal already shown (the broken edit's, until the fix applies) is not this edit's.
        let refused_before = keel.config().last_error();
        if i == 1 {
            let tmp = dir.path().join(".keel.toml.tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &path)?;
        } else {
            std::fs::write(&path, text)?;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if keel.config().generation() != before {
                println!(
                    "  generation {}: {:?}",
                    keel.config().generation(),
                    *shop.load()
                );
                break;
            }
            if let Some(failure) = keel
                .config()
                .last_error()
                .filter(|f| !refused_before.as_ref().is_some_and(|b| Arc::ptr_eq(b, f)))
            {
                println!("  refused: {}", failure.error);
                println!(
                    "  still in force (generation {}): {:?}",
                    keel.config().generation(),
                    *shop.load()
                );
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err("the edit was never noticed".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    println!("\ndone: every good edit applied live, the bad one refused with its reason.");
    Ok(())
}

async fn watch_forever(path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let keel = keel::Keel::builder("shop")
        .config_file(path)
        .settings_with::<Shop>("shop", validate)
        .build()
        .await?;
    let shop = keel.settings::<Shop>("shop")?;
    println!("watching {path}; edit it, Ctrl-C to stop");
    println!(
        "generation {}: {:?}",
        keel.config().generation(),
        *shop.load()
    );
    let mut changes = keel.config().subscribe().ok_or("no document")?;
    let mut reported_error = None;
    loop {
        tokio::select! {
            _ = keel.shutdown().triggered() => return Ok(()),
            changed = changes.changed() => {
                changed?;
                println!("generation {}: {:?}", keel.config().generation(), *shop.load());
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                let now = keel.config().last_error().map(|f| f.error.to_string());
                if now != reported_error {
                    if let Some(e) = &now {
                        println!("refused, last good kept: {e}");
                    }
                    reported_error = now;
                }
            }
        }
    }
}
