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
use crate::identity::store;
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
    let dir = config.state_dir.as_ref().ok_or_else(|| {
        AdminError::Invalid("agent credentials live in the state directory: set state_dir".into())
    })?;
    std::fs::create_dir_all(dir)?;
    let store = store::open(dir).map_err(|e| {
        AdminError::Invalid(format!(
            "{e} (a running relayd holds the store: stop it, or use tunnelctl on its control socket)"
        ))
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
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
