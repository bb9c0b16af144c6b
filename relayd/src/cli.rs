//! relayd's command line: the daemon's arguments, and the administrative
//! commands that run instead of it (`key`, `token`, `man`).

use std::process::ExitCode;

use clap::Subcommand;
use daemon::CommonArgs;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The signing key relayd mints tokens with.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Tokens and credentials, offline.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Applies the schema migrations to the replicas' database ([cluster]);
    /// run once before starting relays of a new version.
    Migrate {
        /// Stop at this version (default: every migration this relayd
        /// knows).
        #[arg(long)]
        to: Option<u32>,
        /// Only print the database's version and what would be applied.
        #[arg(long)]
        status: bool,
    },
    /// The replicas in the [cluster] database, their health, and where
    /// each device is connected.
    Cluster,
    /// Print relayd's man page (roff).
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Writes a new Ed25519 signing key (PKCS#8 PEM, mode 0600); set it as
    /// [identity] signing_key_file.
    Generate {
        /// Where to write it (never overwritten).
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// An agent credential (stored in state_dir, where relayd must be
    /// stopped, or in the [cluster] database, while relays run) or
    /// a client token (signed with the signing key; works while relayd
    /// runs). Prints the token alone on stdout.
    Issue {
        #[arg(long)]
        user: String,
        /// agent or client.
        #[arg(long)]
        role: crate::identity::Role,
        /// An agent credential's device under the user (default: the
        /// user's one default device). Each device keeps its own session.
        #[arg(long)]
        device: Option<String>,
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

#[allow(clippy::print_stdout)]
pub fn admin(common: &CommonArgs, command: Command) -> ExitCode {
    use crate::admin;
    let result = match command {
        Command::Key(KeyCommand::Generate { out }) => admin::generate_key(&out).map(|kid| {
            eprintln!(
                "relayd: wrote {} (kid {kid}); set [identity] signing_key_file",
                out.display()
            );
        }),
        Command::Man => {
            return daemon::process::print_man(daemon::process::command::<
                crate::service::Relayd,
                Command,
            >());
        }
        Command::Cluster => match daemon::process::load::<crate::service::Relayd>(common) {
            Err(e) => {
                eprintln!("relayd: {e}");
                return ExitCode::from(daemon::process::exit::CONFIG);
            }
            Ok(config) => crate::admin::cluster_command(&config).map(|said| print!("{said}")),
        },
        Command::Migrate { to, status } => {
            match daemon::process::load::<crate::service::Relayd>(common) {
                Err(e) => {
                    eprintln!("relayd: {e}");
                    return ExitCode::from(daemon::process::exit::CONFIG);
                }
                Ok(config) => crate::admin::migrate_command(&config, to, status).map(|said| {
                    println!("{said}");
                }),
            }
        }
        Command::Token(cmd) => match daemon::process::load::<crate::service::Relayd>(common) {
            Err(e) => {
                eprintln!("relayd: {e}");
                return ExitCode::from(daemon::process::exit::CONFIG);
            }
            Ok(config) => match cmd {
                TokenCommand::Issue {
                    user, role: crate::identity::Role::Agent, device, ..
                } => admin::issue_credential(&config, &user, device.as_deref()).map(|c| {
                    eprintln!(
                        "relayd: agent credential {} for {user}, device {}",
                        c.id,
                        c.device.as_deref().unwrap_or(crate::identity::DEFAULT_DEVICE)
                    );
                    println!("{}", c.secret);
                }),
                TokenCommand::Issue { user, ttl, paths, models, device: None, .. } => {
                    let scope = (!paths.is_empty() || !models.is_empty())
                        .then_some(crate::identity::Scope { paths, models });
                    admin::mint_client(&config, &user, ttl, scope).map(|m| {
                        eprintln!(
                            "relayd: client token {} for {user}, valid until {}",
                            m.id,
                            humantime::format_rfc3339_seconds(m.expires)
                        );
                        println!("{}", m.token);
                    })
                }
                TokenCommand::Issue { device: Some(_), .. } => {
                    Err(crate::admin::AdminError::Invalid(
                        "a device names an agent's credential; client tokens take none".into(),
                    ))
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
                            "{}\t{}\t{}\t{}",
                            c.id,
                            c.user,
                            if revoked { "revoked" } else { "valid" },
                            c.device.as_deref().unwrap_or(crate::identity::DEFAULT_DEVICE)
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
