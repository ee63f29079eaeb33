//! etcd (3.4 and later) through its JSON gRPC gateway, with `reqwest`.
//!
//! Why the gateway and not a gRPC client: it needs no `protoc` or generated code, works with every
//! etcd since 3.4 (`/v3/...` paths), and the few calls discovery needs (range, put, delete, lease
//! grant/keepalive/revoke, and the watch stream) map one to one.
//!
//! ## Key layout (interoperable with etcd's Go `naming/endpoints`)
//!
//! `{prefix}/{service}/{addr}` → `{"Op":0,"Addr":"127.0.0.1:8066","Metadata":{...}}`
//!
//! `{prefix}/{service}` is the Go endpoints manager's *target*: a Go gRPC client resolving
//! `etcd:///{prefix}/{service}` sees keel instances, and keel sees instances registered by Go
//! (`Metadata` may then be anything; such an instance gets weight 1 and id `{service}-{addr}`).
//! keel writes the whole [`Instance`] (weight, zone, version, tags, state, params) as `Metadata`.
//! Each record is attached to a lease of `ttl` (at least etcd's minimum, 2 s) kept alive every
//! `ttl / 3`; a lease found gone is granted again and the record rewritten.
//!
//! Watchers read the whole prefix at revision R, then watch from R+1, so nothing between the read
//! and the watch is lost; when the watch is cancelled because R was compacted away, or breaks,
//! they re-read everything.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use futures_util::StreamExt;
use keel_core::{Instance, ServiceName, Shutdown};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    publish::{Publisher, SafetyOptions},
    registration::{Beat, Lease},
    BoxFuture, Discover, Discovery, DiscoveryConfig, DiscoveryError, InstanceWatch, Registration,
    Registry,
};

const BACKEND: &str = "etcd";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest watch message read (one JSON line of the stream): past it, the stream is dropped as
/// broken rather than buffered without end.
const MAX_WATCH_LINE: usize = 32 * 1024 * 1024;

/// The value stored under each key (Go's `naming/endpoints` update).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    #[serde(rename = "Op", default)]
    op: u8,
    #[serde(rename = "Addr")]
    addr: String,
    #[serde(rename = "Metadata", default)]
    metadata: Value,
}

fn unavailable(e: impl std::fmt::Display) -> DiscoveryError {
    DiscoveryError::unavailable(BACKEND, e)
}

/// The end of the range of keys starting with `prefix` (etcd's `WithPrefix`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// Parses one stored value into an instance of `service`; `None` (logged, counted) if malformed.
fn parse_record(service: &ServiceName, key: &str, value: &[u8]) -> Option<Instance> {
    let parsed = (|| -> Result<Instance, String> {
        let rec: Record = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        if rec.op != 0 {
            return Err(format!("Op {} is not an addition", rec.op));
        }
        let addr = rec
            .addr
            .parse()
            .map_err(|_| format!("Addr {:?} is not ip:port", rec.addr))?;
        let instance = match serde_json::from_value::<Instance>(rec.metadata) {
            Ok(mut i) => {
                i.addr = addr;
                i
            }
            // Registered by someone else (Go's endpoints manager): metadata is theirs.
            Err(_) => Instance::new(service.clone(), addr),
        };
        Ok(instance)
    })();
    crate::publish::accept_record(service, BACKEND, key, parsed)
}

struct Inner {
    http: reqwest::Client,
    endpoint: String,
    prefix: String,
    ttl: Duration,
    resync: Duration,
    safety: SafetyOptions,
    shutdown: Shutdown,
    publishers: crate::publish::Publishers,
}

impl Inner {
    async fn call(&self, path: &str, body: Value) -> Result<Value, DiscoveryError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.endpoint))
            .timeout(REQUEST_TIMEOUT)
            .json(&body)
            .send()
            .await
            .map_err(unavailable)?;
        let status = resp.status();
        let v: Value = resp.json().await.map_err(unavailable)?;
        if !status.is_success() || v.get("error").is_some() {
            return Err(unavailable(format!("{path}: {status} {v}")));
        }
        Ok(v)
    }

    fn service_prefix(&self, service: &ServiceName) -> String {
        format!("{}/{service}/", self.prefix)
    }
}

/// Discovery and registry on etcd 3.4+, through its JSON gateway (`/v3/kv/range`, `/v3/kv/put`,
/// `/v3/lease/grant`, `/v3/lease/keepalive`, `/v3/watch`; keys base64-encoded).
///
/// Key layout, interoperable with etcd's Go `naming/endpoints` (target `{prefix}/{service}`):
///
/// `{prefix}/{service}/{addr}` → `{"Op":0,"Addr":"127.0.0.1:8066","Metadata":{...the Instance...}}`
///
/// Records live on a lease of `ttl` (at least 2 s, etcd's minimum) kept alive every `ttl / 3`; a
/// lease found gone is granted again and the record rewritten. Records written by Go (any
/// `Metadata`) become instances with weight 1 and id `{service}-{addr}`. Watchers read the prefix
/// at revision R, watch from R+1, resume from the last revision seen after a break, and re-read
/// everything when the server says that revision was compacted.
#[derive(Clone)]
pub struct EtcdDiscovery {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDiscovery")
            .field("endpoint", &self.inner.endpoint)
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

impl EtcdDiscovery {
    /// A backend on `cfg.url` (`http://127.0.0.1:2379`) with `cfg.prefix`, `cfg.ttl` (at least
    /// 2 s) and `cfg.resync`. It does not fail when etcd is down.
    pub fn from_config(cfg: &DiscoveryConfig, shutdown: Shutdown) -> Result<Self, DiscoveryError> {
        let endpoint = cfg
            .url
            .as_deref()
            .unwrap_or("http://127.0.0.1:2379")
            .trim_end_matches('/')
            .to_owned();
        if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
            return Err(DiscoveryError::Config(format!(
                "discovery.url {:?} must be http://host:port for etcd",
                keel_core::config::redact_userinfo(&endpoint)
            )));
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(1))
            .build()
            .map_err(|e| DiscoveryError::Config(format!("http client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                endpoint,
                prefix: cfg.prefix.trim_end_matches('/').to_owned(),
                ttl: cfg.ttl.max(Duration::from_secs(2)),
                resync: cfg.resync,
                safety: crate::setup::safety(cfg),
                shutdown,
                publishers: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// The key an instance is stored under.
    pub fn key_of(&self, instance: &Instance) -> String {
        format!(
            "{}{}",
            self.inner.service_prefix(&instance.service),
            instance.addr
        )
    }
}

impl Discover for EtcdDiscovery {
    fn watch(&self, service: &ServiceName) -> Result<InstanceWatch, DiscoveryError> {
        let inner = self.inner.clone();
        crate::publish::watch_or_spawn(
            &self.inner.publishers,
            service,
            &self.inner.safety,
            BACKEND,
            move |p| watcher(inner, p),
        )
    }
}

impl Registry for EtcdDiscovery {
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        let lease = Arc::new(EtcdLease {
            inner: self.inner.clone(),
            key: self.key_of(&instance),
            lease: Mutex::new(None),
        });
        Box::pin(Registration::start(lease, instance))
    }
}

impl Discovery for EtcdDiscovery {
    fn backend(&self) -> &'static str {
        BACKEND
    }
}

struct EtcdLease {
    inner: Arc<Inner>,
    key: String,
    lease: Mutex<Option<String>>,
}

impl EtcdLease {
    fn lease_id(&self) -> Option<String> {
        keel_core::lock(&self.lease).clone()
    }

    fn set_lease(&self, id: Option<String>) {
        *keel_core::lock(&self.lease) = id;
    }

    async fn write(&self, instance: &Instance, lease: &str) -> Result<(), DiscoveryError> {
        let value = serde_json::to_vec(&Record {
            op: 0,
            addr: instance.addr.to_string(),
            metadata: serde_json::to_value(instance)
                .map_err(|e| DiscoveryError::malformed(BACKEND, &self.key, e))?,
        })
        .map_err(|e| DiscoveryError::malformed(BACKEND, &self.key, e))?;
        self.inner
            .call(
                "/v3/kv/put",
                json!({"key": B64.encode(&self.key), "value": B64.encode(value), "lease": lease}),
            )
            .await
            .map(|_| ())
    }

    async fn grant_and_write(&self, instance: &Instance) -> Result<(), DiscoveryError> {
        let ttl = self.inner.ttl.as_secs_f64().ceil() as i64;
        let v = self
            .inner
            .call("/v3/lease/grant", json!({ "TTL": ttl }))
            .await?;
        let id = match v.get("ID") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(unavailable(format!("lease grant answered {v}"))),
        };
        self.write(instance, &id).await?;
        self.set_lease(Some(id));
        Ok(())
    }
}

impl Lease for EtcdLease {
    fn put<'a>(
        &'a self,
        instance: &'a Instance,
        changed: bool,
    ) -> BoxFuture<'a, Result<Beat, DiscoveryError>> {
        Box::pin(async move {
            let Some(id) = self.lease_id() else {
                self.grant_and_write(instance).await?;
                return Ok(Beat::Refreshed);
            };
            let v = self
                .inner
                .call("/v3/lease/keepalive", json!({ "ID": id }))
                .await?;
            let ttl = v
                .get("result")
                .and_then(|r| r.get("TTL"))
                .map(int)
                .unwrap_or(0);
            if ttl <= 0 {
                // The lease expired (a long pause, an etcd outage): start again.
                self.set_lease(None);
                self.grant_and_write(instance).await?;
                return Ok(Beat::Reregistered);
            }
            if changed {
                self.write(instance, &id).await?;
            }
            Ok(Beat::Refreshed)
        })
    }

    fn remove<'a>(&'a self, _instance: &'a Instance) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(async move {
            // Without a lease there is no record of ours: it went with the lease.
            let Some(id) = self.lease_id() else {
                return Ok(());
            };
            // Only while the record is still ours: a successor at the same address (a restart
            // in place) may have written it since, on its own lease, and only keeps it alive.
            self.inner
                .call(
                    "/v3/kv/txn",
                    json!({
                        "compare": [{
                            "key": B64.encode(&self.key),
                            "target": "LEASE",
                            "result": "EQUAL",
                            "lease": id,
                        }],
                        "success": [{ "request_delete_range": { "key": B64.encode(&self.key) } }],
                    }),
                )
                .await?;
            // Best effort: the record is already gone.
            let _ = self
                .inner
                .call("/v3/lease/revoke", json!({ "ID": id }))
                .await;
            self.set_lease(None);
            Ok(())
        })
    }

    fn interval(&self) -> Option<Duration> {
        Some(self.inner.ttl / 3)
    }
}

fn decode(v: Option<&Value>) -> Vec<u8> {
    v.and_then(Value::as_str)
        .and_then(|s| B64.decode(s).ok())
        .unwrap_or_default()
}

/// Reads the whole prefix: (revision, key → instance).
async fn read_all(
    inner: &Inner,
    service: &ServiceName,
) -> Result<(i64, BTreeMap<String, Instance>), DiscoveryError> {
    let prefix = inner.service_prefix(service);
    let v = inner
        .call(
            "/v3/kv/range",
            json!({"key": B64.encode(&prefix), "range_end": B64.encode(prefix_end(prefix.as_bytes()))}),
        )
        .await?;
    let revision = v
        .get("header")
        .and_then(|h| h.get("revision"))
        .map(int)
        .unwrap_or(0);
    let mut set = BTreeMap::new();
    for kv in v.get("kvs").and_then(Value::as_array).into_iter().flatten() {
        let key = String::from_utf8_lossy(&decode(kv.get("key"))).into_owned();
        if let Some(i) = parse_record(service, &key, &decode(kv.get("value"))) {
            set.insert(key, i);
        }
    }
    Ok((revision, set))
}

enum WatchEnd {
    /// The start revision was compacted: re-read.
    Compacted,
    /// Time for the periodic full re-read.
    Resync,
    /// Shutdown.
    Stop,
}

async fn watcher(inner: Arc<Inner>, publisher: Arc<Publisher>) {
    let service = publisher.service().clone();
    let mut backoff = Duration::from_millis(100);
    // Where to resume watching after the stream broke: (next revision, the set as of then).
    let mut resume: Option<(i64, BTreeMap<String, Instance>)> = None;
    loop {
        let mut current = match resume.take() {
            Some(c) => c,
            None => match read_all(&inner, &service).await {
                Ok((revision, raw)) => {
                    publisher.offer(raw.values().cloned().collect());
                    (revision.saturating_add(1), raw)
                }
                Err(error) => {
                    publisher.failed(&error);
                    if pause(&inner, &mut backoff).await {
                        return;
                    }
                    continue;
                }
            },
        };
        match watch_from(&inner, &publisher, &mut current.1, &mut current.0).await {
            Ok(WatchEnd::Stop) => return,
            Ok(WatchEnd::Compacted) => {
                tracing::info!(%service, "watch revision compacted; re-reading everything");
                backoff = Duration::from_millis(100);
            }
            Ok(WatchEnd::Resync) => backoff = Duration::from_millis(100),
            Err(error) => {
                // Resume from the next revision: nothing in between is lost, and if it was
                // compacted meanwhile the server says so and everything is re-read.
                publisher.failed(&error);
                resume = Some(current);
                if pause(&inner, &mut backoff).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps `backoff` (then doubles it, up to 2 s); true if shutdown came first.
async fn pause(inner: &Inner, backoff: &mut Duration) -> bool {
    let stop = tokio::select! {
        _ = tokio::time::sleep(*backoff) => false,
        _ = inner.shutdown.triggered() => true,
    };
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
    stop
}

async fn watch_from(
    inner: &Inner,
    publisher: &Publisher,
    raw: &mut BTreeMap<String, Instance>,
    next: &mut i64,
) -> Result<WatchEnd, DiscoveryError> {
    let service = publisher.service().clone();
    let prefix = inner.service_prefix(&service);
    let body = json!({"create_request": {
        "key": B64.encode(&prefix),
        "range_end": B64.encode(prefix_end(prefix.as_bytes())),
        "start_revision": *next,
    }});
    let resp = inner
        .http
        .post(format!("{}/v3/watch", inner.endpoint))
        .json(&body)
        .send()
        .await
        .map_err(unavailable)?;
    if !resp.status().is_success() {
        return Err(unavailable(format!("watch: {}", resp.status())));
    }
    let mut stream = resp.bytes_stream();
    let mut lines = Lines::default();
    let resync = tokio::time::sleep(inner.resync);
    tokio::pin!(resync);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let chunk = tokio::select! {
            c = stream.next() => c,
            _ = &mut resync => return Ok(WatchEnd::Resync),
            _ = inner.shutdown.triggered() => return Ok(WatchEnd::Stop),
            _ = tick.tick() => {
                // A read for the guard: a held shrink is confirmed by persistence.
                publisher.offer(raw.values().cloned().collect());
                continue;
            }
        };
        let chunk = match chunk {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(unavailable(e)),
            None => return Err(unavailable("watch stream ended")),
        };
        lines.push(&chunk);
        while let Some(line) = lines.next_line() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let msg: Value = match serde_json::from_slice(line) {
                Ok(v) => v,
                Err(e) => return Err(unavailable(format!("watch message: {e}"))),
            };
            if let Some(end) = apply_watch_message(&service, &msg, raw, next)? {
                return Ok(end);
            }
            publisher.offer(raw.values().cloned().collect());
        }
        if lines.pending() > MAX_WATCH_LINE {
            return Err(unavailable(format!(
                "watch message longer than {MAX_WATCH_LINE} bytes"
            )));
        }
    }
}

/// The newline-delimited messages of a byte stream, each byte searched for the newline once
/// (a message that arrives in many chunks is not searched again from its start), and the lines
/// of a chunk taken without moving the rest of it for each.
#[derive(Default)]
struct Lines {
    /// Bytes read; those before `start` are taken.
    buf: Vec<u8>,
    /// Where the first byte not yet taken as a line is.
    start: usize,
    /// How much of `buf` is known to hold no newline after `start`.
    scanned: usize,
}

impl Lines {
    /// Appends a chunk of the stream.
    fn push(&mut self, chunk: &[u8]) {
        // What was taken goes now, once per chunk rather than once per line.
        self.buf.drain(..self.start);
        self.scanned -= self.start;
        self.start = 0;
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole line, its newline included, if one has arrived.
    fn next_line(&mut self) -> Option<&[u8]> {
        let from = self.scanned.max(self.start);
        match self.buf[from..].iter().position(|b| *b == b'\n') {
            Some(at) => {
                let line = self.start..from + at + 1;
                self.start = line.end;
                self.scanned = line.end;
                Some(&self.buf[line])
            }
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// Bytes read and not yet taken as a line: the message being read.
    fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

fn apply_watch_message(
    service: &ServiceName,
    msg: &Value,
    raw: &mut BTreeMap<String, Instance>,
    next: &mut i64,
) -> Result<Option<WatchEnd>, DiscoveryError> {
    if let Some(e) = msg.get("error") {
        return Err(unavailable(format!("watch: {e}")));
    }
    let Some(result) = msg.get("result") else {
        return Ok(None);
    };
    if result.get("compact_revision").map(int).unwrap_or(0) > 0 {
        return Ok(Some(WatchEnd::Compacted));
    }
    if result.get("canceled").and_then(Value::as_bool) == Some(true) {
        return Err(unavailable("watch cancelled by the server"));
    }
    for ev in result
        .get("events")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kv = ev.get("kv");
        let revision = kv.and_then(|k| k.get("mod_revision")).map(int).unwrap_or(0);
        *next = (*next).max(revision.saturating_add(1));
        let key = String::from_utf8_lossy(&decode(kv.and_then(|k| k.get("key")))).into_owned();
        match ev.get("type").and_then(Value::as_str) {
            Some("DELETE") => {
                raw.remove(&key);
            }
            _ => {
                let value = decode(kv.and_then(|k| k.get("value")));
                match parse_record(service, &key, &value) {
                    Some(i) => {
                        raw.insert(key, i);
                    }
                    // A record overwritten by garbage: the old content is no longer true.
                    None => {
                        raw.remove(&key);
                    }
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_refused_url_is_quoted_without_its_password() {
        let cfg = DiscoveryConfig {
            backend: crate::Backend::Etcd,
            url: Some("etcd://root:hunter2@127.0.0.1:2379".to_owned()),
            ..Default::default()
        };
        let e = EtcdDiscovery::from_config(&cfg, Shutdown::new())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("etcd://root:***@127.0.0.1:2379"), "{e}");
    }

    #[test]
    fn the_largest_revision_does_not_overflow_the_next() {
        let s = ServiceName::new("payments").unwrap();
        let msg = json!({"result": {"events": [{"kv": {
            "key": B64.encode("keel/payments/a"),
            "mod_revision": i64::MAX.to_string(),
        }, "type": "DELETE"}]}});
        let mut next = 5;
        apply_watch_message(&s, &msg, &mut BTreeMap::new(), &mut next).unwrap();
        assert_eq!(next, i64::MAX);
    }

    #[test]
    fn watch_lines_split_across_and_within_chunks() {
        let mut l = Lines::default();
        let mut got = Vec::new();
        for chunk in [&b"{\"a\""[..], b":1}\n{\"b\":2}\n{", b"\"c\":3"] {
            l.push(chunk);
            while let Some(line) = l.next_line() {
                got.push(line.to_vec());
            }
        }
        assert_eq!(got, [&b"{\"a\":1}\n"[..], b"{\"b\":2}\n"]);
        // The third message is still open: kept, and not searched again.
        assert_eq!(l.pending(), 6);
        assert_eq!(l.scanned, l.buf.len());
        l.push(b"}\n");
        assert_eq!(
            l.buf, b"{\"c\":3}\n",
            "what was taken is dropped on the next chunk"
        );
        assert_eq!(l.next_line(), Some(&b"{\"c\":3}\n"[..]));
        assert!(l.next_line().is_none());
        assert_eq!(l.pending(), 0);
    }

    proptest! {
        #[test]
        fn watch_lines_are_the_stream_cut_at_newlines(
            text in "[a-z\n]{0,200}",
            cuts in proptest::collection::vec(0usize..200, 0..10),
        ) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut l = Lines::default();
            let mut got = Vec::new();
            for w in cuts.windows(2) {
                l.push(&bytes[w[0]..w[1]]);
                while let Some(line) = l.next_line() {
                    got.push(line.to_vec());
                }
            }
            let want: Vec<Vec<u8>> = bytes
                .split_inclusive(|b| *b == b'\n')
                .filter(|p| p.ends_with(b"\n"))
                .map(<[u8]>::to_vec)
                .collect();
            let rest = bytes.len() - want.iter().map(Vec::len).sum::<usize>();
            prop_assert_eq!(got, want);
            prop_assert_eq!(l.pending(), rest);
        }
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"keel/a/"), b"keel/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }

    #[test]
    fn go_endpoints_records_are_understood() {
        let s = ServiceName::new("payments").unwrap();
        let go = br#"{"Op":0,"Addr":"127.0.0.1:9000","Metadata":"anything"}"#;
        let i = parse_record(&s, "k", go).unwrap();
        assert_eq!(i.id.as_str(), "payments-127.0.0.1:9000");
        assert!(parse_record(&s, "k", br#"{"Op":1,"Addr":"127.0.0.1:9000"}"#).is_none());
        assert!(parse_record(&s, "k", b"not json").is_none());
        assert!(parse_record(&s, "k", br#"{"Addr":"db.internal:5432"}"#).is_none());
    }

    #[tokio::test]
    async fn a_watch_from_a_compacted_revision_asks_for_a_full_read() {
        let etcd = keel_testkit::EtcdServer::start();
        let cfg = DiscoveryConfig {
            backend: crate::Backend::Etcd,
            url: Some(etcd.endpoint()),
            ttl: Duration::from_secs(2),
            ..Default::default()
        };
        let d = EtcdDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
        let svc = ServiceName::new("compacted").unwrap();
        let reg = d
            .register(Instance::new(
                svc.clone(),
                "127.0.0.1:7001".parse().unwrap(),
            ))
            .await
            .unwrap();
        reg.drain().await.unwrap();
        let (revision, raw) = read_all(&d.inner, &svc).await.unwrap();
        assert_eq!(raw.len(), 1);
        d.inner
            .call("/v3/kv/compaction", json!({ "revision": revision }))
            .await
            .unwrap();
        let p = Publisher::new(svc, &SafetyOptions::default());
        let mut raw = BTreeMap::new();
        let mut next = 1;
        let end = watch_from(&d.inner, &p, &mut raw, &mut next).await.unwrap();
        assert!(matches!(end, WatchEnd::Compacted));
    }

    proptest! {
        #[test]
        fn arbitrary_values_never_panic(v in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_record(&ServiceName::new("p").unwrap(), "k", &v);
        }
    }
}
