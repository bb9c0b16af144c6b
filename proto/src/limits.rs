//! Explicit protocol limits, their defaults and how two peers combine them.

use serde::{Deserialize, Serialize};

/// Largest JSON control message (text frame) of an extended session. Bodies
/// travel in binary frames, so control messages are small.
pub const DEFAULT_MAX_CONTROL_BYTES: u32 = 1024 * 1024;
/// Largest text frame an original (version 0) agent may send: its whole
/// response body travels inside one `http_response`.
pub const LEGACY_MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;
/// Largest body payload in one binary frame. Small enough that a bulk
/// transfer does not hold a token stream behind it for long.
pub const DEFAULT_MAX_CHUNK_BYTES: u32 = 64 * 1024;
/// Upper bound any peer may advertise for `max_chunk_bytes`.
pub const MAX_CHUNK_BYTES_CEILING: u32 = 1024 * 1024;
/// Bytes a receiver buffers per stream before the sender must wait for credit.
pub const DEFAULT_INITIAL_WINDOW: u32 = 256 * 1024;
/// Largest credit a window may hold (as in HTTP/2).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;
/// Streams in flight on one session.
pub const DEFAULT_MAX_STREAMS: u32 = 256;
/// Header fields in one request or response head: hyper's own default.
pub const DEFAULT_MAX_HEADERS: u32 = HYPER_MAX_HEADERS;
/// The header fields hyper parses when told no limit, in tables on the
/// stack. Told a limit, it allocates and fills two tables of that size for
/// every head it parses (~3,000 instructions per request at 128).
const HYPER_MAX_HEADERS: u32 = 100;

/// What to tell hyper's HTTP/1 server or client of `max_headers`: nothing
/// (`None`) when it is hyper's own default, which costs nothing per head.
pub fn hyper_max_headers(max_headers: u32) -> Option<usize> {
    (max_headers != HYPER_MAX_HEADERS).then_some(max_headers as usize)
}
/// Bytes of header names plus values in one head.
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 64 * 1024;
/// Length of a stream id (`req_...`).
pub const MAX_ID_LEN: usize = 64;
/// The longest binary frame header: flags, id length and the id.
pub const MAX_FRAME_HEADER_LEN: usize = 2 + MAX_ID_LEN;
/// Length of a request path including its query string.
pub const MAX_PATH_LEN: usize = 16 * 1024;
/// Length of a free-text reason (`cancel`, `goaway`, `error`).
pub const MAX_REASON_LEN: usize = 1024;
/// Length of an HTTP method token.
pub const MAX_METHOD_LEN: usize = 32;

/// The limits an operator may set in a daemon's `[limits]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    pub stream_window: Option<u32>,
    pub max_chunk_bytes: Option<u32>,
    pub max_streams: Option<u32>,
    pub max_headers: Option<u32>,
}

/// Limits one peer announces in `hello` (agent) or `welcome` (relay).
///
/// Each field describes what the *announcing* side accepts: the window is how
/// much it buffers per stream, the chunk size the largest binary payload it
/// takes. Fields missing on the wire take the defaults, so a peer may announce
/// only what it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    pub max_control_bytes: u32,
    pub max_chunk_bytes: u32,
    pub initial_window: u32,
    pub max_streams: u32,
    pub max_headers: u32,
    pub max_header_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_control_bytes: DEFAULT_MAX_CONTROL_BYTES,
            max_chunk_bytes: DEFAULT_MAX_CHUNK_BYTES,
            initial_window: DEFAULT_INITIAL_WINDOW,
            max_streams: DEFAULT_MAX_STREAMS,
            max_headers: DEFAULT_MAX_HEADERS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        }
    }
}

impl Limits {
    /// Checks that announced limits are usable: nothing zero, nothing beyond
    /// the protocol ceilings.
    pub fn validate(&self) -> Result<(), crate::ProtocolError> {
        use crate::Violation::InvalidLimits;
        let bad = |what: &str| Err(crate::ProtocolError::new(InvalidLimits, what.to_owned()));
        if self.max_control_bytes < 4096 {
            return bad("max_control_bytes must be at least 4096");
        }
        if self.max_chunk_bytes == 0 || self.max_chunk_bytes > MAX_CHUNK_BYTES_CEILING {
            return bad("max_chunk_bytes must be within 1..=1048576");
        }
        if self.initial_window == 0 || self.initial_window > MAX_WINDOW {
            return bad("initial_window must be within 1..=2147483647");
        }
        if self.max_streams == 0 || self.max_headers == 0 || self.max_header_bytes == 0 {
            return bad("max_streams, max_headers and max_header_bytes must be positive");
        }
        Ok(())
    }

    /// The limits with what a daemon's configuration sets (the rest keep
    /// their defaults), checked.
    pub fn with_overrides(o: LimitOverrides) -> Result<Limits, crate::ProtocolError> {
        let d = Limits::default();
        let limits = Limits {
            initial_window: o.stream_window.unwrap_or(d.initial_window),
            max_chunk_bytes: o.max_chunk_bytes.unwrap_or(d.max_chunk_bytes),
            max_streams: o.max_streams.unwrap_or(d.max_streams),
            max_headers: o.max_headers.unwrap_or(d.max_headers),
            ..d
        };
        limits.validate()?;
        Ok(limits)
    }

    /// The largest WebSocket message a peer that announced these limits
    /// may receive: a control message, or one body chunk with its frame
    /// header (flags, id length, id).
    pub fn max_message_bytes(&self) -> usize {
        (self.max_control_bytes as usize).max(self.max_chunk_bytes as usize + MAX_FRAME_HEADER_LEN)
    }

    /// What a sender may put in one binary frame towards a peer that
    /// announced `peer`: the smaller of both chunk sizes.
    pub fn chunk_towards(&self, peer: &Limits) -> usize {
        self.max_chunk_bytes.min(peer.max_chunk_bytes) as usize
    }
}

/// Longest token or credential a message may carry.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
