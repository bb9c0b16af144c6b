//! Delivery over a local route: one admitted request -> one stream on an
//! agent's session, in phases: the `http_request` (with a small body in the
//! same write), the upload, the wait for the head under the deadlines of
//! [`crate::deadline`], and the answer the web client gets. What may cross
//! was decided at the edge ([`crate::edge`]), which session serves it by
//! the router ([`crate::route`]). Every way a request can fail is a
//! [`Failure`], mapped to HTTP in one place ([`Failure::answer`]).

use std::sync::Arc;
use std::time::Duration;

use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use link::body::InboxBody;
use tokio::sync::oneshot;
use tokio::time::Instant;

use tunnel_proto::flow::{Inbox, StreamAbort};
use tunnel_proto::{Frame, OutBody, ProtocolError, RequestOut, Violation};

use daemon::observe::{Outcome, Span};

use crate::body::RelayBody;
use crate::deadline::{Clock, Expired};
use crate::edge;
use crate::response::{self, Failure, Shape};
use crate::route::Why;
use crate::session::{Head, OpenError, OpenStream, Session, StreamGuard};
use crate::shape::Trailer;
use crate::state::{Conn, Shared};
use crate::upload::{self, Pump};

const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// Delivers `req` to `session`'s agent and returns the streamed answer.
/// The request's [`Span`] starts once its stream is open; every failure
/// after that ends it with the answer the web client got.
pub async fn deliver(
    shared: &Shared,
    conn: &Conn,
    session: Arc<Session>,
    req: edge::Request,
    why: Option<Why>,
) -> Response<RelayBody> {
    let shape = Shape::of(req.path());
    match attempt(shared, conn, session, req, why, false).await {
        Attempt::Answered(resp) => resp,
        Attempt::Lost(failure) => failure.answer(shape),
    }
}

/// What delivering a request that another device could take came to.
pub enum Attempt {
    /// The answer the web client gets (the agent's, or a failure's).
    Answered(Response<RelayBody>),
    /// The device was lost or refused before the head, so nothing reached
    /// the web client: another device may be asked.
    Lost(Failure),
}

/// Like [`deliver`]; when `may_retry`, a failure that another device could
/// overcome ([`Failure::elsewhere`]) comes back unanswered as
/// [`Attempt::Lost`] (its span ends saying so).
pub async fn attempt(
    shared: &Shared,
    conn: &Conn,
    session: Arc<Session>,
    req: edge::Request,
    why: Option<Why>,
    may_retry: bool,
) -> Attempt {
    let shape = Shape::of(req.path());
    let lost = |f: Failure| {
        if may_retry && f.elsewhere() {
            Attempt::Lost(f)
        } else {
            Attempt::Answered(f.answer(shape))
        }
    };
    let stream = match session.open() {
        Ok(stream) => stream,
        Err(OpenError::TooManyStreams(n)) => return lost(Failure::TooManyStreams(n)),
        Err(OpenError::Closed) => return lost(Failure::AgentOffline(session.user.clone())),
    };
    let mut span = shared.observer.start(
        &session.id,
        stream.id.as_str(),
        &session.user,
        &session.user_hash,
        req.parts.method.as_str(),
        &req.target,
    );
    if let Some(why) = why {
        span.routed(format!("{} {}", session.device, why.as_str()));
        span.measure_into(session.state.speed.clone());
    }
    // Sent to a device that has the model on disk only, the request loads
    // it: others for that model wait for this load rather than start one
    // on another device.
    let load = match (why, req.model.as_deref()) {
        (Some(Why::Present), Some(model)) => session.state.start_load(model),
        _ => None,
    };
    let method = req.parts.method.clone();
    let exchanged = exchange(shared, conn, &session, req, stream, &mut span).await;
    if let (Some(load), Ok(reply)) = (load, &exchanged)
        && reply.head.status.is_success()
    {
        load.done();
    }
    match exchanged {
        Ok(reply) => Attempt::Answered(answer(reply, &method, span)),
        Err(f) if may_retry && f.elsewhere() => {
            let (outcome, cancel, reason) = f.outcome();
            span.end(outcome, cancel, &format!("{reason}; asking another device"));
            Attempt::Lost(f)
        }
        Err(f) => {
            let (outcome, cancel, reason) = f.outcome();
            let resp = f.answer(shape);
            span.head(resp.status().as_u16(), None);
            span.end(outcome, cancel, &reason);
            Attempt::Answered(resp)
        }
    }
}

/// What the agent answered, and what the answer's body still needs.
struct Reply {
    head: Head,
    guard: StreamGuard,
    inbox: Inbox,
    idle: Option<Duration>,
    total: Option<Instant>,
}

/// Sends the request on its open stream (a small body in the same write),
/// starts the upload, and waits for the head under the deadlines.
async fn exchange(
    shared: &Shared,
    conn: &Conn,
    session: &Arc<Session>,
    req: edge::Request,
    stream: OpenStream,
    span: &mut Span,
) -> Result<Reply, Failure> {
    let config = &shared.config;
    let OpenStream { id, head, inbox, window, mut guard, ack } = stream;
    let edge::Request { target, parts, headers, body, declared, .. } = req;
    let target = target.as_str();
    let has_body = !http_body::Body::is_end_stream(&body);
    let mut body = Some(body);
    let out_body = if session.is_legacy() {
        let whole = body.take().expect("the body is taken once");
        OutBody::Inline(upload::read_legacy(whole, config.legacy_max_body).await?)
    } else if has_body {
        OutBody::Follows
    } else {
        OutBody::None
    };
    let req = RequestOut { id: &id, method: &parts.method, target, headers, body: out_body };
    // Refuse here what the agent would refuse, so the web client gets a
    // precise answer at once instead of a timeout. Nothing was sent: there
    // is nothing to cancel.
    let request = match session.encoder().request(req) {
        Ok(frame) => frame,
        Err(e) => {
            guard.complete();
            return Err(refused(e, target));
        }
    };
    let timeouts = config.timeouts_for(target.split('?').next().unwrap_or(target));
    // A client that stops reading this answer is as stalled as an agent
    // that stops sending it.
    conn.stall.set(timeouts.idle);
    let mut clock = Clock::new(Instant::now(), timeouts);

    // A small body with a declared length (a chat request, most often) is
    // read first and queued together with the request, so both go out in
    // one socket write: one frame for the agent to wait for instead of two,
    // and the local service gets head and body together.
    let small = declared.filter(|&n| {
        has_body
            && n > 0
            && !session.is_legacy()
            && n <= (session.chunk_size() as u64).min(window.available())
    });
    let mut inline = None;
    if let Some(n) = small {
        let whole = body.take().expect("the body is taken once");
        let read = upload::read_small(whole, n as usize, timeouts.idle);
        let data = match clock.total() {
            Some(t) => tokio::time::timeout_at(t, read)
                .await
                .unwrap_or(Err(Failure::Expired(Expired::Total))),
            None => read.await,
        };
        let data = match data {
            Ok(d) => d,
            Err(f) => {
                guard.complete();
                return Err(f);
            }
        };
        // Within the window (checked above): no credit to wait for.
        if window.reserve(data.len()).await != Ok(data.len()) {
            return Err(Failure::AgentGone);
        }
        span.uploaded(data.len() as u64);
        inline = Some(Frame::data(&id, true, &data));
    }

    // Until the agent acknowledges, the acknowledgement timer bounds the
    // wait too: it is what tells a stuck agent from a slow model.
    let ack_timeout = ack.as_ref().map(|_| config.ack_timeout);
    let send_deadline = clock.sending(Instant::now(), ack_timeout);
    match tokio::time::timeout_at(send_deadline, session.send_then(&id, request, inline)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(Failure::AgentGone),
        Err(_) => {
            guard.cancel("the tunnel was too busy to send the request in time");
            return Err(Failure::Congested);
        }
    }

    let (uploaded_tx, uploaded) = oneshot::channel::<()>();
    match body.filter(|_| has_body) {
        Some(body) => {
            let pump = Pump {
                session: session.clone(),
                id: id.clone(),
                window: window.clone(),
                max: config.max_request_body,
                idle: timeouts.idle,
                counted: span.upload_counter(),
            };
            tokio::spawn(pump.run(body, uploaded_tx));
        }
        // No body, or it went with the request.
        None => drop(uploaded_tx),
    }
    let head = match await_head(&mut clock, head, ack, uploaded).await {
        Ok(head) => head,
        Err(Failure::Expired(e)) => {
            guard.cancel(e.cancel_reason());
            return Err(Failure::Expired(e));
        }
        Err(f) => return Err(f),
    };
    Ok(Reply { head, guard, inbox, idle: timeouts.idle, total: clock.total() })
}

/// The answer for a request the agent would refuse.
fn refused(e: ProtocolError, target: &str) -> Failure {
    let status = match e.kind {
        Violation::InvalidPath if target.len() > tunnel_proto::limits::MAX_PATH_LEN => {
            StatusCode::URI_TOO_LONG
        }
        Violation::TooManyHeaders | Violation::HeadersTooLarge => {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        }
        _ => StatusCode::BAD_REQUEST,
    };
    Failure::refused(status, e.detail)
}

/// Waits for the response head while the clock runs: the acknowledgement
/// stops the ack timer, the end of the upload starts the first-byte one.
async fn await_head(
    clock: &mut Clock,
    mut head: oneshot::Receiver<Result<Head, StreamAbort>>,
    mut ack: Option<oneshot::Receiver<()>>,
    mut uploaded: oneshot::Receiver<()>,
) -> Result<Head, Failure> {
    let mut uploading = true;
    loop {
        let deadline = clock.next();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let ack_pending = ack.is_some();
        tokio::select! {
            biased;
            h = &mut head => return match h {
                Ok(Ok(head)) => Ok(head),
                Ok(Err(abort)) => Err(Failure::Aborted(abort)),
                Err(_) => Err(Failure::AgentGone),
            },
            // An ack, or the stream ended (then the head resolves too).
            _ = async { ack.as_mut().expect("polled only while pending").await }, if ack_pending => {
                ack = None;
                clock.acked();
            }
            _ = &mut uploaded, if uploading => {
                uploading = false;
                clock.uploaded(Instant::now());
            }
            _ = sleep => {
                if let Some(e) = clock.expired(Instant::now()) {
                    return Err(Failure::Expired(e));
                }
            }
        }
    }
}

/// The web client's answer for `head`: the tunnelled headers under the
/// relay's origin rules, and the body streamed as it arrives.
fn answer(reply: Reply, method: &Method, mut span: Span) -> Response<RelayBody> {
    let Reply { head, mut guard, inbox, idle, total } = reply;
    let mut resp = Response::new(RelayBody::empty());
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    span.head(head.status.as_u16(), resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()));
    response::secure_tunnelled(resp.headers_mut());
    let trailer = if content_type_is(&resp, "application/x-ndjson") {
        Trailer::NdjsonLine
    } else if content_type_is(&resp, "text/event-stream") {
        Trailer::SseEvent
    } else {
        Trailer::None
    };
    let streamed = trailer != Trailer::None || !resp.headers().contains_key(CONTENT_LENGTH);
    if streamed {
        resp.headers_mut().insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
        resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    // A stream that fails mid-way can say so only without a declared
    // length (an appended error line would break the framing), so token
    // streams go out chunked; the agent's length is a promise the relay
    // cannot keep for them anyway.
    if trailer != Trailer::None && method != Method::HEAD {
        resp.headers_mut().remove(CONTENT_LENGTH);
    }
    *resp.body_mut() = match head.body {
        Some(full) => {
            guard.complete();
            span.chunk(&full);
            span.end(Outcome::Ok, None, "");
            // The length is the body's, not whatever the agent claimed.
            if method != Method::HEAD {
                resp.headers_mut().remove(CONTENT_LENGTH);
            }
            RelayBody::full(full)
        }
        // hyper never polls a HEAD body. Dropping the guard cancels the
        // stream only if the agent announced a body it should not have.
        None if method == Method::HEAD => {
            drop(guard);
            span.end(Outcome::Ok, None, "");
            RelayBody::empty()
        }
        // With a declared length an appended error would break the
        // framing; such a stream is cut off instead.
        None => {
            let credit = guard.session().credit(guard.id());
            let length = resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            RelayBody::stream(
                InboxBody::new(inbox, credit),
                guard,
                trailer,
                idle,
                total,
                span,
                length,
            )
        }
    };
    resp
}

fn content_type_is(resp: &Response<RelayBody>, mime: &str) -> bool {
    resp.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(mime)))
}
