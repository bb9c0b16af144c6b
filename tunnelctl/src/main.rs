//! tunnelctl: the operator's tool for relayd and agentd.
//!
//! The daemons' gRPC control sockets (status, reconnect, rotate-token,
//! trace) are not built yet; until they are, this binary only says so, with
//! a distinct exit code, instead of pretending to work.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Operator CLI for the LLM tunnel daemons.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the daemon's state.
    Status,
    /// Reconnect agentd's tunnel.
    Reconnect,
    /// Give agentd a new token (read from stdin).
    RotateToken,
    /// Stream live request events.
    Trace,
}

/// sysexits: service unavailable.
const EX_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!(
        "tunnelctl: `{:?}` needs the daemons' control socket, which this version does not have yet",
        args.command
    );
    ExitCode::from(EX_UNAVAILABLE)
}
