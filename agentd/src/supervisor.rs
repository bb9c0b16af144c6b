//! The supervisor: the agent's reconnect loop, the commands it takes while
//! running, and the typed state it publishes.
//!
//! One loop owns the relay connection: connect, run the session until it
//! ends, back off (jittered, reset once a session proved healthy), repeat.
//! Commands arrive on a bounded channel ([`Command`]): reconnect (in-flight
//! streams finish first), replace the credential, shut down. The state
//! ([`AgentState`]) goes out on a watch channel: what `tunnelctl status`,
//! metrics and tests read.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use link::End;
use tunnel_proto::flow::BufferGauge;

use crate::Config;
use crate::backoff::Backoff;
use crate::connect::{self, ConnectError};
use crate::renew;
use crate::session::{DRAIN_DEADLINE, Session, SessionEnd, SessionParams};
use crate::state::describe;
pub use crate::state::{AgentError, AgentState, Phase};
pub(crate) use crate::upstream::Upstream;

/// How often the local service's health is checked.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// The soonest a check follows the last one when a request found the
/// service up (or down) against what that check said.
const RECHECK_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Checks the local service every [`HEALTH_INTERVAL`] until `stop`.
async fn watch_service(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let health = shared.upstream.health().await;
        if let Some(session) = shared.current() {
            session.report_service(&health);
        }
        shared
            .upstream
            .seen_reachable
            .store(health.reachable, std::sync::atomic::Ordering::Relaxed);
        *shared.service.lock().unwrap_or_else(PoisonError::into_inner) = health;
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
            // A request found the service in another state than the last
            // check: look again now, but not more than once a second.
            () = shared.upstream.recheck.notified() => {
                tokio::time::sleep(RECHECK_AT_MOST_EVERY).await;
            }
        }
    }
}

/// Commands that may wait for the supervisor; more are refused.
pub const COMMAND_QUEUE: usize = 8;

/// What the agent can be told while it runs.
#[derive(Debug)]
pub enum Command {
    /// End the session once its streams finished, and connect again now.
    Reconnect,
    /// Use this agent token from the next connection on; when not
    /// connected, retry at once.
    ReplaceToken(String),
    /// Drain and stop.
    Shutdown,
    /// Answer at once: the loop turns (the service manager's watchdog is
    /// fed only when it does).
    Probe(tokio::sync::oneshot::Sender<()>),
}

/// What the supervisor shares with the agent's handle.
pub(crate) struct Shared {
    pub config: Config,
    /// The relay connections go to; `None` until enrolled.
    pub target: Mutex<Option<crate::config::Target>>,
    /// The agent's credential (its one owner).
    pub credential: crate::credential::Credential,
    pub state: watch::Sender<AgentState>,
    pub gauge: Arc<BufferGauge>,
    /// The live session, for its stream count and commands.
    pub current: Mutex<Option<Arc<Session>>>,
    /// The local service, its policy and request counters.
    pub upstream: Arc<Upstream>,
    /// The pin of the relay's key seen on the last TLS connection.
    pub relay_pin: Mutex<Option<String>>,
    /// The local service as last checked.
    pub service: Mutex<crate::ServiceHealth>,
}

impl Shared {
    pub fn current(&self) -> Option<Arc<Session>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set_current(&self, session: Option<Arc<Session>>) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = session;
    }

    pub fn target(&self) -> Option<crate::config::Target> {
        self.target.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Connects to `target` from the next attempt on.
    pub fn set_target(&self, target: crate::config::Target) {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) = Some(target);
    }

    pub fn token(&self) -> String {
        self.credential.token()
    }

    /// Uses `token` from now on; the configured one no longer backs it up.
    pub fn set_token(&self, token: String) {
        self.credential.set(token);
    }

    /// The token file's content, when it changed since it was last read.
    pub fn fresh_file_token(&self) -> Option<String> {
        self.credential.fresh_from_file(&self.config)
    }

    /// Uses the token file's content when it changed since last read.
    fn adopt_fresh_file_token(&self) -> bool {
        self.credential.adopt_from_file(&self.config)
    }

    /// Falls back to the configured token after the relay refused the
    /// stored credential.
    fn fall_back(&self) -> bool {
        self.credential.fall_back()
    }
}

/// A session's renewal, with the agent's tokens.
struct SessionRenew {
    shared: Arc<Shared>,
    session: Arc<Session>,
}

impl renew::Renew for SessionRenew {
    fn renewal(&self) -> &renew::Renewal {
        self.session.renewal()
    }

    fn push(&self, msg: tunnel_proto::Message) {
        self.session.push(msg);
    }

    fn fresh_token(&self) -> Option<String> {
        self.shared.fresh_file_token()
    }

    fn adopt(&self, token: String) {
        self.shared.set_token(token);
    }
}

/// What the loop does after a command.
enum Next {
    /// Keep waiting.
    Stay,
    /// Stop waiting and connect now.
    Retry,
    /// Stop.
    Stop,
}

/// Runs the reconnect loop until `shutdown` or [`Command::Shutdown`], then
/// waits (bounded) for the streams still running.
pub(crate) async fn run(
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    let mut commands = Commands(Some(commands));
    let config = &shared.config;
    let stop = shutdown.child_token();
    let upstream = shared.upstream.clone();
    tokio::spawn(watch_service(shared.clone(), stop.clone()));
    let tasks = TaskTracker::new();
    let mut backoff = Backoff::new(Duration::from_secs(1), config.reconnect_max_delay);
    let set_phase = |phase| shared.state.send_modify(|s| s.phase = phase);
    'outer: while !stop.is_cancelled() {
        let token = shared.token();
        let Some(target) = shared.target().filter(|_| !token.is_empty()) else {
            // First run: stay up, say so, wait to be enrolled.
            set_phase(Phase::NotEnrolled);
            info!(
                "not enrolled: waiting for `tunnelctl enroll wss://RELAY` (the credential on stdin)"
            );
            match wait_for_command(&shared, &mut commands, &stop).await {
                Next::Stop => break 'outer,
                _ => continue 'outer,
            }
        };
        set_phase(Phase::Connecting);
        let attempt = connect::connect(config, &target, &token);
        tokio::pin!(attempt);
        let attempt = loop {
            tokio::select! {
                _ = stop.cancelled() => break 'outer,
                r = &mut attempt => break r,
                cmd = commands.next() => match handle(&shared, cmd, &stop) {
                    // A new token or a reconnect: dial again with it.
                    Next::Retry => continue 'outer,
                    Next::Stop => break 'outer,
                    Next::Stay => {}
                },
            }
        };
        let delay = match attempt {
            Ok(conn) => {
                let started = Instant::now();
                *shared.relay_pin.lock().unwrap_or_else(PoisonError::into_inner) =
                    conn.relay_pin.clone();
                let (session, rx) = Session::new(SessionParams {
                    id: conn.session_id.clone(),
                    peer: conn.relay_limits,
                    local: config.limits,
                    gauge: shared.gauge.clone(),
                    liveness: config.liveness,
                    acks: conn.relay_acks,
                    service_reports: conn.relay_service,
                    upstream: upstream.clone(),
                    tasks: tasks.clone(),
                    renewal: renew::Renewal::new(
                        conn.relay_auth,
                        conn.expires,
                        conn.access_token.is_some(),
                    ),
                });
                info!(session = %session.id, relay = %target.relay, "connected to the relay {} (session {})", target.host(), session.id);
                shared.state.send_modify(|s| {
                    s.phase = Phase::Connected {
                        session_id: session.id.clone(),
                        since: SystemTime::now(),
                    };
                    s.sessions += 1;
                    s.last_error = None;
                });
                shared.set_current(Some(session.clone()));
                let seen = shared.service.lock().unwrap_or_else(PoisonError::into_inner).clone();
                if seen.checked.is_some() {
                    session.report_service(&seen);
                }
                let run = session.clone().run(conn.socket, rx, stop.clone());
                tokio::pin!(run);
                let renewing = SessionRenew { shared: shared.clone(), session: session.clone() };
                let keeper = renew::keep_authorized(Arc::new(renewing), session.id.clone());
                tokio::pin!(keeper);
                let mut keeping = true;
                let end = loop {
                    tokio::select! {
                        end = &mut run => break end,
                        () = &mut keeper, if keeping => keeping = false,
                        cmd = commands.next() => match handle(&shared, cmd, &stop) {
                            Next::Retry => session.reconnect(),
                            // The session sees `stop` and drains.
                            Next::Stop | Next::Stay => {}
                        },
                    }
                };
                shared.set_current(None);
                if started.elapsed() >= config.healthy_after {
                    backoff.reset();
                }
                match end {
                    SessionEnd::Shutdown => break,
                    SessionEnd::Reconnect => Duration::ZERO,
                    // A drain is not a failure: come back when asked,
                    // spread a little so a relay's agents do not return in
                    // one instant.
                    SessionEnd::Goaway(retry) => retry + retry.mul_f64(rand::random::<f64>() * 0.5),
                    SessionEnd::Lost(End::PeerClosed(Some((code, _))))
                        if code == tunnel_proto::CLOSE_REVOKED =>
                    {
                        after_revocation(&shared)
                    }
                    SessionEnd::Lost(end) => {
                        let why = describe(&end);
                        warn!(reason = %why, "relay session lost: {why}; reconnecting");
                        shared
                            .state
                            .send_modify(|s| s.last_error = Some(AgentError::SessionLost(why)));
                        backoff.next_delay()
                    }
                }
            }
            Err(ConnectError::Revoked) => after_revocation(&shared),
            Err(e) => {
                let delay = match &e {
                    // The token file holds a newer token (an identity
                    // provider's tooling renewed an expired JWT): use it.
                    ConnectError::Unauthorized(_) if shared.adopt_fresh_file_token() => {
                        info!(
                            "the relay refused the token; the token file holds a new one, trying it"
                        );
                        Duration::ZERO
                    }
                    // The stored credential was refused (revoked?) and the
                    // configured token differs: try that one at once.
                    ConnectError::Unauthorized(_) if shared.fall_back() => {
                        warn!(error = %e, "the relay refused the stored credential ({e}); trying the configured token");
                        Duration::ZERO
                    }
                    // A refused credential or a pin mismatch will not fix
                    // itself quickly: the longest wait, spread so agents
                    // refused together do not return together.
                    ConnectError::Unauthorized(_) | ConnectError::PinMismatch(_) => {
                        let slow = backoff.ceiling().max(config.reconnect_max_delay);
                        slow.mul_f64(0.5 + rand::random::<f64>() * 0.5)
                    }
                    _ => backoff.next_delay(),
                };
                if let ConnectError::PinMismatch(m) = &e {
                    *shared.relay_pin.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(m.seen.clone());
                }
                let error = AgentError::from(e);
                warn!(
                    error = %error,
                    retry_in = ?delay,
                    "cannot connect to {}: {error}; retrying in {}",
                    target.host(),
                    seconds(delay)
                );
                shared.state.send_modify(|s| s.last_error = Some(error));
                delay
            }
        };
        if delay == REVOKED {
            set_phase(Phase::Revoked);
            match wait_for_command(&shared, &mut commands, &stop).await {
                Next::Stop => break 'outer,
                _ => continue 'outer,
            }
        }
        if delay.is_zero() {
            continue;
        }
        set_phase(Phase::BackingOff { until: SystemTime::now() + delay });
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break 'outer,
                _ = &mut sleep => break,
                cmd = commands.next() => match handle(&shared, cmd, &stop) {
                    Next::Retry => break,
                    Next::Stop => break 'outer,
                    Next::Stay => {}
                },
            }
        }
    }
    set_phase(Phase::Stopped);
    // Probes queued now are answered by the stopped phase.
    drop(commands);
    tasks.close();
    let _ = tokio::time::timeout(DRAIN_DEADLINE, tasks.wait()).await;
    info!("agent stopped");
}

/// The "delay" that means: no more attempts until a new credential.
const REVOKED: Duration = Duration::MAX;

/// `d` in whole seconds, for messages.
fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64().ceil() as u64)
}

/// The relay revoked the credential in use: a newer token in the token
/// file, or the configured token behind a stored credential, is tried at
/// once; otherwise [`REVOKED`].
fn after_revocation(shared: &Shared) -> Duration {
    if shared.adopt_fresh_file_token() {
        info!("the relay revoked the credential; the token file holds a new one, trying it");
        return Duration::ZERO;
    }
    if shared.fall_back() {
        warn!("the relay revoked the stored credential; trying the configured token");
        return Duration::ZERO;
    }
    let error = AgentError::Revoked;
    warn!(error = %error, "{error}");
    shared.state.send_modify(|s| s.last_error = Some(error));
    REVOKED
}

/// Waits for a command that calls for an attempt (a new token, a
/// reconnect) or a stop.
async fn wait_for_command(
    shared: &Shared,
    commands: &mut Commands,
    stop: &CancellationToken,
) -> Next {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Next::Stop,
            cmd = commands.next() => match handle(shared, cmd, stop) {
                Next::Stay => {}
                next => return next,
            },
        }
    }
}

/// The command channel; once every sender is gone it pends forever
/// instead of answering `None` in a loop.
struct Commands(Option<mpsc::Receiver<Command>>);

impl Commands {
    async fn next(&mut self) -> Command {
        if let Some(rx) = &mut self.0 {
            if let Some(cmd) = rx.recv().await {
                return cmd;
            }
            self.0 = None;
        }
        std::future::pending().await
    }
}

/// Applies a command; what the loop should do next.
fn handle(shared: &Shared, cmd: Command, stop: &CancellationToken) -> Next {
    match cmd {
        Command::Reconnect => {
            info!("reconnecting on request");
            Next::Retry
        }
        Command::ReplaceToken(token) => {
            info!("agent token replaced; used from the next connection");
            shared.set_token(token);
            if shared.current().is_some() { Next::Stay } else { Next::Retry }
        }
        Command::Shutdown => {
            stop.cancel();
            Next::Stop
        }
        Command::Probe(reply) => {
            let _ = reply.send(());
            Next::Stay
        }
    }
}
