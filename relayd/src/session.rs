//! One agent's session at the relay: the stream table over a [`Link`].
//!
//! The link owns the socket (writer, reader, heartbeat, budgets, close
//! codes); the session keeps what is the relay's: streams opened by web
//! requests ([`Session::open`]), which live in the table until their
//! response ends, the web client goes away, or the session closes, and what
//! each message from the agent means for them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use link::{Link, LinkConfig, Outbound};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info};

use tunnel_proto::error::Rejected;
use tunnel_proto::flow::{BufferGauge, Inbox, InboxSender, SendWindow, StreamAbort, inbox};
use tunnel_proto::{Encoder, Frame, Limits, Message, ProtocolError, StreamId, Violation};

pub type AgentSocket = WebSocketStream<TokioIo<Upgraded>>;

pub use link::Closed as SessionClosed;

mod auth;
mod close;
mod handler;

pub use auth::SessionAuth;

pub use close::CloseReason;

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

struct Slot {
    head: Option<oneshot::Sender<Result<Head, StreamAbort>>>,
    ack: Option<oneshot::Sender<()>>,
    body: InboxSender,
    window: Arc<SendWindow>,
}

pub struct Session {
    pub id: String,
    /// Itself, for the tasks its in-band messages start.
    me: std::sync::Weak<Session>,
    pub user: String,
    /// The device it serves as under its user (from its credential or
    /// token): a reconnecting device replaces its own session only.
    pub device: String,
    /// The user as logs and traces name it (the relay's keyed hash),
    /// computed once per session.
    pub user_hash: String,
    /// 0 for an original agent, else the negotiated version.
    pub version: u32,
    pub connected_at: SystemTime,
    pub agent: String,
    /// Heads for the agent, under the limits it announced in `hello`
    /// (defaults for original agents).
    encoder: Encoder,
    /// What this relay announced in `welcome`.
    local: Limits,
    max_streams: usize,
    link: Arc<Link>,
    streams: Mutex<HashMap<String, Slot>>,
    close_reason: Mutex<Option<CloseReason>>,
    next_id: AtomicU64,
    gauge: Arc<BufferGauge>,
    goaway: bool,
    acks: bool,
    /// What the session is authorized by, and until when.
    auth: Mutex<SessionAuth>,
    /// Woken when the authorization changes (the expiry watcher).
    auth_changed: tokio::sync::Notify,
    identity: Arc<crate::identity::Identity>,
    /// Its service, loads and speed, as routing reads them.
    pub state: crate::device::DeviceState,
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
    /// Who the agent proved to be.
    pub principal: crate::identity::Principal,
    /// Its user's keyed hash, for logs and traces.
    pub user_hash: String,
    /// When the session ends unless renewed.
    pub expires: Option<SystemTime>,
    pub identity: Arc<crate::identity::Identity>,
    pub version: u32,
    pub agent: String,
    pub peer: Limits,
    pub local: Limits,
    pub gauge: Arc<BufferGauge>,
    pub liveness: link::settings::Liveness,
    /// The agent listed the `goaway` capability.
    pub goaway: bool,
    /// The agent listed the `ack` capability.
    pub acks: bool,
}

impl Session {
    /// The agent's last report of its local service.
    pub fn service(&self) -> Option<tunnel_proto::ServiceState> {
        self.state.service()
    }

    /// What `read` makes of the agent's last report, read in place.
    pub fn with_service<R>(
        &self,
        read: impl FnOnce(Option<&tunnel_proto::ServiceState>) -> R,
    ) -> R {
        self.state.with_service(read)
    }

    pub(crate) fn set_service(&self, s: tunnel_proto::ServiceState) {
        self.state.set_service(s);
    }

    /// Creates the session and the receiver its writer drains.
    pub fn new(p: SessionParams) -> (Arc<Self>, mpsc::Receiver<Outbound>) {
        let max_streams = p.local.max_streams.min(p.peer.max_streams) as usize;
        let id = new_session_id();
        let (link, rx) = Link::new(LinkConfig {
            label: id.clone(),
            peer: "agent",
            liveness: p.liveness,
            max_streams,
        });
        let auth = SessionAuth {
            id: p.principal.id.clone(),
            parent: p.principal.parent.clone(),
            via: Some(p.principal.via),
            expires: p.expires,
            ..SessionAuth::default()
        };
        let session = Arc::new_cyclic(|me| Self {
            id,
            me: me.clone(),
            device: p.principal.device().to_owned(),
            user: p.principal.user,
            user_hash: p.user_hash,
            version: p.version,
            connected_at: SystemTime::now(),
            agent: p.agent,
            encoder: Encoder::new(p.peer),
            local: p.local,
            max_streams,
            link,
            streams: Mutex::new(HashMap::new()),
            close_reason: Mutex::new(None),
            next_id: AtomicU64::new(1),
            gauge: p.gauge,
            goaway: p.goaway,
            acks: p.acks,
            auth: Mutex::new(auth),
            auth_changed: tokio::sync::Notify::new(),
            identity: p.identity,
            state: crate::device::DeviceState::default(),
        });
        (session, rx)
    }

    pub fn is_legacy(&self) -> bool {
        self.version == 0
    }

    /// Largest body chunk this relay sends to the agent.
    pub fn chunk_size(&self) -> usize {
        self.local.chunk_towards(self.encoder.peer())
    }

    pub fn in_flight(&self) -> usize {
        self.lock_streams().len()
    }

    pub fn is_closed(&self) -> bool {
        self.link.is_closed()
    }

    /// The link the session runs on.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Resolves once the session has closed.
    pub async fn closed(&self) {
        self.link.closed().await
    }

    /// Last measured ping round-trip time to the agent.
    pub fn rtt(&self) -> Option<Duration> {
        self.link.rtt()
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
        let window = Arc::new(SendWindow::new(self.encoder.peer().initial_window));
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

    /// Queues `frame` of stream `id` with `then` right behind it: both go
    /// out in the same socket write unless the writer's buffer fills between.
    pub async fn send_then(
        &self,
        id: &StreamId,
        frame: Frame,
        then: Option<Frame>,
    ) -> Result<(), SessionClosed> {
        self.link.send(Outbound { stream: Some(id.clone()), frame, then }).await
    }

    /// Encodes heads for this session's agent.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// Tells the agent the relay is draining: finish in-flight streams, then
    /// reconnect after `retry`. Agents that did not list `goaway` are simply
    /// closed at the end of the drain.
    pub fn goaway(&self, reason: &str, retry: Duration) {
        if self.goaway && !self.is_closed() {
            self.link.push_urgent(Message::Goaway(tunnel_proto::Goaway {
                reason: reason.to_owned(),
                retry_after_ms: Some(retry.as_millis() as u64),
            }));
        }
    }

    /// What returns response-body credit for stream `id` to the agent.
    pub fn credit(&self, id: &StreamId) -> link::body::Credit {
        link::body::Credit::new(self.link.clone(), id.clone())
    }

    /// Forgets a stream; if it had not completed, tells the agent to stop.
    fn release(&self, id: &StreamId, completed: bool, reason: &str) {
        let slot = self.lock_streams().remove(id.as_str());
        if let Some(slot) = &slot {
            slot.window.close();
        }
        if !completed && slot.is_some() && !self.is_legacy() && !self.is_closed() {
            debug!(session = %self.id, stream = %id, reason, "cancelling stream");
            self.link.push_urgent(Message::cancel(id.as_str(), reason));
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
        self.link.close(reason.close_code(), reason.text());
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
        let stop = tokio_util::sync::CancellationToken::new();
        let expiry = async {
            self.watch_expiry(stop.clone()).await;
            std::future::pending::<()>().await
        };
        let _ = self.link.run(socket, rx, self.clone(), expiry).await;
        stop.cancel();
        info!(session = %self.id, reason = self.close_reason().text(), "agent session {} ended: {}", self.id, self.close_reason().text());
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

    /// Ends a stream from the relay's side and tells the agent to stop it.
    pub fn abort_stream(&self, id: &str, abort: StreamAbort) {
        let reason = abort.message.clone();
        if self.fail_stream(id, abort) && !self.is_legacy() {
            self.link.push_urgent(Message::cancel(id, reason));
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

    /// A head (streamed or whole) for stream `id`.
    fn deliver_head(&self, id: &StreamId, head: Head, ends: bool) -> Result<(), Rejected> {
        let mut streams = self.lock_streams();
        let Some(slot) = streams.get_mut(id.as_str()) else { return Ok(()) };
        let Some(tx) = slot.head.take() else {
            return Err(Rejected::on(
                id.as_str(),
                ProtocolError::new(Violation::StreamState, format!("second head for {id}")),
            ));
        };
        if ends {
            slot.body.finish();
            slot.window.close();
            streams.remove(id.as_str());
        }
        let _ = tx.send(Ok(head));
        Ok(())
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

fn new_session_id() -> String {
    format!("s_{:016x}", rand::random::<u64>())
}
