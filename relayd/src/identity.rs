//! Who a request or an agent is: tokens in, a [`Principal`] out.
//!
//! Users come from tokens, not from a list: a JWT names its user in a
//! configurable claim (`sub` by default) and its role in another (`agent`
//! may open `/ws/tunnel`, `client` may call `/api/tunnel/{user}/*`), so a
//! relay in front of an identity provider serves users it was never told
//! about. Agents may also present a long-lived credential the relay issued
//! (`tcred_...`, recorded by id and the hash of its secret in the
//! [`store`]); static tokens from `[[users]]` remain for small relays.
//!
//! Verified tokens are cached until they expire (checked against the
//! revocations on every use). Revoking a credential or a token's `jti` is
//! immediate here; the relay also ends the sessions it holds open.

pub mod claims;
mod issue;
mod jwks;
pub mod keys;
pub mod pg;
mod settings;
pub mod store;
mod verify;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use issue::sha256;
use store::{CredentialRecord, CredentialStore, MemoryStore, Revocation, StoreError};

pub use issue::{IssuedCredential, MintOptions, Minted, issue_into, mint_with, parse_credential};
pub use jwks::JwksUrl;
pub use settings::IdentityConfig;

/// Longest token accepted (a bigger one is refused unread).
pub const MAX_TOKEN_LEN: usize = tunnel_proto::message::MAX_TOKEN_LEN;
/// Verified tokens remembered at once.
const CACHE_ENTRIES: usize = 16 * 1024;
/// What every agent credential starts with.
pub const CREDENTIAL_PREFIX: &str = "tcred_";

/// The device an agent without a device name serves as: what every
/// credential issued without `--device`, a static token and a JWT without
/// the device claim name.
pub const DEFAULT_DEVICE: &str = "default";

/// Whether `id` may name a user or a device (user ids appear in URLs):
/// 1-64 characters from `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn valid_user_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id != "."
        && id != ".."
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Open `/ws/tunnel` for its user.
    Agent,
    /// Call `/api/tunnel/{user}/*` for its user.
    Client,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::Client => "client",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "agent" => Ok(Role::Agent),
            "client" => Ok(Role::Client),
            _ => Err(format!("{s:?}: the role is agent or client")),
        }
    }
}

/// What a share token may reach: path prefixes at the local service and
/// models (empty: any). A member it does not know is refused: it could be
/// a limit the relay would not enforce.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

impl Scope {
    /// Whether `path` (without its query) is one of the paths, or below one
    /// that ends with `/`.
    pub fn allows_path(&self, path: &str) -> bool {
        self.paths.is_empty()
            || self
                .paths
                .iter()
                .any(|p| path == p || (p.ends_with('/') && path.starts_with(p.as_str())))
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    pub fn limits_models(&self) -> bool {
        !self.models.is_empty()
    }
}

/// How a principal proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A static token from `[[users]]`.
    Static,
    /// A JWT.
    Token,
    /// An agent credential the relay issued.
    Credential,
}

/// Who a token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    /// The agent's device under its user, from its credential or its
    /// token's device claim; `None`: the user's default device.
    pub device: Option<String>,
    pub role: Role,
    /// A share token's limits.
    pub scope: Option<Scope>,
    /// The credential id or the token's `jti`: what revocation names.
    pub id: Option<String>,
    /// For an access token the relay minted, the credential it was minted
    /// for: revoking that credential revokes the token too.
    pub parent: Option<String>,
    /// When it stops being valid (`None`: static tokens and credentials).
    pub expires: Option<SystemTime>,
    pub via: Via,
}

impl Principal {
    /// The device this principal's agent serves as.
    pub fn device(&self) -> &str {
        self.device.as_deref().unwrap_or(DEFAULT_DEVICE)
    }
}

/// Why a token was refused: each says which, so a client can tell a
/// missing token from a wrong or an expired one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send Authorization: Bearer <token>")]
    Missing,
    #[error("the token is larger than 8 KiB")]
    TooLarge,
    #[error(
        "the token is not valid here: not a JWT this relay can verify, an agent credential it issued or a token it was given"
    )]
    Unknown,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token names a key this relay does not know")]
    UnknownKey,
    #[error("the token's algorithm is not the one its key is pinned to")]
    Algorithm,
    #[error("the token expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued by someone this relay does not trust")]
    Issuer,
    #[error("the token was issued for another audience")]
    Audience,
    #[error("the token was revoked")]
    Revoked,
    #[error("the token is not usable: {0}")]
    Claims(String),
    /// The relay cannot tell now whether the token is good (its shared
    /// store is out of reach): try again later.
    #[error("the relay cannot check tokens now: {0}")]
    Unavailable(String),
}

/// Something identity could not do (minting, issuing, revoking).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("this relay has no signing key: set [identity] signing_key_file")]
    NoSigningKey,
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot sign: {0}")]
    Sign(String),
    #[error("{0}")]
    Invalid(String),
}

/// A static token from `[[users]]`.
#[derive(Debug, Clone)]
pub struct StaticToken {
    pub token: String,
    pub user: String,
    pub role: Role,
}

/// The relay's identity: verification, minting, credentials, revocation.
pub struct Identity {
    config: IdentityConfig,
    statics: Vec<StaticToken>,
    jwks: Option<JwksUrl>,
    store: Arc<dyn CredentialStore>,
    revoked: RwLock<HashMap<String, Option<u64>>>,
    cache: Mutex<HashMap<[u8; 32], Principal>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Compares without telling by its timing where the first difference is.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Identity {
    /// An identity over `store`, whose revocations are read now.
    pub async fn open(
        config: IdentityConfig,
        statics: Vec<StaticToken>,
        store: Arc<dyn CredentialStore>,
    ) -> Result<Self, StoreError> {
        let identity = Self::build(config, statics, store);
        identity.reload_revocations().await?;
        Ok(identity)
    }

    /// An identity over a new store in memory (nothing revoked yet).
    pub fn in_memory(config: IdentityConfig, statics: Vec<StaticToken>) -> Self {
        Self::build(config, statics, Arc::new(MemoryStore::default()))
    }

    fn build(
        config: IdentityConfig,
        statics: Vec<StaticToken>,
        store: Arc<dyn CredentialStore>,
    ) -> Self {
        let jwks = config
            .jwks_url
            .as_ref()
            .map(|u| JwksUrl::new(u.clone(), config.jwks_min_interval, config.jwks_tls.clone()));
        Self {
            config,
            statics,
            jwks,
            store,
            revoked: RwLock::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &IdentityConfig {
        &self.config
    }

    /// Whether `user`'s tunnel needs no client token.
    pub fn is_public(&self, user: &str) -> bool {
        self.config.public_users.iter().any(|u| u == user)
    }

    /// Fetches the JWKS URL's keys (at start; later fetches happen on
    /// unknown `kid`s).
    pub async fn load_jwks(&self) {
        if let Some(j) = &self.jwks {
            j.refresh().await;
        }
    }

    /// Who `token` speaks for.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::TooLarge);
        }
        let key = sha256(token.as_bytes());
        let cached = self.cache.lock().unwrap_or_else(PoisonError::into_inner).get(&key).cloned();
        let principal = match cached {
            Some(p) => p,
            None => {
                let p = if token.starts_with(CREDENTIAL_PREFIX) {
                    // Not asked of a store this relay cannot trust now.
                    self.store.fresh().map_err(|e| AuthError::Unavailable(e.0))?;
                    self.credential(token).await?
                } else if token.bytes().filter(|b| *b == b'.').count() == 2 {
                    self.jwt(token).await?
                } else {
                    self.static_token(token)?
                };
                self.remember(key, &p);
                p
            }
        };
        // A token whose revocation this relay could have missed waits until
        // its view of the store is recent again.
        if principal.via != Via::Static {
            self.store.fresh().map_err(|e| AuthError::Unavailable(e.0))?;
        }
        if principal.expires.is_some_and(|e| self.valid_until(e) <= SystemTime::now()) {
            self.cache.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
            return Err(AuthError::Expired);
        }
        if self.covers_revoked(&principal) {
            return Err(AuthError::Revoked);
        }
        Ok(principal)
    }

    fn remember(&self, key: [u8; 32], p: &Principal) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_ENTRIES {
            let now = SystemTime::now();
            cache.retain(|_, p| p.expires.is_none_or(|e| e > now));
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, p.clone());
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked.read().unwrap_or_else(PoisonError::into_inner).contains_key(id)
    }

    /// Whether `p`'s token, or the credential it was minted for, is
    /// revoked.
    pub fn covers_revoked(&self, p: &Principal) -> bool {
        [&p.id, &p.parent].into_iter().flatten().any(|id| self.is_revoked(id))
    }

    /// The last instant a token that expires at `expires` is accepted: its
    /// `exp` plus the configured leeway. One rule for a new request, a new
    /// session and the end of a session opened with it.
    pub fn valid_until(&self, expires: SystemTime) -> SystemTime {
        claims::later(expires, self.config.leeway)
    }

    /// Mints a JWT for `user` with `role`, valid for `ttl`; `scope` makes it
    /// a share token.
    pub fn mint(
        &self,
        user: &str,
        role: Role,
        ttl: Duration,
        scope: Option<Scope>,
    ) -> Result<Minted, IdentityError> {
        let signer = self.config.signer.as_ref().ok_or(IdentityError::NoSigningKey)?;
        mint_with(
            signer,
            &self.config,
            user,
            role,
            ttl,
            MintOptions { scope, ..MintOptions::default() },
        )
    }

    /// An access token for an agent session opened with credential
    /// `credential` (`None` when relayd has no signing key): revoking the
    /// credential revokes it.
    pub fn mint_access(
        &self,
        user: &str,
        device: Option<&str>,
        credential: &str,
    ) -> Result<Option<Minted>, IdentityError> {
        let Some(signer) = &self.config.signer else { return Ok(None) };
        let options = MintOptions {
            scope: None,
            credential: Some(credential.to_owned()),
            device: device.map(str::to_owned),
        };
        mint_with(signer, &self.config, user, Role::Agent, self.config.access_token_ttl, options)
            .map(Some)
    }

    /// Issues a long-lived agent credential for `user`'s `device` (`None`:
    /// the default device), recorded by id and the hash of its secret.
    pub async fn issue_credential(
        &self,
        user: &str,
        device: Option<&str>,
        replaces: Option<&str>,
    ) -> Result<IssuedCredential, IdentityError> {
        issue_into(&*self.store, user, device, replaces).await
    }

    /// Revokes a credential id or a token's `jti` in the store, which tells
    /// every relay sharing it ([`Identity::subscribe`]); this relay knows at
    /// once. True when it was not revoked yet.
    pub async fn revoke(&self, id: &str, until: Option<SystemTime>) -> Result<bool, IdentityError> {
        let revocation = Revocation { id: id.to_owned(), until: until.map(unix) };
        let fresh = self.store.revoke(&revocation).await?;
        self.note_revoked(revocation);
        Ok(fresh)
    }

    /// Whether this relay's view of the store is recent enough to admit
    /// tokens on ([`CredentialStore::fresh`]).
    pub fn fresh(&self) -> Result<(), StoreError> {
        self.store.fresh()
    }

    /// Takes a revocation told by the store into account.
    pub fn note_revoked(&self, r: Revocation) {
        self.revoked.write().unwrap_or_else(PoisonError::into_inner).insert(r.id, r.until);
    }

    /// Revocations recorded from now on, by this relay or any other that
    /// shares the store.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<store::StoreEvent> {
        self.store.subscribe()
    }

    /// Reads every revocation from the store again (at start, and when this
    /// relay fell behind the store's events); returns them.
    pub async fn reload_revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let now = unix(SystemTime::now());
        let live: Vec<Revocation> = self
            .store
            .revocations()
            .await?
            .into_iter()
            .filter(|r| r.until.is_none_or(|u| u > now))
            .collect();
        let map = live.iter().map(|r| (r.id.clone(), r.until)).collect();
        *self.revoked.write().unwrap_or_else(PoisonError::into_inner) = map;
        Ok(live)
    }

    /// The credentials issued so far, with whether each is revoked.
    pub async fn credentials(&self) -> Result<Vec<(CredentialRecord, bool)>, IdentityError> {
        let list = self.store.list().await?;
        Ok(list.into_iter().map(|c| (self.is_revoked(&c.id), c)).map(|(r, c)| (c, r)).collect())
    }
}

/// The store relayd and its admin commands use, the one place that
/// decides: the replicas' database with `[cluster]`, else the embedded
/// store in the state directory `dir`, else none (credentials in memory).
pub async fn open_store(
    cluster: Option<&crate::cluster::ClusterConfig>,
    dir: Option<&std::path::Path>,
) -> Result<Option<Arc<dyn CredentialStore>>, StoreError> {
    Ok(match (cluster, dir) {
        (Some(c), _) => Some(Arc::new(pg::PgStore::open(c.clone()).await?)),
        (None, Some(dir)) => Some(Arc::new(store::RedbStore::open(&dir.join("credentials.redb"))?)),
        (None, None) => None,
    })
}

#[cfg(test)]
mod tests;
