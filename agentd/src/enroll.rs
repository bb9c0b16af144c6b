//! First run without editing files: `tunnelctl enroll wss://relay.example.com`
//! (the credential on stdin) stores the relay in `state_dir/enrollment.toml`
//! and the credential in `state_dir/credential`, and the agent connects. A
//! relay named in the configuration file wins: enrolling elsewhere is
//! refused, enrolling with the same relay only stores the credential.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{self, ConfigError, Target};
use crate::enrollment::{Enrollment, write};
use crate::{Agent, AgentState, Command, Phase};

/// How long [`Agent::enroll`] waits for the first attempt's outcome.
pub const FIRST_ATTEMPT: Duration = Duration::from_secs(5);

/// Why an enrollment was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the configuration file sets relay = {configured}, and it wins: edit it there, or enroll with that relay"
    )]
    ConfigWins { configured: String },
    #[error("no agent credential: give one on stdin")]
    NoToken,
    #[error("enrolling needs a state directory (state_dir, or systemd's StateDirectory=)")]
    NoStateDir,
    #[error("cannot store the enrollment in {}: {why}", path.display())]
    Store { path: PathBuf, why: String },
}

/// What an enrollment did, and how the first attempt went.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The relay's WebSocket URL as the agent uses it.
    pub relay: String,
    /// The state directory it is stored in.
    pub stored: PathBuf,
    /// The agent's state after the first attempt (or after
    /// [`FIRST_ATTEMPT`]).
    pub state: AgentState,
}

impl Agent {
    /// Enrolls the agent with `relay` (and `token`, or the one it has):
    /// stores both in `state_dir`, connects, and waits (bounded) for the
    /// first attempt's outcome. Re-enrolling moves the agent to the new
    /// relay once the live session's streams finished.
    pub async fn enroll(
        &self,
        relay: &str,
        token: Option<String>,
        pins: Vec<String>,
    ) -> Result<Enrolled, EnrollError> {
        let dir = self.config().state_dir.clone().ok_or(EnrollError::NoStateDir)?;
        let invalid = |e: ConfigError| EnrollError::Invalid(e.to_string());
        let configured = self.target().filter(|t| t.configured);
        let target = match &configured {
            Some(c) => {
                let url = config::relay_url(relay).map_err(invalid)?;
                if url != c.relay {
                    return Err(EnrollError::ConfigWins { configured: c.relay.to_string() });
                }
                c.clone()
            }
            None => {
                let mut all = self.config().pins.clone();
                all.extend(pins.iter().cloned());
                let c = self.config();
                Target::new(relay, &all, c.ca_file.as_deref(), c.allow_plaintext, false)
                    .map_err(invalid)?
            }
        };
        if let Some(t) = &token {
            crate::credential::check(t).map_err(invalid)?;
        } else if self.shared.token().is_empty() {
            return Err(EnrollError::NoToken);
        }
        let enrollment = Enrollment { relay: target.relay.to_string(), pins };
        let (store_dir, secret, record) = (dir.clone(), token.clone(), configured.is_none());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let Some(secret) = secret {
                daemon::config::write_secret(&crate::credential::path(&store_dir), &secret)?;
            }
            if record {
                write(&store_dir, &enrollment)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|why| EnrollError::Store { path: dir.clone(), why })?;

        let mut state = self.state();
        let relay = target.relay.to_string();
        tracing::info!(relay = %relay, "enrolled with {relay}");
        self.shared.set_target(target);
        if let Some(t) = token {
            self.shared.set_token(t);
        }
        // Connect now: from the wait for enrollment, the backoff, or (the
        // streams finishing first) the live session.
        let _ = self.command(Command::Reconnect);
        // The first attempt: it starts (Connecting), then connects or backs
        // off with its reason.
        let mut attempted = false;
        let outcome = tokio::time::timeout(FIRST_ATTEMPT, async {
            loop {
                {
                    let s = state.borrow_and_update();
                    match s.phase {
                        Phase::Connecting => attempted = true,
                        Phase::Connected { .. } | Phase::BackingOff { .. } if attempted => {
                            return;
                        }
                        _ => {}
                    }
                }
                if state.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if outcome.is_err() {
            tracing::debug!("the first attempt after enrolling is still running");
        }
        Ok(Enrolled { relay, stored: dir, state: self.state().borrow().clone() })
    }
}
