//! The database schema, versioned: each migration runs once, in order, in
//! one transaction with its row in `relayd_schema`, under an advisory lock
//! so that two replicas started together do not both apply it. A relayd
//! refuses a database whose schema is newer than it knows (it would write
//! what a newer relayd reads differently) or older (run `relayd migrate`).

use tokio_postgres::Client;

use super::{ClusterConfig, DbError};

/// One step of the schema.
#[derive(Debug)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, oldest first; versions count up from 1 without gaps.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "agent credentials and revocations",
        sql: "
        CREATE TABLE credentials (
            id            text PRIMARY KEY,
            user_id       text NOT NULL,
            device        text,
            secret_sha256 text NOT NULL,
            created       bigint NOT NULL,
            replaces      text
        );
        CREATE INDEX credentials_user ON credentials (user_id);
        -- until_unix: when the record may be forgotten (a token's expiry);
        -- NULL for credentials, which never expire. revision orders them
        -- for the replicas' backstop check.
        CREATE TABLE revocations (
            id         text PRIMARY KEY,
            until_unix bigint,
            revision   bigserial NOT NULL,
            revoked_at timestamptz NOT NULL DEFAULT now()
        );
    ",
    },
    Migration {
        version: 2,
        name: "replicas and where each device is connected",
        sql: "
        -- Each replica's row, written at start and every heartbeat; a
        -- replica silent for 15 s is dead, and its rows go.
        CREATE TABLE replicas (
            id           text PRIMARY KEY,
            host         text NOT NULL,
            listen       text NOT NULL,
            started_at   timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now()
        );
        -- Soft state: each replica's map of its sessions is the truth, this
        -- indexes it. epoch only grows, so a row stays when its device
        -- leaves (replica_id NULL): a claim with a higher epoch elsewhere
        -- replaces the session, a release names the epoch it releases.
        CREATE TABLE presence (
            user_id    text NOT NULL,
            device     text NOT NULL,
            replica_id text,
            epoch      bigint NOT NULL,
            claimed_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (user_id, device)
        );
        CREATE INDEX presence_replica ON presence (replica_id);
    ",
    },
    Migration {
        version: 3,
        name: "the address replicas forward requests to each other on",
        sql: "ALTER TABLE replicas ADD COLUMN peer text;",
    },
];

/// The version this relayd's code reads and writes.
pub fn latest() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Any fixed number: the lock migrations take.
const LOCK: i64 = 0x7265_6c61_7964;

const BOOKKEEPING: &str = "CREATE TABLE IF NOT EXISTS relayd_schema (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// The schema version of the database (0: nothing applied yet).
pub async fn version(db: &ClusterConfig, client: &Client) -> Result<u32, DbError> {
    let exists =
        db.timed(client.query_one("SELECT to_regclass('relayd_schema') IS NOT NULL", &[])).await?;
    if !exists.get::<_, bool>(0) {
        return Ok(0);
    }
    let row = db
        .timed(client.query_one("SELECT coalesce(max(version), 0) FROM relayd_schema", &[]))
        .await?;
    Ok(u32::try_from(row.get::<_, i32>(0)).unwrap_or(0))
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub from: u32,
    pub to: u32,
    /// The migrations applied, by version and name.
    pub applied: Vec<(u32, &'static str)>,
}

/// Applies the migrations after the database's version, up to `up_to`
/// (default: all this relayd knows).
pub async fn migrate(
    db: &ClusterConfig,
    client: &mut Client,
    up_to: Option<u32>,
) -> Result<Migrated, DbError> {
    let target = up_to.unwrap_or_else(latest);
    if target > latest() {
        return Err(DbError::Schema(format!(
            "this relayd knows schema versions up to {}, not {target}",
            latest()
        )));
    }
    let txn = db.timed(client.transaction()).await?;
    db.timed(txn.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])).await?;
    // Without the notice that the table exists, every time.
    db.timed(txn.batch_execute("SET LOCAL client_min_messages = warning")).await?;
    db.timed(txn.batch_execute(BOOKKEEPING)).await?;
    let row =
        db.timed(txn.query_one("SELECT coalesce(max(version), 0) FROM relayd_schema", &[])).await?;
    let from = u32::try_from(row.get::<_, i32>(0)).unwrap_or(0);
    if from > latest() {
        return Err(newer(from));
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > from && m.version <= target) {
        db.timed(txn.batch_execute(m.sql)).await.map_err(|e| {
            DbError::Schema(format!("migration {} ({}) failed: {e}", m.version, m.name))
        })?;
        let version = i32::try_from(m.version).unwrap_or(i32::MAX);
        db.timed(txn.execute(
            "INSERT INTO relayd_schema (version, name) VALUES ($1, $2)",
            &[&version, &m.name],
        ))
        .await?;
        applied.push((m.version, m.name));
    }
    db.timed(txn.commit()).await?;
    let to = applied.last().map_or(from, |a| a.0);
    Ok(Migrated { from, to, applied })
}

fn newer(version: u32) -> DbError {
    DbError::Schema(format!(
        "the database's schema is version {version}, newer than this relayd knows ({}): upgrade relayd",
        latest()
    ))
}

/// Refuses a database this relayd cannot use as it is.
pub async fn check(db: &ClusterConfig, client: &Client) -> Result<(), DbError> {
    match version(db, client).await? {
        v if v == latest() => Ok(()),
        v if v > latest() => Err(newer(v)),
        v => Err(DbError::Schema(format!(
            "the database's schema is version {v}, this relayd needs {}: run `relayd migrate` (or set [cluster] migrate_at_start = true)",
            latest()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
        }
        assert_eq!(latest() as usize, MIGRATIONS.len());
    }
}
