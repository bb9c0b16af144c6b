//! What a test's tunnel holds: tasks alive on the test's runtime and this
//! process's open sockets touching the test's ports. Chaos tests take it
//! while idle, break things, and check it returns to where it was, which is
//! how a leaked task or file descriptor shows up.

use std::collections::HashSet;
use std::time::Duration;

use crate::WAIT;

/// Tasks and sockets at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Tasks alive on the current tokio runtime (each `#[tokio::test]` has
    /// its own, so parallel tests do not see each other's).
    pub tasks: usize,
    /// Open file descriptors of this process that are TCP sockets with a
    /// local or remote port in the set measured.
    pub sockets: usize,
}

impl Footprint {
    /// Measures now. `ports` are the test's listeners (relay, stand-in,
    /// proxy): every connection of the test has one of them at an end.
    pub fn now(ports: &[u16]) -> Self {
        Self {
            tasks: tokio::runtime::Handle::current().metrics().num_alive_tasks(),
            sockets: sockets_on(ports),
        }
    }

    /// Waits (bounded polling: neither count has a change notification)
    /// until tasks and sockets are back at or below `self`; returns what was
    /// last measured if they never get there.
    pub async fn settled(&self, ports: &[u16]) -> Result<Footprint, Footprint> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = Footprint::now(ports);
            if now.tasks <= self.tasks && now.sockets <= self.sockets {
                return Ok(now);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(now);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Open sockets of this process whose local or remote TCP port is in `ports`.
pub fn sockets_on(ports: &[u16]) -> usize {
    let inodes: HashSet<u64> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|table| {
            table.lines().skip(1).filter_map(parse_tcp_line).collect::<Vec<_>>().into_iter()
        })
        .filter(|(local, remote, inode)| {
            inodes.contains(inode) && (ports.contains(local) || ports.contains(remote))
        })
        .count()
}

/// `(local port, remote port, inode)` of one line of `/proc/net/tcp`.
fn parse_tcp_line(line: &str) -> Option<(u16, u16, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    Some((port(fields.get(1)?)?, port(fields.get(2)?)?, fields.get(9)?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ports_and_inode_from_a_proc_net_tcp_line() {
        let line = "   0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 123456 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(parse_tcp_line(line), Some((8080, 54321, 123456)));
    }

    #[tokio::test]
    async fn counts_a_connection_at_both_ends() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(sockets_on(&[port]), 1);
        let client = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(sockets_on(&[port]), 3);
        drop((client, server));
        assert_eq!(sockets_on(&[port]), 1);
    }
}
