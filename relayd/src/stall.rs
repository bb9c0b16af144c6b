//! A web client that stops reading: writes to its connection that make no
//! progress for the stream's `idle` timeout fail, which ends the connection,
//! drops the response body and so cancels the stream at the agent.
//!
//! hyper polls a response body only when it can write, so a stalled reader
//! never lets the body's own timers run; the stall has to be seen where the
//! bytes are written. HTTP/1.1 answers one request at a time per
//! connection, so the limit is a per-connection cell that each request sets
//! to its route's `idle` ([`StallLimit::set`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The longest a write may make no progress on one connection; shared by
/// the connection's IO and the request being answered. 0 means off.
#[derive(Debug, Clone, Default)]
pub struct StallLimit(Arc<AtomicU64>);

impl StallLimit {
    pub fn new(limit: Option<Duration>) -> Self {
        let s = Self::default();
        s.set(limit);
        s
    }

    pub fn set(&self, limit: Option<Duration>) {
        let ms = limit.map_or(0, |d| (d.as_millis() as u64).max(1));
        self.0.store(ms, Ordering::Relaxed);
    }

    fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// `S` whose writes fail with `TimedOut` once they stalled for the limit.
pub struct StallIo<S> {
    inner: S,
    limit: StallLimit,
    /// Armed when a write first returns `Pending`, disarmed by progress.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> StallIo<S> {
    pub fn new(inner: S, limit: StallLimit) -> Self {
        Self { inner, limit, timer: None }
    }

    /// After the inner write returned `poll`: disarm on progress, arm or
    /// check the timer while it pends.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.timer = None;
            return poll;
        }
        let Some(limit) = self.limit.get() else {
            self.timer = None;
            return poll;
        };
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.timer = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {}", humantime::format_duration(limit)),
            )));
        }
        poll
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_that_stalls_for_the_limit_fails_and_progress_resets_the_clock() {
        let (near, mut far) = tokio::io::duplex(16);
        let limit = StallLimit::new(Some(Duration::from_secs(3)));
        let mut io = StallIo::new(near, limit.clone());
        io.write_all(&[0u8; 16]).await.expect("fits the pipe");
        // The pipe is full and nobody reads: the next write stalls.
        let started = Instant::now();
        let err = io.write_all(&[1u8; 8]).await.expect_err("stalled");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        // A reader that keeps up never trips it.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut total = 0;
            while total < 16 + 4096 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                total += tokio::io::AsyncReadExt::read(&mut far, &mut buf).await.expect("read");
            }
        });
        io.write_all(&[2u8; 4096]).await.expect("slow but moving");
        reader.await.expect("reader");
    }

    #[tokio::test(start_paused = true)]
    async fn off_means_writes_may_wait_forever() {
        let (near, _far) = tokio::io::duplex(4);
        let mut io = StallIo::new(near, StallLimit::new(None));
        io.write_all(&[0u8; 4]).await.expect("fits");
        let stalled =
            tokio::time::timeout(Duration::from_secs(3600), io.write_all(&[1u8; 4])).await;
        assert!(stalled.is_err(), "the write must still be waiting");
    }
}
