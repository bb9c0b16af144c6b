//! Where issued agent credentials and revocations live: one interface
//! ([`CredentialStore`]) so a shared database can replace the embedded one
//! when several relays run. [`RedbStore`] is the embedded, crash-safe store
//! in the state directory (redb: every commit is durable before it
//! returns); [`MemoryStore`] serves relays without a state directory and
//! tests.
//!
//! Secrets are never stored: a credential is recorded by its id, its user
//! and the SHA-256 of its secret (the secret is 256 random bits, so a plain
//! hash cannot be searched).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// An issued agent credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub id: String,
    pub user: String,
    /// The device it was issued for; `None`: the user's default device
    /// (credentials issued before devices existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The credential this one replaced in a rotation, if any.
    #[serde(default)]
    pub replaces: Option<String>,
}

/// A revoked credential or token id, and when its record may be forgotten
/// (the token's expiry; `None` for credentials, which never expire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub id: String,
    pub until: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("credential store: {0}")]
pub struct StoreError(pub String);

impl StoreError {
    fn of(e: impl std::fmt::Display) -> Self {
        StoreError(e.to_string())
    }
}

/// How many revocations a relay may fall behind on before it reads them
/// all again.
pub const EVENTS: usize = 256;

/// Issued credentials and revocations: what every relay sharing a store
/// sees alike. Lookups are async so that a database over the network can
/// implement it; the embedded store does its file work off the async
/// threads.
#[async_trait::async_trait]
pub trait CredentialStore: Send + Sync {
    async fn insert(&self, record: &CredentialRecord) -> Result<(), StoreError>;
    async fn get(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError>;
    async fn list(&self) -> Result<Vec<CredentialRecord>, StoreError>;
    /// Records `id` as revoked and tells every subscriber; false when it
    /// already was.
    async fn revoke(&self, revocation: &Revocation) -> Result<bool, StoreError>;
    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError>;
    /// Revocations recorded from now on, by any relay sharing the store. A
    /// subscriber that lags behind (`RecvError::Lagged`), or is told
    /// [`StoreEvent::Resync`], reads [`CredentialStore::revocations`] again.
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;
    /// Whether this relay's view of the store is recent enough to admit a
    /// token on: a shared database this relay has not heard from for too
    /// long says why not. Stores in this process always are.
    fn fresh(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// What a store tells its subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// Recorded now, here or by another relay sharing the store.
    Revoked(Revocation),
    /// Revocations may have been missed (a database connection was lost):
    /// read them all again.
    Resync,
}

const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
/// Revoked ids -> when the record may go (u64::MAX: never).
const REVOKED: TableDefinition<&str, u64> = TableDefinition::new("revoked");

/// The embedded store: one redb file.
pub struct RedbStore {
    db: Arc<Database>,
    events: broadcast::Sender<StoreEvent>,
}

impl RedbStore {
    /// Opens (or creates) the store at `path`. One process at a time: a
    /// second one gets an error saying the store is in use.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(StoreError::of)?;
        txn.open_table(CREDENTIALS).map_err(StoreError::of)?;
        txn.open_table(REVOKED).map_err(StoreError::of)?;
        txn.commit().map_err(StoreError::of)?;
        Ok(Self { db: Arc::new(db), events: broadcast::channel(EVENTS).0 })
    }

    /// Runs `f` on the database off the async threads (redb's commits wait
    /// for the disk).
    async fn with_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(StoreError::of)?
    }
}

#[async_trait::async_trait]
impl CredentialStore for RedbStore {
    async fn insert(&self, record: &CredentialRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(StoreError::of)?;
        let id = record.id.clone();
        self.with_db(move |db| {
            let txn = db.begin_write().map_err(StoreError::of)?;
            {
                let mut table = txn.open_table(CREDENTIALS).map_err(StoreError::of)?;
                table.insert(id.as_str(), value.as_slice()).map_err(StoreError::of)?;
            }
            txn.commit().map_err(StoreError::of)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        let id = id.to_owned();
        self.with_db(move |db| {
            let txn = db.begin_read().map_err(StoreError::of)?;
            let table = txn.open_table(CREDENTIALS).map_err(StoreError::of)?;
            let Some(value) = table.get(id.as_str()).map_err(StoreError::of)? else {
                return Ok(None);
            };
            serde_json::from_slice(value.value()).map(Some).map_err(StoreError::of)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(StoreError::of)?;
            let table = txn.open_table(CREDENTIALS).map_err(StoreError::of)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(StoreError::of)? {
                let (_, value) = entry.map_err(StoreError::of)?;
                out.push(serde_json::from_slice(value.value()).map_err(StoreError::of)?);
            }
            Ok(out)
        })
        .await
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<bool, StoreError> {
        let r = revocation.clone();
        let fresh = self
            .with_db(move |db| {
                let txn = db.begin_write().map_err(StoreError::of)?;
                let fresh = {
                    let mut table = txn.open_table(REVOKED).map_err(StoreError::of)?;
                    let until = r.until.unwrap_or(u64::MAX);
                    table.insert(r.id.as_str(), until).map_err(StoreError::of)?.is_none()
                };
                txn.commit().map_err(StoreError::of)?;
                Ok(fresh)
            })
            .await?;
        // Nobody listening is fine: a relay reads them all when it starts.
        let _ = self.events.send(StoreEvent::Revoked(revocation.clone()));
        Ok(fresh)
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(StoreError::of)?;
            let table = txn.open_table(REVOKED).map_err(StoreError::of)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(StoreError::of)? {
                let (id, until) = entry.map_err(StoreError::of)?;
                let until = Some(until.value()).filter(|u| *u != u64::MAX);
                out.push(Revocation { id: id.value().to_owned(), until });
            }
            Ok(out)
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}

/// A store in memory: for a relay without a state directory (credentials
/// then last until it restarts) and for tests, where relays sharing one
/// stand for replicas sharing a database.
pub struct MemoryStore {
    credentials: Mutex<HashMap<String, CredentialRecord>>,
    revoked: Mutex<HashMap<String, Option<u64>>>,
    events: broadcast::Sender<StoreEvent>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            credentials: Mutex::default(),
            revoked: Mutex::default(),
            events: broadcast::channel(EVENTS).0,
        }
    }
}

#[async_trait::async_trait]
impl CredentialStore for MemoryStore {
    async fn insert(&self, record: &CredentialRecord) -> Result<(), StoreError> {
        let mut map = self.credentials.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(record.id.clone(), record.clone());
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        Ok(self.credentials.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned())
    }

    async fn list(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        Ok(self
            .credentials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect())
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<bool, StoreError> {
        let fresh = {
            let mut map = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
            map.insert(revocation.id.clone(), revocation.until).is_none()
        };
        let _ = self.events.send(StoreEvent::Revoked(revocation.clone()));
        Ok(fresh)
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let map = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(map.iter().map(|(id, until)| Revocation { id: id.clone(), until: *until }).collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> CredentialRecord {
        CredentialRecord {
            id: id.into(),
            user: "alice".into(),
            device: None,
            secret_sha256: "00".repeat(32),
            created: 1,
            replaces: None,
        }
    }

    #[test]
    fn a_record_written_before_devices_reads_as_the_default_device() {
        let old = r#"{"id":"c_0000000000000001","user":"alice","secret_sha256":"00","created":1}"#;
        let r: CredentialRecord = serde_json::from_str(old).expect("an old record reads");
        assert_eq!((r.user.as_str(), r.device), ("alice", None));
        let mut new = record("c_0000000000000002");
        new.device = Some("gpu-box".into());
        let back: CredentialRecord =
            serde_json::from_slice(&serde_json::to_vec(&new).expect("write")).expect("read");
        assert_eq!(back, new);
    }

    async fn exercise(store: &dyn CredentialStore) {
        let mut events = store.subscribe();
        store.insert(&record("c_1")).await.expect("insert");
        assert_eq!(store.get("c_1").await.expect("get"), Some(record("c_1")));
        assert_eq!(store.get("c_2").await.expect("get"), None);
        assert!(store.revoke(&Revocation { id: "c_1".into(), until: None }).await.expect("revoke"));
        assert!(!store.revoke(&Revocation { id: "c_1".into(), until: None }).await.expect("again"));
        assert!(
            store.revoke(&Revocation { id: "jti_9".into(), until: Some(99) }).await.expect("jti")
        );
        let mut revoked = store.revocations().await.expect("list");
        revoked.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(
            revoked,
            [
                Revocation { id: "c_1".into(), until: None },
                Revocation { id: "jti_9".into(), until: Some(99) }
            ]
        );
        assert_eq!(store.list().await.expect("list").len(), 1);
        // Every revocation was told, the repeated one too.
        let told: Vec<String> = std::iter::from_fn(|| events.try_recv().ok())
            .filter_map(|e| match e {
                StoreEvent::Revoked(r) => Some(r.id),
                StoreEvent::Resync => None,
            })
            .collect();
        assert_eq!(told, ["c_1", "c_1", "jti_9"]);
    }

    #[tokio::test]
    async fn both_stores_keep_credentials_and_revocations_and_tell_of_revocations() {
        exercise(&MemoryStore::default()).await;
        let dir = std::env::temp_dir().join(format!("relayd-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("credentials.redb");
        exercise(&RedbStore::open(&path).expect("open")).await;
    }

    #[tokio::test]
    async fn the_embedded_store_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("relayd-store-restart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("credentials.redb");
        {
            let store = RedbStore::open(&path).expect("open");
            store.insert(&record("c_7")).await.expect("insert");
            store.revoke(&Revocation { id: "c_7".into(), until: None }).await.expect("revoke");
        }
        let store = RedbStore::open(&path).expect("reopen");
        assert_eq!(store.get("c_7").await.expect("get"), Some(record("c_7")));
        assert_eq!(store.revocations().await.expect("list").len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
