//! `agentd pin`: the pins of the keys a relay presents (for `[tls] pins`),
//! and whether this machine trusts its certificate, the way the agent
//! itself would: with the configuration file's `[tls] ca_file` unless
//! `--ca-file` names another. Exits 1 when the chain is not trusted.

use std::path::PathBuf;
use std::process::ExitCode;

use daemon::CommonArgs;

/// Runs `agentd pin RELAY`.
pub fn run(common: &CommonArgs, relay: &str, ca_file: Option<PathBuf>) -> ExitCode {
    // The CA the agent itself trusts, unless one is given here.
    let ca_file = match ca_file {
        Some(f) => Some(f),
        None => match configured_ca(common) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("agentd: {e}");
                return ExitCode::from(daemon::process::exit::CONFIG);
            }
        },
    };
    pin(relay, ca_file.as_deref())
}

/// `[tls] ca_file` of the configuration file: the one `--config` names
/// (which must load), or the default one when it exists.
fn configured_ca(common: &CommonArgs) -> Result<Option<PathBuf>, daemon::ConfigError> {
    let default = std::path::Path::new("/etc/agentd/agentd.toml");
    if common.config.is_none() && !default.exists() {
        return Ok(None);
    }
    Ok(daemon::process::load::<crate::service::Agentd>(common)?.ca_file)
}

#[allow(clippy::print_stdout)]
fn pin(relay: &str, ca_file: Option<&std::path::Path>) -> ExitCode {
    let file = std::path::Path::new(relay);
    if file.is_file() {
        return match crate::tls::pin_of_file(file) {
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
    let uri = match crate::config::relay_url(&url) {
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
    match rt.block_on(crate::tls::probe(&host, port, ca_file)) {
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
