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
use std::sync::{Mutex, PoisonError};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// An issued agent credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub id: String,
    pub user: String,
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
pub struct StoreError(String);

impl StoreError {
    fn of(e: impl std::fmt::Display) -> Self {
        StoreError(e.to_string())
    }
}

/// Issued credentials and revocations.
pub trait CredentialStore: Send + Sync {
    fn insert(&self, record: &CredentialRecord) -> Result<(), StoreError>;
    fn get(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError>;
    fn list(&self) -> Result<Vec<CredentialRecord>, StoreError>;
    /// Records `id` as revoked; false when it already was.
    fn revoke(&self, revocation: &Revocation) -> Result<bool, StoreError>;
    fn revocations(&self) -> Result<Vec<Revocation>, StoreError>;
}

const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
/// Revoked ids -> when the record may go (u64::MAX: never).
const REVOKED: TableDefinition<&str, u64> = TableDefinition::new("revoked");

/// The embedded store: one redb file.
pub struct RedbStore {
    db: Database,
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
        Ok(Self { db })
    }
}

impl CredentialStore for RedbStore {
    fn insert(&self, record: &CredentialRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(StoreError::of)?;
        let txn = self.db.begin_write().map_err(StoreError::of)?;
        {
            let mut table = txn.open_table(CREDENTIALS).map_err(StoreError::of)?;
            table.insert(record.id.as_str(), value.as_slice()).map_err(StoreError::of)?;
        }
        txn.commit().map_err(StoreError::of)
    }

    fn get(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::of)?;
        let table = txn.open_table(CREDENTIALS).map_err(StoreError::of)?;
        let Some(value) = table.get(id).map_err(StoreError::of)? else { return Ok(None) };
        serde_json::from_slice(value.value()).map(Some).map_err(StoreError::of)
    }

    fn list(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::of)?;
        let table = txn.open_table(CREDENTIALS).map_err(StoreError::of)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(StoreError::of)? {
            let (_, value) = entry.map_err(StoreError::of)?;
            out.push(serde_json::from_slice(value.value()).map_err(StoreError::of)?);
        }
        Ok(out)
    }

    fn revoke(&self, revocation: &Revocation) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(StoreError::of)?;
        let fresh = {
            let mut table = txn.open_table(REVOKED).map_err(StoreError::of)?;
            let until = revocation.until.unwrap_or(u64::MAX);
            table.insert(revocation.id.as_str(), until).map_err(StoreError::of)?.is_none()
        };
        txn.commit().map_err(StoreError::of)?;
        Ok(fresh)
    }

    fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::of)?;
        let table = txn.open_table(REVOKED).map_err(StoreError::of)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(StoreError::of)? {
            let (id, until) = entry.map_err(StoreError::of)?;
            let until = Some(until.value()).filter(|u| *u != u64::MAX);
            out.push(Revocation { id: id.value().to_owned(), until });
        }
        Ok(out)
    }
}

/// A store in memory: for a relay without a state directory (credentials
/// then last until it restarts) and for tests.
#[derive(Default)]
pub struct MemoryStore {
    credentials: Mutex<HashMap<String, CredentialRecord>>,
    revoked: Mutex<HashMap<String, Option<u64>>>,
}

impl CredentialStore for MemoryStore {
    fn insert(&self, record: &CredentialRecord) -> Result<(), StoreError> {
        let mut map = self.credentials.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(record.id.clone(), record.clone());
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        Ok(self.credentials.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned())
    }

    fn list(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        Ok(self
            .credentials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect())
    }

    fn revoke(&self, revocation: &Revocation) -> Result<bool, StoreError> {
        let mut map = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(map.insert(revocation.id.clone(), revocation.until).is_none())
    }

    fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let map = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(map.iter().map(|(id, until)| Revocation { id: id.clone(), until: *until }).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> CredentialRecord {
        CredentialRecord {
            id: id.into(),
            user: "alice".into(),
            secret_sha256: "00".repeat(32),
            created: 1,
            replaces: None,
        }
    }

    fn exercise(store: &dyn CredentialStore) {
        store.insert(&record("c_1")).expect("insert");
        assert_eq!(store.get("c_1").expect("get"), Some(record("c_1")));
        assert_eq!(store.get("c_2").expect("get"), None);
        assert!(store.revoke(&Revocation { id: "c_1".into(), until: None }).expect("revoke"));
        assert!(!store.revoke(&Revocation { id: "c_1".into(), until: None }).expect("again"));
        assert!(store.revoke(&Revocation { id: "jti_9".into(), until: Some(99) }).expect("jti"));
        let mut revoked = store.revocations().expect("list");
        revoked.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(
            revoked,
            [
                Revocation { id: "c_1".into(), until: None },
                Revocation { id: "jti_9".into(), until: Some(99) }
            ]
        );
        assert_eq!(store.list().expect("list").len(), 1);
    }

    #[test]
    fn both_stores_keep_credentials_and_revocations() {
        exercise(&MemoryStore::default());
        let dir = std::env::temp_dir().join(format!("relayd-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("credentials.redb");
        exercise(&RedbStore::open(&path).expect("open"));
    }

    #[test]
    fn the_embedded_store_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("relayd-store-restart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("credentials.redb");
        {
            let store = RedbStore::open(&path).expect("open");
            store.insert(&record("c_7")).expect("insert");
            store.revoke(&Revocation { id: "c_7".into(), until: None }).expect("revoke");
        }
        let store = RedbStore::open(&path).expect("reopen");
        assert_eq!(store.get("c_7").expect("get"), Some(record("c_7")));
        assert_eq!(store.revocations().expect("list").len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
