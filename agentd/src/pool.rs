//! Connections to the local service, kept open between requests.
//!
//! An agent reaches one service, so the pool is a list of idle HTTP/1
//! connections to it, the most recently used first. hyper-util's pool keys
//! connections by scheme and host, checks one out through a future that
//! races a lazy connect, and spawns a task per request to notice when the
//! connection is idle again; here a connection comes back when the answer's
//! body has ended, and waits for hyper to be ready when it is taken.
//!
//! A request that meets a connection the service closed while it was idle
//! (its idle timeout) is sent again on another, which hyper allows only
//! while nothing of it was written. Dropping an answer before its end drops
//! its connection, which is how the service learns that the client went
//! away (and stops generating).

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tracing::debug;

/// Idle connections kept at most; more are closed when they come back.
const MAX_IDLE: usize = 64;

/// Idle connections to the local service.
pub struct Pool<B> {
    /// `host:port` of the service.
    addr: String,
    max_headers: u32,
    idle_timeout: Duration,
    idle: Mutex<Vec<Idle<B>>>,
}

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum Error {
    /// No connection to the service could be opened.
    Connect(std::io::Error),
    /// The connection failed before or while answering.
    Http(hyper::Error),
}

impl Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(_) => f.write_str("cannot connect"),
            Error::Http(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect(e) => Some(e),
            Error::Http(e) => e.source(),
        }
    }
}

impl<B> Pool<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A pool for the service at `host:port` (`addr`), reading response
    /// heads of up to `max_headers` fields, closing connections idle for
    /// `idle_timeout`.
    pub fn new(addr: String, max_headers: u32, idle_timeout: Duration) -> Self {
        Self { addr, max_headers, idle_timeout, idle: Mutex::new(Vec::new()) }
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection, or
    /// a new one.
    pub async fn send(self: &Arc<Self>, mut req: Request<B>) -> Result<Response<Pooled<B>>, Error> {
        while let Some(mut sender) = self.take_idle() {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.answer(resp, sender)),
                Err(mut e) => match e.take_message() {
                    // Closed before the request went out: the next one.
                    Some(back) => req = back,
                    None => return Err(Error::Http(e.into_error())),
                },
            }
        }
        let mut sender = self.connect().await?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(self.answer(resp, sender)),
            Err(e) => Err(Error::Http(e.into_error())),
        }
    }

    /// The most recently used idle connection still open. Connections idle
    /// for too long are closed first: the oldest are at the front, and a
    /// busy agent that keeps taking the newest would not reach them.
    fn take_idle(&self) -> Option<SendRequest<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let stale = idle.iter().take_while(|i| now - i.since >= self.idle_timeout).count();
        idle.drain(..stale);
        while let Some(i) = idle.pop() {
            if !i.sender.is_closed() {
                return Some(i.sender);
            }
        }
        None
    }

    fn give_back(&self, sender: SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: Instant::now() });
        }
    }

    async fn connect(&self) -> Result<SendRequest<B>, Error> {
        let tcp =
            tokio::net::TcpStream::connect(self.addr.as_str()).await.map_err(Error::Connect)?;
        // Nagle on the upstream connection made small POSTs 13x slower.
        let _ = tcp.set_nodelay(true);
        let mut http = http1::Builder::new();
        if let Some(n) = tunnel_proto::limits::hyper_max_headers(self.max_headers) {
            http.max_headers(n);
        }
        let (sender, conn) = http.handshake(TokioIo::new(tcp)).await.map_err(Error::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "a connection to the local service ended: {e}");
            }
        });
        Ok(sender)
    }

    fn answer(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: SendRequest<B>,
    ) -> Response<Pooled<B>> {
        let back = if resp.body().is_end_stream() {
            self.give_back(sender);
            None
        } else {
            Some((sender, self.clone()))
        };
        resp.map(|body| Pooled { body, back })
    }
}

/// An answer's body; its connection goes back to the pool at its end.
pub struct Pooled<B> {
    body: Incoming,
    back: Option<(SendRequest<B>, Arc<Pool<B>>)>,
}

impl<B> Body for Pooled<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.give_back(),
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> Pooled<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            pool.give_back(sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A service on loopback answering `ok` to each request; with `once`, it
    /// closes each connection after its first answer (an idle timeout).
    async fn service(once: bool) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if conn.write_all(answer).await.is_err() || once {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<Full<Bytes>> {
        Request::get("/api/tags").header("host", "svc").body(Full::new(Bytes::new())).expect("req")
    }

    async fn text(pool: &Arc<Pool<Full<Bytes>>>) -> String {
        let resp = pool.send(get()).await.expect("an answer");
        let body = resp.into_body().collect().await.expect("a body").to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection() {
        let (addr, accepted) = service(false).await;
        let pool = Arc::new(Pool::new(addr, 64, Duration::from_secs(60)));
        for _ in 0..5 {
            assert_eq!(text(&pool).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_service_closed_while_idle_is_not_used_again() {
        let (addr, accepted) = service(true).await;
        let pool = Arc::new(Pool::new(addr, 64, Duration::from_secs(60)));
        assert_eq!(text(&pool).await, "ok");
        // Once hyper has read the service's close, the idle connection
        // says so; the next request opens another.
        for _ in 0..5000 {
            let closed = pool.idle.lock().expect("lock").iter().all(|i| i.sender.is_closed());
            if closed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(text(&pool).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed_at_the_next_request() {
        let (addr, accepted) = service(false).await;
        // Every connection is past a zero idle time as soon as it is back.
        let pool = Arc::new(Pool::new(addr, 64, Duration::ZERO));
        // Two connections at once, both idle afterwards.
        let (a, b) = tokio::join!(pool.send(get()), pool.send(get()));
        for resp in [a, b] {
            resp.expect("an answer").into_body().collect().await.expect("a body");
        }
        assert_eq!(pool.idle.lock().expect("lock").len(), 2);
        assert_eq!(text(&pool).await, "ok");
        // Both stale ones went; the request's own new one is back.
        assert_eq!(pool.idle.lock().expect("lock").len(), 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let pool: Arc<Pool<Full<Bytes>>> =
            Arc::new(Pool::new(format!("127.0.0.1:{port}"), 64, Duration::from_secs(60)));
        match pool.send(get()).await {
            Err(e) => assert!(e.is_connect(), "{e}"),
            Ok(resp) => panic!("an answer from nothing: {}", resp.status()),
        }
    }
}
