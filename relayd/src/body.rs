//! Response bodies the relay hands to hyper.
//!
//! A streamed body yields each chunk as soon as the agent's frame arrives, so
//! hyper writes and flushes it at once; every chunk taken returns flow-control
//! credit to the agent. Dropping the body before its end (the web client went
//! away) cancels the stream at the agent through its [`StreamGuard`].

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use proto::flow::{Inbox, StreamAbort};

use crate::session::StreamGuard;

pub enum RelayBody {
    /// A body known in full (errors, health, original `http_response`).
    Full(Option<Bytes>),
    Stream(Box<StreamBody>),
}

pub struct StreamBody {
    inbox: Inbox,
    guard: Option<StreamGuard>,
    /// The stream carries NDJSON: an abort mid-stream ends it with an
    /// Ollama-style `{"error": ...}` line instead of cutting it off.
    ndjson: bool,
}

impl RelayBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        RelayBody::Full(Some(b.into()))
    }

    pub fn empty() -> Self {
        RelayBody::Full(None)
    }

    pub fn stream(inbox: Inbox, guard: StreamGuard, ndjson: bool) -> Self {
        RelayBody::Stream(Box::new(StreamBody { inbox, guard: Some(guard), ndjson }))
    }
}

/// The error that cuts off a streamed response; hyper then closes the
/// connection without the final chunk, so the client sees a truncated body.
#[derive(Debug, thiserror::Error)]
#[error("stream aborted: {0}")]
pub struct BodyAborted(pub StreamAbort);

impl http_body::Body for RelayBody {
    type Data = Bytes;
    type Error = BodyAborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        match self.get_mut() {
            RelayBody::Full(b) => {
                Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
            }
            RelayBody::Stream(s) => s.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RelayBody::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            RelayBody::Stream(s) => s.guard.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RelayBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RelayBody::Stream(_) => SizeHint::default(),
        }
    }
}

impl StreamBody {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        let Some(guard) = &self.guard else { return Poll::Ready(None) };
        match self.inbox.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(credit) = self.inbox.take_credit() {
                    guard.session().grant(guard.id(), credit);
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(None) => {
                if let Some(mut g) = self.guard.take() {
                    g.complete();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(abort))) => {
                // The stream is already gone at the relay; nothing to cancel
                // if the agent ended it, but a relay-side abort must still
                // reach the agent, which the guard's drop does.
                self.guard = None;
                if self.ndjson {
                    // As Ollama does for errors mid-stream: a final error
                    // line, then a clean end, so line-reading clients (which
                    // would lose a truncated last chunk) see why.
                    let line = serde_json::json!({ "error": abort.message }).to_string() + "\n";
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))));
                }
                Poll::Ready(Some(Err(BodyAborted(abort))))
            }
        }
    }
}
