//! Where each device is connected, across replicas (`[cluster]`): this
//! replica's sessions claimed in the database ([`crate::cluster::registry`]).
//! Presence is soft state: the hub here is the truth, the database indexes
//! it. A device that connects to another replica claims it there with a
//! higher epoch, and this replica closes its own session as replaced, as
//! one relay does when a device connects again. Every heartbeat this
//! replica says it is alive and releases the devices of replicas that went
//! silent; every [`REASSERT`] it writes its claims again, which heals what
//! a database failover lost and finds a newer claim it was not told of.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::registry::{self, Claimed, Held};
use crate::cluster::{ClusterConfig, DbError};
use crate::session::{CloseReason, Session};
use crate::state::Shared;

/// The `application_name` of each replica's presence connections.
pub const NAME: &str = "relayd presence";

/// How often every claim is written again.
const REASSERT: Duration = Duration::from_secs(60);

/// This replica in the registry.
#[derive(Debug, Clone)]
pub struct Me {
    pub id: String,
    pub host: String,
    pub listen: String,
    /// Where other replicas forward requests to it (`None`: it takes
    /// none).
    pub peer: Option<String>,
}

impl Me {
    pub fn new(listen: std::net::SocketAddr, peer: Option<String>) -> Self {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into());
        let id = format!("r_{:016x}", rand::random::<u64>());
        Self { id, host, listen: listen.to_string(), peer }
    }
}

/// (user, device) -> (the session's id, the epoch it was claimed at).
type Claims = HashMap<(String, String), (String, i64)>;

/// Keeps this replica's presence until `stop`, then leaves the registry.
pub async fn run(shared: Arc<Shared>, db: ClusterConfig, me: Me, stop: CancellationToken) {
    info!(replica = %me.id, host = %me.host, "replica {} joins the cluster", me.id);
    shared.directory.set_me(&me.id);
    let mut claims = Claims::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let began = std::time::Instant::now();
        let ended = tokio::select! {
            () = stop.cancelled() => break,
            e = connected(&shared, &db, &me, &mut claims) => e,
        };
        if began.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
        shared.cluster.db_errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %ended, "lost the cluster's database for presence ({ended}); connecting again in {backoff:?}");
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    // A clean stop: the devices are free at once, not after DEAD_AFTER.
    if let Ok(c) = db.connect().await {
        if let Err(e) = registry::leave(&db, &c, &me.id).await {
            warn!(error = %e, "could not leave the registry: {e}");
        }
    }
}

/// One connection's life: registered, claims asserted, then changes,
/// claims by others and heartbeats until the database fails.
async fn connected(shared: &Shared, db: &ClusterConfig, me: &Me, claims: &mut Claims) -> DbError {
    // Named, so that an operator (or a test) can tell them in pg_stat_activity.
    let mut named = db.clone();
    named.database.application_name(NAME);
    let db = &named;
    let client = match db.connect().await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut listening = match db.listen(registry::CHANNEL, NAME).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    let told = &mut listening.told;
    if let Err(e) =
        registry::heartbeat(db, &client, &me.id, &me.host, &me.listen, me.peer.as_deref()).await
    {
        return e;
    }
    let hub = shared.router.local();
    let mut changes = hub.changes();
    // Whatever happened while not connected: claims asserted again, the
    // directory read again.
    if let Err(e) = reassert(shared, db, &client, me, claims).await {
        return e;
    }
    if let Err(e) = load(shared, db, &client).await {
        return e;
    }
    let mut beat = tokio::time::interval(registry::HEARTBEAT);
    let mut again = tokio::time::interval(REASSERT);
    again.tick().await;
    loop {
        let result = tokio::select! {
            changed = changes.changed() => match changed {
                Ok(()) => follow_hub(shared, db, &client, me, claims).await,
                Err(_) => return DbError::Schema("the relay stopped".into()),
            },
            payload = told.recv() => match payload {
                Some(Ok(p)) => match on_told(shared, me, claims, &p) {
                    Told::Reload => load(shared, db, &client).await,
                    Told::Noted => Ok(()),
                },
                Some(Err(e)) => Err(e),
                None => Err(DbError::Schema("the listening connection closed".into())),
            },
            _ = beat.tick() => heartbeat(shared, db, &client, me).await,
            _ = again.tick() => match reassert(shared, db, &client, me, claims).await {
                Ok(()) => load(shared, db, &client).await,
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            return e;
        }
    }
}

async fn heartbeat(
    shared: &Shared,
    db: &ClusterConfig,
    client: &Client,
    me: &Me,
) -> Result<(), DbError> {
    let sent = std::time::Instant::now();
    registry::heartbeat(db, client, &me.id, &me.host, &me.listen, me.peer.as_deref()).await?;
    let took = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
    shared.cluster.heartbeat_us.store(took, Ordering::Relaxed);
    let released = registry::reap(db, client).await?;
    if released > 0 {
        info!(
            devices = released,
            "released {released} device(s) of replicas silent for {:?}",
            registry::DEAD_AFTER
        );
    }
    Ok(())
}

/// This replica's live sessions by (user, device). A session closed but
/// not out of the hub yet (replaced by another replica's claim a moment
/// ago) is not claimed again: that would take the device back.
fn local(shared: &Shared) -> HashMap<(String, String), Arc<Session>> {
    let sessions = shared.router.local().sessions();
    sessions
        .into_iter()
        .filter(|s| !s.is_closed())
        .map(|s| ((s.user.clone(), s.device.clone()), s))
        .collect()
}

/// Claims the sessions that came, releases the ones that left.
async fn follow_hub(
    shared: &Shared,
    db: &ClusterConfig,
    client: &Client,
    me: &Me,
    claims: &mut Claims,
) -> Result<(), DbError> {
    let here = local(shared);
    let gone: Vec<(String, String)> =
        claims.keys().filter(|k| !here.contains_key(*k)).cloned().collect();
    for key in gone {
        if let Some((_, epoch)) = claims.remove(&key) {
            registry::release(db, client, &key.0, &key.1, &me.id, epoch).await?;
        }
    }
    for (key, session) in here {
        if claims.get(&key).is_some_and(|(id, _)| *id == session.id) {
            continue;
        }
        let epoch = registry::claim(db, client, &key.0, &key.1, &me.id).await?;
        shared.cluster.claims.fetch_add(1, Ordering::Relaxed);
        debug!(session = %session.id, epoch, "claimed device {} of {}", key.1, session.user_hash);
        claims.insert(key, (session.id.clone(), epoch));
    }
    Ok(())
}

/// Writes every claim again; a session another replica claimed since is
/// closed as replaced.
async fn reassert(
    shared: &Shared,
    db: &ClusterConfig,
    client: &Client,
    me: &Me,
    claims: &mut Claims,
) -> Result<(), DbError> {
    follow_hub(shared, db, client, me, claims).await?;
    let held: Vec<((String, String), (String, i64))> =
        claims.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for ((user, device), (id, epoch)) in held {
        if registry::reassert(db, client, &user, &device, &me.id, epoch).await? == Held::Elsewhere {
            claims.remove(&(user.clone(), device.clone()));
            replace(shared, &user, &device, &id);
        }
    }
    Ok(())
}

/// What a notification asks of this replica.
enum Told {
    Noted,
    Reload,
}

/// A claim or a release told by any replica, this one too: the directory
/// follows it. Another replica's claim replaces the session here for that
/// device if its claim is older; a session not claimed yet is left: its
/// claim, when it comes, is the newer one.
fn on_told(shared: &Shared, me: &Me, claims: &mut Claims, payload: &str) -> Told {
    let Ok(c) = serde_json::from_str::<Claimed>(payload) else {
        warn!(payload, "a presence notification that does not parse; reading the directory again");
        return Told::Reload;
    };
    if c.reload {
        return Told::Reload;
    }
    let Some(replica) = c.replica else {
        shared.directory.released(&c.user, &c.device, c.epoch);
        return Told::Noted;
    };
    if let Some(peer) = &c.peer {
        shared.directory.peer(&replica, peer);
    }
    shared.directory.claimed(&c.user, &c.device, &replica, c.epoch);
    if replica == me.id {
        return Told::Noted;
    }
    let key = (c.user, c.device);
    let Some((id, epoch)) = claims.get(&key).cloned() else { return Told::Noted };
    if epoch < c.epoch {
        claims.remove(&key);
        replace(shared, &key.0, &key.1, &id);
    }
    Told::Noted
}

/// The whole directory, read again.
async fn load(shared: &Shared, db: &ClusterConfig, client: &Client) -> Result<(), DbError> {
    let (peers, devices) = registry::snapshot(db, client).await?;
    shared.directory.load(peers, devices);
    Ok(())
}

fn replace(shared: &Shared, user: &str, device: &str, id: &str) {
    if let Some(s) = shared.router.local().device(user, device).filter(|s| s.id == id) {
        shared.cluster.replaced.fetch_add(1, Ordering::Relaxed);
        info!(session = %s.id, user = %s.user_hash, device, "device {device} connected to another replica: its session here is replaced");
        s.close(CloseReason::Replaced);
    }
}
