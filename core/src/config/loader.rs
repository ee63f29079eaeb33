use std::{
    any::{Any, TypeId},
    collections::{BTreeMap, HashMap},
    fmt,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::SystemTime,
};

use arc_swap::ArcSwapOption;
use config::{FileFormat, Format, Map, Source, Value, ValueKind};
use serde::de::DeserializeOwned;

use super::{
    origin::{line_of, Origin},
    redact::redact_userinfo,
};
use crate::{lock, telemetry, ConfigError, Live, LiveWatch};

const ENV_ORIGIN: &str = "the environment";

/// A value set in code with [`ConfigLoader::with_override`].
#[derive(Debug, Clone, PartialEq)]
pub enum OverrideValue {
    /// A string (durations and ratios are written as strings: `"2s"`, `"20%"`).
    Str(String),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

impl From<&str> for OverrideValue {
    fn from(v: &str) -> Self {
        Self::Str(v.to_owned())
    }
}
impl From<String> for OverrideValue {
    fn from(v: String) -> Self {
        Self::Str(v)
    }
}
impl From<i64> for OverrideValue {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<i32> for OverrideValue {
    fn from(v: i32) -> Self {
        Self::Int(v.into())
    }
}
impl From<u32> for OverrideValue {
    fn from(v: u32) -> Self {
        Self::Int(v.into())
    }
}
impl From<f64> for OverrideValue {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}
impl From<bool> for OverrideValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

impl From<OverrideValue> for ValueKind {
    fn from(v: OverrideValue) -> Self {
        match v {
            OverrideValue::Str(s) => ValueKind::String(s),
            OverrideValue::Int(i) => ValueKind::I64(i),
            OverrideValue::Float(f) => ValueKind::Float(f),
            OverrideValue::Bool(b) => ValueKind::Boolean(b),
        }
    }
}

/// An environment that tests control: a shared map used instead of the process environment.
/// Clones share the map, so a test can change a variable and then reload.
#[derive(Debug, Clone, Default)]
pub struct EnvMap(Arc<Mutex<BTreeMap<String, String>>>);

impl EnvMap {
    /// An empty environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a variable.
    pub fn set(&self, key: impl Into<String>, value: impl Into<String>) {
        lock(&self.0).insert(key.into(), value.into());
    }

    /// Removes a variable.
    pub fn remove(&self, key: &str) {
        lock(&self.0).remove(key);
    }

    fn snapshot(&self) -> BTreeMap<String, String> {
        lock(&self.0).clone()
    }
}

#[derive(Debug, Clone)]
enum EnvSource {
    Process,
    Map(EnvMap),
}

/// A section's validation: `Err(reason)` refuses the whole document.
pub type Validator<T> = Box<dyn Fn(&T) -> Result<(), String> + Send + Sync>;

trait ErasedSection: Send + Sync {
    fn type_id_of(&self) -> TypeId;
    /// Deserializes and validates; the error's key is relative to the section.
    fn parse(&self, value: Value) -> Result<Box<dyn Any + Send>, SectionError>;
    /// Publishes a parsed value; true when it changed.
    fn publish(&self, value: Box<dyn Any + Send>) -> bool;
    fn live(&self) -> Option<&(dyn Any + Send + Sync)>;
}

enum SectionError {
    Config(config::ConfigError),
    Invalid(String),
}

struct Typed<T> {
    live: OnceLock<Live<T>>,
    validate: Option<Validator<T>>,
}

impl<T> ErasedSection for Typed<T>
where
    T: DeserializeOwned + PartialEq + Send + Sync + 'static,
{
    fn type_id_of(&self) -> TypeId {
        TypeId::of::<T>()
    }

    fn parse(&self, value: Value) -> Result<Box<dyn Any + Send>, SectionError> {
        let parsed: T = T::deserialize(value).map_err(SectionError::Config)?;
        if let Some(validate) = &self.validate {
            validate(&parsed).map_err(SectionError::Invalid)?;
        }
        Ok(Box::new(parsed))
    }

    fn publish(&self, value: Box<dyn Any + Send>) -> bool {
        let Ok(value) = value.downcast::<T>() else {
            return false;
        };
        match self.live.get() {
            Some(live) => live.store_if_changed(*value),
            None => {
                let _ = self.live.set(Live::new(*value));
                true
            }
        }
    }

    fn live(&self) -> Option<&(dyn Any + Send + Sync)> {
        self.live.get().map(|l| l as &(dyn Any + Send + Sync))
    }
}

/// Builds the first [`Config`]: which files, which environment, which overrides, which sections.
///
/// ```
/// use keel_core::config::{ConfigLoader, EnvMap, ServiceSection};
/// # fn main() -> Result<(), keel_core::ConfigError> {
/// let env = EnvMap::new();
/// env.set("KEEL__SERVICE__ZONE", "eu-1a");
/// let mut loader = ConfigLoader::new().with_env_map(env);
/// loader.register_with::<ServiceSection>("service", ServiceSection::validate)?;
/// let config = loader.load()?;
/// let service = config.section::<ServiceSection>("service")?;
/// assert_eq!(service.load().zone.as_deref(), Some("eu-1a"));
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct ConfigLoader {
    files: Vec<PathBuf>,
    env_prefix: Option<String>,
    env: EnvSource,
    overrides: Vec<(String, OverrideValue)>,
    sections: BTreeMap<String, Arc<dyn ErasedSection>>,
}

impl Default for ConfigLoader {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ConfigLoader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigLoader")
            .field("files", &self.files)
            .field("env_prefix", &self.env_prefix)
            .field("sections", &self.sections.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ConfigLoader {
    /// No files, the process environment with prefix `KEEL`, no overrides, no sections.
    pub fn new() -> Self {
        Self {
            files: Vec::new(),
            env_prefix: Some("KEEL".to_owned()),
            env: EnvSource::Process,
            overrides: Vec::new(),
            sections: BTreeMap::new(),
        }
    }

    /// Adds a file layer (later files win). The file must exist at load time.
    pub fn with_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.files.push(path.into());
        self
    }

    /// Sets the environment prefix (`KEEL` by default): variables are `PREFIX__SECTION__KEY`.
    pub fn with_env_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.env_prefix = Some(prefix.into());
        self
    }

    /// Ignores the environment.
    pub fn without_env(mut self) -> Self {
        self.env_prefix = None;
        self
    }

    /// Reads the environment from `env` instead of the process (for deterministic tests).
    pub fn with_env_map(mut self, env: EnvMap) -> Self {
        self.env = EnvSource::Map(env);
        self
    }

    /// Sets `key` (a dotted path such as `clients.payments.timeout`, at most 32 levels, no index)
    /// in code; wins over all.
    pub fn with_override(
        mut self,
        key: impl Into<String>,
        value: impl Into<OverrideValue>,
    ) -> Self {
        self.overrides.push((key.into(), value.into()));
        self
    }

    /// Registers a section: the top-level key `name` is deserialized into `T` (serde defaults
    /// apply when it is absent) on every load.
    pub fn register<T>(&mut self, name: &str) -> Result<(), ConfigError>
    where
        T: DeserializeOwned + PartialEq + Send + Sync + 'static,
    {
        self.insert_section::<T>(name, None)
    }

    /// Registers a section with a validation that runs on every load; a document whose section
    /// fails it is refused whole.
    pub fn register_with<T>(
        &mut self,
        name: &str,
        validate: impl Fn(&T) -> Result<(), String> + Send + Sync + 'static,
    ) -> Result<(), ConfigError>
    where
        T: DeserializeOwned + PartialEq + Send + Sync + 'static,
    {
        self.insert_section::<T>(name, Some(Box::new(validate)))
    }

    fn insert_section<T>(
        &mut self,
        name: &str,
        validate: Option<Validator<T>>,
    ) -> Result<(), ConfigError>
    where
        T: DeserializeOwned + PartialEq + Send + Sync + 'static,
    {
        check_section_name(name)?;
        if self.sections.contains_key(name) {
            return Err(ConfigError::Section {
                section: name.to_owned(),
                reason: "is registered twice",
            });
        }
        self.sections.insert(
            name.to_owned(),
            Arc::new(Typed::<T> {
                live: OnceLock::new(),
                validate,
            }),
        );
        Ok(())
    }

    /// Reads every layer and parses every section. Fails if anything is wrong: there is no last
    /// good document yet to fall back on.
    pub fn load(self) -> Result<Config, ConfigError> {
        telemetry::describe();
        let inner = Inner {
            sources: Sources {
                files: self.files,
                env_prefix: self.env_prefix,
                env: self.env,
                overrides: self.overrides,
            },
            sections: RwLock::new(self.sections),
            reload_lock: Mutex::new(Digests::default()),
            document: OnceLock::new(),
            last_error: ArcSwapOption::empty(),
        };
        let config = Config {
            inner: Arc::new(inner),
        };
        match config.reload_inner(true) {
            Ok(_) => Ok(config),
            Err(e) => {
                // Nobody can read `last_error` of a config that never loaded: hand the error over.
                config.inner.last_error.store(None);
                Err(
                    Arc::try_unwrap(e).unwrap_or_else(|shared| ConfigError::Invalid {
                        key: String::new(),
                        origin: Origin::Default,
                        reason: shared.to_string(),
                    }),
                )
            }
        }
    }
}

fn check_section_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && name.as_bytes()[0].is_ascii_lowercase();
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Section {
            section: name.to_owned(),
            reason: "must be lowercase letters, digits and '_', starting with a letter",
        })
    }
}

struct Sources {
    files: Vec<PathBuf>,
    env_prefix: Option<String>,
    env: EnvSource,
    overrides: Vec<(String, OverrideValue)>,
}

/// What one read of every layer produced.
struct Inputs {
    files: Vec<(PathBuf, String)>,
    env: BTreeMap<String, String>,
    /// Variables with the prefix whose name or value is not UTF-8 (names made lossy): refused.
    env_not_utf8: Vec<String>,
    digest: u64,
}

impl Sources {
    fn read(&self) -> Result<Inputs, ConfigError> {
        let mut files = Vec::with_capacity(self.files.len());
        for path in &self.files {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                path: path.clone(),
                source,
            })?;
            files.push((path.clone(), text));
        }
        let mut env_not_utf8 = Vec::new();
        let env = match &self.env_prefix {
            None => BTreeMap::new(),
            Some(prefix) => {
                let wanted = format!("{}__", prefix.to_ascii_lowercase());
                let ours = |k: &str| k.to_ascii_lowercase().starts_with(&wanted);
                let all: BTreeMap<String, String> = match &self.env {
                    EnvSource::Process => std::env::vars_os()
                        .filter_map(|(k, v)| match (k.into_string(), v.into_string()) {
                            (Ok(k), Ok(v)) => Some((k, v)),
                            (k, _) => {
                                let k = k.unwrap_or_else(|k| k.to_string_lossy().into_owned());
                                if ours(&k) {
                                    env_not_utf8.push(k);
                                }
                                None
                            }
                        })
                        .collect(),
                    EnvSource::Map(m) => m.snapshot(),
                };
                all.into_iter().filter(|(k, _)| ours(k)).collect()
            }
        };
        env_not_utf8.sort();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        files.hash(&mut h);
        env.hash(&mut h);
        env_not_utf8.hash(&mut h);
        Ok(Inputs {
            files,
            env,
            env_not_utf8,
            digest: h.finish(),
        })
    }

    fn build(&self, inputs: &Inputs) -> Result<config::Config, ConfigError> {
        let prefix_len = self.env_prefix_lower().len();
        let mut refused: Vec<ConfigError> = inputs
            .env_not_utf8
            .iter()
            .map(|var| (var, "is not valid UTF-8".to_owned()))
            .chain(inputs.env.keys().filter_map(|var| {
                key_path_problem(var.get(prefix_len..).unwrap_or_default(), "__")
                    .map(|reason| (var, format!("the variable's name {reason}")))
            }))
            .map(|(var, reason)| ConfigError::Invalid {
                key: self.key_of_env_var(var),
                origin: Origin::Env { var: var.clone() },
                reason,
            })
            .collect();
        match refused.len() {
            0 => {}
            1 => return Err(refused.remove(0)),
            _ => return Err(ConfigError::Many(refused)),
        }
        let mut builder = config::Config::builder();
        for (path, text) in &inputs.files {
            builder = builder.add_source(TextSource::new(path, text)?);
        }
        if let Some(prefix) = &self.env_prefix {
            let map: HashMap<String, String> = inputs.env.clone().into_iter().collect();
            builder = builder.add_source(
                config::Environment::with_prefix(prefix)
                    .prefix_separator("__")
                    .separator("__")
                    .source(Some(map)),
            );
        }
        for (key, value) in &self.overrides {
            if let Some(reason) = key_path_problem(key, ".") {
                return Err(ConfigError::Invalid {
                    key: key.clone(),
                    origin: Origin::Override,
                    reason: format!("the key {reason}"),
                });
            }
            builder = builder
                .set_override(key.as_str(), ValueKind::from(value.clone()))
                .map_err(|e| ConfigError::Invalid {
                    key: key.clone(),
                    origin: Origin::Override,
                    reason: e.to_string(),
                })?;
        }
        builder.build().map_err(|e| match e {
            config::ConfigError::FileParse { uri, cause } => {
                let path = PathBuf::from(uri.unwrap_or_default());
                match cause.downcast::<KeyRefused>() {
                    Ok(refused) => ConfigError::Parse {
                        path,
                        line: None,
                        message: refused.0,
                    },
                    Err(cause) => parse_error(path, cause.to_string()),
                }
            }
            other => ConfigError::Invalid {
                key: String::new(),
                origin: Origin::Default,
                reason: other.to_string(),
            },
        })
    }

    /// The variables' prefix with its separator, lower-case: `keel__`.
    fn env_prefix_lower(&self) -> String {
        format!(
            "{}__",
            self.env_prefix
                .as_deref()
                .unwrap_or_default()
                .to_ascii_lowercase()
        )
    }

    /// The key path a variable's name maps to: `KEEL__SHOP__CURRENCY` is `shop.currency`.
    fn key_of_env_var(&self, var: &str) -> String {
        let lower = var.to_ascii_lowercase();
        let prefix = self.env_prefix_lower();
        lower
            .strip_prefix(&prefix)
            .unwrap_or(&lower)
            .replace("__", ".")
    }
}

fn parse_error(path: PathBuf, message: String) -> ConfigError {
    let line = message.split("line").nth(1).and_then(|rest| {
        rest.trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    });
    // The parser's own words, without the excerpt of the file some parsers quote (`3 | key =
    // ...` and a caret line under it): that is where, which `line` says, and it could show a
    // secret on `/keel/status`. What remains is the position and the reason.
    let is_excerpt = |l: &str| {
        l.trim_start()
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start()
            .starts_with('|')
    };
    let message = message
        .lines()
        .filter(|l| !is_excerpt(l))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    ConfigError::Parse {
        path,
        line,
        message,
    }
}

/// A file's text, parsed by format with the file's path as the origin of every value.
#[derive(Debug, Clone)]
struct TextSource {
    uri: String,
    format: FileFormat,
    text: String,
}

impl TextSource {
    fn new(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let format = match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
        {
            Some(e) if e == "toml" => FileFormat::Toml,
            Some(e) if e == "json" => FileFormat::Json,
            Some(e) if e == "yaml" || e == "yml" => FileFormat::Yaml,
            _ => {
                return Err(ConfigError::UnsupportedFormat {
                    path: path.to_owned(),
                })
            }
        };
        if format == FileFormat::Yaml {
            check_yaml(text).map_err(|(line, message)| ConfigError::Parse {
                path: path.to_owned(),
                line,
                message,
            })?;
        }
        Ok(Self {
            uri: path.display().to_string(),
            format,
            text: text.to_owned(),
        })
    }
}

/// Most segments a key path may have: a file's top-level key (`a.b.c`) or a variable's name
/// (`KEEL__A__B__C`). Both are read as paths, and a deeper one is cloned by recursion.
const MAX_KEY_SEGMENTS: usize = 32;

/// Why a key path read from a file's top level (segments split by `.`) or a variable's name
/// (split by `__`) is refused, if it is: the loader reads both as path expressions, where
/// `[n]` would grow an array to index `n` (a capacity overflow or an allocation of terabytes).
fn key_path_problem(path: &str, separator: &str) -> Option<String> {
    if separator == "__"
        && !path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Some("may hold only letters, digits, _, - and .".to_owned());
    }
    if path.contains(['[', ']']) {
        return Some("may not hold [ or ] (an index)".to_owned());
    }
    // A variable's `.` nests too (`KEEL__SHOP.CURRENCY` is `shop.currency`).
    let segments: usize = path.split(separator).map(|s| s.split('.').count()).sum();
    if segments > MAX_KEY_SEGMENTS {
        return Some(format!("nests deeper than {MAX_KEY_SEGMENTS} levels"));
    }
    None
}

/// A file's top-level key that [`key_path_problem`] refuses, carried through `config`'s error
/// as itself (not as text, which would be searched for a line number).
#[derive(Debug)]
struct KeyRefused(String);

impl fmt::Display for KeyRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyRefused {}

/// Deepest nesting of a YAML file: its loader recurses once per level, and a 2 KB file of
/// nested `- ` would exhaust a thread's stack.
const MAX_YAML_DEPTH: usize = 64;
/// Most nodes (keys, values and collections) a YAML file may hold, its aliases (`*name`)
/// expanded: a few aliases of aliases make a file of a few hundred bytes expand to billions
/// ("billion laughs").
const MAX_YAML_NODES: u64 = 100_000;

/// Refuses a YAML document nested deeper than [`MAX_YAML_DEPTH`] or holding more than
/// [`MAX_YAML_NODES`] nodes once its aliases are expanded, before it is loaded: a pass over
/// the parser's events, which neither recurses nor expands anything. A syntax error is left
/// to the loader, which reports it with its own message. `Err((line, message))`.
///
/// Anchors are not forgotten between documents as the loader forgets them; that changes
/// nothing, since the parser never gives two anchors one id (and `config` takes one document).
fn check_yaml(text: &str) -> Result<(), (Option<u32>, String)> {
    use yaml_rust2::parser::{Event, Parser};
    let mut parser = Parser::new_from_str(text);
    let mut nodes: u64 = 0;
    // The expanded size of each anchor, and the collections open (anchor, nodes before it).
    let mut sizes: HashMap<usize, u64> = HashMap::new();
    let mut open: Vec<(usize, u64)> = Vec::new();
    loop {
        let Ok((event, mark)) = parser.next_token() else {
            return Ok(());
        };
        let line = u32::try_from(mark.line()).ok();
        match event {
            Event::StreamEnd => return Ok(()),
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                open.push((anchor, nodes));
                nodes += 1;
                if open.len() > MAX_YAML_DEPTH {
                    return Err((line, format!("nests deeper than {MAX_YAML_DEPTH} levels")));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, before)) = open.pop() {
                    if anchor != 0 {
                        sizes.insert(anchor, nodes - before);
                    }
                }
            }
            Event::Scalar(_, _, anchor, _) => {
                nodes += 1;
                if anchor != 0 {
                    sizes.insert(anchor, 1);
                }
            }
            Event::Alias(anchor) => {
                nodes = nodes.saturating_add(sizes.get(&anchor).copied().unwrap_or(1));
            }
            _ => {}
        }
        if nodes > MAX_YAML_NODES {
            return Err((
                line,
                format!(
                    "holds more than {MAX_YAML_NODES} nodes (keys, values and collections), its aliases expanded"
                ),
            ));
        }
    }
}

impl Source for TextSource {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        let map = self
            .format
            .parse(Some(&self.uri), &self.text)
            .map_err(|cause| config::ConfigError::FileParse {
                uri: Some(self.uri.clone()),
                cause,
            })?;
        // Its top-level keys are read as paths: see `key_path_problem`. The first refused, in
        // key order, so that the same file is refused with the same reason.
        if let Some((key, reason)) = map
            .keys()
            .filter_map(|k| key_path_problem(k, ".").map(|r| (k, r)))
            .min()
        {
            return Err(config::ConfigError::FileParse {
                uri: Some(self.uri.clone()),
                cause: Box::new(KeyRefused(format!("top-level key {key:?} {reason}"))),
            });
        }
        Ok(map)
    }
}

/// The last refused reload: when, and why.
#[derive(Debug)]
pub struct ReloadFailure {
    /// Why the document was refused (the same error the reload returned).
    pub error: Arc<ConfigError>,
    /// When.
    pub at: SystemTime,
}

/// What a successful [`Config::reload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new document is in force; this is its generation.
    Applied(u64),
    /// The document read was the same as the one in force; nothing was published.
    Unchanged,
}

/// What the document in force looks like, for the admin endpoint.
#[derive(Debug, Clone, PartialEq)]
struct Document {
    effective: serde_json::Value,
    digest: u64,
}

/// Digests of the layers' inputs (files and environment), kept by the reload lock.
#[derive(Default)]
struct Digests {
    /// The inputs last applied: a poll that reads them again has nothing to do.
    applied: Option<u64>,
    /// The inputs last refused: a poll that reads them again refuses them quietly, instead of
    /// logging and counting the same refusal every poll until the file is fixed.
    rejected: Option<u64>,
    /// The inputs this reload read, once read.
    read: Option<u64>,
}

struct Inner {
    sources: Sources,
    sections: RwLock<BTreeMap<String, Arc<dyn ErasedSection>>>,
    /// Serialises reloads; holds the digests of the inputs last applied and last refused.
    reload_lock: Mutex<Digests>,
    document: OnceLock<Live<Document>>,
    last_error: ArcSwapOption<ReloadFailure>,
}

/// The configuration in force, and the means to reload it. Cheap to clone.
///
/// Get a section's live handle once with [`Config::section`], then `load()` it per call.
#[derive(Clone)]
pub struct Config {
    inner: Arc<Inner>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("generation", &self.generation())
            .field("files", &self.inner.sources.files)
            .finish()
    }
}

impl Config {
    /// The live handle of section `name`, registered with type `T`.
    pub fn section<T>(&self, name: &str) -> Result<Live<T>, ConfigError>
    where
        T: Send + Sync + 'static,
    {
        let sections = self
            .inner
            .sections
            .read()
            .map_err(|_| ConfigError::Section {
                section: name.to_owned(),
                reason: "registry is poisoned",
            })?;
        let Some(section) = sections.get(name) else {
            return Err(ConfigError::Section {
                section: name.to_owned(),
                reason: "is not registered",
            });
        };
        if section.type_id_of() != TypeId::of::<T>() {
            return Err(ConfigError::SectionType {
                section: name.to_owned(),
            });
        }
        section
            .live()
            .and_then(|any| any.downcast_ref::<Live<T>>())
            .cloned()
            .ok_or_else(|| ConfigError::SectionType {
                section: name.to_owned(),
            })
    }

    /// Registers a section after the first load. The document in force must already be valid
    /// for it (an absent section takes `T`'s serde defaults); from then on every reload checks it.
    pub fn register<T>(
        &self,
        name: &str,
        validate: Option<Validator<T>>,
    ) -> Result<Live<T>, ConfigError>
    where
        T: DeserializeOwned + PartialEq + Send + Sync + 'static,
    {
        check_section_name(name)?;
        let mut guard = lock(&self.inner.reload_lock);
        // A new section changes what a refused document is refused for: report it again.
        guard.rejected = None;
        {
            let sections = self
                .inner
                .sections
                .read()
                .map_err(|_| ConfigError::Section {
                    section: name.to_owned(),
                    reason: "registry is poisoned",
                })?;
            if sections.contains_key(name) {
                return Err(ConfigError::Section {
                    section: name.to_owned(),
                    reason: "is registered twice",
                });
            }
        }
        let typed: Arc<Typed<T>> = Arc::new(Typed {
            live: OnceLock::new(),
            validate,
        });
        let inputs = self.inner.sources.read()?;
        let merged = self.inner.sources.build(&inputs)?;
        let value = top_level(&merged)?.remove(name).unwrap_or_else(empty_table);
        let parsed = typed.parse(value).map_err(|e| {
            self.section_error(&Report::new(&merged, &self.inner.sources, &inputs), name, e)
        })?;
        typed.publish(parsed);
        let live = typed
            .live
            .get()
            .cloned()
            .ok_or_else(|| ConfigError::SectionType {
                section: name.to_owned(),
            })?;
        if let Ok(mut sections) = self.inner.sections.write() {
            sections.insert(name.to_owned(), typed);
        }
        Ok(live)
    }

    /// The generation of the document in force: 1 after the first load, +1 per applied reload.
    pub fn generation(&self) -> u64 {
        self.inner.document.get().map_or(0, |d| d.generation() + 1)
    }

    /// Tells each time a new document is applied.
    pub fn subscribe(&self) -> Option<LiveWatch> {
        self.inner.document.get().map(Live::subscribe)
    }

    /// The last refused reload, if the most recent reload was refused.
    pub fn last_error(&self) -> Option<Arc<ReloadFailure>> {
        self.inner.last_error.load_full()
    }

    /// The document in force as JSON (every layer merged; defaults of absent keys not shown).
    pub fn effective(&self) -> serde_json::Value {
        self.inner
            .document
            .get()
            .map_or(serde_json::Value::Null, |d| d.load().effective.clone())
    }

    /// The files this configuration reads, in layer order.
    pub fn files(&self) -> &[PathBuf] {
        &self.inner.sources.files
    }

    /// Reads every layer again and applies the result if all of it is valid.
    ///
    /// On error nothing changes: the last good document stays in force, and the error is
    /// returned, logged, counted and kept for [`Config::last_error`].
    pub fn reload(&self) -> Result<ReloadOutcome, Arc<ConfigError>> {
        self.reload_inner(true)
    }

    /// Like [`Config::reload`], but does nothing when the files and environment read are
    /// byte-for-byte what was last applied (cheap enough to poll).
    pub fn reload_if_changed(&self) -> Result<ReloadOutcome, Arc<ConfigError>> {
        self.reload_inner(false)
    }

    fn reload_inner(&self, force: bool) -> Result<ReloadOutcome, Arc<ConfigError>> {
        let mut guard = lock(&self.inner.reload_lock);
        let digests = &mut *guard;
        digests.read = None;
        let result = self.try_reload(force, &mut digests.applied, &mut digests.read);
        let read = digests.read;
        let rejected = std::mem::replace(
            &mut digests.rejected,
            if result.is_err() { read } else { None },
        );
        if !force && result.is_err() && read.is_some() && rejected == read {
            // The same inputs refused again by a poll: said, counted and kept already.
            return result;
        }
        match &result {
            Ok(ReloadOutcome::Applied(generation)) => {
                self.inner.last_error.store(None);
                metrics::counter!(telemetry::CONFIG_RELOADS_TOTAL, telemetry::LABEL_OUTCOME => "applied")
                    .increment(1);
                metrics::gauge!(telemetry::CONFIG_GENERATION).set(*generation as f64);
                metrics::gauge!(telemetry::CONFIG_LAST_RELOAD_FAILED).set(0.0);
                tracing::info!(generation, "configuration applied");
            }
            Ok(ReloadOutcome::Unchanged) => {
                self.inner.last_error.store(None);
                metrics::gauge!(telemetry::CONFIG_LAST_RELOAD_FAILED).set(0.0);
                metrics::counter!(telemetry::CONFIG_RELOADS_TOTAL, telemetry::LABEL_OUTCOME => "unchanged")
                    .increment(1);
            }
            Err(error) => {
                metrics::counter!(telemetry::CONFIG_RELOADS_TOTAL, telemetry::LABEL_OUTCOME => "rejected")
                    .increment(1);
                metrics::gauge!(telemetry::CONFIG_LAST_RELOAD_FAILED).set(1.0);
                tracing::warn!(%error, generation = self.generation(), "configuration refused; the last good one stays");
                self.inner.last_error.store(Some(Arc::new(ReloadFailure {
                    error: error.clone(),
                    at: SystemTime::now(),
                })));
            }
        }
        result
    }

    fn try_reload(
        &self,
        force: bool,
        applied_digest: &mut Option<u64>,
        read_digest: &mut Option<u64>,
    ) -> Result<ReloadOutcome, Arc<ConfigError>> {
        let sources = &self.inner.sources;
        let inputs = sources.read().map_err(Arc::new)?;
        *read_digest = Some(inputs.digest);
        if !force && *applied_digest == Some(inputs.digest) {
            return Ok(ReloadOutcome::Unchanged);
        }
        let merged = sources.build(&inputs).map_err(Arc::new)?;
        let mut top = top_level(&merged).map_err(Arc::new)?;
        let sections = self
            .inner
            .sections
            .read()
            .map_err(|_| Arc::new(ConfigError::Many(Vec::new())))?;

        let report = Report::new(&merged, sources, &inputs);
        // In order, so that the same document is refused with the same report.
        let mut unknown: Vec<String> = top
            .keys()
            .filter(|k| !sections.contains_key(*k))
            .cloned()
            .collect();
        unknown.sort();
        // The sections' errors first, so that they take the lines looked up (there are few of
        // them, and a bad value is the error most worth its line); reported after the unknown
        // keys.
        let mut section_errors = Vec::new();
        let mut parsed = Vec::with_capacity(sections.len());
        for (name, section) in sections.iter() {
            let value = top.remove(name).unwrap_or_else(empty_table);
            match section.parse(value) {
                Ok(v) => parsed.push((section.clone(), v)),
                Err(e) => section_errors.push(self.section_error(&report, name, e)),
            }
        }
        drop(sections);
        let mut errors: Vec<ConfigError> = unknown
            .into_iter()
            .map(|key| ConfigError::UnknownKey {
                origin: report.origin_of(&key),
                key,
            })
            .collect();
        errors.append(&mut section_errors);
        if !errors.is_empty() {
            return Err(Arc::new(if errors.len() == 1 {
                errors.remove(0)
            } else {
                ConfigError::Many(errors)
            }));
        }

        let effective = merged
            .try_deserialize::<serde_json::Value>()
            .unwrap_or(serde_json::Value::Null);
        let document = Document {
            effective,
            digest: inputs.digest,
        };
        *applied_digest = Some(inputs.digest);
        let mut changed = false;
        for (section, value) in parsed {
            changed |= section.publish(value);
        }
        match self.inner.document.get() {
            None => {
                let _ = self.inner.document.set(Live::new(document));
                Ok(ReloadOutcome::Applied(1))
            }
            Some(live) => {
                let raw_changed = live.load().effective != document.effective;
                if changed || raw_changed {
                    live.store(document);
                    Ok(ReloadOutcome::Applied(live.generation() + 1))
                } else {
                    Ok(ReloadOutcome::Unchanged)
                }
            }
        }
    }

    fn section_error(&self, report: &Report<'_>, name: &str, error: SectionError) -> ConfigError {
        match error {
            SectionError::Invalid(reason) => {
                // A validator may name the key inside its section: "timeout.per_try: ...".
                let (key, reason) = match split_key_prefix(&reason) {
                    Some((path, rest)) => (format!("{name}.{path}"), rest.to_owned()),
                    None => (name.to_owned(), reason),
                };
                let reason = redact_userinfo(&reason).into_owned();
                ConfigError::Invalid {
                    origin: report.origin_of(&key),
                    key,
                    reason,
                }
            }
            SectionError::Config(e) => {
                let (rel_key, reason) = flatten(e);
                let reason = redact_userinfo(&unquote_strings(&reason)).into_owned();
                let mut key = match rel_key {
                    Some(k) if !k.is_empty() => {
                        if k.starts_with('[') {
                            format!("{name}{k}")
                        } else {
                            format!("{name}.{k}")
                        }
                    }
                    _ => name.to_owned(),
                };
                if let Some(field) = unknown_field(&reason) {
                    key = format!("{key}.{field}");
                    return ConfigError::UnknownKey {
                        origin: report.origin_of(&key),
                        key,
                    };
                }
                ConfigError::Invalid {
                    origin: report.origin_of(&key),
                    key,
                    reason,
                }
            }
        }
    }
}

fn empty_table() -> Value {
    Value::new(None, Map::<String, Value>::new())
}

/// The origin of the first value inside a table that has one (depth first, keys sorted).
fn first_origin(v: &Value) -> Option<String> {
    match &v.kind {
        ValueKind::Table(t) => {
            let mut keys: Vec<&String> = t.keys().collect();
            keys.sort();
            keys.into_iter().find_map(|k| {
                let child = &t[k];
                child
                    .origin()
                    .map(str::to_owned)
                    .or_else(|| first_origin(child))
            })
        }
        ValueKind::Array(a) => a
            .iter()
            .find_map(|c| c.origin().map(str::to_owned).or_else(|| first_origin(c))),
        _ => None,
    }
}

/// The value at a dotted path, with its origin (deserializing a `Value` would lose it).
fn lookup<'t>(mut table: &'t Map<String, Value>, key: &str) -> Option<&'t Value> {
    let mut segments = key.split('.').peekable();
    while let Some(seg) = segments.next() {
        let value = table.get(seg)?;
        if segments.peek().is_none() {
            return Some(value);
        }
        table = match &value.kind {
            ValueKind::Table(t) => t,
            _ => return None,
        };
    }
    None
}

/// Most errors of one document whose line is looked up (each looks through a whole file).
const MAX_LINED: usize = 20;

/// The merged document as the errors of one reload read it: its values collected once, not once
/// per error, and the lines of the first [`MAX_LINED`] errors looked up, so a file of thousands
/// of unknown keys is refused in time linear in its size.
struct Report<'a> {
    merged: &'a config::Config,
    table: std::cell::OnceCell<Map<String, Value>>,
    lined: std::cell::Cell<usize>,
    sources: &'a Sources,
    inputs: &'a Inputs,
    /// The variables by the key they spell (`shop__currency`), made once.
    env: std::cell::OnceCell<HashMap<String, String>>,
}

impl<'a> Report<'a> {
    fn new(merged: &'a config::Config, sources: &'a Sources, inputs: &'a Inputs) -> Self {
        Self {
            merged,
            table: std::cell::OnceCell::new(),
            lined: std::cell::Cell::new(0),
            sources,
            inputs,
            env: std::cell::OnceCell::new(),
        }
    }

    fn table(&self) -> &Map<String, Value> {
        self.table
            .get_or_init(|| self.merged.collect().unwrap_or_default())
    }

    /// Where `key`'s value came from: a file (and its line, for the first errors), a variable,
    /// an override in code, or the defaults.
    fn origin_of(&self, key: &str) -> Origin {
        // Walk up the path until a value is found: an unknown nested key's own value may be
        // the thing being looked for, or only its parent table may carry an origin.
        let mut probe = key.to_owned();
        loop {
            if let Some(v) = lookup(self.table(), &probe) {
                // A table may carry no origin of its own: take the first of its values' that does.
                let origin = v.origin().map(str::to_owned).or_else(|| first_origin(v));
                return match origin.as_deref() {
                    Some(ENV_ORIGIN) => Origin::Env {
                        var: self.env_var_for(&probe),
                    },
                    Some(uri) => {
                        let path = PathBuf::from(uri);
                        let line = self
                            .inputs
                            .files
                            .iter()
                            .find(|(p, _)| p == &path)
                            .filter(|_| self.may_look_up_a_line())
                            .and_then(|(_, text)| line_of(text, &probe));
                        Origin::File { path, line }
                    }
                    None if self
                        .sources
                        .overrides
                        .iter()
                        .any(|(k, _)| k.starts_with(&probe)) =>
                    {
                        Origin::Override
                    }
                    None => Origin::Default,
                };
            }
            match probe.rfind('.') {
                Some(i) => probe.truncate(i),
                // Not in the document as a path (`KEEL____X` is the key `.x`, `KEEL__SHOP__`
                // is `shop.`): the variable that spells it, if one does.
                None => {
                    return match self.env_var(key) {
                        Some(var) => Origin::Env { var },
                        None => Origin::Default,
                    }
                }
            }
        }
    }

    /// The variable that sets `key`: the one given, else its name as spelled by the prefix.
    fn env_var_for(&self, key: &str) -> String {
        self.env_var(key).unwrap_or_else(|| {
            let prefix = self.sources.env_prefix.clone().unwrap_or_default();
            format!("{prefix}__{}", key.replace('.', "__").to_ascii_uppercase())
        })
    }

    /// The variable whose name maps to `key`, if any.
    fn env_var(&self, key: &str) -> Option<String> {
        let env = self.env.get_or_init(|| {
            let prefix = self.sources.env_prefix_lower();
            let mut env = HashMap::new();
            // In name order, the first variable of a spelling wins.
            for var in self.inputs.env.keys() {
                if let Some(spelled) = var.to_ascii_lowercase().strip_prefix(&prefix) {
                    env.entry(spelled.to_owned()).or_insert_with(|| var.clone());
                }
            }
            env
        });
        env.get(&key.replace('.', "__").to_ascii_lowercase())
            .cloned()
    }

    /// Whether this error may look its line up.
    fn may_look_up_a_line(&self) -> bool {
        let n = self.lined.get();
        self.lined.set(n + 1);
        n < MAX_LINED
    }
}

fn top_level(merged: &config::Config) -> Result<Map<String, Value>, ConfigError> {
    merged.collect().map_err(|e| ConfigError::Invalid {
        key: String::new(),
        origin: Origin::Default,
        reason: e.to_string(),
    })
}

/// Unwraps config's error chain into (key relative to the section, reason).
fn flatten(e: config::ConfigError) -> (Option<String>, String) {
    match e {
        config::ConfigError::At { error, key, .. } => {
            let (inner_key, reason) = flatten(*error);
            (key.or(inner_key), reason)
        }
        config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => (key, format!("expected {expected}, found {unexpected}")),
        config::ConfigError::Message(m) => (None, m),
        config::ConfigError::NotFound(k) => (Some(k), "missing".to_owned()),
        other => (None, other.to_string()),
    }
}

/// A type error without the string it found, which may be a secret set at the wrong key (a URL
/// with its password, a token): serde's `invalid type: string "…", expected …` (and `invalid
/// value: …`) and config's `expected …, found string "…"` say `a string` instead.
fn unquote_strings(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut rest = reason;
    while let Some(i) = [
        "invalid type: string \"",
        "invalid value: string \"",
        "found string \"",
    ]
    .iter()
    .filter_map(|p| rest.find(p).map(|i| i + p.len()))
    .min()
    {
        // `i` is just past the opening quote; the literal is `Debug`-escaped.
        let opening = i - "string \"".len();
        out.push_str(&rest[..opening]);
        out.push_str("a string");
        let mut escaped = false;
        let mut close = rest.len();
        for (j, c) in rest[i..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    close = i + j + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// `"a.b[2].c: reason"` → `("a.b[2].c", "reason")`, when the text before `": "` looks like a
/// key path.
fn split_key_prefix(reason: &str) -> Option<(&str, &str)> {
    let (path, rest) = reason.split_once(": ")?;
    let looks_like_path = !path.is_empty()
        && path.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'_' | b'.' | b'-' | b'[' | b']')
        })
        && !path.starts_with('.')
        && !path.ends_with('.');
    looks_like_path.then_some((path, rest))
}

fn unknown_field(reason: &str) -> Option<&str> {
    let rest = reason.strip_prefix("unknown field `")?;
    rest.split('`').next()
}
