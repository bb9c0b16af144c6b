//! A session's authorization: what it was opened with, until when it
//! holds, and the in-band messages (`auth` capability) that renew it without
//! dropping a stream:
//!
//! - `auth {token}`: a fresh token for the same user (an identity
//!   provider's new JWT, or an agent credential);
//! - `refresh`: a fresh access token for the credential the session was
//!   opened with;
//! - `rotate` -> `credential {id, secret}` -> `rotated {id}`: a new
//!   credential, valid at once; the old one is revoked only once the agent
//!   confirms it stored the new one, so a crash at any step leaves it a
//!   working credential.
//!
//! A session whose authorization runs out unrenewed is closed with 4003; a
//! revoked credential's session with 4004.

use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use tunnel_proto::{Authorized, Credential, Message};

use super::{CloseReason, Session};
use crate::identity::{AuthError, IdentityError, Principal, Role, Via};

/// What a session is authorized by.
#[derive(Debug, Clone, Default)]
pub struct SessionAuth {
    /// The credential id or token `jti` it was opened (or last renewed)
    /// with: revoking it ends the session.
    pub id: Option<String>,
    /// The credential the token `id` was minted for: revoking it ends the
    /// session too.
    pub parent: Option<String>,
    /// How it proved itself (`None`: not yet known).
    pub via: Option<Via>,
    /// When it ends unless renewed.
    pub expires: Option<SystemTime>,
    /// A rotation waiting for the agent's `rotated`.
    pub pending_rotation: Option<String>,
    /// A token being checked (one at a time).
    pub checking: bool,
    /// A credential being issued for a `rotate` (one at a time).
    pub issuing: bool,
}

fn rfc3339(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

impl Session {
    pub(super) fn lock_auth(&self) -> MutexGuard<'_, SessionAuth> {
        self.auth.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The credential id or token id the session is authorized by.
    pub fn auth_id(&self) -> Option<String> {
        self.lock_auth().id.clone()
    }

    /// When the session's authorization ends unless renewed.
    pub fn auth_expires(&self) -> Option<SystemTime> {
        self.lock_auth().expires
    }

    /// Whether revoking `id` ends this session: it is the credential or
    /// token the session is authorized by, or the credential that token was
    /// minted for.
    pub fn authorized_by(&self, id: &str) -> bool {
        let a = self.lock_auth();
        a.id.as_deref() == Some(id) || a.parent.as_deref() == Some(id)
    }

    /// Whether `identity` knows the token or credential this session is
    /// authorized by as revoked.
    pub fn revoked_in(&self, identity: &crate::identity::Identity) -> bool {
        let a = self.lock_auth();
        [&a.id, &a.parent].into_iter().flatten().any(|id| identity.is_revoked(id))
    }

    fn refuse_auth(&self, code: u16, why: impl Into<String>) {
        self.link.push_urgent(Message::error("", code, why));
    }

    fn authorize(&self, expires: Option<SystemTime>, token: Option<String>) {
        self.link
            .push_urgent(Message::Authorized(Authorized { expires_at: rfc3339(expires), token }));
    }

    /// Renews the session with a principal that proved itself in-band.
    fn renew(&self, p: Principal) {
        let (expires, token) = match p.via {
            Via::Credential => match self.mint_access(p.id.as_deref()) {
                Ok(minted) => minted,
                Err(e) => {
                    return self.refuse_auth(500, format!("cannot mint an access token: {e}"));
                }
            },
            Via::Token => (p.expires, None),
            Via::Static => (None, None),
        };
        {
            let mut a = self.lock_auth();
            a.id = p.id;
            a.parent = p.parent;
            a.via = Some(p.via);
            a.expires = expires;
        }
        self.auth_changed.notify_waiters();
        self.authorize(expires, token);
    }

    /// A fresh access token for this session's user and `credential`,
    /// when relayd can mint.
    fn mint_access(
        &self,
        credential: Option<&str>,
    ) -> Result<(Option<SystemTime>, Option<String>), IdentityError> {
        let Some(credential) = credential else { return Ok((None, None)) };
        Ok(match self.identity.mint_access(&self.user, Some(&self.device), credential)? {
            Some(m) => (Some(m.expires), Some(m.token)),
            None => (None, None),
        })
    }

    /// `auth {token}`: checks the token off the reader, then renews.
    pub(super) fn on_auth(&self, token: String) {
        {
            let mut a = self.lock_auth();
            if a.checking {
                drop(a);
                return self.refuse_auth(429, "a token is being checked already");
            }
            a.checking = true;
        }
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            let verdict = me.identity.verify(&token).await;
            me.lock_auth().checking = false;
            match verdict {
                Ok(p) if p.role == Role::Agent && p.user == me.user && p.device() == me.device => {
                    info!(session = %me.id, "agent re-authenticated");
                    me.renew(p);
                }
                Ok(p) if p.role != Role::Agent => {
                    me.refuse_auth(403, "a client token cannot authorize an agent session");
                }
                Ok(p) if p.user != me.user => me.refuse_auth(403, "the token is for another user"),
                Ok(p) => me.refuse_auth(
                    403,
                    format!(
                        "the token is for device {:?}, this session serves {:?}",
                        p.device(),
                        me.device
                    ),
                ),
                Err(e @ (AuthError::Expired | AuthError::Revoked)) => {
                    me.refuse_auth(401, e.to_string())
                }
                Err(e @ AuthError::Unavailable(_)) => me.refuse_auth(503, e.to_string()),
                Err(e) => me.refuse_auth(401, e.to_string()),
            }
        });
    }

    /// `refresh`: a fresh access token for the session's credential.
    pub(super) fn on_refresh(&self) {
        let (via, id) = {
            let a = self.lock_auth();
            (a.via, a.id.clone())
        };
        if via != Some(Via::Credential) {
            return self.refuse_auth(
                400,
                "refresh renews sessions opened with an agent credential; send auth with a fresh token",
            );
        }
        if id.as_deref().is_some_and(|id| self.identity.is_revoked(id)) {
            return self.close(CloseReason::Revoked);
        }
        match self.mint_access(id.as_deref()) {
            Ok((expires, token)) => {
                self.lock_auth().expires = expires;
                self.auth_changed.notify_waiters();
                self.authorize(expires, token);
            }
            Err(e) => self.refuse_auth(500, format!("cannot mint an access token: {e}")),
        }
    }

    /// `rotate`: issues a new credential (stored off the reader).
    pub(super) fn on_rotate(&self) {
        let current = {
            let mut a = self.lock_auth();
            if a.via != Some(Via::Credential) {
                drop(a);
                return self
                    .refuse_auth(400, "rotate needs a session opened with an agent credential");
            }
            if a.pending_rotation.is_some() || a.issuing {
                drop(a);
                return self.refuse_auth(409, "a rotation is under way already");
            }
            a.issuing = true;
            a.id.clone()
        };
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            let identity = me.identity.clone();
            let user = me.user.clone();
            let issued =
                identity.issue_credential(&user, Some(&me.device), current.as_deref()).await;
            let mut a = me.lock_auth();
            a.issuing = false;
            if let Ok(c) = &issued {
                a.pending_rotation = Some(c.id.clone());
            }
            drop(a);
            match issued {
                Ok(c) => {
                    me.link.push_urgent(Message::Credential(Credential {
                        id: c.id,
                        secret: c.secret,
                    }));
                }
                Err(e) => me.refuse_auth(500, format!("cannot issue a credential: {e}")),
            }
        });
    }

    /// `rotated {id}`: the agent stored the new credential; the old one
    /// goes.
    pub(super) fn on_rotated(&self, id: String) {
        let old = {
            let mut a = self.lock_auth();
            if a.pending_rotation.as_deref() != Some(id.as_str()) {
                drop(a);
                return self.refuse_auth(409, "no rotation to that credential is waiting");
            }
            a.pending_rotation = None;
            let old = a.id.replace(id.clone());
            a.parent = None;
            a.via = Some(Via::Credential);
            old
        };
        // The access token in hand was minted for the credential that goes
        // now: the agent gets one for the new credential.
        let (expires, token) = match self.mint_access(Some(&id)) {
            Ok(minted) => minted,
            Err(e) => {
                warn!(session = %self.id, "cannot mint an access token for the rotated credential: {e}");
                (self.auth_expires(), None)
            }
        };
        self.lock_auth().expires = expires;
        self.auth_changed.notify_waiters();
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            if let Some(old) = old {
                if let Err(e) = me.identity.revoke(&old, None).await {
                    warn!(session = %me.id, error = %e, "cannot revoke the rotated-out credential {old}: {e}; revoke it by hand with `tunnelctl token revoke {old}`");
                }
            }
            info!(session = %me.id, credential = %id, "agent credential rotated to {id}");
            me.authorize(expires, token);
        });
    }

    /// Resolves never; closes the session (4003) once its authorization ran
    /// out unrenewed.
    pub(super) async fn watch_expiry(self: &Arc<Self>, stop: CancellationToken) {
        loop {
            let changed = self.auth_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // The rule a new session is admitted by: `exp` plus the leeway.
            let until = self.auth_expires().map(|t| self.identity.valid_until(t));
            let wait = async {
                match until {
                    Some(t) => {
                        tokio::time::sleep(t.duration_since(SystemTime::now()).unwrap_or_default())
                            .await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut changed => {}
                () = wait => {
                    let until = self.auth_expires().map(|t| self.identity.valid_until(t));
                    if until.is_some_and(|t| t <= SystemTime::now()) {
                        info!(session = %self.id, "the token of session {} expired unrenewed; closing it (4003)", self.id);
                        self.close(CloseReason::TokenExpired);
                        return;
                    }
                }
            }
        }
    }
}
