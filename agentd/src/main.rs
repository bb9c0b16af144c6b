//! agentd entry point: the shared daemon phases over [`agentd::service`],
//! or another command ([`agentd::cli`]).

use std::process::ExitCode;

use agentd::cli::Command;
use agentd::service::Agentd;

fn main() -> ExitCode {
    let cli = daemon::process::parse::<Agentd, Command>();
    match cli.command {
        None => daemon::process::run::<Agentd>(cli.common),
        Some(command) => agentd::cli::command(&cli.common, command),
    }
}
