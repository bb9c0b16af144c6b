//! Relays run as replicas over one PostgreSQL database (`[cluster]`,
//! opt-in): the database holds what every replica must see alike (agent
//! credentials and revocations, in `identity::pg`), its schema is versioned
//! ([`schema`], applied by `relayd migrate`). Without `[cluster]` a relay
//! keeps its embedded store and needs nothing else.

pub mod peer_client;
pub mod registry;
pub mod schema;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
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
    /// Where this replica takes requests other replicas forward to it
    /// (HTTP/2 over mutual TLS). Without it, it neither takes nor sends
    /// any: each replica serves only the agents connected to it.
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The address other replicas dial (`host:port`; default
    /// `peer_listen`, which must then name an address, not 0.0.0.0).
    pub peer_address: Option<String>,
    /// This replica's certificate and key for the peer listener and for
    /// the requests it forwards, signed by `peer_ca_file`'s CA.
    pub peer_cert_file: Option<PathBuf>,
    pub peer_key_file: Option<PathBuf>,
    /// The CA every replica's peer certificate is signed by: nothing else
    /// is let in.
    pub peer_ca_file: Option<PathBuf>,
}

/// Forwarding between replicas, resolved.
#[derive(Clone)]
pub struct Peering {
    pub listen: std::net::SocketAddr,
    /// What other replicas dial.
    pub address: String,
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
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
    /// Forwarding between replicas, when `peer_listen` is set.
    pub peering: Option<Peering>,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("database", &self.shown)
            .field("migrate_at_start", &self.migrate_at_start)
            .field("check_interval", &self.check_interval)
            .field("max_staleness", &self.max_staleness)
            .field("peer", &self.peering.as_ref().map(|p| &p.address))
            .finish()
    }
}

impl serde::Serialize for ClusterConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let show = |d: Duration| humantime::format_duration(d).to_string();
        let mut st = s.serialize_struct("ClusterConfig", 5)?;
        st.serialize_field("database", &self.shown)?;
        st.serialize_field("migrate_at_start", &self.migrate_at_start)?;
        st.serialize_field("check_interval", &show(self.check_interval))?;
        st.serialize_field("max_staleness", &show(self.max_staleness))?;
        st.serialize_field("peer_address", &self.peering.as_ref().map(|p| &p.address))?;
        st.end()
    }
}

/// Where every device of the cluster is connected, as this replica was
/// told: loaded whole from the database when presence connects (and every
/// minute), then kept by the claims and releases every replica tells. It
/// answers, with no database on the request path, which replica to
/// forward a request for a user this one does not hold to.
#[derive(Debug, Default)]
pub struct Directory {
    inner: std::sync::RwLock<Known>,
    /// This replica's id, once it joined.
    me: std::sync::OnceLock<String>,
}

#[derive(Debug, Default)]
struct Known {
    /// user -> (device, replica, epoch).
    devices: std::collections::HashMap<String, Vec<(String, String, i64)>>,
    /// replica -> its peer address, for replicas that take forwarded
    /// requests.
    peers: std::collections::HashMap<String, String>,
}

impl Directory {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Everything again, from [`registry::snapshot`].
    pub fn load(
        &self,
        peers: Vec<(String, Option<String>)>,
        devices: Vec<(String, String, String, i64)>,
    ) {
        let mut k = Known {
            peers: peers.into_iter().filter_map(|(id, p)| Some((id, p?))).collect(),
            ..Known::default()
        };
        for (user, device, replica, epoch) in devices {
            k.devices.entry(user).or_default().push((device, replica, epoch));
        }
        *self.write() = k;
    }

    /// `replica` holds `user`'s `device` at `epoch`, unless a newer claim
    /// is known.
    pub fn claimed(&self, user: &str, device: &str, replica: &str, epoch: i64) {
        let mut k = self.write();
        let list = k.devices.entry(user.to_owned()).or_default();
        match list.iter_mut().find(|(d, _, _)| d == device) {
            Some(entry) if entry.2 <= epoch => {
                *entry = (device.to_owned(), replica.to_owned(), epoch);
            }
            Some(_) => {}
            None => list.push((device.to_owned(), replica.to_owned(), epoch)),
        }
    }

    /// `replica` takes forwarded requests at `peer`.
    pub fn peer(&self, replica: &str, peer: &str) {
        self.write().peers.insert(replica.to_owned(), peer.to_owned());
    }

    /// The claim of `user`'s `device` at `epoch` ended.
    pub fn released(&self, user: &str, device: &str, epoch: i64) {
        let mut k = self.write();
        if let Some(list) = k.devices.get_mut(user) {
            list.retain(|(d, _, e)| !(d == device && *e <= epoch));
            if list.is_empty() {
                k.devices.remove(user);
            }
        }
    }

    /// This replica's id (set once, when it joins).
    pub fn set_me(&self, id: &str) {
        let _ = self.me.set(id.to_owned());
    }

    /// This replica's id, once it joined.
    pub fn me(&self) -> Option<&str> {
        self.me.get().map(String::as_str)
    }

    /// Another replica that holds a device of `user` and takes forwarded
    /// requests: its id and peer address (the newest claim first).
    pub fn locate(&self, user: &str) -> Option<(String, String)> {
        let me = self.me.get().map_or("", String::as_str);
        let k = self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut held: Vec<&(String, String, i64)> =
            k.devices.get(user)?.iter().filter(|(_, r, _)| r != me).collect();
        held.sort_by_key(|(_, _, e)| std::cmp::Reverse(*e));
        held.into_iter().find_map(|(_, r, _)| Some((r.clone(), k.peers.get(r)?.clone())))
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
    /// Requests this replica forwarded to the replica holding their user,
    /// those it could not, and those it refused as misdirected (421).
    pub forwarded: std::sync::atomic::AtomicU64,
    pub forward_failed: std::sync::atomic::AtomicU64,
    pub misdirected: std::sync::atomic::AtomicU64,
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
        let peering = self.peering()?;
        Ok(Some(ClusterConfig {
            shown: shown(&database),
            database,
            migrate_at_start: self.migrate_at_start.unwrap_or(false),
            check_interval,
            max_staleness,
            peering,
        }))
    }

    fn peering(&self) -> Result<Option<Peering>, ConfigError> {
        let invalid = |what: String| ConfigError::Invalid(format!("[cluster] {what}"));
        let files = (&self.peer_cert_file, &self.peer_key_file, &self.peer_ca_file);
        let Some(listen) = self.peer_listen else {
            if self.peer_address.is_some()
                || files.0.is_some()
                || files.1.is_some()
                || files.2.is_some()
            {
                return Err(invalid(
                    "peer_address and the peer_*_file keys need peer_listen".into(),
                ));
            }
            return Ok(None);
        };
        let (Some(cert), Some(key), Some(ca)) = files else {
            return Err(invalid(
                "peer_listen needs peer_cert_file, peer_key_file and peer_ca_file: replicas forward to each other over mutual TLS".into(),
            ));
        };
        let address = match &self.peer_address {
            Some(a) => a.clone(),
            None if listen.ip().is_unspecified() => {
                return Err(invalid(format!(
                    "peer_listen {listen} names no address other replicas can dial: set peer_address"
                )));
            }
            None => listen.to_string(),
        };
        let (server, client) =
            crate::tls::mutual(cert, key, ca).map_err(|e| invalid(format!("peer TLS: {e}")))?;
        Ok(Some(Peering { listen, address, server, client }))
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

/// A listening connection ([`ClusterConfig::listen`]); its driver stops
/// when it is dropped.
pub struct Listening {
    pub client: Client,
    /// Each notification's payload; an `Err` once the connection failed.
    pub told: tokio::sync::mpsc::Receiver<Result<String, DbError>>,
    _driver: AbortOnDrop,
}

/// Aborts a task when dropped (a connection's driver).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

    /// A connection that `LISTEN`s on `channel`, named `name` in
    /// `pg_stat_activity`: its client, for the checks it runs, and the
    /// payloads of its notifications, then an `Err` when it fails.
    pub async fn listen(&self, channel: &str, name: &str) -> Result<Listening, DbError> {
        let mut named = self.clone();
        named.database.application_name(name);
        let (client, mut connection) = named.connect_raw().await?;
        let (tx, told) = tokio::sync::mpsc::channel(1024);
        let db = self.clone();
        let driver = tokio::spawn(async move {
            use futures_util::StreamExt as _;
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = messages.next().await {
                let sent = match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        tx.send(Ok(n.payload().to_owned())).await
                    }
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let _ = tx.send(Err(db.error(e))).await;
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        let listening = Listening { client, told, _driver: AbortOnDrop(driver) };
        self.timed(listening.client.batch_execute(&format!("LISTEN {channel}"))).await?;
        Ok(listening)
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
