//! relayd: the cloud side of the tunnel.
//!
//! Web clients call `ALL /api/tunnel/{user}/{*path}`; each user's agent holds
//! one WebSocket on `GET /ws/tunnel`. The relay routes a request to the
//! user's agent session ([`hub`]), correlates the answer by stream id
//! ([`session`]) and streams it back chunk by chunk ([`forward`], [`body`]).
//!
//! [`Relay::new`] does no I/O; [`Relay::run`] takes any bound listener and a
//! shutdown token, so tests run the relay in-process. The [`Relay`] is also
//! its handle: the tunnels it holds ([`Relay::tunnels`], [`Tunnel`]), and
//! disconnecting one.

pub mod admission;
mod auth;
mod body;
pub mod config;
mod deadline;
mod forward;
mod hub;
mod listener;
mod metrics;
mod response;
mod server;
mod session;
mod shape;
mod stall;
mod state;
pub mod tls;
mod upload;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tunnel_proto::flow::BufferGauge;

pub use config::{Config, ConfigFile};

use crate::session::{CloseReason, Session};
use crate::state::Shared;

/// A relay, ready to serve on any listener; cheap to clone.
#[derive(Clone)]
pub struct Relay {
    shared: Arc<Shared>,
}

impl Relay {
    pub fn new(config: Config) -> Self {
        Self { shared: Arc::new(Shared::new(config)) }
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Serves on `listener` until `shutdown` is cancelled, then drains:
    /// stops accepting, answers new requests 503, sends `goaway` to agents,
    /// lets in-flight streams finish until `drain_timeout`, then ends the
    /// rest and closes the sessions.
    pub async fn run(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        listener::serve(self.shared.clone(), listener, shutdown).await
    }

    /// The tunnel of `user`, if its agent is connected.
    pub fn tunnel(&self, user: &str) -> Option<Tunnel> {
        self.shared.hub.get(user).map(Tunnel)
    }

    /// Every connected tunnel.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.shared.hub.sessions().into_iter().map(Tunnel).collect()
    }

    /// Agents connected.
    pub fn tunnel_count(&self) -> usize {
        self.shared.hub.len()
    }

    /// Ends `user`'s session (its streams fail with 502); its agent
    /// reconnects with backoff. False when no agent was connected.
    pub fn disconnect(&self, user: &str) -> bool {
        self.tunnel(user).map(|t| t.disconnect()).is_some()
    }

    /// Waits until `pred` holds; re-checked whenever a tunnel comes or goes.
    pub async fn wait_until(&self, mut pred: impl FnMut(&Relay) -> bool) {
        self.shared.hub.wait_until(|_| pred(self)).await
    }

    /// Bytes of response bodies buffered in the relay right now and at peak.
    pub fn buffered(&self) -> &BufferGauge {
        &self.shared.gauge
    }

    /// The Prometheus text `GET /metrics` answers.
    pub fn metrics(&self) -> String {
        metrics::render(&self.shared)
    }
}

/// A connected agent, as operators and tests see it.
#[derive(Clone)]
pub struct Tunnel(Arc<Session>);

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("user", &self.0.user)
            .field("session_id", &self.0.id)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    pub fn user(&self) -> &str {
        &self.0.user
    }

    pub fn session_id(&self) -> &str {
        &self.0.id
    }

    /// When the agent connected.
    pub fn since(&self) -> SystemTime {
        self.0.connected_at
    }

    /// What the agent called itself in `hello` (`agentd/0.1.0`).
    pub fn agent(&self) -> &str {
        &self.0.agent
    }

    /// 0 for an original agent, else the negotiated version.
    pub fn protocol_version(&self) -> u32 {
        self.0.version
    }

    /// Requests in flight through this tunnel.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight()
    }

    /// Last measured ping round-trip time to the agent.
    pub fn rtt(&self) -> Option<Duration> {
        self.0.rtt()
    }

    /// Ends the session; its streams fail with 502.
    pub fn disconnect(&self) {
        self.0.close(CloseReason::OperatorDisconnect);
    }

    /// Resolves once the session has ended (whatever ended it).
    pub async fn closed(&self) {
        self.0.closed().await
    }
}
