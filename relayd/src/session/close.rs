//! Why a relay session ended: the reason its streams and the close frame
//! tell, and how a link's end reads as one.

use link::End;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tunnel_proto::budget::Flood;

/// Close code: the session's token expired unrenewed.
pub const TOKEN_EXPIRED: u16 = 4003;
/// Close code: the session's credential was revoked.
pub const REVOKED: u16 = tunnel_proto::CLOSE_REVOKED;

/// Why a session ended, as its streams and the close frame tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer session for the same device of the same user took over.
    Replaced,
    /// The agent closed the socket or it failed.
    Disconnected,
    /// The relay is shutting down.
    Shutdown,
    /// The agent broke the protocol beyond repair.
    ProtocolError,
    /// Nothing arrived from the agent for too many ping intervals.
    Unresponsive,
    /// A text frame that is not UTF-8.
    InvalidData,
    /// A message above the WebSocket size limit.
    TooBig,
    /// The agent spent its budget of pings or refused frames.
    Flooded(Flood),
    /// The agent stopped reading: replies to it piled up beyond the bound.
    NotReading,
    /// An operator disconnected the tunnel.
    OperatorDisconnect,
    /// The session's token expired and was not renewed in-band.
    TokenExpired,
    /// The credential or token the session was opened with was revoked.
    Revoked,
    /// Its user had as many other devices connected as the relay allows.
    TooManyDevices,
}

impl CloseReason {
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Replaced => "agent session replaced by a newer connection",
            CloseReason::Disconnected => "agent disconnected",
            CloseReason::Shutdown => "relay shutting down",
            CloseReason::ProtocolError => "agent violated the tunnel protocol",
            CloseReason::Unresponsive => "agent stopped answering pings",
            CloseReason::InvalidData => "agent sent a text frame that is not UTF-8",
            CloseReason::TooBig => "agent sent a message above the size limit",
            CloseReason::Flooded(Flood::Pings) => "agent sent too many pings",
            CloseReason::Flooded(Flood::Refusals) => "agent sent too many invalid frames",
            CloseReason::NotReading => "agent is not reading the relay's messages",
            CloseReason::OperatorDisconnect => "tunnel disconnected by the relay's operator",
            CloseReason::TokenExpired => "the session's token expired",
            CloseReason::Revoked => "the agent's credential was revoked",
            CloseReason::TooManyDevices => {
                "the user has as many devices connected as the relay allows"
            }
        }
    }

    /// The close code for a session the relay ends itself.
    pub(crate) fn close_code(self) -> CloseCode {
        match self {
            CloseReason::Replaced => CloseCode::Library(4000),
            CloseReason::Shutdown => CloseCode::Away,
            CloseReason::ProtocolError => CloseCode::Protocol,
            CloseReason::Unresponsive => CloseCode::Library(link::UNRESPONSIVE),
            CloseReason::InvalidData => CloseCode::Invalid,
            CloseReason::TooBig => CloseCode::Size,
            CloseReason::Flooded(_) | CloseReason::NotReading | CloseReason::TooManyDevices => {
                CloseCode::Policy
            }
            CloseReason::Disconnected | CloseReason::OperatorDisconnect => CloseCode::Normal,
            CloseReason::TokenExpired => CloseCode::Library(TOKEN_EXPIRED),
            CloseReason::Revoked => CloseCode::Library(REVOKED),
        }
    }

    /// How a link's end reads as a session's.
    pub(crate) fn of(end: &End) -> Self {
        match end {
            End::Failed { code: Some(1007), .. } => CloseReason::InvalidData,
            End::Failed { code: Some(1009), .. } => CloseReason::TooBig,
            End::Failed { code: Some(1002), .. } => CloseReason::ProtocolError,
            End::Flooded(f) => CloseReason::Flooded(*f),
            End::NotReading => CloseReason::NotReading,
            End::Unresponsive(_) => CloseReason::Unresponsive,
            End::PeerClosed(_) | End::Failed { .. } | End::Closed => CloseReason::Disconnected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_end_reads_as_the_close_reason_an_operator_understands() {
        let failed = |code| End::Failed { code: Some(code), error: String::new() };
        assert_eq!(CloseReason::of(&failed(1007)), CloseReason::InvalidData);
        assert_eq!(CloseReason::of(&failed(1009)), CloseReason::TooBig);
        assert_eq!(
            CloseReason::of(&End::Flooded(Flood::Pings)),
            CloseReason::Flooded(Flood::Pings)
        );
        assert_eq!(CloseReason::of(&End::PeerClosed(None)), CloseReason::Disconnected);
        assert_eq!(CloseReason::Replaced.close_code(), CloseCode::Library(4000));
        assert_eq!(CloseReason::Unresponsive.close_code(), CloseCode::Library(4001));
    }
}
