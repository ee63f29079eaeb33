#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, io::Write, sync::Arc, time::Duration};

use serde::Deserialize;

use super::*;
use crate::{ConfigError, Ratio};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Shop {
    discount: Ratio,
    timeout: std_duration::D,
    currency: String,
    max_items: u32,
    featured: bool,
    limits: Limits,
    regions: BTreeMap<String, Region>,
}

mod std_duration {
    use serde::Deserialize;
    #[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
    pub(super) struct D(
        #[serde(with = "crate::units::serde_duration")] pub(super) std::time::Duration,
    );
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Limits {
    per_minute: u32,
    burst: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Region {
    weight: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_minute: 60,
            burst: 10,
        }
    }
}

impl Default for Shop {
    fn default() -> Self {
        Self {
            discount: Ratio::ZERO,
            timeout: std_duration::D(Duration::from_secs(1)),
            currency: "EUR".into(),
            max_items: 100,
            featured: false,
            limits: Limits::default(),
            regions: BTreeMap::new(),
        }
    }
}

fn validate_shop(s: &Shop) -> Result<(), String> {
    if s.max_items == 0 {
        return Err("max_items must be at least 1".into());
    }
    if s.limits.burst > s.limits.per_minute {
        return Err(format!(
            "limits.burst: {} is more than limits.per_minute",
            s.limits.burst
        ));
    }
    Ok(())
}

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    p
}

fn loader(files: &[std::path::PathBuf], env: &EnvMap) -> ConfigLoader {
    let mut l = ConfigLoader::new().with_env_map(env.clone());
    for f in files {
        l = l.with_file(f);
    }
    l.register_with::<ServiceSection>("service", ServiceSection::validate)
        .unwrap();
    l.register_with::<Shop>("shop", validate_shop).unwrap();
    l
}

/// Ten keys, each set at a different set of layers; the highest layer that sets a key wins.
#[test]
fn precedence_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let f = file(
        &dir,
        "keel.toml",
        r#"
[service]
zone = "file-zone"
version = "file-version"
weight = 2
drain_timeout = "10s"

[shop]
currency = "USD"
max_items = 5
featured = true
discount = "10%"
timeout = "2s"

[shop.limits]
per_minute = 120
"#,
    );
    let env = EnvMap::new();
    env.set("KEEL__SERVICE__VERSION", "env-version");
    env.set("KEEL__SERVICE__WEIGHT", "3");
    env.set("KEEL__SHOP__MAX_ITEMS", "7");
    env.set("KEEL__SHOP__DISCOUNT", "0.25");
    env.set("KEEL__SHOP__LIMITS__BURST", "20");
    env.set("KEEL__SHOP__LIMITS__PER_MINUTE", "240");
    env.set("OTHER__SHOP__CURRENCY", "ignored: other prefix");
    let config = loader(&[f], &env)
        .with_override("service.weight", 4)
        .with_override("shop.featured", false)
        .with_override("shop.limits.burst", 30)
        .load()
        .unwrap();
    let service = config.section::<ServiceSection>("service").unwrap();
    let shop = config.section::<Shop>("shop").unwrap();
    let (s, p) = (service.load(), shop.load());
    // default only
    assert_eq!(s.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(p.regions, BTreeMap::new());
    // file only
    assert_eq!(s.zone.as_deref(), Some("file-zone"));
    assert_eq!(s.drain_timeout, Duration::from_secs(10));
    assert_eq!(p.currency, "USD");
    assert_eq!(p.timeout.0, Duration::from_secs(2));
    // file < env
    assert_eq!(s.version.as_deref(), Some("env-version"));
    assert_eq!(p.max_items, 7);
    assert_eq!(p.discount.get(), 0.25);
    assert_eq!(p.limits.per_minute, 240);
    // file < env < override
    assert_eq!(s.weight, 4);
    assert_eq!(p.limits.burst, 30);
    // file < override
    assert!(!p.featured);
    assert_eq!(config.generation(), 1);
}

#[test]
fn yaml_and_json_by_extension_later_files_win() {
    let dir = tempfile::tempdir().unwrap();
    let a = file(&dir, "a.yaml", "shop:\n  currency: GBP\n  max_items: 3\n");
    let b = file(&dir, "b.json", r#"{"shop": {"max_items": 9}}"#);
    let config = loader(&[a, b], &EnvMap::new()).load().unwrap();
    let shop = config.section::<Shop>("shop").unwrap();
    assert_eq!(shop.load().currency, "GBP");
    assert_eq!(shop.load().max_items, 9);
}

fn load_err(text: &str, env: &EnvMap) -> (ConfigError, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let f = file(&dir, "keel.toml", text);
    let err = loader(std::slice::from_ref(&f), env).load().unwrap_err();
    (err, f)
}

#[test]
fn unknown_key_names_file_line_and_path() {
    let (err, f) = load_err(
        "[shop]\ncurrency = \"EUR\"\n\n[shop.limits]\nper_minute = 1\nbursts = 3\n",
        &EnvMap::new(),
    );
    match &err {
        ConfigError::UnknownKey { key, origin } => {
            assert_eq!(key, "shop.limits.bursts");
            assert_eq!(
                origin,
                &Origin::File {
                    path: f,
                    line: Some(6)
                }
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("shop.limits.bursts"), "{err}");
}

#[test]
fn unknown_section_is_an_error() {
    let (err, _) = load_err("[shoop]\ncurrency = \"EUR\"\n", &EnvMap::new());
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, .. } if key == "shoop"),
        "{err:?}"
    );
}

#[test]
fn unknown_env_key_names_the_variable() {
    let env = EnvMap::new();
    env.set("KEEL__SHOP__CURENCY", "EUR");
    let (err, _) = load_err("", &env);
    match &err {
        ConfigError::UnknownKey { key, origin } => {
            assert_eq!(key, "shop.curency");
            assert_eq!(
                origin,
                &Origin::Env {
                    var: "KEEL__SHOP__CURENCY".into()
                }
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_duration_names_source_and_path() {
    let (err, f) = load_err(
        "[shop]\ncurrency = \"EUR\"\ntimeout = \"soon\"\n",
        &EnvMap::new(),
    );
    match &err {
        ConfigError::Invalid {
            key,
            origin,
            reason,
        } => {
            assert_eq!(key, "shop.timeout");
            assert_eq!(
                origin,
                &Origin::File {
                    path: f,
                    line: Some(3)
                }
            );
            assert!(reason.contains("soon"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let env = EnvMap::new();
    env.set("KEEL__SHOP__TIMEOUT", "5");
    let (err, _) = load_err("", &env);
    assert!(
        matches!(&err, ConfigError::Invalid { key, origin: Origin::Env { var }, reason }
            if key == "shop.timeout" && var == "KEEL__SHOP__TIMEOUT" && reason.contains("unit")),
        "{err:?}"
    );
}

#[test]
fn bad_ratio_names_source_and_path() {
    let (err, _) = load_err("[shop]\ndiscount = \"150%\"\n", &EnvMap::new());
    assert!(
        matches!(&err, ConfigError::Invalid { key, origin: Origin::File { line: Some(2), .. }, .. } if key == "shop.discount"),
        "{err:?}"
    );
}

#[test]
fn wrong_type_names_source_and_path() {
    let (err, _) = load_err("[shop]\nmax_items = \"many\"\n", &EnvMap::new());
    assert!(
        matches!(&err, ConfigError::Invalid { key, origin: Origin::File { line: Some(2), .. }, .. } if key == "shop.max_items"),
        "{err:?}"
    );
    let (err, _) = load_err("[shop]\n[shop.regions.eu]\nweight = -3\n", &EnvMap::new());
    assert!(
        matches!(&err, ConfigError::Invalid { key, .. } if key == "shop.regions.eu.weight"),
        "{err:?}"
    );
}

#[test]
fn syntax_error_names_file_and_line() {
    let (err, f) = load_err(
        "[shop]\ncurrency = \"EUR\"\nmax_items = = 3\n",
        &EnvMap::new(),
    );
    match &err {
        ConfigError::Parse { path, line, .. } => {
            assert_eq!(path, &f);
            assert_eq!(*line, Some(3));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn syntax_error_says_why_without_quoting_the_file() {
    let (err, _) = load_err("[shop]\ncurrency = \"hunter2\" = 3\n", &EnvMap::new());
    let text = err.to_string();
    assert!(text.contains("line 2"), "{text}");
    // The parser's reason, not only where it stopped.
    assert!(text.contains("expected"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let (err, _) = load_err("[shop]\ncurrency = \"EUR\"\n[shop]\n", &EnvMap::new());
    assert!(err.to_string().contains("duplicate key"), "{err}");
}

#[test]
fn validation_failure_names_the_section() {
    let (err, f) = load_err("[shop]\nmax_items = 0\n", &EnvMap::new());
    assert!(
        matches!(&err, ConfigError::Invalid { key, reason, origin }
            if key == "shop" && reason.contains("max_items")
                && *origin == Origin::File { path: f.clone(), line: Some(1) }),
        "{err:?}"
    );
}

#[test]
fn validator_can_name_the_key_inside_its_section() {
    let (err, f) = load_err(
        "[shop]\nmax_items = 3\n\n[shop.limits]\nper_minute = 5\nburst = 9\n",
        &EnvMap::new(),
    );
    match &err {
        ConfigError::Invalid {
            key,
            origin,
            reason,
        } => {
            assert_eq!(key, "shop.limits.burst");
            assert_eq!(
                origin,
                &Origin::File {
                    path: f,
                    line: Some(6)
                }
            );
            assert!(reason.starts_with("9 is more"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn several_problems_are_all_reported() {
    let (err, _) = load_err(
        "[shop]\nmax_items = \"x\"\n[service]\nweight = 0\n[nope]\na = 1\n",
        &EnvMap::new(),
    );
    let keys = err.keys();
    assert!(keys.contains(&"shop.max_items"), "{keys:?}");
    assert!(keys.contains(&"service"), "{keys:?}");
    assert!(keys.contains(&"nope"), "{keys:?}");
}

#[test]
fn bad_reload_keeps_last_good_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let f = file(&dir, "keel.toml", "[shop]\nmax_items = 5\n");
    let config = loader(std::slice::from_ref(&f), &EnvMap::new())
        .load()
        .unwrap();
    let shop = config.section::<Shop>("shop").unwrap();
    std::fs::write(&f, "[shop]\nmax_items = 0\n").unwrap();
    let err = config.reload().unwrap_err();
    assert!(err.to_string().contains("max_items"));
    assert_eq!(shop.load().max_items, 5);
    assert_eq!(config.generation(), 1);
    assert!(config.last_error().is_some());
    std::fs::write(&f, "[shop]\nmax_items = 6\n").unwrap();
    assert_eq!(config.reload().unwrap(), ReloadOutcome::Applied(2));
    assert_eq!(shop.load().max_items, 6);
    assert!(config.last_error().is_none());
    // Same contents again: nothing changes, the generation stays.
    assert_eq!(
        config.reload_if_changed().unwrap(),
        ReloadOutcome::Unchanged
    );
    assert_eq!(config.reload().unwrap(), ReloadOutcome::Unchanged);
    assert_eq!(config.generation(), 2);
}

#[test]
fn a_refused_document_polled_again_is_refused_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let f = file(&dir, "keel.toml", "[shop]\nmax_items = 5\n");
    let config = loader(std::slice::from_ref(&f), &EnvMap::new())
        .load()
        .unwrap();
    std::fs::write(&f, "[shop]\nmax_items = 0\n").unwrap();
    assert!(config.reload_if_changed().is_err());
    let first = config.last_error().expect("kept");
    // Polled again, unchanged: still refused, but the refusal kept is the first one (not
    // logged, counted and stamped again every poll).
    let again = config.reload_if_changed().unwrap_err();
    assert!(again.to_string().contains("max_items"));
    assert!(Arc::ptr_eq(&first, &config.last_error().unwrap()));
    // An explicit reload says it again.
    assert!(config.reload().is_err());
    assert!(!Arc::ptr_eq(&first, &config.last_error().unwrap()));
    // Another bad edit is news.
    let second = config.last_error().unwrap();
    std::fs::write(&f, "[shop]\nmax_items = -1\n").unwrap();
    assert!(config.reload_if_changed().is_err());
    assert!(!Arc::ptr_eq(&second, &config.last_error().unwrap()));
    // Fixed: applied.
    std::fs::write(&f, "[shop]\nmax_items = 7\n").unwrap();
    assert_eq!(
        config.reload_if_changed().unwrap(),
        ReloadOutcome::Applied(2)
    );
    assert!(config.last_error().is_none());
}

#[test]
fn unchanged_sections_keep_their_generation() {
    let dir = tempfile::tempdir().unwrap();
    let f = file(
        &dir,
        "keel.toml",
        "[shop]\nmax_items = 5\n[service]\nzone = \"a\"\n",
    );
    let config = loader(std::slice::from_ref(&f), &EnvMap::new())
        .load()
        .unwrap();
    let shop = config.section::<Shop>("shop").unwrap();
    let service = config.section::<ServiceSection>("service").unwrap();
    std::fs::write(&f, "[shop]\nmax_items = 5\n[service]\nzone = \"b\"\n").unwrap();
    config.reload().unwrap();
    assert_eq!(shop.generation(), 0);
    assert_eq!(service.generation(), 1);
}

#[test]
fn env_changes_apply_on_reload() {
    let env = EnvMap::new();
    let config = loader(&[], &env).load().unwrap();
    let shop = config.section::<Shop>("shop").unwrap();
    env.set("KEEL__SHOP__CURRENCY", "JPY");
    assert_eq!(config.reload().unwrap(), ReloadOutcome::Applied(2));
    assert_eq!(shop.load().currency, "JPY");
}

#[test]
fn late_registration_is_validated_against_the_document() {
    let env = EnvMap::new();
    env.set("KEEL__EXTRA__LEVEL", "3");
    let mut l = ConfigLoader::new().with_env_map(env.clone());
    l.register::<Extra>("extra").unwrap();
    let config = l.load().unwrap();
    #[derive(Debug, PartialEq, Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Extra {
        level: u32,
    }
    #[derive(Debug, PartialEq, Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Later {
        on: bool,
    }
    let later = config.register::<Later>("later", None).unwrap();
    assert!(!later.load().on);
    assert!(config.register::<Later>("later", None).is_err());
    assert!(matches!(
        config.section::<Later>("extra"),
        Err(ConfigError::SectionType { .. })
    ));
    assert!(matches!(
        config.section::<Later>("missing"),
        Err(ConfigError::Section { .. })
    ));
    // From now on a reload that breaks the late section is refused.
    env.set("KEEL__LATER__ON", "maybe");
    assert!(config.reload().is_err());
    env.set("KEEL__LATER__ON", "true");
    config.reload().unwrap();
    assert!(later.load().on);
}

#[test]
fn readers_never_see_a_partial_document_across_reloads() {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };
    // `a` and `b` are always written equal; a reader must never see them differ, nor an invalid
    // value. Every other reload is invalid and must be refused without effect.
    #[derive(Debug, PartialEq, Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Pair {
        a: u32,
        b: u32,
    }
    let env = EnvMap::new();
    env.set("KEEL__PAIR__A", "0");
    env.set("KEEL__PAIR__B", "0");
    let mut l = ConfigLoader::new().with_env_map(env.clone());
    l.register_with::<Pair>("pair", |p| {
        if p.a == p.b {
            Ok(())
        } else {
            Err("a and b must be equal".into())
        }
    })
    .unwrap();
    let config = l.load().unwrap();
    let pair = config.section::<Pair>("pair").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let pair = pair.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut reads = 0u64;
                let mut last = 0;
                while reads < 1_000 || !stop.load(Ordering::Relaxed) {
                    let p = pair.load();
                    assert_eq!(p.a, p.b, "torn or invalid document");
                    assert!(p.a >= last, "went backwards");
                    last = p.a;
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for i in 1..=1_000u32 {
        if i % 2 == 0 {
            env.set("KEEL__PAIR__A", (i + 1).to_string());
            assert!(config.reload().is_err());
            env.set("KEEL__PAIR__A", i.to_string());
        } else {
            env.set("KEEL__PAIR__A", i.to_string());
        }
        env.set("KEEL__PAIR__B", i.to_string());
        config.reload().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert_eq!(pair.load().a, 1_000);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), ext in prop_oneof!["toml", "yaml", "json"]) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join(format!("keel.{ext}"));
            std::fs::write(&p, &bytes).unwrap();
            let _ = loader(&[p], &EnvMap::new()).load();
        }

        #[test]
        fn arbitrary_toml_shaped_text_never_panics(text in "(\\[[a-z.]{1,12}\\]\n|[a-z_]{1,10} = (\"[^\"\n]{0,8}\"|[0-9.%-]{1,6}|true)\n){0,12}") {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("keel.toml");
            std::fs::write(&p, &text).unwrap();
            let _ = loader(&[p], &EnvMap::new()).load();
        }
    }
}

/// A URL with a password, or any string, set where it does not belong (or refused by a
/// validator that quotes it) must not be repeated whole by the error, which `/keel/status` and
/// the logs show.
#[test]
fn errors_do_not_repeat_secrets() {
    const URL: &str = "redis://:hunter2@cache:6379/";
    for var in [
        "KEEL__SHOP",
        "KEEL__SHOP__LIMITS",
        "KEEL__SHOP__MAX_ITEMS",
        "KEEL__SHOP__FEATURED",
    ] {
        let env = EnvMap::new();
        env.set(var, URL);
        let (err, _) = load_err("", &env);
        let text = err.to_string();
        assert!(!text.contains("hunter2"), "{var}: {text}");
        assert!(text.contains(var), "{var}: {text}");
    }
    // A validator that quotes the value it refuses.
    let env = EnvMap::new();
    env.set("KEEL__SHOP__CURRENCY", URL);
    let mut l = ConfigLoader::new().with_env_map(env);
    l.register_with::<Shop>("shop", |s| {
        Err(format!("currency: {:?} is not a currency", s.currency))
    })
    .unwrap();
    let text = l.load().unwrap_err().to_string();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("redis://:***@cache:6379/"), "{text}");
}

#[test]
fn env_variables_with_empty_segments_are_named() {
    for var in ["KEEL____X", "KEEL__SHOP__", "KEEL__SHOP____CURRENCY"] {
        let env = EnvMap::new();
        env.set(var, "1");
        let (err, _) = load_err("", &env);
        assert_eq!(
            err.origins(),
            vec![&Origin::Env { var: var.into() }],
            "{var}: {err}"
        );
    }
}

/// Inputs the loader's path expressions, YAML's loader or aliases would turn into a panic, an
/// abort or gigabytes: each is refused with a reason, and a reload that meets one keeps the
/// configuration in force.
#[test]
fn hostile_keys_and_documents_are_refused_not_loaded() {
    // Variables: an index, a character no variable of ours has, nesting past the bound.
    for (var, says) in [
        (
            "KEEL__SHOP[9223372036854775806]",
            "letters, digits, _, - and .",
        ),
        ("KEEL__NOPE[100000000000]", "letters, digits, _, - and ."),
        ("KEEL__SHOP X", "letters, digits, _, - and ."),
        (&*format!("KEEL__A{}", ".A".repeat(40)), "deeper than 32"),
        (&*format!("KEEL{}", "__A".repeat(3000)), "deeper than 32"),
    ] {
        let env = EnvMap::new();
        env.set(var, "x");
        let (err, _) = load_err("", &env);
        assert!(
            matches!(&err, ConfigError::Invalid { origin: Origin::Env { var: v }, .. } if v == var),
            "{var}: {err:?}"
        );
        assert!(err.to_string().contains(says), "{var}: {err}");
    }
    // A `.` in a variable's name nests, as it always did.
    let env = EnvMap::new();
    env.set("KEEL__SHOP.CURRENCY", "CHF");
    let config = loader(&[], &env).load().unwrap();
    assert_eq!(
        config.section::<Shop>("shop").unwrap().load().currency,
        "CHF"
    );
    // An override in code, likewise.
    let err = loader(&[], &EnvMap::new())
        .with_override("shop.x[100000000000]", 1)
        .load()
        .unwrap_err();
    assert!(
        matches!(
            &err,
            ConfigError::Invalid {
                origin: Origin::Override,
                ..
            }
        ),
        "{err:?}"
    );
    // Deep but within the bound: an unknown key, as before.
    let env = EnvMap::new();
    env.set(format!("KEEL{}", "__A".repeat(32)), "x");
    assert!(matches!(
        load_err("", &env).0,
        ConfigError::UnknownKey { .. }
    ));

    // Files: a top-level key that is an index or nests past the bound.
    let dir = tempfile::tempdir().unwrap();
    let deep_key = vec!["a"; 40].join(".");
    for (name, text) in [
        ("index.toml", "\"x[9223372036854775807]\" = 1\n".to_owned()),
        ("index.json", "{\"x[100000000000]\": 1}".to_owned()),
        ("deep.toml", format!("\"{deep_key}\" = 1\n")),
        ("line.toml", "\"line9.x[0]\" = 1\n".to_owned()),
    ] {
        let f = file(&dir, name, &text);
        let err = loader(std::slice::from_ref(&f), &EnvMap::new())
            .load()
            .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Parse { path, line: None, .. } if path == &f),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains("top-level key"), "{name}: {err}");
    }

    // YAML nested past the bound (2 KB that would exhaust the stack), and aliases of aliases
    // (a few hundred bytes that would expand to billions of values).
    let deep = format!("{}x\n", "- ".repeat(1000));
    let mut laughs = String::from("a0: &a0 [\"lol\"]\n");
    for i in 1..9 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        laughs.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    for (name, text, says) in [
        ("deep.yaml", deep.as_str(), "deeper than 64"),
        ("laughs.yaml", laughs.as_str(), "aliases expanded"),
    ] {
        let f = file(&dir, name, text);
        let err = loader(std::slice::from_ref(&f), &EnvMap::new())
            .load()
            .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Parse { path, line: Some(_), .. } if path == &f),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains(says), "{name}: {err}");
    }
    // An alias or two, as configuration files use them, still load.
    let f = file(
        &dir,
        "anchors.yaml",
        "shop:\n  regions:\n    eu: &r\n      weight: 2\n    us: *r\n",
    );
    let config = loader(std::slice::from_ref(&f), &EnvMap::new())
        .load()
        .unwrap();
    let shop = config.section::<Shop>("shop").unwrap();
    assert_eq!(shop.load().regions.len(), 2);

    // A reload that meets one keeps what is in force, and says why.
    std::fs::write(&f, &deep).unwrap();
    let err = config.reload().unwrap_err();
    assert!(err.to_string().contains("deeper than 64"), "{err}");
    assert_eq!(shop.load().regions.len(), 2);
    assert_eq!(config.generation(), 1);
}

/// Thousands of unknown keys are all reported, the first with their lines (looking a line
/// up reads the whole file: for every key, the refusal took minutes).
#[test]
fn many_unknown_keys_are_all_reported_the_first_with_lines() {
    let mut text: String = (0..2_000).map(|i| format!("k{i:04} = 1\n")).collect();
    text.push_str("[shop]\nmax_items = \"many\"\n");
    let (err, f) = load_err(&text, &EnvMap::new());
    let ConfigError::Many(all) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(all.len(), 2_001);
    // The bad value comes last, and has its line although the unknown keys came first.
    assert!(
        matches!(&all[2_000], ConfigError::Invalid { key, origin: Origin::File { line: Some(2_002), .. }, .. } if key == "shop.max_items"),
        "{:?}",
        all[2_000]
    );
    for (i, e) in all[..2_000].iter().enumerate() {
        let ConfigError::UnknownKey { key, origin } = e else {
            panic!("{e:?}")
        };
        assert_eq!(key, &format!("k{i:04}"));
        // Twenty lines in all: the bad value took one.
        let line = (i < 19).then(|| u32::try_from(i + 1).unwrap());
        assert_eq!(
            origin,
            &Origin::File {
                path: f.clone(),
                line
            },
            "{key}"
        );
    }
}
