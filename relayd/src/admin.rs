//! What an operator does to a relay's identity from the command line,
//! offline: generate the signing key, mint client and share tokens (the
//! key file is enough, so this works while relayd runs), issue and revoke
//! agent credentials (these write the credential store, which the running
//! relay holds: stop it first, or use its control socket).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::identity::keys::Signer;
use crate::identity::{Identity, IssuedCredential, MintOptions, Minted, Role, Scope, mint_with};

/// An administrative action that failed, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("{0}")]
    Store(#[from] crate::identity::store::StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Writes a new Ed25519 signing key to `path` (mode 0600), refusing to
/// overwrite one.
pub fn generate_key(path: &Path) -> Result<String, AdminError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (signer, pem) = Signer::generate().map_err(AdminError::Invalid)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| AdminError::Invalid(format!("{}: {e}", path.display())))?;
    f.write_all(pem.as_bytes())?;
    f.sync_all()?;
    Ok(signer.kid().to_owned())
}

/// The signing key relayd makes in its state directory when
/// `[identity] signing_key_file` is not set.
pub const SIGNING_KEY: &str = "signing.key";

/// Mints a client token (with `scope`, a share token) from the signing key
/// in `config`, or the one relayd made in its state directory.
pub fn mint_client(
    config: &Config,
    user: &str,
    ttl: Duration,
    scope: Option<Scope>,
) -> Result<Minted, AdminError> {
    let made = config.state_dir.as_ref().map(|d| d.join(SIGNING_KEY)).filter(|p| p.exists());
    let signer = match (&config.identity.signer, made) {
        (Some(signer), _) => signer.clone(),
        (None, Some(path)) => Arc::new(Signer::load_or_create(&path).map_err(|e| {
            AdminError::Invalid(format!("{e} (run this as the user relayd runs as)"))
        })?),
        (None, None) => {
            return Err(AdminError::Invalid(
                "no signing key yet: relayd makes one in its state directory when it first starts; start it, or use `tunnelctl token issue` on the running relay".into(),
            ));
        }
    };
    let options = MintOptions { scope, ..MintOptions::default() };
    Ok(mint_with(&signer, &config.identity, user, Role::Client, ttl, options)?)
}

/// The relay's identity over the credential store of `config`'s state
/// directory, opened the way relayd opens it, and a runtime to drive it
/// (these commands run without relayd's).
fn identity(config: &Config) -> Result<(Identity, tokio::runtime::Runtime), AdminError> {
    let dir = match (&config.cluster, &config.state_dir) {
        (Some(_), _) => None,
        (None, Some(dir)) => {
            std::fs::create_dir_all(dir)?;
            Some(dir.as_path())
        }
        (None, None) => {
            return Err(AdminError::Invalid(
                "agent credentials live in the state directory: set state_dir".into(),
            ));
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let store = runtime
        .block_on(crate::identity::open_store(config.cluster.as_ref(), dir))
        .map_err(|e| match dir {
            Some(_) => AdminError::Invalid(format!(
                "{e} (a running relayd holds the store: stop it, or use tunnelctl on its control socket)"
            )),
            None => AdminError::Invalid(e.to_string()),
        })?
        .ok_or_else(|| AdminError::Invalid("no credential store".into()))?;
    let opening = Identity::open(config.identity_config(), config.static_tokens(), store);
    Ok((runtime.block_on(opening)?, runtime))
}

/// Issues a long-lived agent credential into the state directory's store.
pub fn issue_credential(
    config: &Config,
    user: &str,
    device: Option<&str>,
) -> Result<IssuedCredential, AdminError> {
    let (identity, runtime) = identity(config)?;
    Ok(runtime.block_on(identity.issue_credential(user, device, None))?)
}

/// Revokes a credential id or a token's `jti` in the state directory's
/// store.
pub fn revoke(config: &Config, id: &str) -> Result<bool, AdminError> {
    let (identity, runtime) = identity(config)?;
    Ok(runtime.block_on(identity.revoke(id, None))?)
}

/// The credentials issued, with whether each is revoked.
pub fn credentials(
    config: &Config,
) -> Result<Vec<(crate::identity::store::CredentialRecord, bool)>, AdminError> {
    let (identity, runtime) = identity(config)?;
    Ok(runtime.block_on(identity.credentials())?)
}

/// `relayd migrate`: what it found and did, in words.
pub fn migrate_command(
    config: &Config,
    to: Option<u32>,
    status: bool,
) -> Result<String, AdminError> {
    let invalid = |e: crate::cluster::DbError| AdminError::Invalid(e.to_string());
    let db = config.cluster.as_ref().ok_or_else(|| {
        AdminError::Invalid(
            "no [cluster] database in the configuration: a single relay keeps its embedded store and needs no migration".into(),
        )
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut client = db.connect().await.map_err(invalid)?;
        if status {
            let v = crate::cluster::schema::version(db, &client).await.map_err(invalid)?;
            let pending: Vec<String> = crate::cluster::schema::MIGRATIONS
                .iter()
                .filter(|m| m.version > v && to.is_none_or(|t| m.version <= t))
                .map(|m| format!("  {} {}", m.version, m.name))
                .collect();
            return Ok(format!(
                "database {} at schema version {v}; this relayd knows up to {}{}",
                db.shown,
                crate::cluster::schema::latest(),
                if pending.is_empty() {
                    String::from("; nothing to apply")
                } else {
                    format!("; would apply:\n{}", pending.join("\n"))
                }
            ));
        }
        let m = crate::cluster::schema::migrate(db, &mut client, to).await.map_err(invalid)?;
        Ok(if m.applied.is_empty() {
            format!("database {} at schema version {}: nothing to apply", db.shown, m.from)
        } else {
            let list: Vec<String> = m.applied.iter().map(|(v, n)| format!("  {v} {n}")).collect();
            format!(
                "database {}: schema version {} -> {}, applied:\n{}",
                db.shown,
                m.from,
                m.to,
                list.join("\n")
            )
        })
    })
}

/// `relayd cluster`: the registry's replicas (a replica silent for
/// `DEAD_AFTER` is shown as such until another reaps it) and the devices
/// each holds.
pub fn cluster_command(config: &Config) -> Result<String, AdminError> {
    use crate::cluster::registry;
    use std::fmt::Write as _;
    let invalid = |e: crate::cluster::DbError| AdminError::Invalid(e.to_string());
    let db = config.cluster.as_ref().ok_or_else(|| {
        AdminError::Invalid(
            "no [cluster] database in the configuration: one relay, no replicas".into(),
        )
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = db.connect().await.map_err(invalid)?;
        crate::cluster::schema::check(db, &client).await.map_err(invalid)?;
        let replicas = registry::replicas(db, &client).await.map_err(invalid)?;
        let devices = registry::devices(db, &client).await.map_err(invalid)?;
        let mut out = format!("database {}: {} replica(s)\n", db.shown, replicas.len());
        let dead = registry::DEAD_AFTER.as_secs_f64();
        for r in &replicas {
            let health = if r.heartbeat_age_secs > dead { "silent" } else { "alive" };
            let _ = writeln!(
                out,
                "  {}  {health} (heartbeat {}s ago)  {} {}  up {}  devices {}",
                r.id,
                r.heartbeat_age_secs as u64,
                r.host,
                r.listen,
                humantime::format_duration(std::time::Duration::from_secs(r.up_secs as u64)),
                r.devices
            );
        }
        let _ = writeln!(out, "{} device(s) connected", devices.len());
        for (user, device, replica, epoch) in &devices {
            let _ = writeln!(out, "  {user}/{device}  on {replica}  (epoch {epoch})");
        }
        Ok(out)
    })
}
