//! The hub: the agent sessions this relay holds, by user. Sessions
//! register and leave here; requests never look here directly but ask the
//! [`crate::route::Router`], which answers local routes from it.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::watch;

use crate::session::{CloseReason, Session};

/// Live sessions by user id. Only configured users can register, so the map
/// is bounded by the configuration.
#[derive(Debug)]
pub struct Hub {
    sessions: RwLock<HashMap<String, Arc<Session>>>,
    /// Bumped on every registration and removal, so waiters can re-check.
    changed: watch::Sender<u64>,
}

impl Default for Hub {
    fn default() -> Self {
        Self { sessions: RwLock::new(HashMap::new()), changed: watch::channel(0).0 }
    }
}

impl Hub {
    /// The session serving `user`, if one is connected.
    pub fn get(&self, user: &str) -> Option<Arc<Session>> {
        self.sessions.read().unwrap_or_else(PoisonError::into_inner).get(user).cloned()
    }

    /// Makes `session` the one serving its user. A previous session of the
    /// same user is closed: its streams end with a clean error.
    pub fn register(&self, session: Arc<Session>) {
        let old = self
            .sessions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session.user.clone(), session);
        if let Some(old) = old {
            old.close(CloseReason::Replaced);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Removes `session` if it is still the one registered for its user.
    pub fn remove(&self, session: &Session) {
        let mut map = self.sessions.write().unwrap_or_else(PoisonError::into_inner);
        if map.get(&session.user).is_some_and(|s| s.id == session.id) {
            map.remove(&session.user);
            drop(map);
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Number of connected agents.
    pub fn len(&self) -> usize {
        self.sessions.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// All sessions (for shutdown and status).
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// Waits until `pred(hub)` holds; re-checked on every change.
    pub async fn wait_until(&self, mut pred: impl FnMut(&Hub) -> bool) {
        let mut rx = self.changed.subscribe();
        loop {
            if pred(self) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}
