//! tunnelctl's entry point: parse, then [`tunnelctl::main`] runs the
//! command and maps the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    tunnelctl::main(tunnelctl::cli::Cli::parse())
}
