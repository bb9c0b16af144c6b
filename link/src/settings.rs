//! The configuration both daemons share about their sessions: `[liveness]`
//! (how often a session pings its peer and how many silent intervals end
//! it) and the session limits of `[limits]`.

use std::time::Duration;

use daemon::ConfigError;
use daemon::config::{Human, at_least_one, duration, positive};
use serde::{Deserialize, Serialize};

use tunnel_proto::Limits;
use tunnel_proto::limits::LimitOverrides;
use tunnel_proto::liveness::{DEFAULT_MAX_MISSED, DEFAULT_PING_INTERVAL};

/// `[liveness]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LivenessFile {
    pub ping_interval: Option<Human>,
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
                self.ping_interval.map(Human::get),
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

/// The session limits of `[limits]`, as written (agentd's whole table;
/// relayd's adds keys of its own).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub stream_window: Option<u32>,
    pub max_chunk_bytes: Option<u32>,
    pub max_streams: Option<u32>,
    pub max_headers: Option<u32>,
}

impl LimitsFile {
    pub fn resolve(self) -> Result<Limits, ConfigError> {
        limits(LimitOverrides {
            stream_window: self.stream_window,
            max_chunk_bytes: self.max_chunk_bytes,
            max_streams: self.max_streams,
            max_headers: self.max_headers,
        })
    }
}

/// The limits with an operator's overrides, checked.
pub fn limits(overrides: LimitOverrides) -> Result<Limits, ConfigError> {
    Limits::with_overrides(overrides)
        .map_err(|e| ConfigError::Invalid(format!("[limits]: {}", e.detail)))
}
