//! relayd: the cloud side of the tunnel.
//!
//! Web clients call `ALL /api/tunnel/{user}/{*path}`; each user's agent holds
//! one WebSocket on `GET /ws/tunnel`. The relay routes a request to the
//! user's agent session ([`hub`]), correlates the answer by stream id
//! ([`session`]) and streams it back chunk by chunk ([`forward`], [`body`]).
//!
//! [`Relay::new`] does not listen; [`Relay::serve`] takes any bound listener
//! and a shutdown token, so tests run the relay in-process.

pub mod admission;
pub mod auth;
pub mod body;
pub mod config;
pub mod forward;
pub mod hub;
pub mod metrics;
pub mod response;
pub mod server;
pub mod session;
pub mod stall;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use tunnel_proto::flow::BufferGauge;

pub use config::{Config, ConfigFile};
pub use hub::Hub;

/// Once the drain deadline passed and sessions are closed, how long their
/// tasks get to wind down.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);
/// The reconnect delay a draining relay suggests to its agents.
const GOAWAY_RETRY: Duration = Duration::from_secs(1);

/// State shared by every connection of one relay.
pub struct Shared {
    pub config: Config,
    pub hub: Hub,
    /// Response bytes buffered for web clients, across all streams.
    pub gauge: Arc<BufferGauge>,
    /// HTTP connections (web clients; agents until their upgrade).
    conns: TaskTracker,
    /// Agent sessions.
    sessions: TaskTracker,
    /// Set once shutdown began: new requests get 503.
    draining: AtomicBool,
    /// Agent handshakes: the agents' allowance (reconnect storms) and each
    /// source's budget of refused attempts.
    pub admission: admission::Admission,
    /// TLS handshakes that failed or timed out (logged at debug only: on a
    /// public port most are scanners).
    pub tls_handshake_failures: AtomicU64,
}

impl Shared {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// A relay, ready to serve on any listener.
#[derive(Clone)]
pub struct Relay {
    shared: Arc<Shared>,
}

impl Relay {
    pub fn new(config: Config) -> Self {
        let admission = admission::Admission::new(
            config.handshakes_per_second,
            config.refused_handshakes_per_minute,
            config.refused_handshakes_per_minute,
        );
        Self {
            shared: Arc::new(Shared {
                config,
                hub: Hub::default(),
                gauge: Arc::new(BufferGauge::default()),
                conns: TaskTracker::new(),
                sessions: TaskTracker::new(),
                draining: AtomicBool::new(false),
                admission,
                tls_handshake_failures: AtomicU64::new(0),
            }),
        }
    }

    pub fn hub(&self) -> &Hub {
        &self.shared.hub
    }

    /// Bytes of response bodies buffered in the relay right now and at peak.
    pub fn buffered(&self) -> &BufferGauge {
        &self.shared.gauge
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The Prometheus text `GET /metrics` answers.
    pub fn metrics(&self) -> String {
        metrics::render(&self.shared)
    }

    /// Serves `GET /metrics` on `listener` until `shutdown`.
    pub async fn serve_metrics(&self, listener: TcpListener, shutdown: CancellationToken) {
        metrics::serve(self.shared.clone(), listener, shutdown).await
    }

    /// Serves HTTP on `listener` until `shutdown` is cancelled, then drains:
    /// stops accepting, answers new requests 503, sends `goaway` to agents,
    /// lets in-flight streams finish until `drain_timeout`, then ends the
    /// rest and closes the sessions.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let shared = &self.shared;
        let tls = shared.config.tls.as_ref().map(|t| TlsAcceptor::from(t.server.clone()));
        info!(addr = %listener.local_addr()?, tls = tls.is_some(), "relay listening");
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors or similar: keep serving the
                        // connections we have and retry shortly.
                        error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let conn_shared = shared.clone();
            let conn_shutdown = shutdown.clone();
            let tls = tls.clone();
            shared.conns.spawn(async move {
                let Some(acceptor) = tls else {
                    return serve_connection(conn_shared, stream, peer, conn_shutdown).await;
                };
                let handshake =
                    tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                let stream = tokio::select! {
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            conn_shared.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                            return debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            conn_shared.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                            return debug!(%peer, "TLS handshake timed out");
                        }
                    },
                    _ = conn_shutdown.cancelled() => return,
                };
                serve_connection(conn_shared, stream, peer, conn_shutdown).await
            });
        }
        // Drain: no new work, agents told to go elsewhere after their
        // streams, in-flight streams given until the deadline.
        shared.draining.store(true, Ordering::Relaxed);
        drop(listener);
        let sessions = shared.hub.sessions();
        info!(agents = sessions.len(), deadline = ?shared.config.drain_timeout, "draining");
        for session in &sessions {
            session.goaway("relay shutting down", GOAWAY_RETRY);
        }
        shared.conns.close();
        if tokio::time::timeout(shared.config.drain_timeout, shared.conns.wait()).await.is_err() {
            warn!("drain deadline passed; ending the remaining streams");
        }
        for session in shared.hub.sessions() {
            session.close(session::CloseReason::Shutdown);
        }
        shared.sessions.close();
        let _ = tokio::time::timeout(CLOSE_DEADLINE, shared.sessions.wait()).await;
        let _ = tokio::time::timeout(CLOSE_DEADLINE, shared.conns.wait()).await;
        info!("relay stopped");
        Ok(())
    }
}

/// Serves HTTP/1.1 (with upgrades, for agents) on one accepted connection
/// until it ends; on `shutdown`, finishes the request in flight and closes.
async fn serve_connection<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let header_read = shared.config.header_read_timeout;
    let max_headers = shared.config.limits.max_headers as usize;
    let stall = stall::StallLimit::new(shared.config.idle_timeout);
    let conn = Arc::new(server::Conn { peer, stall: stall.clone() });
    let svc = service_fn(move |req| server::handle(shared.clone(), conn.clone(), req));
    // Without a timer hyper has no header timeout at all: a client that
    // connects (and finishes TLS) and then sends nothing would hold its
    // connection forever.
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
        .max_headers(max_headers)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stall::StallIo::new(stream, stall)), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Runs a relay with `config` on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    Relay::new(config).serve(listener, shutdown).await
}
