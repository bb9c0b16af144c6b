//! Throwaway TLS material for tests and benchmarks: a self-signed
//! certificate for 127.0.0.1 in PEM files, and an HTTPS client that trusts it.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A self-signed certificate for `127.0.0.1` and `localhost`, written as
/// `cert.pem` and `key.pem` into a directory removed on drop.
pub struct TestCert {
    pub dir: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCert {
    pub fn new() -> anyhow::Result<Self> {
        Self::for_names(&["127.0.0.1", "localhost"])
    }

    /// A self-signed certificate valid for `names` only.
    pub fn for_names(names: &[&str]) -> anyhow::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tunnel-cert-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let generated = rcgen::generate_simple_self_signed(names)?;
        let cert_file = dir.join("cert.pem");
        let key_file = dir.join("key.pem");
        std::fs::write(&cert_file, generated.cert.pem())?;
        std::fs::write(&key_file, generated.signing_key.serialize_pem())?;
        Ok(Self { dir, cert_file, key_file })
    }

    /// The relay's `[tls]` with this certificate.
    pub fn relay_tls(&self) -> relayd::config::Tls {
        relayd::tls::load(&self.cert_file, &self.key_file).expect("the test certificate loads")
    }

    /// A TLS client that trusts only this certificate.
    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        agentd::tls::client_config(Some(&self.cert_file), &[]).expect("the test CA loads")
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Opens a TLS connection to `addr` (on 127.0.0.1) with `client`.
pub async fn connect(
    client: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::IpAddress(addr.ip().into());
    TlsConnector::from(client.clone()).connect(name, tcp).await
}

/// Sends one HTTPS request on a new connection and returns the response
/// with its body still streaming.
pub async fn request(
    client: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    req: http::Request<Full<Bytes>>,
) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
    let tls = connect(client, addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}

/// Reads a whole response body.
pub async fn body_bytes(resp: http::Response<hyper::body::Incoming>) -> anyhow::Result<Bytes> {
    Ok(resp.into_body().collect().await?.to_bytes())
}

/// A CA and one certificate it signed for `127.0.0.1`, good for both ends
/// of mutual TLS (what replicas forward to each other with): `ca.pem`,
/// `peer.pem`, `peer.key` in a directory removed on drop.
pub struct TestCa {
    pub dir: PathBuf,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCa {
    pub fn new() -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tunnel-ca-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let mut leaf =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        leaf.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let leaf_key = KeyPair::generate()?;
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
        let (ca_file, cert_file, key_file) =
            (dir.join("ca.pem"), dir.join("peer.pem"), dir.join("peer.key"));
        std::fs::write(&ca_file, ca_cert.pem())?;
        std::fs::write(&cert_file, leaf_cert.pem())?;
        std::fs::write(&key_file, leaf_key.serialize_pem())?;
        Ok(Self { dir, ca_file, cert_file, key_file })
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
