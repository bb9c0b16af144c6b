//! The writer: drains urgent control messages first, then up to a batch of
//! queued frames, then flushes once, so a burst of small frames costs one
//! socket write. When the link ends it sends the close frame (bounded by
//! a deadline: a peer that stopped reading cannot hold it).
//!
//! Frames that become ready together are written together. A body's
//! chunks reach their stream task one at a time (hyper hands the next one
//! over only after the last was taken), so the writer, woken by the first,
//! would otherwise write each alone: 2,007 writes for a 2,000-token burst
//! that agentd read from the model server in 11. So while frames come in a
//! burst (the last flush was less than [`BURST_GAP`] ago), the writer
//! yields to the tasks that are runnable now before it flushes, once and
//! again while that brought more frames (at most [`MAX_YIELDS`] times): no
//! timer, a pass of the scheduler. A lone frame (a model's next token,
//! milliseconds after the last) is flushed at once and costs nothing more.
//! Only on a current-thread runtime (agentd, and relayd with one worker):
//! see [`crate::passes_help`].

use std::sync::Arc;
use std::time::Instant;

use futures_util::SinkExt;
use futures_util::stream::SplitSink;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error, Message as Ws};
use tracing::debug;
use tunnel_proto::Frame;

use crate::{BURST_GAP, CLOSE_DEADLINE, End, Handler, Link, Outbound, WRITE_BATCH};

/// Passes the writer gives the runnable tasks before one flush.
const MAX_YIELDS: usize = 16;

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
        let mut flushed: Option<Instant> = None;
        let passes = crate::passes_help();
        loop {
            tokio::select! {
                biased;
                _ = link.urgent.pushed() => {}
                out = rx.recv() => match out {
                    Some(out) => feed(&mut sink, out, &*handler).await?,
                    None => break,
                },
            }
            let burst = flushed.is_some_and(|at| at.elapsed() < BURST_GAP);
            let mut yields = 0;
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
                if fed == WRITE_BATCH {
                    continue;
                }
                if burst && yields < MAX_YIELDS && (fed > 0 || yields == 0) {
                    yields += 1;
                    crate::pass().await;
                    continue;
                }
                break;
            }
            sink.flush().await?;
            if passes {
                flushed = Some(Instant::now());
            }
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
