//! The credential store of relays run as replicas: one PostgreSQL database
//! (`[cluster]`). A revocation is one statement that records it and
//! notifies (`pg_notify`, delivered when it commits); every replica listens
//! on a connection of its own and ends the sessions it covers at once. The
//! backstop: every `check_interval` that connection reads the latest
//! revision, and a change nobody told of, or a connection lost and made
//! again, reads every revocation again. A replica that has not heard from
//! the database for `max_staleness` admits no token whose revocation it
//! could have missed ([`CredentialStore::fresh`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::store::{CredentialRecord, CredentialStore, EVENTS, Revocation, StoreError, StoreEvent};
use crate::cluster::{ClusterConfig, DbError, schema};

/// The channel revocations are told on.
const CHANNEL: &str = "relayd_revocations";
/// The `application_name` of each replica's listening connection.
pub const LISTENER_NAME: &str = "relayd listener";

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        StoreError(e.to_string())
    }
}

/// Credentials and revocations in PostgreSQL.
pub struct PgStore {
    db: ClusterConfig,
    /// The connection for queries, made again when it was lost.
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    events: broadcast::Sender<StoreEvent>,
    /// When the database last answered this replica's listener.
    heard: Arc<Mutex<Instant>>,
    stop: CancellationToken,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl PgStore {
    /// Connects, applies the migrations when `migrate_at_start` says so,
    /// checks the schema, and starts listening for revocations.
    pub async fn open(db: ClusterConfig) -> Result<Self, StoreError> {
        let mut client = db.connect().await?;
        if db.migrate_at_start {
            let m = schema::migrate(&db, &mut client, None).await?;
            if !m.applied.is_empty() {
                info!(
                    from = m.from,
                    to = m.to,
                    "database schema migrated from version {} to {}",
                    m.from,
                    m.to
                );
            }
        }
        schema::check(&db, &client).await?;
        info!(database = %db.shown, "credentials and revocations in the database {} (schema version {})", db.shown, schema::latest());
        let store = Self {
            client: tokio::sync::Mutex::new(Some(Arc::new(client))),
            events: broadcast::channel(EVENTS).0,
            heard: Arc::new(Mutex::new(Instant::now())),
            stop: CancellationToken::new(),
            db,
        };
        // Open once listening: a revocation made from then on is told here.
        let (listening, ready) = tokio::sync::oneshot::channel();
        tokio::spawn(listen(
            store.db.clone(),
            store.events.clone(),
            store.heard.clone(),
            store.stop.clone(),
            listening,
        ));
        match tokio::time::timeout(crate::cluster::DB_TIMEOUT * 2, ready).await {
            Ok(Ok(())) => Ok(store),
            _ => Err(StoreError(format!(
                "the database ({}) did not let this relay listen for revocations",
                store.db.shown
            ))),
        }
    }

    /// After a failed statement: the next one connects again (a
    /// connection a failover left half-open would time out forever).
    async fn failed<T>(&self, r: Result<T, DbError>) -> Result<T, StoreError> {
        if r.is_err() {
            *self.client.lock().await = None;
        }
        r.map_err(StoreError::from)
    }

    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        if let Some(c) = self.client.lock().await.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        // Connected without the lock: callers during an outage each wait
        // for their own attempt, not for everyone's before them.
        let c = Arc::new(self.db.connect().await?);
        let mut slot = self.client.lock().await;
        match slot.as_ref().filter(|old| !old.is_closed()) {
            Some(old) => Ok(old.clone()),
            None => {
                *slot = Some(c.clone());
                Ok(c)
            }
        }
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn record(row: &tokio_postgres::Row) -> CredentialRecord {
    CredentialRecord {
        id: row.get(0),
        user: row.get(1),
        device: row.get(2),
        secret_sha256: row.get(3),
        created: u64::try_from(row.get::<_, i64>(4)).unwrap_or(0),
        replaces: row.get(5),
    }
}

const COLUMNS: &str = "id, user_id, device, secret_sha256, created, replaces";

#[async_trait::async_trait]
impl CredentialStore for PgStore {
    async fn insert(&self, r: &CredentialRecord) -> Result<(), StoreError> {
        let c = self.client().await?;
        let created = to_i64(r.created);
        let done = self
            .db
            .timed(c.execute(
                "INSERT INTO credentials (id, user_id, device, secret_sha256, created, replaces)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (id) DO UPDATE SET user_id = $2, device = $3, secret_sha256 = $4,
                     created = $5, replaces = $6",
                &[&r.id, &r.user, &r.device, &r.secret_sha256, &created, &r.replaces],
            ))
            .await;
        self.failed(done).await.map(drop)
    }

    async fn get(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        let c = self.client().await?;
        let sql = format!("SELECT {COLUMNS} FROM credentials WHERE id = $1");
        let row = self.failed(self.db.timed(c.query_opt(&sql, &[&id])).await).await?;
        Ok(row.as_ref().map(record))
    }

    async fn list(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        let c = self.client().await?;
        let sql = format!("SELECT {COLUMNS} FROM credentials ORDER BY created, id");
        let rows = self.failed(self.db.timed(c.query(&sql, &[])).await).await?;
        Ok(rows.iter().map(record).collect())
    }

    async fn revoke(&self, r: &Revocation) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let until = r.until.map(to_i64);
        // One statement: recorded and told together, when it commits. A
        // repeated revocation is told again (a replica that missed it ends
        // the sessions then), without a revision.
        let row = self
            .db
            .timed(c.query_one(
                "WITH added AS (
                     INSERT INTO revocations (id, until_unix) VALUES ($1::text, $2::bigint)
                     ON CONFLICT (id) DO NOTHING RETURNING revision)
                 SELECT (SELECT count(*) FROM added),
                     pg_notify($3, json_build_object('id', $1::text, 'until', $2::bigint,
                         'revision', (SELECT revision FROM added))::text)",
                &[&r.id, &until, &CHANNEL],
            ))
            .await;
        let row = self.failed(row).await?;
        Ok(row.get::<_, i64>(0) > 0)
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let c = self.client().await?;
        let rows = self.db.timed(c.query("SELECT id, until_unix FROM revocations", &[])).await;
        let rows = self.failed(rows).await?;
        Ok(rows
            .iter()
            .map(|row| Revocation {
                id: row.get(0),
                until: row.get::<_, Option<i64>>(1).and_then(|u| u64::try_from(u).ok()),
            })
            .collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    fn fresh(&self) -> Result<(), StoreError> {
        let age = self.heard.lock().unwrap_or_else(PoisonError::into_inner).elapsed();
        if age <= self.db.max_staleness {
            return Ok(());
        }
        Err(StoreError(format!(
            "the database ({}) has not answered this relay for {}s (max_staleness {}s): a revocation may have been missed",
            self.db.shown,
            age.as_secs(),
            self.db.max_staleness.as_secs()
        )))
    }
}

/// The listening connection, made again whenever it is lost, until `stop`.
async fn listen(
    db: ClusterConfig,
    events: broadcast::Sender<StoreEvent>,
    heard: Arc<Mutex<Instant>>,
    stop: CancellationToken,
    listening: tokio::sync::oneshot::Sender<()>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    let mut listening = Some(listening);
    loop {
        let began = Instant::now();
        let why = tokio::select! {
            () = stop.cancelled() => return,
            why = listen_once(&db, &events, &heard, first, &mut listening) => why,
        };
        first = false;
        if began.elapsed() > Duration::from_secs(30) {
            // It had been up a while: this is a new failure, not the same.
            backoff = Duration::from_millis(100);
        }
        warn!(error = %why, "lost the database's revocations ({why}); connecting again in {backoff:?}");
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One listening connection: `LISTEN`, then the notifications and the
/// periodic check, until either fails. Returns why it ended.
async fn listen_once(
    db: &ClusterConfig,
    events: &broadcast::Sender<StoreEvent>,
    heard: &Mutex<Instant>,
    first: bool,
    listening: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> DbError {
    let hear = || *heard.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    // Named, so that an operator (or a test) can tell it in pg_stat_activity.
    let mut conn = match db.listen(CHANNEL, LISTENER_NAME).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    let (client, told) = (&conn.client, &mut conn.told);
    hear();
    if let Some(tell) = listening.take() {
        let _ = tell.send(());
    }
    let mut revision = match latest_revision(db, client).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    // What was revoked while this replica was not listening yet (between
    // opening the store and now) or any more (a lost connection).
    let _ = events.send(StoreEvent::Resync);
    if !first {
        info!("listening to the database's revocations again; read them all again");
    }
    let mut tick = tokio::time::interval(db.check_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            payload = told.recv() => match payload {
                Some(Ok(p)) => {
                    hear();
                    match serde_json::from_str::<Told>(&p) {
                        Ok(t) => {
                            revision = revision.max(t.revision.unwrap_or(0));
                            let _ = events.send(StoreEvent::Revoked(Revocation { id: t.id, until: t.until }));
                        }
                        Err(_) => {
                            let _ = events.send(StoreEvent::Resync);
                        }
                    }
                }
                Some(Err(e)) => return e,
                None => return DbError::Schema("the database connection closed".into()),
            },
            _ = tick.tick() => match latest_revision(db, client).await {
                Ok(r) => {
                    hear();
                    if r != revision {
                        // A revocation nobody told of (the told ones moved
                        // `revision` on); nothing is lost if it comes yet.
                        revision = r;
                        let _ = events.send(StoreEvent::Resync);
                    }
                }
                Err(e) => return e,
            },
        }
    }
}

#[derive(serde::Deserialize)]
struct Told {
    id: String,
    until: Option<u64>,
    revision: Option<i64>,
}

async fn latest_revision(db: &ClusterConfig, client: &Client) -> Result<i64, DbError> {
    let row = db
        .timed(client.query_one("SELECT coalesce(max(revision), 0) FROM revocations", &[]))
        .await?;
    Ok(row.get(0))
}
