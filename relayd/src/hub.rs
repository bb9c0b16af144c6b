//! The hub: the agent sessions this relay holds, by user and then by
//! device. Sessions register and leave here; requests never look here
//! directly but ask the [`crate::route::Router`], which answers local
//! routes from it.
//!
//! A user may run agents on several devices (one session each); a device
//! that connects again replaces its own older session, never another
//! device's.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::watch;

use crate::session::{CloseReason, Session};

/// Live sessions by user id, then device. Only configured or token-proven
/// users can register, and each has at most the configured number of
/// devices, so the map is bounded.
#[derive(Debug)]
pub struct Hub {
    /// Each user's sessions, oldest first (a handful per user: a vector
    /// beats a map).
    users: RwLock<HashMap<String, Vec<Arc<Session>>>>,
    /// Sessions in all.
    count: std::sync::atomic::AtomicUsize,
    /// Bumped on every registration and removal, so waiters can re-check.
    changed: watch::Sender<u64>,
    /// What devices that left had on their services, by user: so that a
    /// request for a model only they have is told to come back, not that
    /// the model does not exist.
    gone: std::sync::Mutex<HashMap<String, Vec<Gone>>>,
}

/// A device that left, and the models its service had.
#[derive(Debug, Clone)]
pub struct Gone {
    pub device: String,
    pub models: Vec<String>,
    pub left: std::time::Instant,
}

/// How long the models of a device that left are remembered.
const GONE_FOR: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Devices that left remembered per user, and users in all (the oldest
/// go first).
const GONE_PER_USER: usize = 16;
const GONE_USERS: usize = 65_536;

impl Default for Hub {
    fn default() -> Self {
        Self {
            users: RwLock::new(HashMap::new()),
            count: std::sync::atomic::AtomicUsize::new(0),
            changed: watch::channel(0).0,
            gone: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

/// Why a session was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyDevices {
    /// The limit it would have exceeded.
    pub limit: usize,
}

impl Hub {
    /// The sessions serving `user`, oldest first (empty: none connected).
    pub fn devices(&self, user: &str) -> Vec<Arc<Session>> {
        self.read().get(user).cloned().unwrap_or_default()
    }

    /// What `pick` makes of `user`'s sessions, oldest first (empty: none
    /// connected), read in place: a route costs no copy of the list.
    pub fn pick<R>(&self, user: &str, pick: impl FnOnce(&[Arc<Session>]) -> R) -> R {
        pick(self.read().get(user).map_or(&[][..], Vec::as_slice))
    }

    /// The session serving `user`'s `device`, if it is connected.
    pub fn device(&self, user: &str, device: &str) -> Option<Arc<Session>> {
        self.read().get(user)?.iter().find(|s| s.device == device).cloned()
    }

    /// Whether `user`'s `device` may register now: it is connected
    /// already (it will replace itself), or the user has fewer than
    /// `limit` devices connected.
    pub fn admits(&self, user: &str, device: &str, limit: usize) -> Result<(), TooManyDevices> {
        let users = self.read();
        let sessions = users.get(user).map_or(&[][..], Vec::as_slice);
        if sessions.len() < limit || sessions.iter().any(|s| s.device == device) {
            Ok(())
        } else {
            Err(TooManyDevices { limit })
        }
    }

    /// Makes `session` the one serving its user's device. A previous
    /// session of the same device is closed: its streams end with a clean
    /// error. Refused when the user has `limit` other devices connected.
    pub fn register(&self, session: Arc<Session>, limit: usize) -> Result<(), TooManyDevices> {
        let old = {
            let mut users = self.write();
            let sessions = users.entry(session.user.clone()).or_default();
            let old = sessions.iter().position(|s| s.device == session.device);
            if old.is_none() && sessions.len() >= limit {
                return Err(TooManyDevices { limit });
            }
            let old = old.map(|i| sessions.remove(i));
            self.forget_gone(&session.user, &session.device);
            sessions.push(session);
            old
        };
        match old {
            Some(old) => old.close(CloseReason::Replaced),
            None => {
                self.count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Removes `session` if it is still the one registered for its device.
    pub fn remove(&self, session: &Session) {
        let mut users = self.write();
        let Some(sessions) = users.get_mut(&session.user) else { return };
        let Some(i) = sessions.iter().position(|s| s.id == session.id) else { return };
        sessions.remove(i);
        if sessions.is_empty() {
            users.remove(&session.user);
        }
        drop(users);
        self.remember_gone(session);
        self.count.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Number of connected agents (sessions of every device).
    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// All sessions (for shutdown and status).
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.read().values().flatten().cloned().collect()
    }

    /// Told of every registration and removal (the value only counts
    /// them).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
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

    /// The devices of `user` that left within the last day, and what
    /// their services had.
    pub fn gone(&self, user: &str) -> Vec<Gone> {
        let gone = self.gone.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = |g: &&Gone| g.left.elapsed() < GONE_FOR;
        gone.get(user).map(|g| g.iter().filter(fresh).cloned().collect()).unwrap_or_default()
    }

    /// Whether a device of `user` left with models within the last day.
    pub fn has_gone(&self, user: &str) -> bool {
        let gone = self.gone.lock().unwrap_or_else(PoisonError::into_inner);
        gone.get(user).is_some_and(|g| g.iter().any(|g| g.left.elapsed() < GONE_FOR))
    }

    fn remember_gone(&self, session: &Session) {
        let models = session.with_service(|s| s.map(|s| s.available.clone()).unwrap_or_default());
        let mut gone = self.gone.lock().unwrap_or_else(PoisonError::into_inner);
        if models.is_empty() || (gone.len() >= GONE_USERS && !gone.contains_key(&session.user)) {
            return;
        }
        let list = gone.entry(session.user.clone()).or_default();
        list.retain(|g| g.device != session.device && g.left.elapsed() < GONE_FOR);
        if list.len() >= GONE_PER_USER {
            list.remove(0);
        }
        let left = std::time::Instant::now();
        list.push(Gone { device: session.device.clone(), models, left });
    }

    fn forget_gone(&self, user: &str, device: &str) {
        let mut gone = self.gone.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = gone.get_mut(user) {
            list.retain(|g| g.device != device);
            if list.is_empty() {
                gone.remove(user);
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Vec<Arc<Session>>>> {
        self.users.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Vec<Arc<Session>>>> {
        self.users.write().unwrap_or_else(PoisonError::into_inner)
    }
}
