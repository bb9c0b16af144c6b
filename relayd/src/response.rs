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

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Response, StatusCode};

use crate::body::RelayBody;

/// The error format a client of a path expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Ollama's `{"error": "..."}`.
    Ollama,
    /// OpenAI's `{"error": {"message", "type", "code"}}`, for `/v1/*`.
    OpenAi,
}

impl Shape {
    /// The shape for a request to `path` at the local service.
    pub fn of(path: &str) -> Shape {
        if path == "/v1" || path.starts_with("/v1/") || path.starts_with("/v1?") {
            Shape::OpenAi
        } else {
            Shape::Ollama
        }
    }
}

/// What a stream that fails after its head can still say, by its content
/// type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trailer {
    /// Cut off: the client sees a truncated body.
    None,
    /// `application/x-ndjson`: a last `{"error": "..."}` line, as Ollama
    /// ends a stream that fails.
    NdjsonLine,
    /// `text/event-stream`: a last `data: {"error": {...}}` event, which the
    /// `openai` SDK raises as an `APIError` with the message.
    SseEvent,
}

impl Trailer {
    /// The bytes that end a failed stream with `message`, if the format has
    /// a way to say so.
    pub fn bytes(self, code: &str, message: &str) -> Option<Bytes> {
        match self {
            Trailer::None => None,
            Trailer::NdjsonLine => {
                Some(Bytes::from(serde_json::json!({ "error": message }).to_string() + "\n"))
            }
            Trailer::SseEvent => {
                let event = serde_json::json!({
                    "error": { "message": message, "type": "server_error", "code": code }
                });
                Some(Bytes::from(format!("data: {event}\n\n")))
            }
        }
    }
}

/// The OpenAI error `type` for a status.
fn openai_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

/// A stable machine-readable code for an error the relay did not name
/// itself (an agent's `error` or `cancel`).
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        403 => "forbidden",
        404 => "not_found",
        408 => "request_timeout",
        413 => "payload_too_large",
        429 => "too_many_requests",
        502 => "upstream_failed",
        503 => "unavailable",
        504 => "timeout",
        s if s >= 500 => "server_error",
        _ => "bad_request",
    }
}

/// The JSON text of an error.
pub fn error_body(shape: Shape, status: StatusCode, code: &str, message: &str) -> String {
    match shape {
        Shape::Ollama => serde_json::json!({ "error": message }).to_string(),
        Shape::OpenAi => serde_json::json!({
            "error": { "message": message, "type": openai_type(status), "code": code }
        })
        .to_string(),
    }
}

/// A JSON error answer in `shape`.
pub fn error(shape: Shape, status: StatusCode, code: &str, message: &str) -> Response<RelayBody> {
    let mut resp = Response::new(RelayBody::full(error_body(shape, status, code, message)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Why a request carried no usable credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unauthorized {
    /// No `Authorization: Bearer` at all.
    Missing,
    /// A token that is not valid here.
    Invalid,
}

/// 401 with `WWW-Authenticate: Bearer` (RFC 6750): without an `error`
/// attribute when no token came, `error="invalid_token"` when one did.
pub fn unauthorized(shape: Shape, why: Unauthorized, message: &str) -> Response<RelayBody> {
    let (code, challenge) = match why {
        Unauthorized::Missing => ("missing_token", "Bearer realm=\"relayd\""),
        Unauthorized::Invalid => {
            ("invalid_token", "Bearer realm=\"relayd\", error=\"invalid_token\"")
        }
    };
    let mut r = error(shape, StatusCode::UNAUTHORIZED, code, message);
    r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    r
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
    for name in ORIGIN_WIDE {
        headers.remove(name);
    }
    let cors: Vec<HeaderName> =
        headers.keys().filter(|n| n.as_str().starts_with("access-control-")).cloned().collect();
    for name in cors {
        headers.remove(name);
    }
    headers.insert(http::header::CONTENT_SECURITY_POLICY, SANDBOX);
    headers.insert(http::header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_paths_get_openai_errors_and_the_rest_ollama_errors() {
        assert_eq!(Shape::of("/v1/chat/completions"), Shape::OpenAi);
        assert_eq!(Shape::of("/v1"), Shape::OpenAi);
        assert_eq!(Shape::of("/v1?x=1"), Shape::OpenAi);
        assert_eq!(Shape::of("/api/chat"), Shape::Ollama);
        assert_eq!(Shape::of("/v10/x"), Shape::Ollama);
        let v: serde_json::Value = serde_json::from_str(&error_body(
            Shape::OpenAi,
            StatusCode::SERVICE_UNAVAILABLE,
            "agent_not_connected",
            "m",
        ))
        .expect("json");
        assert_eq!(v["error"]["message"], "m");
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["code"], "agent_not_connected");
        let v: serde_json::Value =
            serde_json::from_str(&error_body(Shape::Ollama, StatusCode::BAD_GATEWAY, "x", "m"))
                .expect("json");
        assert_eq!(v, serde_json::json!({ "error": "m" }));
    }

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

    #[test]
    fn failed_streams_end_in_their_own_format() {
        assert_eq!(Trailer::None.bytes("c", "m"), None);
        assert_eq!(
            Trailer::NdjsonLine.bytes("c", "boom").expect("a line"),
            Bytes::from_static(b"{\"error\":\"boom\"}\n")
        );
        let sse = Trailer::SseEvent.bytes("upstream_failed", "boom").expect("an event");
        let text = std::str::from_utf8(&sse).expect("utf-8");
        let json = text.strip_prefix("data: ").and_then(|t| t.strip_suffix("\n\n")).expect("event");
        let v: serde_json::Value = serde_json::from_str(json).expect("json");
        assert_eq!(v["error"]["message"], "boom");
        assert_eq!(v["error"]["code"], "upstream_failed");
    }
}
