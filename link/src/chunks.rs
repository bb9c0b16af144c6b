//! HTTP bodies into body frames, as both daemons send them: the next chunk
//! of a body (and whether it was the last), and a chunk cut into frames
//! that each wait for the peer's flow-control credit.

use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;

use tunnel_proto::flow::SendWindow;
use tunnel_proto::{Frame, StreamId};

use crate::{Link, Outbound};

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
