//! What each frame from the agent means for the relay's streams: heads and
//! bodies delivered to their web clients, errors and cancels ending streams,
//! credit for uploads, and refusals for what an agent may not send.

use link::{End, Handler};
use tracing::debug;
use tunnel_proto::error::Rejected;
use tunnel_proto::flow::{PushError, StreamAbort};
use tunnel_proto::frame::DataFrame;
use tunnel_proto::{Limits, Message, ProtocolError, StreamId, Violation};

use super::{CloseReason, Head, Session};

impl Handler for Session {
    fn read_limits(&self) -> Limits {
        Session::read_limits(self)
    }

    fn on_message(&self, msg: Message) -> Result<(), Rejected> {
        match msg {
            Message::ResponseHead(m) => {
                let body_follows = m.body_follows;
                let head = m.into_head(&self.local)?;
                let h = Head { status: head.status, headers: head.headers, body: None };
                self.deliver_head(&head.id, h, !body_follows)?;
            }
            Message::HttpResponse(m) => {
                let (head, body) = m.into_parts(&self.local)?;
                let h = Head { status: head.status, headers: head.headers, body: Some(body) };
                self.deliver_head(&head.id, h, true)?;
            }
            Message::Error(e) => {
                let code = if (400..=599).contains(&e.code) { e.code } else { 502 };
                self.fail_stream(&e.id, StreamAbort::new(code, e.error));
            }
            Message::Cancel(c) => {
                let why = if c.reason.is_empty() {
                    "agent cancelled the request".to_owned()
                } else {
                    c.reason
                };
                self.fail_stream(&c.id, StreamAbort::new(502, why));
            }
            Message::WindowUpdate(w) => {
                let window = self.lock_streams().get(w.id.as_str()).map(|s| s.window.clone());
                link::grant_credit(window, &w)?;
            }
            Message::Ack(a) => {
                // An ack for a stream that already ended (or a second one)
                // changes nothing.
                let tx = self.lock_streams().get_mut(a.id.as_str()).and_then(|s| s.ack.take());
                if let Some(tx) = tx {
                    let _ = tx.send(());
                }
            }
            Message::HttpRequest(ref m) => {
                return Err(Rejected::on(&m.id, msg.not_allowed("an agent")));
            }
            Message::Auth(a) => self.on_auth(a.token),
            Message::Refresh(_) => self.on_refresh(),
            Message::Rotate(_) => self.on_rotate(),
            Message::Rotated(r) => self.on_rotated(r.id),
            Message::Service(s) => self.set_service(s),
            other => return Err(other.not_allowed("an agent").into()),
        }
        Ok(())
    }

    fn on_data(&self, f: DataFrame) -> Result<(), Rejected> {
        if self.is_legacy() {
            return Err(ProtocolError::new(
                Violation::MalformedFrame,
                "binary frames need protocol version 1",
            )
            .into());
        }
        let mut streams = self.lock_streams();
        let Some(slot) = streams.get(f.id.as_str()) else {
            // Bytes already in flight when the stream was cancelled.
            return Ok(());
        };
        if slot.head.is_some() {
            return Err(Rejected::on(
                &f.id,
                ProtocolError::new(Violation::StreamState, format!("data before head on {}", f.id)),
            ));
        }
        match slot.body.push(f.payload) {
            Ok(()) | Err(PushError::Closed) => {}
            Err(e @ PushError::Overflow { .. }) => return Err(Rejected::on(&f.id, e.into())),
        }
        if f.end {
            slot.body.finish();
            if let Some(slot) = streams.remove(f.id.as_str()) {
                slot.window.close();
            }
        }
        Ok(())
    }

    fn end_stream(&self, id: &str, err: &ProtocolError) {
        self.abort_stream(id, StreamAbort::new(502, format!("agent sent an invalid frame: {err}")));
    }

    fn on_end(&self, end: &End) {
        if let End::Failed { error, .. } = end {
            debug!(session = %self.id, %error, "agent socket failed");
        }
        self.close(CloseReason::of(end));
    }

    fn is_live(&self, id: &StreamId) -> bool {
        self.lock_streams().contains_key(id.as_str())
    }
}
