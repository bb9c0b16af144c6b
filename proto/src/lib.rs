//! The tunnel protocol spoken between relayd and agentd over one WebSocket.
//!
//! This crate is the single owner of every wire message, its validation, the
//! protocol version, the limits and the flow-control rules. It does no network
//! I/O: both daemons hand it frames and get back validated domain types.
//!
//! - JSON text frames carry [`Message`]s (the five original messages plus the
//!   negotiated extensions).
//! - Binary frames carry body bytes, tagged with the stream id ([`frame`]).
//! - [`flow`] holds the per-stream credit windows and the bounded inbox that
//!   buffers body bytes between the socket and the HTTP side.
//!
//! `docs/PROTOCOL.md` is the human-readable specification of the same rules.

pub mod budget;
pub mod control;
pub mod encode;
pub mod error;
pub mod exchange;
pub mod flow;
pub mod frame;
pub mod headers;
pub mod limits;
pub mod liveness;
pub mod message;
pub mod path;

pub use encode::{Encoder, Frame, OutBody, RequestOut};
pub use error::{ProtocolError, Violation};
pub use exchange::{RequestBody, ResponseHead, StreamId, TunnelRequest};
pub use headers::Headers;
pub use limits::Limits;
pub use message::{
    Ack, Auth, Authorized, Cancel, Credential, Empty, ErrorMsg, Goaway, Hello, HttpRequestMsg,
    HttpResponseMsg, Message, Ping, ResponseHeadMsg, Rotated, ServiceState, Welcome, WindowUpdate,
};

/// Version of the extended protocol negotiated by `hello`/`welcome`.
///
/// Version 0 is the original five-message protocol; it has no `hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The WebSocket subprotocol an extended agent offers when it connects. A
/// relay that sees it expects `hello` as the first message; an agent that does
/// not offer it is an original (version 0) agent.
pub const SUBPROTOCOL: &str = "llm-tunnel.v1";

/// The header a relay's 401 names its reason in (`missing_token`,
/// `invalid_token`, `expired_token`, `revoked_token`), whatever the shape of
/// its body.
pub const ERROR_CODE_HEADER: &str = "x-tunnel-error";

/// The `code` of the relay's 401 answer to `/ws/tunnel` when the agent's
/// credential (or the credential its token was minted for) was revoked: a
/// new credential is needed, and retrying the old one will not help.
pub const REVOKED_TOKEN: &str = "revoked_token";

/// The WebSocket close code of a session whose credential was revoked.
pub const CLOSE_REVOKED: u16 = 4004;

/// Capabilities of protocol version 1. A peer only uses a capability both
/// sides listed in `hello`/`welcome`.
pub mod capability {
    /// `response_head` + binary body chunks + end flag.
    pub const STREAM_RESPONSE: &str = "stream_response";
    /// `http_request` with `body_follows` + binary body chunks.
    pub const STREAM_REQUEST: &str = "stream_request";
    /// `cancel` in either direction.
    pub const CANCEL: &str = "cancel";
    /// Per-stream credit with `window_update`.
    pub const FLOW_CONTROL: &str = "flow_control";
    /// `goaway` before a relay drains.
    pub const GOAWAY: &str = "goaway";
    /// `ack` when an agent accepts a request.
    pub const ACK: &str = "ack";
    /// In-band re-authentication, access-token refresh and credential
    /// rotation (`auth`, `refresh`, `authorized`, `rotate`, `credential`,
    /// `rotated`).
    pub const AUTH: &str = "auth";
    /// `service`: the agent reports its local service's health.
    pub const SERVICE: &str = "service";

    /// Everything version 1 defines, in the order it is advertised.
    pub const ALL: &[&str] =
        &[STREAM_RESPONSE, STREAM_REQUEST, CANCEL, FLOW_CONTROL, GOAWAY, ACK, AUTH, SERVICE];

    /// What every version-1 peer must offer: without them a session cannot
    /// stream, cancel or bound its memory.
    pub const REQUIRED: &[&str] = &[STREAM_RESPONSE, STREAM_REQUEST, CANCEL, FLOW_CONTROL];

    /// The first required capability `offered` lacks.
    pub fn missing(offered: &[String]) -> Option<&'static str> {
        REQUIRED.iter().copied().find(|c| !offered.iter().any(|o| o == c))
    }
}
