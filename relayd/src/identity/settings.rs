//! The resolved `[identity]` settings the relay verifies and mints with.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::keys::{Signer, VerifyKey};

/// The resolved `[identity]` settings.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityConfig {
    /// The claim holding the user id.
    pub user_claim: String,
    /// The claim an agent token names its device in.
    pub device_claim: String,
    /// The claim holding the role, and the values meaning agent and client.
    pub role_claim: String,
    pub agent_role: String,
    pub client_role: String,
    /// Checked when set (and written into tokens relayd mints).
    pub issuer: Option<String>,
    pub audience: Option<String>,
    #[serde(serialize_with = "daemon::config::duration::show")]
    pub leeway: Duration,
    /// Lifetime of access tokens relayd mints for agent credentials.
    #[serde(serialize_with = "daemon::config::duration::show")]
    pub access_token_ttl: Duration,
    /// Users whose tunnels need no client token.
    pub public_users: Vec<String>,
    pub signing_key_file: Option<PathBuf>,
    /// The key user ids are hashed with in logs, when configured (else the
    /// state directory's `log.key`).
    pub user_hash_key_file: Option<PathBuf>,
    #[serde(skip)]
    pub user_hash_key: Option<Vec<u8>>,
    /// The verification keys, described (the keys themselves are below).
    pub key_summary: Vec<String>,
    #[serde(skip)]
    pub signer: Option<Arc<Signer>>,
    #[serde(skip)]
    pub keys: Vec<VerifyKey>,
    #[serde(serialize_with = "show_opt_uri")]
    pub jwks_url: Option<http::Uri>,
    #[serde(serialize_with = "daemon::config::duration::show")]
    pub jwks_min_interval: Duration,
    /// How the JWKS URL is fetched over HTTPS (the system's roots).
    #[serde(skip)]
    pub jwks_tls: Option<Arc<rustls::ClientConfig>>,
}

fn show_opt_uri<S: serde::Serializer>(u: &Option<http::Uri>, s: S) -> Result<S::Ok, S::Error> {
    match u {
        Some(u) => s.collect_str(u),
        None => s.serialize_none(),
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            user_claim: "sub".into(),
            device_claim: "device".into(),
            role_claim: "role".into(),
            agent_role: "agent".into(),
            client_role: "client".into(),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            access_token_ttl: Duration::from_secs(3600),
            public_users: Vec::new(),
            signing_key_file: None,
            user_hash_key_file: None,
            user_hash_key: None,
            key_summary: Vec::new(),
            signer: None,
            keys: Vec::new(),
            jwks_url: None,
            jwks_min_interval: Duration::from_secs(60),
            jwks_tls: None,
        }
    }
}
