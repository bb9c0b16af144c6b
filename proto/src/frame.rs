//! Binary frames: body bytes of one stream, without base64.
//!
//! ```text
//! +-------+--------+-----------------+------------------------+
//! | flags | id len | id (id len)     | payload                |
//! | 1 B   | 1 B    | ASCII, 1..=64 B | 0..=max_chunk_bytes B  |
//! +-------+--------+-----------------+------------------------+
//! flags: 0x01 END = last frame of this body; all other bits must be 0.
//! ```
//!
//! From the relay a binary frame carries request body bytes; from the agent,
//! response body bytes. The direction tells which.

use bytes::{BufMut, Bytes, BytesMut};

use crate::message::validate_id;
use crate::{ProtocolError, Violation};

pub use crate::limits::MAX_FRAME_HEADER_LEN as MAX_HEADER_LEN;

/// Flag bit: this frame ends the body.
pub const FLAG_END: u8 = 0x01;
const RESERVED: u8 = !FLAG_END;

/// One decoded binary frame. `payload` shares the frame's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFrame {
    pub id: String,
    pub end: bool,
    pub payload: Bytes,
}

/// Encodes a frame. `id` must be a valid stream id (the caller holds a
/// [`crate::StreamId`]).
pub fn encode(id: &str, end: bool, payload: &[u8]) -> Bytes {
    debug_assert!(validate_id(id).is_ok());
    let mut buf = BytesMut::with_capacity(2 + id.len() + payload.len());
    buf.put_u8(if end { FLAG_END } else { 0 });
    buf.put_u8(id.len() as u8);
    buf.put_slice(id.as_bytes());
    buf.put_slice(payload);
    buf.freeze()
}

/// The stream id a frame names, read without checking anything else: lets
/// a receiver end the stream a refused frame belonged to.
pub fn peek_id(frame: &[u8]) -> Option<&str> {
    let id_len = *frame.get(1)? as usize;
    let id = std::str::from_utf8(frame.get(2..2 + id_len)?).ok()?;
    validate_id(id).ok().map(|()| id)
}

/// Decodes a frame, refusing reserved flags, a bad id or a payload above
/// `max_payload`.
pub fn decode(frame: &Bytes, max_payload: usize) -> Result<DataFrame, ProtocolError> {
    let malformed =
        |what: &str| Err(ProtocolError::new(Violation::MalformedFrame, what.to_owned()));
    if frame.len() < 2 {
        return malformed("binary frame shorter than its 2-byte header");
    }
    let flags = frame[0];
    if flags & RESERVED != 0 {
        return malformed("reserved flag bits set");
    }
    let id_len = frame[1] as usize;
    if frame.len() < 2 + id_len {
        return malformed("binary frame shorter than its id");
    }
    let id = std::str::from_utf8(&frame[2..2 + id_len])
        .map_err(|_| ProtocolError::new(Violation::InvalidId, "stream id is not ASCII"))?;
    validate_id(id)?;
    let payload = frame.slice(2 + id_len..);
    if payload.len() > max_payload {
        return Err(ProtocolError::new(
            Violation::FrameTooLarge,
            format!("{} byte chunk, limit {max_payload}", payload.len()),
        ));
    }
    Ok(DataFrame { id: id.to_owned(), end: flags & FLAG_END != 0, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_of_a_refused_frame_can_still_be_read() {
        let mut f = encode("req_7", false, &[0u8; 100]).to_vec();
        assert_eq!(peek_id(&f), Some("req_7"));
        f[0] = 0x80;
        assert!(decode(&Bytes::from(f.clone()), 1024).is_err());
        assert_eq!(peek_id(&f), Some("req_7"));
        assert_eq!(peek_id(b"\x00"), None);
        assert_eq!(peek_id(b"\x00\x09req"), None);
        assert_eq!(peek_id(b"\x00\x02a b"), None);
    }

    #[test]
    fn frame_round_trips_with_and_without_end() {
        for end in [false, true] {
            let f = encode("req_1", end, b"\x00\xffhello");
            let d = decode(&f, 1024).expect("valid frame");
            assert_eq!(
                d,
                DataFrame {
                    id: "req_1".into(),
                    end,
                    payload: Bytes::from_static(b"\x00\xffhello")
                }
            );
        }
    }

    #[test]
    fn empty_end_frame_is_valid() {
        let d = decode(&encode("a", true, b""), 16).expect("valid");
        assert!(d.end && d.payload.is_empty());
    }

    #[test]
    fn truncated_frames_are_malformed() {
        for bytes in [&b""[..], b"\x00", b"\x00\x05abc"] {
            let err = decode(&Bytes::copy_from_slice(bytes), 16).expect_err("must fail");
            assert_eq!(err.kind, Violation::MalformedFrame, "{bytes:?}");
        }
    }

    #[test]
    fn reserved_flags_are_refused() {
        let mut f = encode("a", false, b"x").to_vec();
        f[0] = 0x80;
        assert_eq!(
            decode(&Bytes::from(f), 16).expect_err("must fail").kind,
            Violation::MalformedFrame
        );
    }

    #[test]
    fn bad_ids_are_refused() {
        assert_eq!(
            decode(&Bytes::from_static(b"\x00\x00x"), 16).expect_err("must fail").kind,
            Violation::InvalidId
        );
        assert_eq!(
            decode(&Bytes::from_static(b"\x00\x02a b"), 16).expect_err("must fail").kind,
            Violation::InvalidId
        );
        assert_eq!(
            decode(&Bytes::from_static(b"\x00\x01\xff"), 16).expect_err("must fail").kind,
            Violation::InvalidId
        );
    }

    #[test]
    fn oversized_payload_is_refused() {
        let f = encode("a", false, &[0u8; 17]);
        assert_eq!(decode(&f, 16).expect_err("must fail").kind, Violation::FrameTooLarge);
    }
}
