//! Prometheus text metrics on an optional, separate listener
//! (`metrics_listen`): the relay's gauges for operators, soak runs and
//! benchmarks. Off unless configured; bind it to loopback or a private
//! network, it has no authentication.

use std::fmt::Write as _;
use std::sync::Arc;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// The metrics text of `shared` at this moment.
pub fn render(shared: &Shared) -> String {
    let sessions = shared.hub.sessions();
    let streams: usize = sessions.iter().map(|s| s.in_flight()).sum();
    let tasks = tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_alive_tasks())
        .unwrap_or_default();
    let mut out = String::with_capacity(1024);
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n");
    };
    gauge("relayd_agents_connected", "Agent sessions connected.", sessions.len() as u64);
    gauge("relayd_streams_in_flight", "Requests in flight through all tunnels.", streams as u64);
    gauge(
        "relayd_buffered_bytes",
        "Response body bytes buffered for web clients.",
        shared.gauge.current() as u64,
    );
    gauge(
        "relayd_buffered_bytes_peak",
        "Most response body bytes buffered at once since start.",
        shared.gauge.peak() as u64,
    );
    gauge("relayd_tasks", "Tokio tasks alive in the relay process.", tasks as u64);
    gauge("relayd_draining", "1 while the relay drains for shutdown.", shared.is_draining() as u64);
    let failed = shared.tls_handshake_failures.load(std::sync::atomic::Ordering::Relaxed);
    let name = "relayd_tls_handshake_failures_total";
    let _ = write!(
        out,
        "# HELP {name} TLS handshakes that failed or timed out (clients speaking plain HTTP, untrusted or wrong certificates, scanners).\n# TYPE {name} counter\n{name} {failed}\n"
    );
    out
}

/// Scrapes served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// Longest a scrape connection may stay open.
const CONNECTION_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until `shutdown`, at most
/// `MAX_CONNECTIONS` connections at a time, each for at most
/// `CONNECTION_LIMIT`.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of file descriptors: the backlog would fail again
                    // at once; give the serving side room first.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let resp = if req.uri().path() == "/metrics" {
                    let mut r = Response::new(Full::new(bytes::Bytes::from(render(&shared))));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    r
                } else {
                    let mut r = Response::new(Full::new(bytes::Bytes::from_static(
                        b"only /metrics here\n",
                    )));
                    *r.status_mut() = StatusCode::NOT_FOUND;
                    r
                };
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_LIMIT, conn).await;
        });
    }
}
