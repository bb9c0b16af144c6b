//! A TCP proxy for chaos tests, placed between agent and relay: it can
//! forward, stall (stop reading, so senders back up as on a stalled network),
//! blackhole (read and discard, as when packets vanish) or cut every
//! connection.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    /// Stop moving bytes; connections stay open.
    Stall,
    /// Swallow bytes in both directions; connections stay open.
    Blackhole,
}

pub struct ChaosProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Replaced on every `cut`; connections watch the current one.
    cut: watch::Sender<CancellationToken>,
    shutdown: CancellationToken,
}

impl ChaosProxy {
    /// Listens on 127.0.0.1 (OS-picked port) and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, _) = watch::channel(Mode::Forward);
        let (cut, _) = watch::channel(CancellationToken::new());
        let shutdown = CancellationToken::new();
        let proxy = Self { addr, mode, cut, shutdown: shutdown.clone() };
        let mode_rx = proxy.mode.subscribe();
        let cut_rx = proxy.cut.subscribe();
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let Ok(outbound) = TcpStream::connect(target).await else { continue };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let killed = cut_rx.borrow().clone();
                let stop = shutdown.child_token();
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                for (r, w) in [
                    (
                        Box::new(ri) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    ),
                    (Box::new(ro), Box::new(wi)),
                ] {
                    tokio::spawn(pump(r, w, mode_rx.clone(), killed.clone(), stop.clone()));
                }
            }
        });
        proxy
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes every current connection at once (new ones still pass).
    pub fn cut(&self) {
        let old = self.cut.send_replace(CancellationToken::new());
        old.cancel();
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws/tunnel", self.addr)
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.cut();
    }
}

async fn pump(
    mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    mut w: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    mut mode: watch::Receiver<Mode>,
    killed: CancellationToken,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let current = *mode.borrow_and_update();
        if current == Mode::Stall {
            tokio::select! {
                _ = killed.cancelled() => return,
                _ = stop.cancelled() => return,
                r = mode.changed() => if r.is_err() { return } else { continue },
            }
        }
        let n = tokio::select! {
            _ = killed.cancelled() => return,
            _ = stop.cancelled() => return,
            _ = mode.changed() => continue,
            n = r.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
        };
        if *mode.borrow() == Mode::Blackhole {
            continue;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
