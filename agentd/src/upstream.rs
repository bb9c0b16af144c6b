//! Forwarding one tunnelled request to the local service and streaming the
//! answer back, through the stream's [`StreamHandle`].
//!
//! The request goes out through a pooled HTTP/1 client with TCP_NODELAY.
//! `Host` becomes the upstream's authority and `Origin`/`Authorization` from
//! the web side are dropped: Ollama refuses foreign `Host`/`Origin` values,
//! and the web side's credential is the relay's business. The response head
//! is sent as soon as it arrives, then each body chunk as it arrives,
//! spending flow-control credit. A `cancel` from the relay drops the
//! in-flight upstream request, which closes its connection: Ollama stops
//! generating.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{Request, Uri};
use http_body_util::{Either, Full};
use link::body::InboxBody;
use link::chunks::SendError;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use tunnel_proto::flow::Inbox;
use tunnel_proto::{Headers, Message, RequestBody, TunnelRequest};

use daemon::observe::{CancelReason, Observer, Outcome as Ended, Span};

use crate::policy::Policy;
use crate::pool::Pool;
use crate::stream::StreamHandle;

/// A request whose response head takes longer than this is acknowledged to
/// the relay; a quicker head acknowledges it by itself, which saves a frame
/// and a socket write for most requests. Far below the relay's
/// acknowledgement timeout (at least 1 s, 30 s by default).
pub const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Request fields never passed to the local service.
const DROPPED: [HeaderName; 3] = [http::header::ORIGIN, http::header::AUTHORIZATION, HOST];

/// Requests the agent took from the relay, and those its policy refused.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub refused: AtomicU64,
}

/// The local service and the pooled client that reaches it.
pub struct Upstream {
    base: Uri,
    /// Which requests may reach it (replaced by a SIGHUP reload).
    policy: std::sync::RwLock<Arc<Policy>>,
    pub counters: Counters,
    /// Trace events and request metrics.
    observer: Arc<Observer>,
    host: HeaderValue,
    pool: Arc<Pool<UpstreamBody>>,
    /// What the last health check found, and a wake-up for the next one
    /// when a tunnelled request finds otherwise (so `tunnelctl status` and
    /// the relay's health answer do not lag a service that came or went).
    pub seen_reachable: std::sync::atomic::AtomicBool,
    pub recheck: tokio::sync::Notify,
    /// Models requests are loading.
    pub loading: Arc<crate::loading::Loading>,
}

impl Upstream {
    /// A client of the local service at `base` that reads response heads of
    /// up to `max_headers` fields (the limit the tunnel carries).
    pub fn new(base: Uri, max_headers: u32, policy: Policy, observer: Arc<Observer>) -> Self {
        let pool = Arc::new(Pool::new(
            service_addr(&base),
            max_headers,
            std::time::Duration::from_secs(60),
        ));
        let authority = base.authority().map(|a| a.as_str()).unwrap_or("127.0.0.1");
        let host =
            HeaderValue::from_str(authority).unwrap_or(HeaderValue::from_static("127.0.0.1"));
        Self {
            base,
            policy: std::sync::RwLock::new(Arc::new(policy)),
            counters: Counters::default(),
            observer,
            host,
            pool,
            seen_reachable: std::sync::atomic::AtomicBool::new(false),
            recheck: tokio::sync::Notify::new(),
            loading: Arc::default(),
        }
    }

    pub fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }

    /// The endpoint policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Applies `policy` to every request from now on.
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
    }

    /// `GET path` at the local service (5 s, at most `limit` bytes read):
    /// the status and the body when it is JSON.
    pub(crate) async fn get_json(
        &self,
        path: http::uri::PathAndQuery,
        limit: usize,
    ) -> Result<(http::StatusCode, Option<serde_json::Value>), String> {
        let mut req = Request::new(Either::Left(Full::new(Bytes::new())));
        *req.uri_mut() = origin_form(&path);
        req.headers_mut().insert(HOST, self.host.clone());
        req.headers_mut().insert(
            http::header::USER_AGENT,
            HeaderValue::from_str(&format!(
                "agentd/{} ({})",
                env!("CARGO_PKG_VERSION"),
                crate::HEALTH_CHECK_AGENT
            ))
            .unwrap_or(HeaderValue::from_static(crate::HEALTH_CHECK_AGENT)),
        );
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let resp = self.pool.send(req).await.map_err(|e| source_text(&e))?;
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(
                resp.into_body(),
                limit,
            ))
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
            Ok::<_, String>((status, serde_json::from_slice(&body).ok()))
        })
        .await;
        answer.unwrap_or_else(|_| Err("no answer within 5 s".into()))
    }
}

/// `host:port` of the service at `base` (an IPv6 host keeps its brackets;
/// the configuration takes only `http://`, so 80 when no port is named).
fn service_addr(base: &Uri) -> String {
    format!("{}:{}", base.host().unwrap_or("127.0.0.1"), base.port_u16().unwrap_or(80))
}

/// The request target as the service gets it: origin form, since the
/// connection is to the service and `Host` says its name.
fn origin_form(path: &http::uri::PathAndQuery) -> Uri {
    Uri::from(path.clone())
}

/// Whether a request to `path` changes the models the service has: the
/// agent checks again once it completed.
pub fn changes_models(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    matches!(path, "/api/pull" | "/api/delete" | "/api/create" | "/api/copy" | "/api/push")
}

/// Runs one stream to completion or cancellation; dropping `stream` at the
/// end takes it out of the session's table.
pub async fn serve(
    session: String,
    stream: StreamHandle,
    upstream: Arc<Upstream>,
    req: TunnelRequest,
    body: Option<Inbox>,
    cancel: CancellationToken,
) {
    let id = req.id.clone();
    let method = req.method.clone();
    let path = req.path.clone();
    let mut span =
        upstream.observer.start(&session, id.as_str(), "", "", method.as_str(), path.as_str());
    if let RequestBody::Inline(b) = &req.body {
        span.uploaded(b.len() as u64);
    }
    let outcome = tokio::select! {
        biased;
        _ = cancel.cancelled() => Outcome::Cancelled,
        o = exchange(&stream, &upstream, req, body, &mut span) => o,
    };
    if changes_models(path.as_str()) {
        // A pull or a delete (done, failed or cut short) may have changed
        // the models the relay routes by: look again soon.
        upstream.recheck.notify_one();
    }
    match &outcome {
        Outcome::Done => span.end(Ended::Ok, None, ""),
        Outcome::SessionGone => {
            span.end(Ended::Cancelled, Some(CancelReason::SessionLost), "the relay session ended")
        }
        Outcome::Cancelled => {
            span.end(Ended::Cancelled, Some(CancelReason::Peer), "cancelled by the relay")
        }
        Outcome::Failed { code: 400 | 403, message, .. } => span.end(Ended::Refused, None, message),
        Outcome::Failed { message, .. } => span.end(Ended::Error, None, message),
    }
    match outcome {
        Outcome::Done | Outcome::SessionGone => {}
        Outcome::Cancelled => {
            debug!(stream = %id, %method, %path, "stream cancelled; upstream request dropped");
        }
        Outcome::Failed { before_head, code, message } => {
            debug!(stream = %id, %method, %path, code, %message, before_head, "request failed");
            // In order, behind the body bytes that did arrive (a `cancel`
            // would overtake them on the urgent path): the relay delivers
            // them, then ends the stream with the error.
            let _ = stream.send_msg(&Message::error(id.as_str(), code, message)).await;
        }
    }
}

enum Outcome {
    Done,
    Cancelled,
    Failed { before_head: bool, code: u16, message: String },
    SessionGone,
}

async fn exchange(
    stream: &StreamHandle,
    upstream: &Upstream,
    req: TunnelRequest,
    body: Option<Inbox>,
    span: &mut Span,
) -> Outcome {
    let id = req.id.clone();
    // Nothing the owner's policy refuses reaches the local service.
    if let Err(refusal) = upstream.policy().check(&req.method, req.path.as_str()) {
        upstream.counters.refused.fetch_add(1, Ordering::Relaxed);
        info!(stream = %id, method = %req.method, path = %req.path.path(), %refusal, "{} {} refused: {refusal}", req.method, req.path.path());
        return Outcome::Failed {
            before_head: true,
            code: refusal.code(),
            message: refusal.to_string(),
        };
    }
    let uri = origin_form(&req.path);
    // A request that runs a model may load it: its body's first chunk says
    // which, and the load lasts until the service answers.
    let load: Option<LoadSlot> = (req.method == http::Method::POST
        && daemon::model::loads_a_model(req.path.path()))
    .then(Arc::default);
    let sniff = load.clone().map(|slot| Sniff { loading: upstream.loading.clone(), slot });
    let upstream_body = match (req.body, body) {
        (RequestBody::Streamed, Some(inbox)) => Either::Right(Counted::new(
            InboxBody::new(inbox, stream.credit()),
            span.upload_counter(),
            sniff,
        )),
        (RequestBody::Inline(b), _) => {
            if let Some(sniff) = sniff {
                sniff.first_chunk(&b);
            }
            Either::Left(Full::new(b))
        }
        (RequestBody::Streamed, None) => Either::Left(Full::new(Bytes::new())),
    };
    let mut out = Request::new(upstream_body);
    *out.method_mut() = req.method;
    *out.uri_mut() = uri;
    let mut headers = req.headers;
    for name in DROPPED {
        headers.remove(name);
    }
    headers.insert(HOST, upstream.host.clone());
    *out.headers_mut() = headers;

    // Until the head is queued for the relay, the acknowledgement timer
    // runs: once it passes ACK_DELAY, `ack` goes out on the urgent path.
    let ack_due = tokio::time::sleep(ACK_DELAY);
    tokio::pin!(ack_due);
    let mut acked = false;
    let request = upstream.pool.send(out);
    tokio::pin!(request);
    let answered = tokio::select! {
        r = &mut request => r,
        _ = &mut ack_due => {
            stream.ack();
            acked = true;
            request.await
        }
    };
    // What crosses the tunnel says what happened, never where: the web
    // side must not learn the desktop's addresses or library errors. The
    // detail stays in this log.
    if let Some(guard) = load.and_then(|slot| lock(&slot).take())
        && matches!(&answered, Ok(r) if r.status().is_success())
    {
        guard.loaded();
    }
    let reachable = match &answered {
        Ok(_) => true,
        Err(e) => !e.is_connect(),
    };
    if reachable != upstream.seen_reachable.load(std::sync::atomic::Ordering::Relaxed) {
        upstream.recheck.notify_one();
    }
    let resp = match answered {
        Ok(r) => r,
        Err(e) => {
            let message = if e.is_connect() {
                warn!(stream = %id, upstream = %upstream.base, error = %source_text(&e), "the local service at {} is unreachable: {}; is it running?", upstream.base, source_text(&e));
                "the local service is unreachable from the agent"
            } else {
                warn!(stream = %id, upstream = %upstream.base, error = %source_text(&e), "the local service at {} failed before answering: {}", upstream.base, source_text(&e));
                "the local service failed before answering"
            };
            return Outcome::Failed { before_head: true, code: 502, message: message.into() };
        }
    };
    let (parts, mut body) = resp.into_parts();
    let headers = match Headers::from_map(&parts.headers, &[]) {
        Ok(h) => h,
        Err(e) => {
            warn!(stream = %id, error = %e, "the local service sent an unusable response head: {e}");
            return Outcome::Failed {
                before_head: true,
                code: 502,
                message: "the local service sent a response head the tunnel cannot carry".into(),
            };
        }
    };
    let body_follows = !http_body::Body::is_end_stream(&body);
    span.head(
        parts.status.as_u16(),
        parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
    );
    // A full writer queue (a congested tunnel) must not hold the head past
    // the acknowledgement: the ack overtakes it.
    let queued = stream.send_head(parts.status, headers, body_follows);
    tokio::pin!(queued);
    let queued = tokio::select! {
        r = &mut queued => r,
        _ = &mut ack_due, if !acked => {
            stream.ack();
            queued.await
        }
    };
    if queued.is_err() {
        return Outcome::SessionGone;
    }
    if !body_follows {
        return Outcome::Done;
    }
    let mut joiner = link::chunks::Joiner::new(stream.chunk);
    loop {
        let (data, last) = match joiner.next(&mut body).await {
            Ok(next) => next,
            Err(e) => {
                warn!(stream = %id, error = %source_text(&e), "the local service failed mid-response: {}", source_text(&e));
                return Outcome::Failed {
                    before_head: false,
                    code: 502,
                    message: "the local service failed mid-response".into(),
                };
            }
        };
        span.chunk(&data);
        match stream.send_data(data, last).await {
            Ok(()) if last => return Outcome::Done,
            Ok(()) => {}
            Err(SendError::Ended | SendError::Stalled) => return Outcome::Cancelled,
            Err(SendError::Closed) => return Outcome::SessionGone,
        }
    }
}

fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}

/// The body of a request to the local service: whole, or streamed from the
/// relay (its bytes counted for the request's span).
pub type UpstreamBody = Either<Full<Bytes>, Counted>;

/// Where a request's load is held until the service answers.
type LoadSlot = Arc<std::sync::Mutex<Option<crate::loading::LoadGuard>>>;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads the model a request's first body chunk names, and starts its
/// load when it is not in memory.
struct Sniff {
    loading: Arc<crate::loading::Loading>,
    slot: LoadSlot,
}

impl Sniff {
    fn first_chunk(self, chunk: &[u8]) {
        if let Some(guard) = crate::loading::model_in(chunk).and_then(|m| self.loading.start(&m)) {
            *lock(&self.slot) = Some(guard);
        }
    }
}

/// A streamed request body that counts the bytes the local service took.
pub struct Counted {
    inner: InboxBody,
    count: Arc<AtomicU64>,
    sniff: Option<Sniff>,
}

impl Counted {
    fn new(inner: InboxBody, count: Arc<AtomicU64>, sniff: Option<Sniff>) -> Self {
        Self { inner, count, sniff }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = <InboxBody as http_body::Body>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
            if let Some(sniff) = self.sniff.take() {
                sniff.first_chunk(d);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_and_deletes_change_the_models() {
        assert!(changes_models("/api/pull"));
        assert!(changes_models("/api/delete?x=1"));
        assert!(!changes_models("/api/chat"));
        assert!(!changes_models("/api/pull/more"));
    }

    #[test]
    fn the_service_address_keeps_an_ipv6_host_in_brackets_and_defaults_to_port_80() {
        let addr = |url: &str| service_addr(&url.parse().expect("a URL"));
        assert_eq!(addr("http://127.0.0.1:11434/"), "127.0.0.1:11434");
        assert_eq!(addr("http://[::1]:11434/"), "[::1]:11434");
        assert_eq!(addr("http://localhost/"), "localhost:80");
        let target = origin_form(&"/api/chat?x=1".parse().expect("a path"));
        assert_eq!(target.to_string(), "/api/chat?x=1");
    }
}
