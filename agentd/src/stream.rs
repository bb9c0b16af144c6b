//! What one stream's task holds: a [`StreamHandle`] to send its frames in
//! order, spend and return credit, acknowledge its request, and leave the
//! session's stream table when it is dropped. The forwarding code
//! ([`crate::upstream`]) sees only this handle, never the session.

use std::sync::Arc;

use link::{Closed, Link, Outbound};
use tokio_tungstenite::tungstenite::Message as Ws;

use tunnel_proto::flow::{SendWindow, WindowClosed};
use tunnel_proto::{Message, StreamId};

/// The session's side of a stream: its table entry.
pub trait StreamTable: Send + Sync {
    /// The stream's task is done: forget it.
    fn finish(&self, id: &StreamId);
    /// Whether the stream is still in the table.
    fn is_live(&self, id: &StreamId) -> bool;
}

/// A stream's task's handle on its session.
pub struct StreamHandle {
    id: StreamId,
    link: Arc<Link>,
    table: Arc<dyn StreamTable>,
    window: Arc<SendWindow>,
    chunk: usize,
    acks: bool,
}

impl StreamHandle {
    pub(crate) fn new(
        id: StreamId,
        link: Arc<Link>,
        table: Arc<dyn StreamTable>,
        window: Arc<SendWindow>,
        chunk: usize,
        acks: bool,
    ) -> Self {
        Self { id, link, table, window, chunk, acks }
    }

    pub fn id(&self) -> &StreamId {
        &self.id
    }

    /// Largest body chunk to send.
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// Queues a frame of this stream, in order, waiting while the writer is
    /// behind.
    pub async fn send(&self, frame: Ws) -> Result<(), Closed> {
        self.link.send(Outbound::of(&self.id, frame)).await
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

    /// Takes between 1 and `want` bytes of the relay's credit, waiting
    /// while there is none.
    pub async fn reserve(&self, want: usize) -> Result<usize, WindowClosed> {
        self.window.reserve(want).await
    }

    /// What the request body hands credit back through.
    pub fn credit(&self) -> Credit {
        Credit { link: self.link.clone(), id: self.id.clone() }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.table.finish(&self.id);
    }
}

/// Returns request-body credit to the relay as the local service reads.
pub struct Credit {
    link: Arc<Link>,
    id: StreamId,
}

impl Credit {
    pub fn grant(&self, credit: u32) {
        if !self.link.is_closed() {
            self.link.push_urgent(Message::WindowUpdate(tunnel_proto::WindowUpdate {
                id: self.id.as_str().to_owned(),
                credit,
            }));
        }
    }
}
