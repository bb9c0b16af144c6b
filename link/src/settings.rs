//! The `[liveness]` table both daemons' configurations share: how often a
//! session pings its peer and how many silent intervals end it.

use std::time::Duration;

use daemon::ConfigError;
use daemon::config::{at_least_one, duration, positive};
use serde::{Deserialize, Serialize};

use tunnel_proto::liveness::{DEFAULT_MAX_MISSED, DEFAULT_PING_INTERVAL};

/// `[liveness]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LivenessFile {
    #[serde(default, deserialize_with = "duration::opt")]
    pub ping_interval: Option<Duration>,
    pub max_missed_pings: Option<u32>,
}

/// How a session watches its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Liveness {
    /// Ping the peer this often...
    #[serde(serialize_with = "duration::show")]
    pub ping_interval: Duration,
    /// ...and end the session after this many silent intervals.
    pub max_missed_pings: u32,
}

impl Default for Liveness {
    fn default() -> Self {
        Self { ping_interval: DEFAULT_PING_INTERVAL, max_missed_pings: DEFAULT_MAX_MISSED }
    }
}

impl LivenessFile {
    pub fn resolve(self) -> Result<Liveness, ConfigError> {
        let d = Liveness::default();
        Ok(Liveness {
            ping_interval: positive(
                self.ping_interval,
                d.ping_interval,
                "[liveness] ping_interval",
            )?,
            max_missed_pings: at_least_one(
                self.max_missed_pings,
                d.max_missed_pings,
                "[liveness] max_missed_pings",
            )?,
        })
    }
}
