//! The WebSocket session engine relayd and agentd both drive.
//!
//! A [`Link`] owns what every tunnel session has, whichever side it is on:
//! the bounded outbound queue and the writer that batches it onto the
//! socket ([`writer`]), the urgent control queue that jumps it (cancels,
//! credit, pongs, refusals), the reader that decodes each frame and hands
//! it to the session's [`Handler`] without ever waiting on a stream
//! ([`reader`]), the heartbeat ([`heartbeat`]), the peer's budget of pings
//! and refused frames, and the close frame that says why the session ended.
//!
//! The session types of the two daemons keep only what differs: their
//! stream tables and what a message means to them.

pub mod body;
pub mod chunks;
mod heartbeat;
pub mod settings;

pub use heartbeat::UNRESPONSIVE;
mod reader;
mod writer;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use tunnel_proto::budget::{Flood, PeerBudget};
use tunnel_proto::error::Rejected;
use tunnel_proto::flow::ControlQueue;
use tunnel_proto::frame::DataFrame;
use tunnel_proto::liveness::Heartbeat;
use tunnel_proto::{Frame, Limits, Message, ProtocolError, StreamId};

/// Frames queued for the writer. Small: a full queue makes senders wait
/// (backpressure), while cancels and credit bypass it.
pub const OUT_QUEUE: usize = 64;
/// Frames the writer feeds before it looks at urgent control frames again.
const WRITE_BATCH: usize = 32;
/// Frames queued, or body chunks read, within this of the last are part of
/// a burst: written together, joined ([`writer`], [`chunks::Joiner`]).
const BURST_GAP: std::time::Duration = std::time::Duration::from_micros(100);
/// How long the close frame may take to go out once a session ended.
const CLOSE_DEADLINE: Duration = Duration::from_secs(2);

/// Whether a [`pass`] means what the burst handling needs: on a
/// current-thread runtime (agentd; relayd with one worker) every task that
/// is ready runs before the caller resumes. On a multi-threaded one a pass
/// may wake an idle worker instead (a futex call) and proves nothing, so
/// there a burst is written and sent as it comes.
pub(crate) fn passes_help() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}

/// Lets the tasks that are ready now run before the caller goes on: the
/// caller wakes itself and the scheduler queues it behind them. tokio's
/// `yield_now` instead waits until the runtime has polled for I/O, a
/// syscall (`epoll_wait`) per call, which in a burst is one per chunk.
pub(crate) async fn pass() {
    let mut woken = false;
    std::future::poll_fn(|cx| {
        if woken {
            return std::task::Poll::Ready(());
        }
        woken = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await;
}

/// The WebSocket settings of a session whose peer may receive messages of
/// up to `max_message` bytes (see [`Limits::max_message_bytes`]).
pub fn ws_config(max_message: usize) -> WebSocketConfig {
    // 8 KiB read buffers: an idle tunnel costs the relay 15 KiB instead of
    // 39 (measured at 10,000 agents); bulk transfers were unchanged.
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// A frame queued for the writer, with the stream it belongs to. The writer
/// drops frames of streams that ended while they waited (see
/// [`Handler::is_live`]), so a `cancel`, which bypasses the queue, never
/// reaches the peer before the frame that opened its stream.
pub struct Outbound {
    pub stream: Option<StreamId>,
    pub frame: Frame,
    /// A frame that must follow `frame` in the same write (a small request
    /// body behind its request).
    pub then: Option<Frame>,
}

impl Outbound {
    /// A frame of stream `id`.
    pub fn of(id: &StreamId, frame: Frame) -> Self {
        Self { stream: Some(id.clone()), frame, then: None }
    }

    /// A control message in order with the stream's other frames.
    pub fn message(id: &StreamId, msg: &Message) -> Self {
        Self::of(id, Frame::message(msg))
    }
}

/// The WebSocket frame that carries `frame`: the one place a protocol frame
/// becomes a WebSocket message (the handshakes use it too).
pub fn ws(frame: Frame) -> Ws {
    match frame {
        Frame::Text(text) => Ws::text(text),
        Frame::Binary(data) => Ws::Binary(data),
    }
}

/// The session went away; the frame was not sent.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("session closed")]
pub struct Closed;

/// Why a link ended. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The peer closed the session: its close frame's code and reason.
    PeerClosed(Option<(u16, String)>),
    /// The socket failed, or the peer broke WebSocket's rules; `code` is the
    /// close code sent back (1002, 1007, 1009), if any.
    Failed { code: Option<u16>, error: String },
    /// The peer spent its budget of pings or refused frames (1008).
    Flooded(Flood),
    /// The peer stopped reading: replies owed to it piled up (1008).
    NotReading,
    /// Nothing arrived for too many ping intervals (4001).
    Unresponsive(Duration),
    /// This side closed the link ([`Link::close`]), or the session's own
    /// end condition resolved.
    Closed,
}

/// What a session does with the frames its link reads. Called from the
/// reader: never waits.
pub trait Handler: Send + Sync + 'static {
    /// Limits incoming messages are checked against.
    fn read_limits(&self) -> Limits;

    /// A valid message other than `ping`, `pong` and a session-level
    /// `error`, which the link answers itself.
    fn on_message(&self, msg: Message) -> Result<(), Rejected>;

    /// A session-level `error` (empty id) from the peer, already charged to
    /// its refusal budget: true when the handler was waiting for it (an
    /// answer to an in-band request), false to have it logged.
    fn on_peer_error(&self, _error: &tunnel_proto::ErrorMsg) -> bool {
        false
    }

    /// A valid binary frame.
    fn on_data(&self, frame: DataFrame) -> Result<(), Rejected>;

    /// A text frame that failed validation. By default it is refused, and
    /// the stream it names (if any) ends.
    fn on_invalid(&self, text: &str, err: ProtocolError) -> Result<(), Rejected> {
        Err(match tunnel_proto::message::Peek::of(text).stream_id() {
            Some(id) => Rejected::on(id, err),
            None => err.into(),
        })
    }

    /// A refused frame named stream `id`: end it, if it is live.
    fn end_stream(&self, id: &str, err: &ProtocolError);

    /// The link ended: fail what is still in flight. Called before the
    /// close frame goes out, so nobody waits on it.
    fn on_end(&self, end: &End);

    /// Whether a queued frame of stream `id` is still worth sending.
    fn is_live(&self, _id: &StreamId) -> bool {
        true
    }
}

/// How the session is configured.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The session id, for logs.
    pub label: String,
    /// Who is at the other end ("agent", "relay"), for logs and close texts.
    pub peer: &'static str,
    pub liveness: settings::Liveness,
    /// Urgent control messages that may wait for the writer: each live
    /// stream contributes at most a cancel and a credit between two writer
    /// passes (see [`ControlQueue`]).
    pub max_streams: usize,
}

/// One WebSocket session's shared state.
pub struct Link {
    label: String,
    peer: &'static str,
    out: mpsc::Sender<Outbound>,
    urgent: ControlQueue,
    closed: CancellationToken,
    /// Why the link ended, and the close frame the writer sends.
    end: Mutex<Option<(End, Option<CloseFrame>)>>,
    heartbeat: Mutex<Heartbeat>,
    budget: Mutex<PeerBudget>,
    ping_interval: Duration,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("label", &self.label).finish_non_exhaustive()
    }
}

/// What [`Link::run`] ended with: the session's own end condition, or the
/// link's.
#[derive(Debug)]
pub enum Outcome<T> {
    Until(T),
    Ended(End),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Link {
    /// Creates the link and the receiver its writer drains.
    pub fn new(config: LinkConfig) -> (Arc<Self>, mpsc::Receiver<Outbound>) {
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        let now = Instant::now();
        let link = Arc::new(Self {
            label: config.label,
            peer: config.peer,
            out,
            urgent: ControlQueue::new(config.max_streams),
            closed: CancellationToken::new(),
            end: Mutex::new(None),
            heartbeat: Mutex::new(Heartbeat::new(config.liveness.max_missed_pings, now)),
            budget: Mutex::new(PeerBudget::new(now)),
            ping_interval: config.liveness.ping_interval,
        });
        (link, rx)
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Queues a frame, waiting while the writer is behind.
    pub async fn send(&self, out: Outbound) -> Result<(), Closed> {
        tokio::select! {
            biased;
            _ = self.closed.cancelled() => Err(Closed),
            r = self.out.send(out) => r.map_err(|_| Closed),
        }
    }

    /// Queues a control message ahead of every queued frame; never waits.
    /// A peer that lets these pile up beyond their bound is not reading:
    /// the link closes with 1008.
    pub fn push_urgent(&self, msg: Message) {
        if self.urgent.push(msg).is_err() {
            tracing::warn!(session = %self.label, "the {} is not reading its control messages (queue full); closing the session", self.peer);
            self.end(
                End::NotReading,
                Some(close_frame(CloseCode::Policy, format!("{} is not reading", self.peer))),
            );
        }
    }

    /// Ends the link from this side; the writer sends `code` and `reason`.
    /// Only the first end counts.
    pub fn close(&self, code: CloseCode, reason: impl Into<String>) {
        self.end(End::Closed, Some(close_frame(code, reason.into())));
    }

    /// Records why the link ended (the first reason wins) and stops it.
    fn end(&self, end: End, frame: Option<CloseFrame>) {
        lock(&self.end).get_or_insert((end, frame));
        self.closed.cancel();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves once the link has ended.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Last measured ping round-trip time to the peer.
    pub fn rtt(&self) -> Option<Duration> {
        lock(&self.heartbeat).rtt()
    }

    /// Runs the session on `socket` until the link ends or `until`
    /// resolves (then the link closes normally). `handler` gets every frame
    /// read, and [`Handler::on_end`] once the link ended.
    pub async fn run<S, H, T>(
        self: &Arc<Self>,
        socket: WebSocketStream<S>,
        rx: mpsc::Receiver<Outbound>,
        handler: Arc<H>,
        until: impl Future<Output = T>,
    ) -> Outcome<T>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Handler,
    {
        let (sink, mut stream) = socket.split();
        // Aborted if this future is dropped, so the socket never outlives it.
        let writer = AbortOnDropHandle::new(tokio::spawn(writer::run(
            self.clone(),
            sink,
            rx,
            handler.clone(),
        )));
        let until = tokio::select! {
            () = reader::run(self, &mut stream, &*handler) => None,
            () = heartbeat::run(self) => None,
            t = until => Some(t),
        };
        if until.is_some() {
            self.end(End::Closed, None);
        }
        self.closed.cancel();
        let end = lock(&self.end).as_ref().map_or(End::Closed, |(e, _)| e.clone());
        handler.on_end(&end);
        // The closing handshake: what the peer still sends is read (and
        // dropped) while the close frame goes out, until the peer closes or
        // the deadline. A socket closed with unread input sends a reset,
        // which can destroy the close frame before the peer reads it.
        let drain = async {
            while let Some(Ok(frame)) = stream.next().await {
                if frame.is_close() {
                    break;
                }
            }
        };
        let _ =
            tokio::time::timeout(CLOSE_DEADLINE, futures_util::future::join(writer, drain)).await;
        match until {
            Some(t) => Outcome::Until(t),
            None => Outcome::Ended(end),
        }
    }

    /// The close frame for the writer to send, taken once.
    fn take_close_frame(&self) -> Option<CloseFrame> {
        lock(&self.end).as_mut().and_then(|(_, f)| f.take())
    }

    fn lock_budget(&self) -> MutexGuard<'_, PeerBudget> {
        lock(&self.budget)
    }
}

fn close_frame(code: CloseCode, reason: String) -> CloseFrame {
    CloseFrame { code, reason: reason.into() }
}

/// Applies a `window_update` to the send window of its stream (`None` when
/// the stream already ended: nothing to do). Credit beyond the protocol's
/// ceiling is refused and ends the stream.
pub fn grant_credit(
    window: Option<Arc<tunnel_proto::flow::SendWindow>>,
    update: &tunnel_proto::WindowUpdate,
) -> Result<(), Rejected> {
    match window {
        Some(w) => w.grant(update.credit).map_err(|e| Rejected::on(&update.id, e)),
        None => Ok(()),
    }
}

/// A binary frame's payload that is not valid: the reader answers it.
fn refused_data(data: &Bytes, err: ProtocolError) -> Rejected {
    match tunnel_proto::frame::peek_id(data) {
        Some(id) => Rejected::on(id, err),
        None => err.into(),
    }
}

#[cfg(test)]
mod tests;
