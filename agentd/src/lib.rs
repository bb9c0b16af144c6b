//! agentd: the desktop side of the tunnel.
//!
//! Keeps one WebSocket to the relay ([`connect`]), serves each tunnelled
//! request against the local service ([`forward`]) and reconnects with
//! jittered backoff ([`backoff`]) when the session ends. An offline machine
//! still starts: the agent keeps trying in the background.
//!
//! [`Agent::new`] does no I/O; [`Agent::run`] runs until the shutdown token
//! fires, so tests run agents in-process and watch [`Agent::state`].

pub mod backoff;
pub mod config;
pub mod connect;
pub mod forward;
pub mod metrics;
pub mod session;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use tunnel_proto::flow::BufferGauge;

pub use config::{Config, ConfigFile};

use crate::backoff::Backoff;
use crate::connect::ConnectError;
use crate::forward::Upstream;
use crate::session::{Session, SessionEnd};

/// What the agent is doing, as `tunnelctl status` and tests see it.
#[derive(Debug, Clone, Default)]
pub struct AgentState {
    pub connected: bool,
    pub session_id: Option<String>,
    pub since: Option<SystemTime>,
    /// Sessions established since start.
    pub sessions: u64,
    pub last_error: Option<String>,
}

use crate::session::DRAIN_DEADLINE;

pub struct Agent {
    config: Config,
    state: watch::Sender<AgentState>,
    gauge: Arc<BufferGauge>,
    /// The live session, for its stream count.
    current: std::sync::Mutex<Option<Arc<Session>>>,
}

impl Agent {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            state: watch::channel(AgentState::default()).0,
            gauge: Arc::new(BufferGauge::default()),
            current: std::sync::Mutex::new(None),
        }
    }

    /// Requests in flight in the current session.
    pub fn in_flight(&self) -> usize {
        let current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        current.as_ref().map_or(0, |s| s.in_flight())
    }

    /// The Prometheus text `GET /metrics` answers.
    pub fn metrics(&self) -> String {
        metrics::render(self)
    }

    pub fn state(&self) -> watch::Receiver<AgentState> {
        self.state.subscribe()
    }

    /// Request-body bytes buffered in the agent right now and at peak.
    pub fn buffered(&self) -> &Arc<BufferGauge> {
        &self.gauge
    }

    /// Connects, serves, reconnects; returns once `shutdown` fires and the
    /// in-flight streams ended (or the drain deadline passed).
    pub async fn run(&self, shutdown: CancellationToken) {
        let upstream = Arc::new(Upstream::new(
            self.config.upstream.clone(),
            self.config.limits.max_headers as usize,
        ));
        let tasks = TaskTracker::new();
        let mut backoff = Backoff::new(Duration::from_secs(1), self.config.reconnect_max_delay);
        while !shutdown.is_cancelled() {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = connect::connect(&self.config) => r,
            };
            let delay = match attempt {
                Ok(conn) => {
                    let started = Instant::now();
                    let (session, rx) = Session::new(
                        conn.session_id.clone(),
                        conn.relay_limits,
                        self.config.limits,
                        self.gauge.clone(),
                        session::Liveness {
                            ping_interval: self.config.ping_interval,
                            max_missed: self.config.max_missed_pings,
                        },
                        conn.relay_acks,
                    );
                    info!(session = %session.id, relay = %self.config.relay, "connected to the relay");
                    self.state.send_modify(|s| {
                        s.connected = true;
                        s.session_id = Some(session.id.clone());
                        s.since = Some(SystemTime::now());
                        s.sessions += 1;
                        s.last_error = None;
                    });
                    *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(session.clone());
                    let end = session
                        .clone()
                        .run(conn.socket, rx, upstream.clone(), tasks.clone(), shutdown.clone())
                        .await;
                    *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                    self.state.send_modify(|s| {
                        s.connected = false;
                        s.session_id = None;
                        s.since = None;
                        if let SessionEnd::Lost(why) = &end {
                            s.last_error = Some(why.clone());
                        }
                    });
                    if started.elapsed() >= self.config.healthy_after {
                        backoff.reset();
                    }
                    match end {
                        SessionEnd::Shutdown => break,
                        // A drain is not a failure: come back when asked,
                        // spread a little so a relay's agents do not return
                        // in one instant.
                        SessionEnd::Goaway(retry) => {
                            retry + retry.mul_f64(rand::random::<f64>() * 0.5)
                        }
                        SessionEnd::Lost(why) => {
                            warn!(reason = %why, "relay session lost");
                            backoff.next_delay()
                        }
                    }
                }
                Err(e) => {
                    let delay = match &e {
                        // A refused credential will not fix itself quickly.
                        ConnectError::Unauthorized(_) => {
                            backoff.ceiling().max(self.config.reconnect_max_delay)
                        }
                        _ => backoff.next_delay(),
                    };
                    warn!(error = %e, retry_in = ?delay, "cannot connect to the relay");
                    self.state.send_modify(|s| s.last_error = Some(e.to_string()));
                    delay
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        tasks.close();
        let _ = tokio::time::timeout(DRAIN_DEADLINE, tasks.wait()).await;
        info!("agent stopped");
    }
}

/// Runs an agent with `config` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) {
    Agent::new(config).run(shutdown).await
}
