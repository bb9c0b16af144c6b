//! The sending side of the protocol, the mirror of [`crate::exchange`]:
//! domain values in, the [`Frame`]s that carry them out. relayd and agentd
//! say what they mean (open a stream with this request, answer with this
//! head, these body bytes, this control message) and queue the frame this
//! module returns; which WebSocket frame type and which encoding carry it
//! is decided here and nowhere else, so a second encoding (binary heads for
//! peers that negotiate it) is a change in this crate.

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::exchange::StreamId;
use crate::message::{HttpRequestMsg, Message, ResponseHeadMsg};
use crate::{Headers, Limits, ProtocolError, Violation, frame};

/// The payload of one WebSocket data frame, and its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A JSON control message.
    Text(String),
    /// A body frame ([`crate::frame`]).
    Binary(Bytes),
}

impl Frame {
    /// A control message.
    pub fn message(msg: &Message) -> Self {
        Self::Text(msg.encode())
    }

    /// Body bytes of stream `id`; `end` marks the last frame of the body.
    pub fn data(id: &StreamId, end: bool, payload: &[u8]) -> Self {
        Self::Binary(frame::encode(id.as_str(), end, payload))
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the body of a request being sent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutBody {
    /// The request has no body.
    None,
    /// Body frames follow the request, the last with the end flag.
    Follows,
    /// The whole body, inline: the original protocol's form, for agents that
    /// cannot stream a request body.
    Inline(String),
}

/// A request to open stream `id` with: what the relay sends.
#[derive(Debug, Clone)]
pub struct RequestOut<'a> {
    pub id: &'a StreamId,
    pub method: &'a Method,
    /// Path and query at the local service.
    pub target: &'a str,
    /// Headers without hop-by-hop fields.
    pub headers: Headers,
    pub body: OutBody,
}

/// Encodes heads for one peer, under the limits it announced.
#[derive(Debug, Clone)]
pub struct Encoder {
    peer: Limits,
}

impl Encoder {
    /// An encoder for a peer that announced `peer` (defaults for original
    /// peers, which announce nothing).
    pub fn new(peer: Limits) -> Self {
        Self { peer }
    }

    /// The limits the peer announced.
    pub fn peer(&self) -> &Limits {
        &self.peer
    }

    /// The frame that opens a stream with `req`, or why the peer would
    /// refuse it: the checks the receiving side makes (id, method, path,
    /// header counts and sizes), and the peer's limit on a control message.
    /// An inline body is bounded by the caller instead: original peers have
    /// no such limit.
    pub fn request(&self, req: RequestOut<'_>) -> Result<Frame, ProtocolError> {
        let inline = matches!(req.body, OutBody::Inline(_));
        let (body, follows) = match req.body {
            OutBody::None => (None, false),
            OutBody::Follows => (None, true),
            OutBody::Inline(text) => (Some(text), false),
        };
        let msg = HttpRequestMsg::new(req.id, req.method, req.target, req.headers, body, follows);
        msg.check(&self.peer)?;
        let text = Message::HttpRequest(msg).encode();
        if !inline && text.len() > self.peer.max_control_bytes as usize {
            return Err(ProtocolError::new(
                Violation::HeadersTooLarge,
                "request head too large for the agent",
            ));
        }
        Ok(Frame::Text(text))
    }

    /// The frame that answers stream `id` with a head; body frames follow
    /// when `body_follows`.
    pub fn response_head(
        &self,
        id: &StreamId,
        status: StatusCode,
        headers: Headers,
        body_follows: bool,
    ) -> Frame {
        Frame::message(&Message::ResponseHead(ResponseHeadMsg::new(
            id,
            status,
            headers,
            body_follows,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> StreamId {
        StreamId::new("s1").expect("valid id")
    }

    fn request(encoder: &Encoder, target: &str, headers: Headers, body: OutBody) -> Frame {
        let id = id();
        let req = RequestOut { id: &id, method: &Method::POST, target, headers, body };
        encoder.request(req).expect("a valid request")
    }

    #[test]
    fn a_request_decodes_on_the_other_side_as_what_was_sent() {
        let encoder = Encoder::new(Limits::default());
        let headers = Headers(vec![("content-type".into(), "application/json".into())]);
        let Frame::Text(text) = request(&encoder, "/api/chat?x=1", headers, OutBody::Follows)
        else {
            panic!("a request is a text frame");
        };
        let Message::HttpRequest(msg) = Message::decode(&text, &Limits::default()).expect("valid")
        else {
            panic!("an http_request");
        };
        let req = msg.into_request(&Limits::default()).expect("valid request");
        assert_eq!(req.id, id());
        assert_eq!(req.method, Method::POST);
        assert_eq!(req.path.as_str(), "/api/chat?x=1");
        assert_eq!(req.headers["content-type"], "application/json");
        assert_eq!(req.body, crate::RequestBody::Streamed);
    }

    #[test]
    fn a_request_the_peer_would_refuse_is_refused_here() {
        let encoder = Encoder::new(Limits::default());
        let id = id();
        let bad_path = RequestOut {
            id: &id,
            method: &Method::GET,
            target: "no-slash",
            headers: Headers::default(),
            body: OutBody::None,
        };
        assert_eq!(encoder.request(bad_path).expect_err("refused").kind, Violation::InvalidPath);
    }

    #[test]
    fn a_head_above_the_peers_control_limit_is_refused_but_an_inline_body_is_not() {
        let encoder = Encoder::new(Limits { max_control_bytes: 4096, ..Limits::default() });
        let id = id();
        let long = format!("/api/chat?q={}", "z".repeat(5000));
        let req = |target, body| RequestOut {
            id: &id,
            method: &Method::POST,
            target,
            headers: Headers::default(),
            body,
        };
        let err = encoder.request(req(&long, OutBody::Follows)).expect_err("too large");
        assert_eq!(err.kind, Violation::HeadersTooLarge);
        let inline = encoder.request(req("/api/chat", OutBody::Inline("b".repeat(5000))));
        assert!(inline.is_ok_and(|f| f.len() > 5000));
    }

    #[test]
    fn a_response_head_and_body_frames_decode_as_sent() {
        let encoder = Encoder::new(Limits::default());
        let Frame::Text(text) =
            encoder.response_head(&id(), StatusCode::CREATED, Headers::default(), true)
        else {
            panic!("a head is a text frame");
        };
        let Message::ResponseHead(head) = Message::decode(&text, &Limits::default()).expect("ok")
        else {
            panic!("a response_head");
        };
        assert!(head.body_follows);
        let head = head.into_head(&Limits::default()).expect("valid head");
        assert_eq!(head.status, StatusCode::CREATED);
        let Frame::Binary(bytes) = Frame::data(&id(), true, b"tok") else {
            panic!("data is a binary frame");
        };
        let frame = frame::decode(&bytes, 16).expect("valid frame");
        assert_eq!((frame.id.as_str(), frame.end, &frame.payload[..]), ("s1", true, &b"tok"[..]));
    }
}
