//! The one owner of the agent's credential: the token the next connection
//! presents, the configured token kept behind a stored credential, and the
//! token file as last read. Every change of the live token goes through
//! here: an enrollment, a rotation, an install, a token file renewed by an
//! identity provider's tooling, the fall-back after a refusal.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::Config;

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
    /// What `config` starts with: the stored credential, else the configured
    /// token (see `Config::token`).
    pub fn new(config: &Config) -> Self {
        Self {
            inner: Mutex::new(Inner {
                token: config.token.clone().unwrap_or_default(),
                fallback: config.fallback.clone(),
                file_token: config.configured_token.clone(),
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

    /// The token file's content, when it changed since it was last read
    /// (`config` names the file).
    pub fn fresh_from_file(&self, config: &Config) -> Option<String> {
        let fresh = match config.reread_token()? {
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
    pub fn adopt_from_file(&self, config: &Config) -> bool {
        match self.fresh_from_file(config) {
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
