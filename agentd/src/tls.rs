//! TLS to the relay (`wss://`): which certificate authorities the agent
//! trusts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

/// TLS settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("ca_file {}: {why}", path.display())]
    CaFile { path: PathBuf, why: String },
    #[error(
        "no trusted root certificates found on this system ({0} errors); install ca-certificates or set [tls] ca_file"
    )]
    NoSystemRoots(usize),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// Client side of the relay connection. With `ca_file`, only the CAs in that
/// PEM file are trusted (a private relay); without it, the system's roots.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let invalid = |why: String| TlsError::CaFile { path: path.to_owned(), why };
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
                return Err(TlsError::NoSystemRoots(found.errors.len()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
