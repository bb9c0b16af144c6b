//! relayd entry point: the shared daemon phases over [`relayd::Relay`], or
//! an administrative command (`key`, `token`).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use daemon::{CommonArgs, Context, Daemon};

/// The cloud relay of the LLM tunnel.
#[derive(Parser, Debug)]
#[command(name = "relayd", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The signing key relayd mints tokens with.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Tokens and credentials, offline.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print relayd's man page (roff).
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Writes a new Ed25519 signing key (PKCS#8 PEM, mode 0600); set it as
    /// [identity] signing_key_file.
    Generate {
        /// Where to write it (never overwritten).
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// An agent credential (stored in state_dir; relayd must be stopped) or
    /// a client token (signed with the signing key; works while relayd
    /// runs). Prints the token alone on stdout.
    Issue {
        #[arg(long)]
        user: String,
        /// agent or client.
        #[arg(long)]
        role: relayd::identity::Role,
        /// Lifetime of a client token.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Make it a share token: only these paths at the local service
        /// (repeat; a path ending in / covers what is below it).
        #[arg(long = "path")]
        paths: Vec<String>,
        /// Make it a share token: only requests naming these models.
        #[arg(long = "model")]
        models: Vec<String>,
    },
    /// Revokes a credential id (c_...) or a token id (t_...).
    Revoke { id: String },
    /// Lists the agent credentials issued.
    List,
}

struct Relayd;

impl Daemon for Relayd {
    const NAME: &'static str = "relayd";
    const ABOUT: &'static str = "The cloud relay of the LLM tunnel.";
    type File = relayd::ConfigFile;

    fn worker_threads(config: &relayd::Config) -> usize {
        config.worker_threads
    }

    async fn run(config: relayd::Config, ctx: Context) -> anyhow::Result<()> {
        // A socket systemd passed (relayd.socket: port 443 without any
        // capability) wins over `listen`.
        let listener = match ctx.activated_listener() {
            Some(l) => tokio::net::TcpListener::from_std(l)
                .context("cannot use the socket systemd passed")?,
            None => tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?,
        };
        let listen = listener.local_addr()?;
        let control = config.control.clone();
        let socket = daemon::control::open(&control)?;
        let state = relayd::open_state(&config)?;
        let tls = config.tls.clone();
        // SIGHUP: the certificate and key read again (new handshakes get
        // them, open connections keep theirs); the file read again too, and
        // what changed in it named as taking a restart.
        let running = serde_json::to_value(&config).unwrap_or_default();
        let reread = ctx.clone();
        ctx.on_reload(move || {
            let tls = tls.clone();
            let changed = reread
                .load_again::<Relayd>()
                .map(|new| daemon::config::changed_settings(&running, &new));
            async move {
                match changed {
                    Err(e) => tracing::warn!(
                        error = %e,
                        "the configuration file does not load ({e}); the running configuration stays: fix it and reload again"
                    ),
                    Ok(keys) if !keys.is_empty() => tracing::warn!(
                        settings = %keys.join(", "),
                        "changed in the configuration file: {}; they take effect at the next restart (systemctl restart relayd)",
                        keys.join(", ")
                    ),
                    Ok(_) => {}
                }
                let Some(tls) = tls else {
                    return tracing::info!("no certificate to reload without [tls]");
                };
                match tokio::task::spawn_blocking(move || tls.reload()).await {
                    Ok(Ok(())) => tracing::info!("TLS certificate and key reloaded"),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot reload TLS: {e}; keeping the certificate in use")
                    }
                    Err(e) => tracing::warn!(error = %e, "TLS reload failed: {e}; keeping the certificate in use"),
                }
            }
        });
        let metrics_listen = config.metrics_listen;
        let relay = relayd::Relay::with_state(config, state);
        // The socket serves through the drain (status shows "draining"); it
        // goes when `_bound` does, at the end of this function.
        let mut _bound = None;
        if let Some((socket, bound)) = socket {
            let service = relayd::control::Control::new(relay.clone(), listen, control.owner_only);
            let stop = bound.stop_token();
            _bound = Some(bound);
            tokio::spawn(async move {
                if let Err(e) = service.serve(socket, stop).await {
                    tracing::error!(error = %e, "the control socket failed: {e}; tunnelctl cannot reach relayd until it restarts");
                }
            });
        }
        // Metrics outlive the drain, so `relayd_draining` can be scraped.
        let render = relay.clone();
        let _metrics =
            daemon::metrics::Server::start(metrics_listen, Arc::new(move || render.metrics()))
                .await?;
        ctx.ready();
        let probing = relay.clone();
        ctx.supervise(move || {
            let relay = probing.clone();
            async move { relay.probe().await }
        });
        Ok(relay.run(listener, ctx.shutdown).await?)
    }
}

fn main() -> ExitCode {
    let cli: Cli = daemon::process::parse("relayd");
    match cli.command {
        None => daemon::process::run::<Relayd>(cli.common),
        Some(command) => admin(&cli.common, command),
    }
}

#[allow(clippy::print_stdout)]
fn admin(common: &CommonArgs, command: Command) -> ExitCode {
    use relayd::admin;
    let result = match command {
        Command::Key(KeyCommand::Generate { out }) => admin::generate_key(&out).map(|kid| {
            eprintln!(
                "relayd: wrote {} (kid {kid}); set [identity] signing_key_file",
                out.display()
            );
        }),
        Command::Man => {
            return daemon::process::print_man(daemon::process::command::<Cli>("relayd"));
        }
        Command::Token(cmd) => match daemon::process::load::<Relayd>(common) {
            Err(e) => {
                eprintln!("relayd: {e}");
                return ExitCode::from(daemon::process::exit::CONFIG);
            }
            Ok(config) => match cmd {
                TokenCommand::Issue { user, role: relayd::identity::Role::Agent, .. } => {
                    admin::issue_credential(&config, &user).map(|c| {
                        eprintln!("relayd: agent credential {} for {user}", c.id);
                        println!("{}", c.secret);
                    })
                }
                TokenCommand::Issue { user, ttl, paths, models, .. } => {
                    let scope = (!paths.is_empty() || !models.is_empty())
                        .then_some(relayd::identity::Scope { paths, models });
                    admin::mint_client(&config, &user, ttl, scope).map(|m| {
                        eprintln!(
                            "relayd: client token {} for {user}, valid until {}",
                            m.id,
                            humantime::format_rfc3339_seconds(m.expires)
                        );
                        println!("{}", m.token);
                    })
                }
                TokenCommand::Revoke { id } => admin::revoke(&config, &id).map(|fresh| {
                    eprintln!(
                        "relayd: {id} {}",
                        if fresh { "revoked" } else { "was revoked already" }
                    );
                }),
                TokenCommand::List => admin::credentials(&config).map(|list| {
                    for (c, revoked) in list {
                        println!(
                            "{}\t{}\t{}",
                            c.id,
                            c.user,
                            if revoked { "revoked" } else { "valid" }
                        );
                    }
                }),
            },
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relayd: {e}");
            ExitCode::FAILURE
        }
    }
}
