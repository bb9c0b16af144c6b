//! The agent's side of one session with the relay: the stream table over a
//! [`Link`].
//!
//! Each `http_request` becomes a stream: a table entry (its cancellation
//! token, request-body inbox and send window) and a task that forwards it to
//! the local service ([`crate::upstream`]) holding a [`StreamHandle`]. The
//! reader never waits on a stream: request body bytes go into the stream's
//! bounded inbox (the relay respects the window this agent announced),
//! credit goes to its send window, `cancel` fires its token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use link::{End, Handler, Link, LinkConfig, Outbound, Outcome};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use tunnel_proto::error::Rejected;
use tunnel_proto::flow::{
    BufferGauge, Inbox, InboxSender, PushError, SendWindow, StreamAbort, inbox,
};
use tunnel_proto::frame::DataFrame;
use tunnel_proto::{Encoder, Limits, Message, ProtocolError, RequestBody, StreamId, Violation};

use crate::renew::{Renewal, Reply};
use crate::stream::{StreamHandle, StreamTable};
use crate::upstream::{self, Upstream};

/// How long in-flight streams get to finish when agentd shuts down or
/// reconnects on request.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Reconnect delay after a `goaway` without a hint, and the longest one a
/// relay may ask for.
const GOAWAY_DEFAULT_RETRY: Duration = Duration::from_secs(1);
const GOAWAY_MAX_RETRY: Duration = Duration::from_secs(300);

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The agent is shutting down; its streams finished (or the drain
    /// deadline passed).
    Shutdown,
    /// Asked to reconnect; its streams finished first.
    Reconnect,
    /// The relay is draining: its streams are done; reconnect after this
    /// long without counting it as a failure.
    Goaway(Duration),
    /// The link ended under the session.
    Lost(End),
}

/// Why a session should wind down, once asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Shutdown,
    Reconnect,
    Goaway(Duration),
}

struct StreamEntry {
    cancel: CancellationToken,
    body: Option<InboxSender>,
    window: Arc<SendWindow>,
}

/// Settings fixed when the session starts.
pub struct SessionParams {
    pub id: String,
    /// The relay's limits from `welcome`.
    pub peer: Limits,
    pub local: Limits,
    pub gauge: Arc<BufferGauge>,
    pub liveness: link::settings::Liveness,
    /// The relay listed `ack`: each accepted request is acknowledged.
    pub acks: bool,
    /// The relay listed `service`: the local service's health is reported.
    pub service_reports: bool,
    pub upstream: Arc<Upstream>,
    /// Where stream tasks run (drained on shutdown).
    pub tasks: TaskTracker,
    /// The session's authorization and its in-band renewal.
    pub renewal: Renewal,
}

/// One live session.
pub struct Session {
    pub id: String,
    me: Weak<Session>,
    /// Heads for the relay, under the limits it announced in `welcome`.
    encoder: Encoder,
    local: Limits,
    link: Arc<Link>,
    streams: Mutex<HashMap<String, StreamEntry>>,
    gauge: Arc<BufferGauge>,
    /// Woken whenever a stream leaves the table.
    stream_done: Notify,
    /// Set once the session winds down: new requests are refused.
    draining: AtomicBool,
    ending: watch::Sender<Option<Ending>>,
    acks: bool,
    service_reports: bool,
    upstream: Arc<Upstream>,
    tasks: TaskTracker,
    renewal: Renewal,
}

impl Session {
    pub fn new(p: SessionParams) -> (Arc<Self>, mpsc::Receiver<Outbound>) {
        let (link, rx) = Link::new(LinkConfig {
            label: p.id.clone(),
            peer: "relay",
            liveness: p.liveness,
            max_streams: p.local.max_streams as usize,
        });
        let session = Arc::new_cyclic(|me| Self {
            id: p.id,
            me: me.clone(),
            encoder: Encoder::new(p.peer),
            local: p.local,
            link,
            streams: Mutex::new(HashMap::new()),
            gauge: p.gauge,
            stream_done: Notify::new(),
            draining: AtomicBool::new(false),
            ending: watch::channel(None).0,
            acks: p.acks,
            service_reports: p.service_reports,
            upstream: p.upstream,
            tasks: p.tasks,
            renewal: p.renewal,
        });
        (session, rx)
    }

    pub fn in_flight(&self) -> usize {
        self.lock_streams().len()
    }

    pub fn renewal(&self) -> &Renewal {
        &self.renewal
    }

    /// Tells the relay what the agent saw of its local service.
    pub fn report_service(&self, report: tunnel_proto::ServiceState) {
        if self.service_reports {
            self.link.push_urgent(Message::Service(report));
        }
    }

    /// Sends a session-level message to the relay.
    pub fn push(&self, msg: Message) {
        self.link.push_urgent(msg);
    }

    /// Sends `msg` and waits for the relay's answer (one at a time).
    pub async fn exchange(&self, msg: Message) -> Result<Reply, crate::renew::ExchangeError> {
        self.renewal.exchange(msg, |m| self.push(m)).await
    }

    /// Last measured ping round-trip time to the relay.
    pub fn rtt(&self) -> Option<Duration> {
        self.link.rtt()
    }

    /// Finishes the in-flight streams (refusing new ones), then ends the
    /// session so the agent reconnects.
    pub fn reconnect(&self) {
        self.wind_down(Ending::Reconnect);
    }

    fn wind_down(&self, why: Ending) {
        self.draining.store(true, Ordering::Relaxed);
        self.ending.send_if_modified(|e| {
            let first = e.is_none();
            if first {
                *e = Some(why);
            }
            first
        });
    }

    fn lock_streams(&self) -> MutexGuard<'_, HashMap<String, StreamEntry>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a stream out of the table and wakes drain waiters.
    fn remove_stream(&self, id: &str) -> Option<StreamEntry> {
        let entry = self.lock_streams().remove(id);
        self.stream_done.notify_waiters();
        entry
    }

    /// Ends a stream from this side: its upstream request is dropped.
    fn cancel_stream(&self, id: &str) -> bool {
        let Some(entry) = self.remove_stream(id) else { return false };
        entry.cancel.cancel();
        entry.window.close();
        true
    }

    /// Runs the session until the socket ends or `shutdown` fires. Every
    /// stream still running is cancelled on the way out: nothing produced
    /// for this session is ever sent on a later one.
    pub async fn run<S>(
        self: Arc<Self>,
        socket: WebSocketStream<S>,
        rx: mpsc::Receiver<Outbound>,
        shutdown: CancellationToken,
    ) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let link = self.link.clone();
        match link.run(socket, rx, self.clone(), self.drain(&shutdown)).await {
            Outcome::Until(end) => end,
            Outcome::Ended(end) => SessionEnd::Lost(end),
        }
    }

    /// Resolves when the session should end by choice: asked to (shutdown,
    /// reconnect, the relay's `goaway`), once the in-flight streams
    /// finished. The reader keeps serving those streams meanwhile; new
    /// requests are refused.
    async fn drain(&self, shutdown: &CancellationToken) -> SessionEnd {
        let mut ending = self.ending.subscribe();
        let why = tokio::select! {
            _ = shutdown.cancelled() => Ending::Shutdown,
            e = ending.wait_for(Option::is_some) => match e.ok().and_then(|e| *e) {
                Some(why) => why,
                None => Ending::Shutdown,
            },
        };
        self.wind_down(why);
        match why {
            // The relay closes the session at the end of its own drain.
            Ending::Goaway(retry) => {
                self.idle().await;
                SessionEnd::Goaway(retry)
            }
            Ending::Shutdown | Ending::Reconnect => {
                if tokio::time::timeout(DRAIN_DEADLINE, self.idle()).await.is_err() {
                    warn!(session = %self.id, in_flight = self.in_flight(), "the drain deadline passed; cancelling the {} requests still running", self.in_flight());
                }
                if why == Ending::Shutdown { SessionEnd::Shutdown } else { SessionEnd::Reconnect }
            }
        }
    }

    /// Resolves once no stream is in flight.
    async fn idle(&self) {
        loop {
            let notified = self.stream_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn start(&self, req: tunnel_proto::TunnelRequest) {
        let Some(me) = self.me.upgrade() else { return };
        self.upstream.counters.received.fetch_add(1, Ordering::Relaxed);
        let id = req.id.clone();
        let (body_tx, body_rx): (Option<InboxSender>, Option<Inbox>) = match req.body {
            RequestBody::Streamed => {
                let (tx, rx) = inbox(self.local.initial_window as usize, self.gauge.clone());
                (Some(tx), Some(rx))
            }
            RequestBody::Inline(_) => (None, None),
        };
        let cancel = CancellationToken::new();
        let window = Arc::new(SendWindow::new(self.encoder.peer().initial_window));
        let refused = {
            let mut streams = self.lock_streams();
            if self.draining.load(Ordering::Relaxed) {
                Some((503, "the agent is shutting down or reconnecting"))
            } else if streams.contains_key(id.as_str()) {
                Some((409, "duplicate stream id"))
            } else if streams.len() >= self.local.max_streams as usize {
                Some((429, "agent has too many requests in flight"))
            } else {
                streams.insert(
                    id.as_str().to_owned(),
                    StreamEntry { cancel: cancel.clone(), body: body_tx, window: window.clone() },
                );
                None
            }
        };
        if let Some((code, why)) = refused {
            self.link.push_urgent(Message::error(id.as_str(), code, why));
            return;
        }
        let chunk = self.local.chunk_towards(self.encoder.peer());
        let handle = StreamHandle {
            id,
            link: self.link.clone(),
            table: me,
            window,
            chunk,
            acks: self.acks,
            encoder: self.encoder.clone(),
        };
        let session = self.id.clone();
        // Boxed: the exchange's future is a few KiB, which the runtime
        // would otherwise copy into the task and again at each stage of it
        // (7 % of agentd's time per request, under load); a box moves as a
        // pointer.
        self.tasks.spawn(Box::pin(upstream::serve(
            session,
            handle,
            self.upstream.clone(),
            req,
            body_rx,
            cancel,
        )));
    }
}

impl StreamTable for Session {
    fn finish(&self, id: &StreamId) {
        if let Some(e) = self.remove_stream(id.as_str()) {
            e.window.close();
        }
    }

    fn is_live(&self, id: &StreamId) -> bool {
        self.lock_streams().contains_key(id.as_str())
    }
}

impl Handler for Session {
    fn read_limits(&self) -> Limits {
        self.local
    }

    fn on_message(&self, msg: Message) -> Result<(), Rejected> {
        match msg {
            Message::HttpRequest(m) => {
                let id = m.id.clone();
                match m.into_request(&self.local) {
                    Ok(req) => self.start(req),
                    Err(e) => self.link.push_urgent(Message::error(id, e.code(), e.to_string())),
                }
            }
            Message::Cancel(c) => {
                if self.cancel_stream(c.id.as_str()) {
                    debug!(session = %self.id, stream = %c.id, reason = %c.reason, "relay cancelled stream");
                }
            }
            Message::Error(e) => {
                self.cancel_stream(e.id.as_str());
            }
            Message::Authorized(a) => {
                // Applied even when none waits: the relay's word on expiry.
                self.renewal.authorized(&a);
                self.renewal.answer(Reply::Authorized(a));
            }
            Message::Credential(c) => {
                if !self.renewal.answer(Reply::Credential(c)) {
                    warn!(session = %self.id, "the relay sent a credential nobody asked for; ignored");
                }
            }
            Message::WindowUpdate(w) => {
                let window = self.lock_streams().get(w.id.as_str()).map(|e| e.window.clone());
                link::grant_credit(window, &w)?;
            }
            Message::Goaway(g) => {
                let retry = g
                    .retry_after_ms
                    .map_or(GOAWAY_DEFAULT_RETRY, Duration::from_millis)
                    .min(GOAWAY_MAX_RETRY);
                info!(session = %self.id, reason = %g.reason, ?retry, "the relay is draining ({}); finishing streams, then reconnecting", g.reason);
                self.wind_down(Ending::Goaway(retry));
            }
            other => return Err(other.not_allowed("a relay").into()),
        }
        Ok(())
    }

    /// A refused request for a new stream is answered for its id, so its web
    /// client gets a 4xx at once instead of waiting for a timeout.
    fn on_invalid(&self, text: &str, err: ProtocolError) -> Result<(), Rejected> {
        let peek = tunnel_proto::message::Peek::of(text);
        match peek.stream_id() {
            Some(id) if peek.kind.as_deref() == Some("http_request") && !self.is_live_id(id) => {
                self.link.push_urgent(Message::error(id, err.code(), err.to_string()));
                Ok(())
            }
            Some(id) => Err(Rejected::on(id, err)),
            None => Err(err.into()),
        }
    }

    fn on_data(&self, f: DataFrame) -> Result<(), Rejected> {
        let mut streams = self.lock_streams();
        let Some(entry) = streams.get_mut(f.id.as_str()) else {
            return Ok(()); // in flight when the stream ended
        };
        let Some(body) = &entry.body else {
            return Err(Rejected::on(
                &f.id,
                ProtocolError::new(
                    Violation::StreamState,
                    format!("body bytes for {} which has none", f.id),
                ),
            ));
        };
        match body.push(f.payload) {
            Ok(()) | Err(PushError::Closed) => {}
            Err(e @ PushError::Overflow { .. }) => return Err(Rejected::on(&f.id, e.into())),
        }
        if f.end {
            body.finish();
            entry.body = None;
        }
        Ok(())
    }

    fn end_stream(&self, id: &str, err: &ProtocolError) {
        if self.cancel_stream(id) {
            self.link
                .push_urgent(Message::cancel(id, format!("relay sent an invalid frame: {err}")));
        }
    }

    fn on_peer_error(&self, e: &tunnel_proto::ErrorMsg) -> bool {
        self.renewal.answer(Reply::Refused { code: e.code, message: e.error.clone() })
    }

    fn on_end(&self, _end: &End) {
        self.renewal.abandon();
        let streams: Vec<StreamEntry> = self.lock_streams().drain().map(|(_, e)| e).collect();
        self.stream_done.notify_waiters();
        for e in streams {
            e.cancel.cancel();
            e.window.close();
            if let Some(b) = e.body {
                b.abort(StreamAbort::new(502, "relay session ended"));
            }
        }
    }
}

impl Session {
    fn is_live_id(&self, id: &str) -> bool {
        self.lock_streams().contains_key(id)
    }
}
