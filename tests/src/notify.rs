//! A stand-in for systemd's notification socket: a datagram socket in a
//! temp dir whose path goes into a daemon's `NOTIFY_SOCKET`, read line by
//! line (`READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`).

use std::path::PathBuf;

use tokio::net::UnixDatagram;

use crate::{TempDir, WAIT};

pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    /// Lines of a datagram not handed out yet.
    pending: std::collections::VecDeque<String>,
}

impl NotifySocket {
    pub fn bind(dir: &TempDir) -> Self {
        let path = dir.path("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Self { socket, path, pending: Default::default() }
    }

    /// For the daemon's `NOTIFY_SOCKET`.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The next line the daemon sent; panics after [`WAIT`].
    pub async fn next(&mut self) -> String {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return line;
            }
            let mut buf = vec![0; 4096];
            let n = tokio::time::timeout(WAIT, self.socket.recv(&mut buf))
                .await
                .expect("the daemon notified within the wait")
                .expect("recv");
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.pending.extend(text.lines().filter(|l| !l.is_empty()).map(str::to_owned));
        }
    }

    /// Reads until a line satisfies `pred`; every line read, that one last.
    pub async fn until(&mut self, mut pred: impl FnMut(&str) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self.next().await;
            let done = pred(&line);
            seen.push(line);
            if done {
                return seen;
            }
        }
    }
}
