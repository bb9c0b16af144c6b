//! agentd's command line: the daemon's arguments, and the commands that run
//! instead of it (`pin`, `man`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use daemon::CommonArgs;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Connects to a relay and prints the pins of the public keys it
    /// presents (its own certificate first), for [tls] pins, and whether
    /// this machine trusts its certificate. Given a PEM file instead (the
    /// relay's certificate, on the relay's machine), prints its pin.
    Pin {
        /// The relay: wss://relay.example.com or host:port (443 by
        /// default), or a PEM certificate file.
        relay: String,
        /// Trust the CAs in this PEM file instead of the system's roots.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Print agentd's man page (roff).
    #[command(hide = true)]
    Man,
}

/// Runs a command other than the daemon.
pub fn command(common: &CommonArgs, command: Command) -> ExitCode {
    match command {
        Command::Pin { relay, ca_file } => crate::pin::run(common, &relay, ca_file),
        Command::Man => {
            daemon::process::print_man(daemon::process::command::<crate::service::Agentd, Command>())
        }
    }
}
