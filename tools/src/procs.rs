//! Real daemon processes for the soak and benchmark programs: finding the
//! binaries, starting them with a config, and reading what they use from
//! /proc (RSS, peak RSS, CPU time, fds, threads, CLOSE_WAIT sockets) and from
//! their `/metrics`.

use std::collections::HashSet;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// The directory of the running program, checked to hold `names` (the
/// programs are built together with `cargo build --release --bins`).
pub fn bin_dir(names: &[&str]) -> Result<PathBuf> {
    let dir =
        std::env::current_exe()?.parent().context("no directory for this program")?.to_owned();
    for name in names {
        if !dir.join(name).exists() {
            bail!("{name} missing next to this program; run cargo build --release --bins");
        }
    }
    Ok(dir)
}

/// A loopback port that was free a moment ago (for daemons that take an
/// address in their config).
pub fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `bin/name args`, logging to `dir/log.log`; killed when dropped.
pub fn spawn(bin: &Path, name: &str, args: &[String], dir: &Path, log: &str) -> Result<Child> {
    spawn_program(&bin.join(name), args, dir, log).with_context(|| format!("cannot start {name}"))
}

/// Starts `program args` (a path, or a name on `PATH`), logging to
/// `dir/log.log`; killed when dropped. The daemons log at their default
/// level, as installed: a measurement includes the access line every
/// request writes.
pub fn spawn_program(program: &Path, args: &[String], dir: &Path, log: &str) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{log}.log")))?;
    Command::new(program)
        .args(args)
        .env_remove("RELAYD_LOG")
        .env_remove("AGENTD_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))
}

pub fn path(p: &Path) -> String {
    p.display().to_string()
}

/// What one process uses, from /proc.
#[derive(Default, Debug, Clone, Copy)]
pub struct ProcStats {
    pub rss_kib: u64,
    /// Peak RSS since start or the last [`reset_peak_rss`].
    pub hwm_kib: u64,
    pub fds: u64,
    pub threads: u64,
    pub close_wait: u64,
}

/// RSS, fds, threads and CLOSE_WAIT sockets of one process.
pub fn proc_stats(pid: u32) -> ProcStats {
    let mut s = ProcStats::default();
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        for line in status.lines() {
            let num =
                |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            if line.starts_with("VmRSS:") {
                s.rss_kib = num(line);
            } else if line.starts_with("VmHWM:") {
                s.hwm_kib = num(line);
            } else if line.starts_with("Threads:") {
                s.threads = num(line);
            }
        }
    }
    let mut inodes = HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            s.fds += 1;
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // st 08 = CLOSE_WAIT; column 9 is the inode.
            if cols.len() > 9 && cols[3] == "08" && inodes.contains(cols[9]) {
                s.close_wait += 1;
            }
        }
    }
    s
}

/// User + system CPU time of a process (all its threads) so far.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return Duration::ZERO };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    // Linux reports these in USER_HZ, 100 on every architecture it runs on.
    Duration::from_millis(ticks * 10)
}

/// Resets the process's peak RSS to its current RSS (Linux `clear_refs`).
pub fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// One value from the Prometheus text a daemon serves on `port`.
pub async fn scrape(port: u16, name: &str) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        Some(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fetch).await.ok()??;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Load average over the last minute, and the number of CPUs.
pub fn machine() -> (f64, usize) {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    (load, std::thread::available_parallelism().map_or(1, |n| n.get()))
}
