//! agentd: the desktop side of the tunnel.
//!
//! Keeps one WebSocket to the relay ([`connect`]), serves each tunnelled
//! request against the local service ([`upstream`]) and reconnects with
//! jittered backoff ([`backoff`]) when the session ends ([`supervisor`]). An
//! offline machine still starts: the agent keeps trying in the background.
//!
//! [`Agent::new`] does no I/O; [`Agent::run`] runs until the shutdown token
//! fires. While it runs, the [`Agent`] is its handle: [`Agent::state`]
//! (typed: connecting, connected since, backing off until, the last error),
//! and commands ([`Agent::reconnect`], [`Agent::replace_token`],
//! [`Agent::shutdown`]).

pub mod backoff;
pub mod config;
pub mod connect;
mod metrics;
mod session;
mod stream;
pub mod supervisor;
pub mod tls;
mod upstream;

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use tunnel_proto::flow::BufferGauge;

pub use config::{Config, ConfigFile};
pub use supervisor::{AgentError, AgentState, Command, Phase};

/// The agent: built from its configuration, run once, commanded while it
/// runs.
pub struct Agent {
    shared: Arc<supervisor::Shared>,
    commands: mpsc::Sender<Command>,
    /// The supervisor's end of the command channel, until `run` takes it.
    inbox: Mutex<Option<mpsc::Receiver<Command>>>,
}

/// The command could not be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("the agent is not running")]
    NotRunning,
    #[error("the agent is busy with earlier commands; try again")]
    Busy,
}

impl Agent {
    pub fn new(config: Config) -> Self {
        let (commands, inbox) = mpsc::channel(supervisor::COMMAND_QUEUE);
        let token = config.token.clone();
        Self {
            shared: Arc::new(supervisor::Shared {
                config,
                token: Mutex::new(token),
                state: watch::channel(AgentState::default()).0,
                gauge: Arc::new(BufferGauge::default()),
                current: Mutex::new(None),
            }),
            commands,
            inbox: Mutex::new(Some(inbox)),
        }
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The agent's state, updated as it changes.
    pub fn state(&self) -> watch::Receiver<AgentState> {
        self.shared.state.subscribe()
    }

    /// Requests in flight in the current session.
    pub fn in_flight(&self) -> usize {
        self.shared.current().map_or(0, |s| s.in_flight())
    }

    /// Last measured round-trip time to the relay, while connected.
    pub fn rtt(&self) -> Option<std::time::Duration> {
        self.shared.current().and_then(|s| s.rtt())
    }

    /// Request-body bytes buffered in the agent right now and at peak.
    pub fn buffered(&self) -> &Arc<BufferGauge> {
        &self.shared.gauge
    }

    /// The Prometheus text `GET /metrics` answers.
    pub fn metrics(&self) -> String {
        metrics::render(self)
    }

    fn command(&self, cmd: Command) -> Result<(), CommandError> {
        self.commands.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => CommandError::Busy,
            mpsc::error::TrySendError::Closed(_) => CommandError::NotRunning,
        })
    }

    /// Ends the session once its in-flight streams finished and connects
    /// again at once.
    pub fn reconnect(&self) -> Result<(), CommandError> {
        self.command(Command::Reconnect)
    }

    /// Uses `token` from the next connection on (at once when not
    /// connected).
    pub fn replace_token(&self, token: String) -> Result<(), CommandError> {
        self.command(Command::ReplaceToken(token))
    }

    /// Drains and stops, as the shutdown token does.
    pub fn shutdown(&self) -> Result<(), CommandError> {
        self.command(Command::Shutdown)
    }

    /// Connects, serves, reconnects; returns once `shutdown` fires (or
    /// [`Agent::shutdown`]) and the in-flight streams ended (or the drain
    /// deadline passed). Runs once: a second call returns at once.
    pub async fn run(&self, shutdown: CancellationToken) {
        let Some(inbox) = self.inbox.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            tracing::warn!("Agent::run called twice");
            return;
        };
        supervisor::run(self.shared.clone(), inbox, shutdown).await
    }
}
