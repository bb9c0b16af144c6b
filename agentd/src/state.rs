//! What the agent is doing and why it is not connected, as `tunnelctl
//! status`, the service manager's `STATUS=`, metrics and tests see it.

use std::time::SystemTime;

use link::End;

use crate::connect::ConnectError;

/// What the agent is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Phase {
    /// Not started yet.
    #[default]
    Idle,
    /// No relay or no credential yet: waiting for `tunnelctl enroll`.
    NotEnrolled,
    /// Dialling the relay.
    Connecting,
    /// A session is up.
    Connected { session_id: String, since: SystemTime },
    /// Waiting before the next attempt.
    BackingOff { until: SystemTime },
    /// The relay revoked the credential: no more attempts until a new one
    /// is installed (`tunnelctl rotate-token`, `tunnelctl enroll`, or a
    /// changed token file and SIGHUP).
    Revoked,
    /// Stopped for good.
    Stopped,
}

/// Why the agent is not connected, as a status tells it apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// The relay refused the agent token (401/403): fix the credential.
    #[error(
        "the relay refused the agent's credential ({0}): install a valid one with `tunnelctl rotate-token` (on stdin) or `tunnelctl enroll`"
    )]
    Unauthorized(u16),
    /// The relay revoked the credential: the agent waits for a new one.
    #[error(
        "the agent's credential was revoked: install a new one with `tunnelctl rotate-token` (on stdin) or `tunnelctl enroll`; no more attempts until then"
    )]
    Revoked,
    /// No TCP connection to the relay (DNS, refused, unreachable).
    #[error("cannot reach the relay: {0}")]
    Unreachable(String),
    /// TLS with the relay failed (untrusted or wrong-name certificate).
    #[error("TLS with the relay failed: {0}")]
    Tls(String),
    /// The relay's public key is none of the `[tls] pins`.
    #[error("the relay's public key {seen} matches none of the configured pins")]
    PinMismatch { seen: String },
    /// The relay is busy or draining (503, 429, `goaway`).
    #[error("the relay is busy or draining")]
    RelayBusy,
    /// The user has as many other devices connected as the relay allows
    /// (409 `too_many_devices`).
    #[error(
        "the relay holds as many devices of this user as it allows: disconnect one (`tunnelctl disconnect USER --device NAME` on the relay), or raise its [limits] max_devices_per_user"
    )]
    TooManyDevices,
    /// The relay answered something other than tunnel protocol v1.
    #[error("the relay does not speak tunnel protocol v1: {0}")]
    Protocol(String),
    /// The WebSocket upgrade failed for another reason.
    #[error("WebSocket handshake failed: {0}")]
    Handshake(String),
    /// Connecting took longer than its deadline.
    #[error("timed out connecting to the relay")]
    Timeout,
    /// A session that was up ended.
    #[error("relay session lost: {0}")]
    SessionLost(String),
}

impl From<ConnectError> for AgentError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Unauthorized(code) => AgentError::Unauthorized(code),
            ConnectError::Revoked => AgentError::Revoked,
            ConnectError::Busy => AgentError::RelayBusy,
            ConnectError::TooManyDevices => AgentError::TooManyDevices,
            ConnectError::Unreachable(why) => AgentError::Unreachable(why),
            ConnectError::Handshake(why) => AgentError::Handshake(why),
            ConnectError::Protocol(why) => AgentError::Protocol(why),
            ConnectError::Timeout => AgentError::Timeout,
            ConnectError::Tls(why) => AgentError::Tls(why),
            ConnectError::PinMismatch(m) => AgentError::PinMismatch { seen: m.seen },
        }
    }
}

/// Why a link ended, in words for the status.
pub(crate) fn describe(end: &End) -> String {
    match end {
        End::PeerClosed(Some((code, reason))) => {
            format!("the relay closed the session: {reason} ({code})")
        }
        End::PeerClosed(None) => "the relay closed the connection".into(),
        End::Failed { error, .. } => format!("socket error: {error}"),
        End::Flooded(f) => format!("the relay flooded the session: {f}"),
        End::NotReading => "the relay stopped reading".into(),
        End::Unresponsive(silent) => {
            format!("the relay stopped answering pings (silent for {silent:.1?})")
        }
        End::Closed => "session closed".into(),
    }
}

/// The agent's state, as `tunnelctl status` and tests see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentState {
    pub phase: Phase,
    /// Sessions established since start.
    pub sessions: u64,
    /// Why the last attempt or session failed; cleared by a new session.
    pub last_error: Option<AgentError>,
}

impl AgentState {
    pub fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::Connected { .. })
    }
}
