//! Log set-up: text lines on stderr (colours only on a terminal), the level
//! from the daemon's own environment variable (`RELAYD_LOG`, `AGENTD_LOG`:
//! `tracing` filter syntax, `info` by default).

use tracing_subscriber::EnvFilter;

/// Installs the process's log subscriber.
pub fn init(env_var: &str) {
    let filter = EnvFilter::try_from_env(env_var).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
