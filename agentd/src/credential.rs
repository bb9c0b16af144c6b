//! The one owner of the agent's credential: where it is kept and what a
//! token must look like, which token the agent starts with (a stored
//! credential before the configured token), the token the next connection
//! presents, the configured token kept behind a stored credential, the
//! token file as last read, and writing a new credential to `state_dir`
//! (mode 0600). Every change of the live token goes through here: an
//! enrollment, a rotation, an install, a token file renewed by an identity
//! provider's tooling, the fall-back after a refusal.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use daemon::ConfigError;
use daemon::config::read_secret;

/// Where a rotated, installed or enrolled credential is kept.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("credential")
}

/// A token fit for an `Authorization` header and the protocol.
pub fn check(token: &str) -> Result<(), ConfigError> {
    if token.is_empty()
        || token.len() > tunnel_proto::message::MAX_TOKEN_LEN
        || token.bytes().any(|b| !(0x21..0x7f).contains(&b))
    {
        return Err(ConfigError::Invalid(
            "the agent token must be 1 to 8192 printable ASCII characters without spaces".into(),
        ));
    }
    Ok(())
}

/// The tokens the agent starts with.
#[derive(Debug, Clone, Default)]
pub struct Starting {
    /// The stored credential when `state_dir` holds one, else the
    /// configured token; `None` until enrolled.
    pub token: Option<String>,
    /// The configured token, when the stored credential shadows a different
    /// one: tried if the relay refuses the stored one.
    pub fallback: Option<String>,
    /// The configured token (inline, token file or systemd credential).
    pub configured: Option<String>,
}

impl Starting {
    /// Prefers the credential stored in `state_dir` over the `configured`
    /// token; both are checked.
    pub fn load(state_dir: Option<&Path>, configured: Option<String>) -> Result<Self, ConfigError> {
        let stored = match state_dir.map(path) {
            Some(file) if file.exists() => Some(read_secret(&file)?),
            _ => None,
        };
        // Neither: not enrolled yet; agentd waits for `tunnelctl enroll`.
        let (token, fallback) = match (stored, configured.clone()) {
            (Some(s), Some(c)) if s != c => (Some(s), Some(c)),
            (Some(s), _) => (Some(s), None),
            (None, Some(c)) => (Some(c), None),
            (None, None) => (None, None),
        };
        for t in token.iter().chain(&fallback) {
            check(t)?;
        }
        Ok(Self { token, fallback, configured })
    }
}

/// The token `file` holds now (a JWT an identity provider's tooling
/// renewed), checked.
pub fn reread(file: &Path) -> Result<String, ConfigError> {
    read_secret(file).and_then(|t| check(&t).map(|()| t))
}

/// Writes `secret` as the credential in `state_dir` (atomically, mode
/// 0600) off the async threads; returns the file, or why it failed.
pub async fn persist(state_dir: &Path, secret: &str) -> Result<PathBuf, (PathBuf, String)> {
    let file = path(state_dir);
    let (to, secret) = (file.clone(), secret.to_owned());
    tokio::task::spawn_blocking(move || daemon::config::write_secret(&to, &secret))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map(|()| file.clone())
        .map_err(|why| (file, why))
}

/// The agent's credential and where it came from.
#[derive(Debug)]
pub struct Credential {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The token the next connection presents (empty: not enrolled).
    token: String,
    /// The configured token, while a stored credential shadows it: tried
    /// once if the relay refuses the stored one.
    fallback: Option<String>,
    /// The token file's content when last read.
    file_token: Option<String>,
}

impl Credential {
    /// Starts with `start`'s tokens.
    pub fn new(start: &Starting) -> Self {
        Self {
            inner: Mutex::new(Inner {
                token: start.token.clone().unwrap_or_default(),
                fallback: start.fallback.clone(),
                file_token: start.configured.clone(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The token the next connection presents (empty: none yet).
    pub fn token(&self) -> String {
        self.lock().token.clone()
    }

    /// Uses `token` from now on; the configured one no longer backs it up.
    pub fn set(&self, token: String) {
        let mut c = self.lock();
        c.token = token;
        c.fallback = None;
    }

    /// The token file's content, when it changed since it was last read.
    pub fn fresh_from_file(&self, token_file: Option<&Path>) -> Option<String> {
        let fresh = match reread(token_file?) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the token file again: {e}; keeping the token in use");
                return None;
            }
        };
        let mut c = self.lock();
        if c.file_token.as_ref() == Some(&fresh) {
            return None;
        }
        c.file_token = Some(fresh.clone());
        Some(fresh)
    }

    /// Uses the token file's content when it changed since last read.
    pub fn adopt_from_file(&self, token_file: Option<&Path>) -> bool {
        match self.fresh_from_file(token_file) {
            Some(t) => {
                self.set(t);
                true
            }
            None => false,
        }
    }

    /// Falls back to the configured token after the relay refused the
    /// stored credential; `false` when there is none to fall back to.
    pub fn fall_back(&self) -> bool {
        let mut c = self.lock();
        match c.fallback.take() {
            Some(configured) => {
                c.token = configured;
                true
            }
            None => false,
        }
    }
}
