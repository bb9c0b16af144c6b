//! Request bodies on their way to the agent: a small one read whole so it
//! goes out with its request, a large one pumped in chunks under flow
//! control, an original agent's read whole as text. `idle` bounds every
//! wait on the web client and on the agent's credit.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use link::chunks::{self, SendError, bounded};
use tokio::sync::oneshot;
use tracing::debug;

use tunnel_proto::StreamId;
use tunnel_proto::flow::{SendWindow, StreamAbort};

use crate::response::Failure;
use crate::session::Session;

const STALLED: &str = "the request body stalled longer than the idle timeout";
const ENDED_EARLY: &str = "request body ended early";

/// A web client's request body: as it arrives, or already read whole (a
/// share token limited to models needs to see the body first).
pub type ClientBody = http_body_util::Either<Incoming, http_body_util::Full<Bytes>>;

/// Reads a body of exactly `len` bytes (its declared `Content-Length`);
/// `idle` bounds each wait for the client's next bytes.
pub async fn read_small(
    mut body: ClientBody,
    len: usize,
    idle: Option<Duration>,
) -> Result<Bytes, Failure> {
    let mut parts: Vec<Bytes> = Vec::new();
    let mut got = 0;
    loop {
        let frame = match bounded(idle, body.frame()).await {
            None => return Err(Failure::refused(StatusCode::REQUEST_TIMEOUT, STALLED)),
            Some(None) => break,
            Some(Some(Ok(f))) => f,
            Some(Some(Err(_))) => {
                return Err(Failure::refused(StatusCode::BAD_REQUEST, ENDED_EARLY));
            }
        };
        let Ok(data) = frame.into_data() else { continue };
        got += data.len();
        // hyper stops at the declared length; this only bounds the buffer.
        if got > len {
            return Err(Failure::refused(
                StatusCode::BAD_REQUEST,
                "request body longer than declared",
            ));
        }
        if !data.is_empty() {
            parts.push(data);
        }
    }
    if got != len {
        return Err(Failure::refused(StatusCode::BAD_REQUEST, ENDED_EARLY));
    }
    // Usually the whole body is one frame: kept without a copy.
    Ok(match parts.len() {
        1 => parts.swap_remove(0),
        _ => Bytes::from(parts.concat()),
    })
}

/// The whole body, at most `max` bytes (`too_large` says why more is
/// refused); `idle` bounds the whole read.
pub async fn read_whole(
    body: ClientBody,
    max: usize,
    idle: Option<Duration>,
    too_large: &'static str,
) -> Result<Bytes, Failure> {
    let read = http_body_util::Limited::new(body, max).collect();
    let Some(collected) = bounded(idle, read).await else {
        return Err(Failure::refused(StatusCode::REQUEST_TIMEOUT, STALLED));
    };
    let collected = collected.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            Failure::refused(StatusCode::PAYLOAD_TOO_LARGE, too_large)
        } else {
            Failure::refused(StatusCode::BAD_REQUEST, ENDED_EARLY)
        }
    })?;
    Ok(collected.to_bytes())
}

/// The whole body as text, for an agent that speaks only the original
/// protocol (bodies inline, as strings).
pub async fn read_legacy(body: ClientBody, max: usize) -> Result<String, Failure> {
    let bytes = read_whole(
        body,
        max,
        None,
        "request body too large for this agent (it speaks the original protocol)",
    )
    .await?;
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        Failure::refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "this agent speaks the original protocol, which carries text bodies only; upgrade agentd for binary bodies",
        )
    })
}

/// A request body streaming to the agent.
pub struct Pump {
    pub session: Arc<Session>,
    pub id: StreamId,
    pub window: Arc<SendWindow>,
    /// Largest body the relay accepts (413 above).
    pub max: u64,
    pub idle: Option<Duration>,
    /// Where the bytes sent are counted (the request's span).
    pub counted: Arc<std::sync::atomic::AtomicU64>,
}

impl Pump {
    /// Streams `body` in chunks, spending flow-control credit before each;
    /// `uploaded` fires after the last one. A stall or failure ends the
    /// stream with the matching status.
    pub async fn run(self, mut body: ClientBody, uploaded: oneshot::Sender<()>) {
        let Pump { session, id, window, max, idle, counted } = self;
        let chunk = session.chunk_size();
        let abort =
            |code: u16, what: &str| session.abort_stream(id.as_str(), StreamAbort::new(code, what));
        let mut total: u64 = 0;
        loop {
            let Some(next) = bounded(idle, chunks::next_chunk(&mut body)).await else {
                return abort(408, STALLED);
            };
            let (data, last) = match next {
                Ok(next) => next,
                Err(e) => {
                    debug!(stream = %id, error = %e, "web client request body failed");
                    return abort(400, ENDED_EARLY);
                }
            };
            counted.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            total += data.len() as u64;
            if total > max {
                return abort(413, "request body is larger than this relay accepts");
            }
            match chunks::send(session.link(), &window, &id, chunk, data, last, idle).await {
                Ok(()) => {}
                Err(SendError::Stalled) => {
                    return abort(
                        504,
                        "the local service stopped reading the request body for longer than the idle timeout",
                    );
                }
                // The stream or the session ended; nobody needs the rest.
                Err(SendError::Ended | SendError::Closed) => return,
            }
            if last {
                let _ = uploaded.send(());
                return;
            }
        }
    }
}
