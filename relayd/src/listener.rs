//! The public listener: accepts connections (TLS when configured), serves
//! HTTP/1.1 with upgrades on each, and on shutdown drains: stops accepting,
//! answers new requests 503, sends `goaway` to agents, lets in-flight streams
//! finish until `drain_timeout`, then ends the rest and closes the sessions.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::server;
use crate::session::CloseReason;
use crate::stall::{StallIo, StallLimit};
use crate::state::{Conn, Shared};
use crate::tls;

/// Once the drain deadline passed and sessions are closed, how long their
/// tasks get to wind down.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);
/// The reconnect delay a draining relay suggests to its agents.
const GOAWAY_RETRY: Duration = Duration::from_secs(1);

/// Serves on `listener` until `shutdown`, then drains.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let tls = shared.config.tls.as_ref().map(|t| TlsAcceptor::from(t.server.clone()));
    let addr = listener.local_addr()?;
    info!(%addr, tls = tls.is_some(), "listening on {addr}{}", if tls.is_some() { " (TLS)" } else { "" });
    let mut probes = shared.probe_inbox.lock().unwrap_or_else(PoisonError::into_inner).take();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(reply) = recv(&mut probes) => {
                let _ = reply.send(());
                continue;
            }
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors or similar: keep serving the
                    // connections we have and retry shortly.
                    error!(error = %e, "cannot accept a connection: {e} (out of file descriptors? raise LimitNOFILE=)");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (conn_shared, conn_shutdown, tls) = (shared.clone(), shutdown.clone(), tls.clone());
        shared.conns.spawn(async move {
            let Some(acceptor) = tls else {
                return serve_connection(conn_shared, stream, peer, conn_shutdown).await;
            };
            let handshake = tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let stream = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        conn_shared.tls_handshake_failed();
                        return debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        conn_shared.tls_handshake_failed();
                        return debug!(%peer, "TLS handshake timed out");
                    }
                },
                _ = conn_shutdown.cancelled() => return,
            };
            serve_connection(conn_shared, stream, peer, conn_shutdown).await
        });
    }
    // Probes sent from now on are answered by the draining flag.
    drop(probes);
    drain(&shared, listener).await;
    Ok(())
}

/// The next health probe; pends forever without a probe channel.
async fn recv<T>(probes: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match probes {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// No new work, agents told to go elsewhere after their streams, in-flight
/// streams given until the deadline, then everything closed.
async fn drain(shared: &Shared, listener: TcpListener) {
    shared.start_draining();
    drop(listener);
    let sessions = shared.router.local().sessions();
    info!(agents = sessions.len(), deadline = ?shared.config.drain_timeout, "draining {} agent sessions (at most {:?})", sessions.len(), shared.config.drain_timeout);
    for session in &sessions {
        session.goaway("relay shutting down", GOAWAY_RETRY);
    }
    shared.conns.close();
    if tokio::time::timeout(shared.config.drain_timeout, shared.conns.wait()).await.is_err() {
        warn!("drain deadline passed; ending the remaining streams");
    }
    for session in shared.router.local().sessions() {
        session.close(CloseReason::Shutdown);
    }
    shared.sessions.close();
    let _ = tokio::time::timeout(CLOSE_DEADLINE, shared.sessions.wait()).await;
    let _ = tokio::time::timeout(CLOSE_DEADLINE, shared.conns.wait()).await;
    info!("relay stopped");
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
    let max_headers = tunnel_proto::limits::hyper_max_headers(shared.config.limits.max_headers);
    let stall = StallLimit::new(shared.config.idle_timeout);
    let conn = Arc::new(Conn { peer, stall: stall.clone(), hop: false });
    let svc = service_fn(move |req| server::handle(shared.clone(), conn.clone(), req));
    // Without a timer hyper has no header timeout at all: a client that
    // connects (and finishes TLS) and then sends nothing would hold its
    // connection forever.
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_read).keep_alive(true);
    if let Some(n) = max_headers {
        http.max_headers(n);
    }
    let conn =
        http.serve_connection(TokioIo::new(StallIo::new(stream, stall)), svc).with_upgrades();
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
