//! The one place a daemon talks to its service manager (systemd's
//! `sd_notify` protocol): `READY=1` once it can serve, `STATUS=` lines with
//! its state, `WATCHDOG=1` while it makes progress ([`crate::supervise`]),
//! `STOPPING=1` when it drains, `RELOADING=1` on SIGHUP, and the sockets
//! systemd passed it ([`tcp_listener`], socket activation). Without
//! `NOTIFY_SOCKET` (not under systemd, or `Type=simple`) every call does
//! nothing.
//!
//! The environment is never unset (`notify_and_unset_env` would make later
//! messages impossible).

use sd_notify::NotifyState;
use tracing::debug;

/// Sends `states`; a failure is logged, never fatal (the service manager
/// may have gone away during shutdown).
pub fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "cannot notify the service manager");
    }
}

/// The daemon's listeners are bound and it serves.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// The daemon began draining.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The daemon began reloading (SIGHUP); [`ready`] when it is done.
pub fn reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or_default();
    send(&[NotifyState::Reloading, NotifyState::MonotonicUsec(now as i128)]);
}

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub fn expected() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The TCP listener systemd passed (socket activation: `LISTEN_FDS` for
/// this process), or `None` when it passed none. Call it before any thread
/// starts (it clears the variables, so children do not inherit them). A
/// passed socket that is not a TCP stream socket is an error, not a silent
/// fallback to binding elsewhere.
pub fn tcp_listener() -> std::io::Result<Option<std::net::TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 1 {
        tracing::warn!(passed = fds.len(), "systemd passed several sockets; using the first");
    }
    let listener = fds.take_tcp_listener(0).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("the socket systemd passed is not a TCP stream socket (ListenStream= in the .socket unit): {e}"),
        )
    })?;
    if let Some(l) = &listener {
        l.set_nonblocking(true)?;
    }
    Ok(listener)
}
