//! What the relay hands out: JWTs it signs (access, client and share
//! tokens) and long-lived agent credentials (`tcred_<id>_<secret>`, recorded
//! by id and the hash of the secret).

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::claims::{CREDENTIAL_CLAIM, MAX_NUMERIC_DATE};
use super::keys::Signer;
use super::store::{CredentialRecord, CredentialStore};
use super::{CREDENTIAL_PREFIX, IdentityConfig, IdentityError, Role, Scope, unix};

/// A freshly minted JWT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    pub token: String,
    pub id: String,
    pub expires: SystemTime,
}

/// A freshly issued agent credential; `secret` is shown once and never
/// stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCredential {
    pub id: String,
    pub user: String,
    pub device: Option<String>,
    pub secret: String,
}

pub(super) fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

/// What a minted JWT says beyond its user and role.
#[derive(Debug, Clone, Default)]
pub struct MintOptions {
    /// Makes it a share token.
    pub scope: Option<Scope>,
    /// The agent credential an access token is minted for: revoking it
    /// revokes the token.
    pub credential: Option<String>,
    /// The device an agent's access token is for (from its credential).
    pub device: Option<String>,
}

/// Mints a JWT with `signer` under `config`'s issuer, audience and claim
/// names (used by the running relay and by `relayd token issue`).
pub fn mint_with(
    signer: &Signer,
    config: &IdentityConfig,
    user: &str,
    role: Role,
    ttl: Duration,
    options: MintOptions,
) -> Result<Minted, IdentityError> {
    if !super::valid_user_id(user) {
        return Err(IdentityError::Invalid(format!("{user:?} is not a valid user id")));
    }
    if ttl.is_zero() {
        return Err(IdentityError::Invalid("a token's lifetime must be more than 0 s".into()));
    }
    let now = SystemTime::now();
    let expires =
        now.checked_add(ttl).filter(|e| unix(*e) <= MAX_NUMERIC_DATE).ok_or_else(|| {
            IdentityError::Invalid(format!(
                "a lifetime of {} s ends after year 9999; ask for less",
                ttl.as_secs()
            ))
        })?;
    let id = random_id("t_");
    let role_name = match role {
        Role::Agent => &config.agent_role,
        Role::Client => &config.client_role,
    };
    let mut claims = serde_json::json!({
        config.user_claim.clone(): user,
        config.role_claim.clone(): role_name,
        "iat": unix(now),
        "nbf": unix(now),
        "exp": unix(expires),
        "jti": id,
        "iss": config.issuer.clone().unwrap_or_else(|| "relayd".into()),
    });
    if let Some(aud) = &config.audience {
        claims["aud"] = aud.clone().into();
    }
    if let Some(scope) = options.scope {
        claims["share"] =
            serde_json::to_value(scope).map_err(|e| IdentityError::Sign(e.to_string()))?;
    }
    if let Some(credential) = options.credential {
        claims[CREDENTIAL_CLAIM] = credential.into();
    }
    if let Some(device) = options.device {
        claims[config.device_claim.as_str()] = device.into();
    }
    let token = signer.sign(&claims).map_err(IdentityError::Sign)?;
    Ok(Minted { token, id, expires })
}

/// Issues a credential into `store`.
pub async fn issue_into(
    store: &dyn CredentialStore,
    user: &str,
    device: Option<&str>,
    replaces: Option<&str>,
) -> Result<IssuedCredential, IdentityError> {
    if !super::valid_user_id(user) {
        return Err(IdentityError::Invalid(format!("{user:?} is not a valid user id")));
    }
    if let Some(d) = device.filter(|d| !super::valid_user_id(d)) {
        return Err(IdentityError::Invalid(format!(
            "{d:?} is not a valid device name (1-64 characters from [A-Za-z0-9._-])"
        )));
    }
    let id = random_id("c_");
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| IdentityError::Sign("no randomness".into()))?;
    let secret = URL_SAFE_NO_PAD.encode(raw);
    store
        .insert(&CredentialRecord {
            id: id.clone(),
            user: user.to_owned(),
            device: device.map(str::to_owned),
            secret_sha256: hex(&sha256(secret.as_bytes())),
            created: unix(SystemTime::now()),
            replaces: replaces.map(str::to_owned),
        })
        .await?;
    Ok(IssuedCredential {
        secret: format!("{CREDENTIAL_PREFIX}{id}_{secret}"),
        id,
        user: user.to_owned(),
        device: device.map(str::to_owned),
    })
}

/// `tcred_<id>_<secret>` -> (id, secret).
pub fn parse_credential(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(CREDENTIAL_PREFIX)?;
    // ids are `c_` and 16 hex digits
    let (id, secret) = (rest.get(..18)?, rest.get(19..)?);
    (id.starts_with("c_") && rest.as_bytes().get(18) == Some(&b'_') && !secret.is_empty())
        .then_some((id, secret))
}
