//! tunnelctl's entry point: parse, run the command, map the outcome to an
//! exit code (see `tunnelctl --help`).

use std::io::Write as _;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use tunnelctl::cli::{Cli, Command};
use tunnelctl::exit;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut stdout = std::io::stdout();
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "tunnelctl", &mut stdout);
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            return match clap_mangen::Man::new(Cli::command()).render(&mut stdout) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tunnelctl: {e}");
                    ExitCode::from(exit::FAILED)
                }
            };
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunnelctl: cannot start: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let result = runtime.block_on(tunnelctl::commands::run(cli, &mut stdout));
    let _ = stdout.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `tunnelctl trace | head`: the reader is done, and so are we.
        Err(tunnelctl::CtlError::Other(m)) if m.contains("Broken pipe") => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnelctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
