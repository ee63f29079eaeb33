use std::{collections::BTreeMap, fmt, net::SocketAddr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{error::InvalidInstance, name::ServiceName};

/// A stable identity for one instance of a service, unique within the service.
///
/// Balancers key their per-instance state (in-flight counts, EWMA, ejections) by this id, so an
/// instance that changes weight or tags keeps what was learned about it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(Arc<str>);

impl InstanceId {
    /// Wraps an id.
    pub fn new(id: impl AsRef<str>) -> Self {
        Self(Arc::from(id.as_ref()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for InstanceId {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for InstanceId {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

/// The administrative state of an instance, as set by an operator or by the instance itself.
///
/// This is intent, not observed health: health checks and outlier detection keep their own
/// state beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    /// Serving normally.
    #[default]
    Up,
    /// Taken out by an operator (nginx `down`): never picked.
    Down,
    /// Picked only when no primary instance can serve (nginx `backup`).
    Backup,
    /// Finishing its in-flight work before leaving: no new requests are sent to it.
    Draining,
}

/// nginx's per-server parameters, carried on the instance so that any discovery backend can set
/// them and any balancer can honour them. `None` means "the client's default".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerParams {
    /// Failures within `fail_timeout` that take the instance out (nginx `max_fails`; 0 disables).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_fails: Option<u32>,
    /// The window for `max_fails` and how long the instance then stays out.
    #[serde(
        with = "crate::units::serde_duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub fail_timeout: Option<Duration>,
    /// Ramp the instance's weight up over this long after it joins or recovers.
    #[serde(
        with = "crate::units::serde_duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub slow_start: Option<Duration>,
    /// At most this many concurrent requests (nginx `max_conns`; 0 means no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_conns: Option<u32>,
}

/// One running copy of a service: where it listens and how it wants to be treated.
///
/// ```
/// use keel_core::{AdminState, Instance, ServiceName};
///
/// let payments = ServiceName::new("payments").unwrap();
/// let i = Instance::new(payments, "127.0.0.1:8066".parse().unwrap())
///     .with_weight(10)
///     .with_zone("eu-1a")
///     .with_version("2.1.0");
/// assert_eq!(i.id.as_str(), "payments-127.0.0.1:8066");
/// assert_eq!(i.state, AdminState::Up);
/// i.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Stable id, unique within the service.
    pub id: InstanceId,
    /// The service this instance belongs to.
    pub service: ServiceName,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Relative weight, 1 to [`Instance::MAX_WEIGHT`].
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Zone or locality (`eu-1a`), for zone-aware routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Version of the software it runs, for canary subsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Free-form labels for subsets (`canary`, `gpu`, `tenant=acme`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Administrative state.
    #[serde(default)]
    pub state: AdminState,
    /// nginx's per-server parameters.
    #[serde(default, skip_serializing_if = "is_default_params")]
    pub params: ServerParams,
}

fn default_weight() -> u32 {
    1
}

fn is_default_params(p: &ServerParams) -> bool {
    *p == ServerParams::default()
}

impl Instance {
    /// The largest weight accepted.
    pub const MAX_WEIGHT: u32 = 1_000_000;
    /// The longest id, zone, version, tag key or tag value accepted.
    pub const MAX_FIELD_LEN: usize = 253;

    /// An instance with weight 1, state `up`, and the id `{service}-{addr}`.
    pub fn new(service: ServiceName, addr: SocketAddr) -> Self {
        Self {
            id: InstanceId::new(format!("{service}-{addr}")),
            service,
            addr,
            weight: 1,
            zone: None,
            version: None,
            tags: BTreeMap::new(),
            state: AdminState::Up,
            params: ServerParams::default(),
        }
    }

    /// Sets the id.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<InstanceId>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the weight.
    #[must_use]
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the zone.
    #[must_use]
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Sets the version.
    #[must_use]
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Adds a tag.
    #[must_use]
    pub fn with_tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(key.into(), value.into());
        self
    }

    /// Sets the administrative state.
    #[must_use]
    pub fn with_state(mut self, state: AdminState) -> Self {
        self.state = state;
        self
    }

    /// Sets nginx's per-server parameters.
    #[must_use]
    pub fn with_params(mut self, params: ServerParams) -> Self {
        self.params = params;
        self
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), InvalidInstance> {
        let bad = |field: &str, reason: String| InvalidInstance {
            field: field.to_owned(),
            reason,
        };
        check_text("id", self.id.as_str())?;
        if self.weight == 0 || self.weight > Self::MAX_WEIGHT {
            return Err(bad(
                "weight",
                format!(
                    "must be 1 to {} (use state = \"down\" to take an instance out), got {}",
                    Self::MAX_WEIGHT,
                    self.weight
                ),
            ));
        }
        if self.addr.port() == 0 {
            return Err(bad("addr", "port must not be 0".to_owned()));
        }
        if self.addr.ip().is_unspecified() {
            return Err(bad(
                "addr",
                format!("{} is not an address a client can reach", self.addr.ip()),
            ));
        }
        if let Some(zone) = &self.zone {
            check_text("zone", zone)?;
        }
        if let Some(version) = &self.version {
            check_text("version", version)?;
        }
        for (k, v) in &self.tags {
            check_text(&format!("tags.{k}"), k)?;
            if v.len() > Self::MAX_FIELD_LEN || v.chars().any(char::is_control) {
                return Err(bad(
                    &format!("tags.{k}"),
                    "value must be at most 253 characters without control characters".to_owned(),
                ));
            }
        }
        if let Some(t) = self.params.fail_timeout {
            if t.is_zero() {
                return Err(bad(
                    "params.fail_timeout",
                    "must be greater than 0".to_owned(),
                ));
            }
        }
        Ok(())
    }
}

fn check_text(field: &str, value: &str) -> Result<(), InvalidInstance> {
    let reason = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > Instance::MAX_FIELD_LEN {
        Some("must be at most 253 characters")
    } else if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("must not contain whitespace or control characters")
    } else {
        None
    };
    match reason {
        Some(r) => Err(InvalidInstance {
            field: field.to_owned(),
            reason: r.to_owned(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn svc() -> ServiceName {
        ServiceName::new("payments").unwrap()
    }

    #[test]
    fn validation_names_the_field() {
        let i = Instance::new(svc(), "127.0.0.1:80".parse().unwrap());
        assert!(i.validate().is_ok());
        let e = i.clone().with_weight(0).validate().unwrap_err();
        assert_eq!(e.field, "weight");
        let e = i.clone().with_zone("").validate().unwrap_err();
        assert_eq!(e.field, "zone");
        let e = i.clone().with_tag("a b", "x").validate().unwrap_err();
        assert_eq!(e.field, "tags.a b");
        let e = Instance::new(svc(), "0.0.0.0:80".parse().unwrap())
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "addr");
    }

    #[test]
    fn serde_round_trip_and_defaults() {
        let json = r#"{"id":"p1","service":"payments","addr":"127.0.0.1:9000"}"#;
        let i: Instance = serde_json::from_str(json).unwrap();
        assert_eq!(i.weight, 1);
        assert_eq!(i.state, AdminState::Up);
        let back: Instance = serde_json::from_str(&serde_json::to_string(&i).unwrap()).unwrap();
        assert_eq!(back, i);
        let bad = r#"{"id":"p1","service":"Payments","addr":"127.0.0.1:9000"}"#;
        let err = serde_json::from_str::<Instance>(bad).unwrap_err();
        assert!(err.to_string().contains("invalid service name"), "{err}");
        let with_params = r#"{"id":"p1","service":"payments","addr":"127.0.0.1:9000","state":"backup","params":{"max_fails":3,"fail_timeout":"30s"}}"#;
        let i: Instance = serde_json::from_str(with_params).unwrap();
        assert_eq!(i.state, AdminState::Backup);
        assert_eq!(i.params.fail_timeout, Some(Duration::from_secs(30)));
    }

    proptest! {
        #[test]
        fn arbitrary_json_never_panics(s in ".{0,200}") {
            if let Ok(i) = serde_json::from_str::<Instance>(&s) {
                let _ = i.validate();
            }
        }
    }
}
