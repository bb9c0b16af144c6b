//! TLS to the relay (`wss://`): which certificate authorities the agent
//! trusts, and the optional pins of the relay's public key.
//!
//! A pin is the SHA-256 of a certificate's SubjectPublicKeyInfo, written
//! `sha256/` + base64 (as HPKP and curl's `--pinnedpubkey` write it). Pins
//! are checked on top of the ordinary validation, never instead of it: the
//! chain must be trusted and the name must match, and then the relay's
//! certificate (or one of the intermediates it sends) must carry a pinned
//! key. Several pins let the relay roll its key over.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore};

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
    #[error("{0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// The SHA-256 of a SubjectPublicKeyInfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin([u8; 32]);

/// A pin that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pin {0:?}: write sha256/ followed by the base64 SHA-256 of the relay's public key")]
pub struct BadPin(String);

impl Pin {
    pub fn parse(text: &str) -> Result<Pin, BadPin> {
        let bad = || BadPin(text.to_owned());
        let b64 = text.strip_prefix("sha256/").ok_or_else(bad)?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| bad())?;
        Ok(Pin(bytes.try_into().map_err(|_| bad())?))
    }

    /// The pin of the key `cert` certifies.
    pub fn of(cert: &CertificateDer<'_>) -> Result<Pin, webpki::Error> {
        let parsed = webpki::EndEntityCert::try_from(cert)?;
        let spki = parsed.subject_public_key_info();
        let digest = ring::digest::digest(&ring::digest::SHA256, spki.as_ref());
        let mut pin = [0; 32];
        pin.copy_from_slice(digest.as_ref());
        Ok(Pin(pin))
    }
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256/{}", base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

/// The relay's certificate carries none of the pinned keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the relay's public key {seen} matches none of the configured pins")]
pub struct PinMismatch {
    /// The pin of the relay's own certificate.
    pub seen: String,
}

impl PinMismatch {
    /// Finds a pin mismatch in the error a TLS connect returned.
    pub fn find(e: &std::io::Error) -> Option<PinMismatch> {
        let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) =
            e.get_ref()?.downcast_ref::<rustls::Error>()?
        else {
            return None;
        };
        inner.downcast_ref::<PinMismatch>().cloned()
    }
}

/// A TLS failure with the relay in words that say what to do: an
/// untrusted issuer names `[tls] ca_file` and `agentd pin`, a name mismatch
/// the name to use.
pub fn explain(e: &std::io::Error, host: &str) -> String {
    let rustls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match rustls {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => format!(
            "{e}: the relay's certificate is not signed by a CA this machine trusts; set [tls] ca_file in agentd.toml to the CA that signed it (or add that CA to the system's store), and see what the relay presents with `agentd --config FILE pin wss://{host}`"
        ),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => format!(
            "{e}: the relay's certificate is for another name than {host:?}; enroll with the name the certificate carries"
        ),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => format!("{e}: the relay's certificate expired; its operator must renew it"),
        _ => e.to_string(),
    }
}

/// The usual validation, then the pins.
#[derive(Debug)]
struct Pinned {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<Pin>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let bad = |_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
        let seen = Pin::of(end_entity).map_err(bad)?;
        let chain_pinned = intermediates
            .iter()
            .filter_map(|c| Pin::of(c).ok())
            .chain(std::iter::once(seen))
            .any(|p| self.pins.contains(&p));
        if chain_pinned {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                PinMismatch { seen: seen.to_string() },
            )))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The trusted roots: the CAs in `ca_file` (a private relay), or the
/// system's.
fn roots(ca_file: Option<&Path>) -> Result<Arc<RootCertStore>, TlsError> {
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
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(verifier: Arc<dyn ServerCertVerifier>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Client side of the relay connection. With `ca_file`, only the CAs in that
/// PEM file are trusted (a private relay); without it, the system's roots.
/// With `pins`, the relay's key must also be one of them.
pub fn client_config(ca_file: Option<&Path>, pins: &[Pin]) -> Result<Arc<ClientConfig>, TlsError> {
    let webpki =
        WebPkiServerVerifier::builder_with_provider(roots(ca_file)?, provider()).build()?;
    if pins.is_empty() {
        return build(webpki);
    }
    build(Arc::new(Pinned { inner: webpki, pins: pins.to_vec() }))
}

/// The pin of the first certificate in a PEM file (a relay's own
/// certificate, on the relay's machine).
pub fn pin_of_file(path: &Path) -> Result<Pin, anyhow::Error> {
    use anyhow::Context as _;
    let cert = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .next()
        .with_context(|| format!("{}: no CERTIFICATE block", path.display()))?
        .with_context(|| format!("{}: unreadable certificate", path.display()))?;
    Pin::of(&cert).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// What a relay presented: the pins of its chain (its own certificate
/// first) and whether the chain is trusted for its name.
#[derive(Debug, Clone)]
pub struct Presented {
    pub pins: Vec<Pin>,
    pub trusted: Result<(), String>,
}

/// Records what the relay presents, and judges it as the agent would.
#[derive(Debug)]
struct Recorder {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Option<Presented>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict =
            self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let pins = std::iter::once(end_entity)
            .chain(intermediates)
            .filter_map(|c| Pin::of(c).ok())
            .collect();
        let trusted = verdict.as_ref().map(|_| ()).map_err(ToString::to_string);
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Presented { pins, trusted });
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Connects to `host:port` and reports what its TLS server presents
/// (`agentd pin`).
pub async fn probe(
    host: &str,
    port: u16,
    ca_file: Option<&Path>,
) -> Result<Presented, anyhow::Error> {
    use anyhow::Context as _;
    let webpki =
        WebPkiServerVerifier::builder_with_provider(roots(ca_file)?, provider()).build()?;
    let recorder = Arc::new(Recorder { inner: webpki, seen: Mutex::new(None) });
    let config = build(recorder.clone())?;
    let name = ServerName::try_from(host.to_owned())
        .with_context(|| format!("{host:?} is not a valid server name"))?;
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .with_context(|| format!("timed out connecting to {host}:{port}"))?
    .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let handshake = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await;
    let seen = recorder.seen.lock().unwrap_or_else(PoisonError::into_inner).take();
    match (seen, handshake) {
        (Some(p), _) => Ok(p),
        (None, Ok(Err(e))) => Err(anyhow::anyhow!("TLS with {host}:{port} failed: {e}")),
        (None, _) => Err(anyhow::anyhow!("{host}:{port} presented no certificate")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_round_trip_and_bad_ones_are_refused() {
        let text = "sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        assert_eq!(Pin::parse(text).unwrap().to_string(), text);
        for bad in ["47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", "sha256/abc", "sha1/AAAA", ""] {
            assert!(Pin::parse(bad).is_err(), "{bad:?}");
        }
    }
}
