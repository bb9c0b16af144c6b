//! Relays run as replicas over one PostgreSQL database (`[cluster]`,
//! opt-in): the database holds what every replica must see alike (agent
//! credentials and revocations, in `identity::pg`), its schema is versioned
//! ([`schema`], applied by `relayd migrate`). Without `[cluster]` a relay
//! keeps its embedded store and needs nothing else.

pub mod registry;
pub mod schema;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use daemon::ConfigError;
use daemon::config::Human;
use serde::Deserialize;
use tokio_postgres::{Client, NoTls};

/// `[cluster]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// The PostgreSQL database, as a URL (`postgresql://relayd@db:5432/relay`)
    /// or `key=value` pairs. A password written here can be read by whoever
    /// reads relayd.toml: prefer `database_file`.
    pub database: Option<String>,
    /// A file holding the connection string (mode 0600: it may carry the
    /// password).
    pub database_file: Option<PathBuf>,
    /// Apply the schema migrations this relayd knows at start (default
    /// false: `relayd migrate` applies them, once, before the replicas are
    /// upgraded).
    pub migrate_at_start: Option<bool>,
    /// How often a replica checks its listening connection and the latest
    /// revocation, the backstop for a notification that never came
    /// (default 30 s).
    pub check_interval: Option<Human>,
    /// New agent sessions and token checks fail closed (503) when this
    /// replica has not heard from the database for longer than this
    /// (default 60 s; more than `check_interval`).
    pub max_staleness: Option<Human>,
}

/// `[cluster]` resolved.
#[derive(Clone)]
pub struct ClusterConfig {
    pub database: tokio_postgres::Config,
    /// The database without its password, for logs and errors.
    pub shown: String,
    pub migrate_at_start: bool,
    pub check_interval: Duration,
    pub max_staleness: Duration,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("database", &self.shown)
            .field("migrate_at_start", &self.migrate_at_start)
            .field("check_interval", &self.check_interval)
            .field("max_staleness", &self.max_staleness)
            .finish()
    }
}

impl serde::Serialize for ClusterConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let show = |d: Duration| humantime::format_duration(d).to_string();
        let mut st = s.serialize_struct("ClusterConfig", 4)?;
        st.serialize_field("database", &self.shown)?;
        st.serialize_field("migrate_at_start", &self.migrate_at_start)?;
        st.serialize_field("check_interval", &show(self.check_interval))?;
        st.serialize_field("max_staleness", &show(self.max_staleness))?;
        st.end()
    }
}

/// What a replica counts of its cluster work, for the metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Devices this replica claimed.
    pub claims: std::sync::atomic::AtomicU64,
    /// Sessions here closed because the device connected to another
    /// replica (claim conflicts).
    pub replaced: std::sync::atomic::AtomicU64,
    /// Times the presence connections to the database failed.
    pub db_errors: std::sync::atomic::AtomicU64,
    /// The last heartbeat's round trip, in microseconds.
    pub heartbeat_us: std::sync::atomic::AtomicU64,
}

/// How long connecting to the database and one statement may take.
pub const DB_TIMEOUT: Duration = Duration::from_secs(5);

impl ClusterFile {
    /// `None` without `[cluster]` (or with neither database key).
    pub fn resolve(self) -> Result<Option<ClusterConfig>, ConfigError> {
        let invalid = |what: String| ConfigError::Invalid(format!("[cluster] {what}"));
        let text = match (&self.database, &self.database_file) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(invalid("set database or database_file, not both".into()));
            }
            (Some(s), None) => s.clone(),
            (None, Some(path)) => {
                daemon::config::private_file(path)?;
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.clone(), source })?
                    .trim()
                    .to_owned()
            }
        };
        let mut database = tokio_postgres::Config::from_str(&text)
            .map_err(|e| invalid(format!("database: not a PostgreSQL connection string: {e}")))?;
        database.connect_timeout(DB_TIMEOUT).application_name("relayd");
        let check_interval = self.check_interval.map_or(Duration::from_secs(30), Human::get);
        let max_staleness = self.max_staleness.map_or(Duration::from_secs(60), Human::get);
        if check_interval.is_zero() || max_staleness <= check_interval {
            return Err(invalid(format!(
                "max_staleness ({max_staleness:?}) must be longer than check_interval ({check_interval:?}), which must not be 0"
            )));
        }
        Ok(Some(ClusterConfig {
            shown: shown(&database),
            database,
            migrate_at_start: self.migrate_at_start.unwrap_or(false),
            check_interval,
            max_staleness,
        }))
    }
}

/// `user@host:port/dbname`, never the password.
fn shown(c: &tokio_postgres::Config) -> String {
    let host = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        c.get_user().unwrap_or("?"),
        c.get_dbname().or(c.get_user()).unwrap_or("?")
    )
}

/// What went wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {0}: {1}")]
    Postgres(String, String),
    #[error("database {0}: no answer within {1:?}")]
    Timeout(String, Duration),
    #[error("{0}")]
    Schema(String),
}

impl ClusterConfig {
    /// A new connection, its driver running on the current runtime until
    /// the client is dropped or the connection fails. Connections that
    /// `LISTEN` drive their own ([`ClusterConfig::connect_raw`]).
    pub async fn connect(&self) -> Result<Client, DbError> {
        let (client, connection) = self.connect_raw().await?;
        tokio::spawn(async move {
            // An error ends the connection; the client's next call says so.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A new connection and its driver, which the caller polls.
    pub async fn connect_raw(
        &self,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        DbError,
    > {
        match tokio::time::timeout(DB_TIMEOUT, self.database.connect(NoTls)).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(self.error(e)),
            Err(_) => Err(DbError::Timeout(self.shown.clone(), DB_TIMEOUT)),
        }
    }

    pub fn error(&self, e: tokio_postgres::Error) -> DbError {
        // The server's own message (a missing table, a refused login) says
        // more than the error's summary.
        let text = match e.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => e.to_string(),
        };
        DbError::Postgres(self.shown.clone(), text)
    }

    /// `f` within [`DB_TIMEOUT`].
    pub async fn timed<T>(
        &self,
        f: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DbError> {
        match tokio::time::timeout(DB_TIMEOUT, f).await {
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(_) => Err(DbError::Timeout(self.shown.clone(), DB_TIMEOUT)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(toml: &str) -> ClusterFile {
        toml::from_str(toml).expect("parses")
    }

    #[test]
    fn without_a_database_there_is_no_cluster() {
        assert!(file("").resolve().expect("valid").is_none());
    }

    #[test]
    fn the_password_is_never_shown() {
        let c = file(r#"database = "postgresql://relayd:s3cret@db.internal:6432/relay""#)
            .resolve()
            .expect("valid")
            .expect("a cluster");
        assert_eq!(c.shown, "relayd@db.internal:6432/relay");
        assert!(!format!("{c:?}").contains("s3cret"));
        let kv = file(r#"database = "host=127.0.0.1 port=5433 user=postgres password=x""#)
            .resolve()
            .expect("valid")
            .expect("a cluster");
        assert_eq!(kv.shown, "postgres@127.0.0.1:5433/postgres");
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let both = file("database = \"host=a\"\ndatabase_file = \"/x\"").resolve();
        assert!(both.expect_err("refused").to_string().contains("not both"));
        let stale =
            file("database = \"host=a\"\ncheck_interval = \"30s\"\nmax_staleness = \"10s\"")
                .resolve();
        assert!(stale.expect_err("refused").to_string().contains("longer than check_interval"));
        let garbage = file("database = \"postgresql://[::1\"").resolve();
        assert!(garbage.expect_err("refused").to_string().contains("not a PostgreSQL"));
    }
}
