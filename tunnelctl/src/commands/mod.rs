//! One module per command, mirroring the CLI: each asks its daemon and
//! returns what to print (the rendering is [`crate::render`]'s).

pub mod disconnect;
pub mod enroll;
pub mod log_level;
pub mod reconnect;
pub mod reload;
pub mod rotate_token;
pub mod status;
pub mod token;
pub mod trace;
pub mod tunnels;

use std::io::Write;

use crate::cli::{Cli, Command};
use crate::client::{self, CtlError};

/// Runs `cli`'s command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> Result<(), CtlError> {
    let g = &cli.global;
    let (which, path) = client::locate(g, cli.command.only_for())?;
    let name = which.name();
    let streaming = matches!(cli.command, Command::Trace(_));
    let channel = client::connect(name, &path, g.timeout, streaming).await?;
    let text = match (cli.command, which) {
        (Command::Status, w) => status::run(channel, w, g.json).await,
        (Command::Reconnect, _) => reconnect::run(channel, g.json).await,
        (Command::RotateToken(args), _) => rotate_token::run(channel, args, g.json).await,
        (Command::Enroll(args), _) => enroll::run(channel, args, g.json).await,
        (Command::LogLevel { filter }, w) => log_level::run(channel, w, filter, g.json).await,
        (Command::Tunnels { cluster }, _) => tunnels::run(channel, cluster, g.json).await,
        (Command::Reload, _) => reload::run(channel, g.json).await,
        (Command::Disconnect { user, device }, _) => {
            disconnect::run(channel, user, device, g.json).await
        }
        (Command::Token(t), _) => token::run(channel, t, g.json).await,
        (Command::Trace(args), w) => return trace::run(channel, w, args, g.json, out).await,
        (Command::Completions { .. } | Command::Man, _) => {
            unreachable!("handled before connecting")
        }
    }?;
    out.write_all(text.as_bytes()).map_err(write_error)?;
    Ok(())
}

/// A closed stdout (`| head`) ends the command quietly.
pub fn write_error(e: std::io::Error) -> CtlError {
    CtlError::Other(format!("cannot write the output: {e}"))
}

/// A secret given to a command (a credential or a token): a file's
/// content, which only its owner may read (the rule agentd applies to a
/// `token_file`), or stdin's (at most 64 KiB), trimmed; never argv.
pub fn read_secret(file: Option<&std::path::Path>, prompt: &str) -> Result<String, CtlError> {
    use std::io::{IsTerminal as _, Read as _};
    let text = match file {
        Some(path) => {
            daemon::config::read_secret(path).map_err(|e| CtlError::Input(e.to_string()))?
        }
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("tunnelctl: {prompt}, then Enter and Ctrl-D");
            }
            let mut s = String::new();
            stdin
                .take(64 * 1024)
                .read_to_string(&mut s)
                .map_err(|e| CtlError::Input(format!("cannot read stdin: {e}")))?;
            s
        }
    };
    Ok(text.trim().to_owned())
}

/// JSON text with a trailing newline.
pub fn json_text(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}
