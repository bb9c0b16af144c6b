//! TLS termination: web clients and agents reach the relay over HTTPS/WSS on
//! the same listener when `[tls]` is configured.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ConfigError;

/// Time a new connection has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the server side from a PEM certificate chain (leaf first) and a
/// PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, ConfigError> {
    let invalid =
        |what: &Path, why: String| ConfigError::Invalid(format!("[tls] {}: {why}", what.display()));
    let certs = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| invalid(cert_file, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(invalid(cert_file, "no CERTIFICATE block in the file".into()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| invalid(key_file, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid(format!("[tls]: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            ConfigError::Invalid(format!(
                "[tls] {} and {} do not make a usable certificate: {e}",
                cert_file.display(),
                key_file.display()
            ))
        })?;
    // The relay speaks HTTP/1.1 only (WebSocket upgrades need it).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
