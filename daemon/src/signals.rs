//! The signals a daemon acts on, as typed events: terminate (SIGTERM, or
//! SIGINT from a terminal) and hang-up (SIGHUP, "reload").
//!
//! Registered once per process; without the handlers SIGHUP would kill the
//! daemon, as its default action does.

use tokio::signal::unix::{Signal as UnixSignal, SignalKind, signal};

/// A signal the daemon acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: drain and stop.
    Terminate,
    /// SIGHUP: reload what can be reloaded.
    Hangup,
}

/// The registered handlers.
pub struct Signals {
    term: UnixSignal,
    int: UnixSignal,
    hup: UnixSignal,
}

impl Signals {
    /// Registers the handlers; must run inside the runtime.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Terminate,
            _ = self.hup.recv() => Signal::Hangup,
        }
    }
}
