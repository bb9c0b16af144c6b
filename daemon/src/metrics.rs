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

    /// The `# HELP` and `# TYPE` lines of a family whose samples follow.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        use std::fmt::Write as _;
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        self
    }

    /// One labelled sample of the current family. Label values are
    /// escaped as the text format asks.
    pub fn labelled(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl std::fmt::Display,
    ) -> &mut Self {
        use std::fmt::Write as _;
        let _ = writeln!(self.0, "{name}{} {value}", label_set(labels));
        self
    }

    /// The samples of one histogram with `labels` (after [`Self::family`]
    /// with kind `histogram`).
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        h: &HistogramSnapshot,
    ) -> &mut Self {
        let mut cumulative = 0;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cumulative += n;
            let le = bound.to_string();
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.labelled(&format!("{name}_bucket"), &l, cumulative);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.labelled(&format!("{name}_bucket"), &l, h.count);
        self.labelled(&format!("{name}_sum"), labels, h.sum);
        self.labelled(&format!("{name}_count"), labels, h.count)
    }

    pub fn finish(self) -> String {
        self.0
    }
}

fn label_set(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// A Prometheus histogram with fixed bucket bounds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

/// A histogram's values at one moment.
#[derive(Debug, Clone)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    /// Per bucket (not cumulative).
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len()], count: 0, sum: 0.0 }
    }

    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self.counts.clone(),
            count: self.count,
            sum: self.sum,
        }
    }
}

/// Tokio tasks alive on the current runtime (0 outside one).
pub fn tasks_alive() -> u64 {
    tokio::runtime::Handle::try_current().map_or(0, |h| h.metrics().num_alive_tasks() as u64)
}
