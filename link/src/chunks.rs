//! HTTP bodies into body frames, as both daemons send them: the next chunk
//! of a body (and whether it was the last), the chunks that come in a burst
//! joined into one ([`Joiner`]), and a chunk cut into frames that each wait
//! for the peer's flow-control credit.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use http_body::Body;
use http_body_util::BodyExt;

use tunnel_proto::flow::SendWindow;
use tunnel_proto::{Frame, StreamId};

use crate::{BURST_GAP, Link, Outbound};

/// `fut`, or `None` once `limit` passed (never without a limit).
pub async fn bounded<T>(limit: Option<Duration>, fut: impl Future<Output = T>) -> Option<T> {
    match limit {
        Some(l) => tokio::time::timeout(l, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// The next data of `body`, and whether the body ended with it. Trailers
/// are skipped (they are not forwarded). `is_end_stream` is only a hint (a
/// chunked body never sets it), so the end may also come as an empty chunk
/// after the last data.
pub async fn next_chunk<B>(body: &mut B) -> Result<(Bytes, bool), B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    loop {
        match body.frame().await {
            None => return Ok((Bytes::new(), true)),
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    return Ok((data, body.is_end_stream()));
                }
            }
            Some(Err(e)) => return Err(e),
        }
    }
}

/// Passes of the scheduler one joined chunk may wait for the next.
const MAX_JOIN: usize = 64;

/// Reads a body's data, joining into one chunk the chunks that come in a
/// burst. hyper's client hands a body over one chunk at a time (the next
/// only after the last was taken), so a model server's 2,000 tokens, read
/// from its socket in a handful of reads, would otherwise cross the tunnel
/// as 2,000 frames, each paying for its framing, its wake-ups and its HTTP
/// chunk at the relay. In a burst (a chunk within [`BURST_GAP`] of the one
/// before), the reader yields to the runnable tasks, which lets hyper's
/// connection task hand over the chunk it has ready, and takes it if it is
/// there, up to `max` bytes or [`MAX_JOIN`] passes. The first chunk and a
/// lone token (milliseconds after the last) go on at once, as they came.
#[derive(Debug)]
pub struct Joiner<E> {
    max: usize,
    /// [`BURST_GAP`]; longer in tests, which must not depend on timing.
    gap: Duration,
    last_at: Option<Instant>,
    /// An error that came after data was joined: returned next.
    failed: Option<E>,
}

impl<E> Joiner<E> {
    pub fn new(max: usize) -> Self {
        // No joining where a pass proves nothing (a multi-threaded runtime).
        let gap = if crate::passes_help() { BURST_GAP } else { Duration::ZERO };
        Self { max, gap, last_at: None, failed: None }
    }

    /// The next data of `body` and whether the body ended with it, as
    /// [`next_chunk`], with what a burst had ready joined to it.
    pub async fn next<B>(&mut self, body: &mut B) -> Result<(Bytes, bool), E>
    where
        B: Body<Data = Bytes, Error = E> + Unpin,
    {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let (first, mut last) = next_chunk(body).await?;
        let burst = self.last_at.is_some_and(|at| at.elapsed() < self.gap);
        self.last_at = Some(Instant::now());
        if last || !burst || first.len() >= self.max {
            return Ok((first, last));
        }
        let mut joined: Option<BytesMut> = None;
        for _ in 0..MAX_JOIN {
            crate::pass().await;
            match next_chunk(body).now_or_never() {
                None => break,
                Some(Err(e)) => {
                    self.failed = Some(e);
                    break;
                }
                Some(Ok((more, end))) => {
                    let buf = joined.get_or_insert_with(|| {
                        let size = (first.len() + more.len()) * 8;
                        let mut buf = BytesMut::with_capacity(size.min(self.max));
                        buf.extend_from_slice(&first);
                        buf
                    });
                    buf.extend_from_slice(&more);
                    last = end;
                    if end || buf.len() >= self.max {
                        break;
                    }
                }
            }
        }
        self.last_at = Some(Instant::now());
        Ok((joined.map_or(first, BytesMut::freeze), last))
    }
}

/// Why [`send`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The stream ended (its window closed): nobody needs the rest.
    #[error("the stream ended")]
    Ended,
    /// No credit came within the wait: the peer stopped reading.
    #[error("no flow-control credit in time")]
    Stalled,
    /// The session is gone.
    #[error("session closed")]
    Closed,
}

/// Sends `data` of stream `id` as frames of at most `chunk` bytes, taking
/// credit from `window` before each (waiting at most `wait` each time); the
/// last frame carries the end flag when `last`.
pub async fn send(
    link: &Link,
    window: &SendWindow,
    id: &StreamId,
    chunk: usize,
    mut data: Bytes,
    last: bool,
    wait: Option<Duration>,
) -> Result<(), SendError> {
    loop {
        let want = data.len().min(chunk);
        let n = match bounded(wait, window.reserve(want)).await {
            Some(Ok(n)) => n,
            Some(Err(_)) => return Err(SendError::Ended),
            None => return Err(SendError::Stalled),
        };
        let piece = data.split_to(n);
        let end = last && data.is_empty();
        if want > 0 || end {
            let f = Frame::data(id, end, &piece);
            link.send(Outbound::of(id, f)).await.map_err(|_| SendError::Closed)?;
        }
        if data.is_empty() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures_util::stream;
    use http_body::Frame;
    use http_body_util::StreamBody;

    use super::*;

    /// A joiner for which every chunk after the first is part of a burst.
    fn joiner<E>(max: usize) -> Joiner<E> {
        Joiner { gap: Duration::from_secs(3600), ..Joiner::new(max) }
    }

    type Ready = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, &'static str>>>>;

    /// A body whose chunks are all ready at once, as a burst.
    fn ready(chunks: &[Result<&'static str, &'static str>]) -> Ready {
        let frames: Vec<_> = chunks
            .iter()
            .map(|c| c.map(|text| Frame::data(Bytes::from_static(text.as_bytes()))))
            .collect();
        StreamBody::new(stream::iter(frames))
    }

    #[tokio::test]
    async fn the_first_chunk_goes_alone_and_a_burst_after_it_is_joined() {
        let lines = ["a\n", "b\n", "c\n", "d\n"].map(Ok);
        let mut body = ready(&lines);
        let mut joiner = joiner(1024);
        assert_eq!(joiner.next(&mut body).await, Ok((Bytes::from_static(b"a\n"), false)));
        assert_eq!(joiner.next(&mut body).await, Ok((Bytes::from_static(b"b\nc\nd\n"), true)));
    }

    #[tokio::test]
    async fn a_joined_chunk_stops_at_the_size_it_may_have() {
        let mut body = ready(&["x", "0123456789", "0123456789", "0123456789", "z"].map(Ok));
        let mut joiner = joiner(15);
        assert_eq!(joiner.next(&mut body).await, Ok((Bytes::from_static(b"x"), false)));
        let (data, last) = joiner.next(&mut body).await.expect("data");
        assert_eq!((data.len(), last), (20, false));
        assert_eq!(joiner.next(&mut body).await, Ok((Bytes::from_static(b"0123456789z"), true)));
    }

    #[tokio::test]
    async fn an_error_after_joined_data_comes_after_that_data() {
        let mut body = ready(&[Ok("a"), Ok("b"), Ok("c"), Err("reset")]);
        let mut joiner = joiner(1024);
        assert_eq!(joiner.next(&mut body).await, Ok((Bytes::from_static(b"a"), false)));
        assert_eq!(joiner.next(&mut body).await, Ok((Bytes::from_static(b"bc"), false)));
        assert_eq!(joiner.next(&mut body).await, Err("reset"));
    }

    #[tokio::test]
    async fn a_chunk_that_is_not_ready_is_not_waited_for() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        let mut body = StreamBody::new(tokio_stream_of(rx));
        let mut joiner = joiner(1024);
        tx.send(Ok(Frame::data(Bytes::from_static(b"1")))).await.expect("open");
        assert_eq!(joiner.next(&mut body).await, Ok((Bytes::from_static(b"1"), false)));
        // In a burst, but nothing else is ready: the chunk goes on alone.
        tx.send(Ok(Frame::data(Bytes::from_static(b"2")))).await.expect("open");
        assert_eq!(joiner.next(&mut body).await, Ok((Bytes::from_static(b"2"), false)));
        drop(tx);
        assert_eq!(joiner.next(&mut body).await, Ok((Bytes::new(), true)));
    }

    fn tokio_stream_of<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Unpin {
        Box::pin(stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
