//! Revocations as events. A revocation is recorded in the credential store,
//! which tells every relay sharing it; each relay then refuses the token
//! and ends the agent sessions it authorized (close code 4004). Whichever
//! relay revoked, and whether the store is the embedded one or a database
//! shared by replicas, the sessions end where they are.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::identity::store::StoreEvent;
use crate::session::CloseReason;
use crate::state::Shared;

/// Follows the store's revocations until `stop`: first everything the store
/// holds (what was revoked since this relay opened it), then each event; a
/// relay that fell behind reads them all again.
pub async fn follow(shared: Arc<Shared>, stop: CancellationToken) {
    let mut events = shared.identity.subscribe();
    resync(&shared, &stop).await;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(StoreEvent::Resync) => resync(&shared, &stop).await,
            Ok(StoreEvent::Revoked(revocation)) => {
                let id = revocation.id.clone();
                shared.identity.note_revoked(revocation);
                let ended = end_sessions(&shared, &id);
                if ended > 0 {
                    info!(id = %id, sessions = ended, "{id} was revoked: {ended} agent session(s) ended");
                }
            }
            Err(RecvError::Lagged(missed)) => {
                warn!(
                    missed,
                    "fell {missed} revocations behind the credential store; reading them all again"
                );
                resync(&shared, &stop).await;
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Reads every revocation again and ends the sessions they cover; tries
/// again every second until the store answers (or the relay stops): a
/// resync that failed would otherwise leave what it was for unapplied.
async fn resync(shared: &Shared, stop: &CancellationToken) {
    while let Err(e) = shared.identity.reload_revocations().await {
        warn!(error = %e, "cannot read the revocations from the credential store: {e}; keeping those known, trying again in 1 s");
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
    for session in shared.router.local().sessions() {
        if session.revoked_in(&shared.identity) {
            session.close(CloseReason::Revoked);
        }
    }
}

/// Ends this relay's agent sessions that `id` (a credential or a token's
/// `jti`) authorized; returns how many.
pub fn end_sessions(shared: &Shared, id: &str) -> usize {
    let mut ended = 0;
    for session in shared.router.local().sessions() {
        if session.authorized_by(id) {
            session.close(CloseReason::Revoked);
            ended += 1;
        }
    }
    ended
}
