//! The command line. The shell completions and the man page are generated
//! from these definitions (`tunnelctl completions SHELL`, `tunnelctl man`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0   done
  1   the daemon answered with an error
  2   bad usage
  65  unusable input (the token on stdin or in --file)
  69  the daemon is not running (no control socket, or nobody on it)
  75  no answer within --timeout
  77  permission denied (the socket's mode, or the daemon's caller check)";

/// Operator CLI for the LLM tunnel daemons (agentd on a desktop, relayd
/// on the relay), over their control sockets.
#[derive(Parser, Debug)]
#[command(name = "tunnelctl", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// The control socket. Default: the daemon's own (agentd:
    /// $XDG_RUNTIME_DIR/agentd/control.sock or /run/agentd/control.sock;
    /// relayd: /run/relayd/control.sock), whichever exists.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Which daemon, when both run on this machine.
    #[arg(long, global = true, value_enum)]
    pub daemon: Option<Which>,
    /// JSON instead of tables (one object, or one per line for trace).
    #[arg(long, global = true)]
    pub json: bool,
    /// Longest wait for the daemon's answer (trace: for it to start).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Agentd,
    Relayd,
}

impl Which {
    pub fn name(self) -> &'static str {
        match self {
            Which::Agentd => "agentd",
            Which::Relayd => "relayd",
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The daemon's state: agentd's connection, credential and local
    /// service; relayd's tunnels and listener.
    Status,
    /// agentd: end the session once its requests finished, connect again.
    Reconnect,
    /// agentd: rotate the agent credential in-band (the default), or install
    /// a token read from stdin or a file (never from the command line).
    RotateToken(RotateToken),
    /// agentd: enroll with a relay (first run): the agent credential is
    /// read from stdin (or --token-file), stored in agentd's state
    /// directory with the relay, and agentd connects.
    Enroll(Enroll),
    /// Stream live request events until interrupted (or --limit).
    Trace(Trace),
    /// relayd: the connected agents.
    Tunnels {
        /// Run as replicas ([cluster]): every device of the cluster, with
        /// the replica holding it.
        #[arg(long)]
        cluster: bool,
    },
    /// relayd: close a user's tunnel (its agent reconnects unless revoked).
    Disconnect {
        /// The user whose tunnels to close.
        user: String,
        /// Only this device's tunnel (default: every device of the user).
        #[arg(long)]
        device: Option<String>,
    },
    /// relayd: read the TLS certificate and key again (as SIGHUP does);
    /// says what was reloaded.
    Reload,
    /// relayd: issue or revoke credentials and tokens.
    #[command(subcommand)]
    Token(Token),
    /// Show the daemon's log filter, or replace it until its next restart
    /// (tracing syntax: debug, "info,access=warn", agentd=trace).
    LogLevel {
        /// The new filter; without it, the current one is shown.
        filter: Option<String>,
    },
    /// Print shell completions for tunnelctl.
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print tunnelctl's man page (roff).
    #[command(hide = true)]
    Man,
}

#[derive(Args, Debug)]
pub struct RotateToken {
    /// Install the token given on stdin instead of rotating.
    #[arg(long, conflicts_with = "file")]
    pub stdin: bool,
    /// Install the token in this file instead of rotating.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct Enroll {
    /// The relay: wss://relay.example.com
    pub relay: String,
    /// Read the agent credential from this file instead of stdin.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Keep the credential agentd already has (configured or stored).
    #[arg(long, conflicts_with = "token_file")]
    pub keep_token: bool,
    /// A pin (sha256/...) of the relay's public key, checked on top of the
    /// CA validation; repeat for a key rollover (`agentd pin URL`).
    #[arg(long = "pin", value_name = "PIN")]
    pub pins: Vec<String>,
}

#[derive(Args, Debug)]
pub struct Trace {
    /// Only this user's requests (relayd).
    #[arg(long)]
    pub user: Option<String>,
    /// Only paths starting with this (e.g. /api/chat).
    #[arg(long)]
    pub path: Option<String>,
    /// Only requests that ended with this status.
    #[arg(long)]
    pub status: Option<u16>,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Ask for bodies (truncated); the daemon must allow it
    /// ([control] trace_bodies = true).
    #[arg(long)]
    pub bodies: bool,
}

#[derive(Subcommand, Debug)]
pub enum Token {
    /// Issue an agent credential or mint a client (or share) token; the
    /// token alone goes to stdout.
    Issue {
        #[arg(long)]
        user: String,
        #[arg(long, value_enum)]
        role: Role,
        /// An agent credential's device under the user (default: the
        /// user's one default device). Each device keeps its own session.
        #[arg(long)]
        device: Option<String>,
        /// Lifetime of a client token (default 1h).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// A share token: only this path (repeat; a path ending in / covers
        /// what is below it).
        #[arg(long = "path")]
        paths: Vec<String>,
        /// A share token: only requests naming this model (repeat).
        #[arg(long = "model")]
        models: Vec<String>,
    },
    /// Revoke a credential (c_...) or token (t_...) id; its live sessions
    /// end at once.
    Revoke { id: String },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Client,
}

impl Command {
    /// The daemon the command is for, when only one serves it.
    pub fn only_for(&self) -> Option<Which> {
        match self {
            Command::Reconnect | Command::RotateToken(_) | Command::Enroll(_) => {
                Some(Which::Agentd)
            }
            Command::Tunnels { .. }
            | Command::Disconnect { .. }
            | Command::Token(_)
            | Command::Reload => Some(Which::Relayd),
            _ => None,
        }
    }
}
