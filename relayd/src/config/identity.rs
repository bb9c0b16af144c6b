//! `[identity]`: the keys tokens are verified with, the claims they are read
//! from, and the users whose tunnels are public.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use daemon::ConfigError;
use daemon::config::Human;
use serde::Deserialize;

use crate::identity::IdentityConfig;
use crate::identity::keys::{self, Signer};

/// `[identity]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// The claim holding the user id (default `sub`).
    pub user_claim: Option<String>,
    /// The claim an agent token names its device in (default `device`).
    pub device_claim: Option<String>,
    /// The claim holding the role (default `role`), and the values that
    /// mean agent and client (default `agent`, `client`).
    pub role_claim: Option<String>,
    pub agent_role: Option<String>,
    pub client_role: Option<String>,
    /// Checked when set.
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew allowed for `exp`, `nbf` and `iat` (default 30 s).
    pub leeway: Option<Human>,
    /// Lifetime of the access tokens relayd mints for agent credentials.
    pub access_token_ttl: Option<Human>,
    /// Users whose tunnels need no client token.
    #[serde(default)]
    pub public_users: Vec<String>,
    /// relayd's own Ed25519 key (PKCS#8 PEM, mode 0600): it signs access,
    /// client and share tokens and verifies them.
    pub signing_key_file: Option<PathBuf>,
    /// An HS256 shared secret (mode 0600, at least 32 bytes).
    pub hs256_secret_file: Option<PathBuf>,
    /// The key user ids are hashed with in logs (HMAC-SHA256; mode 0600, at
    /// least 32 bytes). Relays that share one hash a user alike, so their
    /// access lines join. Default: `log.key` in `state_dir`, made at first
    /// start.
    pub user_hash_key_file: Option<PathBuf>,
    /// Public keys of other issuers, each pinned to one algorithm.
    #[serde(default)]
    pub keys: Vec<KeyFile>,
    /// A JWKS document on disk, or an identity provider's JWKS URL.
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    /// Least time between two fetches of the JWKS URL (default 60 s).
    pub jwks_min_interval: Option<Human>,
}

/// `[[identity.keys]]`: one PEM public key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub file: PathBuf,
    /// `RS256`, `RS384`, `RS512`, `PS256`, `PS384`, `PS512`, `ES256`,
    /// `ES384` or `EdDSA`.
    pub algorithm: String,
    /// The `kid` tokens name it by; without one it is tried for every
    /// token of its algorithm that names no `kid`.
    pub kid: Option<String>,
}

pub use daemon::config::private_file;

impl IdentityFile {
    /// Loads every key; `public` are the users `[[users]]` marks public.
    pub fn resolve(self, public: Vec<String>) -> Result<IdentityConfig, ConfigError> {
        let d = IdentityConfig::default();
        let invalid = |what: String| ConfigError::Invalid(format!("[identity] {what}"));
        let key_error = |e: keys::KeyError| invalid(e.to_string());
        let mut summary = Vec::new();
        let signer = match &self.signing_key_file {
            Some(path) => {
                private_file(path)?;
                let pem = std::fs::read(path)
                    .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                let signer = Signer::from_pem(&pem, path).map_err(key_error)?;
                summary.push(format!(
                    "EdDSA {} (own signing key {})",
                    signer.kid(),
                    path.display()
                ));
                Some(Arc::new(signer))
            }
            None => None,
        };
        let user_hash_key = match &self.user_hash_key_file {
            Some(path) => {
                private_file(path)?;
                let key = std::fs::read(path)
                    .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                if key.len() < 32 {
                    return Err(invalid(format!(
                        "user_hash_key_file {}: at least 32 bytes (head -c 32 /dev/urandom > FILE)",
                        path.display()
                    )));
                }
                Some(key)
            }
            None => None,
        };
        let mut verify = Vec::new();
        if let Some(path) = &self.hs256_secret_file {
            private_file(path)?;
            verify.push(keys::hs256_key(path, None).map_err(key_error)?);
            summary.push(format!("HS256 secret {}", path.display()));
        }
        for k in &self.keys {
            let alg = keys::public_algorithm(&k.algorithm).ok_or_else(|| {
                invalid(format!(
                    "keys: {:?} is not a public-key algorithm (RS256, PS256, ES256, EdDSA, ...)",
                    k.algorithm
                ))
            })?;
            verify.push(keys::pem_key(&k.file, alg, k.kid.clone()).map_err(key_error)?);
            summary.push(format!(
                "{alg:?} {} ({})",
                k.kid.as_deref().unwrap_or("no kid"),
                k.file.display()
            ));
        }
        if let Some(path) = &self.jwks_file {
            let text = std::fs::read(path)
                .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            let found = keys::jwks_keys(&text, &path.display().to_string()).map_err(key_error)?;
            summary.push(format!("{} keys from JWKS {}", found.len(), path.display()));
            verify.extend(found);
        }
        let jwks_url = match &self.jwks_url {
            Some(text) => {
                let url =
                    daemon::url::parse(text, "jwks_url").map_err(|e| invalid(e.to_string()))?;
                let loopback = daemon::url::is_loopback(&url);
                match url.scheme_str() {
                    Some("https") => {}
                    Some("http") if loopback => {}
                    _ => {
                        return Err(invalid(format!(
                            "jwks_url {text:?}: use https:// (http:// only on loopback)"
                        )));
                    }
                }
                summary.push(format!("JWKS {url}"));
                Some(url)
            }
            None => None,
        };
        let jwks_tls = match &jwks_url {
            Some(u) if u.scheme_str() == Some("https") => Some(system_roots().map_err(invalid)?),
            _ => None,
        };
        let leeway = self.leeway.map_or(d.leeway, Human::get);
        if leeway > Duration::from_secs(300) {
            return Err(invalid("leeway must be at most 5m".into()));
        }
        let mut public_users = self.public_users;
        for u in public.into_iter().chain(public_users.clone()) {
            if !crate::config::valid_user_id(&u) {
                return Err(invalid(format!("public_users: {u:?} is not a valid user id")));
            }
            if !public_users.contains(&u) {
                public_users.push(u);
            }
        }
        Ok(IdentityConfig {
            user_claim: self.user_claim.unwrap_or(d.user_claim),
            device_claim: self.device_claim.unwrap_or(d.device_claim),
            role_claim: self.role_claim.unwrap_or(d.role_claim),
            agent_role: self.agent_role.unwrap_or(d.agent_role),
            client_role: self.client_role.unwrap_or(d.client_role),
            issuer: self.issuer,
            audience: self.audience,
            leeway,
            access_token_ttl: daemon::config::positive(
                self.access_token_ttl.map(Human::get),
                d.access_token_ttl,
                "[identity] access_token_ttl",
            )?,
            public_users,
            signing_key_file: self.signing_key_file,
            user_hash_key_file: self.user_hash_key_file,
            user_hash_key,
            key_summary: summary,
            signer,
            keys: verify,
            jwks_url,
            jwks_min_interval: match self.jwks_min_interval.map(Human::get) {
                Some(t) if t < Duration::from_secs(1) => {
                    return Err(invalid("jwks_min_interval must be at least 1s".into()));
                }
                Some(t) => t,
                None => d.jwks_min_interval,
            },
            jwks_tls,
        })
    }
}

/// A TLS client trusting the system's roots, for fetching a JWKS.
fn system_roots() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if roots.is_empty() {
        return Err(
            "no trusted root certificates on this system for jwks_url; install ca-certificates"
                .into(),
        );
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}
