//! Keeping a live session authorized without dropping a stream (the `auth`
//! capability).
//!
//! One exchange at a time goes to the relay and waits for its answer
//! ([`Renewal::exchange`]): `auth {token}` (a fresh token for the same user),
//! `refresh` (a fresh access token for the credential the session was opened
//! with), `rotate` (a new credential) and `rotated {id}` (stored; revoke the
//! old one). The relay answers `authorized`, `credential`, or a session-level
//! `error`.
//!
//! [`keep_authorized`] renews the session once 80 % of its authorization
//! has run: with the token file's content when it holds a newer token (an
//! identity provider's JWT renewed by its tooling), else with `refresh` when
//! the session was opened with a credential. A session that cannot be
//! renewed is closed by the relay when it expires (4003), and the agent
//! reconnects with whatever token it has then.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use tunnel_proto::{Authorized, Credential, Message};

/// How long the relay has to answer one exchange.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause before retrying a renewal that failed or found nothing
/// to renew with.
const RETRY: Duration = Duration::from_secs(30);

/// The relay's answer to an exchange.
#[derive(Debug)]
pub enum Reply {
    Authorized(Authorized),
    Credential(Credential),
    /// A session-level `error`: the relay refused the exchange.
    Refused {
        code: u16,
        message: String,
    },
}

impl Reply {
    /// The message the relay answered with, for an error that did not
    /// expect it.
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Authorized(_) => "authorized",
            Reply::Credential(_) => "credential",
            Reply::Refused { .. } => "error",
        }
    }
}

/// Why an exchange got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    #[error("the relay does not support in-band authentication (no auth capability)")]
    Unsupported,
    #[error("the relay did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the session ended before the relay answered")]
    SessionEnded,
}

/// A session's authorization, as the agent knows it.
pub struct Renewal {
    /// The relay listed `auth`.
    supported: bool,
    /// Only one exchange is on the wire at a time.
    turn: tokio::sync::Mutex<()>,
    pending: Mutex<Option<oneshot::Sender<Reply>>>,
    /// When the session's authorization ends unless renewed.
    expires: watch::Sender<Option<SystemTime>>,
    /// The session was opened with a credential: `refresh` renews it.
    credential: AtomicBool,
}

impl Renewal {
    pub fn new(supported: bool, expires: Option<SystemTime>, credential: bool) -> Self {
        Self {
            supported,
            turn: tokio::sync::Mutex::new(()),
            pending: Mutex::new(None),
            expires: watch::channel(expires).0,
            credential: AtomicBool::new(credential),
        }
    }

    pub fn expires(&self) -> Option<SystemTime> {
        *self.expires.borrow()
    }

    /// Applies an `authorized` (the session does, as it arrives): the new
    /// expiry, and whether the session now rests on a credential (the relay
    /// minted an access token for it).
    pub fn authorized(&self, a: &Authorized) {
        let expires = a.expires_at.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok());
        self.expires.send_replace(expires);
        if a.token.is_some() {
            self.credential.store(true, Ordering::Relaxed);
        }
    }

    /// Sends `msg` with `push` and waits for the relay's answer.
    pub async fn exchange(
        &self,
        msg: Message,
        push: impl FnOnce(Message),
    ) -> Result<Reply, ExchangeError> {
        if !self.supported {
            return Err(ExchangeError::Unsupported);
        }
        let _turn = self.turn.lock().await;
        let (tx, rx) = oneshot::channel();
        *self.pending.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        push(msg);
        match tokio::time::timeout(EXCHANGE_TIMEOUT, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ExchangeError::SessionEnded),
            Err(_) => {
                self.pending.lock().unwrap_or_else(PoisonError::into_inner).take();
                Err(ExchangeError::Timeout(EXCHANGE_TIMEOUT))
            }
        }
    }

    /// Hands an answer to the waiting exchange; `false` when none waits.
    pub fn answer(&self, reply: Reply) -> bool {
        let waiting = self.pending.lock().unwrap_or_else(PoisonError::into_inner).take();
        match waiting {
            Some(tx) => {
                let _ = tx.send(reply);
                true
            }
            None => false,
        }
    }

    /// Ends a waiting exchange: the session is gone.
    pub fn abandon(&self) {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// What renewing needs from the rest of the agent.
pub trait Renew: Send + Sync {
    fn renewal(&self) -> &Renewal;
    /// Sends a message to the relay.
    fn push(&self, msg: Message);
    /// The token file's content, when it changed since it was last read.
    fn fresh_token(&self) -> Option<String>;
    /// The relay accepted `token` for this session.
    fn adopt(&self, token: String);
}

/// Renews the session before it expires, for as long as it runs.
pub async fn keep_authorized(agent: Arc<dyn Renew>, session: String) {
    let mut expires = agent.renewal().expires.subscribe();
    let mut failed = false;
    loop {
        let current = *expires.borrow_and_update();
        let left = current.map(|at| at.duration_since(SystemTime::now()).unwrap_or_default());
        // No expiry, or past it (the relay closes the session now): wait
        // for a change.
        let wait = match left {
            None | Some(Duration::ZERO) => None,
            // Renew once 80 % of what is left has passed; after a failure,
            // try again sooner, a few times before the end.
            Some(left) if failed => Some(RETRY.min(left / 2).max(Duration::from_secs(1))),
            Some(left) => Some(left.mul_f64(0.8)),
        };
        let sleep = async {
            match wait {
                Some(w) => tokio::time::sleep(w).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = expires.changed() => {
                if changed.is_err() { return }
                failed = false;
                continue;
            }
            () = sleep => {}
        }
        match renew(agent.as_ref()).await {
            Ok(how) => {
                debug!(%session, how, "session authorization renewed");
                failed = false;
            }
            Err(why) => {
                let at = current.map(humantime::format_rfc3339_seconds);
                warn!(%session, expires = ?at.map(|t| t.to_string()), %why, "cannot renew the session's authorization: {why}; the relay closes the session when it expires");
                failed = true;
            }
        }
    }
}

/// One renewal: a newer token from the token file, else `refresh`.
async fn renew(agent: &dyn Renew) -> Result<&'static str, String> {
    let fresh = agent.fresh_token();
    let r = agent.renewal();
    if let Some(token) = fresh {
        let msg = Message::Auth(tunnel_proto::Auth { token: token.clone() });
        return match r.exchange(msg, |m| agent.push(m)).await {
            Ok(Reply::Authorized(_)) => {
                agent.adopt(token);
                info!("re-authenticated the session with the token file's new token");
                Ok("auth")
            }
            Ok(Reply::Refused { code, message }) => {
                Err(format!("the relay refused the token file's token ({code}): {message}"))
            }
            Ok(Reply::Credential(_)) => Err("the relay answered auth with a credential".into()),
            Err(e) => Err(e.to_string()),
        };
    }
    if !r.credential.load(Ordering::Relaxed) {
        return Err("the token expires and the token file holds no newer one".into());
    }
    match r.exchange(Message::Refresh(tunnel_proto::Empty {}), |m| agent.push(m)).await {
        Ok(Reply::Authorized(_)) => Ok("refresh"),
        Ok(Reply::Refused { code, message }) => {
            Err(format!("the relay refused to refresh ({code}): {message}"))
        }
        Ok(Reply::Credential(_)) => Err("the relay answered refresh with a credential".into()),
        Err(e) => Err(e.to_string()),
    }
}
