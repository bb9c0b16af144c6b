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
//! [`Agent::rotate`], [`Agent::install_token`], [`Agent::shutdown`]).

pub mod backoff;
pub mod cli;
pub mod config;
pub mod connect;
pub mod control;
pub mod credential;
pub mod enroll;
pub mod enrollment;
pub mod inventory;
mod loading;
mod metrics;
pub mod pin;
pub mod policy;
mod pool;
mod reconnect;
pub mod renew;
pub mod service;
mod session;
mod state;
mod stream;
pub mod supervisor;
pub mod tls;
mod upstream;

pub use inventory::ServiceHealth;

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use tunnel_proto::Message;
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

/// How agentd's health checks of the local service name themselves
/// (`User-Agent`), so logs and tests can tell them from tunnelled traffic.
pub const HEALTH_CHECK_AGENT: &str = "agentd-health-check";

/// Requests the agent took from the relay, and those its policy refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub received: u64,
    pub refused: u64,
}

/// A finished rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The new credential's id.
    pub id: String,
    /// Where it is stored.
    pub stored: std::path::PathBuf,
}

/// Why a rotation did not finish. The agent still holds a working
/// credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotateError {
    #[error("rotation needs a state_dir to store the new credential in")]
    NoStateDir,
    #[error("not connected to the relay; rotation happens on a live session")]
    NotConnected,
    #[error("{0}")]
    Exchange(#[from] renew::ExchangeError),
    #[error("the relay refused {step} ({code}): {message}")]
    Refused { step: &'static str, code: u16, message: String },
    #[error("cannot store the new credential in {}: {why}; the old one stays valid", path.display())]
    Store { path: std::path::PathBuf, why: String },
    #[error("the relay answered {step} with {got}")]
    Unexpected { step: &'static str, got: &'static str },
}

/// A token installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The live session now runs on it.
    pub in_band: bool,
    /// Where it is stored (`None`: no state_dir, kept in memory only).
    pub stored: Option<std::path::PathBuf>,
}

/// Why a token was not installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Invalid(String),
    #[error("the relay refused the token ({code}): {message}")]
    Refused { code: u16, message: String },
    #[error("{0}")]
    Exchange(renew::ExchangeError),
    #[error("cannot store the token in {}: {why}", path.display())]
    Store { path: std::path::PathBuf, why: String },
    #[error("unexpected answer from the relay: {0}")]
    Unexpected(&'static str),
}

impl Agent {
    pub fn new(config: Config) -> Self {
        let (commands, inbox) = mpsc::channel(supervisor::COMMAND_QUEUE);
        let target = config.target.clone();
        let credential = credential::Credential::new(&config.credential);
        let observer = daemon::observe::Observer::new(config.control.trace_bodies);
        let upstream = Arc::new(supervisor::Upstream::new(
            config.upstream.clone(),
            config.limits.max_headers,
            config.policy.clone(),
            observer,
        ));
        Self {
            shared: Arc::new(supervisor::Shared {
                config,
                target: Mutex::new(target),
                credential,
                state: watch::channel(AgentState::default()).0,
                gauge: Arc::new(BufferGauge::default()),
                current: Mutex::new(None),
                upstream,
                relay_pin: Mutex::new(None),
                service: Mutex::new(ServiceHealth::default()),
            }),
            commands,
            inbox: Mutex::new(Some(inbox)),
        }
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The relay it connects to; `None` until enrolled.
    pub fn target(&self) -> Option<config::Target> {
        self.shared.target()
    }

    /// The agent's state, updated as it changes.
    pub fn state(&self) -> watch::Receiver<AgentState> {
        self.shared.state.subscribe()
    }

    /// Requests in flight in the current session.
    pub fn in_flight(&self) -> usize {
        self.shared.current().map_or(0, |s| s.in_flight())
    }

    /// Requests taken from the relay since start, and those the endpoint
    /// policy refused.
    pub fn requests(&self) -> RequestCounts {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.shared.upstream.counters;
        RequestCounts { received: c.received.load(Relaxed), refused: c.refused.load(Relaxed) }
    }

    /// What traces and request metrics are recorded with.
    pub fn observer(&self) -> &Arc<daemon::observe::Observer> {
        self.shared.upstream.observer()
    }

    /// The pin of the relay's key seen on the last TLS connection.
    pub fn relay_pin(&self) -> Option<String> {
        self.shared.relay_pin.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The local service as last checked.
    /// The models requests are loading now.
    pub fn models_loading(&self) -> Vec<String> {
        self.shared.upstream.loading.models()
    }

    pub fn service_health(&self) -> ServiceHealth {
        self.shared.service.lock().unwrap_or_else(PoisonError::into_inner).clone()
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

    /// When the live session's authorization ends unless renewed (the agent
    /// renews it by itself at 80 % of its life).
    pub fn session_expires(&self) -> Option<std::time::SystemTime> {
        self.shared.current().and_then(|s| s.renewal().expires())
    }

    /// Rotates the agent credential in-band, without dropping a stream: asks
    /// the relay for a new credential, stores it atomically in `state_dir`
    /// (mode 0600), confirms, and only then does the relay revoke the old
    /// one. A failure at any step leaves a working credential: the old one
    /// until the new one is stored, the new one after.
    pub async fn rotate(&self) -> Result<Rotation, RotateError> {
        let dir = self.config().state_dir.clone().ok_or(RotateError::NoStateDir)?;
        let session = self.shared.current().ok_or(RotateError::NotConnected)?;
        let refused = |step, r: renew::Reply| match r {
            renew::Reply::Refused { code, message } => RotateError::Refused { step, code, message },
            other => RotateError::Unexpected { step, got: other.kind() },
        };
        let credential = match session.exchange(Message::Rotate(tunnel_proto::Empty {})).await? {
            renew::Reply::Credential(c) => c,
            other => return Err(refused("rotate", other)),
        };
        let path = credential::persist(&dir, &credential.secret)
            .await
            .map_err(|(path, why)| RotateError::Store { path, why })?;
        self.shared.set_token(credential.secret);
        tracing::info!(credential = %credential.id, file = %path.display(), "new agent credential {} stored in {}", credential.id, path.display());
        let confirm = Message::Rotated(tunnel_proto::Rotated { id: credential.id.clone() });
        match session.exchange(confirm).await? {
            renew::Reply::Authorized(_) => {}
            other => return Err(refused("rotated", other)),
        }
        tracing::info!(credential = %credential.id, "agent credential rotated to {}; the old one is revoked", credential.id);
        Ok(Rotation { id: credential.id, stored: path })
    }

    /// Installs a new agent token (a credential or a JWT). While connected
    /// the relay checks it in-band first (`auth`): the session goes on with
    /// it, and a refused token changes nothing. Then it is stored in
    /// `state_dir` (when there is one) and used for every later connection.
    /// Not connected: stored, used, and the agent connects at once.
    pub async fn install_token(&self, token: String) -> Result<Installed, InstallError> {
        self.install(token, true).await
    }

    async fn install(&self, token: String, persist: bool) -> Result<Installed, InstallError> {
        credential::check(&token).map_err(|e| InstallError::Invalid(e.to_string()))?;
        let session = self.shared.current();
        let in_band = match &session {
            Some(s) => {
                match s.exchange(Message::Auth(tunnel_proto::Auth { token: token.clone() })).await {
                    Ok(renew::Reply::Authorized(_)) => true,
                    Ok(renew::Reply::Refused { code, message }) => {
                        return Err(InstallError::Refused { code, message });
                    }
                    Ok(other) => return Err(InstallError::Unexpected(other.kind())),
                    // An old relay: used from the next connection.
                    Err(renew::ExchangeError::Unsupported) => false,
                    Err(e) => return Err(InstallError::Exchange(e)),
                }
            }
            None => false,
        };
        let stored = match self.config().state_dir.clone().filter(|_| persist) {
            Some(dir) => Some(
                credential::persist(&dir, &token)
                    .await
                    .map_err(|(path, why)| InstallError::Store { path, why })?,
            ),
            None => None,
        };
        self.shared.set_token(token);
        if session.is_none() {
            // Connect now rather than at the end of the backoff.
            let _ = self.command(Command::Reconnect);
        }
        tracing::info!(in_band, stored = ?stored, "agent token installed");
        Ok(Installed { in_band, stored })
    }

    /// Reads the token file again (SIGHUP) and installs its token when it
    /// changed (not copied to state_dir: the file is where it lives);
    /// failures are logged, the current token stays.
    pub async fn reload_token(&self) {
        if self.config().token_file.is_none() {
            return tracing::info!(
                "no token file to read again (the token is inline or came from tunnelctl enroll)"
            );
        }
        let Some(fresh) = self.shared.fresh_file_token() else {
            return tracing::info!("the token file is unchanged");
        };
        match self.install(fresh, false).await {
            Ok(i) => tracing::info!(in_band = i.in_band, "the token file's new token is installed"),
            Err(e) => {
                tracing::warn!(error = %e, "the token file's new token was not installed: {e}")
            }
        }
    }

    /// SIGHUP: the configuration file read again (`fresh`). The endpoint
    /// policy applies at once, the token file's new token is installed (see
    /// [`Agent::reload_token`]), and any other setting that changed is named
    /// in the log as taking a restart. A file that no longer loads changes
    /// nothing.
    pub async fn reload(&self, fresh: Result<Config, config::ConfigError>) {
        match fresh {
            Err(e) => tracing::warn!(
                error = %e,
                "the configuration file does not load ({e}); the running configuration stays: fix it and reload again"
            ),
            Ok(new) => {
                let mut changed = daemon::config::changed_settings(self.config(), &new);
                if changed.iter().any(|k| k == "policy") {
                    self.shared.upstream.set_policy(new.policy.clone());
                    tracing::info!("endpoint policy reloaded");
                }
                // The relay in force may come from an enrollment made since
                // start: only a file that names another one is a change.
                let live = self.target().map(|t| t.relay);
                changed.retain(|k| {
                    k != "policy"
                        && !(k == "target"
                            && new.target.as_ref().map(|t| &t.relay) == live.as_ref())
                });
                if !changed.is_empty() {
                    tracing::warn!(
                        settings = %changed.join(", "),
                        "changed in the configuration file: {}; they take effect at the next restart (systemctl restart agentd)",
                        changed.join(", ")
                    );
                }
            }
        }
        self.reload_token().await;
    }

    /// A round trip through the supervisor's loop (the service manager's
    /// watchdog is fed only when it answers), then the one-line status for
    /// `systemctl status`. A stopped agent answers without the loop.
    pub async fn probe(&self) -> String {
        if !matches!(self.shared.state.borrow().phase, Phase::Stopped) {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if self.commands.send(Command::Probe(reply)).await.is_ok() {
                let _ = answer.await;
            }
        }
        self.status_line()
    }

    /// What the agent does, in one line: `connected to relay.example.com,
    /// 3 streams, rtt 12 ms`, `reconnecting in 8 s: cannot reach the relay:
    /// connection refused`.
    pub fn status_line(&self) -> String {
        let state = self.shared.state.borrow().clone();
        let target = self.target();
        let relay = target.as_ref().map_or("the relay", |t| t.host());
        let last = state.last_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default();
        match state.phase {
            Phase::Idle => "starting".to_owned(),
            Phase::NotEnrolled => {
                "not enrolled: run tunnelctl enroll wss://RELAY (credential on stdin)".to_owned()
            }
            Phase::Connecting => format!("connecting to {relay}{last}"),
            Phase::Connected { .. } => {
                let streams = self.in_flight();
                let plural = if streams == 1 { "" } else { "s" };
                match self.rtt() {
                    Some(rtt) => format!(
                        "connected to {relay}, {streams} stream{plural}, rtt {} ms",
                        rtt.as_millis()
                    ),
                    None => format!("connected to {relay}, {streams} stream{plural}"),
                }
            }
            Phase::BackingOff { until } => {
                let wait = until.duration_since(std::time::SystemTime::now()).unwrap_or_default();
                format!("reconnecting in {} s{last}", wait.as_secs_f64().ceil() as u64)
            }
            Phase::Revoked => "not connected: the credential was revoked; install a new one with \
                `tunnelctl rotate-token` (on stdin) or `tunnelctl enroll`"
                .to_owned(),
            Phase::Stopped => "stopped".to_owned(),
        }
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
        reconnect::run(self.shared.clone(), inbox, shutdown).await
    }
}
