//! One agent's WebSocket session at the relay.
//!
//! A session owns the socket: a reader task that dispatches every incoming
//! frame without ever waiting on a stream (flow control guarantees the
//! per-stream inbox has room), and a writer task that batches outgoing frames
//! (feed, then flush when the queue is empty). Streams are opened by web
//! requests ([`Session::open`]) and live in the session's stream table until
//! their response ends, the web client goes away, or the session closes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use tunnel_proto::budget::{Flood, PeerBudget};
use tunnel_proto::error::Rejected;
use tunnel_proto::flow::{
    BufferGauge, ControlQueue, Inbox, InboxSender, PushError, SendWindow, StreamAbort, inbox,
};
use tunnel_proto::liveness::{Beat, Heartbeat};
use tunnel_proto::{Limits, Message, ProtocolError, StreamId, Violation, frame};

/// Frames queued for the writer. Small: a full queue makes request senders
/// wait (backpressure), while cancels and credit bypass it.
const OUT_QUEUE: usize = 64;
/// Frames the writer feeds before it looks at urgent control frames again.
const WRITE_BATCH: usize = 32;

pub type AgentSocket = WebSocketStream<TokioIo<Upgraded>>;

/// A frame queued for the writer, with the stream it belongs to. The writer
/// drops frames of streams that ended while they waited, so a `cancel` (which
/// bypasses the queue) can never reach the agent before its `http_request`.
pub struct Outbound {
    stream: Option<StreamId>,
    frame: Ws,
    /// A frame that must follow `frame` in the same write (a small request
    /// body behind its request).
    then: Option<Ws>,
}

/// Why a session ended, as seen by its streams and in the close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer session for the same user took over.
    Replaced,
    /// The agent closed the socket or it failed.
    Disconnected,
    /// The relay is shutting down.
    Shutdown,
    /// The agent broke the protocol beyond repair.
    ProtocolError,
    /// Nothing arrived from the agent for too many ping intervals.
    Unresponsive,
    /// A text frame that is not UTF-8.
    InvalidData,
    /// A message above the WebSocket size limit.
    TooBig,
    /// The agent spent its budget of pings or refused frames.
    Flooded(Flood),
    /// The agent stopped reading: replies to it piled up beyond the bound.
    NotReading,
}

impl CloseReason {
    fn text(self) -> &'static str {
        match self {
            CloseReason::Replaced => "agent session replaced by a newer connection",
            CloseReason::Disconnected => "agent disconnected",
            CloseReason::Shutdown => "relay shutting down",
            CloseReason::ProtocolError => "agent violated the tunnel protocol",
            CloseReason::Unresponsive => "agent stopped answering pings",
            CloseReason::InvalidData => "agent sent a text frame that is not UTF-8",
            CloseReason::TooBig => "agent sent a message above the size limit",
            CloseReason::Flooded(Flood::Pings) => "agent sent too many pings",
            CloseReason::Flooded(Flood::Refusals) => "agent sent too many invalid frames",
            CloseReason::NotReading => "agent is not reading the relay's messages",
        }
    }

    fn close_code(self) -> CloseCode {
        match self {
            CloseReason::Replaced => CloseCode::Library(4000),
            CloseReason::Disconnected => CloseCode::Normal,
            CloseReason::Shutdown => CloseCode::Away,
            CloseReason::ProtocolError => CloseCode::Protocol,
            CloseReason::Unresponsive => CloseCode::Library(4001),
            CloseReason::InvalidData => CloseCode::Invalid,
            CloseReason::TooBig => CloseCode::Size,
            CloseReason::Flooded(_) | CloseReason::NotReading => CloseCode::Policy,
        }
    }

    /// Why a socket read failed, as a close reason (RFC 6455 7.4.1).
    fn of_read_error(e: &tokio_tungstenite::tungstenite::Error) -> Self {
        use tokio_tungstenite::tungstenite::Error;
        match e {
            Error::Utf8(_) => CloseReason::InvalidData,
            Error::Capacity(_) => CloseReason::TooBig,
            Error::Protocol(_) => CloseReason::ProtocolError,
            _ => CloseReason::Disconnected,
        }
    }
}

/// What the agent answered, once its head arrived.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// A whole body (original `http_response`), or `None` when the body
    /// streams into the stream's inbox.
    pub body: Option<Bytes>,
}

/// A stream opened by a web request.
pub struct OpenStream {
    pub id: StreamId,
    pub head: oneshot::Receiver<Result<Head, StreamAbort>>,
    /// Response body bytes (streamed responses only).
    pub inbox: Inbox,
    /// Credit for request body bytes towards the agent.
    pub window: Arc<SendWindow>,
    /// Cancels the stream at the agent unless it completed.
    pub guard: StreamGuard,
    /// Resolves when the agent acknowledges the request (or the stream
    /// ends); `None` when the agent did not list the `ack` capability.
    pub ack: Option<oneshot::Receiver<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("agent has {0} streams in flight, its limit")]
    TooManyStreams(usize),
    #[error("agent session is closing")]
    Closed,
}

/// The session went away while a frame was being queued.
#[derive(Debug, thiserror::Error)]
#[error("agent session closed")]
pub struct SessionClosed;

struct Slot {
    head: Option<oneshot::Sender<Result<Head, StreamAbort>>>,
    ack: Option<oneshot::Sender<()>>,
    body: InboxSender,
    window: Arc<SendWindow>,
}

pub struct Session {
    pub id: String,
    pub user: String,
    /// 0 for an original agent, else the negotiated version.
    pub version: u32,
    pub connected_at: SystemTime,
    pub agent: String,
    /// What the agent announced in `hello` (defaults for original agents).
    peer: Limits,
    /// What this relay announced in `welcome`.
    local: Limits,
    max_streams: usize,
    out: mpsc::Sender<Outbound>,
    urgent: ControlQueue,
    streams: Mutex<HashMap<String, Slot>>,
    closed: CancellationToken,
    close_reason: Mutex<Option<CloseReason>>,
    next_id: AtomicU64,
    gauge: Arc<BufferGauge>,
    heartbeat: Mutex<Heartbeat>,
    /// Pings and refused frames the agent may still send.
    budget: Mutex<PeerBudget>,
    ping_interval: Duration,
    goaway: bool,
    acks: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("user", &self.user)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Parameters fixed when the session is accepted.
pub struct SessionParams {
    pub user: String,
    pub version: u32,
    pub agent: String,
    pub peer: Limits,
    pub local: Limits,
    pub gauge: Arc<BufferGauge>,
    /// Ping every this long; give up after `max_missed` silent intervals.
    pub ping_interval: Duration,
    pub max_missed: u32,
    /// The agent listed the `goaway` capability.
    pub goaway: bool,
    /// The agent listed the `ack` capability.
    pub acks: bool,
}

impl Session {
    /// Creates the session and the receiver its writer task drains.
    pub fn new(p: SessionParams) -> (Arc<Self>, mpsc::Receiver<Outbound>) {
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        let max_streams = p.local.max_streams.min(p.peer.max_streams) as usize;
        let session = Arc::new(Self {
            id: new_session_id(),
            user: p.user,
            version: p.version,
            connected_at: SystemTime::now(),
            agent: p.agent,
            peer: p.peer,
            local: p.local,
            max_streams,
            out,
            urgent: ControlQueue::new(max_streams),
            streams: Mutex::new(HashMap::new()),
            closed: CancellationToken::new(),
            close_reason: Mutex::new(None),
            next_id: AtomicU64::new(1),
            gauge: p.gauge,
            heartbeat: Mutex::new(Heartbeat::new(p.max_missed, Instant::now())),
            budget: Mutex::new(PeerBudget::new(Instant::now())),
            ping_interval: p.ping_interval,
            goaway: p.goaway,
            acks: p.acks,
        });
        (session, rx)
    }

    pub fn is_legacy(&self) -> bool {
        self.version == 0
    }

    /// Largest body chunk this relay sends to the agent.
    pub fn chunk_size(&self) -> usize {
        self.local.chunk_towards(&self.peer)
    }

    pub fn in_flight(&self) -> usize {
        self.lock_streams().len()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves once the session has closed.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    fn lock_streams(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new stream. The caller sends its `http_request`.
    pub fn open(self: &Arc<Self>) -> Result<OpenStream, OpenError> {
        if self.is_closed() {
            return Err(OpenError::Closed);
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = StreamId::new(format!("req_{n:x}")).expect("req_ + hex digits is a valid id");
        let (head_tx, head_rx) = oneshot::channel();
        let (body_tx, body_rx) = inbox(self.local.initial_window as usize, self.gauge.clone());
        let window = Arc::new(SendWindow::new(self.peer.initial_window));
        let (ack_tx, ack_rx) = if self.acks {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        {
            let mut streams = self.lock_streams();
            if streams.len() >= self.max_streams {
                return Err(OpenError::TooManyStreams(self.max_streams));
            }
            streams.insert(
                id.as_str().to_owned(),
                Slot { head: Some(head_tx), ack: ack_tx, body: body_tx, window: window.clone() },
            );
        }
        // The session may have closed between the check and the insert;
        // its sweep could have missed this slot.
        if self.is_closed() {
            self.lock_streams().remove(id.as_str());
            return Err(OpenError::Closed);
        }
        let guard = StreamGuard { session: self.clone(), id: id.clone(), done: false };
        Ok(OpenStream { id, head: head_rx, inbox: body_rx, window, guard, ack: ack_rx })
    }

    /// Queues a frame of stream `id`, waiting while the writer is behind.
    pub async fn send(&self, id: &StreamId, frame: Ws) -> Result<(), SessionClosed> {
        self.send_then(id, frame, None).await
    }

    /// Queues `frame` of stream `id` with `then` right behind it: both go
    /// out in the same socket write unless the writer's buffer fills between.
    pub async fn send_then(
        &self,
        id: &StreamId,
        frame: Ws,
        then: Option<Ws>,
    ) -> Result<(), SessionClosed> {
        let out = Outbound { stream: Some(id.clone()), frame, then };
        tokio::select! {
            biased;
            _ = self.closed.cancelled() => Err(SessionClosed),
            r = self.out.send(out) => r.map_err(|_| SessionClosed),
        }
    }

    /// The limits the agent announced in `hello` (defaults for original agents).
    pub fn peer_limits(&self) -> &Limits {
        &self.peer
    }

    fn push_urgent(&self, msg: Message) {
        if self.urgent.push(msg).is_err() {
            warn!(session = %self.id, "control queue overflow; closing the session");
            self.close(CloseReason::NotReading);
        }
    }

    /// Tells the agent the relay is draining: finish in-flight streams, then
    /// reconnect after `retry`. Agents that did not list `goaway` are simply
    /// closed at the end of the drain.
    pub fn goaway(&self, reason: &str, retry: Duration) {
        if self.goaway && !self.is_closed() {
            self.push_urgent(Message::Goaway(tunnel_proto::Goaway {
                reason: reason.to_owned(),
                retry_after_ms: Some(retry.as_millis() as u64),
            }));
        }
    }

    /// Returns `credit` bytes of response-body window to the agent.
    pub fn grant(&self, id: &StreamId, credit: u32) {
        if self.is_legacy() || self.is_closed() {
            return;
        }
        self.push_urgent(Message::WindowUpdate(tunnel_proto::WindowUpdate {
            id: id.as_str().to_owned(),
            credit,
        }));
    }

    /// Forgets a stream; if it had not completed, tells the agent to stop.
    fn release(&self, id: &StreamId, completed: bool, reason: &str) {
        let slot = self.lock_streams().remove(id.as_str());
        if let Some(slot) = &slot {
            slot.window.close();
        }
        if !completed && slot.is_some() && !self.is_legacy() && !self.is_closed() {
            debug!(session = %self.id, stream = %id, reason, "cancelling stream");
            self.push_urgent(Message::cancel(id.as_str(), reason));
        }
    }

    /// Closes the session: streams end with an error, the writer sends a
    /// close frame and stops.
    pub fn close(&self, reason: CloseReason) {
        {
            let mut r = self.close_reason.lock().unwrap_or_else(PoisonError::into_inner);
            if r.is_some() {
                return;
            }
            *r = Some(reason);
        }
        self.closed.cancel();
        let streams: Vec<Slot> = self.lock_streams().drain().map(|(_, s)| s).collect();
        let abort = StreamAbort::new(502, reason.text());
        for mut slot in streams {
            slot.window.close();
            if let Some(head) = slot.head.take() {
                let _ = head.send(Err(abort.clone()));
            }
            slot.body.abort(abort.clone());
        }
    }

    fn close_reason(&self) -> CloseReason {
        self.close_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unwrap_or(CloseReason::Disconnected)
    }

    /// Runs the session until the socket closes or [`Session::close`].
    pub async fn run(self: Arc<Self>, socket: AgentSocket, rx: mpsc::Receiver<Outbound>) {
        let (sink, stream) = socket.split();
        // Aborted if this future is dropped, so the socket never outlives it.
        let writer = AbortOnDropHandle::new(tokio::spawn(self.clone().write_loop(sink, rx)));
        let reason = tokio::select! {
            r = self.read_loop(stream) => r,
            r = self.heartbeat() => r,
        };
        self.close(reason);
        let _ = writer.await;
        info!(session = %self.id, reason = self.close_reason().text(), "agent session ended");
    }

    async fn write_loop(
        self: Arc<Self>,
        mut sink: futures_util::stream::SplitSink<AgentSocket, Ws>,
        mut rx: mpsc::Receiver<Outbound>,
    ) {
        let pump = async {
            loop {
                tokio::select! {
                    biased;
                    _ = self.urgent.pushed() => {}
                    out = rx.recv() => match out {
                        Some(out) => self.feed(&mut sink, out).await?,
                        None => break,
                    },
                }
                loop {
                    for msg in self.urgent.take() {
                        sink.feed(Ws::text(msg.encode())).await?;
                    }
                    let mut fed = 0;
                    while fed < WRITE_BATCH {
                        let Ok(out) = rx.try_recv() else { break };
                        self.feed(&mut sink, out).await?;
                        fed += 1;
                    }
                    if fed < WRITE_BATCH {
                        break;
                    }
                }
                sink.flush().await?;
            }
            Ok::<(), tokio_tungstenite::tungstenite::Error>(())
        };
        // A write stuck on a socket nobody reads must not keep a closed
        // session alive: closing interrupts it.
        let result = tokio::select! {
            r = pump => r,
            _ = self.closed.cancelled() => Ok(()),
        };
        if let Err(e) = result {
            debug!(session = %self.id, error = %e, "agent socket write failed");
            self.close(CloseReason::Disconnected);
            return;
        }
        let reason = self.close_reason();
        let frame = CloseFrame { code: reason.close_code(), reason: reason.text().into() };
        let close = async {
            sink.send(Ws::Close(Some(frame))).await?;
            sink.close().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }

    /// Writes one queued frame unless its stream ended meanwhile.
    async fn feed(
        &self,
        sink: &mut futures_util::stream::SplitSink<AgentSocket, Ws>,
        out: Outbound,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        if let Some(id) = &out.stream
            && !self.lock_streams().contains_key(id.as_str())
        {
            return Ok(());
        }
        sink.feed(out.frame).await?;
        match out.then {
            Some(then) => sink.feed(then).await,
            None => Ok(()),
        }
    }

    /// Pings the agent every interval; ends the session when it stays silent.
    async fn heartbeat(&self) -> CloseReason {
        let mut tick = tokio::time::interval(self.ping_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let beat = self.lock_heartbeat().tick(Instant::now());
            match beat {
                Beat::Ping(ping) => self.push_urgent(ping),
                Beat::Dead { silent_for } => {
                    warn!(session = %self.id, ?silent_for, "agent stopped answering pings");
                    return CloseReason::Unresponsive;
                }
            }
        }
    }

    fn lock_heartbeat(&self) -> MutexGuard<'_, Heartbeat> {
        self.heartbeat.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Last measured ping round-trip time to the agent.
    pub fn rtt(&self) -> Option<Duration> {
        self.lock_heartbeat().rtt()
    }

    async fn read_loop(
        &self,
        mut stream: futures_util::stream::SplitStream<AgentSocket>,
    ) -> CloseReason {
        loop {
            let frame = tokio::select! {
                biased;
                _ = self.closed.cancelled() => return self.close_reason(),
                f = stream.next() => f,
            };
            let frame = match frame {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    debug!(session = %self.id, error = %e, "agent socket read failed");
                    return CloseReason::of_read_error(&e);
                }
                None => return CloseReason::Disconnected,
            };
            let now = Instant::now();
            self.lock_heartbeat().heard(now);
            let outcome = match frame {
                Ws::Text(text) => self.on_text(&text, now),
                Ws::Binary(data) => self.on_binary(&data),
                Ws::Close(_) => return CloseReason::Disconnected,
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
            warn!(session = %self.id, %flood, "closing the session");
            return CloseReason::Flooded(flood);
        }
    }

    /// Answers a refused frame with `error`. A refused frame that names a
    /// live stream ends that stream, so its web client is not left waiting
    /// or fed what followed; an unknown type is a newer peer's extension,
    /// not a broken stream.
    fn refuse(&self, err: ProtocolError, stream: Option<String>) {
        warn!(session = %self.id, error = %err, "refused a frame from the agent");
        if let Some(id) = stream
            && err.kind != Violation::UnknownType
        {
            self.abort_stream(
                &id,
                StreamAbort::new(502, format!("agent sent an invalid frame: {err}")),
            );
        }
        // Through the urgent list: the reader never waits on the writer, or
        // two busy peers could each wait on the other.
        self.push_urgent(Message::violation(None, &err));
    }

    fn lock_budget(&self) -> MutexGuard<'_, PeerBudget> {
        self.budget.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_limits(&self) -> Limits {
        if self.is_legacy() {
            Limits {
                max_control_bytes: tunnel_proto::limits::LEGACY_MAX_MESSAGE_BYTES as u32,
                ..self.local
            }
        } else {
            self.local
        }
    }

    fn on_text(&self, text: &str, now: Instant) -> Result<(), Rejected> {
        let msg = match Message::decode(text, &self.read_limits()) {
            Ok(m) => m,
            Err(e) => {
                return Err(match tunnel_proto::message::Peek::of(text).stream_id() {
                    Some(id) => Rejected::on(id, e),
                    None => e.into(),
                });
            }
        };
        match msg {
            Message::ResponseHead(m) => {
                let body_follows = m.body_follows;
                let head = m.into_head(&self.local)?;
                let mut streams = self.lock_streams();
                let Some(slot) = streams.get_mut(head.id.as_str()) else { return Ok(()) };
                let Some(tx) = slot.head.take() else {
                    return Err(second_head(&head.id));
                };
                if !body_follows {
                    slot.body.finish();
                    slot.window.close();
                    streams.remove(head.id.as_str());
                }
                let _ =
                    tx.send(Ok(Head { status: head.status, headers: head.headers, body: None }));
            }
            Message::HttpResponse(m) => {
                let (head, body) = m.into_parts(&self.local)?;
                let mut streams = self.lock_streams();
                let Some(slot) = streams.get_mut(head.id.as_str()) else { return Ok(()) };
                let Some(tx) = slot.head.take() else {
                    return Err(second_head(&head.id));
                };
                slot.window.close();
                streams.remove(head.id.as_str());
                let _ = tx.send(Ok(Head {
                    status: head.status,
                    headers: head.headers,
                    body: Some(body),
                }));
            }
            Message::Error(e) => {
                if e.id.is_empty() {
                    // A report that one of our frames was refused: it costs
                    // the peer's refusal budget, so it cannot flood the log.
                    self.lock_budget().refusal(now)?;
                    warn!(session = %self.id, code = e.code, error = %e.error, "agent reported an error");
                } else {
                    let code = if (400..=599).contains(&e.code) { e.code } else { 502 };
                    self.fail_stream(&e.id, StreamAbort::new(code, e.error));
                }
            }
            Message::Cancel(c) => {
                let why = if c.reason.is_empty() {
                    "agent cancelled the request".to_owned()
                } else {
                    c.reason
                };
                self.fail_stream(&c.id, StreamAbort::new(502, why));
            }
            Message::WindowUpdate(w) => {
                let window = self.lock_streams().get(w.id.as_str()).map(|s| s.window.clone());
                if let Some(window) = window
                    && let Err(e) = window.grant(w.credit)
                {
                    return Err(Rejected::on(&w.id, e));
                }
            }
            Message::Ack(a) => {
                // An ack for a stream that already ended (or a second one)
                // changes nothing.
                let tx = self.lock_streams().get_mut(a.id.as_str()).and_then(|s| s.ack.take());
                if let Some(tx) = tx {
                    let _ = tx.send(());
                }
            }
            Message::Ping(p) => {
                self.lock_budget().ping(now)?;
                self.push_urgent(Message::pong(&p));
            }
            Message::Pong(p) => {
                self.lock_heartbeat().pong(&p.id, now);
            }
            Message::HttpRequest(m) => {
                return Err(Rejected::on(
                    &m.id,
                    ProtocolError::new(
                        Violation::StreamState,
                        "http_request is not allowed from an agent",
                    ),
                ));
            }
            Message::Hello(_) | Message::Welcome(_) | Message::Goaway(_) => {
                return Err(ProtocolError::new(
                    Violation::StreamState,
                    "message not allowed from an agent at this point",
                )
                .into());
            }
        }
        Ok(())
    }

    fn on_binary(&self, data: &Bytes) -> Result<(), Rejected> {
        if self.is_legacy() {
            return Err(ProtocolError::new(
                Violation::MalformedFrame,
                "binary frames need protocol version 1",
            )
            .into());
        }
        let f = frame::decode(data, self.local.max_chunk_bytes as usize).map_err(|e| {
            match frame::peek_id(data) {
                Some(id) => Rejected::on(id, e),
                None => e.into(),
            }
        })?;
        let mut streams = self.lock_streams();
        let Some(slot) = streams.get(f.id.as_str()) else {
            // Bytes already in flight when the stream was cancelled.
            return Ok(());
        };
        if slot.head.is_some() {
            return Err(Rejected::on(
                &f.id,
                ProtocolError::new(Violation::StreamState, format!("data before head on {}", f.id)),
            ));
        }
        match slot.body.push(f.payload) {
            Ok(()) | Err(PushError::Closed) => {}
            Err(e @ PushError::Overflow { .. }) => return Err(Rejected::on(&f.id, e.into())),
        }
        if f.end {
            slot.body.finish();
            if let Some(slot) = streams.remove(f.id.as_str()) {
                slot.window.close();
            }
        }
        Ok(())
    }

    /// Ends a stream from the relay's side and tells the agent to stop it.
    pub fn abort_stream(&self, id: &str, abort: StreamAbort) {
        let reason = abort.message.clone();
        if self.fail_stream(id, abort) && !self.is_legacy() {
            self.push_urgent(Message::cancel(id, reason));
        }
    }

    /// Ends one stream with an error: before its head the web client gets
    /// `abort.code`; after, its body is cut off.
    /// Returns whether the stream was still live.
    fn fail_stream(&self, id: &str, abort: StreamAbort) -> bool {
        let Some(mut slot) = self.lock_streams().remove(id) else { return false };
        slot.window.close();
        match slot.head.take() {
            Some(tx) => {
                let _ = tx.send(Err(abort));
            }
            None => slot.body.abort(abort),
        }
        true
    }
}

/// Cancels its stream at the agent when dropped before completion (the web
/// client went away, or the relay gave up waiting).
pub struct StreamGuard {
    session: Arc<Session>,
    id: StreamId,
    done: bool,
}

impl StreamGuard {
    pub fn id(&self) -> &StreamId {
        &self.id
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// The response was delivered in full: nothing to cancel.
    pub fn complete(&mut self) {
        self.done = true;
        self.session.release(&self.id, true, "");
    }

    /// Cancels now with `reason`.
    pub fn cancel(mut self, reason: &str) {
        self.done = true;
        self.session.release(&self.id, false, reason);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.done {
            self.session.release(&self.id, false, "client disconnected");
        }
    }
}

fn second_head(id: &StreamId) -> Rejected {
    Rejected::on(
        id.as_str(),
        ProtocolError::new(Violation::StreamState, format!("second head for {id}")),
    )
}

fn new_session_id() -> String {
    format!("s_{:016x}", rand::random::<u64>())
}
