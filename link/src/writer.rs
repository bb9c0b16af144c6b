//! The writer: drains urgent control messages first, then up to a batch of
//! queued frames, then flushes once, so a burst of small frames costs one
//! socket write. When the link ends it sends the close frame (bounded by
//! a deadline: a peer that stopped reading cannot hold it).

use std::sync::Arc;

use futures_util::SinkExt;
use futures_util::stream::SplitSink;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error, Message as Ws};
use tracing::debug;
use tunnel_proto::Frame;

use crate::{CLOSE_DEADLINE, End, Handler, Link, Outbound, WRITE_BATCH};

type Sink<S> = SplitSink<WebSocketStream<S>, Ws>;

pub(crate) async fn run<S, H>(
    link: Arc<Link>,
    mut sink: Sink<S>,
    mut rx: mpsc::Receiver<Outbound>,
    handler: Arc<H>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    let pump = async {
        loop {
            tokio::select! {
                biased;
                _ = link.urgent.pushed() => {}
                out = rx.recv() => match out {
                    Some(out) => feed(&mut sink, out, &*handler).await?,
                    None => break,
                },
            }
            loop {
                for msg in link.urgent.take() {
                    sink.feed(crate::ws(Frame::message(&msg))).await?;
                }
                let mut fed = 0;
                while fed < WRITE_BATCH {
                    let Ok(out) = rx.try_recv() else { break };
                    feed(&mut sink, out, &*handler).await?;
                    fed += 1;
                }
                if fed < WRITE_BATCH {
                    break;
                }
            }
            sink.flush().await?;
        }
        Ok::<(), Error>(())
    };
    // A write stuck on a socket nobody reads must not keep an ended link
    // alive: ending it interrupts the write.
    let result = tokio::select! {
        r = pump => r,
        _ = link.closed() => Ok(()),
    };
    if let Err(e) = result {
        debug!(session = %link.label, error = %e, "socket write failed");
        link.end(End::Failed { code: None, error: format!("write failed: {e}") }, None);
        return;
    }
    let frame = link.take_close_frame();
    let close = async {
        sink.send(Ws::Close(frame)).await?;
        sink.close().await
    };
    let _ = tokio::time::timeout(CLOSE_DEADLINE, close).await;
}

/// Writes one queued frame unless its stream ended meanwhile.
async fn feed<S, H>(sink: &mut Sink<S>, out: Outbound, handler: &H) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    if let Some(id) = &out.stream
        && !handler.is_live(id)
    {
        return Ok(());
    }
    sink.feed(crate::ws(out.frame)).await?;
    match out.then {
        Some(then) => sink.feed(crate::ws(then)).await,
        None => Ok(()),
    }
}
