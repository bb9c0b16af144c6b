//! The control socket both daemons serve their gRPC API on (written once):
//! where it lives, how it is bound, and who may call what.
//!
//! - The socket is a unix socket, mode 0660: the daemon's user and group.
//!   A stale socket (nobody answers on it) is removed; a live one means
//!   another instance runs, and binding fails with that said.
//! - Every call is checked against the caller's credentials (`SO_PEERCRED`,
//!   taken from the connection): read-only calls for root, the daemon's
//!   user and members of its group; calls that change something for root
//!   and the daemon's user. A per-user daemon (its socket under
//!   `$XDG_RUNTIME_DIR`) accepts its own user only.

pub mod conns;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tonic::transport::server::UdsConnectInfo;
use tunnel_proto::control::v1 as pb;

/// `[control]` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    /// The socket's path, or "off". Default: `$RUNTIME_DIRECTORY/control.sock`
    /// under systemd, `/run/NAME/control.sock` for root, else
    /// `$XDG_RUNTIME_DIR/NAME/control.sock`.
    pub socket: Option<String>,
    /// Let `tunnelctl trace --bodies` see request and response bodies
    /// (truncated). Default false: prompts are private.
    pub trace_bodies: Option<bool>,
}

/// The resolved `[control]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Control {
    /// `None`: no control socket.
    pub socket: Option<PathBuf>,
    /// Only the daemon's own user may call (a per-user daemon).
    pub owner_only: bool,
    pub trace_bodies: bool,
    /// The path was configured (not the default): failing to bind it is
    /// an error, not a warning.
    #[serde(skip)]
    pub explicit: bool,
}

impl ControlFile {
    /// Resolves the socket path for daemon `name`.
    pub fn resolve(self, name: &str) -> Control {
        let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
        let socket = match self.socket.as_deref() {
            Some("off") => None,
            Some(p) => Some(PathBuf::from(p)),
            None => Some(default_socket(name)),
        };
        let owner_only = match (&socket, &xdg) {
            (Some(s), Some(x)) => s.starts_with(x),
            _ => false,
        };
        Control {
            explicit: self.socket.is_some(),
            socket,
            owner_only,
            trace_bodies: self.trace_bodies.unwrap_or(false),
        }
    }
}

/// Where daemon `name`'s socket lives when the configuration does not say.
pub fn default_socket(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        let first = dir.to_string_lossy().split(':').next().unwrap_or_default().to_owned();
        return PathBuf::from(first).join("control.sock");
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from(format!("/run/{name}/control.sock"));
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(x) => PathBuf::from(x).join(name).join("control.sock"),
        None => PathBuf::from(format!("/run/{name}/control.sock")),
    }
}

/// The socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{}: another instance is serving on this control socket", .0.display())]
    InUse(PathBuf),
    #[error("control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// Binds the control socket at `path`: the directory is created if
/// missing (mode 0750), a stale socket is removed, the socket gets mode
/// 0660.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
    let io = |source| BindError::Io { path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o750).create(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; remove it or choose another path",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    Ok(listener)
}

/// The bound control socket's lifetime: dropped (when the daemon has
/// drained and returns), it stops the server and removes the socket file.
#[derive(Debug)]
pub struct Bound {
    path: PathBuf,
    stop: tokio_util::sync::CancellationToken,
}

impl Bound {
    /// Cancelled when the socket goes: the server's shutdown.
    pub fn stop_token(&self) -> tokio_util::sync::CancellationToken {
        self.stop.clone()
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the configured control socket. A default path that cannot be
/// used (a daemon run by hand as an ordinary user, without a runtime
/// directory) is logged and skipped; a configured one is an error.
pub fn open(control: &Control) -> Result<Option<(UnixListener, Bound)>, BindError> {
    let Some(path) = &control.socket else { return Ok(None) };
    match bind(path) {
        Ok(listener) => Ok(Some((
            listener,
            Bound { path: path.clone(), stop: tokio_util::sync::CancellationToken::new() },
        ))),
        Err(BindError::Io { source, .. })
            if !control.explicit && source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            tracing::warn!(socket = %path.display(), error = %source, "no control socket: cannot create {}: {source}; tunnelctl cannot reach this daemon (set [control] socket to a writable path)", path.display());
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A daemon's gRPC service, as tonic serves it.
pub trait Service:
    tonic::codegen::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
    > + tonic::server::NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Service for S where
    S: tonic::codegen::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Binds daemon `name`'s control socket as [`open`] does and serves
/// `service` on it; the socket serves until the returned [`Bound`] is
/// dropped (a daemon keeps it through its drain). `None`: no socket.
pub fn start<S: Service>(
    control: &Control,
    name: &'static str,
    service: S,
) -> Result<Option<Bound>, BindError>
where
    S::Future: Send + 'static,
{
    let Some((listener, bound)) = open(control)? else { return Ok(None) };
    let stop = bound.stop_token();
    tokio::spawn(async move {
        if let Err(e) = serve(service, listener, stop).await {
            tracing::error!(
                error = %e,
                "the control socket failed: {e}; tunnelctl cannot reach {name} until it restarts"
            );
        }
    });
    Ok(Some(bound))
}

/// Serves a daemon's gRPC `service` on `listener` until `stop` (the
/// server both daemons run, written once).
pub async fn serve<S: Service>(
    service: S,
    listener: UnixListener,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error>
where
    S::Future: Send + 'static,
{
    let incoming =
        tokio_stream::wrappers::ReceiverStream::new(conns::accept(listener, stop.clone()));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(conns::KEEPALIVE))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
}

/// What a call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads state (status, lists, traces).
    Read,
    /// Changes something (reconnect, rotate, disconnect, tokens, reload).
    Change,
}

/// Who called, from the connection's peer credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Who may call what on one daemon's socket.
#[derive(Debug, Clone)]
pub struct Guard {
    name: &'static str,
    uid: u32,
    gid: u32,
    owner_only: bool,
}

impl Guard {
    /// The rules for daemon `name`, running as this process's user and
    /// group.
    pub fn new(name: &'static str, owner_only: bool) -> Self {
        Self {
            name,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            owner_only,
        }
    }

    /// Allows the call or says why not (`PERMISSION_DENIED`, with what to
    /// do).
    pub fn check<T>(
        &self,
        request: &tonic::Request<T>,
        access: Access,
    ) -> Result<Caller, tonic::Status> {
        let cred =
            request.extensions().get::<UdsConnectInfo>().and_then(|i| i.peer_cred).ok_or_else(
                || tonic::Status::permission_denied("the caller's credentials are unknown"),
            )?;
        let caller = Caller { uid: cred.uid(), gid: cred.gid(), pid: cred.pid() };
        if self.allows(&caller, access) {
            return Ok(caller);
        }
        let name = self.name;
        let why = match (self.owner_only, access) {
            (true, _) => {
                format!("this {name} belongs to uid {}; only that user may use it", self.uid)
            }
            (false, Access::Change) => {
                format!("changing {name} takes root or the {name} user (uid {})", self.uid)
            }
            (false, Access::Read) => format!(
                "reading {name}'s state takes its group (gid {}): add yourself to it, or use sudo",
                self.gid
            ),
        };
        Err(tonic::Status::permission_denied(why))
    }

    fn allows(&self, c: &Caller, access: Access) -> bool {
        if c.uid == self.uid {
            return true;
        }
        if self.owner_only {
            return false;
        }
        if c.uid == 0 {
            return true;
        }
        access == Access::Read && (c.gid == self.gid || in_group(c, self.gid))
    }
}

/// Whether the calling process has `gid` among its supplementary groups
/// (Linux: the process's own list, `/proc/PID/status`, so a `newgrp` or a
/// group added since login counts as the kernel counts it for the socket's
/// mode).
#[cfg(target_os = "linux")]
fn in_group(c: &Caller, gid: u32) -> bool {
    let Some(pid) = c.pid else { return false };
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|groups| groups.split_whitespace().any(|g| g.parse() == Ok(gid)))
}

/// Whether the caller's user is a member of `gid` in the group database
/// (macOS and the BSDs have no `/proc`; the peer credentials come from
/// `getpeereid`).
#[cfg(not(target_os = "linux"))]
fn in_group(c: &Caller, gid: u32) -> bool {
    use nix::unistd::{Gid, Group, Uid, User};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(c.uid)) else { return false };
    matches!(Group::from_gid(Gid::from_raw(gid)), Ok(Some(g)) if g.mem.contains(&user.name))
}

/// The access a `LogLevel` call needs: replacing the filter changes the
/// daemon, reading it does not.
pub fn log_level_access(req: &pb::LogLevelRequest) -> Access {
    if req.filter.is_empty() { Access::Read } else { Access::Change }
}

/// The calls both daemons answer alike, written once: each daemon's
/// service hands its `LogLevel` and `Trace` here.
#[derive(Debug, Clone)]
pub struct Common {
    guard: Guard,
    observer: std::sync::Arc<crate::observe::Observer>,
    /// The daemon knows user ids (relayd): a trace may filter by user.
    users: bool,
}

impl Common {
    pub fn new(
        guard: Guard,
        observer: std::sync::Arc<crate::observe::Observer>,
        users: bool,
    ) -> Self {
        Self { guard, observer, users }
    }

    /// Who may call what on this daemon's socket.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// `LogLevel`: reads the log filter, or replaces it (a change).
    pub fn log_level(
        &self,
        req: tonic::Request<pb::LogLevelRequest>,
    ) -> Result<tonic::Response<pb::LogLevelReply>, tonic::Status> {
        self.guard.check(&req, log_level_access(req.get_ref()))?;
        log_level(req.into_inner()).map(tonic::Response::new)
    }

    /// `Trace`: live request events through a bounded buffer.
    pub fn trace(
        &self,
        req: tonic::Request<pb::TraceRequest>,
    ) -> Result<tonic::Response<crate::trace::TraceStream>, tonic::Status> {
        self.guard.check(&req, Access::Read)?;
        let req = req.into_inner();
        if !self.users && !req.user.is_empty() {
            // This daemon serves one user and knows no user ids: a filter
            // by user would match nothing, silently.
            let name = self.guard.name;
            return Err(tonic::Status::invalid_argument(format!(
                "{name} serves one user: --user filters only at relayd"
            )));
        }
        Ok(tonic::Response::new(self.observer.trace(&req)))
    }
}

/// `LogLevel`, the same for both daemons: reads or replaces the filter.
pub fn log_level(req: pb::LogLevelRequest) -> Result<pb::LogLevelReply, tonic::Status> {
    use crate::logging::{self, FilterError};
    let previous = if req.filter.is_empty() {
        String::new()
    } else {
        logging::set_filter(&req.filter).map_err(|e| match e {
            FilterError::Invalid(..) => tonic::Status::invalid_argument(e.to_string()),
            FilterError::NotInitialized => tonic::Status::unavailable(e.to_string()),
        })?
    };
    let (filter, output) = logging::filter()
        .ok_or_else(|| tonic::Status::unavailable("logging is not set up in this process"))?;
    Ok(pb::LogLevelReply { filter, previous, output: output.as_str().to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(owner_only: bool) -> Guard {
        Guard { name: "agentd", uid: 995, gid: 990, owner_only }
    }

    fn caller(uid: u32, gid: u32) -> Caller {
        Caller { uid, gid, pid: None }
    }

    #[test]
    fn the_service_user_and_root_change_members_of_its_group_read() {
        let g = guard(false);
        for access in [Access::Read, Access::Change] {
            assert!(g.allows(&caller(995, 990), access));
            assert!(g.allows(&caller(0, 0), access));
            assert!(!g.allows(&caller(1000, 1000), access));
        }
        assert!(g.allows(&caller(1000, 990), Access::Read));
        assert!(!g.allows(&caller(1000, 990), Access::Change));
    }

    #[test]
    fn a_per_user_daemon_serves_its_user_only() {
        let g = guard(true);
        assert!(g.allows(&caller(995, 990), Access::Change));
        assert!(!g.allows(&caller(0, 0), Access::Read));
        assert!(!g.allows(&caller(1000, 990), Access::Read));
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("daemon-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("control.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let live = bind(&path).expect("bind");
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("socket").permissions().mode();
            assert_eq!(mode & 0o777, 0o660);
            assert!(matches!(bind(&path), Err(BindError::InUse(_))));
            drop(live);
            // The file stays behind, nobody answers: stale.
            assert!(path.exists());
            bind(&path).expect("a stale socket is replaced");
        });
        std::fs::write(dir.join("plain"), "x").expect("write");
        assert!(matches!(bind(&dir.join("plain")), Err(BindError::Io { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
