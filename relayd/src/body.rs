//! Response bodies the relay hands to hyper.
//!
//! A streamed body yields each chunk as soon as the agent's frame arrives, so
//! hyper writes and flushes it at once; every chunk taken returns flow-control
//! credit to the agent. Dropping the body before its end (the web client went
//! away) cancels the stream at the agent through its [`StreamGuard`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use link::body::InboxBody;
use tokio::time::{Instant, Sleep};

use tunnel_proto::flow::StreamAbort;

use daemon::observe::{CancelReason, Outcome, Span};

use crate::session::StreamGuard;
use crate::shape::{Trailer, code_for_status};

pub enum RelayBody {
    /// A body known in full (errors, health, original `http_response`).
    Full(Option<Bytes>),
    Stream(Box<StreamBody>),
    /// The answer of the replica a request was forwarded to, as it comes
    /// (that replica applied the timeouts and wrote any error in-band).
    Peer(hyper::body::Incoming),
}

pub struct StreamBody {
    body: InboxBody,
    guard: Option<StreamGuard>,
    /// Longest pause between chunks, and the end of the whole exchange.
    idle: Option<Duration>,
    deadline: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    /// An abort held back for one turn, so hyper writes what it already
    /// took before the error cuts the stream.
    cut: Option<StreamAbort>,
    /// How an abort mid-stream ends the body: an error line or event the
    /// client can show, or a cut.
    trailer: Trailer,
    /// The request's trace and metrics; dropped unended, it records a
    /// client that went away.
    span: Option<Span>,
    /// The declared length: once sent, the answer is complete (hyper stops
    /// polling a body at its length).
    length: Option<u64>,
}

impl RelayBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        RelayBody::Full(Some(b.into()))
    }

    pub fn empty() -> Self {
        RelayBody::Full(None)
    }

    pub fn stream(
        body: InboxBody,
        guard: StreamGuard,
        trailer: Trailer,
        idle: Option<Duration>,
        deadline: Option<Instant>,
        span: Span,
        length: Option<u64>,
    ) -> Self {
        let timer = next_wake(idle, deadline).map(|at| Box::pin(tokio::time::sleep_until(at)));
        RelayBody::Stream(Box::new(StreamBody {
            body,
            guard: Some(guard),
            trailer,
            cut: None,
            idle,
            deadline,
            timer,
            span: Some(span),
            length,
        }))
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
            RelayBody::Peer(b) => Pin::new(b).poll_frame(cx).map(|f| {
                f.map(|r| {
                    r.map_err(|e| {
                        let why = format!("the replica serving this stream failed: {e}");
                        BodyAborted(StreamAbort::new(502, why))
                    })
                })
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RelayBody::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            RelayBody::Stream(s) => s.guard.is_none(),
            RelayBody::Peer(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RelayBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RelayBody::Stream(_) => SizeHint::default(),
            RelayBody::Peer(b) => b.size_hint(),
        }
    }
}

impl StreamBody {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        if let Some(abort) = self.cut.take() {
            return Poll::Ready(Some(Err(BodyAborted(abort))));
        }
        if self.guard.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Pending => {
                if let Some(timer) = &mut self.timer
                    && timer.as_mut().poll(cx).is_ready()
                {
                    return self.expire(cx);
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(span), Some(data)) = (&mut self.span, frame.data_ref()) {
                    span.chunk(data);
                    if self.length == Some(span.bytes_out())
                        && let Some(span) = self.span.take()
                    {
                        span.end(Outcome::Ok, None, "");
                    }
                }
                if let (Some(timer), Some(at)) =
                    (&mut self.timer, next_wake(self.idle, self.deadline))
                {
                    timer.as_mut().reset(at);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if let Some(mut g) = self.guard.take() {
                    g.complete();
                }
                if let Some(span) = self.span.take() {
                    span.end(Outcome::Ok, None, "");
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(abort))) => {
                // The stream is already gone at the relay; nothing to cancel.
                self.guard = None;
                self.fail(cx, abort)
            }
        }
    }

    /// A timeout fired after the response started: cancel at the agent,
    /// then end the body the way `fail` does.
    fn expire(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        let total = self.deadline.is_some_and(|d| Instant::now() >= d);
        let message = match (total, self.idle) {
            (false, Some(idle)) => {
                format!("no data from the local service for {}", humantime::format_duration(idle))
            }
            _ => "the response took longer than the relay's total timeout".to_owned(),
        };
        if let Some(guard) = self.guard.take() {
            guard.cancel(&message);
        }
        if let Some(span) = self.span.take() {
            span.end(Outcome::Cancelled, Some(CancelReason::Timeout), &message);
        }
        self.fail(cx, StreamAbort::new(504, message))
    }

    fn fail(
        &mut self,
        cx: &mut Context<'_>,
        abort: StreamAbort,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        self.timer = None;
        if let Some(span) = self.span.take() {
            span.end(Outcome::Error, None, &abort.message);
        }
        let code =
            http::StatusCode::from_u16(abort.code).map_or("upstream_failed", code_for_status);
        // As Ollama does for errors mid-stream: a final error line (or SSE
        // event), then a clean end, so clients that read by line or event
        // (and would lose a truncated last chunk) see why.
        if let Some(last) =
            std::mem::replace(&mut self.trailer, Trailer::None).bytes(code, &abort.message)
        {
            return Poll::Ready(Some(Ok(Frame::data(last))));
        }
        // hyper drops its write buffer when a body fails: a pending turn
        // lets it flush the bytes the client is owed, then the cut comes.
        self.cut = Some(abort);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// When the body's timer should fire next: the sooner of the idle limit
/// (from now) and the total deadline.
fn next_wake(idle: Option<Duration>, deadline: Option<Instant>) -> Option<Instant> {
    let idle_at = idle.map(|d| Instant::now() + d);
    match (idle_at, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
