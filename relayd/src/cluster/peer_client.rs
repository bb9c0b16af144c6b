//! The sending side of forwarding between replicas: one HTTP/2 connection
//! per replica over mutual TLS, made when first needed and again once it
//! failed; every forwarded request is a stream on it, so its flow control
//! and its cancellation (a reset when the client leaves) cross the hop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;

/// Longest a connection to another replica may take to open: a replica
/// that does not answer fails the request fast (503), it does not hang it.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot reach replica at {0}: {1}")]
    Connect(String, String),
    #[error("replica at {0} failed the request: {1}")]
    Send(String, String),
}

/// Connections to the other replicas, by their peer address.
pub struct PeerClient {
    tls: tokio_rustls::TlsConnector,
    conns: tokio::sync::Mutex<HashMap<String, SendRequest<Incoming>>>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient").finish_non_exhaustive()
    }
}

impl PeerClient {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        Self { tls: tls.into(), conns: tokio::sync::Mutex::default() }
    }

    /// Sends `req` to the replica at `addr`; its answer streams back. The
    /// head must come within `head_within` (the other replica answers
    /// within its own first-byte timeout, 504 included; a replica that
    /// stopped answering does not hold the request forever).
    pub async fn send(
        &self,
        addr: &str,
        req: Request<Incoming>,
        head_within: Duration,
    ) -> Result<Response<Incoming>, PeerError> {
        let mut sender = self.sender(addr).await?;
        match tokio::time::timeout(head_within, sender.send_request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                // Forget the connection only if it is the one that failed
                // and it is gone (one request's upload error leaves it up).
                let mut conns = self.conns.lock().await;
                if conns.get(addr).is_some_and(SendRequest::is_closed) {
                    conns.remove(addr);
                }
                Err(PeerError::Send(addr.to_owned(), e.to_string()))
            }
            Err(_) => {
                Err(PeerError::Send(addr.to_owned(), format!("no answer within {head_within:?}")))
            }
        }
    }

    async fn sender(&self, addr: &str) -> Result<SendRequest<Incoming>, PeerError> {
        if let Some(s) = self.conns.lock().await.get(addr).filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        // Dialled without the lock: a replica that does not answer delays
        // only the requests for its own users.
        let fail = |why: String| PeerError::Connect(addr.to_owned(), why);
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|e| fail(format!("not a host name: {e}")))?;
        let dial = async {
            let tcp =
                tokio::net::TcpStream::connect(addr).await.map_err(|e| fail(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let tls = self.tls.connect(name, tcp).await.map_err(|e| fail(e.to_string()))?;
            let mut http = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
            http.timer(TokioTimer::new())
                .adaptive_window(true)
                .keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            http.handshake(TokioIo::new(tls)).await.map_err(|e| fail(e.to_string()))
        };
        let (sender, connection) = tokio::time::timeout(DIAL_TIMEOUT, dial)
            .await
            .map_err(|_| fail(format!("no connection within {DIAL_TIMEOUT:?}")))??;
        tokio::spawn(async move {
            // It ends when the replica goes or every sender is dropped.
            let _ = connection.await;
        });
        let mut conns = self.conns.lock().await;
        // Another request may have dialled meanwhile: keep one.
        if let Some(s) = conns.get(addr).filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        conns.insert(addr.to_owned(), sender.clone());
        Ok(sender)
    }
}
