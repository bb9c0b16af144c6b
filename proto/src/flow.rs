//! Per-stream flow control: credit windows and the bounded inbox.
//!
//! The receiver of a body announces a window (`initial_window`) and buffers
//! the stream's bytes in an [`Inbox`]. The sender spends credit from a
//! [`SendWindow`] before each binary frame and waits when it has none. As the
//! receiver's consumer (the web client, or the local service) takes bytes
//! out, [`Inbox::take_credit`] hands back credit for the sender, sent in
//! `window_update` messages. The inbox refuses any byte beyond the window
//! plus the credit granted so far, so a slow reader holds at most one window
//! per stream in memory, and never blocks the socket reader or other streams.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::limits::MAX_WINDOW;
use crate::{ProtocolError, Violation};

/// Why a stream ended before its end flag: an HTTP-style code and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StreamAbort {
    pub code: u16,
    pub message: String,
}

impl StreamAbort {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// Bytes buffered in all inboxes of a process, and the most ever buffered.
#[derive(Debug, Default)]
pub struct BufferGauge {
    current: AtomicUsize,
    peak: AtomicUsize,
}

impl BufferGauge {
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        let now = self.current.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.current.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Why a push into an inbox was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The sender exceeded the credit it was given.
    #[error("flow-control window exceeded ({received} bytes received, {allowed} allowed)")]
    Overflow { received: u64, allowed: u64 },
    /// The consumer went away; the bytes were dropped.
    #[error("stream consumer is gone")]
    Closed,
}

impl From<PushError> for ProtocolError {
    fn from(e: PushError) -> Self {
        ProtocolError::new(Violation::FlowControl, e.to_string())
    }
}

struct InboxState {
    chunks: VecDeque<Bytes>,
    buffered: usize,
    /// Bytes pushed so far, and the most the sender may have pushed: the
    /// window plus every credit handed out.
    received: u64,
    allowed: u64,
    /// Bytes consumed but not yet returned as credit.
    unacked: u64,
    /// Credit goes back once this much has been consumed (half a window).
    threshold: u64,
    /// Set once by the producer: `Ok` for a clean end, `Err` for an abort.
    end: Option<Result<(), StreamAbort>>,
    consumer_gone: bool,
    waker: Option<Waker>,
}

/// Producer half of a bounded body buffer (held by the socket reader).
pub struct InboxSender {
    shared: Arc<Shared>,
}

/// Consumer half (held by the HTTP body).
pub struct Inbox {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<InboxState>,
    gauge: Arc<BufferGauge>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A bounded inbox for a stream whose receiver announced `window` bytes.
pub fn inbox(window: usize, gauge: Arc<BufferGauge>) -> (InboxSender, Inbox) {
    let shared = Arc::new(Shared {
        state: Mutex::new(InboxState {
            chunks: VecDeque::new(),
            buffered: 0,
            received: 0,
            allowed: window as u64,
            unacked: 0,
            threshold: (window as u64 / 2).max(1),
            end: None,
            consumer_gone: false,
            waker: None,
        }),
        gauge,
    });
    (InboxSender { shared: shared.clone() }, Inbox { shared })
}

impl InboxSender {
    /// Buffers `data`. Never waits: a sender that respects its credit always
    /// fits, and one that does not gets [`PushError::Overflow`].
    pub fn push(&self, data: Bytes) -> Result<(), PushError> {
        if data.is_empty() {
            return Ok(());
        }
        let mut st = self.shared.lock();
        if st.consumer_gone {
            return Err(PushError::Closed);
        }
        if st.end.is_some() {
            return Err(PushError::Closed);
        }
        let received = st.received + data.len() as u64;
        if received > st.allowed {
            return Err(PushError::Overflow { received, allowed: st.allowed });
        }
        st.received = received;
        st.buffered += data.len();
        self.shared.gauge.add(data.len());
        st.chunks.push_back(data);
        if let Some(w) = st.waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Ends the body cleanly after the buffered bytes.
    pub fn finish(&self) {
        self.end(Ok(()));
    }

    /// Ends the body with an error after the buffered bytes.
    pub fn abort(&self, why: StreamAbort) {
        self.end(Err(why));
    }

    fn end(&self, how: Result<(), StreamAbort>) {
        let mut st = self.shared.lock();
        if st.end.is_none() {
            st.end = Some(how);
        }
        if let Some(w) = st.waker.take() {
            w.wake();
        }
    }

    /// True once the consumer dropped its half.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().consumer_gone
    }
}

impl Drop for InboxSender {
    fn drop(&mut self) {
        self.end(Err(StreamAbort::new(502, "stream ended without its end flag")));
    }
}

impl Inbox {
    /// Next chunk; `None` after a clean end; `Err` after an abort.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, StreamAbort>>> {
        let mut st = self.shared.lock();
        if let Some(chunk) = st.chunks.pop_front() {
            st.buffered -= chunk.len();
            st.unacked += chunk.len() as u64;
            self.shared.gauge.sub(chunk.len());
            return Poll::Ready(Some(Ok(chunk)));
        }
        match &st.end {
            Some(Ok(())) => Poll::Ready(None),
            Some(Err(e)) => Poll::Ready(Some(Err(e.clone()))),
            None => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Waits for the next chunk.
    pub async fn recv(&mut self) -> Option<Result<Bytes, StreamAbort>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// True when the producer ended the body and nothing is left.
    pub fn is_end(&self) -> bool {
        let st = self.shared.lock();
        st.chunks.is_empty() && matches!(st.end, Some(Ok(())))
    }

    /// Credit to return to the sender, once half a window has been consumed
    /// since the last return: one small `window_update` per half window.
    /// The inbox counts it as granted at once, so the caller must send it.
    pub fn take_credit(&mut self) -> Option<u32> {
        let mut st = self.shared.lock();
        if st.unacked < st.threshold {
            return None;
        }
        let credit = st.unacked.min(MAX_WINDOW as u64);
        st.unacked -= credit;
        st.allowed += credit;
        Some(credit as u32)
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.consumer_gone = true;
        self.shared.gauge.sub(st.buffered);
        st.buffered = 0;
        st.chunks.clear();
    }
}

/// Control messages that must not wait behind body frames (cancels, credit,
/// pongs, refusals): pushed from code that cannot wait (a dropped body, the
/// socket reader), drained by the writer before its next batch. Bounded:
/// each live stream contributes at most a cancel and a credit update between
/// two writer passes, so far more means the writer is stuck.
#[derive(Debug)]
pub struct ControlQueue {
    frames: Mutex<Vec<crate::Message>>,
    notify: Notify,
    bound: usize,
}

/// The control queue is full: the peer stopped reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("control queue overflow")]
pub struct QueueFull;

impl ControlQueue {
    /// A queue for a session of at most `max_streams` streams: room for
    /// their cancels and credit, and for every pong and refusal the peer's
    /// budget allows at once (so a flood is told apart from a peer that
    /// stopped reading).
    pub fn new(max_streams: usize) -> Self {
        let replies = (crate::budget::PINGS_BURST + crate::budget::REFUSALS_BURST) as usize;
        Self {
            frames: Mutex::new(Vec::new()),
            notify: Notify::new(),
            bound: 4 * max_streams.max(16) + replies,
        }
    }

    /// Queues `msg` and wakes the writer; never waits.
    pub fn push(&self, msg: crate::Message) -> Result<(), QueueFull> {
        let mut frames = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        if frames.len() >= self.bound {
            return Err(QueueFull);
        }
        frames.push(msg);
        drop(frames);
        self.notify.notify_one();
        Ok(())
    }

    /// Everything queued so far.
    pub fn take(&self) -> Vec<crate::Message> {
        std::mem::take(&mut *self.frames.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Resolves after the next push (or at once if one happened unseen).
    pub async fn pushed(&self) {
        self.notify.notified().await
    }
}

/// The sender's credit for one stream, topped up by `window_update`.
#[derive(Debug)]
pub struct SendWindow {
    state: Mutex<SendState>,
    notify: Notify,
}

#[derive(Debug)]
struct SendState {
    available: u64,
    closed: bool,
}

/// The stream closed while a sender waited for credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream closed while waiting for flow-control credit")]
pub struct WindowClosed;

impl SendWindow {
    pub fn new(initial: u32) -> Self {
        Self {
            state: Mutex::new(SendState { available: initial as u64, closed: false }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SendState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds credit. A window above 2^31-1 is a protocol violation.
    pub fn grant(&self, credit: u32) -> Result<(), ProtocolError> {
        let mut st = self.lock();
        let next = st.available + credit as u64;
        if next > MAX_WINDOW as u64 {
            return Err(ProtocolError::new(Violation::InvalidCredit, "window above 2^31-1"));
        }
        st.available = next;
        drop(st);
        self.notify.notify_one();
        Ok(())
    }

    /// Wakes a waiting sender with [`WindowClosed`].
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    pub fn available(&self) -> u64 {
        self.lock().available
    }

    /// Takes between 1 and `want` bytes of credit, waiting while there is
    /// none. `want` of 0 returns 0 at once.
    pub async fn reserve(&self, want: usize) -> Result<usize, WindowClosed> {
        if want == 0 {
            return Ok(0);
        }
        loop {
            let notified = self.notify.notified();
            {
                let mut st = self.lock();
                if st.closed {
                    return Err(WindowClosed);
                }
                if st.available > 0 {
                    let take = (want as u64).min(st.available);
                    st.available -= take;
                    return Ok(take as usize);
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge() -> Arc<BufferGauge> {
        Arc::new(BufferGauge::default())
    }

    #[tokio::test]
    async fn inbox_delivers_in_order_then_ends() {
        let g = gauge();
        let (tx, mut rx) = inbox(10, g.clone());
        tx.push(Bytes::from_static(b"abc")).expect("fits");
        tx.push(Bytes::from_static(b"de")).expect("fits");
        assert_eq!(g.current(), 5);
        tx.finish();
        assert_eq!(rx.recv().await, Some(Ok(Bytes::from_static(b"abc"))));
        assert_eq!(rx.recv().await, Some(Ok(Bytes::from_static(b"de"))));
        assert_eq!(rx.recv().await, None);
        assert_eq!(g.current(), 0);
        assert_eq!(g.peak(), 5);
    }

    #[test]
    fn inbox_refuses_bytes_beyond_its_window() {
        let (tx, _rx) = inbox(4, gauge());
        tx.push(Bytes::from_static(b"abcd")).expect("fits exactly");
        assert_eq!(
            tx.push(Bytes::from_static(b"e")),
            Err(PushError::Overflow { received: 5, allowed: 4 })
        );
    }

    #[tokio::test]
    async fn consumed_bytes_do_not_make_room_until_credit_is_granted() {
        let (tx, mut rx) = inbox(4, gauge());
        tx.push(Bytes::from_static(b"abcd")).expect("fits");
        rx.recv().await.expect("chunk").expect("data");
        // The buffer is empty, but the sender was never granted more.
        assert!(matches!(tx.push(Bytes::from_static(b"e")), Err(PushError::Overflow { .. })));
    }

    #[tokio::test]
    async fn credit_comes_back_every_half_window_and_widens_the_limit() {
        let (tx, mut rx) = inbox(100, gauge());
        tx.push(Bytes::from(vec![0u8; 30])).expect("fits");
        rx.recv().await.expect("chunk").expect("data");
        assert_eq!(rx.take_credit(), None);
        tx.push(Bytes::from(vec![0u8; 30])).expect("fits");
        rx.recv().await.expect("chunk").expect("data");
        assert_eq!(rx.take_credit(), Some(60));
        assert_eq!(rx.take_credit(), None);
        // 60 received + 100 - 60 buffered-or-unconsumed... the sender may now
        // send up to 160 in total: 100 more.
        tx.push(Bytes::from(vec![0u8; 100])).expect("fits after credit");
        assert!(tx.push(Bytes::from_static(b"x")).is_err());
    }

    #[tokio::test]
    async fn inbox_abort_arrives_after_buffered_bytes() {
        let (tx, mut rx) = inbox(10, gauge());
        tx.push(Bytes::from_static(b"a")).expect("fits");
        tx.abort(StreamAbort::new(502, "gone"));
        assert_eq!(rx.recv().await, Some(Ok(Bytes::from_static(b"a"))));
        assert_eq!(rx.recv().await, Some(Err(StreamAbort::new(502, "gone"))));
    }

    #[tokio::test]
    async fn dropped_sender_aborts_the_body() {
        let (tx, mut rx) = inbox(10, gauge());
        drop(tx);
        assert!(matches!(rx.recv().await, Some(Err(StreamAbort { code: 502, .. }))));
    }

    #[test]
    fn dropped_consumer_closes_the_inbox_and_releases_the_gauge() {
        let g = gauge();
        let (tx, rx) = inbox(10, g.clone());
        tx.push(Bytes::from_static(b"abc")).expect("fits");
        drop(rx);
        assert_eq!(g.current(), 0);
        assert!(tx.is_closed());
        assert_eq!(tx.push(Bytes::from_static(b"x")), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn pending_consumer_is_woken_by_a_push() {
        let (tx, mut rx) = inbox(10, gauge());
        let waiter = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        tx.push(Bytes::from_static(b"z")).expect("fits");
        assert_eq!(waiter.await.expect("task"), Some(Ok(Bytes::from_static(b"z"))));
    }

    #[tokio::test]
    async fn send_window_hands_out_at_most_what_was_granted() {
        let w = SendWindow::new(10);
        assert_eq!(w.reserve(8).await, Ok(8));
        assert_eq!(w.reserve(8).await, Ok(2));
        assert_eq!(w.available(), 0);
        let w = Arc::new(w);
        let w2 = w.clone();
        let waiter = tokio::spawn(async move { w2.reserve(5).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        w.grant(3).expect("grant");
        assert_eq!(waiter.await.expect("task"), Ok(3));
    }

    #[tokio::test]
    async fn closing_a_send_window_wakes_the_waiter() {
        let w = Arc::new(SendWindow::new(0));
        let w2 = w.clone();
        let waiter = tokio::spawn(async move { w2.reserve(5).await });
        tokio::task::yield_now().await;
        w.close();
        assert_eq!(waiter.await.expect("task"), Err(WindowClosed));
    }

    #[tokio::test]
    async fn control_queue_wakes_the_writer_and_refuses_beyond_its_bound() {
        let q = ControlQueue::new(1);
        let bound = 64 + (crate::budget::PINGS_BURST + crate::budget::REFUSALS_BURST) as usize;
        for i in 0..bound {
            q.push(crate::Message::ping(format!("p{i}"))).expect("within the bound");
        }
        assert_eq!(q.push(crate::Message::ping("p")), Err(QueueFull));
        q.pushed().await;
        assert_eq!(q.take().len(), bound);
        assert!(q.take().is_empty());
    }

    #[test]
    fn granting_beyond_the_maximum_window_is_a_violation() {
        let w = SendWindow::new(MAX_WINDOW);
        assert_eq!(w.grant(1).expect_err("must fail").kind, Violation::InvalidCredit);
    }

    #[test]
    fn poll_recv_is_pending_without_data() {
        let (_tx, mut rx) = inbox(10, gauge());
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(rx.poll_recv(&mut cx).is_pending());
    }
}
