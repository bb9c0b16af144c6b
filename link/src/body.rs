//! A stream's inbox as an HTTP body: each chunk taken returns flow-control
//! credit to the peer through the link, so the peer sends more only as fast
//! as the consumer (a web client, a local service) reads.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::Frame;

use tunnel_proto::flow::{Inbox, StreamAbort};
use tunnel_proto::{Message, StreamId, WindowUpdate};

use crate::Link;

/// Returns credit for stream `id` to the peer.
pub struct Credit {
    link: Arc<Link>,
    id: StreamId,
}

impl Credit {
    pub fn new(link: Arc<Link>, id: StreamId) -> Self {
        Self { link, id }
    }

    /// Sends `credit` bytes of window in a `window_update` (ahead of queued
    /// body frames); nothing once the link ended.
    pub fn grant(&self, credit: u32) {
        if !self.link.is_closed() {
            self.link.push_urgent(Message::WindowUpdate(WindowUpdate {
                id: self.id.as_str().to_owned(),
                credit,
            }));
        }
    }
}

/// The body bytes of one stream, as they arrive.
pub struct InboxBody {
    inbox: Inbox,
    credit: Credit,
}

impl InboxBody {
    pub fn new(inbox: Inbox, credit: Credit) -> Self {
        Self { inbox, credit }
    }
}

impl http_body::Body for InboxBody {
    type Data = Bytes;
    type Error = StreamAbort;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamAbort>>> {
        let this = self.get_mut();
        let next = ready!(this.inbox.poll_recv(cx));
        if matches!(next, Some(Ok(_)))
            && let Some(credit) = this.inbox.take_credit()
        {
            this.credit.grant(credit);
        }
        Poll::Ready(next.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.inbox.is_end()
    }
}
