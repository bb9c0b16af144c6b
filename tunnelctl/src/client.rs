//! Finding a daemon's control socket, connecting to it, and turning every
//! failure into a message that says what to do (and an exit code).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cli::{Global, Which};
use crate::exit;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{name} is not running: no control socket at {}", path.display())]
    NotRunning { name: &'static str, path: PathBuf },
    #[error("neither agentd nor relayd is running here: no control socket at {}", tried.join(", "))]
    NoDaemon { tried: Vec<String> },
    #[error("nobody answers on {} ({name} stopped and left its socket?)", path.display())]
    Refused { name: &'static str, path: PathBuf },
    #[error("permission denied: {why}")]
    Permission { why: String },
    #[error("{name} did not answer within {}", humantime::format_duration(*timeout))]
    Timeout { name: &'static str, timeout: Duration },
    #[error("{name} did not answer in time (see --timeout)")]
    NoAnswer { name: &'static str },
    #[error("{0}")]
    Input(String),
    #[error("{name}: {message}")]
    Daemon { name: &'static str, message: String, unimplemented: bool },
    #[error("{0}")]
    Other(String),
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::NotRunning { .. } | CtlError::NoDaemon { .. } | CtlError::Refused { .. } => {
                exit::UNAVAILABLE
            }
            CtlError::Permission { .. } => exit::NO_PERMISSION,
            CtlError::Timeout { .. } | CtlError::NoAnswer { .. } => exit::TIMEOUT,
            CtlError::Input(_) => exit::DATA,
            CtlError::Daemon { .. } | CtlError::Other(_) => exit::FAILED,
        }
    }

    /// The error of a call to `name`'s API.
    pub fn from_status(name: &'static str, s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::PermissionDenied => CtlError::Permission { why: s.message().to_owned() },
            // tonic reports its own request timeout as Cancelled.
            tonic::Code::DeadlineExceeded => CtlError::NoAnswer { name },
            tonic::Code::Cancelled if s.message().contains("Timeout expired") => {
                CtlError::NoAnswer { name }
            }
            tonic::Code::Unimplemented => CtlError::Daemon {
                name,
                message: format!("this socket does not serve that ({})", s.message()),
                unimplemented: true,
            },
            _ => CtlError::Daemon { name, message: s.message().to_owned(), unimplemented: false },
        }
    }
}

/// Where daemon `which`'s socket is by default, most likely first.
pub fn default_sockets(which: Which) -> Vec<PathBuf> {
    let name = which.name();
    let mut out = Vec::new();
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        out.push(PathBuf::from(x).join(name).join("control.sock"));
    }
    out.push(PathBuf::from(format!("/run/{name}/control.sock")));
    out
}

/// The socket and daemon a command talks to: `--socket` (with `--daemon`
/// or the command's own daemon; else agentd), else the first default
/// socket that exists.
pub fn locate(global: &Global, only: Option<Which>) -> Result<(Which, PathBuf), CtlError> {
    let wanted = only.or(global.daemon);
    if let Some(path) = &global.socket {
        return Ok((wanted.unwrap_or(Which::Agentd), path.clone()));
    }
    let candidates: Vec<Which> = match wanted {
        Some(w) => vec![w],
        None => vec![Which::Agentd, Which::Relayd],
    };
    let mut tried = Vec::new();
    for which in &candidates {
        for path in default_sockets(*which) {
            match std::fs::symlink_metadata(&path) {
                Ok(_) => {
                    // Both daemons on one host: say which one answers.
                    if wanted.is_none()
                        && let Some(other) = candidates.iter().find(|w| *w != which)
                        && default_sockets(*other).iter().any(|p| p.exists())
                    {
                        eprintln!(
                            "tunnelctl: {0} and {1} both run here; this is {0} (--daemon {1} for the other)",
                            which.name(),
                            other.name()
                        );
                    }
                    return Ok((*which, path));
                }
                // /run/NAME is 0750 NAME:NAME: a non-member cannot even see
                // whether the socket is there. The daemon runs; say so.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(CtlError::Permission {
                        why: format!(
                            "cannot reach {}: add yourself to group {} (then log in again), or use sudo",
                            path.display(),
                            which.name()
                        ),
                    });
                }
                Err(_) => tried.push(path.display().to_string()),
            }
        }
    }
    match wanted {
        Some(w) => Err(CtlError::NotRunning {
            name: w.name(),
            path: default_sockets(w).pop().unwrap_or_default(),
        }),
        None => Err(CtlError::NoDaemon { tried }),
    }
}

/// Connects to the socket at `path` (for daemon `name`); each call then
/// has `timeout` to answer, unless `streaming` (a trace runs as long as it
/// runs).
pub async fn connect(
    name: &'static str,
    path: &Path,
    timeout: Duration,
    streaming: bool,
) -> Result<Channel, CtlError> {
    // Probe first: the connector's errors reach us wrapped and vague.
    match tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path)).await {
        Err(_) => return Err(CtlError::Timeout { name, timeout }),
        Ok(Ok(_probe)) => {}
        Ok(Err(e)) => {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound => {
                    CtlError::NotRunning { name, path: path.to_owned() }
                }
                // A per-user agentd's socket sits in its owner's runtime
                // directory (0700): no group opens it.
                std::io::ErrorKind::PermissionDenied if path.starts_with("/run/user") => {
                    CtlError::Permission {
                        why: format!(
                            "cannot open {}: it is another user's {name}, and only that user may use it",
                            path.display()
                        ),
                    }
                }
                std::io::ErrorKind::PermissionDenied => CtlError::Permission {
                    why: format!(
                        "cannot open {}: add yourself to group {name} (then log in again), or use sudo",
                        path.display()
                    ),
                },
                std::io::ErrorKind::ConnectionRefused => {
                    CtlError::Refused { name, path: path.to_owned() }
                }
                _ => CtlError::Other(format!("{}: {e}", path.display())),
            });
        }
    }
    let path = path.to_owned();
    // The URI is required by the API and ignored by the connector.
    let mut endpoint = Endpoint::try_from("http://control.sock")
        .map_err(|e| CtlError::Other(e.to_string()))?
        .connect_timeout(timeout);
    if !streaming {
        endpoint = endpoint.timeout(timeout);
    }
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| CtlError::Other(format!("cannot talk to {name}: {e}")))
}
