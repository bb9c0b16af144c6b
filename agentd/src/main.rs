//! agentd entry point: the shared daemon phases over [`agentd::Agent`], or
//! `agentd pin` to learn a relay's key pin.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use daemon::{CommonArgs, Context, Daemon};

/// The desktop agent of the LLM tunnel.
#[derive(Parser, Debug)]
#[command(name = "agentd", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
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

struct Agentd;

impl Daemon for Agentd {
    const NAME: &'static str = "agentd";
    const ABOUT: &'static str = "The desktop agent of the LLM tunnel.";
    type File = agentd::ConfigFile;

    async fn run(config: agentd::Config, ctx: Context) -> anyhow::Result<()> {
        let metrics_listen = config.metrics_listen;
        let control = config.control.clone();
        let socket = daemon::control::open(&control)?;
        let agent = Arc::new(agentd::Agent::new(config));
        // The socket serves through the drain (status shows it); it goes
        // when `_bound` does, at the end of this function.
        let mut _bound = None;
        if let Some((listener, bound)) = socket {
            let service = agentd::control::Control::new(agent.clone(), control.owner_only);
            let stop = bound.stop_token();
            _bound = Some(bound);
            tokio::spawn(async move {
                if let Err(e) = service.serve(listener, stop).await {
                    tracing::error!(error = %e, "the control socket failed: {e}; tunnelctl cannot reach agentd until it restarts");
                }
            });
        }
        let render = agent.clone();
        let _metrics =
            daemon::metrics::Server::start(metrics_listen, Arc::new(move || render.metrics()))
                .await?;
        // SIGHUP: the file read again (the endpoint policy applies at once,
        // other changes are named as taking a restart), and a token file
        // changed by hand or by an identity provider's tooling installed
        // (in-band while connected).
        let (reloading, reread) = (agent.clone(), ctx.clone());
        ctx.on_reload(move || {
            let agent = reloading.clone();
            let fresh = reread.load_again::<Agentd>();
            async move { agent.reload(fresh).await }
        });
        // Ready without waiting for the relay: an offline laptop must boot.
        ctx.ready();
        let probing = agent.clone();
        ctx.supervise(move || {
            let agent = probing.clone();
            async move { agent.probe().await }
        });
        agent.run(ctx.shutdown).await;
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli: Cli = daemon::process::parse("agentd");
    match cli.command {
        None => daemon::process::run::<Agentd>(cli.common),
        Some(Command::Pin { relay, ca_file }) => {
            // The CA the agent itself trusts, unless one is given here.
            let ca_file = match ca_file {
                Some(f) => Some(f),
                None => match configured_ca(&cli.common) {
                    Ok(f) => f,
                    Err(e) => {
                        eprintln!("agentd: {e}");
                        return ExitCode::from(daemon::process::exit::CONFIG);
                    }
                },
            };
            pin(&relay, ca_file.as_deref())
        }
        Some(Command::Man) => daemon::process::print_man(daemon::process::command::<Cli>("agentd")),
    }
}

/// `[tls] ca_file` of the configuration file: the one `--config` names
/// (which must load), or the default one when it exists.
fn configured_ca(common: &CommonArgs) -> Result<Option<PathBuf>, daemon::ConfigError> {
    let default = std::path::Path::new("/etc/agentd/agentd.toml");
    if common.config.is_none() && !default.exists() {
        return Ok(None);
    }
    Ok(daemon::process::load::<Agentd>(common)?.ca_file)
}

#[allow(clippy::print_stdout)]
fn pin(relay: &str, ca_file: Option<&std::path::Path>) -> ExitCode {
    let file = std::path::Path::new(relay);
    if file.is_file() {
        return match agentd::tls::pin_of_file(file) {
            Ok(pin) => {
                println!("{pin}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("agentd: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let url = if relay.contains("://") { relay.to_owned() } else { format!("wss://{relay}") };
    let uri = match agentd::config::relay_url(&url) {
        Ok(u) if u.scheme_str() == Some("wss") => u,
        Ok(_) => {
            eprintln!("agentd: {relay} is not a TLS (wss:// or https://) relay; nothing to pin");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("agentd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
    let port = daemon::url::port(&uri);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(agentd::tls::probe(&host, port, ca_file)) {
        Ok(presented) => {
            for (i, pin) in presented.pins.iter().enumerate() {
                let what = if i == 0 {
                    "the relay's own certificate".to_owned()
                } else {
                    format!("chain certificate {i}")
                };
                println!("{pin}\t{what}");
            }
            let trust = match ca_file {
                Some(f) => format!("the CA file {}", f.display()),
                None => "this system's roots".to_owned(),
            };
            match presented.trusted {
                Ok(()) => {
                    eprintln!("agentd: {host}:{port}: the certificate is trusted by {trust}");
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    eprintln!(
                        "agentd: {host}:{port}: the certificate is NOT trusted by {trust} ({why}); pins add to validation, they do not replace it: set [tls] ca_file to the CA that signed it"
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("agentd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
