//! A daemon's life in fixed phases, written once: configure (exit 78 on a
//! bad file), build the runtime, run, wait for a signal, drain.
//!
//! The first terminate signal cancels [`Context::shutdown`] (the daemon
//! stops accepting and drains within its own deadline); a second one ends
//! the process at once.

use std::future::Future;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Resolve, load_toml};
use crate::signals::{Signal, Signals};
use crate::{logging, notify};

/// Exit codes (sysexits where one fits).
pub mod exit {
    /// Stopped cleanly (a terminate signal and a drain).
    pub const OK: u8 = 0;
    /// A failure while running (cannot bind a listener, runtime failure).
    pub const FAILURE: u8 = 1;
    /// EX_CONFIG: the configuration cannot be read or used.
    pub const CONFIG: u8 = 78;
}

/// How a daemon ended, for its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Ok,
    Failure,
    Config,
}

impl From<ExitStatus> for ExitCode {
    fn from(s: ExitStatus) -> ExitCode {
        ExitCode::from(match s {
            ExitStatus::Ok => exit::OK,
            ExitStatus::Failure => exit::FAILURE,
            ExitStatus::Config => exit::CONFIG,
        })
    }
}

/// The arguments every daemon takes.
#[derive(clap::Parser, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Configuration file (TOML); the daemon's command line names its
    /// default (see [`command`]).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Print the resolved configuration (JSON, secrets left out) and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// The resolved configuration of daemon `D`.
pub type ConfigOf<D> = <<D as Daemon>::File as Resolve>::Config;

/// What the shared process code needs from a daemon. Its name gives the
/// rest: the configuration `/etc/NAME/NAME.toml`, the log filter in
/// `NAME_LOG` (upper case).
pub trait Daemon {
    /// Program name, for messages, paths and the environment.
    const NAME: &'static str;
    /// One line for `--help`.
    const ABOUT: &'static str;
    /// The configuration file's shape.
    type File: Resolve<Config: serde::Serialize + Send + 'static>;

    /// Tokio worker threads: 1 runs everything on one thread, 0 one per core.
    /// One by default: a daemon whose work is a few sockets gains nothing
    /// from more, and with every task on the thread that polls the sockets
    /// no wake-up crosses threads.
    fn worker_threads(_config: &ConfigOf<Self>) -> usize {
        1
    }

    /// Binds, calls [`Context::ready`], serves until [`Context::shutdown`]
    /// is cancelled, drains, returns.
    fn run(
        config: ConfigOf<Self>,
        ctx: Context,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'static;
}

/// What a running daemon gets from the process.
#[derive(Debug, Clone)]
pub struct Context {
    /// Cancelled by the first terminate signal: stop accepting, drain.
    pub shutdown: CancellationToken,
    /// Bumped by each SIGHUP.
    reloads: tokio::sync::watch::Receiver<u64>,
    /// The listener systemd passed (socket activation), until taken.
    activated: std::sync::Arc<std::sync::Mutex<Option<std::net::TcpListener>>>,
    /// The arguments the daemon started with: where its file is read again.
    args: CommonArgs,
}

impl Context {
    /// The configuration file read and resolved again (a SIGHUP reload), as
    /// at start; a context without a file (tests) reads the default path.
    pub fn load_again<D: Daemon>(&self) -> Result<ConfigOf<D>, crate::ConfigError> {
        load::<D>(&self.args)
    }

    /// The TCP listener systemd passed by socket activation (a `.socket`
    /// unit), taken once; `None` without one, and the daemon binds its own.
    pub fn activated_listener(&self) -> Option<std::net::TcpListener> {
        self.activated.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// The daemon's listeners are bound: tell the service manager.
    pub fn ready(&self) {
        notify::ready();
    }

    /// Feeds systemd's watchdog and `STATUS=` line from `probe`, which goes
    /// through the daemon's core loop and answers the status line (see
    /// [`crate::supervise`]). Does nothing without a service manager.
    pub fn supervise<P, Fut>(&self, probe: P)
    where
        P: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = String> + Send + 'static,
    {
        if notify::expected() {
            let schedule = crate::supervise::Schedule::from_env();
            tokio::spawn(crate::supervise::run(schedule, probe, notify::send));
        }
    }

    /// Runs `reload` on each SIGHUP, between `RELOADING=1` and `READY=1`,
    /// until shutdown. One reload at a time; signals that arrive during one
    /// fold into the next.
    pub fn on_reload<F, Fut>(&self, mut reload: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let mut reloads = self.reloads.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = reloads.changed() => if changed.is_err() { return },
                }
                notify::reloading();
                reload().await;
                notify::ready();
            }
        });
    }
}

/// Runs daemon `D`: the whole of its `main`.
pub fn main<D: Daemon>() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let command = CommonArgs::command().name(D::NAME).bin_name(D::NAME).about(D::ABOUT);
    let args = match CommonArgs::from_arg_matches(&command.get_matches()) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    run::<D>(args)
}

/// Loads `D`'s configuration (the file `args` names, or the default one).
pub fn load<D: Daemon>(args: &CommonArgs) -> Result<ConfigOf<D>, crate::ConfigError> {
    let default = PathBuf::from(format!("/etc/{0}/{0}.toml", D::NAME));
    let path = args.config.as_deref().unwrap_or(&default);
    load_toml::<D::File>(path).and_then(Resolve::resolve)
}

/// Runs daemon `D` with arguments its `main` parsed.
pub fn run<D: Daemon>(args: CommonArgs) -> ExitCode {
    logging::init(D::NAME);
    let loaded = load::<D>(&args);
    if args.check_config {
        return match loaded {
            Ok(config) => print_config(D::NAME, &config).into(),
            Err(e) => {
                eprintln!("{}: {e}", D::NAME);
                ExitStatus::Config.into()
            }
        };
    }
    raise_fd_limit();
    // Before any thread starts: taking it clears LISTEN_FDS.
    let activated = match notify::tcp_listener() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{}: {e}", D::NAME);
            return ExitStatus::Failure.into();
        }
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", D::NAME);
            return match activated {
                Some(l) => hold_socket(D::NAME, &e.to_string(), l, ExitStatus::Config),
                None => ExitStatus::Config.into(),
            };
        }
    };
    // Kept to hold the socket should the daemon fail to start.
    let spare = activated.as_ref().and_then(|l| l.try_clone().ok());
    let rt = match runtime(D::worker_threads(&config)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", D::NAME);
            return ExitStatus::Failure.into();
        }
    };
    let started_with = args.clone();
    let result = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = Signals::new().map_err(|e| anyhow::anyhow!("cannot handle signals: {e}"))?;
        let (reload, reloads) = tokio::sync::watch::channel(0);
        tokio::spawn(watch_signals(signals, shutdown.clone(), reload));
        let activated = std::sync::Arc::new(std::sync::Mutex::new(activated));
        let ctx = Context { shutdown, reloads, activated, args: started_with };
        // A task of its own, so a multi-threaded runtime's main thread only
        // waits.
        tokio::spawn(D::run(config, ctx))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("{} task failed: {e}", D::NAME)))
    });
    drop(rt);
    crate::held::flush();
    match (result, spare) {
        (Ok(()), _) => ExitStatus::Ok.into(),
        (Err(e), Some(l)) => hold_socket(D::NAME, &format!("{e:#}"), l, ExitStatus::Failure),
        (Err(e), None) => {
            eprintln!("{}: {e:#}", D::NAME);
            ExitStatus::Failure.into()
        }
    }
}

/// A socket-activated daemon that cannot start holds the socket systemd
/// passed, closing each connection at once, until it is told to stop; then
/// exits with `status`. Exiting at once would leave the connections that
/// started it waiting: systemd would start it again and again, its start
/// limit would fail the socket unit, nothing would listen, and the first
/// `systemctl restart` after the fix would fail too. Held, the socket
/// stays up, the journal says once what is wrong, and one `systemctl
/// restart` after the fix serves again.
fn hold_socket(
    name: &'static str,
    why: &str,
    listener: std::net::TcpListener,
    status: ExitStatus,
) -> ExitCode {
    let line = format!("cannot start: {why}; fix it, then run systemctl restart {name}");
    tracing::error!(
        "{name} cannot start: {why}. It holds the socket systemd passed and closes each connection until then: fix it, then run `systemctl restart {name}`"
    );
    let Ok(rt) = runtime(1) else { return status.into() };
    rt.block_on(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
        let Ok(mut signals) = Signals::new() else { return };
        notify::ready();
        if notify::expected() {
            let schedule = crate::supervise::Schedule::from_env();
            let probe_line = line.clone();
            tokio::spawn(crate::supervise::run(
                schedule,
                move || std::future::ready(probe_line.clone()),
                notify::send,
            ));
        }
        loop {
            tokio::select! {
                signal = signals.recv() => match signal {
                    Signal::Terminate => break,
                    Signal::Hangup => info!("{line}"),
                },
                accepted = listener.accept() => drop(accepted),
            }
        }
        notify::stopping();
    });
    status.into()
}

/// Turns signals into the daemon's shutdown and reloads.
async fn watch_signals(
    mut signals: Signals,
    shutdown: CancellationToken,
    reload: tokio::sync::watch::Sender<u64>,
) {
    loop {
        match signals.recv().await {
            Signal::Terminate if shutdown.is_cancelled() => {
                warn!("second terminate signal: stopping without finishing the drain");
                std::process::exit(i32::from(exit::FAILURE));
            }
            Signal::Terminate => {
                info!("terminate signal: draining");
                notify::stopping();
                shutdown.cancel();
            }
            Signal::Hangup => {
                info!("SIGHUP: reloading");
                reload.send_modify(|n| *n += 1);
            }
        }
    }
}

/// `NAME man`: the daemon's man page (section 8, roff) from its command
/// line definition, on stdout.
/// The man page of `command` in `section`: one page, its commands
/// described on it (clap_mangen would point at a page per command, which
/// nobody ships). tunnelctl's page (section 1) is made the same way.
pub fn render_man(command: clap::Command, section: &str, out: &mut Vec<u8>) -> std::io::Result<()> {
    use clap_mangen::roff::{Roff, bold, roman};
    let command = command.disable_help_subcommand(true);
    let commands: Vec<(String, String)> = command
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| {
            (c.get_name().to_owned(), c.get_about().map(ToString::to_string).unwrap_or_default())
        })
        .collect();
    let man = clap_mangen::Man::new(command).section(section);
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    if !commands.is_empty() {
        let mut roff = Roff::default();
        roff.control("SH", ["COMMANDS"]);
        for (name, about) in commands {
            roff.control("TP", []).text([bold(name)]).text([roman(about)]);
        }
        roff.to_writer(out)?;
    }
    man.render_version_section(out)
}

/// A daemon's command line: its arguments, and the commands `C` that run
/// instead of it (an administrative command, `man`).
#[derive(clap::Parser, Debug)]
#[command(version)]
pub struct Cli<C: clap::Subcommand> {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Option<C>,
}

/// Daemon `D`'s command line with commands `C`: named after it, its
/// `ABOUT`, and a `--config` help that names the file read without it.
pub fn command<D: Daemon, C: clap::Subcommand>() -> clap::Command {
    let name = D::NAME;
    let help = format!("Configuration file (TOML); without it, /etc/{name}/{name}.toml");
    <Cli<C> as clap::CommandFactory>::command()
        .name(name)
        .bin_name(name)
        .about(D::ABOUT)
        .mut_arg("config", |a| a.help(help))
}

/// Parses daemon `D`'s arguments ([`command`]); exits with clap's message
/// and code on an error, `--help` or `--version`.
pub fn parse<D: Daemon, C: clap::Subcommand>() -> Cli<C> {
    let matches = command::<D, C>().get_matches();
    <Cli<C> as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

pub fn print_man(command: clap::Command) -> ExitCode {
    let name = command.get_name().to_owned();
    let mut out = Vec::new();
    if let Err(e) = render_man(command, "8", &mut out) {
        eprintln!("{name}: {e}");
        return ExitStatus::Failure.into();
    }
    match std::io::stdout().lock().write_all(&out) {
        Ok(()) => ExitStatus::Ok.into(),
        // `| head`: not a failure worth a panic.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitStatus::Ok.into(),
        Err(e) => {
            eprintln!("{name}: cannot write the man page: {e}");
            ExitStatus::Failure.into()
        }
    }
}

/// `--check-config`: the resolved configuration as JSON on stdout. A closed
/// stdout (`| head`) is not a failure worth a panic.
fn print_config(name: &str, config: &impl serde::Serialize) -> ExitStatus {
    let text = match serde_json::to_string_pretty(config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitStatus::Failure;
        }
    };
    match writeln!(std::io::stdout().lock(), "{text}") {
        Ok(()) => ExitStatus::Ok,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitStatus::Ok,
        Err(e) => {
            eprintln!("{name}: cannot write the configuration: {e}");
            ExitStatus::Failure
        }
    }
}

/// One worker: a current-thread runtime, every task on the thread that
/// polls the sockets (no cross-thread wake-ups). More: a work-stealing pool
/// (0 = one thread per core).
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b
    };
    // Before a thread sleeps, the access lines of its busy moment go out.
    builder.on_thread_park(crate::held::flush).enable_all().build()
}

/// Every agent (at the relay) and every stream holds a socket: take the
/// whole open-file allowance (the soft limit is often 1024, the hard one far
/// higher), as servers do.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => {
                tracing::warn!(error = %e, soft, "cannot raise the open-file limit above {soft}: {e}; raise LimitNOFILE= if connections fail with \"too many open files\"")
            }
        },
        Ok((soft, _)) => tracing::debug!(limit = soft, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit: {e}"),
    }
}
