//! Bounds on the control socket's connections: at most
//! [`PER_UID`] open at once per peer uid and [`TOTAL`] in all (more are
//! closed at once), and a connection that sends nothing for [`IDLE`] is
//! closed. The server pings every [`KEEPALIVE`], so a live `tunnelctl`
//! (even a quiet `trace`) always has something to answer and stays.

use std::collections::HashMap;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, UdsConnectInfo};

/// Connections one uid may hold open at once.
pub const PER_UID: usize = 16;
/// Connections held open at once, all uids together.
pub const TOTAL: usize = 128;
/// A connection that sent nothing for this long is closed.
pub const IDLE: Duration = Duration::from_secs(180);
/// How often the server pings a connection (HTTP/2 PING).
pub const KEEPALIVE: Duration = Duration::from_secs(60);

/// Open connections by uid.
#[derive(Debug, Default)]
struct Counts {
    by_uid: HashMap<u32, usize>,
    total: usize,
}

/// One accepted connection's place in [`Counts`]; given back on drop.
#[derive(Debug)]
struct Slot {
    counts: Arc<Mutex<Counts>>,
    uid: u32,
}

impl Slot {
    fn take(counts: &Arc<Mutex<Counts>>, uid: u32) -> Option<Self> {
        let mut c = counts.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = c.by_uid.get(&uid).copied().unwrap_or(0);
        if mine >= PER_UID || c.total >= TOTAL {
            return None;
        }
        c.by_uid.insert(uid, mine + 1);
        c.total += 1;
        Some(Self { counts: counts.clone(), uid })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total -= 1;
        match c.by_uid.get_mut(&self.uid) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                c.by_uid.remove(&self.uid);
            }
        }
    }
}

/// A control connection under the bounds.
pub struct Conn {
    io: UnixStream,
    idle: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl Connected for Conn {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.idle.as_mut().reset(Instant::now() + IDLE);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "control connection idle",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts on `listener` until `stop`; connections within the bounds come
/// out of the receiver (a queue of a few: the server takes them at once).
pub fn accept(
    listener: UnixListener,
    stop: tokio_util::sync::CancellationToken,
) -> mpsc::Receiver<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(8);
    let counts = Arc::new(Mutex::new(Counts::default()));
    tokio::spawn(async move {
        let mut last_warned = None;
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let io = match accepted {
                Ok((io, _)) => io,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed: {e}");
                    // Out of descriptors, most likely: let some close.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(uid) = io.peer_cred().ok().map(|c| c.uid()) else { continue };
            let Some(slot) = Slot::take(&counts, uid) else {
                // Said once in a while, not once per refused connection.
                if last_warned.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10)) {
                    last_warned = Some(Instant::now());
                    tracing::warn!(
                        uid,
                        "control socket: uid {uid} holds {PER_UID} connections already (or all {TOTAL} are taken); closing new ones"
                    );
                }
                continue;
            };
            let conn = Conn { io, idle: Box::pin(tokio::time::sleep(IDLE)), _slot: slot };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_per_uid_and_in_all_and_given_back() {
        let counts = Arc::new(Mutex::new(Counts::default()));
        let mine: Vec<Slot> =
            (0..PER_UID).map(|_| Slot::take(&counts, 1000).expect("slot")).collect();
        assert!(Slot::take(&counts, 1000).is_none(), "one uid past its bound");
        let other = Slot::take(&counts, 1001).expect("another uid still gets one");
        drop(mine);
        assert!(Slot::take(&counts, 1000).is_some(), "slots come back on drop");
        drop(other);
        let c = counts.lock().expect("lock");
        assert_eq!(c.total, 0);
        assert!(c.by_uid.is_empty());
    }
}
