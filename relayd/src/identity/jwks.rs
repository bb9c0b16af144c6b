//! A JWKS URL (an identity provider's published keys): fetched at start and
//! again when a token names a `kid` the relay does not know, at most once
//! per `min_interval`, so a flood of made-up `kid`s cannot make the relay
//! hammer the provider.

use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::keys::{VerifyKey, jwks_keys};

/// Longest a fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read.
const MAX_DOCUMENT: usize = 1024 * 1024;

/// The keys of one JWKS URL.
pub struct JwksUrl {
    url: Uri,
    min_interval: Duration,
    keys: RwLock<Vec<VerifyKey>>,
    last_fetch: Mutex<Option<Instant>>,
    /// One fetch at a time; the others wait for it.
    fetching: tokio::sync::Mutex<()>,
    /// For an `https://` URL (plain `http://` is allowed on loopback only).
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl JwksUrl {
    pub fn new(
        url: Uri,
        min_interval: Duration,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Self {
        Self {
            url,
            min_interval,
            keys: RwLock::new(Vec::new()),
            last_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            tls,
        }
    }

    pub fn keys(&self) -> Vec<VerifyKey> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Fetches the document again unless that happened less than
    /// `min_interval` ago; true when the key set was replaced.
    pub async fn refresh(&self) -> bool {
        let _one = self.fetching.lock().await;
        {
            let mut last = self.last_fetch.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < self.min_interval) {
                return false;
            }
            *last = Some(Instant::now());
        }
        match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(Ok(body)) => match jwks_keys(&body, &self.url.to_string()) {
                Ok(keys) => {
                    debug!(url = %self.url, keys = keys.len(), "JWKS fetched");
                    *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
                    true
                }
                Err(e) => {
                    warn!(error = %e, "the JWKS is unusable ({e}); keeping the previous keys");
                    false
                }
            },
            Ok(Err(e)) => {
                warn!(url = %self.url, error = %e, "cannot fetch the JWKS from {}: {e}; keeping the previous keys", self.url);
                false
            }
            Err(_) => {
                warn!(url = %self.url, "fetching the JWKS from {} timed out; keeping the previous keys", self.url);
                false
            }
        }
    }

    async fn fetch(&self) -> Result<Bytes, String> {
        let host = self.url.host().ok_or("no host")?.trim_start_matches('[').trim_end_matches(']');
        let https = self.url.scheme_str() == Some("https");
        let port = daemon::url::port(&self.url);
        let tcp = TcpStream::connect((host, port)).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let path = self.url.path_and_query().map_or("/", |p| p.as_str());
        let req = Request::get(path)
            .header(http::header::HOST, self.url.authority().map_or(host, |a| a.as_str()))
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = if https {
            let tls = self.tls.clone().ok_or("no TLS settings for an https:// URL")?;
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            send(TokioIo::new(tls), req).await?
        } else {
            send(TokioIo::new(tcp), req).await?
        };
        if resp.status() != StatusCode::OK {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| format!("reading the document: {e}"))?;
        Ok(body.to_bytes())
    }
}

async fn send<T>(
    io: T,
    req: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}
