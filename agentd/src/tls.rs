//! TLS to the relay (`wss://`): which certificate authorities the agent
//! trusts.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

use crate::config::ConfigError;

/// Client side of the relay connection. With `ca_file`, only the CAs in that
/// PEM file are trusted (a private relay); without it, the system's roots.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, ConfigError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let invalid = |why: String| {
                ConfigError::Invalid(format!("[tls] ca_file {}: {why}", path.display()))
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| invalid(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(e.to_string()))?;
            if certs.is_empty() {
                return Err(invalid("no CERTIFICATE block in the file".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| invalid(e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            // Unreadable entries are skipped, as every TLS client does.
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "no trusted root certificates found on this system ({} errors); \
                     install ca-certificates or set [tls] ca_file",
                    found.errors.len()
                )));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid(format!("[tls]: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
