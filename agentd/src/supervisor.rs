//! The supervisor: what the agent's loop ([`crate::reconnect`]) shares with
//! the agent's handle, the commands it takes while running, and the local
//! service's health check.
//!
//! One loop owns the relay connection. Commands arrive on a bounded
//! channel ([`Command`]): reconnect (in-flight streams finish first),
//! replace the credential, shut down, probe. The state ([`AgentState`])
//! goes out on a watch channel: what `tunnelctl status`, metrics and tests
//! read.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use tunnel_proto::flow::BufferGauge;

use crate::Config;
use crate::renew;
use crate::session::Session;
pub use crate::state::{AgentError, AgentState, Phase};
pub(crate) use crate::upstream::Upstream;

/// How often the local service's health is checked.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// The soonest a check follows the last one when a request found the
/// service up (or down) against what that check said.
const RECHECK_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Checks the local service every [`HEALTH_INTERVAL`] until `stop`; tells
/// the relay between checks when the models requests are loading change.
pub(crate) async fn watch_service(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let health = crate::inventory::check(&shared.upstream).await;
        shared
            .upstream
            .seen_reachable
            .store(health.reachable, std::sync::atomic::Ordering::Relaxed);
        shared.upstream.loading.set_loaded(&health.models);
        *shared.service.lock().unwrap_or_else(PoisonError::into_inner) = health;
        shared.report_service();
        let next = tokio::time::sleep(HEALTH_INTERVAL);
        tokio::pin!(next);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                () = &mut next => break,
                // A request found the service in another state than the
                // last check: look again now, but not more than once a
                // second.
                () = shared.upstream.recheck.notified() => {
                    tokio::time::sleep(RECHECK_AT_MOST_EVERY).await;
                    break;
                }
                () = shared.upstream.loading.changed.notified() => shared.report_service(),
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
    /// Publishes what the agent is doing.
    pub(crate) fn set_phase(&self, phase: Phase) {
        self.state.send_modify(|s| s.phase = phase);
    }

    pub fn current(&self) -> Option<Arc<Session>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(crate) fn set_current(&self, session: Option<Arc<Session>>) {
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
        self.credential.fresh_from_file(self.config.token_file.as_deref())
    }

    /// Uses the token file's content when it changed since last read.
    pub(crate) fn adopt_fresh_file_token(&self) -> bool {
        self.credential.adopt_from_file(self.config.token_file.as_deref())
    }

    /// Tells the relay, when connected, what the last check found of the
    /// local service and which models requests are loading.
    pub(crate) fn report_service(&self) {
        let Some(session) = self.current() else { return };
        let health = self.service.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if health.checked.is_some() {
            let loading = self.upstream.loading.models();
            session.report_service(health.report(&loading, &self.config.routing));
        }
    }

    /// Falls back to the configured token after the relay refused the
    /// stored credential.
    pub(crate) fn fall_back(&self) -> bool {
        self.credential.fall_back()
    }
}

/// A session's renewal, with the agent's tokens.
pub(crate) struct SessionRenew {
    pub shared: Arc<Shared>,
    pub session: Arc<Session>,
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
