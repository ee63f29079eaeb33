use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::ServiceName;

/// The `[service]` section: who this service is and how it presents itself.
///
/// | key | default | live |
/// |---|---|---|
/// | `name` | the builder's name | no |
/// | `listen` | `127.0.0.1:8080` | no (reported) |
/// | `advertise` | `listen` | no |
/// | `zone`, `version` | none | re-registered |
/// | `weight` | 1 | re-registered |
/// | `tags` | none | re-registered |
/// | `drain_timeout` | `30s` | yes |
/// | `drain_grace` | `500ms` | yes |
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSection {
    /// The service's name; the builder's name when absent.
    pub name: Option<ServiceName>,
    /// Where to listen.
    pub listen: SocketAddr,
    /// The address other services should call, when it differs from `listen`.
    pub advertise: Option<SocketAddr>,
    /// The zone this instance runs in.
    pub zone: Option<String>,
    /// The version of this instance.
    pub version: Option<String>,
    /// This instance's weight as announced to discovery.
    pub weight: u32,
    /// Labels announced to discovery.
    pub tags: BTreeMap<String, String>,
    /// How long in-flight work may take to finish after SIGTERM: requests, and upgraded
    /// connections (WebSockets); what is still open then is closed.
    #[serde(with = "crate::units::serde_duration")]
    pub drain_timeout: Duration,
    /// After SIGTERM, how long to keep accepting (while already unready and deregistered) so
    /// that callers notice before connections are refused.
    #[serde(with = "crate::units::serde_duration")]
    pub drain_grace: Duration,
}

impl Default for ServiceSection {
    fn default() -> Self {
        Self {
            name: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            advertise: None,
            zone: None,
            version: None,
            weight: 1,
            tags: BTreeMap::new(),
            drain_timeout: Duration::from_secs(30),
            drain_grace: Duration::from_millis(500),
        }
    }
}

impl ServiceSection {
    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.weight == 0 || self.weight > crate::Instance::MAX_WEIGHT {
            return Err(format!(
                "weight must be 1 to {}, got {}",
                crate::Instance::MAX_WEIGHT,
                self.weight
            ));
        }
        if self.drain_timeout > Duration::from_secs(3600) {
            return Err("drain_timeout must be at most 1h".to_owned());
        }
        if self.drain_grace > self.drain_timeout {
            return Err("drain_grace must not exceed drain_timeout".to_owned());
        }
        Ok(())
    }
}
