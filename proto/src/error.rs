//! Validation errors: what was wrong with a frame, with a stable code.

/// One kind of protocol violation. Each has a stable name (sent as the text of
/// an `error` message) and a numeric code in the HTTP status space, so the
/// original `error` message can carry it unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// Not JSON, or JSON that does not match any message shape.
    MalformedMessage,
    /// A `type` this version does not know.
    UnknownType,
    /// A binary frame whose header is truncated or has reserved bits set.
    MalformedFrame,
    /// A text or binary frame above the negotiated size.
    FrameTooLarge,
    /// A stream id that is empty, too long or uses characters outside
    /// `[A-Za-z0-9._:-]`.
    InvalidId,
    InvalidMethod,
    InvalidPath,
    InvalidHeader,
    TooManyHeaders,
    HeadersTooLarge,
    InvalidStatus,
    /// A `window_update` with zero credit or a window above 2^31-1.
    InvalidCredit,
    /// Body bytes beyond the credit the receiver granted.
    FlowControl,
    /// A frame for a stream in a state where it is not allowed (a second
    /// head, data after the end, a duplicate request id).
    StreamState,
    /// `hello`/`welcome` with a version or limits we cannot use.
    UnsupportedVersion,
    InvalidLimits,
    /// A free-text field above its length limit.
    ReasonTooLong,
}

impl Violation {
    /// Numeric code carried in the `error` message.
    pub fn code(self) -> u16 {
        match self {
            Violation::FrameTooLarge => 413,
            Violation::TooManyHeaders | Violation::HeadersTooLarge => 431,
            Violation::UnsupportedVersion => 505,
            Violation::FlowControl | Violation::StreamState => 409,
            Violation::InvalidStatus => 502,
            _ => 400,
        }
    }

    /// Stable machine-readable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Violation::MalformedMessage => "malformed_message",
            Violation::UnknownType => "unknown_type",
            Violation::MalformedFrame => "malformed_frame",
            Violation::FrameTooLarge => "frame_too_large",
            Violation::InvalidId => "invalid_id",
            Violation::InvalidMethod => "invalid_method",
            Violation::InvalidPath => "invalid_path",
            Violation::InvalidHeader => "invalid_header",
            Violation::TooManyHeaders => "too_many_headers",
            Violation::HeadersTooLarge => "headers_too_large",
            Violation::InvalidStatus => "invalid_status",
            Violation::InvalidCredit => "invalid_credit",
            Violation::FlowControl => "flow_control",
            Violation::StreamState => "stream_state",
            Violation::UnsupportedVersion => "unsupported_version",
            Violation::InvalidLimits => "invalid_limits",
            Violation::ReasonTooLong => "reason_too_long",
        }
    }
}

/// A violation with its detail, ready to become an `error` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", kind.as_str())]
pub struct ProtocolError {
    pub kind: Violation,
    pub detail: String,
}

impl ProtocolError {
    pub fn new(kind: Violation, detail: impl Into<String>) -> Self {
        Self { kind, detail: detail.into() }
    }

    pub fn code(&self) -> u16 {
        self.kind.code()
    }
}

/// Why a receiver did not take a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// The frame broke a rule: it is answered with `error`, and the stream
    /// it named (if any) ends with it.
    Frame { err: ProtocolError, stream: Option<String> },
    /// The peer spent its budget of pings or refused frames: the session
    /// ends with close code 1008.
    Flood(crate::budget::Flood),
}

impl From<ProtocolError> for Rejected {
    fn from(err: ProtocolError) -> Self {
        Rejected::Frame { err, stream: None }
    }
}

impl From<crate::budget::Flood> for Rejected {
    fn from(flood: crate::budget::Flood) -> Self {
        Rejected::Flood(flood)
    }
}

impl Rejected {
    /// A refused frame that named stream `id`.
    pub fn on(id: &str, err: ProtocolError) -> Self {
        Rejected::Frame { err, stream: Some(id.to_owned()) }
    }
}
