//! The peer listener (`[cluster] peer_listen`): requests other replicas
//! forward here ([`crate::hop`]), over HTTP/2 with mutual TLS, served as if
//! the client had come straight here (the token checked, the user's budget
//! spent, the access line written here), or refused with 421 when this
//! replica does not hold the user any more; never forwarded again.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::body::RelayBody;
use crate::cluster::Peering;
use crate::hop::{CLIENT, HOP};
use crate::stall::StallLimit;
use crate::state::{Conn, Shared};

/// Serves forwarded requests on `listener` until `stop`.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    peering: Peering,
    stop: CancellationToken,
) {
    let tls = tokio_rustls::TlsAcceptor::from(peering.server.clone());
    info!(addr = %peering.listen, peer = %peering.address, "taking requests forwarded by other replicas on {} (mutual TLS)", peering.listen);
    loop {
        let (tcp, from) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "peer listener: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (shared, tls, stop) = (shared.clone(), tls.clone(), stop.clone());
        tokio::spawn(async move {
            let accepted =
                tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, tls.accept(tcp)).await;
            let stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return debug!(%from, error = %e, "a peer's TLS handshake failed"),
                Err(_) => return debug!(%from, "a peer's TLS handshake timed out"),
            };
            let svc = service_fn(move |req| answer(shared.clone(), from, req));
            let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            // Every request forwarded between two replicas is a stream on
            // one connection: hyper's default of 200 at once would queue the
            // rest (the owner's own limits, max_streams per agent, apply).
            http.timer(TokioTimer::new()).adaptive_window(true).max_concurrent_streams(u32::MAX);
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    debug!(%from, error = %e, "a peer connection ended with an error");
                },
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// A forwarded request, answered as if it had come here.
async fn answer(
    shared: Arc<Shared>,
    from: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<RelayBody>, Infallible> {
    let client = req
        .headers()
        .get(CLIENT)
        .and_then(|v| v.to_str().ok()?.parse::<SocketAddr>().ok())
        .unwrap_or(from);
    // Between replicas only: the desktop's service never sees them.
    req.headers_mut().remove(CLIENT);
    req.headers_mut().remove(HOP);
    let conn = Arc::new(Conn { peer: client, stall: StallLimit::new(None), hop: true });
    crate::server::handle(shared, conn, req).await
}
