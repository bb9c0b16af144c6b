//! The relay's own answers, and what every tunnelled answer gains or loses
//! on its way to a web client.
//!
//! Errors are read by SDKs, not people with curl: on `/v1/*` (the
//! OpenAI-compatible API) they are OpenAI's error object
//! `{"error":{"message","type","code"}}`, elsewhere Ollama's
//! `{"error":"..."}`. A stream that fails after its head ends with an error
//! in the stream's own format (an NDJSON line, an SSE `data:` event), which
//! both official clients raise as an exception with the message.
//!
//! Every user's tunnel answers on the relay's origin, so a desktop must not be
//! able to run script or set state there: tunnelled answers lose
//! `Set-Cookie` and the other origin-wide headers and are sandboxed with a
//! `Content-Security-Policy` ([`secure_tunnelled`]).

use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Response, StatusCode};

use crate::auth::Unauthorized;
use crate::body::RelayBody;
use crate::deadline::Expired;
pub use crate::shape::{Shape, code_for_status};
use daemon::observe::{CancelReason, Outcome};
use tunnel_proto::flow::StreamAbort;

/// Why a request got no tunnelled answer.
#[derive(Debug)]
pub enum Failure {
    /// The request cannot cross the tunnel as it is (400, 408, 413, 414,
    /// 415, 431).
    Refused { status: StatusCode, message: String },
    /// The tunnel has `max_streams` requests in flight (429).
    TooManyStreams(usize),
    /// The user's agent is not connected (503).
    AgentOffline(String),
    /// The agent went away before answering (502).
    AgentGone,
    /// The request could not even be queued for the agent in time (504).
    Congested,
    /// A deadline passed before the head (504).
    Expired(Expired),
    /// The agent (or its local service) ended the stream before the head.
    Aborted(StreamAbort),
    /// A share token's scope does not cover the request (403).
    Forbidden(String),
}

impl Failure {
    /// How the request ended, for its trace and the metrics.
    pub fn outcome(&self) -> (Outcome, Option<CancelReason>, String) {
        match self {
            Failure::Refused { message, .. } => (Outcome::Refused, None, message.clone()),
            Failure::TooManyStreams(n) => {
                (Outcome::Refused, None, format!("{n} requests in flight already"))
            }
            Failure::Forbidden(m) => (Outcome::Refused, None, m.clone()),
            Failure::AgentOffline(_) => (Outcome::Error, None, "agent not connected".into()),
            Failure::AgentGone => {
                (Outcome::Cancelled, Some(CancelReason::SessionLost), "agent disconnected".into())
            }
            Failure::Congested => {
                (Outcome::Cancelled, Some(CancelReason::Timeout), "tunnel congested".into())
            }
            Failure::Expired(e) => {
                (Outcome::Cancelled, Some(CancelReason::Timeout), e.message().to_owned())
            }
            Failure::Aborted(a) if a.code == 400 || a.code == 403 => {
                (Outcome::Refused, None, a.message.clone())
            }
            Failure::Aborted(a) => (Outcome::Error, None, a.message.clone()),
        }
    }

    /// Whether another device of the user could answer where this one
    /// failed: it was lost, full or congested before the head, or its
    /// service could not be reached (502/503 from the agent). A deadline
    /// that passed is not (a model may still be loading there), nor a
    /// refusal.
    pub fn elsewhere(&self) -> bool {
        match self {
            Failure::AgentGone
            | Failure::AgentOffline(_)
            | Failure::TooManyStreams(_)
            | Failure::Congested => true,
            Failure::Aborted(a) => a.code == 502 || a.code == 503,
            Failure::Refused { .. } | Failure::Expired(_) | Failure::Forbidden(_) => false,
        }
    }

    pub fn refused(status: StatusCode, message: impl Into<String>) -> Self {
        Failure::Refused { status, message: message.into() }
    }

    /// The one mapping from a failure to what the web client gets.
    pub fn answer(self, shape: Shape) -> Response<RelayBody> {
        let error =
            |status: StatusCode, code: &str, message: &str| error(shape, status, code, message);
        match self {
            Failure::Refused { status, message } => {
                error(status, code_for_status(status), &message)
            }
            Failure::TooManyStreams(n) => retry_after(
                error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    &format!("this tunnel already has {n} requests in flight"),
                ),
                1,
            ),
            Failure::AgentOffline(user) => agent_offline(shape, &user),
            Failure::AgentGone => {
                error(StatusCode::BAD_GATEWAY, "agent_disconnected", "agent disconnected")
            }
            Failure::Congested => error(
                StatusCode::GATEWAY_TIMEOUT,
                "tunnel_congested",
                "the tunnel to the agent is congested",
            ),
            Failure::Expired(e) => error(StatusCode::GATEWAY_TIMEOUT, "timeout", e.message()),
            Failure::Forbidden(message) => error(StatusCode::FORBIDDEN, "out_of_scope", &message),
            Failure::Aborted(abort) => {
                let status = StatusCode::from_u16(abort.code)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                error(status, code_for_status(status), &abort.message)
            }
        }
    }
}

/// A JSON error answer in `shape`.
pub fn error(shape: Shape, status: StatusCode, code: &str, message: &str) -> Response<RelayBody> {
    let body = crate::shape::error_body(shape, status, code, message);
    let mut resp = Response::new(RelayBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// 401 with `WWW-Authenticate: Bearer` (RFC 6750): without an `error`
/// attribute when no token came, `error="invalid_token"` when one did (with
/// a description saying an expired one expired).
pub fn unauthorized(shape: Shape, why: Unauthorized, message: &str) -> Response<RelayBody> {
    let (code, challenge) = match why {
        Unauthorized::Missing => ("missing_token", "Bearer realm=\"relayd\""),
        Unauthorized::Invalid => {
            ("invalid_token", "Bearer realm=\"relayd\", error=\"invalid_token\"")
        }
        Unauthorized::Expired => (
            "expired_token",
            "Bearer realm=\"relayd\", error=\"invalid_token\", error_description=\"the token expired\"",
        ),
        Unauthorized::Revoked => (
            tunnel_proto::REVOKED_TOKEN,
            "Bearer realm=\"relayd\", error=\"invalid_token\", error_description=\"the token was revoked\"",
        ),
    };
    let mut r = error(shape, StatusCode::UNAUTHORIZED, code, message);
    r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    // The code for programs whatever the body's shape (agentd reads it).
    r.headers_mut().insert(tunnel_proto::ERROR_CODE_HEADER, HeaderValue::from_static(code));
    r
}

/// The answer for a request authorization refused.
pub fn denied(shape: Shape, denied: crate::auth::Denied) -> Response<RelayBody> {
    match denied {
        crate::auth::Denied::Unauthorized(why, message) => unauthorized(shape, why, &message),
        crate::auth::Denied::Forbidden(code, message) => {
            error(shape, StatusCode::FORBIDDEN, code, &message)
        }
        crate::auth::Denied::Unavailable(message) => {
            let mut r =
                error(shape, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", &message);
            r.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
    }
}

/// `x-should-retry`, which the `openai` SDK obeys before `Retry-After`.
const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// 503 for a user whose agent is not connected. `Retry-After` tells HTTP
/// clients when a reconnecting agent is likely back; `x-should-retry: false`
/// keeps the `openai` SDK from waiting twice that long (two retries) before
/// it reports an agent that may stay offline for hours.
pub fn agent_offline(shape: Shape, user: &str) -> Response<RelayBody> {
    let mut r = error(
        shape,
        StatusCode::SERVICE_UNAVAILABLE,
        "agent_not_connected",
        &format!("the agent for {user:?} is not connected to the relay"),
    );
    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("5"));
    r.headers_mut().insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
    r
}

/// Adds `Retry-After: seconds` to an answer.
pub fn retry_after(mut r: Response<RelayBody>, seconds: u64) -> Response<RelayBody> {
    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    r
}

/// Fields a tunnelled answer may not set on the relay's origin: cookies,
/// origin-wide policies (HSTS, alternative services, site-data clearing,
/// service-worker scope) and CORS, which the relay answers itself.
const ORIGIN_WIDE: [&str; 8] = [
    "set-cookie",
    "set-cookie2",
    "strict-transport-security",
    "clear-site-data",
    "alt-svc",
    "service-worker-allowed",
    "content-security-policy-report-only",
    "public-key-pins",
];

/// Sandboxes a tunnelled answer: a browser that opens it runs no script,
/// loads nothing and gets an opaque origin (no cookies, no storage of the
/// relay's origin), and does not guess a type the answer did not declare.
/// API clients ignore both headers.
const SANDBOX: HeaderValue =
    HeaderValue::from_static("sandbox; default-src 'none'; frame-ancestors 'none'");

/// Applies the origin rules to the headers of a tunnelled answer.
pub fn secure_tunnelled(headers: &mut HeaderMap) {
    // One pass over the answer's few fields: removing each name of the list
    // parsed and hashed it, ~4,000 instructions per answer that has none.
    let gone: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let n = n.as_str();
            ORIGIN_WIDE.contains(&n) || n.starts_with("access-control-")
        })
        .cloned()
        .collect();
    for name in gone {
        headers.remove(name);
    }
    headers.insert(http::header::CONTENT_SECURITY_POLICY, SANDBOX);
    headers.insert(http::header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnelled_answers_lose_cookies_and_gain_a_sandbox() {
        let mut h = HeaderMap::new();
        h.append("set-cookie", HeaderValue::from_static("relay_session=x; Path=/"));
        h.append("set-cookie", HeaderValue::from_static("b=y"));
        h.insert("strict-transport-security", HeaderValue::from_static("max-age=1"));
        h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
        h.insert("content-security-policy", HeaderValue::from_static("script-src *"));
        h.insert("content-type", HeaderValue::from_static("text/html"));
        secure_tunnelled(&mut h);
        assert!(h.get("set-cookie").is_none());
        assert!(h.get("strict-transport-security").is_none());
        assert!(h.get("access-control-allow-origin").is_none());
        assert_eq!(h["content-security-policy"], SANDBOX);
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["content-type"], "text/html");
    }
}
