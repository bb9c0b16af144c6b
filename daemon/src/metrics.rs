//! The Prometheus text listener (`metrics_listen`) both daemons serve: a
//! separate, optional port answering `GET /metrics` with whatever the daemon
//! renders at that moment. No authentication: keep it on loopback or a
//! private network.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Scrapes served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest a scrape connection may stay open.
pub const CONNECTION_LIMIT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` (the text `render` returns) on `listener` until
/// `shutdown`, at most [`MAX_CONNECTIONS`] connections at a time, each for
/// at most [`CONNECTION_LIMIT`]; other paths get 404.
pub async fn serve(
    listener: TcpListener,
    shutdown: CancellationToken,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of file descriptors: the backlog would fail again
                    // at once; give the serving side room first.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let resp = if req.uri().path() == "/metrics" {
                    let mut r = Response::new(Full::new(Bytes::from(render())));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    r
                } else {
                    let mut r =
                        Response::new(Full::new(Bytes::from_static(b"only /metrics here\n")));
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

/// A running metrics listener; stops when dropped.
#[derive(Debug)]
pub struct Server {
    stop: CancellationToken,
}

impl Server {
    /// Binds `addr` (when the operator set one) and serves `render` there
    /// until the returned server is dropped.
    pub async fn start(
        addr: Option<std::net::SocketAddr>,
        render: Arc<dyn Fn() -> String + Send + Sync>,
    ) -> std::io::Result<Option<Server>> {
        let Some(addr) = addr else { return Ok(None) };
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen for metrics on {addr}: {e}"))
        })?;
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, stop.clone(), render));
        Ok(Some(Server { stop }))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Text of Prometheus metrics, one family at a time.
#[derive(Debug, Default)]
pub struct Exposition(String);

impl Exposition {
    pub fn new() -> Self {
        Self(String::with_capacity(2048))
    }

    /// One metric family with a single unlabelled sample.
    pub fn sample(&mut self, name: &str, kind: &str, help: &str, value: u64) -> &mut Self {
        use std::fmt::Write as _;
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        self
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.sample(name, "gauge", help, value)
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.sample(name, "counter", help, value)
    }

    pub fn finish(self) -> String {
        self.0
    }
}

/// Tokio tasks alive on the current runtime (0 outside one).
pub fn tasks_alive() -> u64 {
    tokio::runtime::Handle::try_current().map_or(0, |h| h.metrics().num_alive_tasks() as u64)
}
