//! The error formats clients expect: which [`Shape`] a path's clients read
//! (OpenAI's error object on `/v1/*`, Ollama's `{"error": ...}` elsewhere),
//! the stable codes, and how a stream that fails after its head ends in its
//! own format ([`Trailer`]).

use bytes::Bytes;
use http::StatusCode;

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
