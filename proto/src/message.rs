//! Control messages (JSON text frames): the five original messages, the
//! version-1 extensions and their validation. The domain types they are
//! checked into live in [`crate::exchange`].

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

mod validate;

pub use crate::limits::MAX_TOKEN_LEN;
pub use validate::validate_id;
pub(crate) use validate::validate_status;

use crate::limits::MAX_REASON_LEN;
use crate::{Headers, Limits, ProtocolError, Violation};

/// Every message of the protocol, tagged by its `type` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Relay -> agent: one HTTP request (original; `body_follows` added).
    HttpRequest(HttpRequestMsg),
    /// Agent -> relay: one whole HTTP response (original).
    HttpResponse(HttpResponseMsg),
    /// Either way: liveness probe (original).
    Ping(Ping),
    /// Either way: answer to `ping`, echoing its id (original).
    Pong(Ping),
    /// Either way: a request failed, or a frame was refused (original).
    Error(ErrorMsg),
    /// Agent -> relay, first message of a version-1 session.
    Hello(Hello),
    /// Relay -> agent, answer to `hello`.
    Welcome(Welcome),
    /// Agent -> relay: status and headers; the body follows in binary frames.
    ResponseHead(ResponseHeadMsg),
    /// Either way: abandon a stream.
    Cancel(Cancel),
    /// Either way: the receiver of a stream's body grants more credit.
    WindowUpdate(WindowUpdate),
    /// Relay -> agent: the relay is draining; reconnect later or elsewhere.
    Goaway(Goaway),
    /// Agent -> relay: the agent took the request and is forwarding it.
    Ack(Ack),
    /// Agent -> relay (`auth`): re-authenticate the live session with a
    /// fresh token for the same user.
    Auth(Auth),
    /// Agent -> relay (`auth`): mint a fresh access token for the
    /// credential this session was opened with.
    Refresh(Empty),
    /// Relay -> agent (`auth`): the session is authorized until
    /// `expires_at`; with `token`, a fresh access token.
    Authorized(Authorized),
    /// Agent -> relay (`auth`): issue a new credential for this user.
    Rotate(Empty),
    /// Relay -> agent (`auth`): a new credential; valid at once, and the old
    /// one is revoked only after `rotated` confirms it was stored.
    Credential(Credential),
    /// Agent -> relay (`auth`): credential `id` is stored; revoke the one
    /// this session was opened with.
    Rotated(Rotated),
    /// Agent -> relay (`service`): the local service as the agent last saw
    /// it, for the relay's health answer.
    Service(ServiceState),
}

/// `auth`: a fresh token (a JWT or an agent credential).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    pub token: String,
}

/// A message without fields (`refresh`, `rotate`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authorized {
    /// RFC 3339 time after which the session ends unless re-authenticated;
    /// absent: no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// A fresh access token (JWT) for the session's credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// The credential's id (`c_...`), for `rotated` and for revocation.
    pub id: String,
    /// The whole credential (`tcred_...`); secret: store it mode 0600.
    pub secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotated {
    pub id: String,
}

/// `service`: what the agent saw of its local service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    pub reachable: bool,
    /// The service's version (Ollama's `GET /api/version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Models loaded in memory (Ollama's `GET /api/ps`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Models the service has (Ollama's `GET /api/tags`, or `GET
    /// /v1/models`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub available: Vec<String>,
    /// When it was checked (RFC 3339).
    pub checked_at: String,
    /// What the service told of its models' sizes and context lengths, for
    /// those it told anything of. At most [`MAX_SERVICE_AVAILABLE`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ModelDetail>,
    /// Models requests the agent carried are loading now: the service has
    /// not answered them yet, and the model was not in memory. At most
    /// [`MAX_SERVICE_MODELS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loading: Vec<String>,
    /// The owner's preference for this device among the user's devices
    /// (agentd's `[routing] priority`): higher first where devices are
    /// otherwise equal. 0 when absent; at most [`MAX_PRIORITY`] either way.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// The owner asks that requests for a model this device is loading go
    /// to another device that has it, rather than wait for the load
    /// (agentd's `[routing] wait_for_load = false`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub spread_loads: bool,
}

/// What a service told of one of its models.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDetail {
    pub name: String,
    /// Bytes on disk (Ollama's `GET /api/tags`, `size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The context length it runs with, in tokens, while loaded (Ollama's
    /// `GET /api/ps`, `context_length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
}

/// The largest device priority, either way.
pub const MAX_PRIORITY: i32 = 1000;

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// Most loaded models a `service` message lists.
pub const MAX_SERVICE_MODELS: usize = 64;
/// Most models present a `service` message lists.
pub const MAX_SERVICE_AVAILABLE: usize = 512;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpRequestMsg {
    pub id: String,
    pub method: String,
    /// Path and query string as the local service should see them.
    pub path: String,
    #[serde(default)]
    pub headers: Headers,
    /// Whole body as a string (original form). Absent when `body_follows`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Version 1: the body follows as binary frames ending with the end flag.
    #[serde(default, skip_serializing_if = "is_false")]
    pub body_follows: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpResponseMsg {
    pub id: String,
    pub status: u16,
    #[serde(default)]
    pub headers: Headers,
    #[serde(default)]
    pub body: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    pub id: String,
    /// RFC 3339 time the ping was sent; a pong echoes it.
    #[serde(default)]
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// The request this error ends; empty for an error about the session.
    #[serde(default)]
    pub id: String,
    pub error: String,
    pub code: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// Software name and version, e.g. `agentd/0.1.0`. Informational.
    #[serde(default)]
    pub agent: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u32,
    pub session_id: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    /// `auth`: when the session's authorization ends unless the agent
    /// re-authenticates (RFC 3339); absent: no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// `auth`: an access token minted for the credential the agent
    /// connected with, for its next connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseHeadMsg {
    pub id: String,
    pub status: u16,
    #[serde(default)]
    pub headers: Headers,
    /// False when the response has no body (HEAD, 204, 304): the stream ends
    /// with this message.
    #[serde(default)]
    pub body_follows: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    pub id: String,
    #[serde(default)]
    pub reason: String,
}

/// The agent accepted a request (`ack` capability): it passed the agent's
/// checks and is on its way to the local service. Starts nothing; it stops
/// the relay's acknowledgement timer, which tells a stuck agent from a model
/// that is slow to load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowUpdate {
    pub id: String,
    /// Bytes added to the sender's window for this stream.
    pub credit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goaway {
    #[serde(default)]
    pub reason: String,
    /// How long the agent should wait before reconnecting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The `type` names this version understands.
pub const KNOWN_TYPES: &[&str] = &[
    "http_request",
    "http_response",
    "ping",
    "pong",
    "error",
    "hello",
    "welcome",
    "response_head",
    "cancel",
    "window_update",
    "goaway",
    "ack",
    "auth",
    "refresh",
    "authorized",
    "rotate",
    "credential",
    "rotated",
    "service",
];

impl Message {
    /// Parses and validates one text frame.
    pub fn decode(text: &str, limits: &Limits) -> Result<Message, ProtocolError> {
        if text.len() > limits.max_control_bytes as usize {
            return Err(ProtocolError::new(
                Violation::FrameTooLarge,
                format!("{} byte message, limit {}", text.len(), limits.max_control_bytes),
            ));
        }
        let msg = match decode_tagged_first(text) {
            Some(parsed) => parsed,
            None => serde_json::from_str(text),
        }
        .map_err(|e| classify(text, e))?;
        msg.validate(limits)?;
        Ok(msg)
    }

    /// Serialises to the JSON text of a text frame.
    pub fn encode(&self) -> String {
        // Every field is a string, number, bool or string-keyed map: JSON
        // serialisation of these types cannot fail.
        serde_json::to_string(self).expect("protocol messages always serialise")
    }

    /// The message's `type` on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::HttpRequest(_) => "http_request",
            Message::HttpResponse(_) => "http_response",
            Message::Ping(_) => "ping",
            Message::Pong(_) => "pong",
            Message::Error(_) => "error",
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::ResponseHead(_) => "response_head",
            Message::Cancel(_) => "cancel",
            Message::WindowUpdate(_) => "window_update",
            Message::Goaway(_) => "goaway",
            Message::Ack(_) => "ack",
            Message::Auth(_) => "auth",
            Message::Refresh(_) => "refresh",
            Message::Authorized(_) => "authorized",
            Message::Rotate(_) => "rotate",
            Message::Credential(_) => "credential",
            Message::Rotated(_) => "rotated",
            Message::Service(_) => "service",
        }
    }

    /// The refusal of a message its receiver's side never accepts.
    pub fn not_allowed(&self, from: &str) -> ProtocolError {
        ProtocolError::new(
            Violation::StreamState,
            format!("{} is not allowed from {from} at this point", self.kind()),
        )
    }

    /// An `error` message ending request `id` with an HTTP-style `code`.
    pub fn error(id: impl Into<String>, code: u16, text: impl Into<String>) -> Message {
        let mut error: String = text.into();
        truncate_utf8(&mut error, MAX_REASON_LEN);
        Message::Error(ErrorMsg { id: id.into(), error, code })
    }

    /// An `error` message reporting a refused frame.
    pub fn violation(id: Option<&str>, err: &ProtocolError) -> Message {
        let id = id.filter(|i| validate_id(i).is_ok()).unwrap_or_default();
        Message::error(id, err.code(), err.to_string())
    }

    /// A `ping` stamped with the current time.
    pub fn ping(id: impl Into<String>) -> Message {
        Message::Ping(Ping { id: id.into(), timestamp: now_rfc3339() })
    }

    /// The `pong` answering `ping`: same id, same timestamp.
    pub fn pong(ping: &Ping) -> Message {
        Message::Pong(ping.clone())
    }

    pub fn ack(id: impl Into<String>) -> Message {
        Message::Ack(Ack { id: id.into() })
    }

    pub fn cancel(id: impl Into<String>, reason: impl Into<String>) -> Message {
        let mut reason: String = reason.into();
        truncate_utf8(&mut reason, MAX_REASON_LEN);
        Message::Cancel(Cancel { id: id.into(), reason })
    }
}

/// Current UTC time in RFC 3339 with milliseconds, as in `ping`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The `type` and `id` of a text frame, read without validating anything
/// else: lets a receiver answer a refused frame for the right stream.
#[derive(Debug, Default, Deserialize)]
pub struct Peek {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
}

impl Peek {
    pub fn of(text: &str) -> Peek {
        serde_json::from_str(text).unwrap_or_default()
    }

    /// The id, if it is a valid stream id.
    pub fn stream_id(&self) -> Option<&str> {
        self.id.as_deref().filter(|i| validate_id(i).is_ok())
    }
}

/// A message whose `type` comes first, as every encoder of this crate (and
/// serde's) writes it, parsed straight into its variant's struct (which
/// skips the `type` field as unknown). serde parses an internally tagged
/// enum by first copying the whole message into a generic tree, one
/// allocation per string, and then reading that: a third of what a small
/// request cost the relay in parsing. `None`: anything else, left to that
/// general path, which gives the same result more slowly.
fn decode_tagged_first(text: &str) -> Option<serde_json::Result<Message>> {
    use serde_json::from_str as parse;
    let rest = text.strip_prefix("{\"type\":\"")?;
    let kind = &rest[..rest.find('"')?];
    Some(match kind {
        "http_request" => parse(text).map(Message::HttpRequest),
        "response_head" => parse(text).map(Message::ResponseHead),
        "http_response" => parse(text).map(Message::HttpResponse),
        "window_update" => parse(text).map(Message::WindowUpdate),
        "cancel" => parse(text).map(Message::Cancel),
        "ack" => parse(text).map(Message::Ack),
        "error" => parse(text).map(Message::Error),
        "ping" => parse(text).map(Message::Ping),
        "pong" => parse(text).map(Message::Pong),
        _ => return None,
    })
}

/// Tells a frame with an unknown `type` (which a peer may answer and then
/// ignore) from one that is not a message at all.
fn classify(text: &str, err: serde_json::Error) -> ProtocolError {
    let peek = Peek::of(text);
    match &peek.kind {
        Some(kind) if !KNOWN_TYPES.contains(&kind.as_str()) => {
            let mut kind = kind.clone();
            truncate_utf8(&mut kind, 64);
            let mut e =
                ProtocolError::new(Violation::UnknownType, format!("unknown type {kind:?}"));
            if let Some(id) = peek.stream_id() {
                e.detail.push_str(&format!(" (id {id})"));
            }
            e
        }
        _ => ProtocolError::new(Violation::MalformedMessage, err.to_string()),
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
}
