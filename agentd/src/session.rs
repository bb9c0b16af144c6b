//! The agent's side of one WebSocket session with the relay.
//!
//! The reader dispatches each frame without waiting on any stream: request
//! body bytes go into the stream's bounded inbox (the relay respects the
//! window this agent announced), credit goes to the stream's send window,
//! `cancel` fires the stream's cancellation token. Each request runs in its
//! own task ([`crate::forward`]); the writer batches their frames onto the
//! socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use tunnel_proto::budget::{Flood, PeerBudget};
use tunnel_proto::error::Rejected;
use tunnel_proto::flow::{
    BufferGauge, ControlQueue, Inbox, InboxSender, PushError, SendWindow, StreamAbort, inbox,
};
use tunnel_proto::liveness::{Beat, Heartbeat};
use tunnel_proto::{Limits, Message, ProtocolError, RequestBody, StreamId, Violation, frame};

use crate::forward::{self, Upstream};

const OUT_QUEUE: usize = 64;
const WRITE_BATCH: usize = 32;

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The agent is shutting down.
    Shutdown,
    /// The socket closed or failed; reconnect.
    Lost(String),
    /// The relay is draining: its streams are done; reconnect after this
    /// long without counting it as a failure.
    Goaway(Duration),
}

/// How long in-flight streams get to finish when agentd shuts down.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Reconnect delay after a `goaway` without a hint.
const GOAWAY_DEFAULT_RETRY: Duration = Duration::from_secs(1);

struct StreamEntry {
    cancel: CancellationToken,
    body: Option<InboxSender>,
    window: Arc<SendWindow>,
}

/// One live session.
pub struct Session {
    pub id: String,
    /// The relay's limits from `welcome`.
    peer: Limits,
    local: Limits,
    out: mpsc::Sender<Ws>,
    urgent: ControlQueue,
    streams: Mutex<HashMap<String, StreamEntry>>,
    closed: CancellationToken,
    gauge: Arc<BufferGauge>,
    heartbeat: Mutex<Heartbeat>,
    /// Pings and refused frames the relay may still send.
    budget: Mutex<PeerBudget>,
    /// The close frame the writer sends when the agent ends the session
    /// because of something the relay did.
    close_frame: Mutex<Option<CloseFrame>>,
    liveness: Liveness,
    /// Woken whenever a stream leaves the table.
    stream_done: Notify,
    /// Set on shutdown or `goaway`: new requests are refused.
    draining: std::sync::atomic::AtomicBool,
    /// The relay's `goaway`, once it came.
    goaway: Mutex<Option<Duration>>,
    goaway_notify: Notify,
    /// The relay listed `ack`: each accepted request is acknowledged.
    acks: bool,
}

/// How often to ping the relay, and how many silent intervals end the session.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub ping_interval: Duration,
    pub max_missed: u32,
}

/// The session is gone; the frame was not sent.
#[derive(Debug, thiserror::Error)]
#[error("relay session closed")]
pub struct SessionClosed;

impl Session {
    pub fn new(
        id: String,
        peer: Limits,
        local: Limits,
        gauge: Arc<BufferGauge>,
        liveness: Liveness,
        acks: bool,
    ) -> (Arc<Self>, mpsc::Receiver<Ws>) {
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        let s = Arc::new(Self {
            id,
            peer,
            local,
            out,
            urgent: ControlQueue::new(local.max_streams as usize),
            streams: Mutex::new(HashMap::new()),
            closed: CancellationToken::new(),
            gauge,
            heartbeat: Mutex::new(Heartbeat::new(liveness.max_missed, Instant::now())),
            budget: Mutex::new(PeerBudget::new(Instant::now())),
            close_frame: Mutex::new(None),
            liveness,
            stream_done: Notify::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
            goaway: Mutex::new(None),
            goaway_notify: Notify::new(),
            acks,
        });
        (s, rx)
    }

    /// Resolves when the session should end by choice: on shutdown once the
    /// in-flight streams finished (or the drain deadline passed), on a
    /// relay's `goaway` once they finished. The reader keeps serving those
    /// streams meanwhile; new requests are refused.
    async fn drain(&self, shutdown: &CancellationToken) -> SessionEnd {
        tokio::select! {
            _ = shutdown.cancelled() => {
                self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                let idle = self.idle();
                if tokio::time::timeout(DRAIN_DEADLINE, idle).await.is_err() {
                    warn!(session = %self.id, in_flight = self.in_flight(), "drain deadline passed; cancelling the rest");
                }
                SessionEnd::Shutdown
            }
            retry = self.goaway_received() => {
                self.idle().await;
                SessionEnd::Goaway(retry)
            }
        }
    }

    async fn goaway_received(&self) -> Duration {
        loop {
            let notified = self.goaway_notify.notified();
            if let Some(retry) = *self.goaway.lock().unwrap_or_else(PoisonError::into_inner) {
                return retry;
            }
            notified.await;
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

    /// Pings the relay every interval; ends the session when it stays
    /// silent, which also catches a half-open TCP connection.
    async fn heartbeat(&self) -> SessionEnd {
        let mut tick = tokio::time::interval(self.liveness.ping_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let beat = self.lock_heartbeat().tick(Instant::now());
            match beat {
                Beat::Ping(ping) => self.push_urgent(ping),
                Beat::Dead { silent_for } => {
                    return SessionEnd::Lost(format!(
                        "relay stopped answering pings (silent for {silent_for:.1?})"
                    ));
                }
            }
        }
    }

    fn lock_heartbeat(&self) -> MutexGuard<'_, Heartbeat> {
        self.heartbeat.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Last measured ping round-trip time to the relay.
    pub fn rtt(&self) -> Option<Duration> {
        self.lock_heartbeat().rtt()
    }

    /// Takes a stream out of the table and wakes drain waiters.
    fn remove_stream(&self, id: &str) -> Option<StreamEntry> {
        let entry = self.lock_streams().remove(id);
        self.stream_done.notify_waiters();
        entry
    }

    fn lock_streams(&self) -> MutexGuard<'_, HashMap<String, StreamEntry>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn in_flight(&self) -> usize {
        self.lock_streams().len()
    }

    /// Largest body chunk this agent sends.
    pub fn chunk_size(&self) -> usize {
        self.local.chunk_towards(&self.peer)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Queues a frame, waiting while the writer is behind.
    pub async fn send(&self, frame: Ws) -> Result<(), SessionClosed> {
        tokio::select! {
            biased;
            _ = self.closed.cancelled() => Err(SessionClosed),
            r = self.out.send(frame) => r.map_err(|_| SessionClosed),
        }
    }

    pub async fn send_msg(&self, msg: &Message) -> Result<(), SessionClosed> {
        self.send(Ws::text(msg.encode())).await
    }

    /// Acknowledges request `id` to a relay that listed `ack`.
    pub fn ack(&self, id: &StreamId) {
        if self.acks && self.lock_streams().contains_key(id.as_str()) {
            self.push_urgent(Message::ack(id.as_str()));
        }
    }

    fn push_urgent(&self, msg: Message) {
        if self.urgent.push(msg).is_err() {
            warn!(session = %self.id, "control queue overflow; closing the session");
            self.close_with(CloseCode::Policy, "relay is not reading the agent's messages");
        }
    }

    /// Ends the session, telling the relay why in the close frame.
    fn close_with(&self, code: CloseCode, reason: &'static str) {
        self.close_frame
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(CloseFrame { code, reason: reason.into() });
        self.closed.cancel();
    }

    fn lock_budget(&self) -> MutexGuard<'_, PeerBudget> {
        self.budget.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns request-body credit to the relay.
    pub fn grant(&self, id: &StreamId, credit: u32) {
        if !self.is_closed() {
            self.push_urgent(Message::WindowUpdate(tunnel_proto::WindowUpdate {
                id: id.as_str().to_owned(),
                credit,
            }));
        }
    }

    /// The stream's task is done: forget it. With `cancel_reason`, also tell
    /// the relay the stream was abandoned.
    pub fn finish(&self, id: &StreamId, cancel_reason: Option<&str>) {
        let entry = self.remove_stream(id.as_str());
        if let Some(e) = entry {
            e.window.close();
            if let Some(reason) = cancel_reason
                && !self.is_closed()
            {
                self.push_urgent(Message::cancel(id.as_str(), reason));
            }
        }
    }

    /// Runs the session until the socket ends or `shutdown` fires. Every
    /// stream still running is cancelled on the way out: nothing produced
    /// for this session is ever sent on a later one.
    pub async fn run<S>(
        self: Arc<Self>,
        socket: WebSocketStream<S>,
        rx: mpsc::Receiver<Ws>,
        upstream: Arc<Upstream>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, stream) = socket.split();
        // Aborted if this future is dropped, so the socket never outlives it.
        let writer = AbortOnDropHandle::new(tokio::spawn(self.clone().write_loop(sink, rx)));
        let end = tokio::select! {
            end = self.read_loop(stream, &upstream, &tasks) => end,
            end = self.heartbeat() => end,
            end = self.drain(&shutdown) => end,
        };
        self.closed.cancel();
        let streams: Vec<StreamEntry> = self.lock_streams().drain().map(|(_, e)| e).collect();
        for e in streams {
            e.cancel.cancel();
            e.window.close();
            if let Some(b) = e.body {
                b.abort(StreamAbort::new(502, "relay session ended"));
            }
        }
        let _ = writer.await;
        end
    }

    async fn write_loop<S>(
        self: Arc<Self>,
        mut sink: SplitSink<WebSocketStream<S>, Ws>,
        mut rx: mpsc::Receiver<Ws>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let result: Result<(), tokio_tungstenite::tungstenite::Error> = async {
            loop {
                tokio::select! {
                    biased;
                    _ = self.closed.cancelled() => break,
                    _ = self.urgent.pushed() => {}
                    frame = rx.recv() => match frame {
                        Some(f) => sink.feed(f).await?,
                        None => break,
                    },
                }
                loop {
                    for msg in self.urgent.take() {
                        sink.feed(Ws::text(msg.encode())).await?;
                    }
                    let mut fed = 0;
                    while fed < WRITE_BATCH {
                        let Ok(f) = rx.try_recv() else { break };
                        sink.feed(f).await?;
                        fed += 1;
                    }
                    if fed < WRITE_BATCH {
                        break;
                    }
                }
                sink.flush().await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            debug!(session = %self.id, error = %e, "relay socket write failed");
            self.closed.cancel();
            return;
        }
        let frame = self.close_frame.lock().unwrap_or_else(PoisonError::into_inner).take();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            sink.send(Ws::Close(frame)).await?;
            sink.close().await
        })
        .await;
    }

    async fn read_loop<S>(
        self: &Arc<Self>,
        mut stream: SplitStream<WebSocketStream<S>>,
        upstream: &Arc<Upstream>,
        tasks: &TaskTracker,
    ) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            let frame = tokio::select! {
                biased;
                _ = self.closed.cancelled() => return SessionEnd::Lost("session closed".into()),
                f = stream.next() => f,
            };
            let frame = match frame {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    use tokio_tungstenite::tungstenite::Error;
                    match &e {
                        Error::Utf8(_) => self.close_with(
                            CloseCode::Invalid,
                            "relay sent a text frame that is not UTF-8",
                        ),
                        Error::Capacity(_) => self.close_with(
                            CloseCode::Size,
                            "relay sent a message above the size limit",
                        ),
                        Error::Protocol(_) => self
                            .close_with(CloseCode::Protocol, "relay broke the WebSocket protocol"),
                        _ => {}
                    }
                    return SessionEnd::Lost(format!("socket error: {e}"));
                }
                None => return SessionEnd::Lost("relay closed the connection".into()),
            };
            let now = Instant::now();
            self.lock_heartbeat().heard(now);
            let outcome = match frame {
                Ws::Text(text) => self.on_text(&text, now, upstream, tasks),
                Ws::Binary(data) => self.on_binary(&data),
                Ws::Close(frame) => {
                    let why = frame
                        .map(|f| format!("{} ({})", f.reason, u16::from(f.code)))
                        .unwrap_or_default();
                    return SessionEnd::Lost(format!("relay closed the session: {why}"));
                }
                // WebSocket-level pings cost the same as protocol pings.
                Ws::Ping(_) => self.lock_budget().ping(now).map_err(Rejected::from),
                Ws::Pong(_) | Ws::Frame(_) => Ok(()),
            };
            let flood = match outcome {
                Ok(()) => continue,
                Err(Rejected::Flood(flood)) => flood,
                Err(Rejected::Frame { err, stream }) => match self.lock_budget().refusal(now) {
                    Err(flood) => flood,
                    Ok(()) => {
                        self.refuse(err, stream);
                        continue;
                    }
                },
            };
            self.close_with(
                CloseCode::Policy,
                match flood {
                    Flood::Pings => "relay sent too many pings",
                    Flood::Refusals => "relay sent too many invalid frames",
                },
            );
            return SessionEnd::Lost(format!("relay flooded the session: {flood}"));
        }
    }

    /// Answers a refused frame with `error`; a live stream it named ends
    /// (its upstream request is dropped) and the relay is told with
    /// `cancel`.
    fn refuse(&self, err: ProtocolError, stream: Option<String>) {
        warn!(session = %self.id, error = %err, "refused a frame from the relay");
        if let Some(id) = stream
            && err.kind != Violation::UnknownType
            && let Some(entry) = self.remove_stream(&id)
        {
            entry.cancel.cancel();
            entry.window.close();
            self.push_urgent(Message::cancel(id, format!("relay sent an invalid frame: {err}")));
        }
        // Through the urgent list: the reader never waits on the writer, or
        // two busy peers could each wait on the other.
        self.push_urgent(Message::violation(None, &err));
    }

    fn on_text(
        self: &Arc<Self>,
        text: &str,
        now: Instant,
        upstream: &Arc<Upstream>,
        tasks: &TaskTracker,
    ) -> Result<(), Rejected> {
        let msg = match Message::decode(text, &self.local) {
            Ok(m) => m,
            Err(e) => {
                // A refused request is answered for its stream, so its web
                // client gets a 4xx at once instead of waiting for a timeout.
                let peek = tunnel_proto::message::Peek::of(text);
                let id = peek.stream_id();
                if peek.kind.as_deref() == Some("http_request")
                    && let Some(id) = id
                    && !self.lock_streams().contains_key(id)
                {
                    self.push_urgent(Message::error(id, e.code(), e.to_string()));
                    return Ok(());
                }
                return Err(match id {
                    Some(id) => Rejected::on(id, e),
                    None => e.into(),
                });
            }
        };
        match msg {
            Message::HttpRequest(m) => {
                let id = m.id.clone();
                match m.into_request(&self.local) {
                    Ok(req) => self.start(req, upstream, tasks),
                    Err(e) => self.push_urgent(Message::error(id, e.code(), e.to_string())),
                }
            }
            Message::Cancel(c) => {
                let entry = self.remove_stream(c.id.as_str());
                if let Some(e) = entry {
                    debug!(session = %self.id, stream = %c.id, reason = %c.reason, "relay cancelled stream");
                    e.cancel.cancel();
                    e.window.close();
                }
            }
            Message::Error(e) => {
                if e.id.is_empty() {
                    // A report that one of our frames was refused: it costs
                    // the peer's refusal budget, so it cannot flood the log.
                    self.lock_budget().refusal(now)?;
                    warn!(session = %self.id, code = e.code, error = %e.error, "relay reported an error");
                } else if let Some(entry) = self.remove_stream(e.id.as_str()) {
                    entry.cancel.cancel();
                    entry.window.close();
                }
            }
            Message::WindowUpdate(w) => {
                let window = self.lock_streams().get(w.id.as_str()).map(|e| e.window.clone());
                if let Some(window) = window
                    && let Err(e) = window.grant(w.credit)
                {
                    if let Some(entry) = self.remove_stream(w.id.as_str()) {
                        entry.cancel.cancel();
                        entry.window.close();
                    }
                    self.push_urgent(Message::cancel(w.id.as_str(), "invalid flow-control credit"));
                    return Err(e.into());
                }
            }
            Message::Ping(p) => {
                self.lock_budget().ping(now)?;
                self.push_urgent(Message::pong(&p));
            }
            Message::Pong(p) => {
                self.lock_heartbeat().pong(&p.id, Instant::now());
            }
            Message::Goaway(g) => {
                let retry = g.retry_after_ms.map_or(GOAWAY_DEFAULT_RETRY, Duration::from_millis);
                info!(session = %self.id, reason = %g.reason, ?retry, "relay is draining; finishing streams, then reconnecting");
                self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                *self.goaway.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(retry.min(Duration::from_secs(300)));
                self.goaway_notify.notify_one();
            }
            Message::Hello(_)
            | Message::Welcome(_)
            | Message::HttpResponse(_)
            | Message::ResponseHead(_)
            | Message::Ack(_) => {
                return Err(ProtocolError::new(
                    Violation::StreamState,
                    "message not allowed from a relay",
                )
                .into());
            }
        }
        Ok(())
    }

    fn start(
        self: &Arc<Self>,
        req: tunnel_proto::TunnelRequest,
        upstream: &Arc<Upstream>,
        tasks: &TaskTracker,
    ) {
        let id = req.id.clone();
        let (body_tx, body_rx): (Option<InboxSender>, Option<Inbox>) = match req.body {
            RequestBody::Streamed => {
                let (tx, rx) = inbox(self.local.initial_window as usize, self.gauge.clone());
                (Some(tx), Some(rx))
            }
            RequestBody::Inline(_) => (None, None),
        };
        let cancel = CancellationToken::new();
        let window = Arc::new(SendWindow::new(self.peer.initial_window));
        let refused = {
            let mut streams = self.lock_streams();
            if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
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
            self.push_urgent(Message::error(id.as_str(), code, why));
            return;
        }
        tasks.spawn(forward::serve(self.clone(), upstream.clone(), req, body_rx, window, cancel));
    }

    fn on_binary(&self, data: &Bytes) -> Result<(), Rejected> {
        let f = frame::decode(data, self.local.max_chunk_bytes as usize).map_err(|e| {
            match frame::peek_id(data) {
                Some(id) => Rejected::on(id, e),
                None => e.into(),
            }
        })?;
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
            Err(e @ PushError::Overflow { .. }) => {
                if let Some(entry) = streams.remove(f.id.as_str()) {
                    entry.cancel.cancel();
                    entry.window.close();
                }
                drop(streams);
                self.stream_done.notify_waiters();
                self.push_urgent(Message::cancel(f.id.as_str(), "flow-control window exceeded"));
                return Err(ProtocolError::from(e).into());
            }
        }
        if f.end {
            body.finish();
            entry.body = None;
        }
        Ok(())
    }
}
