//! TLS termination: web clients and agents reach the relay over HTTPS/WSS on
//! the same listener when `[tls]` is configured.
//!
//! The certificate is served through a resolver whose key can be replaced
//! while the relay runs ([`Tls::reload`], on SIGHUP): new handshakes get the
//! new certificate, established connections (and the tunnels on them) keep
//! theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;

/// Time a new connection has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Certificate and key files that cannot serve TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {why}", path.display())]
    File { path: PathBuf, why: String },
    #[error("{} and {} do not make a usable certificate: {source}", cert.display(), key.display())]
    Unusable { cert: PathBuf, key: PathBuf, source: rustls::Error },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// TLS termination, loaded and checked: the files, the server settings, and
/// the certificate they serve (replaceable).
#[derive(Clone, Serialize)]
pub struct Tls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(skip)]
    pub server: Arc<ServerConfig>,
    #[serde(skip)]
    current: Arc<Current>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// The certificate new handshakes get.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain (leaf first) and a PEM private key
/// (PKCS#8, PKCS#1 or SEC1) that belong together.
fn certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let invalid = |path: &Path, why: String| TlsError::File { path: path.to_owned(), why };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| {
            invalid(path, format!("cannot read it: {e}{}", daemon::config::access_hint(path, &e)))
        })
    };
    let (cert_pem, key_pem) = (read(cert_file)?, read(key_file)?);
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(invalid(cert_file, "no CERTIFICATE block in the file".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| invalid(key_file, e.to_string()))?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|source| TlsError::Unusable {
        cert: cert_file.to_owned(),
        key: key_file.to_owned(),
        source,
    })
}

/// Loads `cert_file` and `key_file` into the relay's TLS settings.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<Tls, TlsError> {
    let current = Arc::new(Current(RwLock::new(Arc::new(certified_key(cert_file, key_file)?))));
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(current.clone());
    // The relay speaks HTTP/1.1 only (WebSocket upgrades need it).
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls {
        cert_file: cert_file.to_owned(),
        key_file: key_file.to_owned(),
        server: Arc::new(server),
        current,
    })
}

impl Tls {
    /// The pin (`sha256/` + base64 of the SubjectPublicKeyInfo's SHA-256)
    /// of the certificate new handshakes get: what agents put in
    /// `[tls] pins`.
    pub fn pin(&self) -> Option<String> {
        use base64::Engine as _;
        let current = self.current.0.read().unwrap_or_else(PoisonError::into_inner).clone();
        let leaf = current.cert.first()?;
        let parsed = webpki::EndEntityCert::try_from(leaf).ok()?;
        let spki = parsed.subject_public_key_info();
        let digest = ring::digest::digest(&ring::digest::SHA256, spki.as_ref());
        Some(format!("sha256/{}", base64::engine::general_purpose::STANDARD.encode(digest)))
    }

    /// Reads the files again; on success new handshakes get the new
    /// certificate. On failure the old one stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = certified_key(&self.cert_file, &self.key_file)?;
        *self.current.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        Ok(())
    }
}

/// Mutual TLS between replicas: each one's certificate (signed by the
/// cluster's CA, `ca_file`) serves its peer listener and identifies it when
/// it forwards; only certificates that CA signed are let in. HTTP/2 only.
pub fn mutual(
    cert_file: &Path,
    key_file: &Path,
    ca_file: &Path,
) -> Result<(Arc<ServerConfig>, Arc<rustls::ClientConfig>), TlsError> {
    let invalid = |path: &Path, why: String| TlsError::File { path: path.to_owned(), why };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| {
            invalid(path, format!("cannot read it: {e}{}", daemon::config::access_hint(path, &e)))
        })
    };
    certified_key(cert_file, key_file)?;
    let chain = CertificateDer::pem_slice_iter(&read(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(cert_file, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(key_file)?)
        .map_err(|e| invalid(key_file, e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(ca_file)?) {
        let ca = ca.map_err(|e| invalid(ca_file, e.to_string()))?;
        roots.add(ca).map_err(|e| invalid(ca_file, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid(ca_file, "no CERTIFICATE block in the file".into()));
    }
    let roots = Arc::new(roots);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| invalid(ca_file, e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(server), Arc::new(client)))
}
