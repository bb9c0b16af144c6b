//! Forwarding one web request through an agent session and answering it.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message as Ws;
use tracing::debug;

use tunnel_proto::flow::{SendWindow, StreamAbort};
use tunnel_proto::{Headers, HttpRequestMsg, Message, StreamId, Violation, frame};

use crate::Shared;
use crate::body::RelayBody;
use crate::response::{self, Shape, Trailer};
use crate::server::Conn;
use crate::session::{OpenError, Session};

const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// Whether a web client's header field stays at the relay: the relay's own
/// credential and cookies (unless `forward_cookies`), the client's view of
/// the relay's host (the agent sets `Host` for the local service), `Expect`
/// (the relay already answered it), and forwarding fields a client could
/// forge (unless they come from a trusted proxy).
fn not_forwarded(name: &HeaderName, forward_cookies: bool, trusted_peer: bool) -> bool {
    use http::header::{AUTHORIZATION, COOKIE, EXPECT, FORWARDED, HOST};
    name == AUTHORIZATION
        || name == HOST
        || name == EXPECT
        || (name == COOKIE && !forward_cookies)
        || (!trusted_peer
            && (name == FORWARDED
                || name.as_str().starts_with("x-forwarded-")
                || name.as_str() == "x-real-ip"))
}

/// Forwards `req` to `session`'s agent as a request for `target` (path and
/// query at the local service) and returns the streamed answer.
pub async fn forward(
    shared: &Shared,
    conn: &Conn,
    session: Arc<Session>,
    req: Request<Incoming>,
    target: String,
) -> Response<RelayBody> {
    let shape = Shape::of(&target);
    let error = |status: StatusCode, message: &str| {
        response::error(shape, status, response::code_for_status(status), message)
    };
    let (parts, body) = req.into_parts();
    let forward_cookies = shared.config.forward_cookies;
    let trusted_peer = shared.config.trusted_proxies.trusts(conn.peer.ip());
    let headers = match Headers::from_map_without(&parts.headers, |n| {
        not_forwarded(n, forward_cookies, trusted_peer)
    }) {
        Ok(h) => h,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.detail),
    };
    if let Err(e) = headers.check_size(&shared.config.limits) {
        return error(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, &e.detail);
    }
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > shared.config.max_request_body) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than this relay accepts",
        );
    }
    let has_body = !http_body::Body::is_end_stream(&body);

    let open = match session.open() {
        Ok(o) => o,
        Err(OpenError::TooManyStreams(n)) => {
            return response::retry_after(
                response::error(
                    shape,
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    &format!("this tunnel already has {n} requests in flight"),
                ),
                1,
            );
        }
        Err(OpenError::Closed) => return response::agent_offline(shape, &session.user),
    };

    let mut guard = open.guard;
    let mut body = Some(body);
    let msg = if session.is_legacy() {
        let whole = body.take().expect("the body is taken once");
        let body = match read_legacy_body(whole, shared.config.legacy_max_body, shape).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        HttpRequestMsg::new(&open.id, &parts.method, &target, headers, Some(body), false)
    } else {
        HttpRequestMsg::new(&open.id, &parts.method, &target, headers, None, has_body)
    };
    // Refuse here what the agent would refuse, so the web client gets a
    // precise answer at once instead of a timeout.
    if let Err(e) = msg.check(session.peer_limits()) {
        guard.complete();
        let status = match e.kind {
            Violation::InvalidPath if target.len() > tunnel_proto::limits::MAX_PATH_LEN => {
                StatusCode::URI_TOO_LONG
            }
            Violation::TooManyHeaders | Violation::HeadersTooLarge => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        };
        return error(status, &e.detail);
    }
    let text = Message::HttpRequest(msg).encode();
    if !session.is_legacy() && text.len() > session.peer_limits().max_control_bytes as usize {
        guard.complete();
        return error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head too large for the agent",
        );
    }
    let limits = shared.config.timeouts_for(target.split('?').next().unwrap_or(&target));
    // A client that stops reading this answer is as stalled as an agent
    // that stops sending it.
    conn.stall.set(limits.idle);
    let total_deadline = limits.total.map(|t| tokio::time::Instant::now() + t);

    // A small body with a declared length (a chat request, most often) is
    // read first and queued together with the request, so both go out in
    // one socket write: one frame for the agent to wait for instead of two,
    // and the local service gets head and body together.
    let small = declared.filter(|&n| {
        has_body
            && n > 0
            && !session.is_legacy()
            && n <= (session.chunk_size() as u64).min(open.window.available())
    });
    let mut inline = None;
    if let Some(n) = small {
        let whole = body.take().expect("the body is taken once");
        let read = read_small_body(whole, n as usize, limits.idle);
        let data = match total_deadline {
            Some(t) => tokio::time::timeout_at(t, read).await.unwrap_or(Err((
                StatusCode::GATEWAY_TIMEOUT,
                "the request took longer than the relay's total timeout",
            ))),
            None => read.await,
        };
        let data = match data {
            Ok(d) => d,
            Err((status, why)) => {
                // Nothing was sent: the agent has nothing to cancel.
                guard.complete();
                return error(status, why);
            }
        };
        // Within the window (checked above): no credit to wait for.
        if open.window.reserve(data.len()).await != Ok(data.len()) {
            return error(StatusCode::BAD_GATEWAY, "agent disconnected");
        }
        inline = Some(Ws::Binary(frame::encode(open.id.as_str(), true, &data)));
    }

    let started = tokio::time::Instant::now();
    // Until the agent acknowledges, the acknowledgement timer bounds the
    // wait too: it is what tells a stuck agent from a slow model.
    let mut ack = open.ack;
    let ack_deadline = ack.as_ref().map(|_| started + shared.config.ack_timeout);
    let first_byte = limits.total.map_or(limits.first_byte, |t| t.min(limits.first_byte));
    let send_deadline = ack_deadline.map_or(started + first_byte, |a| a.min(started + first_byte));
    let sent = session.send_then(&open.id, Ws::text(text), inline);
    match tokio::time::timeout_at(send_deadline, sent).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return error(StatusCode::BAD_GATEWAY, "agent disconnected"),
        Err(_) => {
            guard.cancel("the tunnel was too busy to send the request in time");
            return error(StatusCode::GATEWAY_TIMEOUT, "the tunnel to the agent is congested");
        }
    }

    // The first-byte clock starts once the whole request body is with the
    // agent: a model server answers only after reading it, and a multi-GB
    // upload must not count against it.
    let (uploaded_tx, mut uploaded_rx) = oneshot::channel::<()>();
    if let Some(body) = body.filter(|_| has_body) {
        tokio::spawn(pump_request_body(
            session.clone(),
            open.id.clone(),
            open.window.clone(),
            body,
            shared.config.max_request_body,
            limits.idle,
            uploaded_tx,
        ));
    } else {
        // No body, or it went with the request.
        drop(uploaded_tx);
    }
    let mut head_rx = open.head;
    let mut head_deadline: Option<tokio::time::Instant> = total_deadline;
    let mut uploaded = false;
    let head = loop {
        let ack_pending = ack.is_some();
        let deadline = match (ack_pending.then_some(ack_deadline).flatten(), head_deadline) {
            (Some(a), Some(h)) => Some(a.min(h)),
            (a, h) => a.or(h),
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            h = &mut head_rx => match h {
                Ok(Ok(head)) => break head,
                Ok(Err(abort)) => return abort_response(shape, &abort),
                Err(_) => return error(StatusCode::BAD_GATEWAY, "agent disconnected"),
            },
            // An ack, or the stream ended (then the head resolves too).
            _ = async { ack.as_mut().expect("polled only while pending").await }, if ack_pending => {
                ack = None;
            }
            _ = &mut uploaded_rx, if !uploaded => {
                uploaded = true;
                let until = tokio::time::Instant::now() + limits.first_byte;
                head_deadline = Some(total_deadline.map_or(until, |t| t.min(until)));
            }
            _ = sleep => {
                let now = tokio::time::Instant::now();
                if ack.is_some() && ack_deadline.is_some_and(|a| a <= now) {
                    guard.cancel("the agent did not acknowledge the request in time");
                    return error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the agent did not acknowledge the request in time",
                    );
                }
                if total_deadline.is_some_and(|t| t <= now) {
                    guard.cancel("the total timeout passed before the response head");
                    return error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the request took longer than the relay's total timeout",
                    );
                }
                guard.cancel("no response head before the first-byte timeout");
                return error(StatusCode::GATEWAY_TIMEOUT, "the local service did not answer in time");
            }
        }
    };

    let mut resp = Response::new(RelayBody::empty());
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
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
    if trailer != Trailer::None && parts.method != Method::HEAD {
        resp.headers_mut().remove(CONTENT_LENGTH);
    }
    *resp.body_mut() = match head.body {
        Some(full) => {
            guard.complete();
            // The length is the body's, not whatever the agent claimed.
            if parts.method != Method::HEAD {
                resp.headers_mut().remove(CONTENT_LENGTH);
            }
            RelayBody::full(full)
        }
        // hyper never polls a HEAD body. Dropping the guard cancels the
        // stream only if the agent announced a body it should not have.
        None if parts.method == Method::HEAD => {
            drop(guard);
            RelayBody::empty()
        }
        // With a declared length an appended error would break the
        // framing; such a stream is cut off instead.
        None => RelayBody::stream(open.inbox, guard, trailer, limits.idle, total_deadline),
    };
    resp
}

/// Streams the web client's request body to the agent in chunks, spending
/// flow-control credit before each one. `idle` bounds each wait: for the
/// client's next bytes and for the agent's credit.
async fn pump_request_body(
    session: Arc<Session>,
    id: StreamId,
    window: Arc<SendWindow>,
    mut body: Incoming,
    max: u64,
    idle: Option<std::time::Duration>,
    uploaded: oneshot::Sender<()>,
) {
    let chunk = session.chunk_size();
    let mut total: u64 = 0;
    let stalled = |code: u16, what: &str| {
        session.abort_stream(id.as_str(), StreamAbort::new(code, what));
    };
    loop {
        // `is_end_stream` is only a hint (a chunked body never sets it), so
        // the end is also the `None` after the last frame.
        let next = match bounded(idle, body.frame()).await {
            Some(f) => f,
            None => {
                return stalled(408, "the request body stalled longer than the idle timeout");
            }
        };
        let (data, last) = match next {
            None => (Bytes::new(), true),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => (d, http_body::Body::is_end_stream(&body)),
                Err(_) => continue, // trailers are not forwarded
            },
            Some(Err(e)) => {
                debug!(stream = %id, error = %e, "web client request body failed");
                session
                    .abort_stream(id.as_str(), StreamAbort::new(400, "request body ended early"));
                return;
            }
        };
        total += data.len() as u64;
        if total > max {
            session.abort_stream(
                id.as_str(),
                StreamAbort::new(413, "request body is larger than this relay accepts"),
            );
            return;
        }
        let mut data = data;
        loop {
            let want = data.len().min(chunk);
            let n = match bounded(idle, window.reserve(want)).await {
                Some(Ok(n)) => n,
                Some(Err(_)) => return, // the stream ended; nobody needs the rest
                None => {
                    return stalled(
                        504,
                        "the local service stopped reading the request body for longer than the idle timeout",
                    );
                }
            };
            let piece = data.split_to(n);
            let end = last && data.is_empty();
            if want > 0 || end {
                let f = frame::encode(id.as_str(), end, &piece);
                if session.send(&id, Ws::Binary(f)).await.is_err() {
                    return;
                }
            }
            if data.is_empty() {
                break;
            }
        }
        if last {
            let _ = uploaded.send(());
            return;
        }
    }
}

/// `fut`, or `None` once `limit` passed (never without a limit).
async fn bounded<T>(
    limit: Option<std::time::Duration>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    match limit {
        Some(l) => tokio::time::timeout(l, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// Reads a body of exactly `len` bytes (its declared `Content-Length`);
/// `idle` bounds each wait for the client's next bytes.
async fn read_small_body(
    mut body: Incoming,
    len: usize,
    idle: Option<std::time::Duration>,
) -> Result<Bytes, (StatusCode, &'static str)> {
    let mut parts: Vec<Bytes> = Vec::new();
    let mut got = 0;
    loop {
        let frame = match bounded(idle, body.frame()).await {
            None => {
                return Err((
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body stalled longer than the idle timeout",
                ));
            }
            Some(None) => break,
            Some(Some(Ok(f))) => f,
            Some(Some(Err(_))) => {
                return Err((StatusCode::BAD_REQUEST, "request body ended early"));
            }
        };
        let Ok(data) = frame.into_data() else { continue };
        got += data.len();
        // hyper stops at the declared length; this only bounds the buffer.
        if got > len {
            return Err((StatusCode::BAD_REQUEST, "request body longer than declared"));
        }
        if !data.is_empty() {
            parts.push(data);
        }
    }
    if got != len {
        return Err((StatusCode::BAD_REQUEST, "request body ended early"));
    }
    // Usually the whole body is one frame: kept without a copy.
    Ok(match parts.len() {
        1 => parts.swap_remove(0),
        _ => Bytes::from(parts.concat()),
    })
}

async fn read_legacy_body(
    body: Incoming,
    max: usize,
    shape: Shape,
) -> Result<String, Response<RelayBody>> {
    let collected = http_body_util::Limited::new(body, max).collect().await.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            response::error(
                shape,
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body too large for this agent (it speaks the original protocol)",
            )
        } else {
            response::error(
                shape,
                StatusCode::BAD_REQUEST,
                "bad_request",
                "request body ended early",
            )
        }
    })?;
    String::from_utf8(collected.to_bytes().to_vec()).map_err(|_| {
        response::error(
            shape,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "binary_body",
            "this agent speaks the original protocol, which carries text bodies only; upgrade agentd for binary bodies",
        )
    })
}

fn content_type_is(resp: &Response<RelayBody>, mime: &str) -> bool {
    resp.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(mime)))
}

fn abort_response(shape: Shape, abort: &StreamAbort) -> Response<RelayBody> {
    let status = StatusCode::from_u16(abort.code)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    response::error(shape, status, response::code_for_status(status), &abort.message)
}
