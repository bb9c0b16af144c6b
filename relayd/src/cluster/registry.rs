//! The statements of the replica registry and of presence (which replica
//! holds each device's session), over the `replicas` and `presence`
//! tables. The rules they keep: a claim makes the claiming replica the
//! holder with an epoch one higher than any before for that device, and
//! tells every replica (`pg_notify`); a release or a dead replica's
//! cleanup only clears the holder, so epochs never go back; a release
//! names the epoch it releases, so it cannot undo a newer claim.

use std::time::Duration;

use tokio_postgres::Client;

use super::{ClusterConfig, DbError};

/// The channel claims are told on.
pub const CHANNEL: &str = "relayd_presence";
/// How often a replica says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A replica silent this long is dead: its devices are released.
pub const DEAD_AFTER: Duration = Duration::from_secs(15);

/// What is told on [`CHANNEL`]: a claim (`replica` set), a release (no
/// `replica`), or, after a replica left or was reaped, `reload`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Claimed {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub device: String,
    pub replica: Option<String>,
    #[serde(default)]
    pub epoch: i64,
    #[serde(default)]
    pub reload: bool,
    /// A claiming replica's peer address, when it takes forwarded
    /// requests.
    #[serde(default)]
    pub peer: Option<String>,
}

/// Writes this replica's row (again), or refreshes its heartbeat.
pub async fn heartbeat(
    db: &ClusterConfig,
    c: &Client,
    id: &str,
    host: &str,
    listen: &str,
    peer: Option<&str>,
) -> Result<(), DbError> {
    db.timed(c.execute(
        "INSERT INTO replicas (id, host, listen, peer) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
        &[&id, &host, &listen, &peer],
    ))
    .await?;
    Ok(())
}

/// Tells every replica to read the whole directory again.
const RELOAD: &str = "SELECT pg_notify('relayd_presence', '{\"reload\":true}')";

/// Releases the devices of replicas silent for [`DEAD_AFTER`] and forgets
/// those replicas; returns how many devices it released.
pub async fn reap(db: &ClusterConfig, c: &Client) -> Result<u64, DbError> {
    let dead = format!("now() - interval '{} seconds'", DEAD_AFTER.as_secs());
    let released = db
        .timed(c.execute(
            &format!(
                "UPDATE presence SET replica_id = NULL
                 WHERE replica_id IN (SELECT id FROM replicas WHERE heartbeat_at < {dead})"
            ),
            &[],
        ))
        .await?;
    let gone = db
        .timed(c.execute(&format!("DELETE FROM replicas WHERE heartbeat_at < {dead}"), &[]))
        .await?;
    if released + gone > 0 {
        db.timed(c.execute(RELOAD, &[])).await?;
    }
    Ok(released)
}

/// Makes `replica` the holder of `user`'s `device`; the new epoch.
pub async fn claim(
    db: &ClusterConfig,
    c: &Client,
    user: &str,
    device: &str,
    replica: &str,
) -> Result<i64, DbError> {
    let row = db
        .timed(c.query_one(
            "WITH c AS (
                 INSERT INTO presence (user_id, device, replica_id, epoch) VALUES ($1, $2, $3, 1)
                 ON CONFLICT (user_id, device) DO UPDATE
                     SET replica_id = $3, epoch = presence.epoch + 1, claimed_at = now()
                 RETURNING epoch)
             SELECT epoch, pg_notify($4, json_build_object('user', $1::text, 'device', $2::text,
                 'replica', $3::text, 'epoch', epoch,
                 'peer', (SELECT peer FROM replicas WHERE id = $3))::text) FROM c",
            &[&user, &device, &replica, &CHANNEL],
        ))
        .await?;
    Ok(row.get(0))
}

/// Clears the holder of `user`'s `device` if it is still `replica` at
/// `epoch`.
pub async fn release(
    db: &ClusterConfig,
    c: &Client,
    user: &str,
    device: &str,
    replica: &str,
    epoch: i64,
) -> Result<(), DbError> {
    db.timed(c.execute(
        "WITH r AS (
             UPDATE presence SET replica_id = NULL
             WHERE user_id = $1 AND device = $2 AND replica_id = $3 AND epoch = $4
             RETURNING epoch)
         SELECT pg_notify($5, json_build_object('user', $1::text, 'device', $2::text,
             'epoch', epoch)::text) FROM r",
        &[&user, &device, &replica, &epoch, &CHANNEL],
    ))
    .await?;
    Ok(())
}

/// What [`reassert`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The row says this replica holds it, at this epoch (written again
    /// if it had been lost or cleared).
    Here,
    /// Another replica claimed it since, with a higher epoch.
    Elsewhere,
}

/// Asserts that `replica` holds `user`'s `device` at `epoch`, healing a
/// row that was lost, cleared or set back (a database failover that lost
/// the last writes, a pause long enough to be taken for dead), unless a
/// newer claim exists. A row it had to heal is told to every replica, as a
/// claim is.
pub async fn reassert(
    db: &ClusterConfig,
    c: &Client,
    user: &str,
    device: &str,
    replica: &str,
    epoch: i64,
) -> Result<Held, DbError> {
    let row = db
        .timed(c.query_one(
            "WITH old AS (
                 SELECT replica_id, epoch FROM presence WHERE user_id = $1 AND device = $2),
             up AS (
                 INSERT INTO presence (user_id, device, replica_id, epoch) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_id, device) DO UPDATE SET replica_id = $3, epoch = $4
                 WHERE presence.epoch < $4 OR (presence.epoch = $4
                     AND (presence.replica_id IS NULL OR presence.replica_id = $3))
                 RETURNING epoch)
             SELECT (SELECT count(*) FROM up),
                 CASE WHEN EXISTS (SELECT 1 FROM up)
                     AND NOT EXISTS (SELECT 1 FROM old WHERE replica_id = $3 AND epoch = $4)
                 THEN pg_notify($5, json_build_object('user', $1::text, 'device', $2::text,
                     'replica', $3::text, 'epoch', $4::bigint,
                     'peer', (SELECT peer FROM replicas WHERE id = $3))::text) END",
            &[&user, &device, &replica, &epoch, &CHANNEL],
        ))
        .await?;
    Ok(if row.get::<_, i64>(0) > 0 { Held::Here } else { Held::Elsewhere })
}

/// Forgets this replica at a clean stop: its devices released, its row
/// gone.
pub async fn leave(db: &ClusterConfig, c: &Client, replica: &str) -> Result<(), DbError> {
    db.timed(c.execute("UPDATE presence SET replica_id = NULL WHERE replica_id = $1", &[&replica]))
        .await?;
    db.timed(c.execute("DELETE FROM replicas WHERE id = $1", &[&replica])).await?;
    db.timed(c.execute(RELOAD, &[])).await?;
    Ok(())
}

/// A replica as the registry shows it.
#[derive(Debug, Clone)]
pub struct Replica {
    pub id: String,
    pub host: String,
    pub listen: String,
    /// Seconds since it started, and since its last heartbeat.
    pub up_secs: f64,
    pub heartbeat_age_secs: f64,
    /// Devices it holds.
    pub devices: i64,
}

/// Every replica in the registry, and the devices each holds.
pub async fn replicas(db: &ClusterConfig, c: &Client) -> Result<Vec<Replica>, DbError> {
    let rows = db
        .timed(c.query(
            "SELECT r.id, r.host, r.listen,
                    extract(epoch FROM now() - r.started_at)::float8,
                    extract(epoch FROM now() - r.heartbeat_at)::float8,
                    (SELECT count(*) FROM presence p WHERE p.replica_id = r.id)
             FROM replicas r ORDER BY r.started_at, r.id",
            &[],
        ))
        .await?;
    Ok(rows
        .iter()
        .map(|r| Replica {
            id: r.get(0),
            host: r.get(1),
            listen: r.get(2),
            up_secs: r.get(3),
            heartbeat_age_secs: r.get(4),
            devices: r.get(5),
        })
        .collect())
}

/// Where each connected device is: (user, device, replica, epoch).
pub async fn devices(
    db: &ClusterConfig,
    c: &Client,
) -> Result<Vec<(String, String, String, i64)>, DbError> {
    let rows = db
        .timed(c.query(
            "SELECT user_id, device, replica_id, epoch FROM presence
             WHERE replica_id IS NOT NULL ORDER BY user_id, device",
            &[],
        ))
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
}

/// Every live replica's peer address (`None`: it takes no forwarded
/// requests), and every connected device: what [`super::Directory`] is
/// loaded from.
pub async fn snapshot(
    db: &ClusterConfig,
    c: &Client,
) -> Result<(Vec<(String, Option<String>)>, Vec<(String, String, String, i64)>), DbError> {
    let peers = db.timed(c.query("SELECT id, peer FROM replicas", &[])).await?;
    let peers = peers.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok((peers, devices(db, c).await?))
}
