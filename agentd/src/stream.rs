//! What one stream's task holds: a [`StreamHandle`] to send its frames in
//! order, spend and return credit, acknowledge its request, and leave the
//! session's stream table when it is dropped. The forwarding code
//! ([`crate::upstream`]) sees only this handle, never the session.

use std::sync::Arc;

use bytes::Bytes;
use link::body::Credit;
use link::chunks::SendError;
use link::{Closed, Link, Outbound};

use http::StatusCode;
use tunnel_proto::flow::SendWindow;
use tunnel_proto::{Encoder, Headers, Message, StreamId};

/// The session's side of a stream: its table entry.
pub trait StreamTable: Send + Sync {
    /// The stream's task is done: forget it.
    fn finish(&self, id: &StreamId);
    /// Whether the stream is still in the table.
    fn is_live(&self, id: &StreamId) -> bool;
}

/// A stream's task's handle on its session.
pub struct StreamHandle {
    pub(crate) id: StreamId,
    pub(crate) link: Arc<Link>,
    pub(crate) table: Arc<dyn StreamTable>,
    pub(crate) window: Arc<SendWindow>,
    /// The largest body frame's payload.
    pub(crate) chunk: usize,
    /// Whether the relay wants requests acknowledged.
    pub(crate) acks: bool,
    pub(crate) encoder: Encoder,
}

impl StreamHandle {
    /// Answers the request with a head; body frames follow when
    /// `body_follows`.
    pub async fn send_head(
        &self,
        status: StatusCode,
        headers: Headers,
        body_follows: bool,
    ) -> Result<(), Closed> {
        let head = self.encoder.response_head(&self.id, status, headers, body_follows);
        self.link.send(Outbound::of(&self.id, head)).await
    }

    pub async fn send_msg(&self, msg: &Message) -> Result<(), Closed> {
        self.link.send(Outbound::message(&self.id, msg)).await
    }

    /// Acknowledges the request to a relay that listed `ack`.
    pub fn ack(&self) {
        if self.acks && self.table.is_live(&self.id) {
            self.link.push_urgent(Message::ack(self.id.as_str()));
        }
    }

    /// Sends `data` as body frames under the relay's credit; the last one
    /// carries the end flag when `last`.
    pub async fn send_data(&self, data: Bytes, last: bool) -> Result<(), SendError> {
        link::chunks::send(&self.link, &self.window, &self.id, self.chunk, data, last, None).await
    }

    /// What the request body hands credit back through.
    pub fn credit(&self) -> Credit {
        Credit::new(self.link.clone(), self.id.clone())
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.table.finish(&self.id);
    }
}
