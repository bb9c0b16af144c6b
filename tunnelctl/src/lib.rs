//! tunnelctl: the operator's tool for agentd and relayd, over each daemon's
//! control socket (gRPC, `tunnel.control.v1`).
//!
//! - [`cli`]: the command line (also the source of the shell completions
//!   and the man page).
//! - [`client`]: which socket, connecting, and errors that say what to do.
//! - [`commands`]: one module per command; each asks the daemon and returns
//!   the text to print, rendered by [`render`] (tables for people, JSON
//!   lines with `--json`).

pub mod cli;
pub mod client;
pub mod commands;
pub mod render;

pub use client::CtlError;

use std::io::Write as _;
use std::process::ExitCode;

use clap::CommandFactory as _;

/// Runs `cli` the way the binary does: completions and the man page
/// without a daemon, every other command against its daemon; the outcome
/// as an exit code (see `tunnelctl --help`), the error on stderr.
pub fn main(cli: cli::Cli) -> ExitCode {
    let mut stdout = std::io::stdout();
    let result = match &cli.command {
        cli::Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut cli::Cli::command(), "tunnelctl", &mut stdout);
            Ok(())
        }
        cli::Command::Man => {
            let mut page = Vec::new();
            daemon::process::render_man(cli::Cli::command(), "1", &mut page)
                .and_then(|()| stdout.write_all(&page))
                .map_err(commands::write_error)
        }
        _ => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(commands::run(cli, &mut stdout)),
            Err(e) => Err(CtlError::Other(format!("cannot start: {e}"))),
        },
    };
    let _ = stdout.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `tunnelctl trace | head`: the reader is done, and so are we.
        Err(CtlError::Other(m)) if m.contains("Broken pipe") => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnelctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Exit codes (sysexits where one fits), as `tunnelctl --help` lists them.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// The daemon answered with an error (see the message).
    pub const FAILED: u8 = 1;
    /// Bad usage (clap's own code).
    pub const USAGE: u8 = 2;
    /// EX_DATAERR: the input (a token on stdin, a file) is unusable.
    pub const DATA: u8 = 65;
    /// EX_UNAVAILABLE: the daemon is not running (no socket, nobody on it).
    pub const UNAVAILABLE: u8 = 69;
    /// EX_TEMPFAIL: no answer within --timeout.
    pub const TIMEOUT: u8 = 75;
    /// EX_NOPERM: the socket or the daemon refused this user.
    pub const NO_PERMISSION: u8 = 77;
}
