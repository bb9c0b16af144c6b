//! relayd entry point: the shared daemon phases over [`relayd::service`],
//! or another command ([`relayd::cli`]).

use std::process::ExitCode;

use relayd::cli::Command;
use relayd::service::Relayd;

fn main() -> ExitCode {
    let cli = daemon::process::parse::<Relayd, Command>();
    match cli.command {
        None => daemon::process::run::<Relayd>(cli.common),
        Some(command) => relayd::cli::admin(&cli.common, command),
    }
}
