//! The reader: every frame is decoded and dispatched at once, never waiting
//! on a stream (flow control guarantees each stream's inbox has room).
//! Pings, pongs and the peer's reports of refused frames are the link's
//! own business; every other valid message goes to the session's
//! [`Handler`]. A refused frame is answered with `error`, ends the stream it
//! names, and costs the peer's budget; a peer that spends its budget, or
//! breaks WebSocket's rules, ends the session with the code RFC 6455 gives.

use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error, Message as Ws};
use tracing::{debug, warn};

use tunnel_proto::budget::Flood;
use tunnel_proto::error::Rejected;
use tunnel_proto::{Message, ProtocolError, Violation, frame};

use crate::{End, Handler, Link, close_frame, lock, refused_data};

pub(crate) async fn run<S, H>(
    link: &Link,
    stream: &mut SplitStream<WebSocketStream<S>>,
    handler: &H,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    loop {
        let frame = tokio::select! {
            biased;
            _ = link.closed() => return,
            f = stream.next() => f,
        };
        let frame = match frame {
            Some(Ok(f)) => f,
            Some(Err(e)) => return failed(link, &e),
            None => return link.end(End::PeerClosed(None), None),
        };
        let now = Instant::now();
        lock(&link.heartbeat).heard(now);
        let outcome = match frame {
            Ws::Text(text) => on_text(link, &text, now, handler),
            Ws::Binary(data) => on_binary(&data, handler),
            Ws::Close(frame) => {
                let why = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                return link.end(End::PeerClosed(why), None);
            }
            // WebSocket-level pings cost the same as protocol pings.
            Ws::Ping(_) => link.lock_budget().ping(now).map_err(Rejected::from),
            Ws::Pong(_) | Ws::Frame(_) => Ok(()),
        };
        let flood = match outcome {
            Ok(()) => continue,
            Err(Rejected::Flood(flood)) => flood,
            Err(Rejected::Frame { err, stream }) => match link.lock_budget().refusal(now) {
                Err(flood) => flood,
                Ok(()) => {
                    refuse(link, handler, err, stream);
                    continue;
                }
            },
        };
        warn!(session = %link.label, %flood, "the {} flooded the session ({flood}); closing it with 1008", link.peer);
        let text = match flood {
            Flood::Pings => format!("{} sent too many pings", link.peer),
            Flood::Refusals => format!("{} sent too many invalid frames", link.peer),
        };
        return link.end(End::Flooded(flood), Some(close_frame(CloseCode::Policy, text)));
    }
}

/// A read failed: the socket broke, or the peer sent what WebSocket forbids
/// (RFC 6455 7.4.1: 1007 for a text frame that is not UTF-8, 1009 for a
/// message above the limit, 1002 for anything else malformed).
fn failed(link: &Link, e: &Error) {
    debug!(session = %link.label, error = %e, "socket read failed");
    let (code, text) = match e {
        Error::Utf8(_) => (CloseCode::Invalid, "sent a text frame that is not UTF-8"),
        Error::Capacity(_) => (CloseCode::Size, "sent a message above the size limit"),
        Error::Protocol(_) => (CloseCode::Protocol, "broke the WebSocket protocol"),
        _ => return link.end(End::Failed { code: None, error: e.to_string() }, None),
    };
    let frame = close_frame(code, format!("{} {text}", link.peer));
    link.end(End::Failed { code: Some(u16::from(code)), error: e.to_string() }, Some(frame));
}

fn on_text<H: Handler>(link: &Link, text: &str, now: Instant, handler: &H) -> Result<(), Rejected> {
    let msg = match Message::decode(text, &handler.read_limits()) {
        Ok(m) => m,
        Err(e) => return handler.on_invalid(text, e),
    };
    match msg {
        Message::Ping(p) => {
            link.lock_budget().ping(now)?;
            link.push_urgent(Message::pong(&p));
        }
        Message::Pong(p) => {
            lock(&link.heartbeat).pong(&p.id, now);
        }
        Message::Error(e) if e.id.is_empty() => {
            // A report that one of our frames was refused: it costs the
            // peer's refusal budget, so it cannot flood the log.
            link.lock_budget().refusal(now)?;
            if !handler.on_peer_error(&e) {
                warn!(session = %link.label, code = e.code, error = %e.error, "the {} reported an error: {} ({})", link.peer, e.error, e.code);
            }
        }
        other => handler.on_message(other)?,
    }
    Ok(())
}

fn on_binary<H: Handler>(data: &Bytes, handler: &H) -> Result<(), Rejected> {
    let max = handler.read_limits().max_chunk_bytes as usize;
    let f = frame::decode(data, max).map_err(|e| refused_data(data, e))?;
    handler.on_data(f)
}

/// Answers a refused frame with `error` and ends the live stream it named:
/// its web client is not left waiting or fed what followed. An unknown type
/// is a newer peer's extension, not a broken stream.
fn refuse<H: Handler>(link: &Link, handler: &H, err: ProtocolError, stream: Option<String>) {
    warn!(session = %link.label, error = %err, "refused a frame from the {}: {err}", link.peer);
    if let Some(id) = stream
        && err.kind != Violation::UnknownType
    {
        handler.end_stream(&id, &err);
    }
    // Through the urgent queue: the reader never waits on the writer, or
    // two busy peers could each wait on the other.
    link.push_urgent(Message::violation(None, &err));
}
